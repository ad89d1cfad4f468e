"""Parity of the Triton fp32 linear (ops/triton/dense.py fp32_linear: LM head, MoE routers,
compressor projections) with its twin ref.fp32_linear.

Runs on the GPU when there is one, else on the Triton interpreter (tests/conftest.py). The bound
is derived from the arithmetic, not a fixed tolerance: x and w (fp32, bf16 or fp16) are upcast
exactly on both sides and every product and sum is fp32, so the two sides differ only in the order
(and fusing) of the fp32 operations. Any order of summing K products, split-K partials included,
is within gamma_K * |x|.|w| of the exact dot product (gamma_K = K*u / (1 - K*u), u = 2^-24,
|x|.|w| the sum of absolute products: each product and each partial sum is rounded at most once on
its way to the result, through at most K operations), so the kernel and the twin are at most
2*gamma_K*|x|.|w| apart. TF32 (10-bit inputs) would be ~2^-11 relative per product: far outside
(test_bound_rejects_tf32 checks that the bound is that tight on these shapes).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton has no wheel for this platform (test extras install it on Linux x86-64)")

from dayzero.ops import ref
from dayzero.ops.triton import dense as G

DEV = "cuda" if torch.cuda.is_available() else "cpu"
U = 2.0 ** -24
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
SPACE = G.TUNABLES["fp32_linear"].space


def _t(*shape, dt, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV, dt)


def _bound(x, w):
    """2*gamma_K*|x|.|w| per output (float64; x [..., K], w [O, K])."""
    K = x.shape[-1]
    gamma = K * U / (1 - K * U)
    return 2 * gamma * (x.double().abs() @ w.double().abs().T)


def _check(got, x, w, what=""):
    want = ref.fp32_linear(x, w)
    assert got.dtype == torch.float32 and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    err = (got.double() - want.double()).abs()
    bound = _bound(x, w)
    bad = ~(err <= bound)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.numel()} outside the bound, worst err "
                           f"{err[bad].max().item():.3g} vs bound {bound[bad].min().item():.3g}")


@pytest.mark.parametrize("xdt,wdt", [(F32, F32), (F32, BF16), (BF16, F32), (BF16, BF16)],
                         ids=["x32-w32", "x32-wbf16", "xbf16-w32", "xbf16-wbf16"])
@pytest.mark.parametrize("M", [1, 2, 3, 17])
def test_parity_default_config(M, xdt, wdt):
    """The untuned config for M rows (M=1: 1-row tiles, 2-3: 4-row tiles, both without tl.dot;
    17: a 64-row tl.dot tile) over K = 1, 31 and 130 (not multiples of BLOCK_K) and O = 1, 5, 257
    (one partial O tile, two tiles)."""
    for K in (1, 31, 130):
        for O in (1, 5, 257):
            x, w = _t(M, K, dt=xdt, seed=M + K), _t(O, K, dt=wdt, seed=O + K)
            _check(G.fp32_linear(x, w), x, w, f"M{M} K{K} O{O}")


@pytest.mark.parametrize("split", [0, 1, 3], ids=["auto", "nosplit", "split3"])
@pytest.mark.parametrize("cfg", SPACE, ids=lambda c: "-".join(map(str, c.values())))
def test_every_config_and_split(cfg, split):
    """Every config of the tuning space with split-K auto / off / 3 ways: M=17 spans several
    BLOCK_M tiles (or one 64-row tile), O=70 a partial BLOCK_O tile, K=300 uneven K splits (the
    last one partial) for every BLOCK_K; the dtypes alternate over the configs."""
    i = SPACE.index(cfg)
    xdt, wdt = ((F32, BF16), (BF16, BF16), (BF16, F32), (F32, F32))[i % 4]
    x, w = _t(17, 300, dt=xdt, seed=i), _t(70, 300, dt=wdt, seed=i + 50)
    c = {**cfg, "SPLIT_K": split}
    if split == 3:  # split-K really on: >= 2 partials for every BLOCK_K of the space
        assert G.k_ranges(x, 300, cfg["BLOCK_K"], 1, split)[0] >= 2
    got = G.fp32_linear(x, w, config=c)
    _check(got, x, w, f"{c}")
    if split == 3:
        assert torch.equal(got, G.fp32_linear(x, w, config=c))  # partials summed in a fixed order


def test_leading_dims_and_strides():
    """Leading dims are flattened and restored; x non-contiguous (a strided row view, a column
    stride of 2, a transposed batch that reshape must copy); weights with a row stride or
    transposed storage; fp16 x and weights (also exact upcasts)."""
    x = _t(2, 3, 64, dt=BF16, seed=1)
    w = _t(10, 64, dt=F32, seed=2)
    got = G.fp32_linear(x, w)
    assert got.shape == (2, 3, 10)
    _check(got, x, w, "leading dims")
    _check(G.fp32_linear(x.transpose(0, 1), w), x.transpose(0, 1), w, "transposed batch")
    xr, wr = _t(5, 130, dt=F32, seed=3)[:, :64], _t(10, 100, dt=BF16, seed=4)[:, :64]  # row strides 130, 100
    _check(G.fp32_linear(xr, wr), xr, wr, "row strides")
    xs, ws = x[..., ::2], _t(7, 64, dt=BF16, seed=4)[:, ::2]  # column stride 2 (x: read strided; w: copied)
    _check(G.fp32_linear(xs, ws), xs, ws, "column stride 2")
    wt = _t(32, 7, dt=BF16, seed=5).T  # [7, 32] with stride (1, 7): copied
    _check(G.fp32_linear(xs, wt), xs, wt, "transposed weight")
    x16, w16 = _t(4, 33, dt=F16, seed=6), _t(9, 33, dt=F16, seed=7)
    _check(G.fp32_linear(x16, w16), x16, w16, "fp16")
    _check(G.fp32_linear(x16[0], w16), x16[0], w16, "1-D x")


def test_empty_and_fallbacks():
    """Empty M, O or K give fp32 zeros of the twin's shape; dtypes the kernel does not take
    (fp64, fp8 weights) go to the twin; malformed calls raise as the twin does."""
    for xs, ws in (((0, 8), (5, 8)), ((2, 0, 8), (5, 8)), ((3, 8), (0, 8)), ((2, 3, 0), (5, 0))):
        x, w = torch.randn(xs).to(DEV), torch.randn(ws).to(DEV, BF16)
        got = G.fp32_linear(x, w)
        assert got.dtype == F32 and torch.equal(got, ref.fp32_linear(x, w)), (xs, ws)
    x, w = _t(3, 16, dt=torch.float64, seed=1), _t(5, 16, dt=F32, seed=2)
    assert torch.equal(G.fp32_linear(x, w), ref.fp32_linear(x, w))
    w8 = _t(5, 16, dt=F32, seed=3).to(torch.float8_e4m3fn)
    assert torch.equal(G.fp32_linear(x.float(), w8), ref.fp32_linear(x.float(), w8))
    with pytest.raises(RuntimeError):
        G.fp32_linear(x.float()[:, :8], w)
    with pytest.raises(ValueError, match="config"):
        G.fp32_linear(x.float(), w, config={**SPACE[0], "BLOCK_O": 24})


def test_int32_offset_limits(monkeypatch):
    """Rows whose x or y offsets would pass int32 run in row chunks (one launch each), a configured
    split-K whose workspace would pass it loops over its K ranges in one program (no workspace,
    the same sums), weights past it go to the twin: shown with the limit lowered to 4000 elements."""
    launches = []

    class Count:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(G, "_I32", 4000)
    monkeypatch.setattr(G, "_fp32_kernel", Count(G._fp32_kernel))
    x, w = _t(130, 31, dt=BF16, seed=10), _t(70, 31, dt=BF16, seed=11)
    one_row = next(c for c in SPACE if c["BLOCK_M"] == 1)
    _check(G.fp32_linear(x, w, config=one_row), x, w, "row chunks")
    assert [g[0] for g in launches] == [56, 56, 18]  # (4000 - 31) // 70 = 56 rows per launch, BLOCK_M 1
    launches.clear()
    x, w = _t(40, 64, dt=F32, seed=12), _t(60, 64, dt=BF16, seed=13)  # 40 rows fit, 2 * 40 * 60 do not
    cfg = {**SPACE[3], "SPLIT_K": 2, "SPREAD": True}
    _check(G.fp32_linear(x, w, config=cfg), x, w, "split-K in one program")
    assert [g[2] for g in launches] == [1]
    launches.clear()
    w = _t(70, 64, dt=BF16, seed=14)  # 4480 elements
    _check(G.fp32_linear(x, w), x, w, "twin")
    assert launches == []


def test_bound_rejects_tf32():
    """The bound is tight enough to see TF32 (inputs rounded to 10 mantissa bits) on these shapes:
    a kernel using it would fail the tests above."""
    x, w = _t(3, 130, dt=F32, seed=8), _t(257, 130, dt=F32, seed=9)

    def tf32(t):
        b = t.view(torch.int32)
        return ((b + 0xFFF + ((b >> 13) & 1)) & ~0x1FFF).view(torch.float32)

    err = (ref.fp32_linear(tf32(x), tf32(w)).double() - ref.fp32_linear(x, w).double()).abs()
    assert (err > _bound(x, w)).float().mean() > 0.5
