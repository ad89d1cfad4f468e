"""Random inputs for every op of the seam at a named size, shared by `dayzero verify`,
`dayzero bench` and the tests: one generator of shapes, so what is verified is what is measured.

Sizes: "tiny" (edge-ish shapes, interpreter-fast), "small" (CPU-sized V4-like), "flash"
(V4-Flash per-layer shapes: dim 4096, 64 heads x 512, window 128, top-k 512, indexer 64 x 128,
256 experts x 2048 FP4, hc 4). Every case returns (args, kwargs) for the op's twin signature.
Besides one case per op, VARIANTS names cases of an op on other inputs ("sparse_attn_paged:fp8":
its pools in the FP8 cache format, ops/kvfp8.py, rope dims D/8 as V4's 64 of 512).
"""
from __future__ import annotations

import torch

from dayzero.loader.formats import quant_fp4, quant_fp8_block
from dayzero.ops.kvfp8 import Fp8Layout, Fp8Rows, pack

VARIANTS = {"sparse_attn_paged:fp8": "sparse_attn_paged"}  # case name -> op

SIZES = {
    #          tokens dim  heads D  window topk entries pool  experts inter k  hc
    "tiny": dict(N=3, dim=64, H=6, D=32, window=7, topk=5, T=37, P=300, E=5, inter=64, k=2, hc=3),
    "small": dict(N=8, dim=512, H=16, D=128, window=32, topk=64, T=512, P=4096, E=16, inter=256, k=4, hc=4),
    "flash": dict(N=1, dim=4096, H=64, D=512, window=128, topk=512, T=2048, P=65536, E=256, inter=2048, k=6,
                  hc=4),
}
INDEX_HEADS = {"tiny": (4, 32), "small": (16, 64), "flash": (64, 128)}


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, dtype=torch.float32, device="cpu", std=1.0):
    return (torch.randn(*shape, generator=g) * std).to(dtype).to(device)


def _idx(g, N: int, K: int, P: int, holes: float, device) -> torch.Tensor:
    idx = torch.randint(0, P, (N, K), generator=g)
    idx[torch.rand(N, K, generator=g) < holes] = -1
    return idx.to(torch.int32).to(device)


