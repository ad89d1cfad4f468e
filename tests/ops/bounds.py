"""Helpers shared by the CPU and Triton parity tests: GEMM / MoE error bounds derived from the
arithmetic (see test_triton_gemm.py's docstring) and the FP8 activation-simulation references
and inputs (test_cpu_mhc.py, test_triton_norm.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dayzero.ops import ref

U = 2.0 ** -24
FLIP = {torch.float32: 2.0 ** -22, torch.bfloat16: 2.0 ** -7}  # one rounding flip, relative (fp32: exp/div ulps)


def sim_spread(h, r):
    """How far ref.fp8_act_sim can move h [1, n] when each h_i may be off by up to r_i: 0 where
    h_i +- r_i rounds to the same e4m3 value under an unchanged block scale (the usual case)."""
    n = h.shape[-1]
    hp, rp = (F.pad(t, (0, -n % 128)).view(-1, 128) for t in (h, r))
    amax, ramax = hp.abs().amax(-1, keepdim=True), rp.amax(-1, keepdim=True)

    def scale(a):
        return torch.exp2(torch.ceil(torch.log2(a.clamp(min=1e-4) / 448)))

    def q(v, sc):
        return (v / sc).float().to(torch.float8_e4m3fn).double() * sc

    sc, s_lo, s_hi = scale(amax), scale((amax - ramax).clamp(min=0)), scale(amax + ramax)
    base = q(hp, sc)
    spread = torch.maximum(q(hp + rp, sc) - base, base - q(hp - rp, sc))
    moved = rp + 2.0 ** -3 * (hp.abs() + rp) + 2.0 ** -9 * s_hi
    return torch.where(s_lo == s_hi, spread, moved).flatten()[:n].view(1, n), base.flatten()[:n].view(1, n)


def moe_bound(x, wts, ids, w1, s1, w3, s3, w2, s2, limit, want, h_act_sim=False):
    dt, flip = x.dtype, FLIP[x.dtype]
    dim, inter = x.shape[1], w1.shape[1]
    bound = torch.zeros(want.shape, dtype=torch.float64, device=want.device)
    deq = {e: [ref.fp4_dequant(a, b).to(dt).double() for a, b in ((w1[e], s1[e]), (w3[e], s3[e]), (w2[e], s2[e]))]
           for e in ids.unique().tolist()}
    for n in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e, xr, rw = int(ids[n, j]), x[n:n + 1], float(wts[n, j])
            W1, W3, W2 = deq[e]
            ax = xr.abs().double()
            g, u = ref.fp4_linear(xr, w1[e], s1[e]).double(), ref.fp4_linear(xr, w3[e], s3[e]).double()
            dg = flip * g.abs() + 4 * dim * U * (ax @ W1.abs().T)
            du = flip * u.abs() + 4 * dim * U * (ax @ W3.abs().T)
            h = (ref.swiglu(g, u, limit).double() * rw).to(dt).double()  # the twin's h, in x.dtype
            gc = g.clamp(max=limit) if limit > 0 else g
            dh = 2 * (rw * (1.1 * dg * u.abs() + F.silu(gc).abs() * du) + flip * h.abs())
            if h_act_sim:
                dh, h = sim_spread(h, dh)
            dout = dh @ W2.abs().T + 4 * inter * U * (h.abs() @ W2.abs().T) + flip * (h @ W2.T).abs()
            bound[n] += 2 * dout[0]
    return (bound + 8 * ids.shape[1] * U * want.double().abs() + 1e-30).float()


def exact_fp8_sim(x: torch.Tensor, block: int) -> torch.Tensor:
    """The documented semantics computed exactly: scale = smallest 2^k with amax / 2^k <= 448."""
    n = x.shape[-1]
    xb = torch.nn.functional.pad(x.double(), (0, (-n) % block)).unflatten(-1, (-1, block))
    amax = xb.abs().amax(-1, keepdim=True).clamp(min=torch.tensor(1e-4, dtype=torch.float32).item())
    m, e = torch.frexp(amax / 448)  # amax / 448 = m 2^e, m in [0.5, 1): exact in float64
    scale = torch.ldexp(torch.ones_like(m), torch.where(m == 0.5, e - 1, e))
    q = (xb / scale).float().to(torch.float8_e4m3fn).double() * scale
    return q.flatten(-2)[..., :n].to(x.dtype)


def fp8_data(shape, dtype, seed=0):
    """Random magnitudes over 2^-30..2^12, some blocks with values just below their amax, tiny
    values (below the e4m3 subnormal range after scaling) and exact zeros / negative zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.exp2(torch.randint(-30, 12, shape, generator=g).float())
    flat = x.view(-1)
    k = flat.numel()
    flat[torch.randint(0, k, (max(1, k // 20),), generator=g)] = 0.0
    flat[torch.randint(0, k, (max(1, k // 20),), generator=g)] = -0.0
    near = torch.randint(0, k, (max(1, k // 10),), generator=g)
    flat[near] = flat.abs().max() * (1 - torch.rand(near.numel(), generator=g) * 2 ** -10)
    flat[torch.randint(0, k, (max(1, k // 10),), generator=g)] *= 2 ** -20
    return x.to(dtype)


# ---- shared by the CPU GEMM parity tests (test_cpu_gemm.py, test_cpu_gemm_rows.py) ---------------
def within(got, want, bound, what):
    """Every element of got within bound of want (same shape and dtype), naming the worst miss."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    err = (got.float() - want.float()).abs()
    bad = ~(err <= bound)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.numel()} outside the bound, worst "
                           f"err {err[bad].max().item():.3g} vs bound {bound[bad].min().item():.3g}")


def lin_bound(x, w_deq, want):
    """Error bound of x @ w_deq^T (w_deq already rounded to x.dtype) vs the twin's output."""
    absdot = x.abs().double() @ w_deq.abs().double().T
    delta = 2 * max(x.shape[1], 1) * U * absdot + 1e-30
    flip = FLIP[x.dtype] if x.dtype != torch.float32 else 0.0
    return (flip * want.double().abs() + 2 * delta).float()


def rand_x(M, K, dt, seed, spread=1.0):
    gen = torch.Generator().manual_seed(seed + 100)
    return (torch.randn(M, K, generator=gen) * spread).to(dt)


def fp8_weights(O, K, sdt, seed):
    from dayzero.loader.formats import quant_fp8_block
    gen = torch.Generator().manual_seed(seed)
    return quant_fp8_block(torch.randn(O, K, generator=gen) * 0.05, scale_dtype=sdt)


def fp8_dequant(w, s, dt):
    return ref.fp8_linear(torch.eye(w.shape[1]), w, s).T.to(dt)  # fp32 eye: exact


def fp4_weights(O, K, seed):
    from dayzero.loader.formats import quant_fp4
    gen = torch.Generator().manual_seed(seed)
    return quant_fp4(torch.randn(O, K, generator=gen) * torch.rand(O, 1, generator=gen))


def native_build(module, march, flag, monkeypatch, tmp_path):
    """`module`.c built for -march=`march` in a private build cache and loaded (a ctypes CDLL);
    skips off x86-64 and where the CPU lacks `flag` (None: any x86-64 CPU)."""
    import ctypes
    import os

    import pytest

    from dayzero.ops.cpu import build
    if os.uname().machine not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    if flag:
        with open("/proc/cpuinfo") as f:
            if flag not in f.read().split():
                pytest.skip(f"no {flag} here")
    monkeypatch.setenv("DAYZERO_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DAYZERO_CPU_MARCH", march)
    return ctypes.CDLL(str(build.build(module)))


def per_threads(fn, counts=(1, 2)):
    """fn() run with each torch thread count (the native kernels' teams follow it), restored after."""
    before = torch.get_num_threads()
    try:
        outs = []
        for nt in counts:
            torch.set_num_threads(nt)
            outs.append(fn())
        return outs
    finally:
        torch.set_num_threads(before)


def scalar_build_runs(module, code, tmp_path):
    """Run `code` in a fresh interpreter whose native kernels are built for plain x86-64
    (DAYZERO_CPU_MARCH, the C fallbacks) in a private cache; asserts it succeeds and that
    `module`.c was built there. x86-64 hosts only (callers skip elsewhere)."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "DAYZERO_CPU_MARCH": "x86-64", "DAYZERO_CACHE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert any(p.name.startswith(f"libdayzero_{module}-") for p in (tmp_path / "cpu").iterdir())
    return r.stdout
