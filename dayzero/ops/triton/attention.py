"""Sparse MQA attention over paged KV pools (twin: ops/ref.py; the indexer scores: indexer.py).

sparse_attn_paged: split-K flash-decoding. Keys: rows of one or two pools [P, D] (bf16 on V4:
one 1 KiB row per key at D=512) named per query by idx [N, K_i] (-1 = none). The concatenated
key list (source 0's K0 keys padded to a BLOCK_K multiple, then source 1's) is cut into blocks
of BLOCK_K keys, and the blocks into S splits of SPLIT_BLOCKS consecutive blocks.
  One program = one query, BLOCK_H heads, and one split (spread) or all S splits in order (not
  spread). It keeps q [BLOCK_H, D] in registers, and per key block gathers keys [BLOCK_K, D]
  once (row-contiguous, vectorized loads) and serves all BLOCK_H heads from it: logits = q @
  keys^T [BLOCK_H, BLOCK_K] (tensor cores, fp32 accumulate), online softmax in the exp2 domain,
  acc [BLOCK_H, D] fp32 += p @ keys (the same tile: MQA keys are the values). D is not tiled:
  both dots need the full key row, and tiling D for QK^T would make the PV dot re-read the
  keys. At D=512 (sm_90, triton 3.9, scripts/aot_compile.py) BLOCK_H=16, BLOCK_K=32, 4 warps
  takes 173-190 registers with int64 indices (134 with int32) and no spills, 8 warps ~100;
  BLOCK_K=64 or BLOCK_H=64 spill, so the tuning space stops at 32 x 32 / 16 x 32 tiles (fp32
  inputs do spill).
  Each split starts its own (max, sum, acc) and the splits' states are merged in split order
  (_merge: one fixed formula), then the sink is added (_finish). Not spread (prefill: N * head
  blocks fill the SMs), grid (N * ceil(H / BLOCK_H), 1): the program merges its splits as it
  goes and writes the output. Spread (decode), grid (N * head blocks, S): each program writes
  its split's state [N, H, S] (max, sum) and [N, H, S, D] acc fp32 to scratch and
  _combine_kernel (grid N * head blocks) merges them in split order with the same helpers.
Batch invariance (issue 20): a query's output must not depend on the other queries of the call,
so the split structure is fixed by the key positions alone: BLOCK_K and SPLIT_BLOCKS (and
BLOCK_H, num_warps: they shape the in-program reductions) come from the key "D{D}-H{H}" only,
never from N or the key count; the key count only decides how many splits exist, and a split
past a query's last valid key (the padding of a batch whose other queries see more entries:
the HCA/CSA entry lists are as wide as the batch's longest) leaves the state exactly as it was
(its max -1e30 and sum 0 merge as weights exp2(-huge) = 0). Both kernels are compiled with
enable_fp_fusion=False, so the merge and finish arithmetic is the same IEEE operations in the
attention and the combine kernel (no mul+add contracted into an FMA in one and not the other);
spread or not then gives the same bits, and decode and prefill queries share them.
Cost (not measured on a GPU: none was lent): before, the split count grew with the programs
needed to fill the SMs (batch-1 decode at 640 keys: 20 splits of one 32-key block); now
SPLIT_BLOCKS = 4 for every call: 5 splits there (20 programs with 4 head blocks instead of 80),
so short-context batch-1 decode attention is expected slower; long HCA lists (8K entries) get
~65 splits whose partials are about as many bytes as the keys. Prefill pays one state merge per
split (a rescale of acc) and no scratch, and holds a second [BLOCK_H, D] fp32 accumulator (the
running state beside the split's): at D=512, bf16, 16 x 32 tiles, sm_90 (triton 3.9,
scripts/aot_compile.py, 2026-12-07) the looping variant takes 255 registers and spills 12 B at 4
warps (128 registers, 8 B at 8 warps), where the one-split variant takes 185 (106-173 for decode's
spread variant, no spills). The FP8-pool and fp32 variants spilled before and still do.

Pools of an FP8 cache (ops/kvfp8.Fp8Rows: uint8 rows of e4m3 nope codes, one UE8M0 scale byte
per 64 of them, the rope dims in the compute dtype) are decoded as the key tile is loaded: codes
through fp16 bit arithmetic (no FP8 hardware needed), times the row's scales (one [BLOCK_K,
D/64] load, broadcast over 64-dim groups), converted to the compute dtype at once; the rope dims
are read through a view of the same rows in their dtype. Decoded values are exactly those of the
compute-dtype pool the rows came from, so the output is the same. 584 instead of 1,024 bytes a
key at D=512. The decode needs registers beside the bf16 tile: at 32-key tiles and 4 warps sm_90
spills ~0.9 KB a thread, so FP8 pools have their own default (ATTN_FP8_DEFAULT: the same 32-key
tile, 8 warps; a 16-key tile would not spill but would change the softmax grouping and so the
bits) and tuning keys (suffix "-fp8"). fp32 activations over FP8 pools
compile with heavy spills (tens of KB; fp32 already spills over bf16 pools): a CPU-test and
fp32-reference combination, not a GPU serving one.

The Triton interpreter's tl.dot is wrong on 16-bit operands, so USE_F32 (set under
TRITON_INTERPRET=1, or when an operand is fp32) feeds the dots fp32 in IEEE precision.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from dayzero.ops.kvfp8 import Fp8Layout, Fp8Rows, pack
from dayzero.ops.triton import tuning
from dayzero.ops.triton.gemm import _e4m3_x2m8

LOG2E = 1.4426950408889634
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INTS = (torch.int32, torch.int64)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a pretend GPU small enough that tiny test shapes take the split path


# ---- sparse attention ------------------------------------------------------------------------
@triton.jit
def _load_keys(pool, s_pool, rope, s_rope, ids, ok, offs_d, D, NOPE, SCALE_OFF, FP8: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, KDT: tl.constexpr):
    """Key rows ids [BLOCK_K] (ok: valid) -> [BLOCK_K, BLOCK_D] in KDT, zeros where not valid or
    d >= D. FP8: pool is uint8 rows (s_pool bytes apart) of NOPE e4m3 codes with one scale byte
    per 64 at SCALE_OFF, rope a view of the same rows in the rope dtype (s_rope elements apart)."""
    if FP8:
        SB: tl.constexpr = 64 if BLOCK_D >= 64 else BLOCK_D
        NB: tl.constexpr = BLOCK_D // SB
        nope = offs_d < NOPE
        rp = pool + ids[:, None] * s_pool
        b = tl.load(rp + offs_d[None, :], mask=ok[:, None] & nope[None, :], other=0)
        jb = tl.arange(0, NB)
        e = tl.load(rp + SCALE_OFF + jb[None, :], mask=ok[:, None] & (jb * SB < NOPE)[None, :], other=0)
        sc = (e.to(tl.int32) << 23).to(tl.float32, bitcast=True) * 256.0  # 2^(e - 127) x the 2^8 below
        kn = tl.reshape(tl.reshape(_e4m3_x2m8(b), [BLOCK_K, NB, SB]) * sc[:, :, None], [BLOCK_K, BLOCK_D])
        mr = ok[:, None] & (offs_d >= NOPE)[None, :] & (offs_d < D)[None, :]
        kr = tl.load(rope + ids[:, None] * s_rope + (offs_d - NOPE)[None, :], mask=mr, other=0.0)
        k = tl.where(nope[None, :], kn.to(KDT), kr.to(KDT))  # exact: codes x 2^k fit KDT
    else:
        k = tl.load(pool + ids[:, None] * s_pool + offs_d[None, :], mask=ok[:, None] & (offs_d < D)[None, :],
                    other=0.0).to(KDT)
    return k


@triton.jit
def _attn_block(acc, m_i, l_i, q, pool, s_pool, rope, s_rope, NOPE, SCALE_OFF, idx_row, K, start, qk_scale,
                BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, D, USE_F32: tl.constexpr, FP8: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    j = start + offs_k
    ids = tl.load(idx_row + j, mask=j < K, other=-1).to(tl.int64)
    ok = ids >= 0
    k = _load_keys(pool, s_pool, rope, s_rope, ids, ok, offs_d, D, NOPE, SCALE_OFF, FP8, BLOCK_K, BLOCK_D,
                   tl.float32 if USE_F32 else q.dtype)
    if USE_F32:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
    # m_i starts finite (-1e30), so a block of only invalid keys gives exp2(-inf) = 0, never NaN
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if USE_F32:
        pv = tl.dot(p, k, input_precision="ieee")
    else:
        pv = tl.dot(p.to(k.dtype), k)
    return acc * alpha[:, None] + pv, m_new, l_i


@triton.jit
def _merge(m_r, l_r, acc_r, m, l, acc):
    """The running (max, sum, acc) of the splits so far merged with one split's: the same IEEE
    operations wherever it runs (kernels compiled without FMA contraction)."""
    m_new = tl.maximum(m_r, m)
    a = tl.exp2(m_r - m_new)
    b = tl.exp2(m - m_new)
    return m_new, l_r * a + l * b, acc_r * a[:, None] + acc * b[:, None]


@triton.jit
def _finish(m_r, l_r, acc_r, sink):
    """Output rows from the merged state and the sink logits (log2 domain)."""
    mx = tl.maximum(m_r, sink)
    c = tl.exp2(m_r - mx)
    return acc_r * (c / (l_r * c + tl.exp2(sink - mx)))[:, None]


@triton.jit
def _sparse_attn_kernel(q_ptr, sink_ptr, out_ptr, m_ptr, l_ptr, part_ptr,
                        pool0, s_pool0, rope0, s_rope0, idx0, s_idx0, K0,
                        pool1, s_pool1, rope1, s_rope1, idx1, s_idx1, K1,
                        H, D, S, SPLITS, blocks_per_split, qk_scale, NOPE, SCALE_OFF,
                        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                        USE_F32: tl.constexpr, FINAL: tl.constexpr, FP8_0: tl.constexpr, FP8_1: tl.constexpr):
    pid = tl.program_id(0)
    n_hb = tl.cdiv(H, BLOCK_H)
    n = (pid // n_hb).to(tl.int64)
    offs_h = (pid % n_hb) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < H
    hd_ok = h_ok[:, None] & (offs_d < D)[None, :]
    rows = n * H + offs_h  # [BLOCK_H] rows of q/out viewed as [N*H, D]
    q = tl.load(q_ptr + rows[:, None] * D + offs_d[None, :], mask=hd_ok, other=0.0)
    if USE_F32:
        q = q.to(tl.float32)
    acc_r = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    m_r = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_r = tl.zeros([BLOCK_H], tl.float32)

    nb0 = tl.cdiv(K0, BLOCK_K)
    nb = nb0 + tl.cdiv(K1, BLOCK_K)
    first = tl.program_id(1) * SPLITS
    for sp in range(first, first + SPLITS):  # this program's splits, in order
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        # m starts finite (-1e30), so a block of only invalid keys gives exp2(-inf) = 0, never NaN
        m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        lo = sp * blocks_per_split
        hi = tl.minimum(lo + blocks_per_split, nb)
        for b in range(lo, tl.minimum(hi, nb0)):
            acc, m_i, l_i = _attn_block(acc, m_i, l_i, q, pool0, s_pool0, rope0, s_rope0, NOPE, SCALE_OFF,
                                        idx0 + n * s_idx0, K0, b * BLOCK_K, qk_scale, BLOCK_K, BLOCK_D, D,
                                        USE_F32, FP8_0)
        for b in range(tl.maximum(lo, nb0), hi):
            acc, m_i, l_i = _attn_block(acc, m_i, l_i, q, pool1, s_pool1, rope1, s_rope1, NOPE, SCALE_OFF,
                                        idx1 + n * s_idx1, K1, (b - nb0) * BLOCK_K, qk_scale, BLOCK_K, BLOCK_D, D,
                                        USE_F32, FP8_1)
        m_r, l_r, acc_r = _merge(m_r, l_r, acc_r, m_i, l_i, acc)

    if FINAL:
        sink = tl.load(sink_ptr + offs_h, mask=h_ok, other=0.0) * 1.4426950408889634
        o = _finish(m_r, l_r, acc_r, sink)
        tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=hd_ok)
    else:  # one split (SPLITS = 1): its state, exactly (merged into the initial state)
        prow = rows * S + tl.program_id(1)  # [N, H, S] partials; acc rows of D each
        tl.store(m_ptr + prow, m_r, mask=h_ok)
        tl.store(l_ptr + prow, l_r, mask=h_ok)
        tl.store(part_ptr + prow[:, None] * D + offs_d[None, :], acc_r, mask=hd_ok)


@triton.jit
def _combine_kernel(m_ptr, l_ptr, part_ptr, sink_ptr, out_ptr, H, D, S,
                    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """The S split states of one query's BLOCK_H heads merged in split order, then the sink."""
    pid = tl.program_id(0)
    n_hb = tl.cdiv(H, BLOCK_H)
    n = (pid // n_hb).to(tl.int64)
    offs_h = (pid % n_hb) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < H
    hd_ok = h_ok[:, None] & (offs_d < D)[None, :]
    rows = n * H + offs_h
    acc_r = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    m_r = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_r = tl.zeros([BLOCK_H], tl.float32)
    for s in range(S):
        prow = rows * S + s
        m = tl.load(m_ptr + prow, mask=h_ok, other=-1.0e30)
        l = tl.load(l_ptr + prow, mask=h_ok, other=0.0)
        acc = tl.load(part_ptr + prow[:, None] * D + offs_d[None, :], mask=hd_ok, other=0.0)
        m_r, l_r, acc_r = _merge(m_r, l_r, acc_r, m, l, acc)
    sink = tl.load(sink_ptr + offs_h, mask=h_ok, other=0.0) * 1.4426950408889634
    o = _finish(m_r, l_r, acc_r, sink)
    tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=hd_ok)


