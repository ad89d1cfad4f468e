"""Batch invariance of the Triton table (issue 20), under TRITON_INTERPRET=1 on the CPU: a row's
result has the same bits alone and among other rows, whichever way a kernel spreads its K ranges
or key splits over programs (decode: over programs, partials summed / merged in order; prefill:
looped inside one program), and an attention query's output does not move when the batch pads its
entry list with -1 (the HCA / CSA lists are as wide as the batch's longest).

The default configs on the small test shapes take one K range; these tests force several (SPLIT_K,
SPLIT_BLOCKS, WAVES) and both execution paths (SPREAD), so that the ordered sums are what is
compared. The whole table's op-rows check at the default configs runs in `dayzero verify`
(tests/test_verify_tune_bench.py, tests/test_cli.py)."""
import pytest
import torch

pytest.importorskip("triton", reason="Triton has no wheel for this platform (test extras install it on Linux x86-64)")

from dayzero import invariance  # noqa: E402
from dayzero.loader.formats import quant_fp8_block  # noqa: E402
from dayzero.ops import cases, ref  # noqa: E402
from dayzero.ops.triton import attention, dense, gemm, mhc  # noqa: E402

BLOCKS = invariance.BLOCKS(41)  # 0:1, 40:41, 3:8, 2:19, 1:40 of 41 rows
DTYPES = [torch.float32, torch.bfloat16]


def _rows_alike(fn, x: torch.Tensor, *rest) -> list[str]:
    """Blocks of rows of x whose fn result differs from the same rows of the whole call."""
    whole = fn(x, *rest)
    whole = whole if isinstance(whole, tuple) else (whole,)
    bad = []
    for a, b in BLOCKS:
        part = fn(x[a:b], *rest)
        part = part if isinstance(part, tuple) else (part,)
        if not all(torch.equal(p, w[a:b]) for p, w in zip(part, whole)):
            bad.append(f"{a}:{b}")
    return bad


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_linears_sum_k_ranges_in_one_order(dtype):
    """Three K ranges (SPLIT_K=3): spread over programs (workspace summed in order) and looped in
    one program give the same bits, for every block of rows; and they are the twin's linear."""
    g = torch.Generator().manual_seed(0)
    M, O, K = 41, 70, 640
    x = torch.randn(M, K, generator=g).to(dtype)
    w8, s8 = quant_fp8_block(torch.randn(O, K, generator=g) * 0.05)
    w4, s4 = gemm._rand_fp4(O, K, dev="cpu")
    wd = torch.randn(O, K, generator=g).to(torch.bfloat16)
    ops = {
        "fp8_linear": (lambda x, c: gemm.fp8_linear(x, w8, s8, config=c), lambda x: ref.fp8_linear(x, w8, s8), 128),
        "fp8_linear_w8a8": (lambda x, c: gemm.fp8_linear(x, w8, s8, act_quant=True, config=c),
                            lambda x: ref.fp8_linear(x, w8, s8, True), 128),
        "fp4_linear": (lambda x, c: gemm.fp4_linear(x, w4, s4, config=c), lambda x: ref.fp4_linear(x, w4, s4), 64),
        "fp32_linear": (lambda x, c: dense.fp32_linear(x, wd, config=c), lambda x: ref.fp32_linear(x, wd), 64),
    }
    for name, (fn, twin, bk) in ops.items():
        outs = []
        for spread in (True, False):
            cfg = dict(BLOCK_M=16, BLOCK_O=64, BLOCK_K=bk, SPLIT_K=3, SPREAD=spread, num_warps=4, num_stages=2)
            assert gemm.k_ranges(x, K, bk, 2, 3)[0] == 3
            assert not _rows_alike(lambda x: fn(x, cfg), x), (name, spread)
            outs.append(fn(x, cfg))
        assert torch.equal(outs[0], outs[1]), name
        want = twin(x).float()
        assert ((outs[0].float() - want).abs().max() / want.abs().max()) < 1e-2, name


def test_fp32_linear_without_dot_rows_alike():
    """BLOCK_M < 16 (the multiply-add form) chosen for a weight shape serves every row count."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(41, 200, generator=g), torch.randn(33, 200, generator=g)
    for spread in (True, False):
        cfg = dict(BLOCK_M=4, BLOCK_O=32, BLOCK_K=32, SPLIT_K=2, SPREAD=spread, num_warps=4, num_stages=2)
        assert not _rows_alike(lambda x: dense.fp32_linear(x, w, config=cfg), x), spread


@pytest.mark.parametrize("case", ["sparse_attn_paged", "sparse_attn_paged:fp8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_attention_splits_fixed_by_key_positions(case, dtype):
    """Decode rows (each query alone: splits spread, states merged by the combine kernel) and
    prefill rows (41 queries: splits merged inside the program) give the same bits, and -1
    padding appended to the entry list (a batch with a longer context beside) changes nothing."""
    (q, srcs, sink, scale), _ = cases.make(case, "tiny", "cpu", dtype, N=41, topk=40)
    (p0, i0), (p1, i1) = srcs
    padded = torch.cat([i1, torch.full((i1.shape[0], 45), -1, dtype=i1.dtype)], 1)
    outs = []
    for spread in (True, False):
        cfg = dict(BLOCK_H=16, BLOCK_K=16, SPLIT_BLOCKS=2, SPREAD=spread, num_warps=4, num_stages=2, waves=2)

        def attn(q, i0, i1):
            return attention.sparse_attn_paged(q, [(p0, i0), (p1, i1)], sink, scale, config=cfg)

        whole = attn(q, i0, i1)
        for a, b in BLOCKS:
            assert torch.equal(attn(q[a:b], i0[a:b], i1[a:b]), whole[a:b]), (spread, a, b)
            assert torch.equal(attn(q[a:b], i0[a:b], padded[a:b]), whole[a:b]), (spread, a, b, "padded")
        outs.append(whole)
    assert torch.equal(outs[0], outs[1])
    want = ref.sparse_attn_paged(q, srcs, sink, scale).float()
    assert ((outs[0].float() - want).abs().max() / want.abs().max()) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_hc_pre_k_slabs_in_one_order(dtype):
    """hc_pre's K slabs (8 here): one a program (decode) or looped in one (prefill), the same bits."""
    args, kw = cases.make("hc_pre", "tiny", "cpu", dtype, N=41)
    outs = []
    for spread in (True, False):
        cfg = {**mhc.PRE_DEFAULT, "BLOCK_K": 16, "WAVES": 2, "SPREAD": spread}
        assert not _rows_alike(lambda x: mhc.hc_pre(x, *args[1:], **kw, config=cfg), args[0]), spread
        outs.append(mhc.hc_pre(*args, **kw, config=cfg))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
