"""MoE feed-forward (v4-architecture.md 3.9): sqrtsoftplus router with a selection-only bias, or a
frozen token-id hash table (`tid2eid`) in the first `n_hash_layers` layers; SwiGLU experts with
the asymmetric clamp; the routing weight multiplies the expert hidden before w2; one shared expert.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dayzero.config import ModelArgs
from dayzero.distributed.layout import Layout
from dayzero.ops import ref
from dayzero.ops.experts import PerExpert
from dayzero.ops.rowwise import _CHUNK, _LANES
from dayzero.reference.layers import Linear, UsesOps, fused_pair


def _flat(ids: torch.Tensor) -> torch.Tensor:
    return ids if ids.dim() == 1 else ids.reshape(-1)


_ROUTE: list = []


def _cpu_gate_route():
    """ops/cpu/fused.gate_route where fused.c builds here, else None (looked up once)."""
    if not _ROUTE:
        try:
            from dayzero.ops.cpu import fused
            _ROUTE.append(fused.gate_route)
        except (ImportError, RuntimeError):  # NativeUnavailable is a RuntimeError
            _ROUTE.append(None)
    return _ROUTE[0]


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
        """x [N, dim] -> weights [N, k] fp32, expert ids [N, k]; logits in fp32. The native CPU table
        runs the sequence below as ops/cpu/fused.gate_route (the same bits, fewer ops) where it
        applies."""
        ops = self.ops
        if ops.name == "cpu" and self.score_func == "sqrtsoftplus" and "fp32_linear" in ops.kernels:
            route = _cpu_gate_route()
            got = route and route(x, self.weight, None if self.hash else self.bias, self.topk, self.route_scale,
                                  self.tid2eid[_flat(input_ids)] if self.hash else None)
            if got:
                return got
        logits = ops.fp32_linear(x, self.weight)
        if self.hash:
            return ref.route(logits, None, self.topk, self.route_scale, self.score_func,
                             hash_idx=self.tid2eid[_flat(input_ids)])
        return ref.route(logits, self.bias, self.topk, self.route_scale, self.score_func)


def swiglu_owned(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """ref.swiglu, the same bits, over projections the caller owns (fresh outputs it does not read
    again): clamped, silu'd and multiplied in place, 4 ops where the twin makes 7. Elementwise ops
    compute an element alike in or out of place; what lanewise adds on the CPU (every element on
    torch's vector path) holds here where each row's width is a multiple of its 64 lanes and the
    call is one chunk below the thread split. Other cases (no clamp, autograd, other widths) run
    the twin."""
    n = gate.shape[-1]
    if (limit <= 0 or gate.dtype is not torch.float32 or up.dtype is not torch.float32 or torch.is_grad_enabled()
            or (gate.is_cpu and (n % _LANES or gate.numel() > _CHUNK or gate.stride(-1) != 1))):
        return ref.swiglu(gate, up, limit)
    return F.silu(gate.clamp_(max=limit), inplace=True).mul_(up.clamp_(-limit, limit))


class Expert(nn.Module):
    """SwiGLU expert; `split`: this rank holds a slice of its inner dim (w1/w3 rows, w2 columns)
    and returns a partial sum."""

    def __init__(self, dim: int, inter: int, fmt: str, dtype: torch.dtype, official: bool, limit: float,
                 split: bool = False):
        super().__init__()
        self.limit = limit
        self.w1 = Linear(dim, inter, fmt, dtype, official, split=0 if split else None)
        self.w2 = Linear(inter, dim, fmt, dtype, official, split=1 if split else None)
        self.w3 = Linear(dim, inter, fmt, dtype, official, split=0 if split else None)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        h = swiglu_owned(*fused_pair(self.w1, self.w3, x), self.limit)
        if weight is not None:
            h = weight[:, None] * h
        return self.w2(h.to(x.dtype))


class Experts(nn.ModuleDict):
    """Routed experts by their global id (state_dict names `experts.<id>.*`, as in the checkpoint);
    an expert-parallel rank holds a range of them. Indexed by int, iterates over the experts."""

    def __getitem__(self, e) -> Expert:
        return super().__getitem__(str(e))

    def __iter__(self):
        return iter(self._modules.values())

    def ids(self) -> range:
        keys = [int(k) for k in self._modules]
        return range(keys[0], keys[-1] + 1) if keys else range(0)


class MoE(UsesOps, nn.Module):
    """Tensor parallel (distributed/layout.py): the shared expert split by its inner dim; routed
    experts split the same way, or whole with E/N per rank (`layout.ep`); the routed and shared
    partial sums are summed over ranks in one all-reduce (fp32). DP-attention + EP (`layout.dp`
    > 1): each rank's own tokens are dispatched to every rank's experts and combined back
    (`_forward_dp`); the shared expert is whole on every rank."""

    def __init__(self, args: ModelArgs, layer_id: int, dtype: torch.dtype, official: bool,
                 layout: Layout = Layout()):
        super().__init__()
        self.gate = Gate(args, layer_id, dtype)
        split = not layout.single
        self.experts = Experts({str(e): Expert(args.dim, layout.expert_inter(args), args.routed_expert_format, dtype,
                                               official, args.swiglu_limit, split=split and not layout.ep)
                                for e in layout.experts(args)})
        self.shared_experts = Expert(args.dim, args.moe_inter_dim // layout.tp, args.linear_format, dtype, official,
                                     args.swiglu_limit, split=split)
        self.official, self.limit = official, args.swiglu_limit
        # expert parallel: the routed ids this rank runs, [lo, hi) (all of them otherwise)
        self.local = (None if not layout.ep or layout.whole
                      else (layout.experts(args).start, layout.experts(args).stop))
        # DP-attention + EP: tokens dispatched to every rank's experts and combined (`_forward_dp`)
        self.data_parallel = layout.dp > 1
        self.dim, self.topk = args.dim, args.n_activated_experts

    def host_experts(self, table) -> None:
        """Hybrid placement (`cpu_experts`): this layer's routed experts are in host memory and run
        on `table` (the CPU's op table), whatever the model's device and table; each step's tokens
        and routing go to the host and the routed sum comes back, while the shared expert runs on
        the device (`_on_host`). Call before `Transformer.set_ops`, which groups them for `table`."""
        self.__dict__["_host_ops"] = table
        for e in self.experts:
            for m in e.modules():
                if isinstance(m, UsesOps):
                    m.ops = table

    @property
    def expert_ops(self):
        """The op table the routed experts run on: the host's under hybrid placement, else `ops`."""
        return self.__dict__.get("_host_ops") or self.ops

    def stack_experts(self, in_place: bool = False) -> bool:
        """Hand the FP4 routed experts to `ops.moe_experts` as one group: with `in_place` (a table
        whose kernel reads each expert where it lies, ops/experts.py) as PerExpert lists of the
        experts' own tensors, nothing copied (on a CPU the memory-mapped checkpoint); otherwise
        re-homed into [E, ...] stacks (each expert's parameters become views of them, nothing is
        stored twice). Returns False (and does nothing) for other expert formats."""
        if any(e.w1.fmt != "fp4" for e in self.experts):
            return False
        stacked = []
        for name in ("w1", "w3", "w2"):
            for attr in ("weight", "scale"):
                parts = [getattr(getattr(e, name), attr) for e in self.experts]
                if in_place:
                    # a row-parallel slice (w2 under tensor-parallel experts) is already its own copy
                    parts = [p if p.is_contiguous() else p.contiguous() for p in parts]
                    for e, p in zip(self.experts, parts):
                        setattr(getattr(e, name), attr, nn.Parameter(p, requires_grad=False))
                    stacked.append(PerExpert(parts))
                    continue
                big = torch.stack(parts)
                for i, e in enumerate(self.experts):
                    setattr(getattr(e, name), attr, nn.Parameter(big[i], requires_grad=False))
                stacked.append(big)
        self.__dict__["_stacked"] = tuple(stacked)
        return True

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if len(shape) != 2:
            x = x.reshape(-1, shape[-1])
        if self.data_parallel:
            return self._forward_dp(x, input_ids).view(shape)
        weights, ids = self.gate(x, input_ids)
        if self.__dict__.get("_host_ops") is not None:
            y, shared = self._on_host(x, weights, ids, self.shared_experts)
        else:
            y, shared = self._routed(x, weights, ids), None
        if self.__dict__.get("_stacked") is not None:
            y += self.shared_experts(x) if shared is None else shared  # in-place add: fp32 accumulation of either dtype
            y = self.comm.all_reduce(y)
            y = y if y.dtype == x.dtype else y.to(x.dtype)
            return y if len(shape) == 2 else y.view(shape)
        y += (self.shared_experts(x) if shared is None else shared).float()
        return self.comm.all_reduce(y).to(x.dtype).view(shape)

    def _on_host(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, meanwhile=None):
        """Hybrid placement: the routed experts' sum (`_routed`) computed on the host table over
        copies of x, weights and ids, returned on x's device (fp32), and `meanwhile(x)` (the shared
        expert) queued on the device after the copies and before the host computes, so a GPU runs
        it while the CPU runs the experts (CUDA: the host waits for the copies only). Returns
        (routed sum, meanwhile's result or None)."""
        dev = x.device
        if dev.type == "cpu":
            xh, wh, ih, copied = x, weights, ids, None
        elif dev.type == "cuda":  # into pinned memory, in stream order
            xh, wh, ih = (t.to("cpu", non_blocking=True) for t in (x, weights, ids))
            copied = torch.cuda.Event()
            copied.record()
        else:
            xh, wh, ih, copied = x.cpu(), weights.cpu(), ids.cpu(), None
        other = meanwhile(x) if meanwhile is not None else None
        if copied is not None:
            copied.synchronize()
        y = self._routed(xh, wh, ih)
        return (y if y.device == dev else y.to(dev)), other

    def _routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """This rank's routed experts' weighted sum over the tokens x [n, dim] routed (weights,
        ids: [n, k], global expert ids): [n, dim], fp32 in the loop, the kernel's dtype grouped."""
        stacked = self.__dict__.get("_stacked")
        if stacked is not None:  # one grouped call over every routed expert (FP4 checkpoints)
            ops = self.expert_ops
            xe = ops.fp8_act_sim(x, 128) if self.official else x
            if self.local is not None:
                weights, ids = self._local_pairs(weights, ids)
            return ops.moe_experts(xe, weights, ids, *stacked, self.limit, h_act_sim=self.official)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        held = self.experts.ids()
        for e in ids.unique().tolist():
            if e not in held:  # expert parallel: another rank's expert
                continue
            tok, slot = torch.where(ids == e)
            y.index_add_(0, tok, self.experts[e](x[tok], weights[tok, slot]).float())
        return y

    def _forward_dp(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """DP-attention + EP: x [n, dim] are this rank's tokens (n = 0 on a rank with no requests
        this step: it still joins every collective). Routing is computed here; the step's tokens of
        every rank and their routing are all-gathered, this rank's E/N experts run on all of them,
        and the fp32 partial sums go back to the tokens' ranks in one reduce-scatter, where the
        shared expert (whole on every rank) is added. Why all-gather + reduce-scatter rather than
        all-to-all: both are one fixed-size call per rank (each rank's share padded to the step's
        largest), which gloo and NCCL run alike, with no per-destination split bookkeeping; every
        rank receives every token (N x the bytes of a top-k all-to-all), which at decode sizes is
        latency, not bandwidth (docs/SCALING.md)."""
        n = x.shape[0]
        if n:
            weights, ids = self.gate(x, input_ids)
        else:  # an idle rank: no tokens, no routing, the same collectives
            weights = torch.zeros(0, self.topk, dtype=torch.float32, device=x.device)
            ids = torch.zeros(0, self.topk, dtype=torch.int64, device=x.device)
        xs, ws, es, counts = self.comm.dispatch(x, weights, ids)
        if not xs.shape[0]:
            y = xs.new_zeros(xs.shape, dtype=torch.float32)
        elif self.__dict__.get("_host_ops") is not None:
            y = self._on_host(xs, ws, es)[0]
        else:
            y = self._routed(xs, ws, es)
        y = self.comm.combine(y.float(), counts)  # [n, dim] fp32: every rank's experts summed
        if n:
            y += self.shared_experts(x).float()
        return y.to(x.dtype)

    def idle(self, dtype: torch.dtype, device: torch.device) -> None:
        """A rank with no tokens this step joins this layer's dispatch and combine (x: the
        compute dtype, as every rank's MoE input)."""
        self._forward_dp(torch.zeros(0, self.dim, dtype=dtype, device=device),
                         torch.zeros(0, dtype=torch.int64, device=device))

    def _local_pairs(self, weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert parallel, stacked experts: each token's (weight, id) pairs of this rank's experts,
        ids made local, moved to the front of the row and cut to the largest count of any row;
        the slots a shorter row leaves get local expert 0 with weight 0 (a zero contribution)."""
        lo, hi = self.local
        mine = (ids >= lo) & (ids < hi)
        order = torch.argsort((~mine).to(torch.int8), dim=1, stable=True)
        mine = mine.gather(1, order)
        ids = torch.where(mine, ids.gather(1, order) - lo, 0)
        weights = torch.where(mine, weights.gather(1, order), 0.0)
        k = int(mine.sum(1).max()) if mine.numel() else 0
        return weights[:, :k].contiguous(), ids[:, :k].contiguous()
