"""Device pools of the cache groups and the paged view of one request (a SeqCache).

Pool tensor of a group's kind: [num_blocks, members, per_block, *row]; row i of a member lives
in block table[i // per_block] at offset i % per_block. Rows are fp32 for compressor projections
and the compute dtype otherwise.
"""
from __future__ import annotations

import torch

from dayzero.cache.spec import GroupSpec


class CachePools:
    def __init__(self, groups: list[GroupSpec], num_blocks: dict[str, int], dtype: torch.dtype,
                 device: torch.device):
        self.groups = {g.name: g for g in groups}
        self.tensors: dict[tuple[str, str], torch.Tensor] = {}
        self.route: dict[tuple[int, str], tuple[str, int]] = {}
        for g in groups:
            for kind, spec in g.kinds.items():
                shape = (num_blocks[g.name], len(g.layers), g.per_block, *spec.row)
                self.tensors[(g.name, kind)] = torch.zeros(shape, dtype=torch.float32 if spec.fp32 else dtype,
                                                           device=device)
                for m, layer in enumerate(g.layers):
                    self.route[(layer, kind)] = (g.name, m)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class PagedSeqCache:
    """One request's view. `protect`: token count below which nothing is written (a prefix-cache
    hit's shared blocks are re-read but never rewritten)."""

    def __init__(self, pools: CachePools, tables: dict[str, list[int | None]], protect: int = 0):
        self.pools, self.protect = pools, protect
        self._tables = {name: torch.tensor([-1 if b is None else b for b in t], dtype=torch.long)
                        for name, t in tables.items()}

    def _locate(self, layer: int, kind: str, index: torch.Tensor):
        group, member = self.pools.route[(layer, kind)]
        g = self.pools.groups[group]
        blocks = self._tables[group].to(index.device)[index // g.per_block]
        if (blocks < 0).any():
            raise AssertionError(f"{group}: row of layer {layer} {kind} in a block the request does not hold")
        return self.pools.tensors[(group, kind)], blocks, member, index % g.per_block, g

    def write(self, layer: int, kind: str, index: torch.Tensor, values: torch.Tensor) -> None:
        group = self.pools.groups[self.pools.route[(layer, kind)][0]]
        limit = self.protect // group.ratio if kind.startswith("ent:") else self.protect
        keep = index >= limit
        if not keep.all():
            index, values = index[keep], values[keep]
        if index.numel() == 0:
            return
        t, blocks, member, off, _ = self._locate(layer, kind, index)
        t[blocks, member, off] = values.to(t.dtype)

    def read(self, layer: int, kind: str, index: torch.Tensor) -> torch.Tensor:
        t, blocks, member, off, _ = self._locate(layer, kind, index)
        return t[blocks, member, off]
