"""DeepSeek-V4.1's cache rows in their QAT storage formats (`kv_cache_dtype="qat"`, v41/cache.py).

The V4.1 forward fake-quantises every row it caches before writing it (v41/quant.py, v41/attention.py:
the window row is `quant.window_kv(...)`, the compressed entry `quant.compressed_kv(...)`, the
indexer key `quant.index_qk(...)`, RoPE dims included, in every numerics mode). A cached row is
therefore exactly codes x block scales, and storing those instead of the compute-dtype row loses
nothing: `unpack(pack(x)) == x` bit for bit (signed zeros included) for every quantiser output.

Formats (`QatLayout.fmt`), one uint8 row of `width` bytes per cached row of `dim` values:

  "fp8"        window K=V rows: dim e4m3 codes, then dim/32 UE8M0 bytes (scale 2^(byte - 127))
  "fp4_ue8m0"  indexer keys: dim/2 bytes of e2m1 codes (element 2j in the low nibble, 2j+1 in the
               high; bit 3 the sign), then dim/32 UE8M0 bytes
  "fp4_e4m3"   compressed entries: dim/2 bytes of e2m1 codes as above, then dim/16 e4m3 scale bytes

Packing recovers a decomposition of the stored row, not of the pre-quantisation value:
- power-of-two scales: the quantiser's own scale rule applied to the row again (`ref.pow2_scale`); a
  quantiser output is a fixed point of it (the recomputed scale s' <= s and the codes x 2^k stay
  codes: e4m3 and e2m1 are closed under doubling below their maximum);
- e4m3 scales: amax / c for c in the e2m1 magnitudes (6 first), the first c whose quotient is an e4m3
  value that makes every element of the block an e2m1 value exactly (the quantiser's scale is amax /
  |largest code|, so one always exists); an all-zero block takes the quantiser's floor scale 2^-9.
A row that is NOT a quantiser output packs lossily; `exact(x, layout)` tells (tests; v41/cache.py only
packs kinds whose quantiser applies: width a multiple of the block).

Decoding is code value x scale in fp32, then the compute dtype (bf16 or fp32: every product of a code
and a scale is exact in both). The paged ops get decoded rows (`QatRows.compact`): the rows a step
reads, gathered and decoded once per step and layer, so the kernels compute on the same values as
over a compute-dtype pool. Decoding inside the kernels is not built.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dayzero.ops import ref

FORMATS = {"fp8": (8, 32), "fp4_ue8m0": (4, 32), "fp4_e4m3": (4, 16)}  # fmt -> (code bits, values per scale)
_DTYPES = (torch.float32, torch.bfloat16)
_FP8_FLOOR, _FP4_POW2_FLOOR = 1e-4, ref.FP4_MAX * 2.0 ** -126  # the quantisers' amax floors (ops/ref.py)
_E4M3_FLOOR = 2.0 ** -9  # v41/quant.py compressed_kv: the smallest e4m3 scale
_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_CANDIDATES = (6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5)


@dataclass(frozen=True)
class QatLayout:
    dim: int  # values per row
    fmt: str  # a FORMATS key
    dtype: torch.dtype  # the decoded (compute) dtype

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"QAT KV rows: fmt must be one of {', '.join(FORMATS)}, got {self.fmt!r}")
        if not isinstance(self.dim, int) or self.dim <= 0 or self.dim % self.block:
            raise ValueError(f"QAT KV rows ({self.fmt}): dim must be a positive multiple of {self.block}, "
                             f"got {self.dim!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"kv_cache_dtype 'qat': the compute dtype must be one of {_DTYPES} (a code x scale "
                             f"may not be exact in it), got {self.dtype}")

    @property
    def bits(self) -> int:
        return FORMATS[self.fmt][0]

    @property
    def block(self) -> int:
        return FORMATS[self.fmt][1]

    @property
    def code_bytes(self) -> int:
        return self.dim * self.bits // 8

    @property
    def blocks(self) -> int:
        return self.dim // self.block

    @property
    def width(self) -> int:
        return self.code_bytes + self.blocks

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return pack(x, self)

    def rows(self, data: torch.Tensor) -> "QatRows":
        return QatRows(data, self)


def _pow2_byte(s: torch.Tensor) -> torch.Tensor:
    return (torch.frexp(s)[1] + 126).to(torch.uint8)  # s = 0.5 * 2^e -> byte e - 1 + 127


def _fp4_codes(v: torch.Tensor) -> torch.Tensor:
    """e2m1 values (exact or not) -> 4-bit codes (bit 3: sign, from the sign bit: -0.0 keeps it)."""
    grid = _GRID.to(v.device)
    mag = torch.bucketize(ref.fp4_round(v).abs(), grid)
    return (mag | (torch.signbit(v).to(torch.long) << 3)).to(torch.uint8)


def _e4m3_scales(xb: torch.Tensor) -> torch.Tensor:
    """Per block of xb [..., B, 16] (fp32): a positive e4m3 scale making every element an exact e2m1
    value, the first of amax / c over _CANDIDATES; blocks with none (zeros, non-quantiser rows): the
    quantiser's own rule e4m3(max(amax, floor) / 6)."""
    amax = xb.abs().amax(-1, keepdim=True)
    own = (amax.clamp(min=ref.FP4_MAX * _E4M3_FLOOR) / ref.FP4_MAX).to(torch.float8_e4m3fn).float()
    chosen, found = own, torch.zeros_like(amax, dtype=torch.bool)
    for c in reversed(_CANDIDATES):  # the last assignment wins: the first candidate in order
        s = amax / c
        v = xb / s
        ok = (s > 0) & (s.to(torch.float8_e4m3fn).float() == s)
        ok &= ((v.abs() <= ref.FP4_MAX) & (ref.fp4_round(v) == v) & (v * s == xb)).all(-1, keepdim=True)
        chosen = torch.where(ok, s, chosen)
        found |= ok
    return chosen


