"""Parity of the many-rows (prefill) path of gemm.c: from ROWS_MIN activation rows (linears) or
pairs routed to one expert (MoE), a panel of weight rows is decoded once into a buffer and a
register-tiled micro-kernel runs every row against it (see gemm.c). Same bounds as
test_cpu_gemm.py (fp32 sums in another order, products exact); the FP8 activation simulation
(act_quant) and h_act_sim stay bit-exact, which the bounds check through the simulated inputs.

Edge sizes: M just below / at / above the threshold and past one packed panel (48 rows), O not a
multiple of the 8-row tiles or the 32-row panels, K with partial 128-blocks (FP8), an odd number
of 32-groups (FP4, bf16: a half split64 block); bf16 and fp32 x, E8M0 and fp32 scales; MoE with
uneven expert loads (one expert over its threshold of 24 pairs, others below)."""
from __future__ import annotations

import pytest
import torch

from dayzero.ops import cpu, ref

if cpu.unavailable().get("gemm"):
    pytest.skip(f"gemm.c does not build here: {cpu.unavailable()['gemm']}", allow_module_level=True)

from dayzero.loader.formats import quant_fp4  # noqa: E402
from dayzero.ops.cpu import gemm as G  # noqa: E402

from tests.ops.bounds import (fp4_weights as _fp4_w, fp8_dequant as _fp8_deq, fp8_weights as _fp8_w,  # noqa: E402
                              lin_bound as _lin_bound, moe_bound, native_build, per_threads, rand_x as _x,
                              within as _within)


ROWS_MIN, MOE_ROWS_MIN = 16, 24  # gemm.c (AVX-512 and plain C builds)
DTYPES = [torch.float32, torch.bfloat16]
E8M0 = torch.float8_e8m0fnu


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


MS = (ROWS_MIN - 1, ROWS_MIN, ROWS_MIN + 1, 49, 97)  # 49: a last panel of one row


@pytest.mark.parametrize("sdt", [E8M0, torch.float32], ids=["e8m0", "f32scale"])
@pytest.mark.parametrize("dt", DTYPES, ids=["fp32", "bf16"])
def test_fp8_rows(dt, sdt):
    """O=203: partial tiles, panels and 128-row scale blocks; K=329: partial 128-block, K not a
    multiple of 32 (zero-padded positions)."""
    O, K = 203, 329
    w, s = _fp8_w(O, K, sdt, 7)
    wd = _fp8_deq(w, s, dt)
    for M in MS:
        x = _x(M, K, dt, M)
        want = ref.fp8_linear(x, w, s)
        _within(G.fp8_linear(x, w, s), want, _lin_bound(x, wd, want), f"M{M}")


@pytest.mark.parametrize("dt", DTYPES, ids=["fp32", "bf16"])
def test_fp8_rows_act_quant(dt):
    """act_quant: x FP8-simulated in the kernel exactly as ref.fp8_act_sim (raw x with act_quant
    equals pre-simulated x without it, bit for bit; both within the W8A16 bound around the twin);
    strided x rows."""
    w, s = _fp8_w(70, 300, E8M0, 3)
    for M in (ROWS_MIN, 50):
        x = _x(M, 600, torch.float32, M, spread=3.0)[:, :300]
        x[0, :4] = torch.tensor([448.0, 17.0, -19.0, 1.5 * 2.0 ** -9])
        x = x.to(dt)
        xs = ref.fp8_act_sim(x, 128)
        want = ref.fp8_linear(x, w, s, act_quant=True)
        bound = _lin_bound(xs, _fp8_deq(w, s, dt), want)
        _within(G.fp8_linear(x, w, s, act_quant=True), want, bound, f"raw x M{M}")
        _within(G.fp8_linear(xs, w, s, True), want, bound, f"simulated x M{M}")
        # the in-kernel simulation is bit-exact: the same rows reach the same kernel
        assert torch.equal(G.fp8_linear(x, w, s, act_quant=True), G.fp8_linear(xs.contiguous(), w, s)), M


