"""MoE feed-forward (v4-architecture.md 3.9): sqrtsoftplus router with a selection-only bias, or a
frozen token-id hash table (`tid2eid`) in the first `n_hash_layers` layers; SwiGLU experts with
the asymmetric clamp; the routing weight multiplies the expert hidden before w2; one shared expert.
"""
from __future__ import annotations

import torch
from torch import nn

from dayzero.config import ModelArgs
from dayzero.ops import ref
from dayzero.reference.layers import Linear, UsesOps, fused_pair


class Gate(UsesOps, nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, dtype: torch.dtype):
        super().__init__()
        self.topk, self.route_scale, self.score_func = (
            args.n_activated_experts, args.route_scale, args.score_func)
        self.hash = args.is_hash_layer(layer_id)
        self.weight = nn.Parameter(torch.zeros(args.n_routed_experts, args.dim, dtype=dtype), requires_grad=False)
        if self.hash:
            self.register_buffer("tid2eid", torch.zeros(args.vocab_size, self.topk, dtype=torch.int64))
        else:
            self.bias = nn.Parameter(torch.zeros(args.n_routed_experts), requires_grad=False)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, dim] -> weights [N, k] fp32, expert ids [N, k]; logits in fp32."""
        logits = self.ops.fp32_linear(x, self.weight)
        if self.hash:
            return ref.route(logits, None, self.topk, self.route_scale, self.score_func,
                             hash_idx=self.tid2eid[input_ids.reshape(-1)])
        return ref.route(logits, self.bias, self.topk, self.route_scale, self.score_func)


class Expert(nn.Module):
    def __init__(self, dim: int, inter: int, fmt: str, dtype: torch.dtype, official: bool, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = Linear(dim, inter, fmt, dtype, official)
        self.w2 = Linear(inter, dim, fmt, dtype, official)
        self.w3 = Linear(dim, inter, fmt, dtype, official)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        h = ref.swiglu(*fused_pair(self.w1, self.w3, x), self.limit)
        if weight is not None:
            h = weight[:, None] * h
        return self.w2(h.to(x.dtype))


class MoE(UsesOps, nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, dtype: torch.dtype, official: bool):
        super().__init__()
        self.gate = Gate(args, layer_id, dtype)
        self.experts = nn.ModuleList(
            Expert(args.dim, args.moe_inter_dim, args.routed_expert_format, dtype, official, args.swiglu_limit)
            for _ in range(args.n_routed_experts))
        self.shared_experts = Expert(args.dim, args.moe_inter_dim, args.linear_format, dtype, official,
                                     args.swiglu_limit)
        self.official, self.limit = official, args.swiglu_limit

    def stack_experts(self) -> bool:
        """Re-home the FP4 routed experts' tensors into [E, ...] stacks (each expert's parameters
        become views of them, nothing is copied twice) so `ops.moe_experts` runs them in one call.
        Returns False (and does nothing) for other expert formats."""
        if any(e.w1.fmt != "fp4" for e in self.experts):
            return False
        stacked = []
        for name in ("w1", "w3", "w2"):
            for attr in ("weight", "scale"):
                big = torch.stack([getattr(getattr(e, name), attr) for e in self.experts])
                for i, e in enumerate(self.experts):
                    setattr(getattr(e, name), attr, nn.Parameter(big[i], requires_grad=False))
                stacked.append(big)
        self.__dict__["_stacked"] = tuple(stacked)
        return True

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.gate(x, input_ids)
        stacked = self.__dict__.get("_stacked")
        if stacked is not None:  # one grouped call over every routed expert (FP4 checkpoints)
            xe = self.ops.fp8_act_sim(x, 128) if self.official else x
            y = self.ops.moe_experts(xe, weights, ids, *stacked, self.limit, h_act_sim=self.official)
            y += self.shared_experts(x)  # in-place add: fp32 accumulation of either dtype
            y = y if y.dtype == x.dtype else y.to(x.dtype)
            return y if len(shape) == 2 else y.view(shape)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in ids.unique().tolist():
            tok, slot = torch.where(ids == e)
            y.index_add_(0, tok, self.experts[e](x[tok], weights[tok, slot]).float())
        y += self.shared_experts(x).float()
        return y.to(x.dtype).view(shape)
