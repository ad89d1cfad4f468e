"""Paged-cache row lookups on the CPU in one native call each (lookup.c through ctypes), for
cache/paged.py's eager steps: the same row ids as its PyTorch path (integer arithmetic), without
~10 PyTorch ops per lookup; also a write's row scatter (`scatter_rows`, the bytes index_put_
copies), the CSA top-k's pick of located rows (`pick_rows`) and the compressor's ape add
(`add_rows_at`). `available()` is False where
lookup.c cannot be built; callers then keep their PyTorch paths.
"""
from __future__ import annotations

import ctypes
import struct

import torch

from dayzero.ops.cpu import build

_I64, _BOOL, _F32 = torch.int64, torch.bool, torch.float32
_fns: list = []
# the packed entry points' argument blocks (per-call overhead: one ctypes argument, not eight)
_SCATTER, _PICK, _ADD = struct.Struct("=8q"), struct.Struct("=8q"), struct.Struct("=9q")


def _bind() -> tuple:
    if not _fns:
        lib = build.lib("lookup")
        lk = build.bind(lib, "dz_lookup", "ppiipipiiiipipppp")
        lc = build.bind(lib, "dz_locate", "ppiipiipiipiiiiiippp")
        sc = build.bind(lib, "dz_scatter_rows_packed", "p")
        pk = build.bind(lib, "dz_pick_rows_packed", "p")
        ad = build.bind(lib, "dz_add_rows_at_packed", "p")
        lk.restype = lc.restype = sc.restype = pk.restype = ad.restype = ctypes.c_int64
        _fns.extend((lk, lc, sc, pk, ad))
    return _fns[0], _fns[1]


def available() -> bool:
    try:
        _bind()
        return True
    except build.NativeUnavailable:
        return False


def fits(ints: tuple[torch.Tensor | None, ...], bools: tuple[torch.Tensor | None, ...] = ()) -> bool:
    """Whether these tensors suit the native path: int64 (`ints`) and bool (`bools`) CPU tensors
    (None: absent). Anything else takes the PyTorch path, whose errors are its own."""
    return (all(t is None or (t.dtype is _I64 and t.is_cpu) for t in ints)
            and all(t is None or (t.dtype is _BOOL and t.is_cpu) for t in bools))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def slot_map(slots: list[int], rows: int):
    """The slot map the lookups take (`slots`): sequence b reads row slots[b] of a table of `rows`
    rows (cache/paged.py DeviceTables), as a ctypes int64 array (no tensor, no PyTorch op)."""
    if any(not 0 <= s < rows for s in slots):
        raise IndexError(f"paged lookup: slots {slots} out of range for tables of {rows} rows")
    return (ctypes.c_int64 * len(slots))(*slots)


