"""fp32 GEMM over fp32 or bf16 dense weights (dense.c), the twin ref.fp32_linear: the LM head,
routers and compressor projections read their bf16 checkpoint weights directly (half the bytes of
an fp32 copy, and no copy) and multiply in fp32, up to fp32 summation order."""
from __future__ import annotations

import torch

from dayzero.ops import ref
from dayzero.ops.cpu import build

_W = {torch.float32: 0, torch.bfloat16: 1}
_kernel = build.function("dense", "dz_fp32_linear", "piipiipi")


def fp32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    bf16 = _W.get(weight.dtype)
    if (bf16 is None or x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not x.is_cpu
            or not weight.is_cpu or weight.dim() != 2 or x.shape[-1] != weight.shape[1] or weight.shape[1] == 0):
        return ref.fp32_linear(x, weight)
    O, K = weight.shape
    flat = x if x.dim() == 2 else x.reshape(-1, K)  # 2-D (the decode case): no view to make and undo
    if flat.dtype is not torch.float32:
        flat = flat.float()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if not weight.is_contiguous():
        weight = weight.contiguous()
    out = torch.empty(flat.shape[0], O, dtype=torch.float32)
    if out.numel():
        _kernel(flat.data_ptr(), flat.shape[0], K, weight.data_ptr(), bf16, O, out.data_ptr(), torch.get_num_threads())
    return out if x.dim() == 2 else out.view(*x.shape[:-1], O)
