"""Row-wise elementwise kernels: RMSNorm, FP8 activation simulation, compressor pooling, rotary
embedding (twins: ops/ref.py).

All three are memory-bound single-pass streams: every input byte is read once and every output
byte written once, fp32 math in registers.

rms_norm: x viewed as [M, C] rows (V4: C = 4096 for the block/head norms, M = tokens; C = 1024
  for q_norm; C = 512 for the per-head q norm and kv norm, M = tokens x 64 heads). grid
  (cdiv(M, ROWS)); one program = ROWS rows x the whole row in registers ([ROWS, next_pow2(C)]
  fp32; at C = 4096, ROWS = 1 and 8 warps that is 16 values a thread). Rows longer than MAX_C
  take a two-pass loop (sum of squares, then scale), the second pass hitting L2.
fp8_act_sim: x viewed as [M, n]; the (row, block) pairs (M x cdiv(n, block) of them, the last
  block of a row partial) are numbered and cut into groups of GROUPS; one program = GROUPS blocks
  as a [GROUPS, next_pow2(block)] tile, so the grid grows with the data (V4: 4096-wide rows in
  blocks of 128, 64-wide nope blocks in the compressor) and no lane idles on short rows. The
  scale and the e4m3 rounding are integer arithmetic on the float bits, bit-exact with the twin's
  float8_e4m3fn cast and usable on GPUs without FP8 and in the interpreter.
compress_pool: kv, gate viewed as [M, S, C] (V4: S = 8 CSA slots or 128 HCA slots, C = 512 or
  the 128-wide indexer); grid (M, cdiv(C, BLOCK_C)); one program = all S slots of BLOCK_C
  channels ([S, BLOCK_C] tile, channels contiguous), softmax over slots in registers.
apply_rope: x viewed as [N, H, Dh] rows sharing a token's cos/sin [N, rd/2]; grid
  (cdiv(N*H, ROWS)); one program = ROWS rows: the rope pairs rotated in fp32 with the twin's
  roundings, the nope dims copied.

Batch invariance (issue 20): rms_norm and compress_pool reduce within a row, so their configs are
keyed by the row shape only; fp8_act_sim (a max: exact) and apply_rope keep decode / prefill keys.

cast_out (also used by mhc.py) stores fp32 results as bf16 with round-to-nearest-even under the
Triton interpreter too, whose fp32 -> bf16 cast truncates (GPUs round): the CPU parity tests then
see the rounding the GPU does.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dayzero.ops.triton import tuning

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _bad(name: str, value, want: str) -> ValueError:
    return ValueError(f"{name}: expected {want}, got {value}")


def _float_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise _bad(name, type(t).__name__, "a torch.Tensor")
    if t.dtype not in _FLOATS:
        raise _bad(f"{name}.dtype", t.dtype, "float32, bfloat16 or float16")
    return t


def _bucket(m: int) -> str:
    return "dec" if m <= 64 else "pre"


def _cfg(name: str, key: str, default: dict, config: dict | None, dev: torch.device) -> dict:
    return {**default, **(config if config is not None else tuning.config(name, key, default, dev))}


@triton.jit
def cast_out(v, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """v (fp32) -> dtype. The Triton interpreter (3.9) truncates fp32 -> bf16 where GPUs round to
    nearest even; RNE_BF16 (bf16 output under the interpreter) rounds on the bits first."""
    if RNE_BF16:
        b = v.to(tl.int32, bitcast=True)
        v = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return v.to(dtype)


def rne_bf16(t: torch.Tensor) -> bool:
    """The RNE_BF16 flag of cast_out for an output tensor t."""
    return t.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


# ---- RMSNorm ------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, M, C, eps, HAS_W: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_C: tl.constexpr, ONE_PASS: tl.constexpr, RNE: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    roff = rows.to(tl.int64)[:, None] * C
    cols = tl.arange(0, BLOCK_C)
    if ONE_PASS:
        cm = cols < C
        m = rmask[:, None] & cm[None, :]
        xf = tl.load(x_ptr + roff + cols[None, :], mask=m, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / C + eps)  # mean, then eps: the twin's order
        y = xf * r[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + roff + cols[None, :], cast_out(y, out_ptr.dtype.element_ty, RNE), mask=m)
    else:
        ss = tl.zeros([ROWS], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            m = rmask[:, None] & (c < C)[None, :]
            xf = tl.load(x_ptr + roff + c[None, :], mask=m, other=0.0).to(tl.float32)
            ss += tl.sum(xf * xf, axis=1)
        r = 1.0 / tl.sqrt(ss / C + eps)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            cm = c < C
            m = rmask[:, None] & cm[None, :]
            y = tl.load(x_ptr + roff + c[None, :], mask=m, other=0.0).to(tl.float32) * r[:, None]
            if HAS_W:
                y = y * tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + roff + c[None, :], cast_out(y, out_ptr.dtype.element_ty, RNE), mask=m)


RMS_DEFAULT = dict(ROWS=1, MAX_C=8192, num_warps=8)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, config: dict | None = None) -> torch.Tensor:
    x = _float_tensor("x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise _bad("x.shape", tuple(x.shape), "[..., C] with C >= 1")
    C = x.shape[-1]
    if weight is not None:
        weight = _float_tensor("weight", weight)
        if weight.shape != (C,):
            raise _bad("weight.shape", tuple(weight.shape), f"({C},) or weight=None")
        if weight.device != x.device:
            raise _bad("weight.device", weight.device, f"{x.device} (x's device)")
        weight = weight.contiguous()
    x = x.contiguous()
    out = torch.empty_like(x)
    M = x.numel() // C
    if M == 0:
        return out
    # keyed by C only: ROWS, MAX_C, num_warps set the order of a row's sum of squares
    cfg = _cfg("rms_norm", f"C{C}", RMS_DEFAULT, config, x.device)
    block_c = min(triton.next_power_of_2(C), triton.next_power_of_2(int(cfg["MAX_C"])))
    rows = int(cfg["ROWS"])
    _rms_norm_kernel[(triton.cdiv(M, rows),)](
        x, weight if weight is not None else x, out, M, C, float(eps), HAS_W=weight is not None, ROWS=rows,
        BLOCK_C=block_c, ONE_PASS=block_c >= C, RNE=rne_bf16(out), num_warps=int(cfg["num_warps"]))
    return out


# ---- FP8 e4m3 activation simulation --------------------------------------------------------------
@triton.jit
def _e4m3_round(v):
    """Nearest float8_e4m3fn value of fp32 v (|v| <= 448), ties to even, as fp32; by integer
    arithmetic on the bits. The quantum is 2^(e-3) for normal e4m3 (e >= -6) and 2^-9 for
    subnormals, so the 24-bit significand is shifted right by drop = clamp(14 - e, 20, 25) bits
    (25 already rounds everything, including fp32 zero and subnormals, to 0)."""
    a = v.to(tl.int32, bitcast=True)
    sign = (a >> 31) << 31
    mag = a & 0x7FFFFFFF
    e = (mag >> 23) - 127
    sig = (mag & 0x7FFFFF) | 0x800000
    drop = tl.minimum(tl.maximum(14 - e, 20), 25)
    q = sig >> drop
    rem = sig & ((1 << drop) - 1)
    half = 1 << (drop - 1)
    q += ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
    quantum = (e - 23 + drop + 127) << 23  # 2^(e - 23 + drop) as fp32 bits, always a normal number
    val = q.to(tl.float32) * quantum.to(tl.float32, bitcast=True)  # q <= 16: exact
    return (val.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _fp8_sim_kernel(x_ptr, out_ptr, n, nblk, total, block, GROUPS: tl.constexpr, BP: tl.constexpr):
    g = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    row = g // nblk
    col = (g - row * nblk)[:, None] * block + tl.arange(0, BP)[None, :]
    m = (g < total)[:, None] & (tl.arange(0, BP) < block)[None, :] & (col < n)
    off = row.to(tl.int64)[:, None] * n + col
    xf = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(xf), axis=1), 1e-4)
    # Smallest 2^k with amax <= 448 * 2^k = 1.75 * 2^(k+8): with amax = 1.f * 2^(E-127),
    # k + 127 = E - 8, plus one when 1.f > 1.75 (f > 0x600000). Exact, no division or log2.
    ab = amax.to(tl.int32, bitcast=True)
    es = (ab >> 23) - 8 + ((ab & 0x7FFFFF) > 0x600000).to(tl.int32)
    scale = (es << 23).to(tl.float32, bitcast=True)
    inv = ((254 - es) << 23).to(tl.float32, bitcast=True)  # 1 / scale, exact
    y = _e4m3_round(xf * inv[:, None]) * scale[:, None]
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=m)  # 4 significant bits: exact in bf16


FP8_DEFAULT = dict(GROUPS=8, num_warps=4)


def fp8_act_sim(x: torch.Tensor, block: int = 128, *, config: dict | None = None) -> torch.Tensor:
    x = _float_tensor("x", x)
    if x.dim() == 0:
        raise _bad("x.shape", tuple(x.shape), "at least one dim")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise _bad("block", block, "an int >= 1")
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    if x.numel() == 0:
        return out
    M = x.numel() // n
    nblk = triton.cdiv(n, block)
    total = M * nblk
    cfg = _cfg("fp8_act_sim", f"B{block}-{_bucket(M)}", FP8_DEFAULT, config, x.device)
    groups = int(cfg["GROUPS"])
    _fp8_sim_kernel[(triton.cdiv(total, groups),)](
        x, out, n, nblk, total, block, GROUPS=groups, BP=triton.next_power_of_2(block),
        num_warps=int(cfg["num_warps"]))
    return out


# ---- compressor pooling --------------------------------------------------------------------------
@triton.jit
def _pool_kernel(kv_ptr, g_ptr, out_ptr, S, C, SP: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.arange(0, SP)
    cm = c < C
    m = (s < S)[:, None] & cm[None, :]
    off = row * S * C + s[:, None] * C + c[None, :]
    g = tl.load(g_ptr + off, mask=m, other=float("-inf")).to(tl.float32)
    kv = tl.load(kv_ptr + off, mask=m, other=0.0).to(tl.float32)
    # An all -inf channel gives max -inf, exp(nan) and a NaN output, like the twin's softmax;
    # channels past C (masked) take max 0 and sum 1 so that no lane computes inf - inf or 0 / 0.
    e = tl.exp(g - tl.where(cm, tl.max(g, axis=0), 0.0)[None, :])
    p = e / tl.where(cm, tl.sum(e, axis=0), 1.0)[None, :]
    tl.store(out_ptr + row * C + c, tl.sum(kv * p, axis=0), mask=cm)


POOL_DEFAULT = dict(BLOCK_C=128, num_warps=4)


def compress_pool(kv: torch.Tensor, gate: torch.Tensor, *, config: dict | None = None) -> torch.Tensor:
    kv, gate = _float_tensor("kv", kv), _float_tensor("gate", gate)
    if kv.dim() < 2:
        raise _bad("kv.shape", tuple(kv.shape), "[..., slots, C]")
    if gate.shape != kv.shape:
        raise _bad("gate.shape", tuple(gate.shape), f"kv's shape {tuple(kv.shape)}")
    if gate.device != kv.device:
        raise _bad("gate.device", gate.device, f"{kv.device} (kv's device)")
    S, C = kv.shape[-2:]
    if S == 0:
        raise _bad("kv.shape", tuple(kv.shape), "at least one slot")
    kv, gate = kv.contiguous(), gate.contiguous()
    out = torch.empty(kv.shape[:-2] + (C,), device=kv.device, dtype=torch.float32)
    M = out.numel() // C if C else 0
    if M == 0:
        return out
    cfg = _cfg("compress_pool", f"S{S}-C{C}", POOL_DEFAULT, config, kv.device)
    sp = triton.next_power_of_2(S)
    # keep the [S, BLOCK_C] tile at <= 8K fp32 values a tensor (HCA: 128 slots -> 64 channels)
    block_c = max(1, min(int(cfg["BLOCK_C"]), triton.next_power_of_2(C), 8192 // sp))
    _pool_kernel[(M, triton.cdiv(C, block_c))](kv, gate, out, S, C, SP=sp, BLOCK_C=block_c,
                                               num_warps=int(cfg["num_warps"]))
    return out


# ---- rotary embedding ----------------------------------------------------------------------------
@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, R, H, Dh, NOPE, HALF, INVERSE: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_NOPE: tl.constexpr, BLOCK_HALF: tl.constexpr, RNE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rm = rows < R
    base = rows * Dh
    for start in range(0, NOPE, BLOCK_NOPE):  # the nope dims: a copy
        c = start + tl.arange(0, BLOCK_NOPE)
        m = rm[:, None] & (c < NOPE)[None, :]
        tl.store(out_ptr + base[:, None] + c[None, :], tl.load(x_ptr + base[:, None] + c[None, :], mask=m), mask=m)
    i = tl.arange(0, BLOCK_HALF)
    m = rm[:, None] & (i < HALF)[None, :]
    pair = base[:, None] + NOPE + 2 * i[None, :]
    re = tl.load(x_ptr + pair, mask=m, other=0.0).to(tl.float32)
    im = tl.load(x_ptr + pair + 1, mask=m, other=0.0).to(tl.float32)
    cs = (rows // H)[:, None] * HALF + i[None, :]
    co = tl.load(cos_ptr + cs, mask=m, other=0.0)
    si = tl.load(sin_ptr + cs, mask=m, other=0.0)
    if INVERSE:
        si = -si
    dt = out_ptr.dtype.element_ty
    tl.store(out_ptr + pair, cast_out(re * co - im * si, dt, RNE), mask=m)
    tl.store(out_ptr + pair + 1, cast_out(re * si + im * co, dt, RNE), mask=m)


ROPE_DEFAULT = dict(ROWS=4, num_warps=4)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False, *,
               config: dict | None = None) -> torch.Tensor:
    """Twin: ref.apply_rope. x [..., Dh] with cos/sin [..., rd/2] on the same leading dims, or
    x [N, H, Dh] with cos/sin [N, 1, rd/2]; other broadcasts go to the twin."""
    x = _float_tensor("x", x)
    half = cos.shape[-1] if cos.dim() else 0
    if cos.shape[:-1] == x.shape[:-1]:
        N, H = (x.numel() // x.shape[-1] if x.shape[-1] else 0), 1
    elif x.dim() == 3 and tuple(cos.shape) == (x.shape[0], 1, half):
        N, H = x.shape[0], x.shape[1]
    else:
        from dayzero.ops import ref
        return ref.apply_rope(x, cos, sin, inverse)
    if sin.shape != cos.shape or 2 * half > x.shape[-1]:
        raise _bad("cos/sin.shape", (tuple(cos.shape), tuple(sin.shape)), f"equal, last dim <= {x.shape[-1] // 2}")
    x = x.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    out = torch.empty_like(x)
    R = N * H
    if R == 0:
        return out
    Dh = x.shape[-1]
    cfg = _cfg("apply_rope", f"D{Dh}-{_bucket(R)}", ROPE_DEFAULT, config, x.device)
    rows = int(cfg["ROWS"])
    nope = Dh - 2 * half
    _rope_kernel[(triton.cdiv(R, rows),)](
        x, cos, sin, out, R, H, Dh, nope, half, INVERSE=bool(inverse), ROWS=rows,
        BLOCK_NOPE=min(max(triton.next_power_of_2(nope), 16), 512), BLOCK_HALF=max(triton.next_power_of_2(half), 16),
        RNE=rne_bf16(out), num_warps=int(cfg["num_warps"]))
    return out


# ---- tuning --------------------------------------------------------------------------------------
def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rms_cases(device: torch.device):
    gpu = device.type == "cuda"
    shapes = [(64, 4096), (4096, 4096), (64 * 64, 512), (256, 1024)] if gpu else [(3, 48), (2, 130)]
    dt = torch.bfloat16 if gpu else torch.float32
    out = []
    for m, c in shapes:
        x = torch.randn(m, c, generator=_gen()).to(device, dt)
        w = torch.randn(c, generator=_gen(1)).to(device, dt)
        out.append((f"C{c}", lambda cfg, x=x, w=w: rms_norm(x, w, 1e-6, config=cfg)))
    return out


def _fp8_cases(device: torch.device):
    gpu = device.type == "cuda"
    shapes = [(64, 4096, 128), (4096, 4096, 128), (4096, 448, 64)] if gpu else [(3, 100, 32)]
    dt = torch.bfloat16 if gpu else torch.float32
    out = []
    for m, n, b in shapes:
        x = torch.randn(m, n, generator=_gen()).to(device, dt)
        out.append((f"B{b}-{_bucket(m)}", lambda cfg, x=x, b=b: fp8_act_sim(x, b, config=cfg)))
    return out


def _pool_cases(device: torch.device):
    gpu = device.type == "cuda"
    shapes = [(512, 8, 512), (32, 128, 512), (512, 8, 128)] if gpu else [(3, 8, 40)]
    out = []
    for m, s, c in shapes:
        kv = torch.randn(m, s, c, generator=_gen()).to(device)
        gate = torch.randn(m, s, c, generator=_gen(1)).to(device)
        out.append((f"S{s}-C{c}", lambda cfg, kv=kv, g=gate: compress_pool(kv, g, config=cfg)))
    return out


def _rope_cases(device: torch.device):
    gpu = device.type == "cuda"
    shapes = [(1, 64, 512), (4096, 64, 512), (4096, 1, 512)] if gpu else [(3, 4, 40)]
    dt = torch.bfloat16 if gpu else torch.float32
    out = []
    for n, h, d in shapes:
        x = torch.randn(n, h, d, generator=_gen()).to(device, dt)
        ang = torch.randn(n, 1, 32 if gpu else 8, generator=_gen(1)).to(device)
        out.append((f"D{d}-{_bucket(n * h)}", lambda cfg, x=x, a=ang: apply_rope(x, a.cos(), a.sin(), config=cfg)))
    return out


TUNABLES = {
    "apply_rope": tuning.Tunable(space=(
        ROPE_DEFAULT,
        dict(ROWS=1, num_warps=1),
        dict(ROWS=16, num_warps=4),
        dict(ROWS=64, num_warps=8),
    ), cases=_rope_cases),
    "rms_norm": tuning.Tunable(space=(
        RMS_DEFAULT,
        dict(ROWS=1, MAX_C=8192, num_warps=4),
        dict(ROWS=4, MAX_C=8192, num_warps=4),
        dict(ROWS=8, MAX_C=8192, num_warps=8),
        dict(ROWS=2, MAX_C=1024, num_warps=4),
        dict(ROWS=16, MAX_C=512, num_warps=4),
    ), cases=_rms_cases),
    "fp8_act_sim": tuning.Tunable(space=(
        FP8_DEFAULT,
        dict(GROUPS=4, num_warps=2),
        dict(GROUPS=16, num_warps=4),
        dict(GROUPS=32, num_warps=8),
        dict(GROUPS=1, num_warps=1),
    ), cases=_fp8_cases),
    "compress_pool": tuning.Tunable(space=(
        POOL_DEFAULT,
        dict(BLOCK_C=64, num_warps=2),
        dict(BLOCK_C=256, num_warps=4),
        dict(BLOCK_C=512, num_warps=8),
        dict(BLOCK_C=32, num_warps=1),
    ), cases=_pool_cases),
}
