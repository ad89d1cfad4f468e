"""Parity of the Triton row kernels (ops/triton/norm.py) with their twins in ops/ref.py.

Tolerances. rms_norm and compress_pool: the kernel and the twin do the same fp32 operations in
a different reduction order (tree vs sequential sum) and, on GPUs, with approximate sqrt/exp/div
(<= 2 ulp): fp32 outputs agree to rtol 1e-5 / atol 1e-6 (a few fp32 ulps of O(1) values). A
16-bit output is one rounding of such an fp32 value, so it may land one bf16/fp16 ulp away
(<= 2^-7 relative), but only for the rare fp32 values next to a rounding midpoint: at most 1%
of the elements may differ (a kernel rounding 16-bit outputs the wrong way, e.g. the Triton
interpreter's truncating fp32 -> bf16 cast, would differ in half of them). fp8_act_sim is exact
integer arithmetic on both sides: bit-exact.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton has no wheel for this platform (test extras install it on Linux x86-64)")

from dayzero.ops import ref
from dayzero.ops.triton import norm
from tests.ops.bounds import exact_fp8_sim, fp8_data  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F32_TOL = dict(rtol=1e-5, atol=1e-6)
HALF_TOL = dict(rtol=2 ** -7, atol=1e-6)  # one bf16 ulp


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), equal_nan=True,
                               **(F32_TOL if dtype == torch.float32 else HALF_TOL))
    if dtype != torch.float32:  # rounding flips are rare; a wrong rounding mode flips half of them
        assert (a != b).sum() <= max(2, a.numel() // 100), (a != b).float().mean()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


# ---- rms_norm ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
@pytest.mark.parametrize("C", [1, 7, 64, 130])
def test_rms_norm(C, lead, dtype):
    x = (torch.randn(*lead, C, generator=_gen()) * 3).to(DEV, dtype)
    w = torch.randn(C, generator=_gen(1)).to(DEV, dtype)
    for weight in (w, None):
        out = norm.rms_norm(x, weight, 1e-6)
        assert out.shape == x.shape and out.dtype == x.dtype
        _close(out, ref.rms_norm(x, weight, 1e-6), dtype)


def test_rms_norm_fp32_weight_on_bf16_and_strided():
    x = torch.randn(6, 130, generator=_gen()).to(DEV, torch.bfloat16)[::2]  # not contiguous
    w = torch.randn(130, generator=_gen(1)).to(DEV)
    _close(norm.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), torch.bfloat16)
    assert norm.rms_norm(x[:0], w, 1e-5).shape == (0, 130)
    zero = torch.zeros(2, 7, device=DEV)  # all-zero rows: rsqrt(eps), finite zeros
    assert torch.equal(norm.rms_norm(zero, None, 1e-6), ref.rms_norm(zero, None, 1e-6))


# ---- fp8_act_sim ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("shape", [(1,), (100,), (3, 300), (2, 2, 130)])
def test_fp8_act_sim_bit_exact(shape, block, dtype):
    x = fp8_data(shape, dtype if dtype != torch.float16 else torch.float32)
    if dtype == torch.float16:
        x = (x / x.abs().max().clamp(min=1) * 1000).to(dtype)  # keep fp16 finite
    x = x.to(DEV)
    out = norm.fp8_act_sim(x, block)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(_bits(out), _bits(ref.fp8_act_sim(x, block)))
    assert torch.equal(_bits(out), _bits(exact_fp8_sim(x, block).to(DEV)))


def test_fp8_rounding_every_bf16_value_and_ties():
    """Scale 1 (each block holds 448): every bf16 value in [-448, 448] and every fp32 midpoint
    between adjacent e4m3 values (+-1 ulp), normal and subnormal, rounds as torch's cast."""
    codes = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[codes.isfinite() & (codes >= 0)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    fp32 = torch.cat([mids, torch.nextafter(mids, grid[1:]), torch.nextafter(mids, grid[:-1]), grid])
    fp32 = torch.cat([fp32, -fp32])
    all16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    all16 = all16[all16.abs() <= 448]
    for vals in (fp32, all16):
        pad = (-vals.numel()) % 63
        v = torch.cat([vals, torch.zeros(pad)]).view(-1, 63)
        x = torch.cat([torch.full((v.shape[0], 1), 448.0), v], 1).to(DEV)  # blocks of 64, amax 448
        want = x.to(torch.float8_e4m3fn).float()
        assert torch.equal(_bits(norm.fp8_act_sim(x, 64)), _bits(want))
        assert torch.equal(_bits(ref.fp8_act_sim(x, 64)), _bits(want))


def test_fp8_scale_at_power_of_two_boundaries():
    """amax at 448 * 2^k and one fp32 step above: kernel and twin both compute the smallest 2^k
    with amax / 2^k <= 448 exactly (a plain fp32 ceil(log2(amax / 448)) is off by one just above
    448 * 2^k; the twin corrects it)."""
    for k in range(-20, 20):
        top = torch.tensor(448.0 * 2.0 ** k)
        for amax in (top, torch.nextafter(top, torch.tensor(float("inf")))):
            x = torch.stack([amax, amax * 0.01, amax * 2 ** -7, -amax * 0.3]).to(DEV)
            out = norm.fp8_act_sim(x, 4)
            assert torch.equal(_bits(out), _bits(exact_fp8_sim(x, 4)))
            assert torch.equal(_bits(out), _bits(ref.fp8_act_sim(x.cpu(), 4).to(DEV)))


# ---- compress_pool -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [1, 4, 8, 5])
@pytest.mark.parametrize("lead,C", [((), 40), ((3,), 1), ((2, 2), 130)])
def test_compress_pool(lead, C, slots, dtype):
    g = _gen(slots)
    kv = torch.randn(*lead, slots, C, generator=g).to(DEV, dtype)
    gate = (torch.randn(*lead, slots, C, generator=g) * 4)
    if slots > 1:  # empty slots: about a quarter of them, never a whole channel
        empty = torch.rand(*lead, slots, C, generator=g) < 0.25
        empty[..., 0, :] = False
        gate = gate.masked_fill(empty, float("-inf"))
    gate = gate.to(DEV, dtype)
    out = norm.compress_pool(kv, gate)
    assert out.dtype == torch.float32 and out.shape == (*lead, C)
    want = ref.compress_pool(kv, gate)
    assert not want.isnan().any()
    torch.testing.assert_close(out, want, **F32_TOL)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on -inf - -inf
def test_compress_pool_all_empty_channel_is_nan_like_the_twin():
    kv = torch.randn(2, 8, 5, generator=_gen()).to(DEV)
    gate = torch.randn(2, 8, 5, generator=_gen(1)).to(DEV)
    gate[1, :, 2] = float("-inf")
    out, want = norm.compress_pool(kv, gate), ref.compress_pool(kv, gate)
    assert want[1, 2].isnan() and out[1, 2].isnan() and out.isnan().sum() == 1
    torch.testing.assert_close(out, want, equal_nan=True, **F32_TOL)


def test_validation():
    x = torch.randn(3, 8, device=DEV)
    with pytest.raises(ValueError, match="weight.shape"):
        norm.rms_norm(x, torch.ones(7, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="x.dtype"):
        norm.rms_norm(x.to(torch.int32), None, 1e-6)
    with pytest.raises(ValueError, match="block"):
        norm.fp8_act_sim(x, 0)
    with pytest.raises(ValueError, match="gate.shape"):
        norm.compress_pool(x[None], x[None, :2])


# ---- every tunable config ------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(norm.TUNABLES))
def test_every_config_agrees(name):
    t = norm.TUNABLES[name]
    assert 3 <= len(t.space) <= 8
    dev = torch.device(DEV)
    x = fp8_data((3, 130), torch.float32).to(DEV)
    bx = torch.randn(2, 3, 130, generator=_gen()).to(DEV, torch.bfloat16)
    kv = torch.randn(3, 5, 130, generator=_gen()).to(DEV)
    gate = torch.randn(3, 5, 130, generator=_gen(1)).to(DEV).masked_fill(
        torch.rand(3, 5, 130, generator=_gen(2)).to(DEV) < 0.3, float("-inf"))
    gate[:, 0] = 0.0
    cases = t.cases(dev)
    base = [run(t.space[0]) for _, run in cases]
    for cfg in t.space:
        for (_, run), b in zip(cases, base):
            out = run(cfg)
            if name == "fp8_act_sim":
                assert torch.equal(_bits(out), _bits(b))
            else:
                _close(out, b, out.dtype)
        if name == "rms_norm":
            w = torch.randn(130, generator=_gen(3)).to(DEV)
            _close(norm.rms_norm(bx, w, 1e-6, config=cfg), ref.rms_norm(bx, w, 1e-6), torch.bfloat16)
            _close(norm.rms_norm(x, None, 1e-6, config=cfg), ref.rms_norm(x, None, 1e-6), torch.float32)
        elif name == "fp8_act_sim":
            for block in (32, 128):
                assert torch.equal(_bits(norm.fp8_act_sim(x, block, config=cfg)), _bits(ref.fp8_act_sim(x, block)))
        else:
            torch.testing.assert_close(norm.compress_pool(kv, gate, config=cfg), ref.compress_pool(kv, gate),
                                       **F32_TOL)
