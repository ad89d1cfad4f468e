"""The collectives the model calls, over torch.distributed: one object per process, installed in
every module beside its op table (`Transformer.set_comm`). `SINGLE` (one rank) does nothing, so
the one-device path is the same code with identity collectives.

Every rank gets the same bits from a collective (gloo's and NCCL's all-reduce hand every rank the
one reduced result), so replicated state (residual streams, the MQA cache rows, router choices)
stays identical on every rank without being compared.
"""
from __future__ import annotations

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
        # collectives need one size on every rank: each rank's share padded to the step's largest
        counts = self.all_gather(torch.tensor([x.shape[0]], device=x.device), 0).tolist()
        m, k = max(counts), weights.shape[1]
        route = torch.cat([weights.float(), ids.float()], 1)  # expert ids < 2**24 are exact in fp32: one call
        xs, rs = (torch.cat([p[:c] for p, c in zip(self._gather(_pad(t, m)), counts)]) for t in (x, route))
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