@pytest.mark.parametrize("dt", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("O,K", [(37, 96), (130, 544)])
def test_fp4_rows(O, K, dt):
    """K=96 / 544: an odd number of 32-groups (a half split64 block in the bf16 layout); O=37 / 130
    partial tiles; E8M0 and fp32 scales (the twin rounds fl(v*s) to bf16 for bf16 x)."""
    w, s = _fp4_w(O, K, O + K)
    for sc in (s, ref.e8m0_float(s) * 1.37):
        wd = ref.fp4_dequant(w, sc).to(dt)
        for M in MS:
            x = _x(M, K, dt, M)
            want = ref.fp4_linear(x, w, sc)
            _within(G.fp4_linear(x, w, sc), want, _lin_bound(x, wd, want), f"M{M} {sc.dtype}")


def test_rows_every_byte_decodes():
    """Every FP8 / FP4 byte through the many-rows decoders, exact (identity x, 128 >= ROWS_MIN rows)."""
    b = torch.arange(256, dtype=torch.uint8)
    b[0x7F], b[0xFF] = 0, 0x80
    w8 = b.view(2, 128).view(torch.float8_e4m3fn)
    w4 = torch.arange(256, dtype=torch.uint8).view(4, 64).view(torch.int8)
    for dt in DTYPES:
        eye = torch.eye(128, dtype=dt)
        for byte in (100, 127, 140, 246):
            s = torch.full((1, 1), byte, dtype=torch.uint8).view(E8M0)
            assert torch.equal(G.fp8_linear(eye, w8, s), ref.fp8_linear(eye, w8, s)), (dt, byte)
        s32 = torch.full((1, 1), 0.3)
        assert torch.equal(G.fp8_linear(eye, w8, s32), ref.fp8_linear(eye, w8, s32)), dt
        lo = (0, 1) if dt == torch.float32 else (5, 9)
        s4 = torch.tensor([[*lo, 127, 240], [100, 127, 130, 200], [127] * 4, [5, 60, 127, 240]],
                          dtype=torch.uint8).view(E8M0)
        assert torch.equal(G.fp4_linear(eye, w4, s4), ref.fp4_linear(eye, w4, s4)), dt


def _moe_inputs(N, E, k, dim, inter, dt, seed, hot=None, f32_scales=False):
    """hot: (expert, share): that expert takes one slot of the first share of the tokens;
    hot "cyc": token n on experts n % E, (n + 1) % E, ... (even loads)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(N, E, generator=gen).topk(k, -1).indices
    if hot == "cyc":
        ids = (torch.arange(N)[:, None] + torch.arange(k)) % E
    elif hot is not None:
        e, share = hot
        n = int(N * share)
        ids[:n] = torch.stack([torch.tensor([e] + [j for j in range(E) if j != e][:k - 1])
                               [torch.randperm(k, generator=gen)] for _ in range(n)])
    wts = torch.rand(N, k, generator=gen) + 0.1
    stacks = []
    for o, i in ((inter, dim), (inter, dim), (dim, inter)):
        w, sc = quant_fp4(torch.randn(E * o, i, generator=gen) * 0.5)
        w, sc = w.view(E, o, i // 2), sc.view(E, o, i // 32)
        stacks += [w, ref.e8m0_float(sc) * 0.7 if f32_scales else sc]
    x = (torch.randn(N, dim, generator=gen) * 2).to(dt)
    return (x, wts, ids, *stacks)


@pytest.mark.parametrize("dt", DTYPES, ids=["fp32", "bf16"])
def test_moe_rows(dt):
    """Uneven loads: one expert with most pairs (many-rows path, > one 48-row panel), the others
    below the threshold (the per-8 path) in the same call; E=3 k=2 N=35: experts with 23 / 24
    pairs (the MoE threshold); inter 160 (h_act_sim: a full and a partial 128-block), dim 96 (a
    half split64 block); limit, h_act_sim and fp32 scales vary."""
    cases = [  # (N, E, k, dim, inter, limit, sim, hot, f32)
        (60, 6, 2, 96, 160, 0.7, True, (2, 0.9), False),
        (35, 3, 2, 64, 64, 0.0, False, "cyc", False),  # loads 23, 24, 23
        (33, 4, 1, 64, 96, 0.0, True, (1, 1.0), True),
        (70, 5, 3, 64, 32, 6.0, False, (4, 0.5), False),
    ]
    for j, (N, E, k, dim, inter, limit, sim, hot, f32) in enumerate(cases):
        args = _moe_inputs(N, E, k, dim, inter, dt, seed=j, hot=hot, f32_scales=f32)
        loads = torch.bincount(args[2].flatten(), minlength=E)
        assert loads.max() >= MOE_ROWS_MIN, loads
        want = ref.moe_experts(*args, limit, sim)
        got = G.moe_experts(*args, limit, sim)
        _within(got, want, moe_bound(*args, limit, want, sim), f"case {j} loads {loads.tolist()}")


def test_rows_threads_and_chunks(monkeypatch):
    """Bitwise equal for 1 and 2 threads (no reduction split between threads); MoE token chunks
    that take the hot expert below the threshold stay within the bound; the bf16 kernels and the fp32 kernels on bf16 x (options(0)) both within the bound."""
    w, s = _fp4_w(300, 512, 0)
    w8, s8 = _fp8_w(300, 512, torch.float32, 0)
    x = _x(70, 512, torch.bfloat16, 0)
    margs = _moe_inputs(40, 4, 2, 128, 64, torch.bfloat16, seed=5, hot=(0, 1.0))
    outs = per_threads(lambda: (G.fp4_linear(x, w, s), G.fp8_linear(x, w8, s8), G.moe_experts(*margs, 0.0, True)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    want = ref.moe_experts(*margs, 0.0, True)
    _within(outs[0][2], want, moe_bound(*margs, 0.0, want, True), "moe")
    monkeypatch.setattr(G, "MOE_CHUNK_PAIRS", 20)  # 10 tokens a call: the hot expert below the threshold
    _within(G.moe_experts(*margs, 0.0, True), want, moe_bound(*margs, 0.0, want, True), "moe chunks")
    G.kernels.options(0)
    try:
        f4, f8 = G.fp4_linear(x, w, s), G.fp8_linear(x, w8, s8)
    finally:
        G.kernels.options(1)
    want = ref.fp4_linear(x, w, s)
    _within(f4, want, _lin_bound(x, ref.fp4_dequant(w, s).to(x.dtype), want), "fp4 fp32 kernels")
    want = ref.fp8_linear(x, w8, s8)
    _within(f8, want, _lin_bound(x, _fp8_deq(w8, s8, x.dtype), want), "fp8 fp32 kernels")


def _rows_paths_agree():
    """70 rows / pairs: above the threshold of every build (AVX2: 64)."""
    for dt in DTYPES:
        w, s = _fp8_w(45, 200, torch.float32, 1)
        x = _x(70, 200, dt, 0)
        want = ref.fp8_linear(x, w, s, True)
        _within(G.fp8_linear(x, w, s, True), want, _lin_bound(ref.fp8_act_sim(x, 128), _fp8_deq(w, s, dt), want),
                f"fp8 {dt}")
        w4, s4 = _fp4_w(37, 96, 2)
        for sc in (s4, ref.e8m0_float(s4) * 1.37):
            want = ref.fp4_linear(x[:, :96], w4, sc)
            _within(G.fp4_linear(x[:, :96], w4, sc), want,
                    _lin_bound(x[:, :96], ref.fp4_dequant(w4, sc).to(dt), want), f"fp4 {dt}")
        args = _moe_inputs(70, 3, 2, 64, 160, dt, seed=3, hot=(1, 1.0))
        want = ref.moe_experts(*args, 0.7, True)
        _within(G.moe_experts(*args, 0.7, True), want, moe_bound(*args, 0.7, want, True), f"moe {dt}")


@pytest.mark.parametrize("march,flag", [("x86-64", None), ("haswell", "avx2")], ids=["scalar", "avx2"])
def test_rows_fallback_builds(march, flag, monkeypatch, tmp_path):
    """The many-rows path of gemm.c built for plain x86-64 (its C micro-kernel and decoders) and
    for AVX2, in a private build cache."""
    monkeypatch.setattr(G, "kernels", G.bind(native_build("gemm", march, flag, monkeypatch, tmp_path)))
    _rows_paths_agree()
