"""mHC site kernels (twins: ops/ref.py hc_mixes + hc_split_sinkhorn + hc_collapse = hc_pre, hc_post).

Streams x [N, n, d] (V4: n = 4, d = 4096, bf16: 32 KiB a token, row-major: token, stream, dim);
fn [(2+n)n, n*d] fp32 (V4: 24 x 16384 = 1.5 MiB). K = n*d, R = (2+n)n, RP = next_pow2(R) >= 16.

hc_pre = two launches (the collapse needs pre, which needs the full-K reduction of the token, so
one pass over x cannot do both without a grid-wide barrier):
 1. _mix_kernel: one program = BLOCK_N tokens x K-slabs of K_PER values each. It reads x in
    [BLOCK_N, BLOCK_K] tiles and the matching fn columns [BLOCK_K, RP] once, accumulates the
    projection with tl.dot and the sum of squares of the same x tile (the RMS statistic rides
    along, so this kernel reads x exactly once). The twin is an fp32 GEMM and TF32 would move
    the mixes by ~1e-3, so: bf16 x (V4) is exact in bf16 and fn is split in registers into three
    bf16 pieces, three tensor-core dots with fp32 accumulation; other dtypes use fp32 operands
    in IEEE precision (the FMA path). K is cut into S slabs so that one token tile makes about
    WAVES x SMs programs (decode: fn dominates the bytes and is spread over up to K/BLOCK_K =
    256 programs, each reading 6 KiB of it). Each slab is accumulated on its own and the slabs
    are added in order, 0 + p0 + p1 + ...: with few token tiles (decode) grid (tiles, S), one
    slab a program, fp32 partials [S, N, RP] and [S, N]; with many (prefill) grid (tiles, 1),
    the program loops over the S slabs and writes their sum (fn, L2-resident, is re-read once
    per BLOCK_N tokens).
    Batch invariance (issue 20): BLOCK_N, BLOCK_K, S and the warps come from (n, d) and the
    device only, never N (the tuning key has no token bucket), so a token's sums have one order
    whatever the other tokens; BLOCK_N is 16 (decode's tile) for every N by default, where
    prefill had 64-token tiles before: expected slower prefill mixes (fn re-read per 16
    tokens), not measured (no GPU was lent).
 2. _finish_kernel, grid (N, cdiv(d, BLOCK_D)): adds the partials one after the other in slab
    order (no atomics: deterministic; the same additions as the looping program), applies the
    RMS factor, sigmoid/softmax and the Sinkhorn iterations
    to the n x n matrix in registers (padded to NP = next_pow2(n) with masks), then collapses its
    BLOCK_D columns: u = sum_j pre_j x_j, reading x a second time (L2 at decode). Each d-chunk
    program recomputes the tiny Sinkhorn rather than paying a third launch; chunk 0 stores post
    and comb.
hc_post: grid (N, cdiv(d, BLOCK_D)); one program reads y and the n stream rows of its columns
once and writes the n new rows: X'_k = post_k y + sum_j comb[j, k] X_j, fp32 in registers.
Under TRITON_INTERPRET=1, DOT_F32 feeds the same bf16 pieces to the dots as fp32 (the
interpreter's 16-bit dot is wrong) and bf16 outputs round through norm.cast_out.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dayzero.ops.triton import tuning
from dayzero.ops.triton.norm import cast_out, rne_bf16

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _bad(name: str, value, want: str) -> ValueError:
    return ValueError(f"{name}: expected {want}, got {value}")


def _tensor(name: str, t, shape: tuple, dev: torch.device | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise _bad(name, type(t).__name__, "a torch.Tensor")
    if t.dtype not in _FLOATS:
        raise _bad(f"{name}.dtype", t.dtype, "float32, bfloat16 or float16")
    if tuple(t.shape) != shape:
        raise _bad(f"{name}.shape", tuple(t.shape), str(shape))
    if dev is not None and t.device != dev:
        raise _bad(f"{name}.device", t.device, str(dev))
    return t


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter


def _tok_bucket(n: int) -> str:
    return "dec" if n <= 64 else "pre"


def _cfg(name: str, key: str, default: dict, config: dict | None, dev: torch.device) -> dict:
    return {**default, **(config if config is not None else tuning.config(name, key, default, dev))}


# ---- hc_pre ------------------------------------------------------------------------------------
@triton.jit
def _mix_kernel(x_ptr, fn_ptr, part_ptr, ss_ptr, N, K, R, K_PER, SPLITS, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, RP: tl.constexpr, SPLIT3: tl.constexpr, DOT_F32: tl.constexpr):
    """Partials [program_id(1), N, RP] and [program_id(1), N]: the sums, in order, of this
    program's SPLITS K ranges of K_PER values, each range accumulated on its own."""
    pid_s = tl.program_id(1)
    tok = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tm = tok < N
    xrow = x_ptr + tok.to(tl.int64)[:, None] * K
    r = tl.arange(0, RP)
    rm = r < R
    kk = tl.arange(0, BLOCK_K)
    acc_t = tl.zeros([BLOCK_N, RP], tl.float32)
    ss_t = tl.zeros([BLOCK_N], tl.float32)
    for sp in range(pid_s * SPLITS, (pid_s + 1) * SPLITS):
        acc = tl.zeros([BLOCK_N, RP], tl.float32)
        ss = tl.zeros([BLOCK_N], tl.float32)
        k_lo = sp * K_PER
        k_hi = tl.minimum(k_lo + K_PER, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + kk
            km = k < k_hi
            xv = tl.load(xrow + k[None, :], mask=tm[:, None] & km[None, :], other=0.0)
            xt = xv.to(tl.float32)
            ft = tl.load(fn_ptr + r[None, :] * K + k[:, None], mask=rm[None, :] & km[:, None], other=0.0)
            if SPLIT3:
                # bf16 x: fn = hi + mid + lo in bf16 (each residual exact in fp32, the remainder
                # ~2^-24 |fn|); three bf16 tensor-core dots with exact products and fp32 accumulation
                # give the fp32 GEMM's accuracy without the fp32 FMA path.
                hi = ft.to(tl.bfloat16)
                r1 = ft - hi.to(tl.float32)
                mid = r1.to(tl.bfloat16)
                lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
                if DOT_F32:  # the interpreter's 16-bit dot is wrong: same pieces, fp32 operands
                    acc = tl.dot(xt, hi.to(tl.float32), acc, input_precision="ieee")
                    acc = tl.dot(xt, mid.to(tl.float32), acc, input_precision="ieee")
                    acc = tl.dot(xt, lo.to(tl.float32), acc, input_precision="ieee")
                else:
                    xb = xv.to(tl.bfloat16)
                    acc = tl.dot(xb, hi, acc)
                    acc = tl.dot(xb, mid, acc)
                    acc = tl.dot(xb, lo, acc)
            else:
                acc = tl.dot(xt, ft, acc, input_precision="ieee")
            ss += tl.sum(xt * xt, axis=1)
        acc_t += acc
        ss_t += ss
    prow = pid_s * N + tok
    tl.store(part_ptr + prow.to(tl.int64)[:, None] * RP + r[None, :], acc_t, mask=tm[:, None])
    tl.store(ss_ptr + prow, ss_t, mask=tm)


@triton.jit
def _finish_kernel(x_ptr, part_ptr, ss_ptr, scale_ptr, base_ptr, u_ptr, post_ptr, comb_ptr,
                   N, D, K, SPLIT, iters, norm_eps, hc_eps,
                   HC: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr, BLOCK_D: tl.constexpr,
                   RNE: tl.constexpr):
    t = tl.program_id(0)
    pid_d = tl.program_id(1)
    i = tl.arange(0, NP)
    im = i < HC
    m2 = im[:, None] & im[None, :]
    cidx = 2 * HC + i[:, None] * HC + i[None, :]  # comb[j, k] at mixes[2n + j*n + k]
    # the SPLIT partials added one after the other in split order, 0 + p0 + p1 + ...: the same
    # additions as a _mix_kernel program that loops over the splits itself (batch invariance)
    a_pre = tl.zeros([NP], tl.float32)
    a_post = tl.zeros([NP], tl.float32)
    a_comb = tl.zeros([NP, NP], tl.float32)
    ss = tl.sum(tl.zeros([NP], tl.float32), axis=0)
    row = part_ptr + t.to(tl.int64) * RP
    for s in range(SPLIT):
        a_pre += tl.load(row + i, mask=im, other=0.0)
        a_post += tl.load(row + HC + i, mask=im, other=0.0)
        a_comb += tl.load(row + cidx, mask=m2, other=0.0)
        ss += tl.load(ss_ptr + s * N + t)
        row += N * RP
    rs = 1.0 / tl.sqrt(ss / K + norm_eps)
    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    z = a_pre * rs * s0 + tl.load(base_ptr + i, mask=im, other=0.0)
    pre = 1.0 / (1.0 + tl.exp(-z)) + hc_eps
    z = a_post * rs * s1 + tl.load(base_ptr + HC + i, mask=im, other=0.0)
    post = 2.0 / (1.0 + tl.exp(-z))
    z = a_comb * rs * s2 + tl.load(base_ptr + cidx, mask=m2, other=0.0)
    # row softmax + eps over the real n x n block; padding is held at exactly 0 from here on, so
    # it adds nothing to any row or column sum (0 / (0 + eps) stays 0). Padded rows get max 0
    # and sum 1 so that no lane computes inf - inf or 0 / 0.
    z = tl.where(m2, z, float("-inf"))
    e = tl.exp(z - tl.where(im, tl.max(z, axis=1), 0.0)[:, None])
    c = tl.where(m2, e / tl.where(im, tl.sum(e, axis=1), 1.0)[:, None] + hc_eps, 0.0)
    c = c / (tl.sum(c, axis=0)[None, :] + hc_eps)
    for _ in range(1, iters):
        c = c / (tl.sum(c, axis=1)[:, None] + hc_eps)
        c = c / (tl.sum(c, axis=0)[None, :] + hc_eps)
    lim = tl.where(pid_d == 0, HC, 0)  # only chunk 0 stores post and comb
    tl.store(post_ptr + t * HC + i, post, mask=i < lim)
    tl.store(comb_ptr + t * HC * HC + i[:, None] * HC + i[None, :], c, mask=(i < lim)[:, None] & im[None, :])
    # collapse: streams added in order j = 0..n-1, as the twin's sum over the stream dim
    offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = offs < D
    xrow = x_ptr + t.to(tl.int64) * HC * D
    u = tl.zeros([BLOCK_D], tl.float32)
    for j in tl.static_range(HC):
        pj = tl.sum(tl.where(i == j, pre, 0.0), axis=0)
        u += pj * tl.load(xrow + j * D + offs, mask=dm, other=0.0).to(tl.float32)
    tl.store(u_ptr + t.to(tl.int64) * D + offs, cast_out(u, u_ptr.dtype.element_ty, RNE), mask=dm)


# BLOCK_N 16 (decode's tile) for every token count: see the module docstring
PRE_DEFAULT = dict(BLOCK_N=16, BLOCK_K=64, WAVES=2, mix_warps=8, mix_stages=3, BLOCK_D=512, num_warps=4)


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
           norm_eps: float, hc_eps: float, *, config: dict | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise _bad("x.shape", tuple(getattr(x, "shape", ())), "[N, n, d]")
    N, n, d = x.shape
    if not 1 <= n <= 8:
        raise _bad("x.shape[1] (hc_mult)", n, "1..8")
    if d < 1:
        raise _bad("x.shape[2]", d, ">= 1")
    dev = x.device
    x = _tensor("x", x, (N, n, d)).contiguous()
    R, K = (2 + n) * n, n * d
    fn = _tensor("fn", fn, (R, K), dev).float().contiguous()
    scale = _tensor("scale", scale, (3,), dev).float().contiguous()
    base = _tensor("base", base, (R,), dev).float().contiguous()
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise _bad("iters", iters, "an int >= 0")
    u = torch.empty(N, d, device=dev, dtype=x.dtype)
    post = torch.empty(N, n, device=dev, dtype=torch.float32)
    comb = torch.empty(N, n, n, device=dev, dtype=torch.float32)
    if N == 0:
        return u, post, comb
    # batch invariance: the token tile and the K splits (the order of a token's sums) come from
    # the shape (n, d) and the device, never N; only whether the splits run in separate programs
    # (few token tiles: decode) or in a loop inside one (prefill) depends on N: the same bits
    cfg = _cfg("hc_pre", f"n{n}-d{d}", PRE_DEFAULT, config, dev)
    block_n = int(cfg["BLOCK_N"])
    block_k = int(cfg["BLOCK_K"])
    rp = max(16, triton.next_power_of_2(R))
    tiles, kblocks = triton.cdiv(N, block_n), triton.cdiv(K, block_k)
    waves = int(cfg["WAVES"]) * _sm_count(dev)
    per = triton.cdiv(kblocks, max(1, min(kblocks, waves)))  # K-blocks a split (as for one tile)
    splits = triton.cdiv(kblocks, per)
    wide = cfg.get("SPREAD") if cfg.get("SPREAD") is not None else tiles < waves
    split = splits if wide else 1  # partials written
    part = torch.empty(split, N, rp, device=dev, dtype=torch.float32)
    ss = torch.empty(split, N, device=dev, dtype=torch.float32)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    _mix_kernel[(tiles, split)](x, fn, part, ss, N, K, R, per * block_k, 1 if wide else splits, BLOCK_N=block_n,
                                BLOCK_K=block_k, RP=rp, SPLIT3=x.dtype == torch.bfloat16, DOT_F32=interp,
                                num_warps=int(cfg["mix_warps"]), num_stages=int(cfg["mix_stages"]))
    block_d = min(int(cfg["BLOCK_D"]), triton.next_power_of_2(d))
    _finish_kernel[(N, triton.cdiv(d, block_d))](
        x, part, ss, scale, base, u, post, comb, N, d, K, split, iters, float(norm_eps), float(hc_eps),
        HC=n, NP=max(2, triton.next_power_of_2(n)), RP=rp, BLOCK_D=block_d, RNE=rne_bf16(u),
        num_warps=int(cfg["num_warps"]))
    return u, post, comb


# ---- hc_post -----------------------------------------------------------------------------------
@triton.jit
def _post_kernel(y_ptr, x_ptr, post_ptr, comb_ptr, out_ptr, D,
                 HC: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, RNE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = offs < D
    k = tl.arange(0, NP)
    km = k < HC
    y = tl.load(y_ptr + t * D + offs, mask=dm, other=0.0).to(tl.float32)
    mixed = tl.zeros([NP, BLOCK_D], tl.float32)
    for j in tl.static_range(HC):  # stream j feeds every output k with weight comb[j, k]
        cj = tl.load(comb_ptr + (t * HC + j) * HC + k, mask=km, other=0.0).to(tl.float32)
        xj = tl.load(x_ptr + (t * HC + j) * D + offs, mask=dm, other=0.0).to(tl.float32)
        mixed += cj[:, None] * xj[None, :]
    pk = tl.load(post_ptr + t * HC + k, mask=km, other=0.0).to(tl.float32)
    out = pk[:, None] * y[None, :] + mixed
    tl.store(out_ptr + (t * HC + k)[:, None] * D + offs[None, :], cast_out(out, out_ptr.dtype.element_ty, RNE),
             mask=km[:, None] & dm[None, :])


POST_DEFAULT = dict(BLOCK_D=512, num_warps=4)


def hc_post(y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, *,
            config: dict | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise _bad("x.shape", tuple(getattr(x, "shape", ())), "[N, n, d]")
    N, n, d = x.shape
    if not 1 <= n <= 8:
        raise _bad("x.shape[1] (hc_mult)", n, "1..8")
    dev = x.device
    x = _tensor("x", x, (N, n, d)).contiguous()
    y = _tensor("y", y, (N, d), dev).contiguous()
    post = _tensor("post", post, (N, n), dev).contiguous()
    comb = _tensor("comb", comb, (N, n, n), dev).contiguous()
    out = torch.empty(N, n, d, device=dev, dtype=y.dtype)
    if N == 0 or d == 0:
        return out
    cfg = _cfg("hc_post", f"n{n}-d{d}-{_tok_bucket(N)}", POST_DEFAULT, config, dev)
    block_d = min(int(cfg["BLOCK_D"]), triton.next_power_of_2(d))
    _post_kernel[(N, triton.cdiv(d, block_d))](y, x, post, comb, out, d, HC=n, NP=max(2, triton.next_power_of_2(n)),
                                               BLOCK_D=block_d, RNE=rne_bf16(out), num_warps=int(cfg["num_warps"]))
    return out


# ---- tuning ------------------------------------------------------------------------------------
def _inputs(N: int, n: int, d: int, device: torch.device, dt: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    R = (2 + n) * n
    x = torch.randn(N, n, d, generator=g).to(device, dt)
    fn = (torch.randn(R, n * d, generator=g) * (n * d) ** -0.5).to(device)
    scale = torch.rand(3, generator=g).to(device) + 0.5
    base = torch.randn(R, generator=g).to(device)
    return x, fn, scale, base


def _pre_cases(device: torch.device):
    gpu = device.type == "cuda"
    shapes = [(16, 4, 4096), (2048, 4, 4096)] if gpu else [(3, 4, 48)]
    dt = torch.bfloat16 if gpu else torch.float32
    out = []
    for N, n, d in shapes:
        x, fn, scale, base = _inputs(N, n, d, device, dt)
        out.append((f"n{n}-d{d}", lambda cfg, a=(x, fn, scale, base):
                    hc_pre(*a, 20, 1e-6, 1e-6, config=cfg)))
    return out


def _post_cases(device: torch.device):
    gpu = device.type == "cuda"
    shapes = [(16, 4, 4096), (2048, 4, 4096)] if gpu else [(3, 4, 48)]
    dt = torch.bfloat16 if gpu else torch.float32
    out = []
    for N, n, d in shapes:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(N, n, d, generator=g).to(device, dt)
        y = torch.randn(N, d, generator=g).to(device, dt)
        post = torch.rand(N, n, generator=g).to(device) * 2
        comb = torch.rand(N, n, n, generator=g).to(device)
        out.append((f"n{n}-d{d}-{_tok_bucket(N)}", lambda cfg, a=(y, x, post, comb): hc_post(*a, config=cfg)))
    return out


TUNABLES = {
    "hc_pre": tuning.Tunable(space=(  # sm_90 AOT (scripts/aot_compile.py): 8-16 B spills at N=1 in some
        PRE_DEFAULT,  # configs, the default included: small; the tuner measures whether they matter
        dict(BLOCK_N=16, BLOCK_K=64, WAVES=2, mix_warps=4, mix_stages=3, BLOCK_D=512, num_warps=4),
        dict(BLOCK_N=16, BLOCK_K=128, WAVES=1, mix_warps=8, mix_stages=3, BLOCK_D=1024, num_warps=4),
        dict(BLOCK_N=16, BLOCK_K=64, WAVES=4, mix_warps=2, mix_stages=4, BLOCK_D=256, num_warps=2),
        dict(BLOCK_N=64, BLOCK_K=32, WAVES=2, mix_warps=4, mix_stages=4, BLOCK_D=2048, num_warps=8),
        dict(BLOCK_N=64, BLOCK_K=64, WAVES=8, mix_warps=8, mix_stages=2, BLOCK_D=1024, num_warps=8),
    ), cases=_pre_cases),
    "hc_post": tuning.Tunable(space=(
        POST_DEFAULT,
        dict(BLOCK_D=256, num_warps=2),
        dict(BLOCK_D=1024, num_warps=4),
        dict(BLOCK_D=1024, num_warps=8),
        dict(BLOCK_D=2048, num_warps=8),
    ), cases=_post_cases),
}
