"""Rotary embedding (ops/ref.py apply_rope) in one call: the twin is a dozen small ops.

Per-call overhead matters (up to four calls per layer per decode step): a few attribute reads,
one output allocation and one ctypes call whose arguments travel as one packed int64 block."""
from __future__ import annotations

import struct

import torch

from dayzero.ops import ref
from dayzero.ops.cpu.build import function

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_F32 = torch.float32
_ARGS = struct.Struct("=11q")  # dz_rope_packed's argument block
_kernel: list = []


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    bf16 = _DTYPES.get(x.dtype)
    cs, xs = cos.shape, x.shape
    half = cs[-1]
    # supported layouts: x [..., Dh] with cos [..., half] on the same leading dims, or
    # x [N, H, Dh] with cos [N, 1, half]; anything else (other broadcasts, dtypes) -> the twin
    if (bf16 is None or not x.is_cpu or cos.dtype is not _F32 or sin.dtype is not _F32
            or xs[-1] < 2 * half or cs != sin.shape):
        return ref.apply_rope(x, cos, sin, inverse)
    if cs[:-1] == xs[:-1]:
        N, H = (x.numel() // xs[-1] if xs[-1] else 0), 1  # no select view (x[..., 0])
    elif len(xs) == 3 and cs == (xs[0], 1, half):
        N, H = xs[0], xs[1]
    else:
        return ref.apply_rope(x, cos, sin, inverse)
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    if N and H:
        if not _kernel:
            _kernel.append(function("rope", "dz_rope_packed", "p"))
        _kernel[0](_ARGS.pack(x.data_ptr(), bf16, N, H, xs[-1], cos.data_ptr(), sin.data_ptr(), half,
                              int(inverse), out.data_ptr(), torch.get_num_threads()))
    return out
