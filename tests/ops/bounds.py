"""Error bounds shared by the GEMM / MoE parity tests (tests/ops/test_cpu_gemm.py,
test_triton_gemm.py): derived from the arithmetic, see test_triton_gemm.py's docstring."""
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
