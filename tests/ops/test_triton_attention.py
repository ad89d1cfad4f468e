"""Parity of the Triton sparse attention / indexer kernels with their twins in ops/ref.py.

Runs on the GPU when there is one, else on the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1). Tolerances:
- fp32 inputs: the dots run in IEEE fp32 and only the summation order differs from the twin
  (online softmax, split merge): errors ~1e-6, checked at 1e-4.
- bf16 inputs: both sides read the same bf16 values and accumulate in fp32; the output is rounded to
  bf16 (2^-8 relative) and on the GPU the probabilities enter the PV tensor-core dot as bf16
  (another 2^-8 relative per term, averaged over keys): checked at 2e-2 abs + rel on O(1) outputs.
- indexer with bf16 inputs: products of bf16 values are exact in fp32, so only fp32 summation order
  differs (sums of ~Di * H terms of O(1)): 1e-3.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton has no wheel for this platform (test extras install it on Linux x86-64)")

from dayzero.ops import ref
from dayzero.ops.triton import attention as A
from dayzero.ops.triton import indexer as I

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def _idx(gen, n, k, p, dtype=torch.int64, holes=0.2, dead_row=None):
    """Unordered, repeating rows of a pool of p rows with random -1 holes; row dead_row all -1."""
    idx = torch.randint(0, p, (n, k), generator=gen)
    idx = idx.masked_fill(torch.rand(n, k, generator=gen) < holes, -1)
    if dead_row is not None and n > dead_row:
        idx[dead_row] = -1
    return idx.to(dtype).to(DEV)


def _attn_inputs(seed, N, H, D, ks, dtype, dead_row=1, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(N, H, D, generator=gen) * spread).to(DEV, dtype)
    sources = []
    for i, k in enumerate(ks):
        p = 3 * k + 5 + i  # more pool rows than indexed keys; differing pool sizes
        pool = torch.randn(p, D, generator=gen).to(DEV, dtype)
        sources.append((pool, _idx(gen, N, k, p, torch.int32 if i else torch.int64, dead_row=dead_row)))
    sink = torch.randn(H, generator=gen).to(DEV)
    return q, sources, sink


ATTN_GRID = [  # (N, H, D, key counts per source)
    (1, 1, 32, (0,)),
    (1, 4, 64, (128,)),
    (1, 6, 32, (7, 130)),
    (1, 4, 48, (33, 1)),  # D not a power of 2
    (3, 4, 32, (1, 33)),
    (3, 6, 64, (130, 0)),
    (3, 1, 64, (33,)),
    (17, 4, 32, (7, 33)),
    (17, 6, 32, (0, 0)),
    (17, 1, 64, (1, 130)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,H,D,ks", ATTN_GRID, ids=[f"N{n}-H{h}-D{d}-K{'+'.join(map(str, k))}"
                                                     for n, h, d, k in ATTN_GRID])
def test_sparse_attn_parity(N, H, D, ks, dtype):
    q, sources, sink = _attn_inputs(N * 100 + H * 10 + len(ks), N, H, D, ks, dtype)
    got = A.sparse_attn_paged(q, sources, sink, D ** -0.5)
    if sum(ks):
        want = ref.sparse_attn_paged(q, sources, sink, D ** -0.5)
    else:  # no keys at all: softmax over the sink alone, no values (the twin's amax rejects K=0)
        want = torch.zeros_like(q)
    assert got.dtype == dtype and got.shape == (N, H, D)
    torch.testing.assert_close(got, want, **TOL[dtype])
    if N > 1:  # the dead row attends to the sink alone: exactly zero output
        assert torch.all(got[1] == 0)


def test_sparse_attn_large_logits_and_strided_pool():
    """Logits spread over tens of units (rescaling in the online softmax and the split merge
    matters), a pool with strided rows and an idx view with a wide row stride, every row dead."""
    N, H, D = 2, 4, 32
    q, sources, sink = _attn_inputs(7, N, H, D, (40, 90), torch.float32, dead_row=None, spread=4.0)
    wide = torch.randn(sources[0][0].shape[0], 2 * D, device=DEV)
    sources[0] = (wide[:, D:], sources[0][1])
    idx1 = sources[1][1]  # an index view with a row stride wider than its K
    sources[1] = (sources[1][0], torch.cat([idx1, idx1[:, :5]], 1)[:, :idx1.shape[1]])
    for scale in (0.1, 2.0):
        torch.testing.assert_close(A.sparse_attn_paged(q, sources, sink, scale),
                                   ref.sparse_attn_paged(q, sources, sink, scale), **TOL[torch.float32])
    dead = [(p, torch.full_like(i, -1)) for p, i in sources]
    assert torch.all(A.sparse_attn_paged(q, dead, sink, 1.0) == 0)


def test_sparse_attn_mixed_dtypes():
    """Pools of different dtypes (each source's loop is compiled for its own pool): bf16 q."""
    q, sources, sink = _attn_inputs(11, 3, 4, 32, (20, 45), torch.bfloat16)
    sources[0] = (sources[0][0].float(), sources[0][1])
    torch.testing.assert_close(A.sparse_attn_paged(q, sources, sink, 0.3),
                               ref.sparse_attn_paged(q, sources, sink, 0.3), **TOL[torch.bfloat16])


@pytest.mark.parametrize("cfg", A.TUNABLES["sparse_attn_paged"].space, ids=lambda c: "-".join(map(str, c.values())))
def test_sparse_attn_every_config_agrees(cfg):
    """Every candidate of the tuning space on the split path (N=1) and the one-split path (N=9),
    H=20 so BLOCK_H 16/32/64 tile the heads differently."""
    for N in (1, 9):
        q, sources, sink = _attn_inputs(3 + N, N, 20, 32, (19, 75), torch.float32)
        torch.testing.assert_close(A.sparse_attn_paged(q, sources, sink, 0.2, config=cfg),
                                   ref.sparse_attn_paged(q, sources, sink, 0.2), **TOL[torch.float32])


def _indexer_inputs(seed, N, H, DI, T, dtype):
    gen = torch.Generator().manual_seed(seed)
    P = T + 11
    q = torch.randn(N, H, DI, generator=gen).to(DEV, dtype)
    w = torch.randn(N, H, generator=gen).to(DEV, dtype)
    pool = torch.randn(P, DI, generator=gen).to(DEV, dtype)
    return q, w, pool, _idx(gen, N, T, P, torch.int32 if T % 2 else torch.int64, dead_row=1)


IDX_TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.bfloat16: {"atol": 1e-3, "rtol": 1e-3}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,H,DI,T", [(1, 1, 32, 1), (3, 4, 64, 5), (17, 6, 32, 70), (3, 6, 64, 300),
                                      (1, 4, 48, 70), (3, 4, 32, 0)])
