"""Parity of the native CPU FP8 / FP4 GEMMs and routed-expert MoE (dayzero/ops/cpu/gemm.c) with
their twins in ops/ref.py.

Every check is an elementwise bound derived from the arithmetic, as in test_triton_gemm.py:
- The kernels' weights equal the twin's dequantised W exactly (the same fp32 product v*s, rounded
  to bf16 where the twin casts W to bf16), and products are formed exactly inside FMAs (bf16 x:
  vdpbf16ps), so the two sides differ only by fp32 summation order: each is within K*u*|x|.|w| of
  the exact sum (u = 2^-24), hence apart by at most delta = 2*K*u*|x|.|w|.
- bf16 outputs are rounded once: values delta apart round at most one bf16 ulp (<= 2^-7 of the
  value) apart: bound 2^-7*|ref| + 2*delta.
- MoE: the bound is propagated through the twin's intermediates (gate / up one flip each, silu
  1.1-Lipschitz, h one more flip, then the down projection as above), doubled for second-order
  terms; k slots are summed in fp32 (k*u*|y| more). With h_act_sim an h that may be off by r
  moves its FP8 simulation only where h +- r straddles an e4m3 rounding point (or the block's
  power-of-two scale): exactly that spread is allowed, 0 elsewhere.
Decoding of every FP4 / FP8 byte and the in-kernel FP8 activation simulation are checked exactly.
"""
from __future__ import annotations

import pytest
import torch

from dayzero.loader.formats import quant_fp4
from dayzero.ops import cpu, ref

if cpu.unavailable().get("gemm"):
    pytest.skip(f"gemm.c does not build here: {cpu.unavailable()['gemm']}", allow_module_level=True)

from dayzero.ops.cpu import gemm as G

from tests.ops.bounds import (fp4_weights as _fp4_w, fp8_dequant as _fp8_deq, fp8_weights as _fp8_w,  # noqa: E402
                              lin_bound as _lin_bound, moe_bound, native_build, per_threads, rand_x as _x,
                              within as _within)

DTYPES = [torch.float32, torch.bfloat16]
E8M0 = torch.float8_e8m0fnu


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread for the twins and the bounds: on a shared machine every multi-threaded
    PyTorch op stalls while another process holds a core (40 s instead of 6 s for this file). The
    kernels' teams run in test_results_do_not_depend_on_threads, which asks for two threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- FP8 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sdt", [E8M0, torch.float32], ids=["e8m0", "f32scale"])