def lookup(tab: torch.Tensor, seq: torch.Tensor, index: torch.Tensor, per_block: int, trash: int,
           protect: torch.Tensor | None, ratio: int | None, live: torch.Tensor | None,
           bad: ctypes.c_int64, slots=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(flat row ids of the rows kept, keep mask or None when all are kept) of 1-D int64 seq/index;
    `bad` grows by the rows that land in the trash block (of live sequences). slots (`slot_map`):
    sequence b's table is row slots[b] of tab (None: row b)."""
    lk, _ = _bind()
    n = index.shape[0]
    if seq.dim() != 1 or index.dim() != 1 or seq.shape[0] != n:
        raise ValueError(f"paged lookup: seq {tuple(seq.shape)} and index {tuple(index.shape)} must be 1-D "
                         "of one length")
    out = torch.empty(n, dtype=_I64)
    keep = None if protect is None else torch.empty(n, dtype=_BOOL)
    if protect is not None:
        protect = protect.contiguous()
    nseq = tab.shape[0] if slots is None else len(slots)
    m = lk(tab.data_ptr(), None if slots is None else ctypes.addressof(slots), nseq, tab.shape[1], seq.data_ptr(), seq.stride(0), index.data_ptr(),
           index.stride(0), n, per_block, trash, _ptr(protect), ratio or 1, _ptr(live), out.data_ptr(),
           _ptr(keep), ctypes.addressof(bad))
    if m < 0:
        raise IndexError(f"paged lookup: sequence {int(seq[-1 - m])} is out of range for a batch of "
                         f"{nseq} block tables")
    if m == n:
        return out, None
    return out[:m], keep


def locate(tab: torch.Tensor, seq: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, per_block: int,
           trash: int, live: torch.Tensor | None, bad: ctypes.c_int64, slots=None) -> torch.Tensor:
    """ids [N, K]: rows index[n, k] of sequences seq (broadcast to index) where valid, else -1
    (slots: as `lookup`'s)."""
    _, lc = _bind()
    if index.dim() != 2 or valid.shape != index.shape:
        raise ValueError(f"paged locate: index {tuple(index.shape)} must be 2-D with valid "
                         f"{tuple(valid.shape)} of its shape")
    rows, cols = index.shape
    if seq.dim() == 2 and seq.shape[0] == rows and seq.shape[1] in (1, cols):  # broadcast by strides
        ss0, ss1 = seq.stride(0), (0 if seq.shape[1] == 1 else seq.stride(1))
    else:
        seq = seq.expand(rows, cols)
        ss0, ss1 = seq.stride()
    out = torch.empty(rows, cols, dtype=_I64)
    nseq = tab.shape[0] if slots is None else len(slots)
    rc = lc(tab.data_ptr(), None if slots is None else ctypes.addressof(slots), nseq, tab.shape[1], seq.data_ptr(),
            ss0, ss1,
            index.data_ptr(), index.stride(0), index.stride(1), valid.data_ptr(), valid.stride(0), valid.stride(1),
            rows, cols, per_block, trash, _ptr(live), out.data_ptr(), ctypes.addressof(bad))
    if rc < 0:
        raise IndexError(f"paged locate: a sequence of {seq.unique().tolist()} is out of range for a batch "
                         f"of {nseq} block tables")
    return out


def pool_rows(pool: torch.Tensor) -> tuple | None:
    """What `scatter_rows` needs of a pool [P, *row] that stays put (a cache pool's member view):
    (pool, dtype, row shape, address, rows, row stride in bytes, row bytes), once per pool; None
    where its rows are not contiguous or it is not a CPU tensor."""
    if not pool.is_cpu or pool.dim() < 1:
        return None
    shape, strides, inner = pool.shape, pool.stride(), 1
    for d in range(len(shape) - 1, 0, -1):  # a pool row's elements contiguous
        if shape[d] != 1 and strides[d] != inner:
            return None
        inner *= shape[d]
    es = pool.element_size()
    return pool, pool.dtype, tuple(shape[1:]), pool.data_ptr(), shape[0], strides[0] * es, inner * es


def scatter_rows(pool: torch.Tensor, flat: torch.Tensor, values: torch.Tensor, rows: tuple | None = None) -> bool:
    """pool[flat] = values (pool [P, *row], flat [n] int64, values [n, *row]) as one native row
    copy, bit for bit what index_put_ stores, when the operands suit it: CPU tensors of one dtype,
    pool rows contiguous, values contiguous (rows: `pool_rows(pool)`, where the caller keeps it).
    Returns False (nothing written) where they do not."""
    info = pool_rows(pool) if rows is None else rows
    if info is None:
        return False
    _, dtype, row, address, prows, stride, row_bytes = info
    n = flat.shape[0]
    if (values.dtype != dtype or flat.dtype is not _I64 or flat.dim() != 1 or values.shape[0] != n
            or values.shape[1:] != row or not values.is_contiguous() or not flat.is_contiguous()
            or not values.is_cpu or not flat.is_cpu):
        return False
    if n:
        _bind()
        rc = _fns[2](_SCATTER.pack(address, prows, stride, flat.data_ptr(), n, values.data_ptr(), row_bytes, row_bytes))
        if rc < 0:
            raise IndexError(f"paged write: row {int(flat[-1 - rc])} is out of range for a pool of {prows} rows")
    return True


def pick_rows(rows: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """rows [N, K] int64, top [N, k] int64 (-1 = none) -> [N, k]: rows[n, top[n, j]], -1 where
    top[n, j] < 0 (torch.gather(rows, 1, top.clamp(min=0)).masked_fill_(top < 0, -1) in one call)."""
    if (rows.dtype is not _I64 or top.dtype is not _I64 or rows.dim() != 2 or top.dim() != 2
            or rows.shape[0] != top.shape[0] or not rows.is_cpu or not top.is_cpu
            or (rows.stride(1) != 1 and rows.shape[1] > 1) or (top.stride(1) != 1 and top.shape[1] > 1)
            or not available()):
        return torch.gather(rows, 1, top.clamp(min=0)).masked_fill_(top < 0, -1)
    N, k = top.shape
    out = torch.empty(N, k, dtype=_I64, device=rows.device)
    if _fns[3](_PICK.pack(rows.data_ptr(), rows.stride(0), rows.shape[1], top.data_ptr(), top.stride(0), N, k,
                          out.data_ptr())):
        raise IndexError(f"top-k pick: an index is out of range for {rows.shape[1]} located rows")
    return out


def add_rows_at(dst: torch.Tensor, off: int, table: torch.Tensor, idx: torch.Tensor) -> bool:
    """dst[n, off:off + W] += table[idx[n]] in place (dst [N, >= off + W] fp32, table [R, W] fp32,
    idx [N] int64; CPU, unit inner strides) in one native call: the same fp32 adds as
    dst[:, off:off + W].add_(table.index_select(0, idx)). Returns False (nothing done) where the
    operands do not suit it."""
    if (dst.dtype is not _F32 or table.dtype is not _F32 or idx.dtype is not _I64
            or dst.dim() != 2 or table.dim() != 2 or idx.dim() != 1 or not dst.is_cpu or not table.is_cpu
            or not idx.is_cpu or idx.shape[0] != dst.shape[0] or dst.shape[1] < off + table.shape[1]
            or dst.stride(1) != 1 or table.stride(1) != 1 or not idx.is_contiguous() or not available()):
        return False
    if _fns[4](_ADD.pack(dst.data_ptr(), dst.shape[0], dst.stride(0), off, table.data_ptr(), table.shape[0],
                         table.stride(0), idx.data_ptr(), table.shape[1])):
        raise IndexError(f"add_rows_at: an index is out of range for {table.shape[0]} rows")
    return True
