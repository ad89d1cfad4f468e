"""Norms, FP8 activation simulation, compressor pooling and the mHC sites on the CPU (mhc.c through
ctypes). Same signatures, dtypes and results as the twins in ops/ref.py; fp32 and bf16 CPU
activations run the kernels, anything else (fp16, other devices, shapes the twins would reject)
runs the twin, so errors are the twin's own.

Wrappers are kept to the output allocation(s) and one ctypes call: these ops run ~50 times per
decode step on 1-2 tokens, where Python overhead is most of the cost.
"""
from __future__ import annotations

import torch

from dayzero.ops import ref
from dayzero.ops.cpu import build

_F32, _BF16 = torch.float32, torch.bfloat16
_ACT = (_F32, _BF16)
_HC_MAX = 16  # mhc.c HC_MAX

_rms = build.function("mhc", "dz_rms_norm", "piiipifpi")
_fp8 = build.function("mhc", "dz_fp8_act_sim", "piiiipi")
_pool = build.function("mhc", "dz_compress_pool", "piiipiiiiiipi")
_pre = build.function("mhc", "dz_hc_pre", "piiiipppiffpppi")
_post = build.function("mhc", "dz_hc_post", "pipiiiipppi")
_threads = torch.get_num_threads
_HELD = "_dz_mhc_args"  # where an RMSNorm weight keeps its checked kernel arguments (its __dict__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    dt = x.dtype
    if (dt is not _F32 and dt is not _BF16) or not x.is_cpu or x.dim() == 0:
        return ref.rms_norm(x, weight, eps)
    d = x.shape[-1]
    if weight is None:
        wk, wp = 0, None
    else:
        a = weight.__dict__.get(_HELD)
        if (a is not None and a[0] == weight.data_ptr() and a[1] == weight.shape and a[2] is weight.dtype
                and weight.is_contiguous() and a[1][0] == d):
            wk, wp = a[3], a[0]
        else:
            wd = weight.dtype
            if weight.shape != (d,) or not weight.is_cpu or (wd is not _F32 and wd is not _BF16):
                return ref.rms_norm(x, weight, eps)
            if weight.is_contiguous():  # read as it lies: kept for the next calls
                weight.__dict__[_HELD] = (weight.data_ptr(), weight.shape, wd, 1 if wd is _F32 else 2)
            weight = weight.contiguous()
            wk, wp = (1 if wd is _F32 else 2), weight.data_ptr()
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty_like(x)
    if d:
        _rms(x.data_ptr(), dt is _BF16, x.numel() // d, d, wp, wk, eps, out.data_ptr(), _threads())
    return out


def fp8_act_sim(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    dt = x.dtype
    if ((dt is not _F32 and dt is not _BF16) or not x.is_cpu or x.dim() == 0 or type(block) is not int
            or block < 1):
        return ref.fp8_act_sim(x, block)
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    if n:
        _fp8(x.data_ptr(), dt is _BF16, x.numel() // n, n, block, out.data_ptr(), _threads())
    return out


def _rows3(t: torch.Tensor) -> torch.Tensor:
    """t [..., S, C] as [M, S, C] with contiguous channels (a view where possible)."""
    if t.dim() != 3:
        t = t.reshape(-1, *t.shape[-2:])
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        t = t.contiguous()
    return t


def compress_pool(kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    if (kv.dtype not in _ACT or gate.dtype not in _ACT or not kv.is_cpu or not gate.is_cpu or kv.dim() < 2
            or gate.shape != kv.shape or kv.numel() == 0):
        return ref.compress_pool(kv, gate)
    k3, g3 = _rows3(kv), _rows3(gate)
    M, S, C = k3.shape
    out = torch.empty(M, C, dtype=_F32)
    if M and C:
        _pool(k3.data_ptr(), k3.dtype is _BF16, k3.stride(0), k3.stride(1), g3.data_ptr(), g3.dtype is _BF16,
              g3.stride(0), g3.stride(1), M, S, C, out.data_ptr(), _threads())
    return out if kv.dim() == 3 else out.view(*kv.shape[:-2], C)


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
           norm_eps: float, hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dt = x.dtype
    if (dt is not _F32 and dt is not _BF16) or not x.is_cpu or x.dim() != 3:
        return ref.hc_pre(x, fn, scale, base, iters, norm_eps, hc_eps)
    N, n, d = x.shape
    R = (2 + n) * n
    if (not 1 <= n <= _HC_MAX or fn.shape != (R, n * d) or scale.shape != (3,) or base.shape != (R,)
            or fn.dtype is not _F32 or scale.dtype is not _F32 or base.dtype is not _F32 or not fn.is_cpu
            or not scale.is_cpu or not base.is_cpu):
        return ref.hc_pre(x, fn, scale, base, iters, norm_eps, hc_eps)
    x, fn, scale, base = x.contiguous(), fn.contiguous(), scale.contiguous(), base.contiguous()
    u = torch.empty(N, d, dtype=dt)
    post = torch.empty(N, n, dtype=_F32)
    comb = torch.empty(N, n, n, dtype=_F32)
    if N and d:
        _pre(x.data_ptr(), dt is _BF16, N, n, d, fn.data_ptr(), scale.data_ptr(), base.data_ptr(), int(iters),
             norm_eps, hc_eps, u.data_ptr(), post.data_ptr(), comb.data_ptr(), _threads())
    return u, post, comb


def hc_post(y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    yd, xd = y.dtype, x.dtype
    if ((yd is not _F32 and yd is not _BF16) or (xd is not _F32 and xd is not _BF16) or not x.is_cpu
            or not y.is_cpu or x.dim() != 3):
        return ref.hc_post(y, x, post, comb)
    N, n, d = x.shape
    if (y.shape != (N, d) or post.shape != (N, n) or comb.shape != (N, n, n) or post.dtype is not _F32
            or comb.dtype is not _F32 or not 1 <= n <= _HC_MAX or not post.is_cpu or not comb.is_cpu):
        return ref.hc_post(y, x, post, comb)
    y, x, post, comb = y.contiguous(), x.contiguous(), post.contiguous(), comb.contiguous()
    out = torch.empty(N, n, d, dtype=yd)
    if N and d:
        _post(y.data_ptr(), yd is _BF16, x.data_ptr(), xd is _BF16, N, n, d, post.data_ptr(), comb.data_ptr(),
              out.data_ptr(), _threads())
    return out
