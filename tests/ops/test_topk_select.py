"""topk_select, the indexer's top-k: the twin (ops/ref.py), the native CPU kernel (ops/cpu/topk.c)
and the Triton kernel (ops/triton/topk.py; the interpreter on a CPU) give the same integers: the
columns of a stable descending sort (ties to the lower column, +0.0 == -0.0, NaN above +inf), -1
where the selected score is -inf. Exact equality, no tolerance."""
from __future__ import annotations

import platform

import pytest
import torch

from dayzero.ops import cases, ref

from tests.ops.bounds import scalar_build_runs

DEV = "cuda" if torch.cuda.is_available() else "cpu"
KINDS = ("randn", "ties", "zeros", "partial", "ninf")


def _scores(kind: str, N: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        return torch.randn(N, T, generator=g)
    if kind == "ties":  # small integers: runs of equal scores everywhere
        return torch.randint(-2, 3, (N, T), generator=g).float()
    if kind == "zeros":  # ReLU-like: mostly +0.0 / -0.0 (equal), a few positives, some -inf
        s = (torch.randn(N, T, generator=g) - 1.5).relu()
        s[torch.rand(N, T, generator=g) < 0.5] = -0.0
        s[torch.rand(N, T, generator=g) < 0.1] = float("-inf")
        return s
    if kind == "partial":  # fewer usable entries than k in many rows
        s = torch.randn(N, T, generator=g)
        s[torch.rand(N, T, generator=g) < 0.9] = float("-inf")
        return s
    if kind == "ninf":
        return torch.full((N, T), float("-inf"))
    raise ValueError(kind)


def _grid(k: int):
    return sorted({0, 1, 7, max(k - 1, 0), k, k + 1, 5000})


def test_twin_is_the_stable_sort_it_documents():
    """Against a plain Python definition: sort by (score descending, column), -0.0 == 0.0."""
    s = _scores("zeros", 4, 300)
    s[0, :50] = _scores("ties", 1, 50)[0]
    s[1] = float("-inf")
    for k in (1, 8, 299, 300, 400):
        got = ref.topk_select(s, k)
        assert got.shape == (4, min(k, 300)) and got.dtype == torch.int64
        for r in range(4):
            v = s[r].tolist()
            order = sorted(range(300), key=lambda c: (-v[c], c))[:k]
            assert got[r].tolist() == [-1 if v[c] == float("-inf") else c for c in order]
    # exactly what the indexer's selection computed before the op existed
    top = s.sort(dim=-1, descending=True, stable=True).indices[:, :8]
    assert torch.equal(ref.topk_select(s, 8), torch.where(torch.gather(s != float("-inf"), 1, top), top, -1))
    assert ref.topk_select(torch.zeros(3, 0), 8).shape == (3, 0)
    assert ref.topk_select(torch.zeros(0, 5), 8).shape == (0, 5)


# ---- native CPU kernel -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_topk():
    from dayzero.ops import cpu
    if "topk" in cpu.unavailable():
        pytest.fail(f"the native topk kernel does not build here: {cpu.unavailable()['topk']}")
    from dayzero.ops.cpu.topk import topk_select
    return topk_select


@pytest.mark.parametrize("k", [1, 8, 512])
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_kernel_equals_twin(cpu_topk, kind, k):
    for T in _grid(k):
        for N in (0, 1, 3, 33):
            s = _scores(kind, N, T, seed=T + N)
            want = ref.topk_select(s, k)
            got = cpu_topk(s, k)
            assert got.dtype == torch.int64 and got.shape == want.shape, (kind, N, T, k)
            assert torch.equal(got, want), (kind, N, T, k)


def test_cpu_kernel_edge_inputs(cpu_topk):
    # NaN (either sign) sorts above +inf, in column order, like torch's sort
    nan = float("nan")
    s = torch.tensor([[1.0, nan, 2.0, -nan, nan, float("inf"), float("-inf"), -0.0, 0.0]] * 2)
    for k in (1, 3, 9, 20):
        assert torch.equal(cpu_topk(s, k), ref.topk_select(s, k))
    # long rows: every radix level and the tie paths (all equal, equal after the last digit)
    for kind in ("randn", "ties", "zeros"):
        s = _scores(kind, 3, 70000, seed=1)
        for k in (512, 1024):
            assert torch.equal(cpu_topk(s, k), ref.topk_select(s, k)), (kind, k)
    s = torch.zeros(2, 20000)
    s[0, ::2] = -0.0
    s[1, 10000:] = 1.0
    assert torch.equal(cpu_topk(s, 512), ref.topk_select(s, 512))
    # a column view (row stride > T), k = 0, and the twin for what the kernel does not take
    big = torch.randn(5, 900)
    assert torch.equal(cpu_topk(big[:, 100:700], 64), ref.topk_select(big[:, 100:700], 64))
    assert torch.equal(cpu_topk(big.t().contiguous().t(), 64), ref.topk_select(big, 64))
    assert cpu_topk(big, 0).shape == (5, 0)
    assert torch.equal(cpu_topk(big.bfloat16(), 10), ref.topk_select(big.bfloat16(), 10))
    # threads: many rows take the parallel path
    s = _scores("zeros", 256, 2000, seed=2)
    assert torch.equal(cpu_topk(s, 128), ref.topk_select(s, 128))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the scalar build is -march=x86-64")
def test_cpu_kernel_plain_c_build(tmp_path):
    code = ("import torch; from dayzero.ops import ref; from dayzero.ops.cpu.topk import topk_select\n"
            "g = torch.Generator().manual_seed(0)\n"
            "for T, k in ((7, 8), (300, 8), (5000, 512), (70000, 1024)):\n"
            "    s = torch.randint(-2, 3, (3, T), generator=g).float(); s[s == -2] = float('-inf'); s[s == 0] = -0.0\n"
            "    r = torch.randn(3, T, generator=g)\n"
            "    for x in (s, r): assert torch.equal(topk_select(x, k), ref.topk_select(x, k)), (T, k)\n")
    scalar_build_runs("topk", code, tmp_path)


# ---- Triton kernel -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tri():
    pytest.importorskip("triton", reason="Triton has no wheel for this platform (test extras install it on Linux x86-64)")
    from dayzero.ops.triton import topk
    return topk


def _check_triton(tri, s, k, config=None):
    want = ref.topk_select(s, k)
    got = tri.topk_select(s.to(DEV), k, config=config).cpu()
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got, want), (tuple(s.shape), k, config)