# SPLIT_BLOCKS: key blocks a split (the split structure: fixed per key, see the docstring);
# WAVES: spread the splits over programs when N * head blocks < WAVES x SMs (no effect on bits)
ATTN_DEFAULT = {"BLOCK_H": 16, "BLOCK_K": 32, "SPLIT_BLOCKS": 4, "num_warps": 4, "num_stages": 2, "waves": 2}
# FP8 pools: the decode of a 32-key tile (codes, scales, rope dims beside the bf16 tile) spills
# ~0.9 KB a thread at 4 warps on sm_90 (scripts/aot_compile.py), so 8 warps share it. The key
# tile and split stay as over bf16 pools: they set the online-softmax grouping and the split
# structure, so the same keys give the same bits from a packed pool as from a bf16 one
ATTN_FP8_DEFAULT = {**ATTN_DEFAULT, "num_warps": 8}


def _check_float(name: str, t, dims: int):
    if not isinstance(t, torch.Tensor) or t.dim() != dims or t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be a {dims}-d float32/bfloat16/float16 tensor, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")


def _check_idx(name: str, idx, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[0] != n or idx.dtype not in _INTS:
        raise ValueError(f"{name} must be int32/int64 [{n}, K], got "
                         f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device}, q on {device}")
    return idx if idx.stride(-1) == 1 else idx.contiguous()


def _rows(name: str, pool, d: int, device: torch.device):
    """A float pool [P, d] with unit element stride, or an Fp8Rows pool of d values a row."""
    if isinstance(pool, Fp8Rows):
        if pool.layout.dim != d:
            raise ValueError(f"{name} rows must have {d} values (q's head dim), got {pool}")
        if pool.device != device:
            raise ValueError(f"{name} is on {pool.device}, q on {device}")
        return pool
    _check_float(name, pool, 2)
    if pool.shape[1] != d:
        raise ValueError(f"{name} rows must have {d} elements (q's head dim), got shape {tuple(pool.shape)}")
    if pool.device != device:
        raise ValueError(f"{name} is on {pool.device}, q on {device}")
    return pool if pool.stride(1) == 1 else pool.contiguous()


def _attn_key(h: int, d: int) -> str:
    """Tuning-table key: the head shape only, never the query or key count (batch invariance)."""
    return f"D{d}-H{h}"


def _use_f32(*ts) -> bool:
    return _interpret() or any((t.layout.rope_dtype if isinstance(t, Fp8Rows) else t.dtype) == torch.float32
                               for t in ts)


def _pool_args(pool) -> tuple:
    """(pool, row stride, rope view, its row stride, FP8 flag) kernel arguments of one source."""
    if isinstance(pool, Fp8Rows):
        lay, data = pool.layout, pool.data
        e = lay.elem
        if data.stride(0) % e or data.storage_offset() % e:
            raise ValueError(f"FP8 pool rows must start at multiples of {e} bytes for its {lay.rope_dtype} rope dims")
        rope = data.view(lay.rope_dtype)[:, lay.rope_off // e:lay.scale_off // e]
        return data, data.stride(0), rope, rope.stride(0), True
    return pool, pool.stride(0), pool, 0, False


def sparse_attn_paged(q: torch.Tensor, sources: list[tuple[torch.Tensor, torch.Tensor]], sink: torch.Tensor,
                      scale: float, *, config: dict | None = None) -> torch.Tensor:
    """q [N,H,D]; sources: 1 or 2 (pool [P,D] or Fp8Rows, idx [N,K] int32/64, -1 = none); sink [H]
    -> [N,H,D] in q.dtype (see the module docstring and ref.sparse_attn_paged)."""
    _check_float("q", q, 3)
    N, H, D = q.shape
    dev = q.device
    if not isinstance(sources, (list, tuple)) or len(sources) not in (1, 2):
        raise ValueError(f"sources must be a list of 1 or 2 (pool, idx) pairs, got {type(sources).__name__} "
                         f"of length {len(sources) if isinstance(sources, (list, tuple)) else '?'}")
    srcs = []
    for i, src in enumerate(sources):
        if not isinstance(src, (list, tuple)) or len(src) != 2:
            raise ValueError(f"sources[{i}] must be a (pool, idx) pair, got {type(src).__name__}")
        srcs.append((_rows(f"sources[{i}] pool", src[0], D, dev), _check_idx(f"sources[{i}] idx", src[1], N, dev)))
    if not isinstance(sink, torch.Tensor) or sink.shape != (H,) or not sink.is_floating_point():
        raise ValueError(f"sink must be a float tensor [{H}], got {tuple(getattr(sink, 'shape', ()))}")
    sink = sink.to(device=dev, dtype=torch.float32).contiguous()
    q = q.contiguous()
    out = torch.empty_like(q)
    if N == 0 or H == 0:
        return out
    if len(srcs) == 1:  # the second source: the first with no keys
        srcs.append((srcs[0][0], srcs[0][1][:, :0]))
    layouts = {p.layout for p, _ in srcs if isinstance(p, Fp8Rows)}
    if len(layouts) > 1:
        raise ValueError(f"FP8 sources must share one row layout, got {sorted(map(str, layouts))}")
    lay = layouts.pop() if layouts else None

    key = _attn_key(H, D) + ("-fp8" if lay else "")
    default = ATTN_FP8_DEFAULT if lay else ATTN_DEFAULT
    if _interpret():  # a pretend GPU: test shapes (a few key blocks) take several splits
        default = {**default, "SPLIT_BLOCKS": 1}
    cfg = {**default, **(config if config is not None
                         else tuning.config("sparse_attn_paged", key, default, dev))}
    block_h = max(16, min(int(cfg["BLOCK_H"]), triton.next_power_of_2(H)))
    block_k = int(cfg["BLOCK_K"])
    block_d = max(16, triton.next_power_of_2(D))
    n_hb = triton.cdiv(H, block_h)
    (p0, i0), (p1, i1) = srcs
    K0, K1 = i0.shape[1], i1.shape[1]
    nb = triton.cdiv(K0, block_k) + triton.cdiv(K1, block_k)
    bps = max(1, int(cfg["SPLIT_BLOCKS"]))
    S = max(1, triton.cdiv(nb, bps))
    if cfg.get("SPREAD") is not None:  # tests: force either path
        wide = bool(cfg["SPREAD"]) and S > 1
    else:
        wide = S > 1 and N * n_hb < int(cfg["waves"]) * _sm_count(dev)
    if wide:
        ml = torch.empty(2, N, H, S, device=dev, dtype=torch.float32)
        m, l = ml[0], ml[1]
        part = torch.empty(N, H, S, D, device=dev, dtype=torch.float32)
    else:
        m = l = part = q  # unused
    # the interpreter rounds fp32 -> bf16/fp16 toward zero (compiled kernels round to nearest
    # even): there the kernels write fp32 and torch rounds
    res = torch.empty(q.shape, device=dev, dtype=torch.float32) if _interpret() else out
    a0, a1 = _pool_args(p0), _pool_args(p1)
    _sparse_attn_kernel[(N * n_hb, S if wide else 1)](
        q, sink, res, m, l, part,
        *a0[:4], i0, i0.stride(0), K0,
        *a1[:4], i1, i1.stride(0), K1,
        H, D, S, 1 if wide else S, bps, float(scale) * LOG2E, lay.nope if lay else 0, lay.scale_off if lay else 0,
        BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_D=block_d, USE_F32=_use_f32(q, p0, p1), FINAL=not wide,
        FP8_0=a0[4], FP8_1=a1[4], enable_fp_fusion=False,
        num_warps=int(cfg["num_warps"]), num_stages=int(cfg["num_stages"]))
    if wide:
        _combine_kernel[(N * n_hb,)](m, l, part, sink, res, H, D, S, BLOCK_H=block_h, BLOCK_D=block_d,
                                     enable_fp_fusion=False, num_warps=4)
    return out.copy_(res) if res is not out else out


# ---- tuning ----------------------------------------------------------------------------------
def _rand_idx(n: int, k: int, p: int, device, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, p, (n, k), generator=gen, dtype=torch.int32)
    return idx.masked_fill(torch.rand(n, k, generator=gen) < 0.05, -1).to(device)


def _attn_cases(device: torch.device):
    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda":  # V4-Flash: 64 heads x 512 (rope 64), window 128, CSA top-512 / HCA entries
        H, D, dt, kw, shapes = 64, 512, torch.bfloat16, 128, [(1, 512), (1, 8192), (512, 512)]
        pw, pc = 1 << 14, 1 << 16
    else:
        H, D, dt, kw, shapes = 4, 32, torch.float32, 16, [(1, 40), (1, 1100), (70, 40)]
        pw, pc = 64, 128
    window = torch.randn(pw, D, generator=gen).to(device, dt)
    entries = torch.randn(pc, D, generator=gen).to(device, dt)
    sink = torch.randn(H, generator=gen).to(device)
    out = []
    for n, kc in shapes:
        q = torch.randn(n, H, D, generator=gen).to(device, dt)
        srcs = [(window, _rand_idx(n, kw, pw, device, gen)), (entries, _rand_idx(n, kc, pc, device, gen))]
        out.append((_attn_key(H, D),
                     lambda cfg, q=q, s=srcs: sparse_attn_paged(q, s, sink, D ** -0.5, config=cfg)))
    # the same pools in the FP8 cache format (their own keys: the tile that fits differs)
    lay = Fp8Layout(D, D // 8, dt)
    window8, entries8 = (Fp8Rows(pack(p, lay), lay) for p in (window, entries))
    for n, kc in shapes[:1] + shapes[2:]:
        q = torch.randn(n, H, D, generator=gen).to(device, dt)
        srcs = [(window8, _rand_idx(n, kw, pw, device, gen)), (entries8, _rand_idx(n, kc, pc, device, gen))]
        out.append((_attn_key(H, D) + "-fp8",
                     lambda cfg, q=q, s=srcs: sparse_attn_paged(q, s, sink, D ** -0.5, config=cfg)))
    return out


TUNABLES = {
    # one config per head shape for every query and key count (its cases' times are added)
    "sparse_attn_paged": tuning.Tunable(space=(
        ATTN_DEFAULT,
        {"BLOCK_H": 16, "BLOCK_K": 32, "SPLIT_BLOCKS": 4, "num_warps": 8, "num_stages": 2, "waves": 2},
        {"BLOCK_H": 16, "BLOCK_K": 32, "SPLIT_BLOCKS": 2, "num_warps": 4, "num_stages": 2, "waves": 2},
        {"BLOCK_H": 16, "BLOCK_K": 32, "SPLIT_BLOCKS": 8, "num_warps": 4, "num_stages": 3, "waves": 2},
        {"BLOCK_H": 32, "BLOCK_K": 16, "SPLIT_BLOCKS": 8, "num_warps": 8, "num_stages": 2, "waves": 2},
        {"BLOCK_H": 16, "BLOCK_K": 16, "SPLIT_BLOCKS": 4, "num_warps": 4, "num_stages": 3, "waves": 4},
    ), cases=_attn_cases),
}
