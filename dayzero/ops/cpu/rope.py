"""Rotary embedding (ops/ref.py apply_rope) in one call: the twin is a dozen small ops."""
from __future__ import annotations

import torch

from dayzero.ops import ref
from dayzero.ops.cpu.build import function

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    bf16 = _DTYPES.get(x.dtype)
    half = cos.shape[-1]
    # supported layouts: x [..., Dh] with cos [..., half] on the same leading dims, or
    # x [N, H, Dh] with cos [N, 1, half]; anything else (other broadcasts, dtypes) -> the twin
    if (bf16 is None or x.device.type != "cpu" or cos.dtype != torch.float32 or sin.dtype != torch.float32
            or x.shape[-1] < 2 * half or cos.shape != sin.shape):
        return ref.apply_rope(x, cos, sin, inverse)
    if cos.shape[:-1] == x.shape[:-1]:
        N, H = (x.numel() // x.shape[-1] if x.shape[-1] else 0), 1  # no select view (x[..., 0])
    elif x.dim() == 3 and cos.shape == (x.shape[0], 1, half):
        N, H = x.shape[0], x.shape[1]
    else:
        return ref.apply_rope(x, cos, sin, inverse)
    x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        function("rope", "dz_rope", "piiiippiipi")(x.data_ptr(), bf16, N, H, x.shape[-1], cos.data_ptr(),
                                                    sin.data_ptr(), half, int(inverse), out.data_ptr(),
                                                    torch.get_num_threads())
    return out
