"""Quantized-weight GEMMs: FP8 block-scaled linears and MXFP4 linears (the routed-expert MoE
on the same decoding is in moe.py; the fp32 linear over dense weights is in dense.py).

Byte layouts (loader/formats.py): FP8 weight e4m3fn [O,K] (read as uint8) with one scale per
128x128 block, scale [ceil(O/128), ceil(K/128)] E8M0 bytes (2^(b-127)) or fp32. FP4 weight int8
[O,K/2], byte j = elements 2j (low nibble) and 2j+1 (high nibble), E8M0 scale [O,K/32].

Decoding is integer bit ops, no FP8 hardware needed (works in the interpreter and on any GPU):
an e4m3 byte s.eeee.mmm moved to fp16 bits s.0eeee.mmm0000000 is the same number times 2^-8
(subnormals included); an e2m1 nibble s.ee.m as fp16 bits s.000ee.m000000000 is it times 2^-14.
The 2^8 / 2^14 is folded into the block scale (exact, a power of two). Then, like the twins,
w*scale is rounded to the activation dtype and dotted with fp32 accumulation.

Grids. Linears: (M tiles, O tiles, split programs). Batch invariance (issue 20): a row's result
must not depend on how many rows share the call, so everything that sets its reduction order is
chosen from the weight shape (O, K) and the device alone, never from M:
- the launch configuration (BLOCK_M, BLOCK_O, BLOCK_K, num_warps, SPLIT_K) is looked up by the
  key "O{O}-K{K}" (tuning.py: no row-count bucket), so one compiled kernel serves every M and a
  row only changes its place inside an M tile (we rely on a tl.dot computing every row of a tile
  with the same instructions, i.e. the same k order: checked under the interpreter, assumed of
  GPU MMA instructions of one tile shape);
- K is cut into S ranges of KSPLIT elements (S from K, BLOCK_K, the O tiles and the SM count:
  about two waves of programs at one M tile, each range >= 4 K tiles); each range is summed in
  BLOCK_K steps into its own fp32 partial, and the partials are added in range order, 0 + p0 +
  p1 + ..., then rounded once to the output dtype. Where the partials are computed is free: few
  tiles (decode) spread the S ranges over S programs (fp32 workspace [S, M, O], summed in order
  by _sum_splits_kernel), many tiles (prefill) loop over the S ranges inside one program (no
  workspace); both give the same bits.
Cost (not measured on a GPU: none was lent): prefill runs the decode-chosen tiles (BLOCK_M 16 by
default, where 64-row tiles were chosen above 64 rows before) and its S-range loop; decode is as
before. FP4 programs walk K in 32-element scale groups: the even and odd elements of x are
loaded separately and dotted with the low / high nibbles, so nibbles are never interleaved in
registers.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from dayzero.loader.formats import quant_fp8_block
from dayzero.ops import ref
from dayzero.ops.triton import tuning

_E8M0 = (torch.float8_e8m0fnu, torch.uint8)


def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---- in-kernel decoding ----------------------------------------------------------------------
@triton.jit
def _scale_f32(s, E8M0: tl.constexpr):
    if E8M0:  # byte b -> 2^(b-127) from its fp32 bits; b = 0 is the subnormal 2^-127
        b = s.to(tl.int32)
        return tl.where(b == 0, 1 << 22, b << 23).to(tl.float32, bitcast=True)
    else:
        return s


@triton.jit
def _round(v, dt: tl.constexpr, INTERP: tl.constexpr):
    """fp32 -> dt rounding to nearest even; the interpreter's own fp32->bf16 cast truncates."""
    if INTERP and dt == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        v = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return v.to(dt)


