"""Fused CPU kernels (fused.c through ctypes): one native call for a sequence of twins the model
runs on every decode step, bit-exact with that sequence (ops/ref.py). Not ops of the seam's
OP_NAMES: an op table carries them as extra fields whose default is the twins' composition
(ops/__init__.py FUSED_NAMES), so every other table computes what it computed before.
"""
from __future__ import annotations

import torch

from dayzero.ops import ref
from dayzero.ops.cpu import build

_F32, _BF16 = torch.float32, torch.bfloat16
_MAX_N = 4096  # fused.c keeps a row on the stack

_had = build.function("fused", "dz_hadamard_fp4_sim", "piiiifpi")
_arms = build.function("fused", "dz_act_rms_norm", "piiifpi")
_nope = build.function("fused", "dz_fp8_nope_sim", "piiiiipi")


def hadamard_fp4_sim(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """ref.hadamard_fp4_sim in one call: fp32/bf16 CPU rows of a power-of-two width; anything
    else runs the twin (whose errors are its own)."""
    dt = x.dtype
    n = x.shape[-1] if x.dim() else 0
    if ((dt is not _F32 and dt is not _BF16) or not x.is_cpu or not 0 < n <= _MAX_N or n & (n - 1)
            or type(block) is not int or block < 1):
        return ref.hadamard_fp4_sim(x, block)
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        _had(x.data_ptr(), dt is _BF16, x.numel() // n, n, block, n ** -0.5, out.data_ptr(), torch.get_num_threads())
    return out


def act_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """ref.act_rms_norm in one call (fp32/bf16 CPU tensors; anything else runs the twin)."""
    dt = x.dtype
    if (dt is not _F32 and dt is not _BF16) or not x.is_cpu or x.dim() == 0 or x.shape[-1] == 0:
        return ref.act_rms_norm(x, eps)
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    if x.numel():
        _arms(x.data_ptr(), dt is _BF16, x.numel() // n, n, eps, out.data_ptr(), torch.get_num_threads())
    return out


def fp8_nope_sim(x: torch.Tensor, rope_dim: int, block: int = 64) -> torch.Tensor:
    """ref.fp8_nope_sim in one call (fp32/bf16 CPU tensors; anything else runs the twin)."""
    dt = x.dtype
    n = x.shape[-1] if x.dim() else 0
    if ((dt is not _F32 and dt is not _BF16) or not x.is_cpu or type(rope_dim) is not int
            or not 0 < rope_dim < n or type(block) is not int or block < 1):
        return ref.fp8_nope_sim(x, rope_dim, block)
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        _nope(x.data_ptr(), dt is _BF16, x.numel() // n, n, rope_dim, block, out.data_ptr(), torch.get_num_threads())
    return out
