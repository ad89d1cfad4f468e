"""Parity of the fused CPU kernels of ops/cpu/fused.c with the twins' compositions they replace
(ops/ref.py): bit-exact, since a fused op must leave every step's logits as they were.

hadamard_fp4_sim = ref.fp4_act_sim(ref.hadamard(x), block): the butterflies are the twin's fp32
additions in the twin's order, the n^-0.5 factor one fp32 product, the FP4 simulation integer
arithmetic on the bits (power-of-two scales, nearest e2m1 code, ties to even).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from dayzero.ops import FUSED_NAMES, REF, for_device, ref
from dayzero.ops.cpu import build

try:
    from dayzero.ops.cpu import fused
except build.NativeUnavailable as e:  # no C compiler here: the op table runs the twins
    pytest.skip(f"native CPU kernels unavailable: {e}", allow_module_level=True)

F32, BF16 = torch.float32, torch.bfloat16


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({F32: torch.int32, BF16: torch.int16}[t.dtype])


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit, NaN where the twin has NaN (a NaN's sign and payload carry no value)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    same = (_bits(got) == _bits(want)) | want.isnan()
    assert same.all(), f"{(~same).sum().item()} of {got.numel()} differ: {got[~same][:4]} vs {want[~same][:4]}"


@contextlib.contextmanager
def _threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("n", [1, 2, 32, 64, 128, 512])
@pytest.mark.parametrize("block", [32, 16, 7])
def test_hadamard_fp4_sim_bit_exact(dtype, n, block):
    g = torch.Generator().manual_seed(n * 31 + block)
    for mag in (1e-30, 1e-6, 1.0, 1e3, 1e30):  # scales from the floor to near overflow
        x = (torch.randn(2, 19, n, generator=g) * mag).to(dtype)
        x[0, 0] = 0.0
        x[0, 1] = -0.0  # signed zeros: the twin's torch.sign(v) * grid
        if n >= 4:
            x[0, 2, :4] = torch.tensor([1e-40, -1e-42, 3.0, -0.0])  # fp32 subnormals
        _same(fused.hadamard_fp4_sim(x, block), ref.hadamard_fp4_sim(x, block))


def test_hadamard_fp4_sim_every_tie_and_scale_boundary():
    # n = 1: the rotation is the identity, so the FP4 step sees the inputs themselves: every e2m1
    # midpoint (ties to the even code), values just either side, and amax at power-of-two boundaries
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    vals = torch.cat([mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(9.0)),
                      torch.tensor([6.0, 6.0 * (1 + 2 ** -23), 3.0, 1.5, 0.0])])
    for e in (-130, -126, -20, 0, 20, 120):
        x = torch.cat([vals, -vals]) * 2.0 ** e
        x = x[:, None]
        for dtype in (F32, BF16):
            xd = x.to(dtype)
            _same(fused.hadamard_fp4_sim(xd, 1), ref.hadamard_fp4_sim(xd, 1))
        # block of 8 mixing the tie values with the block's amax
        x8 = torch.cat([vals[:16], -vals[:16]]).view(4, 8) * 2.0 ** e
        y = ref.hadamard(x8)  # inputs whose rotation is near the crafted values
        _same(fused.hadamard_fp4_sim(y, 8), ref.hadamard_fp4_sim(y, 8))


def test_hadamard_fp4_sim_nonfinite_threads_strided_and_rows_alike():
    x = torch.randn(300, 128, generator=torch.Generator().manual_seed(1))
    x[3, 7] = float("nan")
    x[5, 100] = float("inf")
    want = ref.hadamard_fp4_sim(x, 32)
    for t in (1, 2):
        with _threads(t):
            got = fused.hadamard_fp4_sim(x, 32)
        assert torch.equal(got.isnan(), want.isnan())
        _same(got[~want.isnan()].view(-1), want[~want.isnan()].view(-1))
    # a non-contiguous input and a row alone give the same bits as in the batch
    xt = x.t().contiguous().t()
    _same(fused.hadamard_fp4_sim(xt[8:40], 32), want[8:40])
    _same(fused.hadamard_fp4_sim(x[9:10], 32), want[9:10])


def test_hadamard_fp4_sim_falls_back_to_the_twin():
    x = torch.randn(4, 48)  # not a power of two: the twin's own error
    with pytest.raises(Exception) as want:
        ref.hadamard_fp4_sim(x, 32)
    with pytest.raises(type(want.value)):
        fused.hadamard_fp4_sim(x, 32)
    h = torch.randn(3, 64).half()  # fp16: the twin
    _same(fused.hadamard_fp4_sim(h, 32).float(), ref.hadamard_fp4_sim(h, 32).float())


def test_tables_carry_the_fused_ops():
    assert FUSED_NAMES == ("hadamard_fp4_sim", "act_rms_norm", "fp8_nope_sim", "fp8_linear_grouped")
    assert REF.fused == () and all(getattr(REF, name) is getattr(ref, name) for name in FUSED_NAMES)
    cpu = for_device("cpu", "cpu")
    assert cpu.fused == FUSED_NAMES and all(getattr(cpu, name) is getattr(fused, name) for name in FUSED_NAMES[:3])
    from dayzero.ops.cpu import gemm  # the fourth is gemm.c's (tests/ops/test_fp8_grouped.py)
    assert cpu.fp8_linear_grouped is gemm.fp8_linear_grouped


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("n", [1, 3, 64, 128, 512])
def test_act_rms_norm_bit_exact(dtype, n):
    g = torch.Generator().manual_seed(n)
    for mag in (1e-20, 1e-3, 1.0, 1e3, 1e15):
        x = (torch.randn(3, 17, n, generator=g) * mag * torch.rand(3, 17, 1, generator=g)).to(dtype)
        x[0, 0] = 0.0  # rsqrt(eps)
        for eps in (1e-6, 1e-5, 0.0):
            _same(fused.act_rms_norm(x, eps), ref.act_rms_norm(x, eps))


def test_act_rms_norm_threads_strided_rows_alike_and_fallback():
    # 600 x 4 rows of 128: past fused.c's 256 K elements, so 2 threads run a team over 8-row blocks
    x = torch.randn(600, 4, 128, generator=torch.Generator().manual_seed(2)) * 30
    want = ref.act_rms_norm(x, 1e-6)
    for t in (1, 2):
        with _threads(t):
            _same(fused.act_rms_norm(x, 1e-6), want)
    _same(fused.act_rms_norm(x.transpose(0, 1).contiguous().transpose(0, 1), 1e-6), want)
    _same(fused.act_rms_norm(x[5:6], 1e-6), want[5:6])
    x[1, 2, 3] = float("nan")
    assert torch.equal(fused.act_rms_norm(x, 1e-6).isnan(), ref.act_rms_norm(x, 1e-6).isnan())
    h = torch.randn(3, 64).half()  # fp16: the twin
    _same(fused.act_rms_norm(h, 1e-6).float(), ref.act_rms_norm(h, 1e-6).float())


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("n,rope,block", [(128, 64, 64), (512, 64, 64), (100, 36, 64), (9, 1, 4), (2, 1, 1)])
def test_fp8_nope_sim_bit_exact(dtype, n, rope, block):
    g = torch.Generator().manual_seed(n + rope)
    for mag in (1e-8, 1e-3, 1.0, 1e3, 1e30):
        x = (torch.randn(4, 11, n, generator=g) * mag).to(dtype)
        x[0, 0] = 0.0
        x[0, 1] = -0.0
        _same(fused.fp8_nope_sim(x, rope, block), ref.fp8_nope_sim(x, rope, block))


def test_fp8_nope_sim_every_bf16_value_nonfinite_threads():
    # every finite bf16 bit pattern as the nope dims (blocks of 64 with one shared scale each)
    allbits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(BF16)
    allbits = allbits[allbits.float().isfinite()]
    allbits = allbits[: allbits.numel() // 64 * 64].view(-1, 64)
    x = torch.cat([allbits, allbits.flip(0)], 1)  # [rows, 128]: nope 64 (every value), rope 64
    for dtype in (BF16, F32):
        xd = x.to(dtype)
        _same(fused.fp8_nope_sim(xd, 64, 64), ref.fp8_nope_sim(xd, 64, 64))
        _same(fused.fp8_nope_sim(xd, 64, 16), ref.fp8_nope_sim(xd, 64, 16))
    # single values per block: each is its own amax (scale boundaries)
    one = allbits.reshape(-1, 1)
    xs = torch.cat([one, one], 1)
    _same(fused.fp8_nope_sim(xs, 1, 1), ref.fp8_nope_sim(xs, 1, 1))
    xf = torch.randn(300, 128, generator=torch.Generator().manual_seed(4)) * 100
    xf[3, 7] = float("nan")
    xf[5, 100] = float("inf")  # a rope dim: copied
    xf[6, 10] = float("-inf")
    want = ref.fp8_nope_sim(xf, 64, 64)
    for t in (1, 2):
        with _threads(t):
            _same(fused.fp8_nope_sim(xf, 64, 64), want)
    _same(fused.fp8_nope_sim(xf.t().contiguous().t()[10:20], 64, 64), want[10:20])
