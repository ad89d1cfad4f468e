"""FP8 weights in 32x32 scale blocks (DeepSeek-V4.1's dense format) on the native CPU linear
(gemm.c `dz_fp8_linear_b`, ops/cpu/gemm.py `fp8_linear(..., block=32)`) against the twin
(ref.fp8_linear(..., block=32): W dequantised, then multiplied), and `Fp8Linear32` choosing between them.

Bounds as in test_cpu_gemm.py (tests/ops/bounds.py lin_bound): the kernel's weights are the twin's
dequantised W exactly, so the two differ by fp32 summation order only. Exact checks: an identity x (one
product per output: order cannot matter) gives every dequantised weight, each block's scale included;
a row's result is identical whatever the number of rows in the call (M = 1..17: the decode kernels, the
5-8-row kernel and the many-rows path) and for 1 or 2 threads; the 128-block path is the same code as
before (`block=128` and `dz_fp8_linear` give the same bits).
"""
from __future__ import annotations

import copy

import pytest
import torch

from dayzero.loader.formats import dequant_fp8_block, quant_fp8_block
from dayzero.ops import REF, cpu, ref

if cpu.unavailable().get("gemm"):
    pytest.skip(f"gemm.c does not build here: {cpu.unavailable()['gemm']}", allow_module_level=True)

from dayzero.ops.cpu import gemm as G  # noqa: E402

from tests.ops.bounds import lin_bound, native_build, per_threads, rand_x, within  # noqa: E402
from tests.ops.test_cpu_gemm_rows import _one_thread  # noqa: E402, F401 (autouse: one thread in this module)

E8M0 = torch.float8_e8m0fnu
DTYPES = [torch.float32, torch.bfloat16]
# O, K: whole blocks, edge blocks in O and K (partial 32-blocks, a partial last 128-run of K, K < 32)
SHAPES = [(32, 32), (70, 333), (33, 95), (128, 1000), (2, 17), (64, 4096)]


