"""The native CPU wrappers keep a weight's checked kernel arguments on the weight (gemm.py `_held`,
dense.py): a weight changed in any way that moves its memory, shape, dtype or layout, or paired
with another scale, must be checked again and never read at a stale address. Each case keeps the
old tensor alive, so a stale pointer would read valid memory holding the old values and give a
wrong result rather than crash. Also: moe.swiglu_owned, the in-place SwiGLU of the experts, is
bit-identical to ref.swiglu."""
from __future__ import annotations

import pytest
import torch

from dayzero.ops import cpu, ref
from dayzero.reference.moe import swiglu_owned

if cpu.unavailable().get("gemm") or cpu.unavailable().get("dense"):
    pytest.skip(f"gemm.c / dense.c do not build here: {cpu.unavailable()}", allow_module_level=True)

from dayzero.ops.cpu import dense as D  # noqa: E402
from dayzero.ops.cpu import gemm as G  # noqa: E402

from tests.ops.bounds import fp4_weights, fp8_weights  # noqa: E402

E8M0 = torch.float8_e8m0fnu


def _fresh(t: torch.Tensor) -> torch.Tensor:
    return t.clone()  # another tensor object, nothing kept on it


def _cases(w: torch.Tensor, w_other: torch.Tensor):
    """In-place changes of `w` (yielded after applying each); the old contents stay alive in `keep`."""
    keep = [w.data]
    w.data = w_other.clone()  # a new first byte, same shape
    yield "data replaced"
    keep.append(w.data)
    w.copy_(w_other.flip(0))  # same memory, new values: read in place, nothing to check again
    yield "copied into"
    w.data = w.data[: w.shape[0] // 2]  # the same first byte, fewer rows
    yield "fewer rows"


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_linear_never_serves_a_stale_weight(dt):
    w, s = fp8_weights(256, 256, E8M0, 1)
    w2, _ = fp8_weights(256, 256, E8M0, 2)
    w, s = torch.nn.Parameter(w, requires_grad=False), torch.nn.Parameter(s, requires_grad=False)
    x = torch.randn(3, 256).to(dt)
    assert torch.equal(G.fp8_linear(x, w, s), G.fp8_linear(x, _fresh(w), _fresh(s)))
    assert G._HELD in w.__dict__  # the arguments are kept (what the cases below exercise)
    for what in _cases(w, w2):
        sc = s if w.shape[0] == 256 else s[: w.shape[0] // 128]
        assert torch.equal(G.fp8_linear(x, w, sc), G.fp8_linear(x, _fresh(w), _fresh(sc))), what
    # another scale for the same weight (bytes instead of float8_e8m0fnu, then other values)
    w, s = fp8_weights(256, 256, E8M0, 3)
    G.fp8_linear(x, w, s)
    s2 = torch.full_like(s.view(torch.uint8), 120)
    assert torch.equal(G.fp8_linear(x, w, s2), G.fp8_linear(x, _fresh(w), _fresh(s2)))
    # the same weight as 32 x 32 blocks (V4.1): another block side is another entry
    s32 = torch.full((8, 8), 126, dtype=torch.uint8).view(E8M0)
    assert torch.equal(G.fp8_linear(x, w, s32, block=32), G.fp8_linear(x, _fresh(w), _fresh(s32), block=32))
    # a weight made strided in place (t_ of a square weight: same first byte and shape) is copied, as before
    w.t_()
    assert not w.is_contiguous()
    assert torch.equal(G.fp8_linear(x, w, s2), G.fp8_linear(x, w.contiguous(), s2))


def test_fp4_and_grouped_never_serve_a_stale_weight():
    w, s = fp4_weights(64, 256, 0)
    w2, _ = fp4_weights(64, 256, 1)
    x = torch.randn(2, 256)
    G.fp4_linear(x, w, s)
    assert G._HELD in w.__dict__
    for what in _cases(w, w2):
        sc = s[: w.shape[0]]
        assert torch.equal(G.fp4_linear(x, w, sc), G.fp4_linear(x, _fresh(w), _fresh(sc))), what
    wg, sg = fp8_weights(512, 128, E8M0, 4)
    wg2, _ = fp8_weights(512, 128, E8M0, 5)
    xg = torch.randn(2, 256)
    got = G.fp8_linear_grouped(xg, wg, sg, 2)
    assert G._HELD in wg.__dict__ and torch.equal(got, G._grouped_loop(xg, wg, sg, 2))
    # the same weight as 4 groups: another entry (and the twin's error where x does not fit)
    with pytest.raises(ValueError):
        G.fp8_linear_grouped(xg, wg, sg, 4)
    x4 = torch.randn(2, 512)
    assert torch.equal(G.fp8_linear_grouped(x4, wg, sg, 4), G._grouped_loop(x4, wg, sg, 4))
    assert torch.equal(G.fp8_linear_grouped(xg, wg, sg, 2), got)  # and back to 2 groups
    keep = wg.data
    wg.data = wg2.clone()
    assert torch.equal(G.fp8_linear_grouped(xg, wg, sg, 2), G._grouped_loop(xg, _fresh(wg2), sg, 2))
    del keep


def test_fp32_linear_never_serves_a_stale_weight():
    w = torch.randn(48, 64).bfloat16()
    w2 = torch.randn(48, 64).bfloat16()
    x = torch.randn(5, 64)
    assert torch.equal(D.fp32_linear(x, w), D.fp32_linear(x, _fresh(w)))
    assert D._HELD in w.__dict__
    for what in _cases(w, w2):
        assert torch.equal(D.fp32_linear(x, w), D.fp32_linear(x, _fresh(w))), what
    keep = w.data
    w.data = w.data.float()  # another dtype (and memory)
    assert torch.equal(D.fp32_linear(x, w), D.fp32_linear(x, _fresh(w)))
    w.data = keep.view(torch.int16)  # the same first byte and shape, a dtype the kernel does not take: the twin
    assert torch.equal(D.fp32_linear(x, w), ref.fp32_linear(x, w))
    xh = x.half()  # fp16 x upcast exactly, as before
    w3 = torch.randn(48, 64)
    D.fp32_linear(x, w3)
    assert torch.equal(D.fp32_linear(xh, w3), D.fp32_linear(xh.float(), _fresh(w3)))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("M,r", [(1, 256), (3, 128), (8, 256), (16, 2048), (1, 96), (5, 8), (17, 2048)])
def test_swiglu_owned_is_the_twin(M, r):
    """Bit for bit (signed zeros, NaNs, infinities, values at and past the limit), for the halves of
    a fused projection (strided views) and for whole tensors; widths off the 64 lanes and calls
    past one chunk (17 x 2048) run the twin."""
    gen = torch.Generator().manual_seed(M * r)
    y = torch.randn(M, 2 * r, generator=gen) * 6
    special = torch.tensor([0.0, -0.0, 10.0, -10.0, 10.000001, -10.000001, float("inf"), -float("inf"), float("nan"),
                            1e-40, -88.0, 88.0])
    flat = y.view(-1)
    flat[: special.numel()] = special
    flat[-special.numel():] = special.flip(0)
    for limit in (10.0, 7.0):
        want = ref.swiglu(y[:, :r], y[:, r:], limit)
        ys = y.clone()
        got = swiglu_owned(*torch.split_with_sizes(ys, (r, r), 1), limit)
        assert torch.equal(_bits(got), _bits(want)), f"halves, limit {limit}"
        g, u = y[:, :r].contiguous(), y[:, r:].contiguous()
        assert torch.equal(_bits(swiglu_owned(g, u, limit)), _bits(want)), f"whole, limit {limit}"
    want = ref.swiglu(y[:, :r], y[:, r:], 0.0)  # no clamp: the twin (whose silu reads gate as given)
    g = y[:, :r].clone()
    assert torch.equal(_bits(swiglu_owned(g, y[:, r:].clone(), 0.0)), _bits(want))
    assert torch.equal(_bits(g), _bits(y[:, :r]))  # the twin leaves its inputs as they are


@pytest.mark.skipif(bool(cpu.unavailable().get("mhc")), reason="mhc.c does not build here")
def test_rms_norm_never_serves_a_stale_weight():
    from dayzero.ops.cpu import mhc as H
    x = torch.randn(3, 256)
    w = torch.randn(256).bfloat16()
    H.rms_norm(x, w, 1e-6)
    assert H._HELD in w.__dict__
    keep = w.data
    w.data = torch.randn(256).bfloat16()
    assert torch.equal(H.rms_norm(x, w, 1e-6), H.rms_norm(x, _fresh(w), 1e-6))
    w.data = w.data.float()  # another dtype: read as fp32
    assert torch.equal(H.rms_norm(x, w, 1e-6), H.rms_norm(x, _fresh(w), 1e-6))
    w.data = keep[:128]  # the same first byte, a width that no longer fits x: the twin's error
    with pytest.raises(RuntimeError):
        H.rms_norm(x, w, 1e-6)