def pack(x: torch.Tensor, layout: QatLayout) -> torch.Tensor:
    """x [..., dim] float -> uint8 [..., width] (module docstring)."""
    L = layout
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.shape[-1:] != (L.dim,):
        raise ValueError(f"QAT KV pack ({L.fmt}): need a float tensor [..., {L.dim}], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    xb = x.float().unflatten(-1, (L.blocks, L.block))
    amax = xb.abs().amax(-1, keepdim=True)
    if L.fmt == "fp8":
        s = ref.pow2_scale(amax, ref.FP8_MAX, _FP8_FLOOR)
        codes = (xb / s).to(torch.float8_e4m3fn).view(torch.uint8).flatten(-2)
        scales = _pow2_byte(s.squeeze(-1))
    else:
        if L.fmt == "fp4_ue8m0":
            s = ref.pow2_scale(amax, ref.FP4_MAX, _FP4_POW2_FLOOR)
            scales = _pow2_byte(s.squeeze(-1))
        else:
            s = _e4m3_scales(xb)
            scales = s.squeeze(-1).to(torch.float8_e4m3fn).view(torch.uint8)
        c = _fp4_codes(xb / s).flatten(-2)
        codes = c[..., 0::2] | (c[..., 1::2] << 4)
    return torch.cat([codes, scales], -1)


def unpack(data: torch.Tensor, layout: QatLayout) -> torch.Tensor:
    """uint8 [..., width] -> [..., dim] in layout.dtype: code value x scale (module docstring)."""
    L = layout
    if data.dtype != torch.uint8 or data.shape[-1:] != (L.width,):
        raise ValueError(f"QAT KV unpack: need uint8 [..., {L.width}] for {L}, got {data.dtype} {tuple(data.shape)}")
    codes, sb = data[..., :L.code_bytes], data[..., L.code_bytes:]
    if L.fmt == "fp8":
        v = codes.contiguous().view(torch.float8_e4m3fn).float()
    else:
        c = torch.stack([codes & 15, codes >> 4], -1).flatten(-2).long()
        mag = _GRID.to(data.device)[c & 7]
        v = torch.where(c >= 8, -mag, mag)
    if L.fmt == "fp4_e4m3":
        s = sb.contiguous().view(torch.float8_e4m3fn).float()
    else:
        s = torch.exp2(sb.float() - 127)
    return (v.unflatten(-1, (L.blocks, L.block)) * s[..., None]).flatten(-2).to(L.dtype)


def exact(x: torch.Tensor, layout: QatLayout) -> bool:
    """Whether `x` packs losslessly: its decoded rows equal it bit for bit."""
    y = unpack(pack(x, layout), layout)
    return y.dtype == x.dtype and torch.equal(y.view(_int(y.dtype)), x.view(_int(x.dtype)))


def _int(dtype: torch.dtype) -> torch.dtype:
    return torch.int32 if dtype == torch.float32 else torch.int16


class QatRows:
    """A pool of packed rows: data uint8 [P, width] (unit element stride), decoded with `layout`."""
    __slots__ = ("data", "layout")

    def __init__(self, data: torch.Tensor, layout: QatLayout):
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 2:
            raise ValueError(f"QatRows data must be a 2-d uint8 tensor, got "
                             f"{getattr(data, 'dtype', type(data).__name__)} {tuple(getattr(data, 'shape', ()))}")
        if data.shape[1] != layout.width or data.stride(1) != 1:
            raise ValueError(f"QatRows data must be [P, {layout.width}] with unit element stride for {layout}, "
                             f"got shape {tuple(data.shape)} strides {data.stride()}")
        self.data, self.layout = data, layout

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.layout.dim)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __getitem__(self, idx) -> torch.Tensor:
        """Rows decoded to the compute dtype, as indexing a compute-dtype pool gives them."""
        return unpack(self.data[idx], self.layout)

    def compact(self, ids: torch.Tensor, memo: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [N, K] into this pool (-1: none) -> (decoded rows [R, dim], ids [N, K] into them, -1
        kept): on the CPU each distinct row once (the window rows of a chunk overlap), elsewhere one
        row per (n, k) (no host synchronisation). `memo` (the step's): the id mapping of an `ids`
        tensor is shared by every layer of a group."""
        key = ("qat-compact", id(ids))
        got = memo.get(key) if memo is not None else None
        if got is None or got[0] is not ids:
            valid = ids >= 0
            if ids.device.type == "cpu":
                rows, inv = torch.unique(ids.clamp(min=0), return_inverse=True)
            else:
                rows = ids.clamp(min=0).flatten()
                inv = torch.arange(rows.numel(), device=ids.device).view(ids.shape)
            got = (ids, rows, torch.where(valid, inv, -1))
            if memo is not None:
                memo[key] = got
        return self[got[1]], got[2]

    def __repr__(self) -> str:
        return f"QatRows({self.data.shape[0]} rows, {self.layout})"
