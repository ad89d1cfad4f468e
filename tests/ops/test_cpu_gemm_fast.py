"""The integer weight decoding of gemm.c's vdpbf16ps kernels (dayzero/ops/cpu/fastdecode.h): where
a block's E8M0 scale byte allows it, FP8 weights become bf16 words by integer operations instead
of the float route (decode, multiply by the scale, round). The words must be the same bit for bit,
so every result equals the float route's exactly (`kernels.fast_decode(0)` switches it off), for
every byte, for scale bytes inside and outside the fast range, and with any number of rows; and a
row's result still does not depend on the other rows of the call (batch invariance)."""
from __future__ import annotations

import pytest
import torch

from dayzero.ops import cpu, ref

if cpu.unavailable().get("gemm"):
    pytest.skip(f"gemm.c does not build here: {cpu.unavailable()['gemm']}", allow_module_level=True)

from dayzero.ops.cpu import gemm as G  # noqa: E402

from tests.ops.bounds import fp8_dequant as _fp8_deq, lin_bound as _lin_bound, rand_x as _x, within as _within  # noqa: E402
from tests.ops.test_cpu_gemm_rows import _one_thread  # noqa: E402, F401 (autouse: one thread in this module)

E8M0 = torch.float8_e8m0fnu
FAST_LO, FAST_HI = 7, 246  # fastdecode.h: FP8_SB_LO, FP8_SB_HI




def _toggled(switch, fn):
    """fn() with a kernel switch (gemm.kernels.fast_decode, .moe_streams) on, then off (restored to on)."""
    try:
        switch(1)
        a = fn()
        switch(0)
        b = fn()
    finally:
        switch(1)
    return a, b


def _both(fn):
    """fn() with the integer decode on, then off."""
    return _toggled(G.kernels.fast_decode, fn)


def _same(a, b):
    """bit for bit (NaN included: scales past the fast range overflow to inf, inf * 0 = NaN)"""
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                                              b.view(torch.int16 if b.element_size() == 2 else torch.int32))