@pytest.mark.parametrize("dt", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("O,K", [(1, 128), (70, 320), (200, 256), (256, 640), (130, 1100)])
def test_fp8_linear_parity(O, K, dt, sdt):
    """O=200/130: partial 128-row scale blocks; K=320/1100: partial 128-blocks and vector tails;
    M=3/8/11: the per-8-rows kernels (bf16 x: vdpbf16ps where the CPU has it), 11 = 8 + 3; M=17
    spans several 8-row blocks (K-chunked) or the many-rows path; M<=2 reads fp32 x in place."""
    w, s = _fp8_w(O, K, sdt, O + K)
    wd = _fp8_deq(w, s, dt)
    for M in (1, 2, 3, 8, 11, 17):
        x = _x(M, K, dt, M)
        want = ref.fp8_linear(x, w, s)
        _within(G.fp8_linear(x, w, s), want, _lin_bound(x, wd, want), f"M{M}")


def test_fp8_edges():
    """K=1 and K=129 (a one-column last block), strided x rows, uint8 scale bytes, empty inputs."""
    for M, O, K in ((1, 1, 1), (3, 130, 129), (2, 5, 17)):
        w, s = _fp8_w(O, K, E8M0, K)
        for dt in DTYPES:
            x = _x(M, 2 * K, dt, K)[:, :K]  # row stride 2K
            want = ref.fp8_linear(x, w, s)
            got = G.fp8_linear(x, w, s.view(torch.uint8))
            _within(got, want, _lin_bound(x, _fp8_deq(w, s, dt), want), f"K{K} {dt}")
    assert G.fp8_linear(x[:0], w, s).shape == (0, 5)
    w0, s0 = torch.zeros(3, 0, dtype=torch.float8_e4m3fn), torch.zeros(1, 0, dtype=torch.uint8).view(E8M0)
    assert torch.equal(G.fp8_linear(torch.zeros(2, 0), w0, s0), torch.zeros(2, 3))  # K = 0: zeros


def test_fp8_every_byte_decodes():
    """All 254 finite e4m3fn bytes, scales 2^-127 (byte 0) .. 2^119: x = I reads W back exactly
    (in bf16 too: one product, rounded once on both sides; scales >= 2^-27 there, as the twin's
    bf16 matmul flushes subnormal results to zero and the kernels do not)."""
    b = torch.arange(256, dtype=torch.uint8)
    b[0x7F], b[0xFF] = 0, 0x80  # the NaN codes (not decoded as NaN: see gemm.c)
    w = b.view(2, 128).view(torch.float8_e4m3fn)
    for dt in DTYPES:
        eye = torch.eye(128, dtype=dt)
        for byte in (0, 1, 100, 127, 140, 246) if dt == torch.float32 else (100, 127, 140, 246):
            s = torch.full((1, 1), byte, dtype=torch.uint8).view(E8M0)
            assert torch.equal(G.fp8_linear(eye, w, s), ref.fp8_linear(eye, w, s)), (dt, byte)
            for i in range(0, 128, 8):  # 8 rows at a time: the per-8-rows kernels read W back too
                assert torch.equal(G.fp8_linear(eye[i:i + 8], w, s), ref.fp8_linear(eye[i:i + 8], w, s)), (dt, byte, i)
        s32 = torch.full((1, 1), 0.3)  # fp32 scale: W = fl(v * 0.3), then bf16 for bf16 x
        assert torch.equal(G.fp8_linear(eye, w, s32), ref.fp8_linear(eye, w, s32)), dt
        for i in range(0, 128, 8):
            assert torch.equal(G.fp8_linear(eye[i:i + 8], w, s32), ref.fp8_linear(eye[i:i + 8], w, s32)), (dt, i)


def _act_sim_inputs(M, K, dt, seed):
    """Random rows plus exact e4m3 rounding ties (17, 19 at scale 1; 1.5*2^-9 subnormal tie)."""
    x = _x(M, K, torch.float32, seed, spread=3.0)
    x[0, :4] = torch.tensor([448.0, 17.0, -19.0, 1.5 * 2.0 ** -9])
    return x.to(dt)


@pytest.mark.parametrize("dt", DTYPES, ids=["fp32", "bf16"])
def test_fp8_linear_act_quant(dt):
    """act_quant=True: x is FP8-simulated in the kernel exactly as ref.fp8_act_sim (checked bit
    for bit below), then the W8A16 product: equal to the twin up to summation order."""
    for M, O, K, sdt in ((1, 70, 320, E8M0), (17, 256, 256, E8M0), (3, 70, 320, torch.float32)):
        w, s = _fp8_w(O, K, sdt, M + O)
        x = _act_sim_inputs(M, K, dt, M)
        xs = ref.fp8_act_sim(x, 128)
        want = ref.fp8_linear(x, w, s, act_quant=True)
        bound = _lin_bound(xs, _fp8_deq(w, s, dt), want)
        _within(G.fp8_linear(x, w, s, act_quant=True), want, bound, f"raw x M{M}")
        _within(G.fp8_linear(xs, w, s, True), want, bound, f"simulated x M{M}")


def _sim(x):
    out = torch.empty_like(x)
    G.kernels.sim(x.data_ptr(), x.stride(0), x.dtype == torch.bfloat16, x.shape[0], x.shape[1], out.data_ptr())
    return out


def test_fp8_act_sim_bit_exact():
    """The kernels' FP8 activation simulation == ref.fp8_act_sim bit for bit: every finite bf16
    value (blocks of 128 consecutive bit patterns, so scales from 2^-22 up), random fp32 over many
    magnitudes, exact ties, the amax floor, a partial block, and inf / NaN blocks (all NaN)."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    xb = bits[torch.isfinite(bits)]
    xb = xb[: xb.numel() // 384 * 384].view(-1, 384)
    assert torch.equal(_sim(xb).view(torch.int16), ref.fp8_act_sim(xb, 128).view(torch.int16))
    gen = torch.Generator().manual_seed(0)
    xf = torch.randn(64, 300, generator=gen) * torch.exp2(torch.randint(-30, 30, (64, 1), generator=gen).float())
    xf[0, :6] = torch.tensor([448.0, 17.0, -19.0, 1.5 * 2.0 ** -9, 2.0 ** -9 * 0.5, -0.0])
    xf[1] = 1e-6  # below the amax floor 1e-4
    xf[2, 5], xf[3, 130], xf[4, 299] = float("inf"), float("nan"), float("-inf")
    torch.testing.assert_close(_sim(xf), ref.fp8_act_sim(xf, 128), rtol=0, atol=0, equal_nan=True)
    nz = torch.isnan(ref.fp8_act_sim(xf, 128))
    assert nz[2, :128].all() and not nz[2, 128:].any() and nz[4, 256:].all()


# ---- FP4 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dt", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("O,K", [(1, 32), (70, 192), (200, 1024), (33, 1056)])
def test_fp4_linear_parity(O, K, dt):
    """K=32: one scale group; 192 / 1056: an odd number of groups (bf16 kernel: a half step) and
    partial 16-group scale vectors; 1024 / 1056 with M=17: K-chunked 8-row blocks (the last chunk
    of 1056 a single group); O=33 / 200: an unpaired last row, several 16-row sub-tiles; fp32
    scales too (the twin multiplies in fp32, then rounds W to bf16 for bf16 x)."""
    w, s = _fp4_w(O, K, O + K)
    s32 = ref.e8m0_float(s) * 1.37
    for sc in (s, s32):
        wd = ref.fp4_dequant(w, sc).to(dt)
        for M in (1, 2, 3, 17):
            x = _x(M, K, dt, M)
            want = ref.fp4_linear(x, w, sc)
            _within(G.fp4_linear(x, w, sc), want, _lin_bound(x, wd, want), f"M{M} {sc.dtype}")


def test_fp4_every_byte_decodes():
    """All 256 packed bytes (both nibbles, -0 included) with scale bytes 0..240: exact (bf16:
    bytes >= 5, as the twin's bf16 matmul flushes subnormal results to zero)."""
    w = torch.arange(256, dtype=torch.uint8).view(4, 64).view(torch.int8)
    for dt in DTYPES:
        lo = (0, 1) if dt == torch.float32 else (5, 9)
        s = torch.tensor([[*lo, 127, 240], [100, 127, 130, 200], [127] * 4, [5, 60, 127, 240]],
                         dtype=torch.uint8).view(E8M0)
        eye = torch.eye(128, dtype=dt)
        assert torch.equal(G.fp4_linear(eye, w, s), ref.fp4_linear(eye, w, s)), dt
        assert torch.equal(G.fp4_linear(eye, w.view(torch.uint8), s.view(torch.uint8)), ref.fp4_linear(eye, w, s))
    assert G.fp4_linear(eye[:0], w, s).shape == (0, 4)


def test_strided_weights_and_fallbacks():
    """Non-contiguous weights / scales are made contiguous; fp16 x and unsupported scale dtypes
    run the twin; a shape mismatch raises the twin's error."""
    w, s = _fp4_w(64, 128, 0)
    x = _x(2, 128, torch.bfloat16, 0)
    wt = w.t().contiguous().t()  # same values, column-major
    _within(G.fp4_linear(x, wt, s), ref.fp4_linear(x, w, s),
            _lin_bound(x, ref.fp4_dequant(w, s).to(x.dtype), ref.fp4_linear(x, w, s)), "strided")
    xh = x.half()
    assert torch.equal(G.fp4_linear(xh, w, s), ref.fp4_linear(xh, w, s))
    w8, s8 = _fp8_w(64, 128, E8M0, 0)
    assert torch.equal(G.fp8_linear(xh, w8, s8), ref.fp8_linear(xh, w8, s8))
    with pytest.raises(RuntimeError):
        G.fp8_linear(x[:, :64], w8, s8)


# ---- MoE ----------------------------------------------------------------------------------------
def _moe_inputs(N, E, k, dim, inter, dt, seed, subset=None, f32_scales=False, dup=False):
    gen = torch.Generator().manual_seed(seed)
    pool = subset if subset is not None else list(range(E))
    scores = torch.rand(N, len(pool), generator=gen)
    ids = torch.tensor(pool)[scores.topk(k, -1).indices]
    if dup:  # the same expert in two slots of a token
        ids[:, -1] = ids[:, 0]
    wts = torch.rand(N, k, generator=gen) + 0.1
    stacks = []
    for o, i in ((inter, dim), (inter, dim), (dim, inter)):
        w, sc = quant_fp4(torch.randn(E * o, i, generator=gen) * 0.5)  # per-row blocks: E experts at once
        w, sc = w.view(E, o, i // 2), sc.view(E, o, i // 32)
        stacks += [w, ref.e8m0_float(sc) * 0.7 if f32_scales else sc]
    x = (torch.randn(N, dim, generator=gen) * 2).to(dt)
    return (x, wts, ids.to(torch.int32 if seed % 2 else torch.int64), *stacks)


MOE_CASES = [(E, k, N) for E, k in ((1, 1), (4, 2), (9, 1), (9, 6)) for N in (1, 7, 20)]


@pytest.mark.parametrize("E,k,N", MOE_CASES)
def test_moe_experts_parity(E, k, N):
    """dim 64 / inter 32 (one partial 128-block for h_act_sim); dtype, limit and h_act_sim
    alternate over the cases; E=9 k=1 also runs with all tokens on experts {1, 5, 7} only
    (zero-token experts between used ones); E=1 N=20: 20 pairs on one expert (3 blocks of rows)."""
    i = MOE_CASES.index((E, k, N))
    dt, limit, sim = DTYPES[i % 2], (0.0, 0.7, 6.0)[i % 3], i % 4 >= 2
    subsets = [None] + ([[1, 5, 7]] if E == 9 and k == 1 else [])
    for sub in subsets:
        args = _moe_inputs(N, E, k, 64, 32, dt, seed=i, subset=sub)
        want = ref.moe_experts(*args, limit, sim)
        got = G.moe_experts(*args, limit, sim)
        _within(got, want, moe_bound(*args, limit, want, sim), f"{dt} limit {limit} sim {sim} subset {sub}")


def test_moe_variants():
    """h_act_sim over inter 160 (a full and a partial 128-block) in fp32, where the bound is tight
    enough that skipping the simulation fails; bf16 with limit over dim 1056 (8 pairs per expert:
    K-chunked, 33 groups); duplicate experts within a token; fp32 scale stacks (dim 96: a half
    64-block in the bf16 layout); many tokens on 2 experts."""
    cases = [  # (N, E, k, dim, inter, dt, limit, sim, extra)
        (4, 4, 2, 64, 160, torch.float32, 0.0, True, {}),
        (8, 2, 2, 1056, 32, torch.bfloat16, 0.7, False, {}),
        (6, 5, 3, 64, 64, torch.bfloat16, 0.0, True, {"dup": True}),
        (3, 4, 2, 96, 64, torch.bfloat16, 0.0, False, {"f32_scales": True}),
        (3, 4, 2, 96, 64, torch.float32, 0.0, True, {"f32_scales": True}),
        (40, 2, 2, 64, 32, torch.float32, 0.0, False, {}),
    ]
    for j, (N, E, k, dim, inter, dt, limit, sim, extra) in enumerate(cases):
        args = _moe_inputs(N, E, k, dim, inter, dt, seed=j, **extra)
        want = ref.moe_experts(*args, limit, sim)
        got = G.moe_experts(*args, limit, h_act_sim=sim)
        _within(got, want, moe_bound(*args, limit, want, sim), f"case {j}")
        if j == 0:
            assert not torch.equal(got, G.moe_experts(*args, limit, False))


def test_moe_edges():
    """Empty batches, ids out of range (both signs), bf16 routing weights."""
    args = list(_moe_inputs(3, 4, 2, 64, 32, torch.bfloat16, seed=0))
    out = G.moe_experts(*args, 0.0)
    assert out.dtype == torch.float32 and out.shape == (3, 64)
    empty = [args[0][:0], args[1][:0], args[2][:0], *args[3:]]
    assert torch.equal(G.moe_experts(*empty, 0.0), torch.zeros(0, 64))
    bad = list(args)
    bad[2] = bad[2].clone()
    bad[2][1, 0] = 4
    with pytest.raises(IndexError):
        G.moe_experts(*bad, 0.0)
    bad[2][1, 0] = -1
    with pytest.raises(IndexError):
        G.moe_experts(*bad, 0.0)
    wts16 = args[1].to(torch.bfloat16)  # any float routing weights: used in fp32 as the twin does
    _within(G.moe_experts(args[0], wts16, *args[2:], 0.0), ref.moe_experts(args[0], wts16, *args[2:], 0.0),
            moe_bound(args[0], wts16.float(), *args[2:], 0.0, out), "bf16 weights")


def test_moe_token_chunks(monkeypatch):
    """Prefill-sized batches run in chunks of tokens: the same result, bit for bit."""
    args = _moe_inputs(9, 4, 2, 64, 32, torch.bfloat16, seed=1)
    whole = G.moe_experts(*args, 0.0, True)
    monkeypatch.setattr(G, "MOE_CHUNK_PAIRS", 5)  # 2 tokens a call: 5 calls
    assert torch.equal(G.moe_experts(*args, 0.0, True), whole)
    bad = list(args)
    bad[2] = bad[2].clone()
    bad[2][8, 1] = 4  # in the last chunk
    with pytest.raises(IndexError):
        G.moe_experts(*bad, 0.0)


def test_moe_reads_each_expert_where_it_lies():
    """PerExpert lists (each expert's tensors in memory of their own, as a memory-mapped
    checkpoint leaves them) give the stacked result bit for bit, in the kernel (not the twin);
    the twin indexes them the same way. Experts 2.. of a list are clones made in reverse order,
    so no expert sits at stack[0] + e * stride."""
    from dayzero.ops.experts import PerExpert
    args = _moe_inputs(20, 5, 3, 96, 64, torch.bfloat16, seed=3)
    stacked = G.moe_experts(*args, 0.7, True)
    lists = [PerExpert([t[e].clone() for e in reversed(range(t.shape[0]))][::-1]) for t in args[3:]]
    spread = [l.addresses[1:] - l.addresses[:-1] for l in lists]
    assert any(bool((d != d[0]).any()) for d in spread)  # not one stack in disguise
    calls = []
    real = G.ref.moe_experts
    G.ref.moe_experts = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        got = G.moe_experts(*args[:3], *lists, 0.7, True)
    finally:
        G.ref.moe_experts = real
    assert not calls and torch.equal(got, stacked)
    assert torch.equal(ref.moe_experts(*args[:3], *lists, 0.7, True), ref.moe_experts(*args, 0.7, True))
    with pytest.raises(ValueError, match="expert 1"):
        PerExpert([args[3][0], args[3][1, :, :8]])


def test_results_do_not_depend_on_threads():
    """Reductions are never split between threads: bitwise equal for 1 and 2 threads, at sizes
    above the threshold where a team is used."""
    w, s = _fp4_w(512, 1024, 0)
    w8, s8 = _fp8_w(512, 1024, E8M0, 0)
    x = _x(3, 1024, torch.bfloat16, 0)
    margs = _moe_inputs(5, 4, 2, 256, 256, torch.bfloat16, seed=0)
    outs = per_threads(lambda: (G.fp4_linear(x, w, s), G.fp8_linear(x, w8, s8), G.moe_experts(*margs, 0.0, True)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    f4, f8, fm = outs[1]
    want = ref.fp4_linear(x, w, s)
    _within(f4, want, _lin_bound(x, ref.fp4_dequant(w, s).to(x.dtype), want), "fp4 team")
    want = ref.fp8_linear(x, w8, s8)
    _within(f8, want, _lin_bound(x, _fp8_deq(w8, s8, x.dtype), want), "fp8 team")
    want = ref.moe_experts(*margs, 0.0, True)
    _within(fm, want, moe_bound(*margs, 0.0, want, True), "moe team")


def test_op_table_uses_the_kernels():
    t = cpu.table()
    for op in ("fp8_linear", "fp4_linear", "moe_experts"):
        assert op in t.kernels and getattr(t, op) is getattr(G, op)


# ---- the other instruction sets of gemm.c ------------------------------------------------------------
def _other_paths_agree(dtypes=tuple(DTYPES)):
    """The parity checks above on a few shapes, for the other code paths of gemm.c."""
    for dt in dtypes:
        for sdt in (E8M0, torch.float32):
            w, s = _fp8_w(130, 329, sdt, 1)
            for M in (1, 3, 9):
                x = _x(M, 329, dt, M)
                want = ref.fp8_linear(x, w, s)
                _within(G.fp8_linear(x, w, s), want, _lin_bound(x, _fp8_deq(w, s, dt), want), f"fp8 {dt} {sdt}")
        x = _act_sim_inputs(3, 329, dt, 0)
        want = ref.fp8_linear(x, w, s, True)
        _within(G.fp8_linear(x, w, s, True), want,
                _lin_bound(ref.fp8_act_sim(x, 128), _fp8_deq(w, s, dt), want), "act_quant")
        w4, s4 = _fp4_w(33, 544, 2)
        for sc in (s4, ref.e8m0_float(s4) * 1.37):
            for M in (1, 9):
                x = _x(M, 544, dt, M)
                want = ref.fp4_linear(x, w4, sc)
                _within(G.fp4_linear(x, w4, sc), want, _lin_bound(x, ref.fp4_dequant(w4, sc).to(dt), want), "fp4")
        args = _moe_inputs(7, 4, 2, 64, 160, dt, seed=3)
        want = ref.moe_experts(*args, 0.7, True)
        _within(G.moe_experts(*args, 0.7, True), want, moe_bound(*args, 0.7, want, True), f"moe {dt}")
    b = torch.arange(256, dtype=torch.uint8)
    b[0x7F], b[0xFF] = 0, 0x80
    w = b.view(2, 128).view(torch.float8_e4m3fn)
    eye = torch.eye(128)
    s = torch.full((1, 1), 100, dtype=torch.uint8).view(E8M0)
    assert torch.equal(G.fp8_linear(eye, w, s), ref.fp8_linear(eye, w, s))
    w4 = torch.arange(256, dtype=torch.uint8).view(4, 64).view(torch.int8)
    s4 = torch.tensor([[0, 1, 127, 240]] * 4, dtype=torch.uint8).view(E8M0)
    assert torch.equal(G.fp4_linear(eye, w4, s4), ref.fp4_linear(eye, w4, s4))
    xb = _x(4, 300, torch.float32, 0, spread=5.0)
    assert torch.equal(_sim(xb), ref.fp8_act_sim(xb, 128))


def test_bf16_on_the_fp32_kernels():
    """bf16 activations through the fp32 kernels (CPUs with AVX-512 but not AVX512-BF16): each
    weight rounded to bf16 in-kernel where the scales are fp32."""
    G.kernels.options(0)
    try:
        _other_paths_agree((torch.bfloat16,))
    finally:
        G.kernels.options(1)


@pytest.mark.parametrize("march,flag", [("x86-64", None), ("haswell", "avx2")], ids=["scalar", "avx2"])
def test_fallback_builds(march, flag, monkeypatch, tmp_path):
    """gemm.c built for plain x86-64 (the C fallbacks) and for AVX2 (no AVX-512), in a private
    build cache, through the same Python wrappers."""
    monkeypatch.setattr(G, "kernels", G.bind(native_build("gemm", march, flag, monkeypatch, tmp_path)))
    _other_paths_agree()