def test_indexer_parity(N, H, DI, T, dtype):
    q, w, pool, idx = _indexer_inputs(N + H + T, N, H, DI, T, dtype)
    got = I.indexer_scores_paged(q, w, pool, idx)
    assert got.dtype == torch.float32 and got.shape == (N, T)
    torch.testing.assert_close(got, ref.indexer_scores_paged(q, w, pool, idx), **IDX_TOL[dtype])
    assert torch.equal(torch.isinf(got), idx < 0)


@pytest.mark.parametrize("cfg", I.TUNABLES["indexer_scores_paged"].space,
                         ids=lambda c: "-".join(map(str, c.values())))
def test_indexer_every_config_agrees(cfg):
    q, w, pool, idx = _indexer_inputs(5, 3, 20, 32, 300, torch.float32)
    torch.testing.assert_close(I.indexer_scores_paged(q, w, pool, idx, config=cfg),
                               ref.indexer_scores_paged(q, w, pool, idx), **IDX_TOL[torch.float32])


def test_tuning_cases_run():
    for name, tunable in A.TUNABLES.items():
        assert 3 <= len(tunable.space) <= 8, name
        for key, run in tunable.cases(torch.device(DEV)):
            assert isinstance(key, str) and run(tunable.space[0]).shape[0] >= 1


def test_bad_inputs():
    q, sources, sink = _attn_inputs(0, 2, 4, 32, (5,), torch.float32)
    with pytest.raises(ValueError, match="sources"):
        A.sparse_attn_paged(q, [], sink, 1.0)
    with pytest.raises(ValueError, match="idx"):
        A.sparse_attn_paged(q, [(sources[0][0], sources[0][1].float())], sink, 1.0)
    with pytest.raises(ValueError, match="pool"):
        A.sparse_attn_paged(q, [(sources[0][0][:, :16], sources[0][1])], sink, 1.0)
    with pytest.raises(ValueError, match="sink"):
        A.sparse_attn_paged(q, sources, sink[:3], 1.0)
    with pytest.raises(ValueError, match="q"):
        A.sparse_attn_paged(q[0], sources, sink, 1.0)
    with pytest.raises(ValueError, match="w"):
        I.indexer_scores_paged(q, torch.ones(2, 3, device=DEV), sources[0][0], sources[0][1])
    with pytest.raises(ValueError, match="idx"):
        I.indexer_scores_paged(q, torch.ones(2, 4, device=DEV), sources[0][0], sources[0][1][:1])
