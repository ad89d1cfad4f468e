"""Parity of the native CPU kernels of ops/cpu/mhc.c (rms_norm, fp8_act_sim, compress_pool, hc_pre,
hc_post) with their twins in ops/ref.py.

Error bounds, from the arithmetic. Kernel and twin do the same fp32 operations in the same places
(the kernel rounds a product before a sum wherever the twin does, C11 never contracts them) except:
- long reductions (the mHC projection and RMS statistic over K = n*d, norms' sums of squares, the
  collapse / hc_post sums over streams) run in another order, and the twin's GEMM / BMM may use
  FMA: relative error ~ 2^-24 sqrt(K) of the sum of |terms|;
- exp (sigmoid, softmax) is a ~1 ulp polynomial vs PyTorch's.
Sigmoid, softmax and Sinkhorn normalisation are contracting, so post and comb agree to rtol 1e-5 /
atol 1e-6 (the Triton kernels' bound). Outputs that are sums with possible cancellation (u, hc_post,
compress_pool) are bounded relative to the sum of the magnitudes of their terms: 1e-5 of it for
fp32. A bf16 output is one rounding of such an fp32 value: at most one bf16 ulp (2^-7 relative)
away, and only next to a rounding midpoint, so at most 1% of the elements may differ (a wrong
rounding mode flips about half). fp8_act_sim is integer arithmetic on the bits: bit-exact.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dayzero.ops import cases, ref
from dayzero.ops.cpu import build
from tests.ops.bounds import exact_fp8_sim, fp8_data

try:
    from dayzero.ops.cpu import mhc
except build.NativeUnavailable as e:  # no C compiler here: the op table runs the twins
    pytest.skip(f"native CPU kernels unavailable: {e}", allow_module_level=True)

F32, BF16 = torch.float32, torch.bfloat16
EPS = dict(norm_eps=1e-6, hc_eps=1e-6)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({F32: torch.int32, BF16: torch.int16, torch.float16: torch.int16}[t.dtype])


def _close(got, want, mag, dtype, rtol=1e-5):
    """got vs want (same dtype): fp32 within rtol of the terms' magnitude `mag` (elementwise);
    bf16 within one bf16 ulp of want and <= 1% of the elements off at all."""
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = got.float(), want.float()
    if dtype == F32:
        bad = (g - w).abs() > rtol * mag + 1e-30
        assert not bad.any(), f"{bad.sum().item()} of {g.numel()} off; max {(g - w).abs().max().item():.3g}"
    else:
        ulp = torch.where(w == 0, torch.full_like(w, 2.0 ** -133), w.abs() * 2.0 ** -7)
        bad = (g - w).abs() > ulp * 1.0001 + rtol * mag
        assert not bad.any(), f"{bad.sum().item()} of {g.numel()} off by more than one bf16 ulp"
        assert (got != want).sum() <= max(2, got.numel() // 100), (got != want).float().mean()


@contextlib.contextmanager
def _threads(n):
    """torch (and so the kernels, which take torch.get_num_threads()) at n threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---- hc_pre / hc_post --------------------------------------------------------------------------
def _pre_inputs(N, n, d, dtype, seed=0, sharp=1.0):
    g = _gen(seed)
    R = (2 + n) * n
    x = torch.randn(N, n, d, generator=g).to(dtype)
    fn = torch.randn(R, n * d, generator=g) * (n * d) ** -0.5
    scale = (torch.rand(3, generator=g) + 0.5) * sharp
    base = torch.randn(R, generator=g)
    return x, fn, scale, base


def _check_pre(got, want, x):
    u, post, comb = got
    wu, wpost, wcomb = want
    assert u.dtype == x.dtype and post.dtype == comb.dtype == F32
    assert post.shape == wpost.shape and comb.shape == wcomb.shape
    torch.testing.assert_close(post, wpost, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comb, wcomb, rtol=1e-5, atol=1e-6)
    mag = x.float().abs().sum(1)  # bounds sum_j pre_j |x_j|: pre_j = sigmoid + eps <= 1 + eps
    _close(u, wu, mag, x.dtype)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("n", [1, 3, 4])
