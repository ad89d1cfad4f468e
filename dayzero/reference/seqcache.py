"""The attention state of a batch of sequences, addressed by (sequence, position): the seam between
the model and any cache implementation (contiguous tensors here, the engine's paged pools in
dayzero/cache/paged.py).

Everything the model keeps between calls is a row at an integer index of one sequence, so
re-running a position overwrites exactly what it wrote before (speculative tokens roll back by
recomputing):

  (layer, "kv")          window K=V row [head_dim] at token position p (MTP: p + 1)
  (layer, "rows:attn")   compressor projections at position p, fp32 [2, width]: (kv, gate + ape)
  (layer, "rows:index")  the indexer compressor's, fp32 [2, 2 * index_head_dim]
  (layer, "ent:attn")    compressed entry i [head_dim] (rope at r*i, simulation applied)
  (layer, "ent:index")   indexer key i [index_head_dim]
"""
from __future__ import annotations

from typing import Protocol

import torch


class BatchCache(Protocol):
    def write(self, layer: int, kind: str, seq: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
        """Store values[m] as row index[m] of sequence seq[m] (all 1-D, same length)."""

    def read(self, layer: int, kind: str, seq: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Rows index[m] of sequences seq[m] (1-D) -> [M, *row]; only rows that were written."""


class Batch:
    """Packed tokens of several sequences: member i is cache sequence `ids[i]` (default i), with
    `lengths[i]` rows at absolute positions starts[i] .. starts[i] + lengths[i] - 1, in order."""

    def __init__(self, starts: list[int], lengths: list[int], cache: BatchCache, device: torch.device,
                 ids: list[int] | None = None):
        self.starts, self.lengths, self.cache = list(starts), list(lengths), cache
        self.ids = list(range(len(lengths))) if ids is None else list(ids)
        # built in Python: two tensors per batch (a step's batch is at most a prefill chunk)
        self.seq = torch.tensor([b for b, n in zip(self.ids, self.lengths) for _ in range(n)], dtype=torch.long,
                                device=device)
        self.positions = torch.tensor([p for s, n in zip(self.starts, self.lengths) for p in range(s, s + n)],
                                      dtype=torch.long, device=device)

    def window(self, size: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(seq [N, 1], stored index [N, size], valid [N, size]) of each token's window: positions
        p - size + 1 .. p stored at + offset, valid where >= 0. The same tensors for every layer of
        the batch (caches may memoise lookups by tensor identity)."""
        memo = self.__dict__.setdefault("_window", {})
        got = memo.get((size, offset))
        if got is None:
            pos = self.positions[:, None] + torch.arange(1 - size, 1, device=self.positions.device)
            got = memo[(size, offset)] = (self.seq_col, pos if offset == 0 else pos + offset, pos >= 0)
        return got

    @property
    def seq_col(self) -> torch.Tensor:
        """seq [N, 1] (one view per batch: window and entry lookups share it)."""
        got = self.__dict__.get("_seq_col")
        if got is None:
            got = self.__dict__["_seq_col"] = self.seq[:, None]
        return got

    def entries(self, ratio: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(seq [N, 1], entry ids [N, count], usable [N, count]) of compressed entries 0..count-1 at
        `ratio`: entry i is usable by the token at p iff i < (p + 1) // ratio. The same tensors for
        every layer of the batch with that ratio (caches memoise lookups by tensor identity)."""
        memo = self.__dict__.setdefault("_entries", {})
        got = memo.get((ratio, count))
        if got is None:
            ids = torch.arange(count, device=self.positions.device).expand(self.positions.shape[0], count)
            got = memo[(ratio, count)] = (self.seq_col, ids, ids < ((self.positions + 1) // ratio)[:, None])
        return got

    def stored(self, offset: int) -> torch.Tensor:
        """positions + offset (where a layer stores its window rows): one tensor per offset, so
        caches can memoise lookups by tensor identity."""
        if offset == 0:
            return self.positions
        memo = self.__dict__.setdefault("_stored", {})
        got = memo.get(offset)
        if got is None:
            got = memo[offset] = self.positions + offset
        return got

    def phase(self, ratio: int) -> torch.Tensor:
        """positions % ratio (each token's slot in its compression window): one tensor per ratio
        and batch, shared by every compressor of that ratio."""
        memo = self.__dict__.setdefault("_phase", {})
        got = memo.get(ratio)
        if got is None:
            got = memo[ratio] = self.positions % ratio
        return got

    def closing(self, ratio: int, overlap: bool) -> tuple[torch.Tensor, ...] | None:
        """The compressed entries at `ratio` that this batch's tokens close (None: none), as
        (seq [E], ids [E], row seq [E * span], row positions [E * span], missing [E, span, 1]):
        entry i pools the rows at r*i .. r*i + r - 1, and with `overlap` (CSA) also the previous
        window's r*i - r .. r*i - 1 first (span 2r); positions before 0 are read at 0 and flagged
        `missing`. The same tensors for every layer of the batch (caches memoise by identity)."""
        memo = self.__dict__.setdefault("_closing", {})
        key = (ratio, overlap)
        if key not in memo:
            pairs = [(b, i) for b, n, s in zip(self.ids, self.starts, self.lengths)
                     for i in range(n // ratio, (n + s) // ratio)]
            if not pairs:
                memo[key] = None
            else:
                dev = self.positions.device
                seq, ids = torch.tensor(pairs, dtype=torch.long, device=dev).unbind(1)
                span = 2 * ratio if overlap else ratio
                pos = ratio * ids[:, None] + torch.arange(span, device=dev) - (ratio if overlap else 0)
                memo[key] = (seq, ids, seq[:, None].expand_as(pos).flatten(), pos.clamp(min=0).flatten(),
                             (pos < 0)[..., None])
        return memo[key]

    def closing_rope(self, ratio: int, overlap: bool, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the entries `closing(ratio, overlap)` returns (entry i rotates at ratio * i)."""
        memo = self.__dict__.setdefault("_closing_rope", {})
        key = (ratio, overlap, id(inv_freq))
        got = memo.get(key)
        if got is None or got[0] is not inv_freq:
            from dayzero.ops import ref
            got = memo[key] = (inv_freq, *ref.rope_cos_sin(ratio * self.closing(ratio, overlap)[1], inv_freq))
        return got[1], got[2]

    def rope(self, inv_freq: torch.Tensor, heads: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, rd/2] of the batch's positions for a RoPE table ([N, 1, rd/2] with
        `heads`, to rotate [N, H, D] rows), computed once per batch and table: every layer of a
        kind rotates the same positions."""
        memo = self.__dict__.setdefault("_rope", {})
        got = memo.get(id(inv_freq))
        if got is None or got[0] is not inv_freq:
            # ref.rope_cos_sin's arithmetic, the positions as fp32 [N, 1] shared by every table
            pf = self.__dict__.get("_positions_f")
            if pf is None:
                pf = self.__dict__["_positions_f"] = self.positions.to(torch.float32)[:, None]
            freqs = pf * (inv_freq if inv_freq.device == pf.device else inv_freq.to(pf.device))
            cos, sin = freqs.cos(), freqs.sin()
            got = memo[id(inv_freq)] = (inv_freq, cos, sin, cos[:, None], sin[:, None])
        return (got[3], got[4]) if heads else (got[1], got[2])

    def entry_span(self, ratio: int) -> int:
        """How many compressed entries at `ratio` the batch's lookups cover (ids 0 .. span - 1):
        the most any of its sequences has closed by its last token."""
        memo = self.__dict__.setdefault("_span", {})
        got = memo.get(ratio)
        if got is None:
            got = memo[ratio] = max((s + n) // ratio for s, n in zip(self.starts, self.lengths))
        return got

    @property
    def end(self) -> int:
        return max(s + n for s, n in zip(self.starts, self.lengths))


class StaticBatch(Batch):
    """A Batch whose tensors have shapes fixed by (token slots N, context capacity) alone and
    whose contents come only from device tensors, so one recorded forward (a CUDA graph) serves
    every step that fits: `seq` [N] and `positions` [N] are buffers the caller fills before each
    step (padding slots belong to a sequence whose blocks are all the trash block); lookups of
    compressed entries cover `capacity // ratio` ids (unusable ones are masked, as in Batch);
    every token is a candidate to close the entry of its own compression window (it does when
    (p + 1) % r == 0; the others pool and write on behalf of `pad_seq`, i.e. into the trash
    block). `end`: the step's context end as the caller knows it (checked by the model)."""

    def __init__(self, seq: torch.Tensor, positions: torch.Tensor, capacity: int, pad_seq: int, cache: BatchCache,
                 end: int):
        self.seq, self.positions, self.cache = seq, positions, cache
        self.capacity, self.pad_seq, self._end = capacity, pad_seq, end

    def entry_span(self, ratio: int) -> int:
        return self.capacity // ratio

    @property
    def end(self) -> int:
        return self._end

    def closing(self, ratio: int, overlap: bool) -> tuple[torch.Tensor, ...]:
        memo = self.__dict__.setdefault("_closing", {})
        key = (ratio, overlap)
        if key not in memo:
            ids = self.positions // ratio
            seq = torch.where((self.positions + 1) % ratio == 0, self.seq, self.pad_seq)
            span = 2 * ratio if overlap else ratio
            pos = ratio * ids[:, None] + torch.arange(span, device=ids.device) - (ratio if overlap else 0)
            memo[key] = (seq, ids, seq[:, None].expand_as(pos).flatten(), pos.clamp(min=0).flatten(),
                         (pos < 0)[..., None])
        return memo[key]


class DenseSeqCache:
    """One sequence's rows in contiguous growing tensors per (layer, kind); nothing is freed."""

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


class DenseBatchCache:
    """A BatchCache over one DenseSeqCache per sequence (the reference's state)."""

    def __init__(self, caches: list[DenseSeqCache]):
        self.caches = caches

    def write(self, layer: int, kind: str, seq: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
        for b in seq.unique().tolist():
            m = seq == b
            self.caches[b].write(layer, kind, index[m], values[m])

    def read(self, layer: int, kind: str, seq: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        parts = {b: self.caches[b].read(layer, kind, index[seq == b]) for b in seq.unique().tolist()}
        first = next(iter(parts.values()))
        out = first.new_empty((seq.numel(), *first.shape[1:]))
        for b, rows in parts.items():
            out[seq == b] = rows
        return out
