"""Device pools of the cache groups and the paged view of one engine step (a BatchCache).

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


class PagedBatchCache:
    """The BatchCache of one engine step: sequence b is a request with its block tables.
    `protect[b]`: token count below which nothing of sequence b is written (a prefix-cache hit's
    shared blocks are re-read but never rewritten); all zeros: no check at all."""

    def __init__(self, pools: CachePools, tables: list[dict[str, list[int | None]]], protect: list[int],
                 device: torch.device):
        self.pools = pools
        self._memo: dict[tuple, tuple] = {}
        self.protect = torch.tensor(protect, dtype=torch.long, device=device) if any(protect) else None
        # per group: [B, width + 1] first rows of each block in the flat pool (block * members *
        # per_block), -1 for blocks not held; the last column is a -1 sentinel for indices past
        # the table, so one gather + one sign test validates every lookup
        self._tables = {}
        for name, g in pools.groups.items():
            width = max(len(t[name]) for t in tables)
            rows = len(g.layers) * g.per_block
            flat = [[-1 if x is None else x * rows for x in t[name]] + [-1] * (width + 1 - len(t[name]))
                    for t in tables]  # built in Python: one tensor per group and step
            self._tables[name] = torch.tensor(flat, dtype=torch.long, device=device)

    def _flat(self, layer: int, kind: str, seq: torch.Tensor, index: torch.Tensor):
        """(pool [num_blocks, members, per_block, *row], flat row ids) of rows index of sequences seq."""
        group, member = self.pools.route[(layer, kind)]
        g = self.pools.groups[group]
        tab = self._tables[group]
        first = tab[seq, (index // g.per_block).clamp_(max=tab.shape[1] - 1)]
        if (first < 0).any():
            raise AssertionError(f"{group}: row of layer {layer} {kind} in a block the request does not hold")
        return self.pools.tensors[(group, kind)], first + (index % g.per_block + member * g.per_block)

    def write(self, layer: int, kind: str, seq: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
        if self.protect is not None:
            ratio = self.pools.groups[self.pools.route[(layer, kind)][0]].ratio
            keep = index >= (self.protect[seq] // ratio if kind.startswith("ent:") else self.protect[seq])
            if not keep.all():
                seq, index, values = seq[keep], index[keep], values[keep]
        if index.numel() == 0:
            return
        t, flat = self._flat(layer, kind, seq, index)
        t.view(-1, *t.shape[3:])[flat] = values.to(t.dtype)

    def read(self, layer: int, kind: str, seq: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        t, flat = self._flat(layer, kind, seq, index)
        return t.view(-1, *t.shape[3:])[flat]

    def locate_rows(self, layer: int, kind: str, seq: torch.Tensor, index: torch.Tensor, valid: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool [num_blocks * members * per_block, *row], ids [N, K]): flat row ids of rows
        index[n, k] of sequences seq[n] (seq [N, 1] or [N, K]), -1 where not valid; no
        boolean-mask indexing (no host synchronisation but the one validity check). Layers of a
        group share block tables, so the lookup for one (seq, index, valid) triple is done once
        per step and offset per layer (callers pass the same tensors: Batch.window)."""
        group, member = self.pools.route[(layer, kind)]
        g = self.pools.groups[group]
        key = (group, id(seq), id(index), id(valid))
        memo = self._memo.get(key)
        if memo is None or memo[0] is not index or memo[1] is not valid or memo[2] is not seq:
            tab = self._tables[group]
            first = tab[seq, (index // g.per_block).clamp(0, tab.shape[1] - 1)]
            if (first.lt(0) & valid).any():
                raise AssertionError(f"{group}: row of layer {layer} {kind} in a block the request does not hold")
            memo = self._memo[key] = (index, valid, seq, torch.where(valid, first + index % g.per_block, -1))
        t = self.pools.tensors[(group, kind)]
        ids = memo[3] if member == 0 else torch.where(valid, memo[3] + member * g.per_block, -1)
        return t.view(-1, *t.shape[3:]), ids

    def locate(self, layer: int, kind: str, seq: torch.Tensor, index: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool [num_blocks * members * per_block, *row], flat row ids [M]) of rows index[m] of
        sequences seq[m]: the kernels read keys straight from the pool through these ids."""
        t, flat = self._flat(layer, kind, seq, index)
        return t.view(-1, *t.shape[3:]), flat
