"""Fused CPU kernels (fused.c through ctypes): one native call for a sequence of twins the model
runs on every decode step, bit-exact with that sequence (ops/ref.py). Not ops of the seam's
OP_NAMES: an op table carries them as extra fields whose default is the twins' composition
(ops/__init__.py FUSED_NAMES), so every other table computes what it computed before.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

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


_weights = build.function("fused", "dz_route_weights", "piipifpp")
_LANES, _CHUNK = 64, 32768 - 64  # ops/rowwise.py lanewise: every element on torch's vector path


def gate_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, topk: int, route_scale: float,
               hash_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The MoE gate, ref.route(dense.fp32_linear(x, weight), bias, topk, route_scale, "sqrtsoftplus",
    hash_idx), bit for bit, in 6-8 torch ops where the sequence takes 13-14 (decode sizes: up to
    _CHUNK logits). The logits are written by the same dense.c call into a buffer padded to whole
    vector lanes, so torch's softplus reads exactly what the twin's lanewise hands it, and torch's
    sqrt (not correctly rounded on its vector path) reads the same [N, E] view the twin's does;
    the bias add and topk stay torch's; the weights for k <= 2 (gather, sum, division, scale: exact
    IEEE operations) run in fused.c, for k > 2 torch's (its sum order). None where this does not
    apply (the caller runs the sequence)."""
    if x.dim() != 2 or torch.is_grad_enabled() or (bias is not None and (bias.dtype is not _F32 or not bias.is_cpu)):
        return None
    if not build.available("dense"):  # the logits come from dense.c's kernel (imported here: fused.c alone still serves)
        return None
    from dayzero.ops.cpu import dense
    N, E = x.shape[0], weight.shape[0]
    n = N * E
    buf = torch.zeros(n + (-n % _LANES), dtype=_F32)
    if not n or buf.numel() > _CHUNK or not dense.fp32_linear_into(x, weight, buf):
        return None
    scores = F.softplus(buf).as_strided((N, E), (E, 1)).sqrt()
    if hash_idx is not None:
        idx = hash_idx.long()
    else:
        idx = (scores if bias is None else scores + bias).topk(topk, dim=-1).indices
    if idx.dim() != 2 or idx.shape[1] > 2 or idx.shape[0] != N or not idx.is_contiguous():
        w = scores.gather(-1, idx)
        return w / w.sum(-1, keepdim=True) * route_scale, idx
    w = torch.empty(N, idx.shape[1], dtype=_F32)
    bad = ctypes.c_int64(0)
    _weights(scores.data_ptr(), N, E, idx.data_ptr(), idx.shape[1], route_scale, w.data_ptr(), ctypes.addressof(bad))
    if bad.value:
        raise RuntimeError(f"gate_route: expert ids must lie in [0, {E})")
    return w, idx
