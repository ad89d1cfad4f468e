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