def _every_byte_weight(O, K, seed):
    """e4m3 bytes [O, K]: each row holds all 256 codes (zeros, subnormals, the NaN codes 0x7f /
    0xff, decoded as +-480 by the kernels) in a random order, the rest random bytes."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 256, (O, K), generator=gen, dtype=torch.uint8)
    for o in range(O):
        b[o, :256] = torch.randperm(256, generator=gen).to(torch.uint8)
    return b.view(torch.float8_e4m3fn)


def test_fp8_fast_words_every_byte_and_scale():
    """x = I reads each decoded weight back: every e4m3 byte at scale bytes around and inside the
    fast range equals the float route bit for bit (and the twin where the twin's bf16 matmul
    does not flush: scales >= 2^-27, as test_cpu_gemm.test_fp8_every_byte_decodes)."""
    b = torch.arange(256, dtype=torch.uint8)
    b[0x7F], b[0xFF] = 0, 0x80  # the twin decodes the NaN codes as NaN: left out of the twin check
    w = b.view(2, 128).view(torch.float8_e4m3fn)
    eye = torch.eye(128, dtype=torch.bfloat16)
    for byte in (1, 6, FAST_LO, 8, 100, 127, 200, FAST_HI, 247, 254):
        s = torch.full((1, 1), byte, dtype=torch.uint8).view(E8M0)
        for i in (0, 1, 5, 8):
            fast, slow = _both(lambda: G.fp8_linear(eye[i:i + 3], w, s))
            assert _same(fast, slow), (byte, i)
        if 100 <= byte <= FAST_HI:
            assert torch.equal(G.fp8_linear(eye, w, s), ref.fp8_linear(eye, w, s)), byte


@pytest.mark.parametrize("O,K", [(130, 640), (256, 1100), (2, 256)])
def test_fp8_fast_equals_float_route(O, K):
    """Random bytes with every code in each row, scale bytes in the fast range except a few blocks
    outside it (6, 247) in the last row block: its rows take the float route, the others the
    integer decode; partial 128-blocks (K = 1100) and row blocks (O = 130); M = 1..9 (with the
    integer decode 5-8 rows run one weight row against all of them, off: blocks of 4 rows) and 17
    (the many-rows path, which decodes by the float route): equal bit for bit."""
    w = _every_byte_weight(O, K, O + K)
    gen = torch.Generator().manual_seed(K)
    sb = torch.randint(100, 140, ((O + 127) // 128, (K + 127) // 128), generator=gen, dtype=torch.uint8)
    if sb.shape[0] > 1:  # the last row block's rows take the float route, the first's the integer decode
        sb[-1, 0], sb[-1, -1] = 6, 247
    s = sb.view(E8M0)
    for M in (1, 2, 3, 4, 5, 8, 9, 17):
        x = _x(M, K, torch.bfloat16, M)
        fast, slow = _both(lambda: G.fp8_linear(x, w, s))
        assert _same(fast, slow), M
        aq_fast, aq_slow = _both(lambda: G.fp8_linear(x, w, s, True))
        assert _same(aq_fast, aq_slow), M


def test_fp8_fast_batch_invariant_and_near_twin():
    """Each row of an M-row call equals the same row computed alone, bit for bit (the integer
    decode forms the same words for every row count), and the result is within the parity
    bound of the twin (real-looking weights: quant_fp8_block, E8M0 scales in the fast range)."""
    from tests.ops.bounds import fp8_weights
    w, s = fp8_weights(256, 1024, E8M0, 7)
    sb = s.view(torch.uint8)
    assert int(sb.min()) >= FAST_LO and int(sb.max()) <= FAST_HI  # the fast path is what runs
    x = _x(9, 1024, torch.bfloat16, 3)
    full = G.fp8_linear(x, w, s)
    for m in range(9):
        assert torch.equal(G.fp8_linear(x[m:m + 1], w, s), full[m:m + 1]), m
        assert torch.equal(G.fp8_linear(x[m:], w, s), full[m:]), m
    want = ref.fp8_linear(x, w, s)
    _within(full, want, _lin_bound(x, _fp8_deq(w, s, torch.bfloat16), want), "fast fp8")


# ---- FP8 byte tables (128x128 blocks): kernels.fast_decode(1) tables, (2) the integer route ---------
def _routes(fn):
    """fn() by the byte tables, the integer route and the float route (restored to the tables)."""
    try:
        out = []
        for mode in (1, 2, 0):
            G.kernels.fast_decode(mode)
            out.append(fn())
    finally:
        G.kernels.fast_decode(1)
    return out


def test_fp8_tables_every_byte_every_scale():
    """Each of the 256 e4m3 bytes at each of the 256 scale bytes, read back one word at a time (x =
    two rows of the identity, M = 2: the decode path): the byte tables give the words of the integer
    route and of the float route bit for bit (outside [FAST_LO, FAST_HI] all three run the float route)."""
    w = torch.arange(256, dtype=torch.uint8).view(2, 128).view(torch.float8_e4m3fn)
    eye = torch.eye(128, dtype=torch.bfloat16)
    for byte in range(256):
        s = torch.full((1, 1), byte, dtype=torch.uint8).view(E8M0)
        tab, integer, flt = _routes(lambda: torch.cat([G.fp8_linear(eye[i:i + 2], w, s) for i in range(0, 128, 2)]))
        assert _same(tab, integer) and _same(tab, flt), byte


@pytest.mark.parametrize("O,K", [(129, 1024), (257, 1100), (2, 384), (3, 4096)])
def test_fp8_tables_equal_other_routes(O, K):
    """Random bytes with every code in each row, odd O (a last single row), a partial last 128-block
    (K = 1100: its weights take the float route after the tables' whole blocks), one row block's
    scales outside the fast range; M = 1, 2 (pairs of rows), 3, 5 (one row against all x rows) and
    the grouped op (2 groups of 128 rows): tables, integer route and float route bit for bit."""
    w = _every_byte_weight(O, K, 3 * O + K)
    gen = torch.Generator().manual_seed(O)
    sb = torch.randint(FAST_LO, FAST_HI + 1, ((O + 127) // 128, (K + 127) // 128), generator=gen, dtype=torch.uint8)
    if sb.shape[0] > 1:
        sb[-1, -1] = 250
    s = sb.view(E8M0)
    for M in (1, 2, 3, 5):
        x = _x(M, K, torch.bfloat16, M + K)
        tab, integer, flt = _routes(lambda: G.fp8_linear(x, w, s))
        assert _same(tab, integer) and _same(tab, flt), M
    if O >= 256:
        wg, sg = w[:256].contiguous(), s[:2].contiguous()
        for M in (1, 2):
            x = _x(M, 2 * K, torch.bfloat16, M)
            tab, integer, flt = _routes(lambda: G.fp8_linear_grouped(x, wg, sg, 2))
            assert _same(tab, integer) and _same(tab, flt), M


def test_fp8_items_of_several_tiles_one_and_two_threads():
    """With 2 threads the decode's work items take up to FP8_ITEM_ROWS rows (several 64-row tiles:
    O = 2050 gives items of 130 rows, the last one 100 rows ending in a single row): the same bits
    as one thread, M = 1, 2, bf16 and fp32 x (the fp32 x also through the fp32 kernels)."""
    from tests.ops.bounds import per_threads
    w = _every_byte_weight(2050, 1024, 11)
    gen = torch.Generator().manual_seed(5)
    s = torch.randint(110, 140, (17, 8), generator=gen, dtype=torch.uint8).view(E8M0)
    for M in (1, 2):
        for dt in (torch.bfloat16, torch.float32):
            x = _x(M, 1024, dt, M)
            one, two = per_threads(lambda: G.fp8_linear(x, w, s))
            assert _same(one, two), (M, dt)


# ---- FP4 ------------------------------------------------------------------------------------------
FP4_LO, FP4_HI = 2, 252  # fastdecode.h: FP4_SB_LO, FP4_SB_HI


def test_fp4_fast_words_every_byte_and_scale():
    """x = I reads W back: all 256 packed bytes (every nibble pair) at scale bytes around and inside
    the fast range (one scale per group, so one call covers several), fast == float route bit for
    bit, and the twin where it does not flush (the range test_cpu_gemm checks)."""
    w = torch.arange(256, dtype=torch.uint8).repeat(2).view(4, 128).view(torch.int8)  # K = 256: 8 groups
    eye = torch.eye(256, dtype=torch.bfloat16)
    for bytes_ in ((0, 1, FP4_LO, 3, 127, 200, FP4_HI, 253), (FP4_LO, FP4_LO + 1, 100, 127, 128, 150, FP4_HI - 1, FP4_HI)):
        s = torch.tensor([bytes_] * 4, dtype=torch.uint8).view(E8M0)
        for i in (0, 1, 3, 6):
            fast, slow = _both(lambda: G.fp4_linear(eye[i:i + 5], w, s))
            assert _same(fast, slow), (bytes_, i)
        if min(bytes_) >= FP4_LO:
            assert _same(G.fp4_linear(eye, w, s), ref.fp4_linear(eye, w, s)), bytes_


@pytest.mark.parametrize("O", [502, 501])
def test_fp4_fast_every_scale_byte_pair(O):
    """The integer decode's tables (fastdecode.h FP4_T, one per scale byte, two per group pair): row
    pair (2i, 2i + 1) holds all 256 packed bytes, group j of it the scale byte 2 + (i + 37 j) % 251,
    so every scale byte of the fast range meets every byte, next to a different one in its pair;
    x = I reads each decoded weight back in 1-3-row calls (pairs of rows and, O odd, a row alone):
    equal to the float route and to the exact dequantised weight (-0 read back as +0), bit for bit."""
    i = torch.arange(O)[:, None] // 2
    w = (torch.arange(128)[None, :] + 128 * (torch.arange(O)[:, None] % 2)).to(torch.uint8).view(torch.int8)
    sb = (FP4_LO + (i + 37 * torch.arange(8)[None, :]) % (FP4_HI - FP4_LO + 1)).to(torch.uint8)
    assert int(sb.min()) == FP4_LO and int(sb.max()) == FP4_HI
    s = sb.view(E8M0)
    want = ref.fp4_dequant(w, s).to(torch.bfloat16).T + 0  # [256, O]: exact (e2m1 times a power of two); -0 sums to +0
    eye = torch.eye(256, dtype=torch.bfloat16)
    for m0, mb in ((0, 1), (1, 2), (3, 3), (6, 3), (9, 2), (11, 1)) + tuple((m, 3) for m in range(12, 256, 3)):
        x = eye[m0:m0 + mb]
        fast, slow = _both(lambda: G.fp4_linear(x, w, s))
        assert _same(fast, slow), m0
        assert _same(fast, want[m0:m0 + mb]), m0


@pytest.mark.parametrize("O,K", [(33, 544), (64, 4096), (7, 96)])
def test_fp4_fast_equals_float_route(O, K):
    """Random packed bytes, scale bytes in the fast range except one out-of-range byte in the last
    row (that row takes the float route; its pair row too); an odd number of groups (K = 544, 96:
    the last group on the float route); M = 1..9 and 17 (many-rows path); bf16 x: equal bit for
    bit. fp32 scales never take the integer decode (checked equal as well)."""
    gen = torch.Generator().manual_seed(O * K)
    w = torch.randint(-128, 128, (O, K // 2), generator=gen, dtype=torch.int8)
    sb = torch.randint(110, 135, (O, K // 32), generator=gen, dtype=torch.uint8)
    sb[-1, -1] = 1
    for s in (sb.view(E8M0), ref.e8m0_float(sb.view(E8M0)) * 1.37):
        for M in (1, 2, 3, 4, 5, 8, 9, 17):
            x = _x(M, K, torch.bfloat16, M)
            fast, slow = _both(lambda: G.fp4_linear(x, w, s))
            assert _same(fast, slow), (M, s.dtype)


def test_fp4_fast_batch_invariant_and_near_twin():
    """Each row of an M-row call equals the row alone bit for bit; within the parity bound of the
    twin (quant_fp4 weights)."""
    from tests.ops.bounds import fp4_weights
    w, s = fp4_weights(128, 2048, 5)
    assert int(s.view(torch.uint8).min()) >= FP4_LO and int(s.view(torch.uint8).max()) <= FP4_HI
    x = _x(9, 2048, torch.bfloat16, 4)
    full = G.fp4_linear(x, w, s)
    for m in range(9):
        assert torch.equal(G.fp4_linear(x[m:m + 1], w, s), full[m:m + 1]), m
        assert torch.equal(G.fp4_linear(x[m:], w, s), full[m:]), m
    want = ref.fp4_linear(x, w, s)
    _within(full, want, _lin_bound(x, ref.fp4_dequant(w, s).to(x.dtype), want), "fast fp4")


def test_moe_fast_equals_float_route():
    """The routed experts (bf16 x: the FP4 vdpbf16ps kernels, gate / up / down) with the integer
    decode equal the float route bit for bit, h_act_sim on and off, 1 and 7 tokens; k = 6 of 6
    experts: every expert has 7 pairs (the 5-8-row kernels, one weight row against all of them)."""
    from tests.ops.test_cpu_gemm import _moe_inputs
    for N, k in ((1, 2), (7, 2), (7, 6)):
        args = _moe_inputs(N, 6, k, 256, 160, torch.bfloat16, seed=N)
        for sim in (False, True):
            fast, slow = _both(lambda: G.moe_experts(*args, 0.7, sim))
            assert _same(fast, slow), (N, sim)


def _streams(fn):
    """fn() with the MoE's decode blocks on their row-pair streams, then on the tile walk."""
    return _toggled(G.kernels.moe_streams, fn)