def make(op: str, size: str = "tiny", device="cpu", dtype=torch.bfloat16, seed: int = 0, **over):
    """(args, kwargs) for `op` at `size` (dims overridable, e.g. N=64)."""
    s = {**SIZES[size], **over}
    g, dev = _g(seed), torch.device(device)
    N, dim, H, D = s["N"], s["dim"], s["H"], s["D"]
    if op == "rms_norm":
        return (_randn(g, N, dim, dtype=dtype, device=dev), _randn(g, dim, device=dev).to(dtype), 1e-6), {}
    if op == "fp8_act_sim":
        return (_randn(g, N, dim, dtype=dtype, device=dev, std=3.0), 128), {}
    if op == "fp32_linear":
        w = _randn(g, s["inter"] + 3, dim, dtype=torch.bfloat16, device=dev, std=dim ** -0.5)
        return (_randn(g, N, dim, dtype=dtype, device=dev), w), {}
    if op == "apply_rope":
        ang = _randn(g, N, 1, D // 4, device=dev, std=50.0)
        return (_randn(g, N, H, D, dtype=dtype, device=dev), ang.cos(), ang.sin()), {"inverse": seed % 2 == 1}
    if op in ("sparse_attn_paged", "sparse_attn_paged:fp8"):
        q = _randn(g, N, H, D, dtype=dtype, device=dev)
        pool_w = _randn(g, s["P"], D, dtype=dtype, device=dev)
        pool_e = _randn(g, s["P"] // 4, D, dtype=dtype, device=dev)
        if op.endswith(":fp8"):
            lay = Fp8Layout(D, D // 8, dtype)
            pool_w, pool_e = Fp8Rows(pack(pool_w, lay), lay), Fp8Rows(pack(pool_e, lay), lay)
        sources = [(pool_w, _idx(g, N, s["window"], s["P"], 0.05, dev)),
                   (pool_e, _idx(g, N, s["topk"], s["P"] // 4, 0.05, dev))]
        return (q, sources, _randn(g, H, device=dev), D ** -0.5), {}
    if op == "indexer_scores_paged":
        Hi, Di = INDEX_HEADS[size]
        q = _randn(g, N, Hi, Di, dtype=dtype, device=dev)
        w = _randn(g, N, Hi, device=dev) * (Di ** -0.5 * Hi ** -0.5)
        pool = _randn(g, s["P"], Di, dtype=dtype, device=dev)
        return (q, w, pool, _idx(g, N, s["T"], s["P"], 0.02, dev)), {}
    if op == "topk_select":
        # indexer-like scores: ReLU zeros (+0.0 and -0.0, equal) fewer positives row after row so
        # that later rows' top-k reach into the ties; -inf for unusable entries, every entry of
        # the last row when N > 1; bf16: scores bf16-rounded (more ties)
        T = s["T"] * 4
        shift = torch.linspace(0.0, 3.5, N)[:, None]
        scores = (_randn(g, N, T) - shift).to(dtype).float().relu()
        scores[torch.rand(N, T, generator=g) < 0.25] = -0.0
        scores[torch.rand(N, T, generator=g) < 0.05] = float("-inf")
        if N > 1:
            scores[-1] = float("-inf")
        return (scores.to(dev), s["topk"] * 2), {}
    if op == "compress_pool":
        E = max(N, 4)
        gate = _randn(g, E, 8, D, device=dev)
        gate[:, :2][torch.rand(E, 2, D, generator=g).to(dev) < 0.5] = float("-inf")
        return (_randn(g, E, 8, D, device=dev), gate), {}
    if op in ("hc_pre", "hc_post"):
        n = s["hc"]
        x = _randn(g, N, n, dim, dtype=dtype, device=dev)
        if op == "hc_pre":
            mix = (2 + n) * n
            fn = _randn(g, mix, n * dim, device=dev, std=(n * dim) ** -0.5)
            return (x, fn, _randn(g, 3, device=dev), _randn(g, mix, device=dev), 20, 1e-6, 1e-6), {}
        comb = torch.rand(N, n, n, generator=g).to(dev)
        return (_randn(g, N, dim, dtype=dtype, device=dev), x, torch.rand(N, n, generator=g).to(dev) * 2,
                comb / comb.sum(-2, keepdim=True)), {}
    if op == "fp8_linear":
        w, sc = quant_fp8_block(torch.randn(s["inter"] * 2 + 70, dim, generator=g) * 0.02)
        return (_randn(g, N, dim, dtype=dtype, device=dev), w.to(dev), sc.to(dev)), {}
    if op == "fp4_linear":
        w, sc = quant_fp4(torch.randn(s["inter"], dim, generator=g) * 0.02)
        return (_randn(g, N, dim, dtype=dtype, device=dev), w.to(dev), sc.to(dev)), {}
    if op == "moe_experts":
        E, k, inter = s["E"], s["k"], s["inter"]
        stacks = []
        for out, inn in ((inter, dim), (inter, dim), (dim, inter)):
            ws, ss = zip(*(quant_fp4(torch.randn(out, inn, generator=g) * inn ** -0.5) for _ in range(E)))
            stacks += [torch.stack(ws).to(dev), torch.stack(ss).to(dev)]
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)]).to(dev)
        weights = torch.rand(N, k, generator=g).to(dev)
        return (_randn(g, N, dim, dtype=dtype, device=dev), weights, ids, *stacks, 10.0), {"h_act_sim": False}
    raise ValueError(f"no cases for op {op!r}")


def tolerance(op: str, dtype: torch.dtype) -> float:
    """Max error relative to the reference output's max |value| that counts as the same result:
    fp32 differs by summation order only; bf16 outputs additionally by one rounding of the result
    (2^-8) and of intermediates the twin rounds at other points; fp8_act_sim and topk_select (integer
    indices) must be exact."""
    op = VARIANTS.get(op, op)
    if op in ("fp8_act_sim", "topk_select"):
        return 0.0
    return 2e-5 if dtype == torch.float32 else 1.6e-2
