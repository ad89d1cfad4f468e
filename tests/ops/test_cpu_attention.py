"""Parity of the native CPU sparse attention / indexer kernels (ops/cpu/attention.c) with their twins
in ops/ref.py.

Error bounds, from the arithmetic:
- fp32: the kernel and the twin form the same fp32 sums in different orders (blocked online
  softmax, key-range splits merged at the end, transposed QK tiles): they differ by a few fp32
  roundings of the largest partial sums, checked at 2e-5 of the output's max |value| + 1e-5 relative.
- bf16: both read the same bf16 values and compute in fp32 (q.k products of bf16 values are exact
  in fp32, so the bf16 dot instructions change only the summation order), then round the fp32
  result once to bf16. Two fp32 values within d of each other round to bf16 values at most
  d + 1 ulp apart, and 1 bf16 ulp <= 2^-7 |x|: checked at that bound, d the fp32 bound.
- indexer: fp32 output, only the summation order over Di and the heads differs: the fp32 bound,
  with -inf exactly where idx < 0.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dayzero.ops import cases, ref
from dayzero.ops.cpu import build

try:
    build.lib("attention")
except build.NativeUnavailable as e:
    pytest.skip(f"native attention kernels unavailable: {e}", allow_module_level=True)

from dayzero.ops.cpu import attention as A


def _bound(want: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    w, g = want.double(), got.double()
    fin = torch.isfinite(w)
    scale = w[fin].abs().max().item() if fin.any() else 0.0
    b = 2e-5 * scale + 1e-5 * w.abs()
    if dtype == torch.bfloat16:
        b = b + 2.0 ** -7 * torch.maximum(w.abs(), g.abs())
    return b


def assert_within(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype):
    assert got.shape == want.shape and got.dtype == want.dtype
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], want[inf])
    err = (got.double() - want.double()).abs().masked_fill(inf, 0)
    bound = _bound(want.masked_fill(inf, 0), got.masked_fill(inf, 0), dtype)
    bad = err > bound
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} outside the bound; worst err "
                           f"{err.max().item():.3g}, bound there {bound.flatten()[err.argmax()].item():.3g}")


def _idx(gen, n, k, p, dtype, holes=0.2, dead_row=None):
    """Unordered rows of a pool of p rows, with repeats, random -1 holes; row dead_row all -1."""
    idx = torch.randint(0, p, (n, k), generator=gen)
    idx = idx.masked_fill(torch.rand(n, k, generator=gen) < holes, -1)
    if dead_row is not None and n > dead_row:
        idx[dead_row] = -1
    return idx.to(dtype)


def _attn_inputs(seed, N, H, D, ks, dtype, idx_dtype=torch.int64, dead_row=1, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(N, H, D, generator=gen) * spread).to(dtype)
    sources = []
    for i, k in enumerate(ks):
        p = 2 * k + 3 + i  # differing pool sizes, repeats likely
        sources.append((torch.randn(p, D, generator=gen).to(dtype), _idx(gen, N, k, p, idx_dtype, dead_row=dead_row)))
    return q, sources, torch.randn(H, generator=gen)


def _want_attn(q, sources, sink, scale):
    if sum(i.shape[1] for _, i in sources) == 0:  # the twin's amax rejects K = 0: the sink alone, no values
        return torch.zeros_like(q)
    return ref.sparse_attn_paged(q, sources, sink, scale)


ATTN_GRID = [  # (N, H, D, keys per source)
    (1, 1, 32, (0,)),
    (1, 4, 128, (64, 8)),  # the built-in model's decode shape: window + compressed entries
    (1, 4, 128, (1,)),
    (1, 6, 32, (7, 130)),
    (1, 4, 512, (40, 3)),
    (1, 1, 48, (33, 1)),  # D not a multiple of 32
    (3, 4, 32, (1, 33)),
    (3, 6, 128, (130, 0)),
    (3, 1, 512, (33,)),
    (3, 6, 32, (0, 0)),
    (2, 4, 100, (20, 50)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,H,D,ks", ATTN_GRID, ids=[f"N{n}-H{h}-D{d}-K{'+'.join(map(str, k))}"
                                                     for n, h, d, k in ATTN_GRID])
def test_sparse_attn_parity(N, H, D, ks, dtype):
    for idx_dtype in (torch.int64, torch.int32):
        q, sources, sink = _attn_inputs(N * 100 + H * 10 + D + len(ks), N, H, D, ks, dtype, idx_dtype)
        got = A.sparse_attn_paged(q, sources, sink, D ** -0.5)
        assert got.dtype == dtype and got.shape == (N, H, D)
        assert_within(got, _want_attn(q, sources, sink, D ** -0.5), dtype)
        if N > 1:  # the dead row attends to the sink alone: exactly zero
            assert torch.all(got[1] == 0)


def test_sparse_attn_one_key_duplicates_and_dead_rows():
    """One key (softmax of one logit against the sink), every index the same row, all-dead rows."""
    q, sources, sink = _attn_inputs(5, 3, 4, 64, (1, 40), torch.float32, dead_row=None)
    pool0, pool1 = sources[0][0], sources[1][0]
    one = [(pool0, torch.tensor([[0], [1], [-1]]))]
    assert_within(A.sparse_attn_paged(q, one, sink, 0.2), ref.sparse_attn_paged(q, one, sink, 0.2), torch.float32)
    same = [(pool1, torch.full((3, 40), 7))]
    assert_within(A.sparse_attn_paged(q, same, sink, 0.2), ref.sparse_attn_paged(q, same, sink, 0.2), torch.float32)
    dead = [(p, torch.full_like(i, -1)) for p, i in sources]
    assert torch.all(A.sparse_attn_paged(q, dead, sink, 0.2) == 0)


def test_sparse_attn_two_sources_equal_one():
    """Splitting one key list across two sources (two pools) changes nothing but summation order."""
    q, sources, sink = _attn_inputs(9, 2, 6, 128, (50, 30), torch.bfloat16, dead_row=None)
    (p0, i0), (p1, i1) = sources
    merged = (torch.cat([p0, p1]), torch.cat([i0, torch.where(i1 >= 0, i1 + p0.shape[0], -1)], 1))
    a = A.sparse_attn_paged(q, sources, sink, 0.1)
    b = A.sparse_attn_paged(q, [merged], sink, 0.1)
    assert_within(a, b, torch.bfloat16)
    assert_within(a, ref.sparse_attn_paged(q, sources, sink, 0.1), torch.bfloat16)


def test_sparse_attn_large_logits_strided_views_mixed_dtypes():
    """Logits spread over tens of units (online-softmax rescaling matters), a pool with a row stride
    wider than D, an index view with a wide row stride, a transposed (non-unit stride) index, a
    non-contiguous q, and pools of two dtypes under bf16 and fp32 q."""
    N, H, D = 2, 4, 32
    q, sources, sink = _attn_inputs(7, N, H, D, (40, 90), torch.float32, dead_row=None, spread=4.0)
    wide = torch.randn(sources[0][0].shape[0], 2 * D)
    sources[0] = (wide[:, D:], sources[0][1])
    i1 = sources[1][1]
    sources[1] = (sources[1][0], torch.cat([i1, i1[:, :5]], 1)[:, :i1.shape[1]])
    for scale in (0.1, 2.0):
        assert_within(A.sparse_attn_paged(q, sources, sink, scale), ref.sparse_attn_paged(q, sources, sink, scale),
                      torch.float32)
    qt = torch.randn(H, N, D).transpose(0, 1)
    st = [(sources[0][0], sources[0][1].t().contiguous().t())]
    assert_within(A.sparse_attn_paged(qt, st, sink, 0.3), ref.sparse_attn_paged(qt, st, sink, 0.3), torch.float32)
    for qd, pd in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)):
        mixed = [(sources[0][0].to(pd), sources[0][1]), (sources[1][0].to(qd), sources[1][1])]
        assert_within(A.sparse_attn_paged(q.to(qd), mixed, sink, 0.3),
                      ref.sparse_attn_paged(q.to(qd), mixed, sink, 0.3), qd)


@pytest.mark.parametrize("N", [1, 2, 3, 9])
def test_sparse_attn_threads_agree(N):
    """Key-range splits (few queries) and query-parallel runs on 2 threads vs 1 thread."""
    q, sources, sink = _attn_inputs(20 + N, N, 8, 128, (200, 90), torch.float32, dead_row=None)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = A.sparse_attn_paged(q, sources, sink, 0.09)
        torch.set_num_threads(2)
        two = A.sparse_attn_paged(q, sources, sink, 0.09)
    finally:
        torch.set_num_threads(old)
    want = ref.sparse_attn_paged(q, sources, sink, 0.09)
    assert_within(one, want, torch.float32)
    assert_within(two, want, torch.float32)


def test_sparse_attn_shared_cases():
    for size in ("tiny", "small"):
        for dtype in (torch.float32, torch.bfloat16):
            args, kw = cases.make("sparse_attn_paged", size, dtype=dtype, N=2)
            got, want = A.sparse_attn_paged(*args, **kw), ref.sparse_attn_paged(*args, **kw)
            err = (got.float() - want.float()).abs().max() / want.float().abs().max()
            assert err <= cases.tolerance("sparse_attn_paged", dtype)
            assert_within(got, want, dtype)


def test_sparse_attn_out_of_range_and_fallbacks():
    q, sources, sink = _attn_inputs(3, 2, 4, 32, (10,), torch.float32, dead_row=None)
    pool, idx = sources[0]
    oob = idx.masked_fill(idx < 0, pool.shape[0])  # out of range: no key, as -1 (the twin raises)
    assert torch.equal(A.sparse_attn_paged(q, [(pool, oob)], sink, 0.5), A.sparse_attn_paged(q, sources, sink, 0.5))
    h = [(pool.half(), idx)]  # fp16: the twin itself
    assert torch.equal(A.sparse_attn_paged(q.half(), h, sink, 0.5), ref.sparse_attn_paged(q.half(), h, sink, 0.5))
    three = sources * 3
    assert torch.equal(A.sparse_attn_paged(q, three, sink, 0.5), ref.sparse_attn_paged(q, three, sink, 0.5))
    assert A.sparse_attn_paged(q[:0], [(pool, idx[:0])], sink, 0.5).shape == (0, 4, 32)


def _indexer_inputs(seed, N, H, DI, T, dtype, idx_dtype, P=None):
    gen = torch.Generator().manual_seed(seed)
    P = P or T + 11
    q = torch.randn(N, H, DI, generator=gen).to(dtype)
    w = torch.randn(N, H, generator=gen).to(dtype)
    pool = torch.randn(P, DI, generator=gen).to(dtype)
    return q, w, pool, _idx(gen, N, T, P, idx_dtype, dead_row=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,H,DI,T", [(1, 1, 32, 1), (1, 8, 64, 64), (2, 8, 64, 40), (3, 4, 64, 5),
                                      (3, 6, 32, 70), (3, 6, 128, 300), (1, 4, 48, 70), (3, 4, 32, 0),
                                      (1, 64, 128, 600)])
def test_indexer_parity(N, H, DI, T, dtype):
    for idx_dtype in (torch.int64, torch.int32):
        q, w, pool, idx = _indexer_inputs(N + H + T, N, H, DI, T, dtype, idx_dtype)
        got = A.indexer_scores_paged(q, w, pool, idx)
        assert got.dtype == torch.float32 and got.shape == (N, T)
        assert_within(got, ref.indexer_scores_paged(q, w, pool, idx), torch.float32)
        assert torch.equal(torch.isinf(got), idx < 0)


def test_indexer_views_threads_and_cases():
    q, w, pool, idx = _indexer_inputs(4, 3, 8, 64, 700, torch.bfloat16, torch.int32)
    wide = torch.cat([pool, pool], 1)[:, 64:]  # row stride 128
    iv = torch.cat([idx, idx], 1)[:, 3:703]  # row stride 1400, offset
    old = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(A.indexer_scores_paged(q, w.float(), wide, iv))
    finally:
        torch.set_num_threads(old)
    want = ref.indexer_scores_paged(q, w, wide, iv)
    for got in outs:
        assert_within(got, want, torch.float32)
    q16 = q.half()  # fp16: the twin itself
    assert torch.equal(A.indexer_scores_paged(q16, w, pool.half(), idx), ref.indexer_scores_paged(q16, w, pool.half(), idx))
    for dtype in (torch.float32, torch.bfloat16):
        args, kw = cases.make("indexer_scores_paged", "tiny", dtype=dtype)
        assert_within(A.indexer_scores_paged(*args, **kw), ref.indexer_scores_paged(*args, **kw), torch.float32)


_PLAIN_CHECK = textwrap.dedent("""
    import torch
    from dayzero.ops import ref
    from dayzero.ops.cpu import attention as A, build
    assert "x86-64" in build.flags()[1]
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for dt in (torch.float32, torch.bfloat16):
        for N, H, D, ks in ((1, 4, 128, (64, 8)), (3, 6, 48, (7, 70)), (2, 1, 32, (1,))):
            q = torch.randn(N, H, D, generator=g).to(dt)
            src = []
            for k in ks:
                idx = torch.randint(-1, 2 * k + 3, (N, k), generator=g, dtype=torch.int32)
                src.append((torch.randn(2 * k + 3, D, generator=g).to(dt), idx))
            sink = torch.randn(H, generator=g)
            got, want = A.sparse_attn_paged(q, src, sink, 0.2).float(), ref.sparse_attn_paged(q, src, sink, 0.2).float()
            worst = max(worst, ((got - want).abs() / (2e-5 * want.abs().max() + 2 ** -7 * want.abs())).max().item())
            pool = torch.randn(90, D, generator=g).to(dt)
            w = torch.randn(N, H, generator=g)
            idx = torch.randint(-1, 90, (N, 50), generator=g)
            got, want = A.indexer_scores_paged(q, w, pool, idx), ref.indexer_scores_paged(q, w, pool, idx)
            assert torch.equal(torch.isinf(got), idx < 0)
            f = idx >= 0
            worst = max(worst, ((got[f] - want[f]).abs() / (2e-5 * want[f].abs().max() + 1e-5)).max().item())
    print("WORST", worst)
""")


def test_plain_c_build_agrees(tmp_path):
    """The fallback without AVX-512 (-march=x86-64, its own cache) against the twins."""
    env = {**os.environ, "DAYZERO_CPU_MARCH": "x86-64", "DAYZERO_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-c", _PLAIN_CHECK], env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(r.stdout.split("WORST")[1]) <= 1.0, r.stdout
    assert list(tmp_path.glob("cpu/libdayzero_attention-*.so"))
