"""The native fp32 GEMM over fp32 / bf16 dense weights (ops/cpu/dense.c) against its twin
ref.fp32_linear: the same exact products (bf16 weights upcast exactly), fp32 sums in another order,
so each output is within 2*K*u*sum|x*w| of the twin's (u = 2^-24)."""
from __future__ import annotations

import platform

import pytest
import torch

from dayzero.ops import ref
from dayzero.ops.cpu import available

from tests.ops.bounds import scalar_build_runs

pytestmark = pytest.mark.skipif(not available("dense"), reason="dense.c does not build here (no C compiler)")


@pytest.mark.parametrize("M,K,O", [(1, 256, 4096), (2, 256, 4096), (3, 1024, 24), (5, 17, 9), (9, 33, 130),
                                   (0, 256, 8), (2, 1, 3)])
@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16])
def test_fp32_linear_matches_the_twin(M, K, O, wdt, xdt):
    from dayzero.ops.cpu.dense import fp32_linear
    g = torch.Generator().manual_seed(M * 1000 + K + O)
    x = torch.randn(M, K, generator=g).to(xdt)
    w = torch.randn(O, K, generator=g).to(wdt)
    got, want = fp32_linear(x, w), ref.fp32_linear(x, w)
    assert got.dtype == torch.float32 and got.shape == want.shape == (M, O)
    bound = 2 * K * 2.0 ** -24 * (x.float().abs() @ w.float().abs().T) + 1e-30
    assert ((got - want).abs() <= bound).all()


def test_fp32_linear_leading_dims_and_fallbacks():
    from dayzero.ops.cpu.dense import fp32_linear
    x = torch.randn(2, 3, 64)
    w = torch.randn(10, 64).bfloat16()
    assert fp32_linear(x, w).shape == (2, 3, 10)
    assert torch.allclose(fp32_linear(x, w), ref.fp32_linear(x, w), rtol=0, atol=1e-5)
    w16 = torch.randn(10, 64).half()  # fp16 weights: the twin
    assert torch.equal(fp32_linear(x, w16), ref.fp32_linear(x, w16))
    assert torch.equal(fp32_linear(torch.randn(2, 0), torch.randn(4, 0)), torch.zeros(2, 4))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the scalar build is -march=x86-64")
def test_fp32_linear_scalar_build(tmp_path):
    code = ("import torch; from dayzero.ops import ref; from dayzero.ops.cpu.dense import fp32_linear\n"
            "x = torch.randn(3, 100); w = torch.randn(50, 100).bfloat16()\n"
            "d = (fp32_linear(x, w) - ref.fp32_linear(x, w)).abs().max().item()\n"
            "assert d < 1e-4, d\n")
    scalar_build_runs("dense", code, tmp_path)


def test_kernel_table_preparation_keeps_the_checkpoint_tensors(make_ckpt):
    """set_ops with the native table re-homes FP8 pairs (wq_a+wkv, expert w1+w3) and FP4 expert
    stacks into shared storage: the state dict keeps every name, shape, dtype and value, and the
    fused GEMM gives each half exactly what the separate calls give."""
    from dayzero.loader.model_io import load_model
    from dayzero.ops import for_device
    from dayzero.reference.layers import fused_pair
    model = load_model(make_ckpt("flash", "fp8"), numerics="official")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_ops(for_device("cpu", "cpu"))
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and after[k].shape == v.shape
        assert torch.equal(after[k].view(torch.uint8) if v.dtype.itemsize == 1 else after[k],
                           v.view(torch.uint8) if v.dtype.itemsize == 1 else v), k
    attn = model.layers[0].attn
    assert attn.wq_a.__dict__.get("_pair") is attn.wkv
    x = torch.randn(3, model.args.dim)
    with torch.no_grad():
        a, b = fused_pair(attn.wq_a, attn.wkv, x)
        assert torch.equal(a, attn.wq_a(x)) and torch.equal(b, attn.wkv(x))


def test_hc_head_through_a_site_kernel_is_the_head(make_ckpt):
    """With a kernel table the final stream collapse runs as an mHC site padded with zero rows:
    the same formula as the literal hc_head, so with the twins' hc_pre or the native one it
    differs by fp32 summation order only (the projection has more rows)."""
    from dayzero.loader.model_io import load_model
    from dayzero.ops import REF, for_device
    model = load_model(make_ckpt("flash", "fp32"), numerics="transformers")
    X = torch.randn(5, model.args.hc_mult, model.args.dim)
    with torch.no_grad():
        want = model.hc_head(X)  # REF: the literal formula
        site = model._hc_head_as_site(X)
        assert (site - want).abs().max() <= 1e-5 * want.abs().max()
        model.set_ops(for_device("cpu", "cpu"))
        got = model.hc_head(X)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert model.ops is not REF