@pytest.mark.parametrize("d", [1, 63, 256])
def test_hc_pre(d, n, dtype):
    for N in (0, 1, 2, 7):
        for iters in (1, 20):
            x, fn, scale, base = _pre_inputs(N, n, d, dtype, seed=N * 31 + d + iters)
            _check_pre(mhc.hc_pre(x, fn, scale, base, iters, **EPS), ref.hc_pre(x, fn, scale, base, iters, **EPS), x)


def test_hc_pre_tiles_remainders_and_iters_0():
    """N = 8, 11, 17: register tiles of 4, 2 and 1 tokens; iters 0 behaves as the twin's (= 1)."""
    for N, iters in ((8, 20), (11, 3), (17, 0)):
        x, fn, scale, base = _pre_inputs(N, 4, 48, BF16, seed=N)
        _check_pre(mhc.hc_pre(x, fn, scale, base, iters, **EPS), ref.hc_pre(x, fn, scale, base, iters, **EPS), x)


def test_hc_pre_sharp_strided_zero_token_and_n8():
    """Large scales (peaked softmax, saturated sigmoids), a non-contiguous x, an all-zero token
    (the RMS factor is rsqrt(eps) times a zero projection: mixes = base) and n = 8 (generic n)."""
    x, fn, scale, base = _pre_inputs(6, 4, 48, F32, sharp=30.0)
    x = x[::2]
    _check_pre(mhc.hc_pre(x, fn, scale, base, 20, **EPS), ref.hc_pre(x, fn, scale, base, 20, **EPS), x)
    x, fn, scale, base = _pre_inputs(3, 4, 16, F32)
    x[1] = 0
    _check_pre(mhc.hc_pre(x, fn, scale, base, 20, **EPS), ref.hc_pre(x, fn, scale, base, 20, **EPS), x)
    x, fn, scale, base = _pre_inputs(3, 8, 20, BF16)
    _check_pre(mhc.hc_pre(x, fn, scale, base, 20, **EPS), ref.hc_pre(x, fn, scale, base, 20, **EPS), x)


def test_hc_pre_threads_and_batch_invariant():
    """Threaded paths (token tiles in parallel; (token, K-slab) items for few long tokens) give
    the twin's results, and bitwise the same ones at 1 and 2 threads and for a token alone or in
    a batch: no reduction depends on how the work was split. Teams start from 1 M multiply-adds
    (mhc.c dz_hc_pre): (3, 4, 4096) and (1, 8, 3000) take the split path, the smaller ones one
    thread."""
    for N, n, d in ((64, 4, 256), (2, 4, 1024), (1, 3, 3000), (3, 4, 4096), (1, 8, 3000)):
        x, fn, scale, base = _pre_inputs(N, n, d, BF16, seed=d)
        with _threads(2):
            got = mhc.hc_pre(x, fn, scale, base, 20, **EPS)
        with _threads(1):
            one = mhc.hc_pre(x, fn, scale, base, 20, **EPS)
            alone = [mhc.hc_pre(x[i:i + 1], fn, scale, base, 20, **EPS) for i in (0, N - 1)]
        _check_pre(got, ref.hc_pre(x, fn, scale, base, 20, **EPS), x)
        for a, b in zip(got, one):
            assert torch.equal(_bits(a), _bits(b))
        for i, single in zip((0, N - 1), alone):
            for a, b in zip(got, single):
                assert torch.equal(_bits(a[i:i + 1]), _bits(b))


def _post_inputs(N, n, d, dtype, seed=0, xdtype=None):
    g = _gen(seed)
    x = torch.randn(N, n, d, generator=g).to(xdtype or dtype)
    y = torch.randn(N, d, generator=g).to(dtype)
    post = torch.rand(N, n, generator=g) * 2
    comb = torch.rand(N, n, n, generator=g)
    return y, x, post, comb