@pytest.mark.parametrize("N,E,k", [(1, 6, 6), (2, 6, 6), (3, 4, 4), (5, 4, 4), (8, 3, 3), (7, 6, 2), (20, 2, 2)])
def test_moe_streams_equal_tile_walk(N, E, k):
    """The decode-sized MoE blocks (bf16 x, E8M0 scales) read gate row o with up row o and the two
    halves of each down tile (gemm.c moe_pair_bf): every output equals the tile walk's bit for bit
    with 1 .. 8 pairs per expert (2-4: one block of rows; 5-8: one weight row against all; 20 on
    2 experts: blocks of 8, 8, 4), odd group counts (dim 544 = 17 groups, inter 96 = 3), partial
    tiles (inter 96: 64 + 32 rows; dim 544: a last down tile of 32), rows whose scale bytes leave the
    fast range (alone in their pair and both of a pair), h_act_sim on and off."""
    from tests.ops.test_cpu_gemm import _moe_inputs
    args = list(_moe_inputs(N, E, k, 544, 96, torch.bfloat16, seed=N + 10 * k))
    # s1, s3 [E, 96, 17]: gate / up row 5 both out, up row 6 alone; s2 [E, 544, 3]: down rows 40 and
    # 72 (a pair: tile 0's halves), 300 alone
    for j, rows in ((4, (5,)), (6, (5, 6)), (8, (40, 72, 300))):
        t = args[j].clone()
        for r in rows:
            if r < t.shape[1]:
                t.view(torch.uint8)[0, r, 1] = 1 if r % 2 else 254  # outside [FP4_LO, FP4_HI]
        assert t.dtype == E8M0
        args[j] = t
    for sim in (False, True):
        new, old = _streams(lambda: G.moe_experts(*args, 0.7, sim))
        assert _same(new, old), (N, sim)
        assert bool(torch.isfinite(new).any())


