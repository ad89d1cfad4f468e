"""fp32 GEMM over fp32 or bf16 dense weights (dense.c), the twin ref.fp32_linear: the LM head,
routers and compressor projections read their bf16 checkpoint weights directly (half the bytes of
an fp32 copy, and no copy) and multiply in fp32, up to fp32 summation order."""
from __future__ import annotations

import torch

from dayzero.ops import ref
from dayzero.ops.cpu import build

_W = {torch.float32: 0, torch.bfloat16: 1}
_X = (torch.bfloat16, torch.float16)  # x dtypes upcast to fp32 (exactly)
_kernel = build.function("dense", "dz_fp32_linear", "piipiipi")


_HELD = "_dz_dense_args"  # where a weight keeps its kernel arguments (its __dict__)


def _held(x: torch.Tensor, weight: torch.Tensor) -> tuple | None:
    """(x as the kernel reads it: fp32 [M, K] contiguous, the weight's kept arguments) where both
    are taken as they are: the weight's checks were made once and kept on it as (first byte,
    shape, dtype, bf16 flag), served while it still has that first byte, shape, dtype and a
    contiguous layout (a weight replaced in place is checked again); else None."""
    a = weight.__dict__.get(_HELD)
    if (a is None or a[0] != weight.data_ptr() or a[1] != weight.shape or a[2] is not weight.dtype
            or not x.is_cpu or x.dim() != 2 or x.shape[1] != a[1][1] or not weight.is_contiguous()):
        return None
    flat = x if x.dtype is torch.float32 else x.float() if x.dtype in _X else None
    if flat is None:
        return None
    return (flat if flat.is_contiguous() else flat.contiguous()), a


def fp32_linear_into(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> bool:
    """fp32_linear(x, weight) written to the first M*O values of `out` (fp32, contiguous, CPU, at
    least that long): the same kernel call, the same bits. False (nothing written) where the
    weight was not seen by fp32_linear yet or x or out do not fit; the caller then runs fp32_linear."""
    h = _held(x, weight)
    if h is None or out.dtype is not torch.float32 or not out.is_cpu or not out.is_contiguous():
        return False
    flat, a = h
    if out.numel() < flat.shape[0] * a[1][0]:
        return False
    if flat.shape[0] and a[1][0]:
        _kernel(flat.data_ptr(), flat.shape[0], a[1][1], a[0], a[3], a[1][0], out.data_ptr(), torch.get_num_threads())
    return True


def fp32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A weight's checks are made once and kept on it (`_held`)."""
    h = _held(x, weight)
    if h is not None:
        flat, a = h
        out = torch.empty(flat.shape[0], a[1][0], dtype=torch.float32)
        if out.numel():
            _kernel(flat.data_ptr(), flat.shape[0], a[1][1], a[0], a[3], a[1][0], out.data_ptr(), torch.get_num_threads())
        return out
    bf16 = _W.get(weight.dtype)
    if (bf16 is None or x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not x.is_cpu
            or not weight.is_cpu or weight.dim() != 2 or x.shape[-1] != weight.shape[1] or weight.shape[1] == 0):
        return ref.fp32_linear(x, weight)
    O, K = weight.shape
    if weight.is_contiguous():  # read as it lies: kept for the next calls
        weight.__dict__[_HELD] = (weight.data_ptr(), weight.shape, weight.dtype, bf16)
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
