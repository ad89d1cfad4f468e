import math

import pytest
import torch

from dayzero.loader import (
    FP4_E2M1_VALUES,
    dequant_fp4,
    dequant_fp8_block,
    e8m0_to_float,
    float_to_e8m0,
    pack_fp4_codes,
    quant_fp4,
    quant_fp8_block,
    unpack_fp4,
)

E8M0 = torch.float8_e8m0fnu


def e8m0(byte_values):
    return torch.tensor(byte_values, dtype=torch.uint8).view(E8M0)


def same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def test_e8m0_decode_hand_bytes():
    got = e8m0_to_float(e8m0([127, 128, 120, 0, 254]))
    assert got.dtype == torch.float32
    assert got.tolist() == [1.0, 2.0, 2.0**-7, 2.0**-127, 2.0**127]
    assert e8m0_to_float(torch.tensor([127, 129], dtype=torch.uint8)).tolist() == [1.0, 4.0]
    assert math.isnan(e8m0_to_float(e8m0([255])).item())


def test_e8m0_decode_matches_torch_for_all_bytes():
    b = torch.arange(255, dtype=torch.uint8)
    assert torch.equal(e8m0_to_float(b), b.view(E8M0).to(torch.float32))


def test_float_to_e8m0_exact_and_rejects():
    x = torch.tensor([1.0, 2.0, 2.0**-7, 2.0**-127, 2.0**127, 0.5])
    assert float_to_e8m0(x).view(torch.uint8).tolist() == [127, 128, 120, 0, 254, 126]
    for bad in (3.0, 0.0, -2.0, float("inf"), float("nan"), 1.5):
        with pytest.raises(ValueError):
            float_to_e8m0(torch.tensor([1.0, bad]))


def test_fp8_block_dequant_partial_edges_against_loop():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(130, 200, generator=g) * 100).to(torch.float8_e4m3fn)
    scale = e8m0([[120, 130], [127, 100]])
    got = dequant_fp8_block(w, scale)
    assert got.shape == (130, 200) and got.dtype == torch.float32
    wf = w.float()
    for i in range(130):
        for j in range(0, 200, 7):
            s = 2.0 ** (scale.view(torch.uint8)[i // 128, j // 128].item() - 127)
            assert got[i, j].item() == wf[i, j].item() * s
    # one full element-wise comparison too
    sf = torch.tensor([[2.0**-7, 2.0**3], [1.0, 2.0**-27]])
    want = torch.empty(130, 200)
    for bi in range(2):
        for bj in range(2):
            blk = (slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128))
            want[blk] = wf[blk] * sf[bi, bj]
    assert torch.equal(got, want)


def test_fp8_block_dequant_f32_scales_and_shape_check():
    w = torch.full((3, 130), 2.0).to(torch.float8_e4m3fn)
    got = dequant_fp8_block(w, torch.tensor([[0.25, 3.0]]))
    assert torch.equal(got[:, :128], torch.full((3, 128), 0.5))
    assert torch.equal(got[:, 128:], torch.full((3, 2), 6.0))
    with pytest.raises(ValueError, match=r"\(1, 2\)"):
        dequant_fp8_block(w, torch.ones(2, 2))


def test_fp8_quant_roundtrip_e8m0():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 260, generator=g) * torch.logspace(-3, 2, 260)
    q, s = quant_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == E8M0 and s.shape == (3, 3)
    dq = dequant_fp8_block(q, s)
    err = (dq - w).abs()
    # e4m3 has 3 mantissa bits; absolute error bounded by half a step at the block's scale
    bound = e8m0_to_float(s).repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260] * 16
    assert bool((err <= bound).all())
    # value-space fixed point, and exact code/scale round trip
    q2, s2 = quant_fp8_block(dq)
    assert torch.equal(dequant_fp8_block(q2, s2), dq)
    codes = torch.randn(256, 256, generator=g).clamp(-3, 3) * 100
    codes[::128, ::128] = 448.0
    qq = codes.to(torch.float8_e4m3fn)
    ss = e8m0([[100, 140], [127, 3]])
    q3, s3 = quant_fp8_block(dequant_fp8_block(qq, ss))
    assert same_bytes(q3, qq) and same_bytes(s3, ss)


def test_fp8_quant_power_of_two_rule_and_zero_block():
    w = torch.zeros(128, 256)
    w[0, 0] = 448.0  # amax/448 = 1 -> scale 1
    w[0, 128] = 449.0  # -> scale 2
    q, s = quant_fp8_block(w)
    assert e8m0_to_float(s).tolist() == [[1.0, 2.0]]
    q, s = quant_fp8_block(torch.zeros(5, 7))
    assert s.view(torch.uint8).item() == 1 and torch.equal(q.float(), torch.zeros(5, 7))


