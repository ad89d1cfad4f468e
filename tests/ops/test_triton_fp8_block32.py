"""The Triton FP8 linear on 32x32 scale blocks (DeepSeek-V4.1's dense format: ops/triton/gemm.py
`fp8_linear(..., block=32)`, the W8A16 kernel with a scale tile per K tile) against the twin
(ref.fp8_linear(..., block=32): W dequantised, then multiplied).

Runs on the GPU when there is one, else on the Triton interpreter. Bounds as in test_triton_gemm.py
(the decoded, scaled and rounded W is the twin's bit for bit; only fp32 summation order differs);
exact checks where order cannot matter: x = I reads every weight back, each 32x32 block with its own
scale. Blocks of very different magnitudes (2^-8 .. 2^8) make a scale read from a neighbouring block fail
the exact checks by powers of two. Rows never depend on the row count (the configuration is chosen by
the weight shape only)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton has no wheel for this platform (test extras install it on Linux x86-64)")

from dayzero.loader.formats import dequant_fp8_block, quant_fp8_block
from dayzero.ops import ref
from dayzero.ops.triton import gemm as G
from tests.ops.bounds import lin_bound, within  # noqa: E402  (after the importorskip above)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
E8M0 = torch.float8_e8m0fnu
DTYPES = [torch.float32, torch.bfloat16]


def w32(O, K, sdt=E8M0, seed=0):
    """FP8 32x32 weights whose blocks span 2^-8 .. 2^8 in magnitude."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.randint(-8, 9, (-(-O // 32), -(-K // 32)), generator=g).float())
    w = torch.randn(O, K, generator=g) * 0.05 * mag.repeat_interleave(32, 0)[:O].repeat_interleave(32, 1)[:, :K]
    w, s = quant_fp8_block(w, 32, scale_dtype=sdt)
    return w.to(DEV), s.to(DEV)


def x_rows(M, K, dt, seed):
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed + 100)).to(DEV, dt)


def bound(x, w, s, want):
    return lin_bound(x, dequant_fp8_block(w, s, 32).to(x.dtype), want)


# BLOCK_K 16 .. 128 (a K tile holds 1/2 .. 4 scale columns), a K split, the M tile of 16
CONFIGS = [None, G._lin(16, 32, 32, 0, 4, 2), G._lin(16, 64, 128, 2, 4, 2), G._lin(16, 32, 16, 0, 4, 2)]


@pytest.mark.parametrize("sdt", [E8M0, torch.float32], ids=["e8m0", "f32scale"])
@pytest.mark.parametrize("dt", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("O,K", [(32, 32), (70, 333), (96, 256)])
def test_parity_and_row_invariance(O, K, dt, sdt):
    w, s = w32(O, K, sdt, O + K)
    if sdt is torch.float32:
        s = s * 1.37  # not powers of two: the scaled weight is rounded to x.dtype, as the twin does
    xs = x_rows(17, K, dt, O)
    for ci, cfg in enumerate(CONFIGS):
        full = G.fp8_linear(xs, w, s, block=32, config=cfg)
        for M in (1, 2, 5, 17):
            x = xs[:M]
            got = G.fp8_linear(x, w, s, block=32, config=cfg)
            want = ref.fp8_linear(x, w, s, block=32)
            within(got, want, bound(x, w, s, want), f"config {ci} M{M}")
            assert torch.equal(got, full[:M]), f"config {ci}: rows of a call of {M} differ from the same rows in 17"


@pytest.mark.parametrize("dt", DTYPES, ids=["fp32", "bf16"])
def test_identity_rows_give_every_weight_exactly(dt):
    """x = I: each output is one product, so the kernel gives the dequantised weight bit for bit, every
    32x32 block with its own scale (a wrong block's scale is off by a power of two), partial edge blocks."""
    for O, K in ((70, 333), (33, 95)):
        w, s = w32(O, K, E8M0, K)
        eye = torch.eye(K, dtype=dt, device=DEV)
        want = dequant_fp8_block(w, s, 32).to(dt).T
        for cfg in CONFIGS:
            assert torch.equal(G.fp8_linear(eye, w, s, block=32, config=cfg), want), (O, K, cfg)


def test_act_quant_simulates_x_then_w8a16():
    """act_quant with 32-blocks: x FP8-simulated per 128 (ref.fp8_act_sim), then the W8A16 kernel: the
    twin's result up to summation order (no W8A8 tensor-core path for 32-blocks)."""
    w, s = w32(70, 320, E8M0, 3)
    for dt in DTYPES:
        x = x_rows(5, 320, dt, 3) * 3
        want = ref.fp8_linear(x, w, s, act_quant=True, block=32)
        xs = ref.fp8_act_sim(x, 128)
        within(G.fp8_linear(x, w, s, act_quant=True, block=32), want, bound(xs, w, s, want), str(dt))


def test_shapes_and_other_blocks():
    """A 128-block scale is refused for block=32 by shape; other block sides run the twin; M = 0 is empty."""
    w, s = w32(64, 64)
    x = x_rows(2, 64, torch.bfloat16, 0)
    with pytest.raises(ValueError, match="scale must have shape"):
        G.fp8_linear(x, w, s[:1, :1], block=32)
    w16, s16 = quant_fp8_block(torch.randn(40, 48) * 0.05, 16)
    w16, s16 = w16.to(DEV), s16.to(DEV)
    assert torch.equal(G.fp8_linear(x_rows(3, 48, torch.float32, 1), w16, s16, block=16),
                       ref.fp8_linear(x_rows(3, 48, torch.float32, 1), w16, s16, block=16))
    assert G.fp8_linear(x[:0], w, s, block=32).shape == (0, 64)


def test_tune_has_cases_for_the_32_blocks(monkeypatch):
    """`dayzero tune` times fp8_linear on V4.1's 32x32 blocks under their own keys (O..-K..-b32,
    V4.1-Flash's wq_b and wo_b on GPUs), each case a real block=32 call, and the kernel looks its config
    up under that key."""
    assert {(o, k) for _, o, k, b in G._FP8_B32_GPU if b == 32} == {(32768, 1280), (5120, 8192)}
    cases = dict(G.TUNABLES["fp8_linear"].cases(DEV))
    assert set(cases) >= {"O70-K320", "O70-K320-b32"}
    cfg = G.TUNABLES["fp8_linear"].space[0]
    seen, launched = [], []
    real, launch = G.tuning.config, G._launch_linear
    monkeypatch.setattr(G.tuning, "config", lambda name, key, default, dev: seen.append(key) or real(name, key, default, dev))
    monkeypatch.setattr(G, "_launch_linear", lambda *a, **kw: launched.append((tuple(a[3].shape), kw["SB"])) or launch(*a, **kw))
    assert cases["O70-K320-b32"](cfg).shape == (3, 70)
    assert launched == [((3, 10), 32)]  # the case's scales are 32x32 blocks, the kernel reads them so
    w, s = w32(70, 320)
    G.fp8_linear(x_rows(3, 320, torch.bfloat16, 1), w, s, block=32)
    assert seen == ["O70-K320-b32"]
    assert "-b32" not in "".join(k for k in dict(G.TUNABLES["fp8_linear_w8a8"].cases(DEV)))  # no W8A8 path for 32-blocks
