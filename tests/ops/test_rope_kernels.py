"""The rotary-embedding kernels (native CPU, ops/cpu/rope.c; Triton, ops/triton/norm.py) are
bit-identical to the twin ref.apply_rope: the same fp32 products and sums in the same order, one
round-to-nearest-even cast to the activation dtype."""
from __future__ import annotations

import pytest
import torch

from dayzero.ops import ref

SHAPES = [  # x shape, cos shape (broadcast patterns the model uses)
    ((5, 4, 128), (5, 1, 32)),   # q / o of 4 heads, rope 64 of 128
    ((7, 128), (7, 32)),         # kv / compressed entries: one row per token
    ((3, 8, 64), (3, 1, 32)),    # indexer q: all 64 dims rotated (no nope part)
    ((2, 3, 40), (2, 1, 4)),     # odd sizes
    ((1, 1, 16), (1, 1, 8)),
    ((0, 4, 128), (0, 1, 32)),   # no tokens
]


def _impls():
    out = []
    from dayzero.ops.cpu import available
    if available("rope"):
        from dayzero.ops.cpu.rope import apply_rope
        out.append(pytest.param(apply_rope, id="cpu"))
    try:
        import triton  # noqa: F401
        from dayzero.ops.triton.norm import apply_rope as tri
        out.append(pytest.param(tri, id="triton"))
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,cs", SHAPES)
@pytest.mark.parametrize("inverse", [False, True])
def test_apply_rope_bit_exact(impl, dtype, shape, cs, inverse):
    dev = "cuda" if torch.cuda.is_available() and impl.__module__.endswith("norm") else "cpu"
    g = torch.Generator().manual_seed(hash((shape, inverse)) % 1000)
    x = (torch.randn(*shape, generator=g) * 4).to(dtype).to(dev)
    ang = (torch.randn(*cs, generator=g) * 300).to(dev)  # large angles: every quadrant
    got = impl(x, ang.cos(), ang.sin(), inverse)
    want = ref.apply_rope(x.cpu(), ang.cos().cpu(), ang.sin().cpu(), inverse)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("impl", _impls())
def test_apply_rope_other_broadcasts_fall_back_to_the_twin(impl):
    x = torch.randn(2, 3, 4, 32)
    ang = torch.randn(2, 1, 1, 8)  # a 4-d broadcast neither kernel takes
    assert torch.equal(impl(x, ang.cos(), ang.sin()), ref.apply_rope(x, ang.cos(), ang.sin()))


@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="the scalar build is -march=x86-64")
def test_native_rope_is_exact_in_the_scalar_build(tmp_path):
    from tests.ops.bounds import scalar_build_runs
    code = ("import torch; from dayzero.ops import ref; from dayzero.ops.cpu.rope import apply_rope\n"
            "x = torch.randn(9, 4, 128).bfloat16(); a = torch.randn(9, 1, 32) * 100\n"
            "assert torch.equal(apply_rope(x, a.cos(), a.sin(), True), ref.apply_rope(x, a.cos(), a.sin(), True))\n")
    scalar_build_runs("rope", code, tmp_path)