def test_fp8_quant_f32_scales():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(200, 130, generator=g).to(torch.bfloat16)
    q, s = quant_fp8_block(w, scale_dtype=torch.float32)
    assert s.dtype == torch.float32 and s.shape == (2, 2)
    amax = torch.nn.functional.pad(w.float().abs(), (0, 126, 0, 56)).view(2, 128, 2, 128).amax((1, 3))
    assert torch.allclose(s, amax / 448)
    assert torch.allclose(dequant_fp8_block(q, s), w.float(), rtol=0.07, atol=1e-5)
    assert q.float().abs().max().item() == 448.0


def test_fp4_value_table():
    assert FP4_E2M1_VALUES.tolist()[:8] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert FP4_E2M1_VALUES.tolist()[8:] == [-0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert torch.signbit(FP4_E2M1_VALUES[8]).item()


def test_fp4_nibble_order_hand_bytes():
    packed = torch.tensor([[0x21, 0xF7, 0x80, 0x08], [0x00, 0x3A, 0xC5, 0x9E]], dtype=torch.uint8)
    got = unpack_fp4(packed.view(torch.int8))
    assert got.shape == (2, 8)
    assert got[0].tolist() == [0.5, 1.0, 6.0, -6.0, 0.0, -0.0, -0.0, 0.0]
    assert torch.signbit(got[0, 5]) and torch.signbit(got[0, 6]) and not torch.signbit(got[0, 4])
    assert got[1].tolist() == [0.0, 0.0, -1.0, 1.5, 3.0, -2.0, -4.0, -0.5]
    assert torch.equal(unpack_fp4(packed), got)


def test_fp4_pack_codes_inverse():
    codes = torch.arange(16, dtype=torch.uint8).repeat(3, 2)
    packed = pack_fp4_codes(codes)
    assert packed.dtype == torch.int8 and packed.shape == (3, 16)
    assert packed.view(torch.uint8)[0, 0].item() == 0x10
    assert packed.view(torch.uint8)[0, 7].item() == 0xFE
    assert torch.equal(unpack_fp4(packed), FP4_E2M1_VALUES[codes.long()])
    with pytest.raises(ValueError):
        pack_fp4_codes(torch.full((1, 2), 16, dtype=torch.uint8))


def test_fp4_dequant_per_32_scales():
    codes = torch.zeros(2, 64, dtype=torch.uint8)
    codes[:, :] = 2  # value 1.0
    codes[1, 33] = 15  # -6.0
    scale = e8m0([[127, 130], [120, 126]])
    got = dequant_fp4(pack_fp4_codes(codes), scale)
    assert got[0, :32].eq(1.0).all() and got[0, 32:].eq(8.0).all()
    assert got[1, :32].eq(2.0**-7).all() and got[1, 32].item() == 0.5
    assert got[1, 33].item() == -3.0
    with pytest.raises(ValueError):
        dequant_fp4(pack_fp4_codes(codes), e8m0([[127], [127]]))


def test_fp4_quant_rounding_ties_to_even():
    # block amax 6 -> scale 1, so x maps straight onto the e2m1 grid
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 0.74, 4.9, -0.1, -5.5, 6.0])
    row = torch.cat([x, torch.zeros(32 - len(x))]).unsqueeze(0)
    packed, scale = quant_fp4(row)
    assert e8m0_to_float(scale).item() == 1.0
    got = unpack_fp4(packed)[0, : len(x)].tolist()
    assert got == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 0.5, 4.0, -0.0, -6.0, 6.0]


def test_fp4_quant_roundtrip():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 128, generator=g) * torch.logspace(-4, 1, 128)
    packed, scale = quant_fp4(w)
    assert packed.dtype == torch.int8 and packed.shape == (16, 64)
    assert scale.dtype == E8M0 and scale.shape == (16, 4)
    dq = dequant_fp4(packed, scale)
    s = e8m0_to_float(scale).repeat_interleave(32, 1)
    assert bool(((dq - w).abs() <= s).all())  # half the widest e2m1 step (2) times scale
    amax = w.abs().view(16, 4, 32).amax(-1)
    assert bool((amax / 6 <= e8m0_to_float(scale)).all())
    assert bool((e8m0_to_float(scale) < amax / 3).all())
    p2, s2 = quant_fp4(dq)
    assert torch.equal(dequant_fp4(p2, s2), dq)
    zp, zs = quant_fp4(torch.zeros(1, 32))
    assert zs.view(torch.uint8).item() == 1 and not unpack_fp4(zp).any()
    with pytest.raises(ValueError):
        quant_fp4(torch.zeros(2, 48))