def test_build_without_vbmi(monkeypatch, tmp_path):
    """gemm.c built for a CPU with AVX512-BF16 but without VBMI (Cooper Lake: FP8 on the integer
    route, FP4 on the float route, no vpermb emitted), in a private cache: both routes equal bit
    for bit and the twins' bounds hold."""
    from tests.ops.bounds import fp4_weights, fp8_weights, native_build
    monkeypatch.setattr(G, "kernels", G.bind(native_build("gemm", "cooperlake", "avx512_bf16", monkeypatch, tmp_path)))
    w8, s8 = fp8_weights(130, 640, E8M0, 1)
    w4, s4 = fp4_weights(33, 544, 2)
    for M in (1, 3, 9):
        x8, x4 = _x(M, 640, torch.bfloat16, M), _x(M, 544, torch.bfloat16, M)
        for fn, x, w, s, deq in ((G.fp8_linear, x8, w8, s8, _fp8_deq(w8, s8, torch.bfloat16)),
                                 (G.fp4_linear, x4, w4, s4, ref.fp4_dequant(w4, s4).to(torch.bfloat16))):
            fast, slow = _both(lambda: fn(x, w, s))
            assert _same(fast, slow), (fn.__name__, M)
            want = (ref.fp8_linear if fn is G.fp8_linear else ref.fp4_linear)(x, w, s)
            _within(fast, want, _lin_bound(x, deq, want), f"{fn.__name__} M{M}")
