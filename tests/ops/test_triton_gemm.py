"""Parity of the Triton FP8 / FP4 GEMMs and the routed-expert MoE with their twins in ops/ref.py.

Runs on the GPU when there is one, else on the Triton interpreter (tests/conftest.py). Every check
is an elementwise error bound derived from the arithmetic, not a fixed tolerance:
- The dequantised weight is bit-identical to the twin's (same fp32 product, same cast to
  x.dtype), and products of two bf16 (or fp8) values are exact in fp32, so the two sides differ
  only by fp32 summation order: each is within K*u*|x|.|w| of the exact sum (u = 2^-24), hence
  apart by at most delta = 2*K*u*|x|.|w| (|x|.|w| the sum of absolute products).
- bf16 outputs are then rounded once: values delta apart round at most one bf16 ulp apart, and a
  bf16 ulp is <= 2^-7 of the value: bound 2^-7*|ref| + 2*delta.
- GPU FP8 tensor cores accumulate a 128-long block with a narrower accumulator (~2^-14 per add):
  2^-7*|x|.|w| more on the CUDA W8A8 path only.
- MoE: the bound is propagated through the twin's intermediates (gate/up one flip each, silu is
  1.1-Lipschitz, h one more flip, then the down projection as above), doubled for second-order
  terms; the k slots are summed in fp32 (another k*u*|y|). With h_act_sim an h that may be off
  by r moves its FP8 simulation only where h +- r straddles an e4m3 rounding point (or the
  block's power-of-two scale): exactly that spread is allowed, 0 elsewhere.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton has no wheel for this platform (test extras install it on Linux x86-64)")

from dayzero.loader.formats import quant_fp4, quant_fp8_block
from dayzero.ops import ref
from dayzero.ops.triton import gemm as G
from dayzero.ops.triton import moe as MOE

DEV = "cuda" if torch.cuda.is_available() else "cpu"
from tests.ops.bounds import FLIP, U, moe_bound, within as _within  # noqa: E402  (after the importorskip above, where there is one)
DTYPES = [torch.float32, torch.bfloat16]
E8M0 = torch.float8_e8m0fnu


def _lin_bound(x, w_deq, want, tensor_cores=False):
    """Error bound of x @ w_deq^T (w_deq already rounded to x.dtype) vs the twin's output."""
    absdot = x.abs().double() @ w_deq.abs().double().T
    delta = 2 * x.shape[1] * U * absdot + 1e-30
    if tensor_cores:
        delta = delta + 2.0 ** -7 * absdot
    flip = FLIP[x.dtype] if x.dtype != torch.float32 else 0.0
    return (flip * want.double().abs() + 2 * delta).float()


def _fp8_w(O, K, sdt, seed):
    gen = torch.Generator().manual_seed(seed)
    w, s = quant_fp8_block(torch.randn(O, K, generator=gen) * 0.05, scale_dtype=sdt)
    return w.to(DEV), s.to(DEV)


def _x(M, K, dt, seed, spread=1.0):
    gen = torch.Generator().manual_seed(seed + 100)
    return (torch.randn(M, K, generator=gen) * spread).to(DEV, dt)


def _fp8_deq(w, s, dt):
    return ref.fp8_linear(torch.eye(w.shape[1], device=DEV), w, s).T.to(dt)  # fp32 eye: exact


