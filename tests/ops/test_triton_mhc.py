"""Parity of the mHC kernels (ops/triton/mhc.py) with the twins in ops/ref.py.

Tolerances. Kernel and twin do the same fp32 operations; they differ in the order of the K-long
projection / sum-of-squares reductions (split-K partials vs one GEMM: relative error ~1e-7 *
sqrt(K) on the mixes), in the collapse and comb sums, and on GPUs in approximate exp/sqrt/div
(<= 2 ulp) and FMA contraction. Sinkhorn normalisation is contracting, so 20 iterations do not
amplify that; fp32 outputs (post, comb, fp32 u and hc_post) agree to rtol 1e-5 / atol 1e-6.
A bf16 output is one rounding of such an fp32 value and may land one bf16 ulp away (<= 2^-7
relative), but only next to a rounding midpoint: at most 1% of the elements may differ (a wrong
rounding mode, like the interpreter's truncating bf16 cast, would flip half of them).
"""
from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton", reason="Triton has no wheel for this platform (test extras install it on Linux x86-64)")

from dayzero.ops import ref
from dayzero.ops.triton import mhc

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F32_TOL = dict(rtol=1e-5, atol=1e-6)
BF16_TOL = dict(rtol=2 ** -7, atol=1e-6)


def _close(a, b):
    torch.testing.assert_close(a.float(), b.float(), **(F32_TOL if a.dtype == torch.float32 else BF16_TOL))
    if a.dtype != torch.float32:
        assert (a != b).sum() <= max(2, a.numel() // 100), (a != b).float().mean()
EPS = dict(norm_eps=1e-6, hc_eps=1e-6)

# (N, n, d, iters): every (n, d) pair of n in 1..4 and d in {16, 48, 64, 100}; N and iters cycle
# so that each (N, iters) pair of N in {1, 3, 17} and iters in {1, 3, 20} appears too.
GRID = [([1, 3, 17][i % 3], n, d, [1, 3, 20][(i // 3) % 3])
        for i, (n, d) in enumerate(itertools.product([1, 2, 3, 4], [16, 48, 64, 100]))]
GRID += [(3, 8, 16, 20), (2, 5, 24, 3), (1, 4, 16, 0), (2, 2, 1, 3)]  # n up to 8, n = 5, iters 0, d = 1
if DEV == "cuda":
    GRID += [(5, 4, 4096, 20), (300, 4, 4096, 20)]  # V4: split-K decode and multi-tile prefill


def _inputs(N, n, d, dtype, seed=0, sharp=1.0):
    x, fn, scale, base = mhc._inputs(N, n, d, torch.device(DEV), dtype, seed)
    return x, fn, scale * sharp, base


def _check_pre(got, want, dtype):
    u, post, comb = got
    wu, wpost, wcomb = want
    assert u.dtype == dtype and post.dtype == comb.dtype == torch.float32
    assert u.shape == wu.shape and post.shape == wpost.shape and comb.shape == wcomb.shape
    _close(u, wu)
    torch.testing.assert_close(post, wpost, **F32_TOL)
    torch.testing.assert_close(comb, wcomb, **F32_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,n,d,iters", GRID)
def test_hc_pre(N, n, d, iters, dtype):
    x, fn, scale, base = _inputs(N, n, d, dtype, seed=N + d)
    got = mhc.hc_pre(x, fn, scale, base, iters, **EPS)
    _check_pre(got, ref.hc_pre(x, fn, scale, base, iters, **EPS), dtype)


def test_hc_pre_sharp_and_strided():
    """Large scales (peaked softmax, saturated sigmoids) and a non-contiguous x."""
    x, fn, scale, base = _inputs(6, 4, 48, torch.float32, sharp=30.0)
    x = x[::2]
    _check_pre(mhc.hc_pre(x, fn, scale, base, 20, **EPS), ref.hc_pre(x, fn, scale, base, 20, **EPS),
               torch.float32)
    u, post, comb = mhc.hc_pre(x[:0], fn, scale, base, 20, **EPS)
    assert u.shape == (0, 48) and post.shape == (0, 4) and comb.shape == (0, 4, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hc_pre_many_splits(dtype):
    """68 K-splits of 16: the finish kernel reduces them in two chunks of SB = 64."""
    cfg = dict(mhc.PRE_DEFAULT, BLOCK_N=16, BLOCK_K=16, WAVES=1024)
    x, fn, scale, base = _inputs(2, 4, 272, dtype)
    _check_pre(mhc.hc_pre(x, fn, scale, base, 20, **EPS, config=cfg), ref.hc_pre(x, fn, scale, base, 20, **EPS),
               dtype)


def test_hc_pre_fp16():
    """fp16 streams take the fp32-operand projection (no bf16 split)."""
    x, fn, scale, base = _inputs(3, 4, 48, torch.float16)
    _check_pre(mhc.hc_pre(x, fn, scale, base, 20, **EPS), ref.hc_pre(x, fn, scale, base, 20, **EPS),
               torch.float16)


def test_hc_pre_all_zero_token():
    """An all-zero token: the RMS factor is rsqrt(eps) times a zero projection, mixes = base."""
    x, fn, scale, base = _inputs(3, 4, 16, torch.float32)
    x[1] = 0
    _check_pre(mhc.hc_pre(x, fn, scale, base, 20, **EPS), ref.hc_pre(x, fn, scale, base, 20, **EPS),
               torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,n,d,iters", GRID)
def test_hc_post(N, n, d, iters, dtype):
    g = torch.Generator().manual_seed(N * 7 + d)
    x = torch.randn(N, n, d, generator=g).to(DEV, dtype)
    y = torch.randn(N, d, generator=g).to(DEV, dtype)
    post = (torch.rand(N, n, generator=g) * 2).to(DEV)
    comb = torch.rand(N, n, n, generator=g).to(DEV)
    out = mhc.hc_post(y, x, post, comb)
    want = ref.hc_post(y, x, post, comb)
    assert out.dtype == dtype and out.shape == want.shape
    _close(out, want)


def test_hc_post_mixed_dtypes_and_transpose():
    """fp32 y with bf16 streams, and a comb that is not symmetric (checks comb[j, k], not [k, j])."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 20, generator=g).to(DEV, torch.bfloat16)
    y = torch.randn(2, 20, generator=g).to(DEV)
    post = torch.rand(2, 3, generator=g).to(DEV)
    comb = torch.triu(torch.rand(2, 3, 3, generator=g)).to(DEV)
    out = mhc.hc_post(y, x, post, comb)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.hc_post(y, x, post, comb), **F32_TOL)


def test_validation():
    x, fn, scale, base = _inputs(2, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="fn.shape"):
        mhc.hc_pre(x, fn[:-1], scale, base, 20, **EPS)
    with pytest.raises(ValueError, match="base.shape"):
        mhc.hc_pre(x, fn, scale, base[:3], 20, **EPS)
    with pytest.raises(ValueError, match="iters"):
        mhc.hc_pre(x, fn, scale, base, -1, **EPS)
    with pytest.raises(ValueError, match="hc_mult"):
        mhc.hc_pre(torch.zeros(1, 9, 4, device=DEV), fn, scale, base, 20, **EPS)
    with pytest.raises(ValueError, match="x.shape"):
        mhc.hc_pre(x[0], fn, scale, base, 20, **EPS)
    with pytest.raises(ValueError, match="comb.shape"):
        mhc.hc_post(x[:, 0], x, torch.ones(2, 4, device=DEV), torch.ones(2, 4, 3, device=DEV))
    with pytest.raises(ValueError, match="y.dtype"):
        mhc.hc_post(x[:, 0].int(), x, torch.ones(2, 4, device=DEV), torch.ones(2, 4, 4, device=DEV))


@pytest.mark.parametrize("name", sorted(mhc.TUNABLES))
def test_every_config_agrees(name):
    t = mhc.TUNABLES[name]
    assert 3 <= len(t.space) <= 8
    cases = t.cases(torch.device(DEV))
    base = [run(t.space[0]) for _, run in cases]
    for cfg in t.space:
        for (_, run), b in zip(cases, base):
            out = run(cfg)
            for o, w in zip(*((v,) if isinstance(v, torch.Tensor) else v for v in (out, b))):
                _close(o, w)
        for N, n, d, iters, dtype in [(17, 3, 100, 20, torch.bfloat16), (1, 4, 64, 3, torch.float32)]:
            x, fn, scale, base_ = _inputs(N, n, d, dtype)
            if name == "hc_pre":
                _check_pre(mhc.hc_pre(x, fn, scale, base_, iters, **EPS, config=cfg),
                           ref.hc_pre(x, fn, scale, base_, iters, **EPS), dtype)
            else:
                y = x[:, 0] * 0.5
                post = torch.rand(N, n, device=DEV)
                comb = torch.rand(N, n, n, device=DEV)
                _close(mhc.hc_post(y, x, post, comb, config=cfg), ref.hc_post(y, x, post, comb))