@pytest.mark.parametrize("k", [1, 8])
def test_triton_equals_twin_small_k(tri, k):
    for kind in KINDS:
        for T in _grid(k)[:-1]:  # 0, 1, 7, k-1, k, k+1
            for N in (0, 1, 3):
                _check_triton(tri, _scores(kind, N, T, seed=T + N), k)
    for kind in ("ties", "zeros"):
        _check_triton(tri, _scores(kind, 33, 20, seed=3), k)
        _check_triton(tri, _scores(kind, 1, 5000, seed=4), k)


def test_triton_equals_twin_k512(tri):
    for T in (511, 512, 513, 5000):
        for kind in ("ties", "zeros", "partial"):
            _check_triton(tri, _scores(kind, 1, T, seed=T), 512)
    _check_triton(tri, _scores("ninf", 2, 600), 512)


def test_triton_tournament_rounds_and_configs(tri):
    """Small blocks force many splits per row and several launches (scratch rounds); every config
    of the tuning space gives the same integers."""
    nan = float("nan")
    s = _scores("ties", 2, 500, seed=5)
    s[0, 3::50] = nan
    s[1, :300] = -0.0
    for k, block in ((1, 16), (8, 32), (5, 16)):
        _check_triton(tri, s, k, dict(tri.TOPK_DEFAULT, BLOCK=block))
    view = _scores("zeros", 2, 900, seed=6)[:, 50:650]  # row stride > T
    _check_triton(tri, view, 8, dict(tri.TOPK_DEFAULT, BLOCK=64))
    for cfg in tri.TUNABLES["topk_select"].space:
        _check_triton(tri, _scores("zeros", 1, 2500, seed=7), 8, cfg)


def test_triton_rejects_what_it_does_not_take(tri):
    with pytest.raises(ValueError, match="float32"):
        tri.topk_select(torch.zeros(2, 4, dtype=torch.bfloat16, device=DEV), 2)
    with pytest.raises(ValueError, match="k:"):
        tri.topk_select(torch.zeros(2, 4, device=DEV), -1)
    assert tri.topk_select(torch.zeros(2, 4, device=DEV), 0).shape == (2, 0)


# ---- the seam ----------------------------------------------------------------------------------
def test_verify_cases_reach_ties_and_are_exact(cpu_topk):
    """The `dayzero verify` inputs cut into ties in some rows, hold a whole -inf row, and the op
    must match exactly (tolerance 0)."""
    assert cases.tolerance("topk_select", torch.float32) == 0.0
    (s, k), kw = cases.make("topk_select", "small")
    want = ref.topk_select(s, k)
    picked = torch.gather(s, 1, want.clamp(min=0))
    assert (picked == 0).any() and (want[-1] == -1).all()
    assert torch.equal(cpu_topk(s, k, **kw), want)
