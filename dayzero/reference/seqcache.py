"""The attention state of one sequence, addressed by position: the seam between the model and
any cache implementation (the reference's contiguous tensors here, the engine's paged pools in
dayzero/cache/).

Everything the model keeps between calls is a row at an integer index, so re-running a position
overwrites exactly what it wrote before (speculative tokens roll back by recomputing):

  (layer, "kv")          window K=V row [head_dim] at token position p (MTP: p + 1)
  (layer, "rows:attn")   compressor projections at position p, fp32 [2, width]: (kv, gate + ape)
  (layer, "rows:index")  the indexer compressor's, fp32 [2, 2 * index_head_dim]
  (layer, "ent:attn")    compressed entry i [head_dim] (rope at r*i, simulation applied)
  (layer, "ent:index")   indexer key i [index_head_dim]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class SeqCache(Protocol):
    def write(self, layer: int, kind: str, index: torch.Tensor, values: torch.Tensor) -> None: ...

    def read(self, layer: int, kind: str, index: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Segment:
    """One sequence's tokens inside a packed batch: rows [offset, offset + length) of the batch,
    at absolute positions start_pos .. start_pos + length - 1."""
    offset: int
    length: int
    start_pos: int
    cache: SeqCache

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.length)


class DenseSeqCache:
    """Contiguous growing tensors per (layer, kind); nothing is ever freed."""

    def __init__(self):
        self.store: dict[tuple[int, str], torch.Tensor] = {}

    def write(self, layer: int, kind: str, index: torch.Tensor, values: torch.Tensor) -> None:
        if index.numel() == 0:
            return
        key = (layer, kind)
        need = int(index.max()) + 1
        buf = self.store.get(key)
        if buf is None or buf.shape[0] < need:
            grown = values.new_zeros((max(need, 2 * (0 if buf is None else buf.shape[0]), 16), *values.shape[1:]))
            if buf is not None:
                grown[:buf.shape[0]] = buf
            buf = self.store[key] = grown
        buf[index] = values.to(buf.dtype)

    def read(self, layer: int, kind: str, index: torch.Tensor) -> torch.Tensor:
        return self.store[(layer, kind)][index]
