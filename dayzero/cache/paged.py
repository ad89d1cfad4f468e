"""Device pools of the cache groups and the paged view of one engine step (a BatchCache).

Pool tensor of a group's kind: [num_blocks + 1, members, per_block, *row]; row i of a member lives
in block table[i // per_block] at offset i % per_block. Rows are fp32 for compressor projections
(official numerics; cache/spec.py), in a kind's own dtype where it fixes one (V4.1's token ids: int64),
packed uint8 rows for the K=V kinds of an FP8 cache (ops/kvfp8.py: written packed, read decoded,
handed to the paged ops as `Fp8Rows`), packed uint8 rows for DeepSeek-V4.1's QAT kinds (v41/kvpack.py:
the rows a step reads handed to the paged ops decoded) and the compute dtype otherwise. The last block of every pool is the trash block: no request ever
holds it; a lookup of a row in a block its request does not hold lands there (so nothing another
request owns is touched) and is reported by `PagedBatchCache.check`, once per step, without a host
synchronisation per lookup.
"""
from __future__ import annotations

import ctypes
import math
import mmap

import torch

from dayzero.cache.spec import GroupSpec
from dayzero.ops import kvfp8
from dayzero.ops.cpu import lookup as native


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed pool. On CPUs an anonymous private mapping: its pages are zero until written and
    take RAM only as the cache fills (torch.zeros would touch every page of a budget sized from
    the machine's free memory at start-up)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    n = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    if n < 2**20:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, n), dtype=dtype).view(shape)  # the tensor keeps the map alive


class CachePools:
    def __init__(self, groups: list[GroupSpec], num_blocks: dict[str, int], dtype: torch.dtype,
                 device: torch.device):
        self.groups = {g.name: g for g in groups}
        self.tensors: dict[tuple[str, str], torch.Tensor] = {}
        self.route: dict[tuple[int, str], tuple[str, int]] = {}
        self.trash = {g.name: num_blocks[g.name] for g in groups}  # block id of each group's trash block
        self.dtype = dtype
        self.layouts: dict[tuple[str, str], kvfp8.Fp8Layout] = {}  # (group, kind) -> packed row format
        for g in groups:
            for kind, spec in g.kinds.items():
                layout = spec.layout(dtype)
                if layout is not None:
                    self.layouts[(g.name, kind)] = layout
                shape = (num_blocks[g.name] + 1, len(g.layers), g.per_block,
                         *((layout.width,) if layout is not None else spec.row))
                self.tensors[(g.name, kind)] = zeros(shape, spec.pool_dtype(dtype), device)
                for m, layer in enumerate(g.layers):
                    self.route[(layer, kind)] = (g.name, m)
        # each (layer, kind)'s rows as one flat view starting at its member's first row: row r of
        # the view is flat pool row r + member * per_block, so every member of a group uses the
        # same row ids (one lookup per step serves all layers of a group)
        self.member_rows: dict[tuple[int, str], tuple[str, torch.Tensor]] = {}
        for (layer, kind), (name, m) in self.route.items():
            t = self.tensors[(name, kind)]
            self.member_rows[(layer, kind)] = (name, t.view(-1, *t.shape[3:])[m * self.groups[name].per_block:])
        # what the paged ops receive for a packed kind: the member view with its row format
        self.packed: dict[tuple[int, str], kvfp8.Fp8Rows] = {
            (layer, kind): self.layouts[(name, kind)].rows(self.member_rows[(layer, kind)][1])
            for (layer, kind), (name, _) in self.route.items() if (name, kind) in self.layouts}

    def rows_per_block(self, group: str) -> int:
        """Flat pool rows per block of a group (members x rows per member)."""
        g = self.groups[group]
        return len(g.layers) * g.per_block

    def first_row(self, group: str, block: int | None) -> int:
        """A block's first flat row in its group's pool; the trash block's for None (not held):
        the entries of the block tables lookups read."""
        return (self.trash[group] if block is None else block) * self.rows_per_block(group)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def table_rows(pools: CachePools, tables: list[dict[str, list[int | None]]]) -> dict[str, list[list[int]]]:
    """Per group, each request's block table as first flat rows (block * rows per block), the
    trash block's for blocks not held, padded with it to the longest table + 1 column (built in
    Python: one list per group and step)."""
    out = {}
    for name in pools.groups:
        width, trash = max(len(t[name]) for t in tables), pools.first_row(name, None)
        out[name] = [[pools.first_row(name, x) for x in t[name]] + [trash] * (width + 1 - len(t[name]))
                     for t in tables]
    return out


class DeviceTables:
    """Block tables kept on the device between steps for recorded steps (CUDA graphs read them
    at fixed addresses): per group [slots, width + 1] first flat rows, the trash block's where
    nothing is held; the last slot belongs to the padding sequence (all trash). A request keeps
    its slot while it runs (its table dict names it: a preempted request gets a new one), and a
    step uploads only what changed since the last: manager tables grow at the end and free from
    the front, so per group the blocks appended and the ones freed; a request new to a slot
    uploads its whole row. Rows of slots no live request holds are never read (`live`)."""

    def __init__(self, pools: CachePools, slots: int, width: int, device: torch.device):
        self.pools, self.slots, self.width = pools, slots, width
        self.trash = {name: pools.first_row(name, None) for name in pools.groups}
        self.tensors = {name: torch.full((slots, width + 1), t, dtype=torch.long, device=device)
                        for name, t in self.trash.items()}
        self.live = torch.zeros(slots, dtype=torch.bool, device=device)
        self._live: frozenset[int] = frozenset()  # the slots `live` marks (uploaded only when they change)
        self._owner: list[dict | None] = [None] * (slots - 1)  # each slot's table dict
        self._state: dict[tuple[int, str], tuple[int, int]] = {}  # (slot, group) -> (length, first held)
        self._extent: dict[tuple[int, str], int] = {}  # (slot, group) -> columns ever written

    def update(self, tables: list[dict[str, list[int | None]]]) -> list[int]:
        """Upload what changed in these requests' tables; returns the slot of each, in order."""
        if len(tables) >= self.slots:
            raise ValueError(f"{len(tables)} requests exceed the device tables' {self.slots - 1} slots")
        present = {id(t) for t in tables}
        slot_of = {id(o): s for s, o in enumerate(self._owner) if o is not None}
        free = [s for s, o in enumerate(self._owner) if o is None or id(o) not in present]
        changes = {name: ([], [], []) for name in self.tensors}  # rows, columns, values
        slots = []
        for t in tables:
            s = slot_of.get(id(t))
            if s is None:
                s = free.pop(0)
                self._owner[s] = t
                for name in self.tensors:
                    self._state.pop((s, name), None)
            slots.append(s)
            for name, col in t.items():
                self._diff(s, name, col, changes[name])
        for name, (rows, cols, vals) in changes.items():
            if rows:  # one upload and one scatter per group that changed
                r, c, v = torch.tensor([rows, cols, vals], dtype=torch.long).to(self.live.device).unbind(0)
                self.tensors[name].index_put_((r, c), v)
        if self._live != frozenset(slots):  # decode steps of the same requests: no upload
            live = torch.zeros(self.slots, dtype=torch.bool)
            live[slots] = True
            self.live.copy_(live)
            self._live = frozenset(slots)
        return slots

    def _diff(self, s: int, name: str, col: list[int | None], out: tuple[list, list, list]) -> None:
        if len(col) > self.width:
            raise ValueError(f"cache group {name}: a table of {len(col)} blocks exceeds the device tables' "
                             f"{self.width}")
        old = self._state.get((s, name))
        first = old[1] if old is not None and old[0] <= len(col) else 0
        while first < len(col) and col[first] is None:
            first += 1
        if old is None or old[0] > len(col):  # the row as far as any earlier owner wrote it
            cols = range(max(len(col), self._extent.get((s, name), 0)))
        else:  # freed at the front, appended at the end
            cols = [*range(old[1], min(first, old[0])), *range(old[0], len(col))]
        for k in cols:
            out[0].append(s)
            out[1].append(k)
            out[2].append(self.pools.first_row(name, col[k] if k < len(col) else None))
        self._state[(s, name)] = (len(col), first)
        self._extent[(s, name)] = max(len(col), self._extent.get((s, name), 0))


def check_flags(flags: list[tuple[str, torch.Tensor]]) -> None:
    """Raise naming the cache groups whose lookups were flagged (PagedBatchCache.flags)."""
    if not flags:
        return
    bad = torch.stack([b for _, b in flags]).tolist()
    if any(bad):
        groups = sorted({g for (g, _), b in zip(flags, bad) if b})
        raise AssertionError(f"cache group(s) {', '.join(groups)}: a row of this step lies in a block "
                             "its request does not hold")


class PagedBatchCache:
    """The BatchCache of one engine step: sequence b is a request with its block tables.
    `protect[b]`: token count below which nothing of sequence b is written (a prefix-cache hit's
    shared blocks are re-read but never rewritten); all zeros: no check at all.
    `native_lookups` (class-wide, default True): eager CPU steps look rows up through
    ops/cpu/lookup.c where it builds; False keeps the PyTorch path (the same row ids; for A/B
    timing, bench/step_overhead.py --compare lookups)."""

    native_lookups = True

    def __init__(self, pools: CachePools, tables: list[dict[str, list[int | None]]], protect: list[int],
                 device: torch.device):
        # per group: [B, width + 1] first rows of each block in the flat pool (block * members *
        # per_block), the trash block's for blocks not held; the last column is a trash sentinel
        # for indices past the table, so one gather addresses and one compare flags every lookup
        self._setup(pools, {name: torch.tensor(flat, dtype=torch.long, device=device)
                            for name, flat in table_rows(pools, tables).items()},
                    torch.tensor(protect, dtype=torch.long, device=device) if any(protect) else None, None,
                    torch.device(device).type == "cpu")

    @classmethod
    def of_slots(cls, pools: CachePools, tables: DeviceTables, slots: list[int], protect: list[int],
                 device: torch.device) -> "PagedBatchCache":
        """The BatchCache of an eager step over `DeviceTables` that `update` has just brought up to
        date: sequence b reads the rows of slot slots[b], gathered on the device (on CPUs the
        native lookups read the slots' rows in place, and a gather happens only if the PyTorch
        path needs one). A step uploads only the entries that changed, not every table
        (`__init__`: lists built in Python)."""
        self = cls.__new__(cls)
        protect_t = torch.tensor(protect, dtype=torch.long, device=device) if any(protect) else None
        if torch.device(device).type == "cpu":
            self._setup(pools, tables.tensors, protect_t, None, True, slots)
            return self
        idx = torch.tensor(slots, dtype=torch.long, device=device)
        self._setup(pools, {name: t.index_select(0, idx) for name, t in tables.tensors.items()}, protect_t, None,
                    False)
        return self

    @classmethod
    def over(cls, pools: CachePools, tables: dict[str, torch.Tensor], live: torch.Tensor) -> "PagedBatchCache":
        """The BatchCache over block tables already on the device (`DeviceTables`, [S, W] per
        group, padded with the trash block's first row): nothing is built from Python values,
        so a recorded step (a CUDA graph) reads whatever the buffers hold when it replays.
        live [S] bool: only lookups of live sequences are checked (padding slots look up trash)."""
        self = cls.__new__(cls)
        self._setup(pools, tables, None, live, False)  # recorded: every lookup an op the recorder sees
        return self

    def _setup(self, pools: CachePools, tables: dict[str, torch.Tensor], protect: torch.Tensor | None,
               live: torch.Tensor | None, cpu: bool, slots: list[int] | None = None) -> None:
        """tables: per group, sequence b's row is b, or slots[b] where `slots` is given (then the
        step's own rows, `_tables`, are gathered only when the PyTorch path asks for them)."""
        self.pools, self.protect, self.live = pools, protect, live
        self._full, self._slot_list = tables, slots
        self._gathered = tables if slots is None else None
        self._trash = {name: pools.first_row(name, None) for name in pools.groups}
        self._memo: dict[tuple, tuple] = {}
        self._bad: list[tuple[str, torch.Tensor]] = []
        # eager CPU steps look rows up natively (ops/cpu/lookup.c: one call per lookup, the same row
        # ids) and count the rows flagged per group in Python ints: nothing to reduce at `check`
        self._native = (cpu and PagedBatchCache.native_lookups and native.available()
                        and native.fits((*tables.values(), protect), (live,))
                        and all(t.dim() == 2 and t.is_contiguous() for t in tables.values()))
        self._slots = (native.slot_map(slots, next(iter(tables.values())).shape[0])
                       if self._native and slots is not None and tables else None)
        self._nbad: dict[str, ctypes.c_int64] = {}

    @property
    def _tables(self) -> dict[str, torch.Tensor]:
        """Per group, the step's block tables [B, W] (sequence b's in row b)."""
        if self._gathered is None:
            first = next(iter(self._full.values()))
            idx = torch.tensor(self._slot_list, dtype=torch.long, device=first.device)
            self._gathered = {name: t.index_select(0, idx) for name, t in self._full.items()}
        return self._gathered

    def _counter(self, group: str) -> ctypes.c_int64:
        c = self._nbad.get(group)
        if c is None:
            c = self._nbad[group] = ctypes.c_int64(0)
        return c

    def check(self) -> None:
        """Raise if a lookup of this step fell in a block its request does not hold (an engine
        bug: those rows went to the trash block). One host synchronisation for the whole step."""
        check_flags(self.flags())

    def flags(self) -> list[tuple[str, torch.Tensor]]:
        """(group, device bool) per lookup of the step: True where a row lay outside held blocks
        (native lookups: one entry per group they flagged)."""
        return self._bad + [(g, torch.tensor(True)) for g, c in self._nbad.items() if c.value]

    def _flag(self, group: str, bad: torch.Tensor, seq: torch.Tensor) -> None:
        if self.live is not None:
            bad = bad & self.live[seq]
        self._bad.append((group, bad.any()))

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
        trash = self._trash[group]
        if self._native and native.fits((seq, index)):
            flat, keep = native.lookup(self._full[group], seq, index, g.per_block, trash,
                                       None if protect_ratio is None else self.protect, protect_ratio, self.live,
                                       self._counter(group), self._slots)
            self._memo[key] = (seq, index, flat, keep)
            return flat, keep
        tab = self._tables[group]
        first = tab[seq, (index // g.per_block).clamp_(0, tab.shape[1] - 1)]
        first = torch.where(index < 0, trash, first)  # never a request's row (callers pass no negatives)
        self._flag(group, first == trash, seq)
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
        # rows of a group of ratio r (compressed entries, indexer keys) are protected below protect // r
        protect = None if self.protect is None else self.pools.groups[group].ratio
        flat, keep = self._lookup(group, seq, index, protect)
        if keep is not None:
            values = values[keep]
        if flat.numel():
            packed = self.pools.packed.get((layer, kind))
            if packed is not None:
                values = packed.layout.pack(values)
            elif values.dtype != pool.dtype:
                values = values.to(pool.dtype)
            # eager CPU steps: one native row copy (lookup.c); else index_put_, what pool[flat] = ...
            # runs without the view __setitem__ takes first
            if not (self._native and native.scatter_rows(pool, flat, values, self._pool_rows(layer, kind, pool))):
                pool.index_put_((flat,), values)

    def _pool_rows(self, layer: int, kind: str, pool: torch.Tensor) -> tuple | None:
        """lookup.pool_rows of a (layer, kind)'s member view, kept with the pools (they never move)."""
        memo = self.pools.__dict__.setdefault("_native_rows", {})
        got = memo.get((layer, kind), False)
        if got is False or (got is not None and got[0] is not pool):
            got = memo[(layer, kind)] = native.pool_rows(pool)
        return got

    def read(self, layer: int, kind: str, seq: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Rows as stored; packed FP8 rows decoded to the compute dtype."""
        group, pool = self.pools.member_rows[(layer, kind)]
        packed = self.pools.packed.get((layer, kind))
        rows = self._lookup(group, seq, index, None)[0]
        return pool[rows] if packed is None else packed[rows]

    def locate_rows(self, layer: int, kind: str, seq: torch.Tensor, index: torch.Tensor, valid: torch.Tensor
                    ) -> tuple[torch.Tensor | kvfp8.Fp8Rows, torch.Tensor]:
        """(pool [rows, *row], ids [N, K]): rows index[n, k] of sequences seq[n] (seq [N, 1] or
        [N, K]) as ids into `pool` (an `Fp8Rows` for a packed kind), -1 where not valid; no boolean-mask indexing and no host
        synchronisation (rows in blocks not held are flagged for `check`). `pool` is a view of the
        layer's member of the group, so one lookup for a (seq, index, valid) triple serves every
        layer of the group in the step (callers pass the same tensors: Batch.window, Batch.entries)."""
        group, pool = self.pools.member_rows[(layer, kind)]
        key = (group, id(seq), id(index), id(valid))
        memo = self._memo.get(key)
        if memo is None or memo[0] is not index or memo[1] is not valid or memo[2] is not seq:
            g = self.pools.groups[group]
            if self._native and native.fits((seq, index), (valid,)):
                memo = self._memo[key] = (index, valid, seq, native.locate(
                    self._full[group], seq, index, valid, g.per_block, self._trash[group], self.live,
                    self._counter(group), self._slots))
            else:
                tab = self._tables[group]
                first = tab[seq, (index // g.per_block).clamp(0, tab.shape[1] - 1)]
                self._flag(group, (first == self._trash[group]) & valid, seq)
                memo = self._memo[key] = (index, valid, seq, torch.where(valid, first + index % g.per_block, -1))
        packed = self.pools.packed.get((layer, kind))
        if packed is not None and hasattr(packed, "compact"):  # V4.1 QAT rows: the step's rows decoded
            return packed.compact(memo[3], self._memo)
        return (pool if packed is None else packed), memo[3]