@triton.jit
def _e4m3_x2m8(b):
    """uint8 e4m3fn bytes -> fp32 value * 2^-8 (0x7f/0xff decode as +-480 instead of NaN)."""
    h = b.to(tl.uint16)
    return (((h & 0x80) << 8) | ((h & 0x7F) << 7)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _act_scale(amax):
    """ref.fp8_act_sim's scale 2^ceil(log2(max(amax, 1e-4) / 448)) from fp32 bits, and 1/scale."""
    bits = (tl.maximum(amax, 1e-4) / 448.0).to(tl.int32, bitcast=True)  # a positive normal
    e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (e << 23).to(tl.float32, bitcast=True), ((254 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_round(v):
    """fp32 |v| <= 448 -> the nearest e4m3 value, ties to even, still fp32: adding 1.5*2^23 in
    units of the e4m3 spacing there rounds to an integer (no FP8 hardware needed)."""
    ve = (tl.maximum(tl.abs(v), 2.0 ** -6).to(tl.int32, bitcast=True) >> 23) & 0xFF
    ulp = ((ve - 3) << 23).to(tl.float32, bitcast=True)
    return ((v * ((257 - ve) << 23).to(tl.float32, bitcast=True) + 12582912.0) - 12582912.0) * ulp


@triton.jit
def _fp4_group(acc, xr, x_ok, k, K, wr, sr, o_ok, E8M0: tl.constexpr, ACT_SIM: tl.constexpr,
               INTERP: tl.constexpr, IEEE: tl.constexpr):
    """acc += x[:, k:k+32] @ W[:, k:k+32]^T for one FP4 scale group. xr [BM] row pointers of x,
    wr [BO] row pointers of the packed weight, sr [BO] row pointers of its scales. ACT_SIM: x
    is FP8-simulated per 128 first (ref.fp8_act_sim; its block re-read for the amax, from cache)."""
    j = tl.arange(0, 16)
    k_ok = (k + 2 * j) < K  # K is a multiple of 32: the whole group is in or out
    b = tl.load(wr[None, :] + (k // 2 + j)[:, None], mask=o_ok[None, :] & k_ok[:, None], other=0).to(tl.uint16)
    s_ok = o_ok & ((o_ok.to(tl.int32) * 0 + k) < K)  # vector compare: the interpreter rejects a scalar one here
    s = _scale_f32(tl.load(sr + k // 32, mask=s_ok, other=1), E8M0) * 16384.0
    lo = (((b & 8) << 12) | ((b & 7) << 9)).to(tl.float16, bitcast=True).to(tl.float32) * s[None, :]
    hi = (((b & 0x80) << 8) | ((b & 0x70) << 5)).to(tl.float16, bitcast=True).to(tl.float32) * s[None, :]
    xm = x_ok[:, None] & k_ok[None, :]
    xe = tl.load(xr[:, None] + (k + 2 * j)[None, :], mask=xm, other=0)
    xo = tl.load(xr[:, None] + (k + 2 * j + 1)[None, :], mask=xm, other=0)
    if ACT_SIM:
        c = (k // 128) * 128 + tl.arange(0, 128)
        blk = tl.load(xr[:, None] + c[None, :], mask=x_ok[:, None] & (c < K)[None, :], other=0)
        sa, inv = _act_scale(tl.max(tl.abs(blk.to(tl.float32)), axis=1))
        xe = (_e4m3_round(xe.to(tl.float32) * inv[:, None]) * sa[:, None]).to(xe.dtype)  # exact casts
        xo = (_e4m3_round(xo.to(tl.float32) * inv[:, None]) * sa[:, None]).to(xo.dtype)
    lo = _round(lo, xe.dtype, INTERP)  # the twin rounds the dequantised weight to x.dtype
    hi = _round(hi, xe.dtype, INTERP)
    if INTERP or IEEE:
        acc = tl.dot(xe.to(tl.float32), lo.to(tl.float32), acc, input_precision="ieee")
        acc = tl.dot(xo.to(tl.float32), hi.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(xe, lo, acc)
        acc = tl.dot(xo, hi, acc)
    return acc


# ---- linears ----------------------------------------------------------------------------------
@triton.jit
def _fp8_kernel(X, W, S, Y, M, O, K, KB, sxm, sys, KSPLIT, SPLITS, BLOCK_M: tl.constexpr,
                BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, E8M0: tl.constexpr, ACT_Q: tl.constexpr,
                INTERP: tl.constexpr, IEEE: tl.constexpr, SB: tl.constexpr = 128):
    """ACT_Q=False: W8A16, weight tile decoded, scaled, rounded to x.dtype, dotted.
    ACT_Q=True (BLOCK_K=128): W8A8, each x row block quantised to e4m3 with a power-of-two
    scale (as ref.fp8_act_sim), FP8 tensor-core dot, both scales on the fp32 partial sum.
    SB: the scale blocks' side, 128 (V4, BLOCK_K | 128) or 32 (V4.1, W8A16 only: a scale tile per K tile)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ro = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    rk = tl.arange(0, BLOCK_K)
    m_ok, o_ok = rm < M, ro < O
    srow = S + (ro // SB) * KB
    total = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    for sp in range(tl.program_id(2) * SPLITS, (tl.program_id(2) + 1) * SPLITS):  # K ranges, in order
        acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
        for k0 in range(sp * KSPLIT, tl.minimum(K, (sp + 1) * KSPLIT), BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            x = tl.load(X + rm[:, None] * sxm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
            b = tl.load(W + ro[None, :] * K + kk[:, None], mask=o_ok[None, :] & k_ok[:, None], other=0)
            if SB == 128:  # one scale per weight row over the K tile
                s = _scale_f32(tl.load(srow + k0 // 128, mask=o_ok, other=1), E8M0)
                sw = (s * 256.0)[None, :]
            else:  # V4.1's 32x32 blocks: a scale per SB of K too
                sw = _scale_f32(tl.load(srow[None, :] + (kk // SB)[:, None], mask=o_ok[None, :] & k_ok[:, None],
                                        other=1), E8M0) * 256.0
            if ACT_Q:
                xf = x.to(tl.float32)
                sa, inv = _act_scale(tl.max(tl.abs(xf), axis=1))
                v = xf * inv[:, None]
                if INTERP:  # the interpreter's fp32->fp8 cast misrounds: exact e4m3 values in fp32
                    p = tl.dot(_e4m3_round(v), _e4m3_x2m8(b) * 256.0, input_precision="ieee")
                else:
                    p = tl.dot(v.to(tl.float8e4nv), b.to(tl.float8e4nv, bitcast=True))
                acc += p * sa[:, None] * s[None, :]
            else:
                w = _round(_e4m3_x2m8(b) * sw, x.dtype, INTERP)
                if INTERP or IEEE:
                    acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, w, acc)
        total += acc
    yp = Y + tl.program_id(2) * sys + rm[:, None] * O + ro[None, :]
    tl.store(yp, _round(total, Y.dtype.element_ty, INTERP), mask=m_ok[:, None] & o_ok[None, :])


@triton.jit
def _fp4_kernel(X, W, S, Y, M, O, K, swo, sso, sxm, sys, KSPLIT, SPLITS, BLOCK_M: tl.constexpr,
                BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, E8M0: tl.constexpr, INTERP: tl.constexpr,
                IEEE: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ro = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    m_ok, o_ok = rm < M, ro < O
    xr, wr, sr = X + rm * sxm, W + ro * swo, S + ro * sso  # row strides as args: divisibility-specialised
    total = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    for sp in range(tl.program_id(2) * SPLITS, (tl.program_id(2) + 1) * SPLITS):  # K ranges, in order
        acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
        for k0 in range(sp * KSPLIT, tl.minimum(K, (sp + 1) * KSPLIT), BLOCK_K):
            for g in tl.static_range(BLOCK_K // 32):
                acc = _fp4_group(acc, xr, m_ok, k0 + 32 * g, K, wr, sr, o_ok, E8M0, False, INTERP, IEEE)
        total += acc
    yp = Y + tl.program_id(2) * sys + rm[:, None] * O + ro[None, :]
    tl.store(yp, _round(total, Y.dtype.element_ty, INTERP), mask=m_ok[:, None] & o_ok[None, :])


@triton.jit
def _sum_splits_kernel(P, Y, S, MO, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    """Y = 0 + P[0] + P[1] + ... + P[S-1] (fp32, in this order) rounded once to Y's dtype: the
    same additions and rounding as a program that loops over the S K ranges itself."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MO
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(S):
        total += tl.load(P + offs, mask=ok, other=0.0)
        P += MO  # a pointer step per partial: no S * MO offset product
    tl.store(Y + offs, _round(total, Y.dtype.element_ty, INTERP), mask=ok)


def _check_cfg(cfg: dict, bk_ok) -> None:
    """Tiles are powers of two (tl.arange), >= 16 (tl.dot); bk_ok(BLOCK_K) per kernel."""
    blocks = [v for n, v in cfg.items() if n.startswith("BLOCK")]
    if any(b < 16 or b & (b - 1) for b in blocks) or not bk_ok(cfg["BLOCK_K"]):
        raise ValueError(f"config: bad block sizes {cfg}")


def _sms(x: torch.Tensor) -> int:
    """SMs the K ranges are sized for (x: a tensor on the device); the interpreter: a pretend GPU
    of 4, so that test shapes take the split paths."""
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4


def k_ranges(x: torch.Tensor, K: int, BK: int, o_tiles: int, split: int = 0) -> tuple[int, int]:
    """(S, KSPLIT): K cut into S ranges of KSPLIT elements (a multiple of BK), chosen from the
    weight shape and the device only, never from the row count (batch invariance). split 0 =
    auto: about two waves of programs over the SMs at one M tile, each range >= 4 K tiles."""
    nk = triton.cdiv(K, BK)
    split = split or max(1, min(triton.cdiv(2 * _sms(x), o_tiles), nk // 4))
    ksplit = triton.cdiv(nk, split) * BK
    return triton.cdiv(K, ksplit), ksplit


def spread(cfg: dict, tiles: int, S: int, x: torch.Tensor) -> bool:
    """Compute the S K ranges in S programs each (few tiles: decode) rather than in a loop inside
    one program (many tiles: prefill). Both give the same bits; cfg["SPREAD"] (True / False)
    forces one (tests), else: spread when the tiles alone fill less than two waves of SMs."""
    if S == 1:
        return False
    if cfg.get("SPREAD") is not None:
        return bool(cfg["SPREAD"])
    return tiles < 2 * _sms(x)


def sum_splits(part: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y = the S partials of part [S, ...] (fp32) added in order, rounded once to y's dtype."""
    n = y.numel()
    _sum_splits_kernel[(triton.cdiv(n, 1024),)](part, y, part.shape[0], n, BLOCK=1024, INTERP=_interp())
    return y


def _launch_linear(kernel, x, w, s, O, K, cfg, kmult, **flags):
    """Grid (M tiles, O tiles, S or 1): the K ranges of k_ranges, spread over programs or not."""
    M = x.shape[0]
    BM, BO, BK = cfg["BLOCK_M"], cfg["BLOCK_O"], cfg["BLOCK_K"]
    S, ksplit = k_ranges(x, K, BK, triton.cdiv(O, BO), cfg.get("SPLIT_K", 0))
    wide = spread(cfg, triton.cdiv(M, BM) * triton.cdiv(O, BO), S, x)
    y = torch.empty((M, O), device=x.device, dtype=x.dtype)
    part = torch.empty((S, M, O), device=x.device, dtype=torch.float32) if wide else y
    grid = (triton.cdiv(M, BM), triton.cdiv(O, BO), S if wide else 1)
    kernel[grid](x, w, s, part, M, O, K, *kmult, x.stride(0), M * O, ksplit, 1 if wide else S, BLOCK_M=BM,
                 BLOCK_O=BO, BLOCK_K=BK, E8M0=s.dtype == torch.uint8, INTERP=_interp(),
                 IEEE=x.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                 **flags)
    return sum_splits(part, y) if wide else y


def _x2d(x: torch.Tensor, K: int, dev: torch.device) -> torch.Tensor:
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.shape[1] != K:
        raise ValueError(f"x must be fp32/bf16/fp16 [M, {K}], got {x.dtype} {tuple(x.shape)}")
    if x.device != dev:
        raise ValueError(f"x is on {x.device}, the weight on {dev}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _scale_arg(scale: torch.Tensor, shape: tuple, dev: torch.device, name: str = "scale") -> torch.Tensor:
    """E8M0 scales as their uint8 bytes (decoded in-kernel), fp32 ones as they are."""
    if scale.dtype not in (*_E8M0, torch.float32):
        raise ValueError(f"{name} must be float8_e8m0fnu, uint8 or float32, got {scale.dtype}")
    if tuple(scale.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(scale.shape)}")
    if scale.device != dev:
        raise ValueError(f"{name} is on {scale.device}, the weight on {dev}")
    scale = scale.contiguous()
    return scale.view(torch.uint8) if scale.dtype in _E8M0 else scale


def _fp8_tensor_cores(device: torch.device) -> bool:
    if _interp():
        return True  # emulated on the e4m3 grid, so the CPU tests cover the W8A8 numerics
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, act_quant: bool = False,
               config: dict | None = None, block: int = 128) -> torch.Tensor:
    """ref.fp8_linear. act_quant=True: x is FP8-simulated first (ref.fp8_act_sim, blocks of 128):
    on FP8 tensor cores (cc >= 8.9) fused into a W8A8 kernel, elsewhere simulated then W8A16.
    block: the scale blocks' side, 128 (V4) or 32 (V4.1: W8A16, x simulated first where act_quant; config key
    "O{O}-K{K}-b32", tuned on V4.1-Flash's wq_b and wo_b shapes); other sides run the twin."""
    if block not in (128, 32):
        return ref.fp8_linear(x, weight, scale, act_quant, block)
    if weight.dim() != 2 or weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"weight must be 2-D float8_e4m3fn, got {weight.dtype} {tuple(weight.shape)}")
    O, K = weight.shape
    x = _x2d(x, K, weight.device)
    scale = _scale_arg(scale, (triton.cdiv(O, block), triton.cdiv(K, block)), x.device)
    M = x.shape[0]
    if M == 0 or O == 0 or K == 0:
        return torch.zeros((M, O), device=x.device, dtype=x.dtype)
    w = weight.contiguous().view(torch.uint8)
    # with fp32 scales the twin rounds W to x.dtype: only the W8A16 kernel reproduces that
    tc = (act_quant and block == 128 and _fp8_tensor_cores(x.device)
          and (scale.dtype == torch.uint8 or x.dtype == torch.float32))
    if act_quant and not tc:
        x = ref.fp8_act_sim(x, 128)
    name = "fp8_linear_w8a8" if tc else "fp8_linear"
    key = f"O{O}-K{K}" if block == 128 else f"O{O}-K{K}-b{block}"
    cfg = config or tuning.config(name, key, _default(name), x.device)  # never M: see the docstring
    # a K tile stays inside one 128-block of scales (32-blocks: any tile); W8A8 quantises whole blocks
    _check_cfg(cfg, lambda bk: bk == 128 if tc else (128 % bk == 0 or block != 128))
    return _launch_linear(_fp8_kernel, x, w, scale, O, K, cfg, (triton.cdiv(K, block),), ACT_Q=tc, SB=block)


def fp4_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *,
               config: dict | None = None) -> torch.Tensor:
    """ref.fp4_linear: x [M,K] @ W^T, W packed e2m1 int8 [O,K/2], E8M0 scales [O,K/32] -> x.dtype."""
    if weight.dim() != 2 or weight.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"weight must be 2-D int8 packed FP4, got {weight.dtype} {tuple(weight.shape)}")
    O, K = weight.shape[0], 2 * weight.shape[1]
    if K % 32:
        raise ValueError(f"weight: FP4 inputs ({K}) must be a multiple of 32")
    x = _x2d(x, K, weight.device)
    scale = _scale_arg(scale, (O, K // 32), x.device)
    M = x.shape[0]
    if M == 0 or O == 0 or K == 0:
        return torch.zeros((M, O), device=x.device, dtype=x.dtype)
    cfg = config or tuning.config("fp4_linear", f"O{O}-K{K}", _default("fp4_linear"), x.device)
    _check_cfg(cfg, lambda bk: bk >= 32)
    w = weight.contiguous().view(torch.uint8)
    return _launch_linear(_fp4_kernel, x, w, scale, O, K, cfg, (w.stride(0), scale.stride(0)))


# ---- tuning --------------------------------------------------------------------------------------
def _lin(bm, bo, bk, split, warps, stages):
    return {"BLOCK_M": bm, "BLOCK_O": bo, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": warps, "num_stages": stages}


def _default(name: str) -> dict:
    """Untuned: the first config of the space, for every row count (batch invariance: the tiles
    set a row's reduction order). The interpreter pays per program and per op, not per element:
    it gets the widest O tiles."""
    cfg = TUNABLES[name].space[0]
    if _interp():
        cfg = {**cfg, **{k: 256 for k in ("BLOCK_O", "BLOCK_O1", "BLOCK_O2") if k in cfg}}
    return cfg


def _rand_fp4(*shape, dev):
    """Random packed codes, E8M0 scales near 2^-6 (quick to make for 256 GPU experts)."""
    w = torch.randint(-128, 128, (*shape[:-1], shape[-1] // 2), dtype=torch.int8, device=dev)
    s = torch.randint(118, 124, (*shape[:-1], shape[-1] // 32), dtype=torch.uint8, device=dev)
    return w, s.view(torch.float8_e8m0fnu)


def _lin_cases(fn, make, gpu_shapes, cpu_shapes):
    """cases(device): bf16 x; (M, O, K[, 32: V4.1's 32x32 blocks]); keys name the weight, one config for all M."""
    def cases(device):
        out = []
        for M, O, K, *b in gpu_shapes if torch.device(device).type == "cuda" else cpu_shapes:
            kw = {"block": b[0]} if b else {}
            args = (torch.randn(M, K, device=device, dtype=torch.bfloat16), *make(O, K, device, **kw))
            out.append((f"O{O}-K{K}" + (f"-b{b[0]}" if b else ""), lambda cfg, a=args, kw=kw: fn(*a, config=cfg, **kw)))
        return out
    return cases


def _rand_fp8(O, K, dev, block=128):
    return quant_fp8_block(torch.randn(O, K, device=dev) * 0.05, block)


# one decode and one prefill M per weight shape: their times are added per key (dayzero tune)
_FP8_GPU = [(m, o, k) for o, k in ((1024, 4096), (32768, 1024), (2048, 4096), (4096, 2048), (4096, 4096))
            for m in (1, 512)]
_FP8_B32_GPU = [(m, o, k, 32) for o, k in ((32768, 1280), (5120, 8192)) for m in (1, 512)]  # V4.1-Flash wq_b, wo_b
_FP4_GPU = [(m, o, k) for o, k in ((2048, 4096), (4096, 2048)) for m in (1, 512)]
TUNABLES: dict[str, tuning.Tunable] = {
    "fp8_linear": tuning.Tunable(
        space=(_lin(16, 64, 128, 0, 4, 4), _lin(16, 128, 128, 0, 4, 4), _lin(16, 32, 128, 0, 4, 4),
               _lin(16, 64, 64, 0, 4, 6), _lin(16, 64, 128, 2, 4, 4), _lin(32, 64, 128, 4, 4, 3),
               _lin(64, 128, 64, 1, 8, 3)),
        cases=_lin_cases(fp8_linear, _rand_fp8, _FP8_GPU + _FP8_B32_GPU, [(3, 70, 320), (3, 70, 320, 32)])),
    "fp8_linear_w8a8": tuning.Tunable(
        space=(_lin(16, 64, 128, 0, 4, 4), _lin(16, 128, 128, 0, 4, 4), _lin(16, 32, 128, 0, 4, 3),
               _lin(32, 64, 128, 2, 4, 4), _lin(64, 128, 128, 1, 8, 3)),
        cases=_lin_cases(functools.partial(fp8_linear, act_quant=True), _rand_fp8, _FP8_GPU, [(3, 70, 320)])),
    "fp4_linear": tuning.Tunable(
        space=(_lin(16, 64, 128, 0, 4, 4), _lin(16, 128, 128, 0, 4, 4), _lin(16, 32, 256, 0, 4, 3),
               _lin(16, 64, 64, 2, 4, 4), _lin(64, 128, 64, 1, 8, 3)),
        cases=_lin_cases(fp4_linear, lambda O, K, dev: _rand_fp4(O, K, dev=dev), _FP4_GPU, [(3, 70, 128)])),
}
