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
        # each (layer, kind)'s rows as one flat view starting at its member's first row: row r of
        # the view is flat pool row r + member * per_block, so every member of a group uses the
        # same row ids (one lookup per step serves all layers of a group)
        self.member_rows: dict[tuple[int, str], tuple[str, torch.Tensor]] = {}
        for (layer, kind), (name, m) in self.route.items():
            t = self.tensors[(name, kind)]
            self.member_rows[(layer, kind)] = (name, t.view(-1, *t.shape[3:])[m * self.groups[name].per_block:])

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

    def _lookup(self, group: str, seq: torch.Tensor, index: torch.Tensor, protect_ratio: int | None):
        """Flat row ids (of a member view) of rows index of sequences seq (1-D), and the mask of
        those at or above the protected prefix (None: all), looked up and validated once per step
        for each (seq, index) pair of tensors: layers of a group share block tables, and callers
        pass the batch's own tensors (Batch.stored, Batch.closing), so later layers reuse them."""
        key = (group, id(seq), id(index), protect_ratio)
        memo = self._memo.get(key)
        if memo is not None and memo[0] is seq and memo[1] is index:
            return memo[2], memo[3]
        g = self.pools.groups[group]
        tab = self._tables[group]
        first = tab[seq, (index // g.per_block).clamp_(max=tab.shape[1] - 1)]
        if (first < 0).any():
            m = int((first < 0).nonzero()[0, 0])
            raise AssertionError(f"{group}: row {int(index[m])} of sequence {int(seq[m])} is in a block the "
                                 "request does not hold")
        flat, keep = first + index % g.per_block, None
        if protect_ratio is not None:
            keep = index >= self.protect[seq] // protect_ratio
            if keep.all():
                keep = None
            else:
                flat = flat[keep]
        self._memo[key] = (seq, index, flat, keep)
        return flat, keep

    def write(self, layer: int, kind: str, seq: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
        group, pool = self.pools.member_rows[(layer, kind)]
        protect = None if self.protect is None else (self.pools.groups[group].ratio if kind.startswith("ent:") else 1)
        flat, keep = self._lookup(group, seq, index, protect)
        if keep is not None:
            values = values[keep]
        if flat.numel():
            pool[flat] = values.to(pool.dtype)

    def read(self, layer: int, kind: str, seq: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        group, pool = self.pools.member_rows[(layer, kind)]
        return pool[self._lookup(group, seq, index, None)[0]]

    def locate_rows(self, layer: int, kind: str, seq: torch.Tensor, index: torch.Tensor, valid: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool [rows, *row], ids [N, K]): rows index[n, k] of sequences seq[n] (seq [N, 1] or
        [N, K]) as ids into `pool`, -1 where not valid; no boolean-mask indexing (no host
        synchronisation but the one validity check). `pool` is a view of the layer's member of the
        group, so one lookup for a (seq, index, valid) triple serves every layer of the group in
        the step (callers pass the same tensors: Batch.window, Batch.entries)."""
        group, pool = self.pools.member_rows[(layer, kind)]
        key = (group, id(seq), id(index), id(valid))
        memo = self._memo.get(key)
        if memo is None or memo[0] is not index or memo[1] is not valid or memo[2] is not seq:
            g = self.pools.groups[group]
            tab = self._tables[group]
            first = tab[seq, (index // g.per_block).clamp(0, tab.shape[1] - 1)]
            if (first.lt(0) & valid).any():
                raise AssertionError(f"{group}: row of layer {layer} {kind} in a block the request does not hold")
            memo = self._memo[key] = (index, valid, seq, torch.where(valid, first + index % g.per_block, -1))
        return pool, memo[3]
