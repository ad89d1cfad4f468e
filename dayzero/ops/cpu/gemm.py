"""FP8 / FP4 linears and the routed-expert MoE on the CPU (gemm.c), same signatures and results as
the twins ref.fp8_linear, ref.fp4_linear, ref.moe_experts up to fp32 summation order; the grouped
FP8 linear (ref.fp8_linear_grouped, a fused op) bit-identical to fp8_linear per group.

Activations fp32 or bf16 on the CPU; scales E8M0 (float8_e8m0fnu or uint8 bytes) or fp32. Anything
else (fp16 activations, other devices, shapes the kernels do not take) runs the twin. Per-call
work in Python is kept to a few attribute reads and one ctypes call: these run hundreds of times
per decode step.
"""
from __future__ import annotations

import ctypes
import types
from typing import NamedTuple

import torch

from dayzero.ops import ref
from dayzero.ops.experts import PerExpert
from dayzero.ops.cpu import build

_BF16, _F32 = torch.bfloat16, torch.float32
_E8M0_DT, _U8, _I8, _I64 = torch.float8_e8m0fnu, torch.uint8, torch.int8, torch.int64
_FP4_W = (torch.int8, torch.uint8)
_E4M3 = torch.float8_e4m3fn

MOE_CHUNK_PAIRS = 4096  # (token, slot) pairs per MoE kernel call (its buffers: <= 4 * (dim + inter) bytes a pair)

_SIGNATURES = {
    "fp4": ("dz_fp4_linear", "piippipiiii"),
    "fp8": ("dz_fp8_linear", "piippipiiiii"),
    "fp8_b": ("dz_fp8_linear_b", "piippipiiiiii"),  # + the scale block side (128 or 32)
    "fp8_grouped": ("dz_fp8_linear_grouped", "piippipiiiii"),
    "moe": ("dz_moe_fp4", "piiiiippippippippifippi"),
    "sim": ("dz_gemm_fp8_sim", "piiiip"),
    "options": ("dz_gemm_options", "i"),  # tests: options(0) runs bf16 x on the fp32 kernels
    "fast_decode": ("dz_gemm_fast_decode", "i"),  # tests / bench: 0 float route only, 2 FP8 without the byte tables
    "moe_streams": ("dz_gemm_moe_streams", "i"),  # tests / bench: 0 runs MoE decode blocks on the tile walk
}


def bind(library: ctypes.CDLL) -> types.SimpleNamespace:
    """The kernels of a loaded gemm library (tests bind other builds, e.g. -march=x86-64)."""
    return types.SimpleNamespace(**{key: build.bind(library, name, sig) for key, (name, sig) in _SIGNATURES.items()})


kernels = bind(build.lib("gemm"))  # raises NativeUnavailable when gemm.c does not build: ops/cpu uses the twins


def _scale_kind(scale: torch.Tensor) -> int:
    """1: E8M0 bytes, 0: fp32, -1: unsupported."""
    dt = scale.dtype
    return 1 if dt is _E8M0_DT or dt is _U8 else 0 if dt is _F32 else -1


def _dense(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor):
    """The layouts the kernels read: x's rows unit-stride (row stride passed), weight and scale contiguous."""
    return (x if x.stride(1) == 1 else x.contiguous(), weight if weight.is_contiguous() else weight.contiguous(),
            scale if scale.is_contiguous() else scale.contiguous())


_HELD = "_dz_gemm_args"  # where a weight keeps its kernel arguments (its __dict__; see _held)


class _Args(NamedTuple):
    """What a weight's kernel calls read (pointers, scale kind, O, K), kept on the weight by `_hold`
    with what `_held` checks before serving it again."""
    scale: torch.Tensor
    tag: object  # the block side (fp8_linear), "fp4", ("grouped", G)
    w: int
    s: int
    wshape: torch.Size
    sshape: torch.Size
    wdtype: torch.dtype
    sdtype: torch.dtype
    e8: int
    O: int
    K: int