# ---- FP8 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sdt", [E8M0, torch.float32], ids=["e8m0", "f32scale"])
@pytest.mark.parametrize("dt", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("K", [128, 256, 320])
@pytest.mark.parametrize("O", [1, 70, 256])
def test_fp8_linear_parity(O, K, dt, sdt):
    w, s = _fp8_w(O, K, sdt, O + K)
    wd = _fp8_deq(w, s, dt)
    for M in (1, 5, 33):
        x = _x(M, K, dt, M)
        want = ref.fp8_linear(x, w, s)
        _within(G.fp8_linear(x, w, s), want, _lin_bound(x, wd, want), f"M{M}")


def test_fp8_edges():
    """K=1 and K=129 (a one-column last block), strided x rows, uint8 scale bytes, an empty batch."""
    for M, O, K in ((1, 1, 1), (3, 130, 129)):
        w, s = _fp8_w(O, K, E8M0, K)
        x = _x(M, 2 * K, torch.bfloat16, K)[:, :K]  # row stride 2K
        want = ref.fp8_linear(x, w, s)
        got = G.fp8_linear(x, w, s.view(torch.uint8))
        _within(got, want, _lin_bound(x, _fp8_deq(w, s, x.dtype), want), f"K{K}")
    assert G.fp8_linear(x[:0], w, s).shape == (0, 130)


def test_fp8_every_byte_decodes():
    """All 254 finite e4m3fn bytes, scales 2^-127 (byte 0) .. 2^119: x = I reads W back exactly."""
    b = torch.arange(256, dtype=torch.uint8)
    b[0x7F], b[0xFF] = 0, 0x80  # the NaN codes would make every dot NaN
    w = b.view(2, 128).view(torch.float8_e4m3fn).to(DEV)
    eye = torch.eye(128, device=DEV)
    for byte in (0, 1, 100, 127, 140, 246):
        s = torch.full((1, 1), byte, dtype=torch.uint8).view(E8M0).to(DEV)
        assert torch.equal(G.fp8_linear(eye, w, s), ref.fp8_linear(eye, w, s)), byte


def _act_sim_inputs(M, K, dt, seed):
    """Random rows plus exact e4m3 rounding ties (17, 19 at scale 1; 1.5*2^-9 subnormal tie)."""
    x = _x(M, K, torch.float32, seed, spread=3.0)
    x[0, :4] = torch.tensor([448.0, 17.0, -19.0, 1.5 * 2.0 ** -9])
    return x.to(dt)


@pytest.mark.skipif(DEV == "cuda" and torch.cuda.get_device_capability() < (8, 9), reason="FP8 tensor cores")
@pytest.mark.parametrize("dt", DTYPES, ids=["fp32", "bf16"])
def test_fp8_linear_act_quant(dt):
    """W8A8: activations quantised in-kernel as ref.fp8_act_sim (CPU: emulated on the e4m3 grid),
    equal to the twin on fp8_act_sim(x) up to summation order; fp32 scales too (x fp32: tensor
    cores; x bf16: simulated + W8A16, which is what the twin rounds)."""
    for M, O, K, sdt in ((1, 70, 320, E8M0), (33, 256, 256, E8M0), (5, 70, 320, torch.float32)):
        w, s = _fp8_w(O, K, sdt, M + O)
        x = _act_sim_inputs(M, K, dt, M)
        xs = ref.fp8_act_sim(x, 128)
        want = ref.fp8_linear(xs, w, s)
        tc = DEV == "cuda" and (sdt == E8M0 or dt == torch.float32)
        bound = _lin_bound(xs, _fp8_deq(w, s, dt), want, tensor_cores=tc)
        _within(G.fp8_linear(x, w, s, act_quant=True), want, bound, f"raw x M{M}")
        _within(G.fp8_linear(xs, w, s, act_quant=True), want, bound, f"simulated x M{M}")


# ---- FP4 ----------------------------------------------------------------------------------------
def _fp4_w(O, K, seed):
    gen = torch.Generator().manual_seed(seed)
    w, s = quant_fp4(torch.randn(O, K, generator=gen) * torch.rand(O, 1, generator=gen))
    return w.to(DEV), s.to(DEV)


@pytest.mark.parametrize("dt", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("K", [32, 128, 192])
@pytest.mark.parametrize("O", [1, 70, 256])
def test_fp4_linear_parity(O, K, dt):
    """K=32: one scale group; 192: a partial BLOCK_K=128 tile (its last two groups masked off)."""
    w, s = _fp4_w(O, K, O + K)
    wd = ref.fp4_dequant(w, s).to(dt)
    for M in (1, 5, 33):
        x = _x(M, K, dt, M)
        want = ref.fp4_linear(x, w, s)
        _within(G.fp4_linear(x, w, s), want, _lin_bound(x, wd, want), f"M{M}")


def test_fp4_every_byte_decodes():
    """All 256 packed bytes (both nibbles, -0 included) with scale bytes 0..240: exact."""
    w = torch.arange(256, dtype=torch.uint8).view(4, 64).view(torch.int8).to(DEV)
    s = torch.tensor([[0, 1, 127, 240], [100, 127, 130, 200], [127] * 4, [5, 60, 127, 240]],
                     dtype=torch.uint8).view(E8M0).to(DEV)
    eye = torch.eye(128, device=DEV)
    assert torch.equal(G.fp4_linear(eye, w, s), ref.fp4_linear(eye, w, s))


# ---- MoE ----------------------------------------------------------------------------------------
def _moe_inputs(N, E, k, dim, inter, dt, seed, subset=None):
    gen = torch.Generator().manual_seed(seed)
    pool = subset if subset is not None else list(range(E))
    scores = torch.rand(N, len(pool), generator=gen)
    ids = torch.tensor(pool)[scores.topk(k, -1).indices]
    wts = torch.rand(N, k, generator=gen) + 0.1
    stacks = []
    for o, i in ((inter, dim), (inter, dim), (dim, inter)):
        q = [quant_fp4(torch.randn(o, i, generator=gen) * 0.5) for _ in range(E)]
        stacks += [torch.stack([a for a, _ in q]).to(DEV), torch.stack([b for _, b in q]).to(DEV)]
    x = (torch.randn(N, dim, generator=gen) * 2).to(DEV, dt)
    return (x, wts.to(DEV), ids.to(DEV, torch.int32 if seed % 2 else torch.int64), *stacks)


MOE_CASES = [(E, k, N) for E, k in ((1, 1), (4, 1), (4, 2), (9, 1), (9, 2), (9, 6)) for N in (1, 7, 20)]


@pytest.mark.parametrize("E,k,N", MOE_CASES)
def test_moe_experts_parity(E, k, N):
    """dim 64 / inter 32 (one partial 128-block for h_act_sim); dtype, limit and h_act_sim
    alternate over the cases; E=9 cases also run with all tokens routed to experts {1, 5, 7}
    only (zero-token experts between used ones)."""
    i = MOE_CASES.index((E, k, N))
    dt, limit, sim = DTYPES[i % 2], (0.0, 0.7, 6.0)[i % 3], i % 4 >= 2
    subsets = [None] + ([[1, 5, 7]] if E == 9 and k <= 3 else [])
    for sub in subsets:
        args = _moe_inputs(N, E, k, 64, 32, dt, seed=i, subset=sub)
        want = ref.moe_experts(*args, limit, sim)
        got = MOE.moe_experts(*args, limit, sim)
        _within(got, want, moe_bound(*args, limit, want, sim), f"{dt} limit {limit} sim {sim} subset {sub}")


def test_moe_h_act_sim_and_determinism():
    """h_act_sim over inter 160 (a full and a partial 128-block) in fp32, where the bound is tight
    enough that skipping the simulation fails; bf16 with limit; bit-identical repeats."""
    for dt, limit, inter in ((torch.float32, 0.0, 160), (torch.bfloat16, 0.7, 32)):
        args = _moe_inputs(4, 4, 2, 64, inter, dt, seed=7)
        want = ref.moe_experts(*args, limit, True)
        got = MOE.moe_experts(*args, limit, h_act_sim=True)
        _within(got, want, moe_bound(*args, limit, want, True), f"{dt} {limit}")
    assert torch.equal(got, MOE.moe_experts(*args, limit, True))


# ---- tuning -------------------------------------------------------------------------------------
def _cfg_id(c):
    return "-".join(map(str, c.values()))


@pytest.mark.parametrize("cfg", G.TUNABLES["fp8_linear"].space, ids=_cfg_id)
def test_fp8_every_config_agrees(cfg):
    """M=33 spans BLOCK_M tiles, O=130 BLOCK_O tiles, K=320 gives split-K 2/4 uneven splits."""
    for dt, sdt in ((torch.float32, E8M0), (torch.bfloat16, torch.float32)):
        w, s = _fp8_w(130, 320, sdt, 1)
        x = _x(33, 320, dt, 2)
        want = ref.fp8_linear(x, w, s)
        _within(G.fp8_linear(x, w, s, config=cfg), want, _lin_bound(x, _fp8_deq(w, s, dt), want), dt)


@pytest.mark.skipif(DEV == "cuda" and torch.cuda.get_device_capability() < (8, 9), reason="FP8 tensor cores")
@pytest.mark.parametrize("cfg", G.TUNABLES["fp8_linear_w8a8"].space, ids=_cfg_id)
def test_fp8_w8a8_every_config_agrees(cfg):
    w, s = _fp8_w(130, 320, E8M0, 1)
    x = _act_sim_inputs(33, 320, torch.bfloat16, 3)
    xs = ref.fp8_act_sim(x, 128)
    want = ref.fp8_linear(xs, w, s)
    bound = _lin_bound(xs, _fp8_deq(w, s, x.dtype), want, tensor_cores=DEV == "cuda")
    _within(G.fp8_linear(x, w, s, act_quant=True, config=cfg), want, bound, "w8a8")


@pytest.mark.parametrize("cfg", G.TUNABLES["fp4_linear"].space, ids=_cfg_id)
def test_fp4_every_config_agrees(cfg):
    """As for FP8; the dtype alternates over the configs (the grid above covers both)."""
    for dt in DTYPES[G.TUNABLES["fp4_linear"].space.index(cfg) % 2:][:1]:
        w, s = _fp4_w(130, 320, 1)
        x = _x(33, 320, dt, 2)
        want = ref.fp4_linear(x, w, s)
        _within(G.fp4_linear(x, w, s, config=cfg), want, _lin_bound(x, ref.fp4_dequant(w, s).to(dt), want), dt)


@pytest.mark.parametrize("cfg", MOE.TUNABLES["moe_experts"].space, ids=_cfg_id)
def test_moe_every_config_agrees(cfg):
    """N=20, k=2 over 2 experts (20 rows each: two BLOCK_M=16 row tiles per expert);
    dim 96 / inter 64 are not multiples of every BLOCK_K / BLOCK_O."""
    args = _moe_inputs(20, 2, 2, 96, 64, torch.bfloat16, seed=3)
    want = ref.moe_experts(*args, 0.7)
    _within(MOE.moe_experts(*args, 0.7, config=cfg), want, moe_bound(*args, 0.7, want), "moe")


def test_tuning_cases_run():
    for name, tunable in G.TUNABLES.items():
        assert 3 <= len(tunable.space) <= 8, name
        for key, run in tunable.cases(torch.device(DEV)):
            assert isinstance(key, str) and run(tunable.space[0]).shape[0] >= 1


def test_bad_inputs():
    w, s = _fp8_w(70, 128, E8M0, 0)
    x = _x(2, 128, torch.bfloat16, 0)
    with pytest.raises(ValueError, match="weight"):
        G.fp8_linear(x, w.float(), s)
    with pytest.raises(ValueError, match="scale"):
        G.fp8_linear(x, w, s[:, :0])
    with pytest.raises(ValueError, match="scale"):
        G.fp8_linear(x, w, s.view(torch.uint8).to(torch.int32))
    with pytest.raises(ValueError, match="x"):
        G.fp8_linear(x[:, :64], w, s)
    with pytest.raises(ValueError, match="config"):
        G.fp8_linear(x, w, s, config=G._lin(16, 64, 256, 1, 4, 1))
    w4, s4 = _fp4_w(70, 128, 0)
    with pytest.raises(ValueError, match="scale"):
        G.fp4_linear(x, w4, s4[:, :2])
    with pytest.raises(ValueError, match="weight"):
        G.fp4_linear(x, w4.float(), s4)
    args = list(_moe_inputs(3, 4, 2, 64, 32, torch.bfloat16, seed=0))
    for pos, name in ((5, "w3"), (8, "s2"), (2, "ids")):
        bad = list(args)
        bad[pos] = bad[pos][:, :1] if pos != 2 else bad[pos].float()
        with pytest.raises(ValueError, match=name):
            MOE.moe_experts(*bad, 0.0)
