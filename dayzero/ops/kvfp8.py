"""The FP8 entry format of the KV cache (`kv_cache_dtype="fp8"`): one packed uint8 row per K=V row.

A row of D = nope + rope values is stored as W bytes:

  [0, nope)                        e4m3fn codes of the nope dims, quantised in blocks of 64 with
                                   power-of-two scales exactly as ref.fp8_act_sim(x, 64) rounds them
  [rope_off, rope_off + rope * es) the rope dims in `rope_dtype` (the compute dtype; es its size)
  [scale_off, scale_off + blocks)  one UE8M0 byte per block of 64 nope dims: scale 2^(byte - 127)
  zero padding to a multiple of 8 bytes

V4-Flash (D 512, rope 64, bf16): 448 + 128 + 7 scale bytes + 1 = 584 bytes a row instead of 1,024,
the deployed layout (v4-architecture.md 4.2). Under numerics="official" the model writes rows
whose nope dims are already FP8-simulated this way (attention step 4), so packing them loses
nothing: `unpack(pack(x))` returns x bit for bit, and the paged ops compute the same outputs as
over a compute-dtype pool. With numerics="transformers" (no simulation) packing rounds the nope dims.

`Fp8Rows` is how the paged ops receive such a pool (ops/ref.py gather_rows decodes it; the CPU and
Triton kernels decode the rows they read in registers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 64  # nope dims per scale
FP8_MAX = 448.0
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Fp8Layout:
    dim: int  # values per row (nope + rope)
    rope: int  # trailing dims kept in rope_dtype
    rope_dtype: torch.dtype

    def __post_init__(self):
        if not isinstance(self.dim, int) or not isinstance(self.rope, int) or not 0 <= self.rope < self.dim:
            raise ValueError(f"fp8 KV rows: need 0 <= rope < dim, got dim={self.dim!r} rope={self.rope!r}")
        if self.rope_dtype not in _FLOATS:
            raise ValueError(f"fp8 KV rows: rope_dtype must be one of {_FLOATS}, got {self.rope_dtype}")

    @property
    def nope(self) -> int:
        return self.dim - self.rope

    @property
    def elem(self) -> int:
        return torch.tensor([], dtype=self.rope_dtype).element_size()

    @property
    def rope_off(self) -> int:
        return -(-self.nope // self.elem) * self.elem

    @property
    def blocks(self) -> int:
        return -(-self.nope // BLOCK)

    @property
    def scale_off(self) -> int:
        return self.rope_off + self.rope * self.elem

    @property
    def width(self) -> int:
        return -(-(self.scale_off + self.blocks) // 8) * 8

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """`pack(x, self)` (the paged cache packs through its kinds' layouts, FP8 or V4.1's QAT)."""
        return pack(x, self)

    def rows(self, data: torch.Tensor) -> "Fp8Rows":
        """`Fp8Rows(data, self)`: the pool the paged ops receive."""
        return Fp8Rows(data, self)


class Fp8Rows:
    """A pool of packed rows for the paged ops: data uint8 [P, width] (row stride may exceed
    width, element stride 1), decoded with `layout`."""
    __slots__ = ("data", "layout")

    def __init__(self, data: torch.Tensor, layout: Fp8Layout):
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 2:
            raise ValueError(f"Fp8Rows data must be a 2-d uint8 tensor, got "
                             f"{getattr(data, 'dtype', type(data).__name__)} {tuple(getattr(data, 'shape', ()))}")
        if data.shape[1] != layout.width or data.stride(1) != 1:
            raise ValueError(f"Fp8Rows data must be [P, {layout.width}] with unit element stride for {layout}, got "
                             f"shape {tuple(data.shape)} strides {data.stride()}")
        self.data, self.layout = data, layout

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, values per row): the shape of the pool it stands for."""
        return (self.data.shape[0], self.layout.dim)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __getitem__(self, idx) -> torch.Tensor:
        """Rows decoded to rope_dtype, as indexing a compute-dtype pool would give them."""
        return unpack(self.data[idx], self.layout)

    def __repr__(self) -> str:
        return f"Fp8Rows({self.data.shape[0]} rows, {self.layout})"


def pack(x: torch.Tensor, layout: Fp8Layout) -> torch.Tensor:
    """x [..., dim] float -> uint8 [..., width] (the module docstring's format)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.shape[-1:] != (layout.dim,):
        raise ValueError(f"fp8 KV pack: need a float tensor [..., {layout.dim}], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    from dayzero.ops.ref import pow2_scale
    n, L = layout.nope, layout
    nope = x[..., :n].float()
    pad = (-n) % BLOCK
    xb = torch.nn.functional.pad(nope, (0, pad)).unflatten(-1, (-1, BLOCK))
    scale = pow2_scale(xb.abs().amax(-1, keepdim=True), FP8_MAX, 1e-4)
    codes = (xb / scale).to(torch.float8_e4m3fn).view(torch.uint8).flatten(-2)[..., :n]
    exps = (torch.frexp(scale.squeeze(-1))[1] + 126).to(torch.uint8)  # scale = 0.5 * 2^e -> byte e - 1 + 127
    out = torch.zeros(*x.shape[:-1], L.width, dtype=torch.uint8, device=x.device)
    out[..., :n] = codes
    out[..., L.rope_off:L.scale_off] = x[..., n:].to(L.rope_dtype).contiguous().view(torch.uint8)
    out[..., L.scale_off:L.scale_off + L.blocks] = exps
    return out


def unpack(data: torch.Tensor, layout: Fp8Layout, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 [..., width] -> [..., dim] in dtype (default rope_dtype): codes x 2^(byte - 127), rope dims as stored."""
    L = layout
    if data.dtype != torch.uint8 or data.shape[-1:] != (L.width,):
        raise ValueError(f"fp8 KV unpack: need uint8 [..., {L.width}] for {L}, got {data.dtype} {tuple(data.shape)}")
    codes = data[..., :L.nope].view(torch.float8_e4m3fn).float()
    scale = torch.exp2(data[..., L.scale_off:L.scale_off + L.blocks].float() - 127)
    nope = codes * scale.repeat_interleave(BLOCK, -1)[..., :L.nope]
    rope = data[..., L.rope_off:L.scale_off].contiguous().view(L.rope_dtype).float()
    return torch.cat([nope, rope], -1).to(dtype or L.rope_dtype)