def w32(O, K, sdt=E8M0, seed=0):
    """FP8 32x32 weights whose blocks span 2^-8 .. 2^8 in magnitude, so a block read with another block's
    scale is far outside any bound."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.randint(-8, 9, (-(-O // 32), -(-K // 32)), generator=g).float())
    w = torch.randn(O, K, generator=g) * 0.05 * mag.repeat_interleave(32, 0)[:O].repeat_interleave(32, 1)[:, :K]
    return quant_fp8_block(w, 32, scale_dtype=sdt)


def wdeq(w, s, dt):
    return dequant_fp8_block(w, s, 32).to(dt)


PATHS = {  # (bf16 x on vdpbf16ps, integer weight decoding): every FP8 route of gemm.c on this CPU
    "default": (1, 1),
    "float-decode": (1, 0),
    "fp32-kernels": (0, 1),
}


@pytest.fixture(params=list(PATHS))
def path(request):
    bf16dot, fast = PATHS[request.param]
    G.kernels.options(bf16dot)
    G.kernels.fast_decode(fast)
    yield request.param
    G.kernels.options(1)
    G.kernels.fast_decode(1)


def test_the_twin_is_dequantise_then_multiply():
    w, s = w32(70, 333)
    for dt in DTYPES:
        x = rand_x(5, 333, dt, 0)
        assert torch.equal(ref.fp8_linear(x, w, s, block=32), ref.linear(x, wdeq(w, s, dt)))


@pytest.mark.parametrize("sdt", [E8M0, torch.float32], ids=["e8m0", "f32scale"])
@pytest.mark.parametrize("dt", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("O,K", SHAPES)
def test_parity_and_row_invariance(O, K, dt, sdt, path):
    """M = 1..17 rows: within the summation-order bound of the twin, and every row identical to the
    same row computed in a call of 17."""
    w, s = w32(O, K, sdt, O + K)
    if sdt is torch.float32:
        s = s * 1.37  # not powers of two: the bf16 routes round each scaled weight (the twin's W)
    wd = wdeq(w, s, dt)
    xs = rand_x(17, K, dt, O)
    full = G.fp8_linear(xs, w, s, block=32)
    for M in range(1, 18):
        x = xs[:M]
        got = G.fp8_linear(x, w, s, block=32)
        want = ref.fp8_linear(x, w, s, block=32)
        within(got, want, lin_bound(x, wd, want), f"{path} M{M}")
        assert torch.equal(got, full[:M]), f"{path}: rows of a call of {M} differ from the same rows in 17"


@pytest.mark.parametrize("dt", DTYPES, ids=["fp32", "bf16"])
def test_identity_rows_give_every_weight_exactly(dt, path):
    """x = rows of the identity: each output is one product, so every path must give the dequantised
    weight bit for bit (every 32x32 block with its own scale; bf16: exact, E8M0 scales)."""
    for O, K in ((70, 333), (33, 95), (96, 256)):
        w, s = w32(O, K, E8M0, K)
        eye = torch.eye(K, dtype=dt)
        want = wdeq(w, s, dt).T
        for k0, n in ((0, 1), (3, 4), (K - 7, 7), (0, K)):  # decode kernels (1-15 rows), many rows (K rows)
            assert torch.equal(G.fp8_linear(eye[k0:k0 + n], w, s, block=32), want[k0:k0 + n]), (path, O, K, k0, n)


def test_every_byte_at_scale_bytes_around_the_fast_range():
    """x = I reads each decoded weight back: every e4m3 byte in every 32-block of a row (8 rows, each all
    256 codes, rolled by a block per row), at scale bytes on both sides of the integer decode's bounds for
    32-blocks (fastdecode.h FP8_SB_LO32 = 10, FP8_SB_HI = 246; a row with one byte outside takes the float
    route), through the 1-4-row and 5-8-row decode kernels: the integer decode's words equal the float
    route's bit for bit, and the twin's where its bf16 matmul does not flush (scales >= 2^-27) and the
    kernels' scale x 2^8 does not overflow (<= 2^119: the 128 path's range, test_cpu_gemm)."""
    b = torch.arange(256, dtype=torch.uint8)
    b[0x7F], b[0xFF] = 0, 0x80  # the NaN codes (+-480 in the kernels, NaN in the twin): left out
    w = torch.stack([b.roll(32 * r) for r in range(8)]).view(torch.float8_e4m3fn)  # [8, 256]: 8 blocks of 32
    eye = torch.eye(256, dtype=torch.bfloat16)
    for row in ((10, 11, 12, 100, 127, 140, 200, 246), (9, 10, 11, 100, 127, 140, 200, 246),
                (100, 127, 140, 200, 246, 247, 10, 11), (7, 8, 100, 1, 0, 254, 255, 127)):
        s = torch.tensor([row], dtype=torch.uint8).view(E8M0)
        for n in (3, 8):
            for i in range(0, 256, n):
                x = eye[i:i + n]
                G.kernels.fast_decode(1)
                fast = G.fp8_linear(x, w, s, block=32)
                G.kernels.fast_decode(0)
                slow = G.fp8_linear(x, w, s, block=32)
                G.kernels.fast_decode(1)
                assert torch.equal(fast.view(torch.int16), slow.view(torch.int16)), (row, i, n)
                if min(row) >= 100 and max(row) <= 246:
                    assert torch.equal(fast, ref.fp8_linear(x, w, s, block=32)), (row, i, n)
    for dt in DTYPES:  # the many-rows path (float route) and the fp32 kernels
        s = torch.tensor([(100, 127, 140, 200, 246, 110, 120, 130)], dtype=torch.uint8).view(E8M0)
        eye = torch.eye(256, dtype=dt)
        assert torch.equal(G.fp8_linear(eye, w, s, block=32), ref.fp8_linear(eye, w, s, block=32)), dt
        assert torch.equal(G.fp8_linear(eye[:5], w, s, block=32), ref.fp8_linear(eye[:5], w, s, block=32)), dt


def test_threads():
    """Above the size where the kernels use a team: 1 and 2 threads give the same bits (decode rows and
    the many-rows path)."""
    w, s = w32(512, 1024, E8M0, 5)
    for dt in DTYPES:
        for M in (3, 9, 20):
            x = rand_x(M, 1024, dt, M)
            one, two = per_threads(lambda: G.fp8_linear(x, w, s, block=32))
            assert torch.equal(one, two), (dt, M)
            want = ref.fp8_linear(x, w, s, block=32)
            within(two, want, lin_bound(x, wdeq(w, s, dt), want), f"team {dt} M{M}")


def _avx512() -> bool:
    with open("/proc/cpuinfo") as f:
        flags = f.read().split()
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512vl"))


def test_the_128_path_is_unchanged():
    """block=128 (the default) is dz_fp8_linear's code: the same bits from both entry points. The same
    scales given per 32x32 block give the 128-block result: bit for bit in AVX-512 builds (the same
    32-weight steps and accumulators, only the scale read per step), within the bound elsewhere (AVX2 and
    plain C sum per block, then scale)."""
    from tests.ops.bounds import fp8_weights
    for dt in DTYPES:
        for M in (1, 5, 17):
            w, s = fp8_weights(130, 1100, E8M0, M)
            x = rand_x(M, 1100, dt, M)
            got = G.fp8_linear(x, w, s)
            assert torch.equal(G.fp8_linear(x, w, s, block=128), got)
            out = torch.empty_like(got)
            xc = x.contiguous()
            G.kernels.fp8(xc.data_ptr(), xc.stride(0), dt is torch.bfloat16, w.data_ptr(), s.data_ptr(), 1,
                          out.data_ptr(), M, 130, 1100, False, 1)
            assert torch.equal(out, got)
            s32 = s.repeat_interleave(4, 0)[:5].repeat_interleave(4, 1)[:, :35]  # the same scales per 32-block
            got32 = G.fp8_linear(x, w, s32, block=32)
            if _avx512():
                assert torch.equal(got32, got)
            want = ref.fp8_linear(x, w, s)
            within(got32, want, lin_bound(x, wdeq(w, s32, dt), want), f"128 as 32 {dt} M{M}")


def test_fallbacks_run_the_twin():
    w, s = w32(40, 70, E8M0, 1)
    xh = rand_x(3, 70, torch.float16, 0)
    assert torch.equal(G.fp8_linear(xh, w, s, block=32), ref.fp8_linear(xh, w, s, block=32))
    x = rand_x(3, 70, torch.float32, 0)
    w16, s16 = quant_fp8_block(torch.randn(40, 70), 16)  # a block side the kernel does not take
    assert torch.equal(G.fp8_linear(x, w16, s16, block=16), ref.fp8_linear(x, w16, s16, block=16))


@pytest.mark.parametrize("march,flag", [("x86-64", None), ("haswell", "avx2")], ids=["scalar", "avx2"])
def test_fallback_builds(march, flag, monkeypatch, tmp_path):
    """gemm.c built for plain x86-64 and for AVX2 (per-block partial sums in those builds)."""
    monkeypatch.setattr(G, "kernels", G.bind(native_build("gemm", march, flag, monkeypatch, tmp_path)))
    for sdt in (E8M0, torch.float32):
        w, s = w32(70, 333, sdt, 2)
        for dt in DTYPES:
            xs = rand_x(17, 333, dt, 3)
            full = G.fp8_linear(xs, w, s, block=32)
            for M in (1, 3, 9, 17):
                want = ref.fp8_linear(xs[:M], w, s, block=32)
                got = G.fp8_linear(xs[:M], w, s, block=32)
                within(got, want, lin_bound(xs[:M], wdeq(w, s, dt), want), f"{march} {dt} M{M}")
                assert torch.equal(got, full[:M])
    w, s = w32(33, 95, E8M0, 4)
    eye = torch.eye(95)
    assert torch.equal(G.fp8_linear(eye, w, s, block=32), wdeq(w, s, torch.float32).T)


# ---- Fp8Linear32 (dayzero/v41/formats.py) ---------------------------------------------------------------
def fp8_32_linear(O, K, seed=0):
    from dayzero.v41.formats import Fp8Linear32
    lin = Fp8Linear32(K, O)
    w, s = w32(O, K, E8M0, seed)
    lin.weight.data.copy_(w)
    lin.scale.data.copy_(s)
    return lin


@pytest.mark.parametrize("dt", DTYPES, ids=["fp32", "bf16"])
def test_fp8_linear32_twins_table_dequantises(dt):
    """The twins' table (the reference forward the oracle tests compare): W dequantised, then F.linear,
    bit for bit what it was before the kernel existed."""
    lin = fp8_32_linear(70, 333)
    assert lin.ops is REF
    x = rand_x(6, 333, dt, 0).view(2, 3, 333)
    assert torch.equal(lin(x), ref.linear(x, wdeq(lin.weight, lin.scale, dt)))


@pytest.mark.parametrize("dt", DTYPES, ids=["fp32", "bf16"])
def test_fp8_linear32_cpu_table_runs_the_kernel(dt, monkeypatch):
    lin = fp8_32_linear(70, 333)
    lin.ops = cpu.table()
    calls = []
    real = G.kernels.fp8_b
    monkeypatch.setattr(G.kernels, "fp8_b", lambda *a: (calls.append(a[-1]), real(*a))[1])
    x = rand_x(6, 333, dt, 0)
    y = lin(x.view(2, 3, 333))
    assert calls == [32] and y.shape == (2, 3, 70) and y.dtype == dt
    assert lin(x[:0]).shape == (0, 70) and calls == [32]  # no rows: no call
    assert torch.equal(lin(x.float(), out_dtype=dt), y.view(6, 70)) and len(calls) == 2  # out_dtype: x cast first
    lin.keep_dequantized(dt)  # a kept copy is read as it is
    assert torch.equal(lin(x), ref.linear(x, wdeq(lin.weight, lin.scale, dt))) and len(calls) == 2
    assert torch.equal(y.view(6, 70), G.fp8_linear(x, lin.weight, lin.scale, block=32))
    want = ref.fp8_linear(x, lin.weight, lin.scale, block=32)
    within(y.view(6, 70), want, lin_bound(x, wdeq(lin.weight, lin.scale, dt), want), "Fp8Linear32")


def test_triton_table_sends_32_blocks_to_the_twin():
    pytest.importorskip("triton")
    from dayzero.ops.triton import gemm as T
    w, s = w32(70, 333, E8M0, 0)
    x = rand_x(4, 333, torch.bfloat16, 0)
    assert torch.equal(T.fp8_linear(x, w, s, block=32), ref.fp8_linear(x, w, s, block=32))


@torch.no_grad()
def test_v41_toy_forward_on_the_kernel_is_the_reference_up_to_summation_order(tmp_path, monkeypatch):
    """The toy V4.1 checkpoint (FP8 32x32 dense weights), fp32, on the native CPU table as the engine installs
    it (ServedV41.set_ops) against the reference forward (the twins): every FP8 32x32 weight, wo_a group by
    group included, goes through the 32x32 kernel; logits apart by fp32 summation order only (as two
    tensor-parallel ranks are, tests/distributed/test_v41_ranks.py), the same greedy continuation."""
    from dayzero.v41.formats import Fp8Linear32
    from dayzero.v41.served import load_served
    from dayzero.v41.toy import TEXT, write_toy
    text = dict(copy.deepcopy(TEXT), o_lora_rank=32)  # wo_a groups of whole 32-row blocks (the toy's 16: dequantised)
    served = load_served(write_toy(tmp_path / "m", text=text), torch.float32, torch.device("cpu"))
    model = served.model
    fp8 = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear32)}
    assert any(n.endswith("attn.wo_a") for n in fp8) and any(".shared_experts." in n for n in fp8)
    seen = set()
    real = G.kernels.fp8_b
    monkeypatch.setattr(G.kernels, "fp8_b", lambda *a: (seen.add((a[3], a[-1])), real(*a))[1])

    def run(ops):
        served.set_ops(ops)
        state = model.new_state()
        logits = [model(torch.tensor([[6, 40, 7, 99, 250, 31, 8, 12, 300]]), state)[0, -1]]
        for _ in range(4):
            logits.append(model(logits[-1].argmax().view(1, 1), state)[0, -1])
        return torch.stack(logits)

    want = run(REF)
    assert not seen
    got = run(cpu.table())
    for name, m in fp8.items():  # every FP8 32x32 weight read by the kernel, with block=32
        parts = model.args.o_groups if name.endswith("attn.wo_a") else 1
        rows = m.out_features // parts
        for g in range(parts):
            assert (m.weight.data_ptr() + g * rows * m.in_features, 32) in seen, (name, g)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
