"""The collectives the model calls, over torch.distributed: one object per process, installed in
every module beside its op table (`Transformer.set_comm`). `SINGLE` (one rank) does nothing, so
the one-device path is the same code with identity collectives.

Every rank gets the same bits from a collective (gloo's and NCCL's all-reduce hand every rank the
one reduced result), so replicated state (residual streams, the MQA cache rows, router choices)
stays identical on every rank without being compared.
"""
from __future__ import annotations

import contextlib

import torch


class Comm:
    """One rank: identity collectives."""
    world = 1
    rank = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place where there are several); returns the sum."""
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x, concatenated along `dim` in rank order."""
        return x

    def counted(self, counts: list[int] | None):
        """A context for one step call whose rows per rank (`counts`, rank 0's decision, sent with
        the call) `dispatch` then uses instead of gathering them in every MoE layer."""
        return contextlib.nullcontext()

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        """DP-attention + EP (reference/moe.py): every rank's tokens x [n_r, dim] and their routing
        (weights [n_r, k] fp32, ids [n_r, k]) concatenated in rank order, and the counts n_r that
        `combine` needs. One rank: its own."""
        return x, weights, ids, [x.shape[0]]

    def combine(self, y: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The rows of `dispatch`'s tokens, [sum(counts), dim] partial sums on every rank -> this
        rank's n_r rows summed over ranks."""
        return y


SINGLE = Comm()


class GroupComm(Comm):
    """The collectives of one torch.distributed process group (NCCL, gloo, hccl, xccl ...)."""

    def __init__(self, group=None):
        import torch.distributed as dist
        self.dist, self.group = dist, group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.counts: list[int] | None = None  # the current step call's rows per rank (`counted`)

    @contextlib.contextmanager
    def counted(self, counts: list[int] | None):
        if counts is not None and len(counts) != self.world:
            raise ValueError(f"counts for {len(counts)} ranks in a group of {self.world}")
        self.counts = counts
        try:
            yield
        finally:
            self.counts = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            x = x.contiguous()
        self.dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self.dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim)

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        # collectives need one size on every rank: each rank's share padded to the step's largest.
        # The counts come with the step call (`counted`: no collective, no device sync per layer);
        # without them (a call that did not bring them) they are gathered here.
        counts = self.counts
        if counts is None:
            counts = self.all_gather(torch.tensor([x.shape[0]], device=x.device), 0).tolist()
        elif counts[self.rank] != x.shape[0]:
            raise RuntimeError(f"rank {self.rank}: {x.shape[0]} tokens reach an MoE layer, the step call said "
                               f"{counts[self.rank]} (counts {counts})")
        m, k, dim = max(counts), weights.shape[1], x.shape[1]
        # tokens and routing as the bytes of one row each: one all-gather (expert ids < 2**24 are exact in fp32)
        route = torch.cat([weights.float(), ids.float()], 1)
        row = torch.cat([x.contiguous().view(torch.uint8), route.view(torch.uint8)], 1)
        rows = torch.cat([p[:c] for p, c in zip(self._gather(_pad(row, m)), counts)])
        xs = rows[:, :dim * x.element_size()].contiguous().view(x.dtype)
        rs = rows[:, dim * x.element_size():].contiguous().view(torch.float32)
        return xs, rs[:, :k].contiguous(), rs[:, k:].long(), counts

    def combine(self, y: torch.Tensor, counts: list[int]) -> torch.Tensor:
        m = max(counts)
        parts = [_pad(p, m) for p in y.split(counts)]
        out = torch.empty((m,) + tuple(y.shape[1:]), dtype=y.dtype, device=y.device)
        self.dist.reduce_scatter(out, parts, group=self.group)
        return out[:counts[self.rank]]

    def _gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self.dist.all_gather(parts, x, group=self.group)
        return parts


def _pad(t: torch.Tensor, m: int) -> torch.Tensor:
    """t [n, ...] with zero rows up to [m, ...]."""
    return t if t.shape[0] == m else torch.cat([t, t.new_zeros((m - t.shape[0],) + tuple(t.shape[1:]))])