def _held(weight: torch.Tensor, scale: torch.Tensor, tag) -> _Args | None:
    """The kernel arguments `weight` keeps for (scale, tag), or None. Served only while weight and
    scale are the same tensors with the same first byte, shape, dtype and layout: a weight replaced
    in place (`.data =`, set_, resize_, t_) or paired with another scale is checked again, never
    read at a stale address."""
    a = weight.__dict__.get(_HELD)
    if (a is not None and a.scale is scale and a.tag == tag and a.w == weight.data_ptr() and a.s == scale.data_ptr()
            and a.wshape == weight.shape and a.sshape == scale.shape and a.wdtype is weight.dtype
            and a.sdtype is scale.dtype and weight.is_contiguous() and scale.is_contiguous()):
        return a
    return None


def _hold(weight: torch.Tensor, scale: torch.Tensor, tag, e8: int, O: int, K: int) -> _Args:
    a = weight.__dict__[_HELD] = _Args(scale, tag, weight.data_ptr(), scale.data_ptr(), weight.shape, scale.shape,
                                       weight.dtype, scale.dtype, e8, O, K)
    return a


def _io(x: torch.Tensor, a: _Args | None, K: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x with unit-stride rows, the output [M, a.O] in x's dtype) where kept arguments `a` serve x
    (bf16 / fp32, CPU, [M, K]); None where the checked path must run."""
    dt = x.dtype
    if a is None or (dt is not _BF16 and dt is not _F32) or not x.is_cpu or x.dim() != 2 or x.shape[1] != K:
        return None
    if x.stride(1) != 1:
        x = x.contiguous()
    return x, torch.empty((x.shape[0], a.O), dtype=dt)


def _fp8_args(weight: torch.Tensor, scale: torch.Tensor, block: int) -> _Args | None:
    """The kept arguments of a weight the FP8 kernel reads as it lies (CPU, e4m3, contiguous, scales
    of the block x block grid), checked and kept on first use; None otherwise."""
    a = _held(weight, scale, block)
    if a is not None:
        return a
    e8 = _scale_kind(scale)
    if (e8 < 0 or weight.dtype is not _E4M3 or weight.dim() != 2 or scale.dim() != 2 or not weight.is_cpu
            or not scale.is_cpu or (block != 128 and block != 32) or not weight.is_contiguous()
            or not scale.is_contiguous()):
        return None
    O, K = weight.shape
    if scale.shape != ((O + block - 1) // block, (K + block - 1) // block):
        return None
    return _hold(weight, scale, block, e8, O, K)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant: bool = False,
               block: int = 128) -> torch.Tensor:
    """ref.fp8_linear: x [M,K] @ W^T, W e4m3 [O,K], block x block scales (128: V4's; 32: V4.1's dense
    weights) -> [M,O] in x.dtype. act_quant: x is FP8-simulated per 128 inside the kernel, bit-exact with
    ref.fp8_act_sim. A weight's own arguments are checked once and kept on it (`_fp8_args`)."""
    a = _fp8_args(weight, scale, block)
    io = _io(x, a, a.K if a is not None else -1)
    if io is None:
        return _fp8_linear(x, weight, scale, act_quant, block)
    x, out = io
    if out.numel():
        kernels.fp8_b(x.data_ptr(), x.stride(0), x.dtype is _BF16, a.w, a.s, a.e8, out.data_ptr(), x.shape[0], a.O,
                      a.K, act_quant, torch.get_num_threads(), block)
    return out


def _fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant: bool,
                block: int) -> torch.Tensor:
    """fp8_linear for any inputs: strided weights copied, what the kernel does not take to the twin."""
    dt = x.dtype
    e8 = _scale_kind(scale)
    if (dt is not _BF16 and dt is not _F32) or e8 < 0 or weight.dtype is not _E4M3 or x.dim() != 2 \
            or not (x.is_cpu and weight.is_cpu and scale.is_cpu) or (block != 128 and block != 32):
        return ref.fp8_linear(x, weight, scale, act_quant, block)
    M, Kx = x.shape
    O, Kw = weight.shape
    if Kx != Kw or scale.shape != ((O + block - 1) // block, (Kw + block - 1) // block):
        return ref.fp8_linear(x, weight, scale, act_quant, block)  # the twin's own error
    x, weight, scale = _dense(x, weight, scale)
    out = torch.empty((M, O), dtype=dt)
    if M and O:
        kernels.fp8_b(x.data_ptr(), x.stride(0), dt is _BF16, weight.data_ptr(), scale.data_ptr(), e8, out.data_ptr(),
                      M, O, Kw, act_quant, torch.get_num_threads(), block)
    return out


def fp8_linear_grouped(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int) -> torch.Tensor:
    """ref.fp8_linear_grouped (x [M, G*K], W e4m3 [G*R, K], R % 128 == 0 -> [M, G*R]) in one call
    (dz_fp8_linear_grouped: one team over every group's tiles): bit-identical to this module's
    fp8_linear per group + cat, the loop that cases the kernel does not take run (fp8_linear runs
    the twin where it does not take a group either); shapes that are no grouped linear raise the
    twin's ValueError."""
    a = _held(weight, scale, ("grouped", groups)) if type(groups) is int else None
    io = _io(x, a, groups * a.K if a is not None else -1)
    if io is not None:
        x, out = io
        if out.numel():
            kernels.fp8_grouped(x.data_ptr(), x.stride(0), x.dtype is _BF16, a.w, a.s, a.e8, out.data_ptr(), x.shape[0],
                                groups, a.O // groups, a.K, torch.get_num_threads())
        return out
    dt = x.dtype
    e8 = _scale_kind(scale)
    if ((dt is not _BF16 and dt is not _F32) or e8 < 0 or weight.dtype is not _E4M3 or x.dim() != 2
            or weight.dim() != 2 or type(groups) is not int or groups < 1
            or not (x.is_cpu and weight.is_cpu and scale.is_cpu)):
        return _grouped_loop(x, weight, scale, groups)
    M, Kx = x.shape
    O, K = weight.shape
    if O % groups or O // groups % 128 or Kx != groups * K or scale.shape != (O // 128, (K + 127) // 128):
        return _grouped_loop(x, weight, scale, groups)
    if weight.is_contiguous() and scale.is_contiguous():  # read as it lies: kept for the next calls
        _hold(weight, scale, ("grouped", groups), e8, O, K)
    x, weight, scale = _dense(x, weight, scale)
    out = torch.empty((M, O), dtype=dt)
    if M and O:
        kernels.fp8_grouped(x.data_ptr(), x.stride(0), dt is _BF16, weight.data_ptr(), scale.data_ptr(), e8,
                            out.data_ptr(), M, groups, O // groups, K, torch.get_num_threads())
    return out


def _grouped_loop(x, weight, scale, groups) -> torch.Tensor:
    """fp8_linear_grouped as G calls of fp8_linear (ref.fp8_groups: the twin's checks and views)."""
    return torch.cat([fp8_linear(*part) for part in ref.fp8_groups(x, weight, scale, groups)], -1)


def fp4_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """ref.fp4_linear: x [M,K] @ W^T, W packed e2m1 int8 [O,K/2], per-32 scales [O,K/32] -> [M,O] x.dtype."""
    a = _held(weight, scale, "fp4")
    io = _io(x, a, a.K if a is not None else -1)
    if io is not None:
        x, out = io
        if out.numel():
            kernels.fp4(x.data_ptr(), x.stride(0), x.dtype is _BF16, a.w, a.s, a.e8, out.data_ptr(), x.shape[0], a.O, a.K,
                        torch.get_num_threads())
        return out
    dt = x.dtype
    e8 = _scale_kind(scale)
    wd = weight.dtype
    if (dt is not _BF16 and dt is not _F32) or e8 < 0 or (wd is not _I8 and wd is not _U8) or x.dim() != 2 \
            or not (x.is_cpu and weight.is_cpu and scale.is_cpu):
        return ref.fp4_linear(x, weight, scale)
    M, Kx = x.shape
    O, Kh = weight.shape
    if Kx != 2 * Kh or Kx % 32 or scale.shape != (O, Kx // 32):
        return ref.fp4_linear(x, weight, scale)
    if weight.is_contiguous() and scale.is_contiguous():  # read as it lies: kept for the next calls
        _hold(weight, scale, "fp4", e8, O, Kx)
    x, weight, scale = _dense(x, weight, scale)
    out = torch.empty((M, O), dtype=dt)
    if M and O:
        kernels.fp4(x.data_ptr(), x.stride(0), dt is _BF16, weight.data_ptr(), scale.data_ptr(), e8, out.data_ptr(),
              M, O, Kx, torch.get_num_threads())
    return out


def _cpu(w) -> bool:
    return w.device.type == "cpu"


def _table(w) -> torch.Tensor:
    """Each expert's first byte, int64 [E]: the rows of a contiguous stack, or a PerExpert's own
    tensors where they lie."""
    if isinstance(w, PerExpert):
        return w.addresses
    return torch.arange(w.shape[0], dtype=_I64) * (w.stride(0) * w.element_size()) + w.data_ptr()


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w1, s1, w3, s3, w2, s2, limit: float,
                h_act_sim: bool = False) -> torch.Tensor:
    """ref.moe_experts: fp32 [N, dim]. One call: pairs grouped by expert, each touched expert's
    weights streamed once per block of 8 of its pairs (24 pairs or more: decoded once per call, see
    gemm.c's many-rows path); h_act_sim in the kernel (bit-exact). w1 .. s2: stacks [E, ...] or
    PerExpert lists (ops/experts.py: each expert read where it lies, nothing copied).
    ids outside [0, E) raise IndexError (the twin wraps negative ids around)."""
    dt = x.dtype
    k1, k3, k2 = _scale_kind(s1), _scale_kind(s3), _scale_kind(s2)
    ws = (w1, s1, w3, s3, w2, s2)
    if ((dt is not _BF16 and dt is not _F32) or k1 < 0 or k3 < 0 or k2 < 0 or w1.dtype not in _FP4_W
            or w3.dtype not in _FP4_W or w2.dtype not in _FP4_W or x.dim() != 2 or ids.dim() != 2 or len(w1.shape) != 3
            or ids.dtype.is_floating_point or not weights.is_floating_point()
            or not (x.is_cpu and weights.is_cpu and ids.is_cpu and all(_cpu(w) for w in ws))):
        return ref.moe_experts(x, weights, ids, w1, s1, w3, s3, w2, s2, limit, h_act_sim)
    N, dim = x.shape
    E, inter = w1.shape[0], w1.shape[1]
    if (dim % 32 or inter % 32 or w1.shape[2] * 2 != dim or w3.shape != w1.shape
            or tuple(w2.shape) != (E, dim, inter // 2) or tuple(s1.shape) != (E, inter, dim // 32)
            or s3.shape != s1.shape or tuple(s2.shape) != (E, dim, inter // 32)
            or weights.shape != ids.shape or ids.shape[0] != N):
        return ref.moe_experts(x, weights, ids, w1, s1, w3, s3, w2, s2, limit, h_act_sim)
    k = ids.shape[1]
    out = torch.empty((N, dim), dtype=_F32)
    if N * k == 0:
        return out.zero_()
    if not x.is_contiguous():
        x = x.contiguous()
    if ids.dtype is not _I64 or not ids.is_contiguous():
        ids = ids.to(_I64).contiguous()
    if weights.dtype is not _F32 or not weights.is_contiguous():
        weights = weights.to(_F32).contiguous()
    ws = tuple(w if isinstance(w, PerExpert) or w.is_contiguous() else w.contiguous() for w in ws)
    tables = [_table(w) for w in ws]  # alive for the calls below
    status = ctypes.c_int64(0)
    t1, u1, t3, u3, t2, u2 = (t.data_ptr() for t in tables)
    pw = (t1, u1, k1, t3, u3, k3, t2, u2, k2, float(limit), bool(h_act_sim))
    # the kernel holds h and the down projection of every (token, slot) pair: prefill-sized
    # batches run in chunks of tokens (independent rows) to bound that memory
    step = max(1, MOE_CHUNK_PAIRS // k)  # module global read per call: tests shrink it
    xp, ip, wp, op = x.data_ptr(), ids.data_ptr(), weights.data_ptr(), out.data_ptr()
    xb = x.element_size() * dim
    for n0 in range(0, N, step):
        n = min(step, N - n0)
        kernels.moe(xp + n0 * xb, dt is _BF16, n, dim, inter, k, ip + n0 * 8 * k, wp + n0 * 4 * k, E, *pw,
                    op + n0 * 4 * dim, ctypes.addressof(status), torch.get_num_threads())
        if status.value:
            raise IndexError(f"moe_experts: expert ids must lie in [0, {E})")
    return out