def _check_post(got, y, x, post, comb):
    want = ref.hc_post(y, x, post, comb)
    assert got.dtype == y.dtype
    mag = post[..., None] * y.float().abs()[:, None] + torch.einsum("njk,njd->nkd", comb, x.float().abs())
    _close(got, want, mag, y.dtype)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("n", [1, 3, 4])
@pytest.mark.parametrize("d", [1, 63, 256])
def test_hc_post(d, n, dtype):
    for N in (0, 1, 2, 7):
        y, x, post, comb = _post_inputs(N, n, d, dtype, seed=N * 7 + d)
        _check_post(mhc.hc_post(y, x, post, comb), y, x, post, comb)


def test_hc_post_mixed_dtypes_transpose_strided_threads():
    """fp32 y with bf16 streams and the reverse, a comb that is not symmetric (comb[j, k], not
    [k, j]), non-contiguous inputs, n = 8, and the threaded path (bitwise as one thread)."""
    for yd, xd in ((F32, BF16), (BF16, F32)):
        y, x, post, comb = _post_inputs(2, 3, 20, yd, seed=5, xdtype=xd)
        comb = torch.triu(comb)
        _check_post(mhc.hc_post(y, x, post, comb), y, x, post, comb)
    y, x, post, comb = _post_inputs(6, 8, 40, BF16, seed=6)
    y, x, post, comb = y[::2], x[::2], post[::2], comb[::2].transpose(1, 2)
    _check_post(mhc.hc_post(y, x, post, comb), y, x, post, comb)
    y, x, post, comb = _post_inputs(64, 4, 256, BF16, seed=7)
    with _threads(2):
        got = mhc.hc_post(y, x, post, comb)
    with _threads(1):
        assert torch.equal(_bits(got), _bits(mhc.hc_post(y, x, post, comb)))
    _check_post(got, y, x, post, comb)


# ---- rms_norm ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
@pytest.mark.parametrize("C", [1, 7, 64, 130, 256])
def test_rms_norm(C, lead, dtype):
    x = (torch.randn(*lead, C, generator=_gen(C)) * 3).to(dtype)
    for weight in (None, torch.randn(C, generator=_gen(1)), torch.randn(C, generator=_gen(2)).to(BF16)):
        want = ref.rms_norm(x, weight, 1e-6)
        mag = want.float().abs()  # a product of factors: relative error only
        _close(mhc.rms_norm(x, weight, 1e-6), want, mag, dtype)


def test_rms_norm_strided_empty_zero_threads():
    x = torch.randn(6, 130, generator=_gen()).to(BF16)[::2]
    w = torch.randn(130, generator=_gen(1))
    want = ref.rms_norm(x, w, 1e-5)
    _close(mhc.rms_norm(x, w, 1e-5), want, want.float().abs(), BF16)
    assert mhc.rms_norm(x[:0], w, 1e-5).shape == (0, 130)
    zero = torch.zeros(2, 7)  # all-zero rows: rsqrt(eps), finite zeros
    assert torch.equal(mhc.rms_norm(zero, None, 1e-6), ref.rms_norm(zero, None, 1e-6))
    x = torch.randn(300, 256, generator=_gen(3)).to(BF16)
    with _threads(2):
        got = mhc.rms_norm(x, w[:1].expand(256).contiguous(), 1e-6)
    with _threads(1):
        assert torch.equal(_bits(got), _bits(mhc.rms_norm(x, w[:1].expand(256).contiguous(), 1e-6)))


# ---- fp8_act_sim ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("block", [7, 32, 64, 128])
@pytest.mark.parametrize("shape", [(1,), (100,), (3, 300), (2, 2, 130)])
def test_fp8_act_sim_bit_exact(shape, block, dtype):
    x = fp8_data(shape, dtype, seed=block)
    out = mhc.fp8_act_sim(x, block)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(_bits(out), _bits(ref.fp8_act_sim(x, block)))
    assert torch.equal(_bits(out), _bits(exact_fp8_sim(x, block)))


