"""DeepSeek-V4.1's MoE: V4's experts, expert loop and shared expert (reference/moe.py) behind V4.1's
gate: every layer routes by a learned gate (no hash layers, no expert groups), scores
sqrtsoftplus(logits / gate_temp), selection by scores + `bias` (`bias_vl` for image-span tokens),
weights from the unbiased scores, renormalised, times `route_scale` (research/v41-and-dspark.md 1.3).
"""
from __future__ import annotations

import torch
from torch import nn

from dayzero.distributed.comm import SINGLE
from dayzero.distributed.layout import Layout
from dayzero.ops import ref
from dayzero.reference.layers import UsesOps
from dayzero.reference.moe import MoE, Expert, Experts
from dayzero.v41.formats import expert_format, v41_linear


class V41Gate(UsesOps, nn.Module):
    def __init__(self, args, n_experts: int, topk: int, dtype: torch.dtype):
        super().__init__()
        # transformers' deepseek_v41 renormalises the top-k weights for every scoring function and
        # not at top-1; the shared router (ops/ref.route) does neither of those two: refuse them
        if args.score_func == "softmax" or topk == 1:
            raise ValueError(f"DeepSeek-V4.1 routing with score_func={args.score_func!r} and top-k {topk} is not "
                             f"built (the released model uses 'sqrtsoftplus' with top-6; any top-k > 1 of "
                             f"'sqrtsoftplus' or 'sigmoid' is)")
        self.topk, self.route_scale, self.score_func, self.temp = topk, args.route_scale, args.score_func, args.gate_temp
        self.weight = nn.Parameter(torch.zeros(n_experts, args.dim, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(n_experts), requires_grad=False)
        self.bias_vl = nn.Parameter(torch.zeros(n_experts), requires_grad=False)  # image spans (vision: not built)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, dim] -> weights [N, k] fp32, expert ids [N, k]. Text only: every token uses `bias`."""
        logits = self.ops.fp32_linear(x, self.weight)
        if self.temp != 1.0:
            logits = logits / self.temp
        return ref.route(logits, self.bias, self.topk, self.route_scale, self.score_func)


class V41MoE(MoE):
    """V4's MoE (its forward, expert loop, grouped FP4 path and tensor / expert parallel split,
    reference/moe.py) with the V4.1 gate. `layout` (distributed/layout.py): the shared expert split by
    its inner dim over the tensor-parallel ranks, the routed experts split the same way or, with
    `layout.ep`, whole with E/N per rank; the gate is whole on every rank. DP-attention + EP
    (`layout.dp` > 1): the shared expert whole, E/N routed experts per rank, each step's tokens of
    every rank all-gathered with their routing and the partial sums reduce-scattered back (V4's
    `MoE._forward_dp`, the same code). Hybrid placement: V4's `host_experts`."""

    def __init__(self, args, dtype: torch.dtype, official: bool = False, layout: Layout = Layout()):
        nn.Module.__init__(self)
        self.gate = V41Gate(args, args.n_routed_experts, args.n_activated_experts, dtype)
        fmt = expert_format(args)  # MXFP4 in a quantised checkpoint (V4's format and expert path)
        split = not layout.single
        self.experts = Experts({str(e): Expert(args.dim, layout.expert_inter(args), fmt, dtype, official,
                                               args.swiglu_limit, split=split and not layout.ep)
                                for e in layout.experts(args)})
        inter = args.moe_inter_dim // layout.tp
        self.shared_experts = Expert(args.dim, inter, "dense", dtype, official, args.swiglu_limit, split=split)
        if args.quant == "fp8":  # the shared expert is a DENSE-role weight: FP8 in 32x32 blocks
            for name, (i, o, dim) in (("w1", (args.dim, inter, 0)), ("w2", (inter, args.dim, 1)),
                                      ("w3", (args.dim, inter, 0))):
                setattr(self.shared_experts, name, v41_linear(args, i, o, dtype, split=dim if split else None))
        self.official, self.limit = official, args.swiglu_limit
        # expert parallel: the routed ids this rank runs, [lo, hi) (all of them otherwise)
        held = layout.experts(args)
        self.local = None if not layout.ep or layout.whole else (held.start, held.stop)
        self.data_parallel, self.comm = layout.dp > 1, SINGLE
        self.dim, self.topk = args.dim, args.n_activated_experts