def test_fp8_rounding_every_bf16_value_and_ties():
    """Scale 1 (each block holds 448): every bf16 value in [-448, 448] and every fp32 midpoint
    between adjacent e4m3 values (+-1 ulp), normal and subnormal, rounds as torch's cast."""
    codes = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[codes.isfinite() & (codes >= 0)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    fp32 = torch.cat([mids, torch.nextafter(mids, grid[1:]), torch.nextafter(mids, grid[:-1]), grid])
    fp32 = torch.cat([fp32, -fp32])
    all16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(BF16)
    all16 = all16[all16.float().abs() <= 448]
    for vals in (fp32, all16):
        pad = (-vals.numel()) % 63
        v = torch.cat([vals, torch.zeros(pad, dtype=vals.dtype)]).view(-1, 63)
        x = torch.cat([torch.full((v.shape[0], 1), 448.0, dtype=vals.dtype), v], 1)  # blocks of 64, amax 448
        want = x.float().to(torch.float8_e4m3fn).float().to(x.dtype)
        assert torch.equal(_bits(mhc.fp8_act_sim(x, 64)), _bits(want))
        assert torch.equal(_bits(ref.fp8_act_sim(x, 64)), _bits(want))


def test_fp8_scale_at_power_of_two_boundaries():
    """amax at 448 * 2^k, one fp32 step above and below, and at the 1e-4 floor: the smallest
    2^k with amax / 2^k <= 448, exactly, as the (corrected) twin."""
    rows = []
    for k in range(-24, 21):
        top = torch.tensor(448.0 * 2.0 ** k)
        for amax in (top, torch.nextafter(top, torch.tensor(float("inf"))), torch.nextafter(top, torch.tensor(0.0))):
            rows.append(torch.stack([amax, amax * 0.01, amax * 2 ** -7, -amax * 0.3]))
    floor = torch.tensor(1e-4)
    for amax in (floor, torch.nextafter(floor, torch.tensor(1.0)), torch.nextafter(floor, torch.tensor(0.0)), floor / 8):
        rows.append(torch.stack([amax, amax * 0.01, amax * 2 ** -7, -amax * 0.3]))
    x = torch.stack(rows)
    for xx in (x, x.flatten()):  # blocks of 4: one a row, and all in one row
        out = mhc.fp8_act_sim(xx, 4)
        assert torch.equal(_bits(out), _bits(exact_fp8_sim(xx, 4)))
        assert torch.equal(_bits(out), _bits(ref.fp8_act_sim(xx, 4)))
    xb = x.to(BF16)
    assert torch.equal(_bits(mhc.fp8_act_sim(xb, 4)), _bits(ref.fp8_act_sim(xb, 4)))


def test_fp8_nonfinite_blocks_and_threads():
    """A block holding inf or NaN is all NaN (the twin's scale is inf / NaN); others unaffected.
    The threaded path is bitwise the single-thread one."""
    x = fp8_data((4, 96), F32, seed=3)
    x[1, 5], x[2, 40], x[3, 70] = float("inf"), float("nan"), -float("inf")
    for dt in (F32, BF16):
        xx = x.to(dt)
        out, want = mhc.fp8_act_sim(xx, 32), ref.fp8_act_sim(xx, 32)
        assert torch.equal(out.isnan(), want.isnan()) and out.isnan().sum() == 3 * 32
        assert torch.equal(_bits(out[~out.isnan()]), _bits(want[~want.isnan()]))
    x = fp8_data((300, 256), BF16, seed=4)
    with _threads(2):
        got = mhc.fp8_act_sim(x, 128)
    with _threads(1):
        assert torch.equal(_bits(got), _bits(mhc.fp8_act_sim(x, 128)))
    assert torch.equal(_bits(got), _bits(ref.fp8_act_sim(x, 128)))


# ---- compress_pool -------------------------------------------------------------------------------
def _check_pool(kv, gate):
    out, want = mhc.compress_pool(kv, gate), ref.compress_pool(kv, gate)
    assert out.dtype == F32 and out.shape == want.shape
    mag = (kv.float().abs() * gate.float().softmax(-2)).sum(-2)
    _close(out, want, mag, F32)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("slots", [1, 4, 5, 8, 128])
@pytest.mark.parametrize("lead,C", [((), 40), ((3,), 1), ((2, 2), 130)])
def test_compress_pool(lead, C, slots, dtype):
    g = _gen(slots)
    kv = torch.randn(*lead, slots, C, generator=g).to(dtype)
    gate = torch.randn(*lead, slots, C, generator=g) * 4
    if slots > 1:  # empty slots: about a quarter of them, never a whole channel
        empty = torch.rand(*lead, slots, C, generator=g) < 0.25
        empty[..., 0, :] = False
        gate = gate.masked_fill(empty, float("-inf"))
    _check_pool(kv, gate.to(dtype))


def test_compress_pool_all_empty_strided_mixed_threads():
    """An all-empty channel is NaN like the twin; strided windows (the compressor's kv / gate
    halves of one buffer); bf16 kv with fp32 gate; the threaded path bitwise as one thread."""
    kv = torch.randn(2, 8, 5, generator=_gen())
    gate = torch.randn(2, 8, 5, generator=_gen(1))
    gate[1, :, 2] = float("-inf")
    out, want = mhc.compress_pool(kv, gate), ref.compress_pool(kv, gate)
    assert want[1, 2].isnan() and out[1, 2].isnan() and out.isnan().sum() == 1
    torch.testing.assert_close(out, want, equal_nan=True, rtol=1e-5, atol=1e-6)
    win = torch.randn(6, 4, 2, 130, generator=_gen(2))  # [E, r, (kv, gate), C]
    _check_pool(win[:, :, 0], win[:, :, 1])
    _check_pool(win[:, :, 0].to(BF16), win[:, :, 1])
    kv, gate = torch.randn(8, 16, 130, generator=_gen(3)), torch.randn(8, 16, 130, generator=_gen(4))
    with _threads(2):
        got = mhc.compress_pool(kv, gate)
    with _threads(1):
        assert torch.equal(got, mhc.compress_pool(kv, gate))


# ---- fallbacks, shared cases, the scalar build ---------------------------------------------------
def test_fp16_and_odd_inputs_run_the_twins():
    x = torch.randn(3, 4, 16, generator=_gen()).half()
    fn = torch.randn(24, 64, generator=_gen(1))
    s, b = torch.rand(3), torch.randn(24)
    for a, w in zip(mhc.hc_pre(x, fn, s, b, 3, **EPS), ref.hc_pre(x, fn, s, b, 3, **EPS)):
        assert torch.equal(a, w)
    assert torch.equal(mhc.rms_norm(x, None, 1e-6), ref.rms_norm(x, None, 1e-6))
    assert torch.equal(mhc.fp8_act_sim(x, 8), ref.fp8_act_sim(x, 8))
    with pytest.raises(RuntimeError):  # a wrong fn shape: the twin's own error, no wild read
        mhc.hc_pre(x.float(), fn[:, :10], s, b, 3, **EPS)


@pytest.mark.parametrize("op", ["rms_norm", "fp8_act_sim", "compress_pool", "hc_pre", "hc_post"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_shared_cases(op, dtype):
    """ops/cases.py inputs (what `dayzero verify` runs) within cases.tolerance of the twin."""
    for size in ("tiny", "small"):
        args, kwargs = cases.make(op, size, dtype=dtype)
        got, want = getattr(mhc, op)(*args, **kwargs), getattr(ref, op)(*args, **kwargs)
        tol = cases.tolerance(op, dtype)
        for g, w in zip(*((o,) if isinstance(o, torch.Tensor) else o for o in (got, want))):
            assert g.dtype == w.dtype and g.shape == w.shape
            if tol == 0:
                assert torch.equal(_bits(g), _bits(w))
            else:
                finite = w.isfinite()
                assert torch.equal(finite, g.isfinite())
                err = (g.float() - w.float())[finite].abs().max()
                assert err <= tol * w.float()[finite].abs().max(), (op, size, err)


_SCALAR_CHECK = textwrap.dedent("""
    import torch
    from dayzero.ops import ref
    from dayzero.ops.cpu import build, mhc
    assert "x86-64" in " ".join(build.flags())
    g = torch.Generator().manual_seed(0)
    bits = lambda t: t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)
    for dt in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, 4, 63, generator=g) * torch.exp2(torch.randint(-20, 10, (3, 4, 63), generator=g))).to(dt)
        x[0, 0, :5] = torch.tensor([448.0, 0.0, -0.0, 2.0 ** -10, 3 * 2.0 ** -10])
        assert torch.equal(bits(mhc.fp8_act_sim(x, 32)), bits(ref.fp8_act_sim(x, 32)))
        x = torch.randn(7, 4, 63, generator=g).to(dt)
        fn, s, b = torch.randn(24, 252, generator=g) / 16, torch.rand(3, generator=g) + 0.5, torch.randn(24, generator=g)
        for a, w in zip(mhc.hc_pre(x, fn, s, b, 20, 1e-6, 1e-6), ref.hc_pre(x, fn, s, b, 20, 1e-6, 1e-6)):
            torch.testing.assert_close(a.float(), w.float(), rtol=2 ** -7 if a.dtype == torch.bfloat16 else 1e-5,
                                       atol=1e-5)
        x3 = torch.randn(7, 3, 63, generator=g).to(dt)
        fn3, b3 = torch.randn(15, 189, generator=g) / 14, torch.randn(15, generator=g)
        for a, w in zip(mhc.hc_pre(x3, fn3, s, b3, 20, 1e-6, 1e-6), ref.hc_pre(x3, fn3, s, b3, 20, 1e-6, 1e-6)):
            torch.testing.assert_close(a.float(), w.float(), rtol=2 ** -7 if a.dtype == torch.bfloat16 else 1e-5,
                                       atol=1e-5)
        y, post, comb = torch.randn(7, 63, generator=g).to(dt), torch.rand(7, 4, generator=g), torch.rand(7, 4, 4, generator=g)
        torch.testing.assert_close(mhc.hc_post(y, x, post, comb).float(), ref.hc_post(y, x, post, comb).float(),
                                   rtol=2 ** -7 if dt == torch.bfloat16 else 1e-5, atol=1e-5)
        w = torch.randn(63, generator=g)
        torch.testing.assert_close(mhc.rms_norm(y, w, 1e-6).float(), ref.rms_norm(y, w, 1e-6).float(),
                                   rtol=2 ** -7 if dt == torch.bfloat16 else 1e-5, atol=1e-6)
        kv, gate = torch.randn(3, 5, 63, generator=g).to(dt), torch.randn(3, 5, 63, generator=g).to(dt)
        gate[:, :2, ::3] = float("-inf")
        torch.testing.assert_close(mhc.compress_pool(kv, gate), ref.compress_pool(kv, gate), rtol=1e-5, atol=1e-6)
    print("scalar build OK")
""")


def test_scalar_build(tmp_path):
    """The portable build (-march=x86-64: no AVX, 8-lane vectors in SSE pairs, no FMA) agrees too."""
    if os.uname().machine not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    env = dict(os.environ, DAYZERO_CPU_MARCH="x86-64", DAYZERO_CACHE_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _SCALAR_CHECK], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "scalar build OK" in r.stdout, r.stderr[-3000:]
