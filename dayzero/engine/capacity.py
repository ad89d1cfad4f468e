"""How much cache an engine gets and how it is split, from the model and the machine.

The budget (`kv_cache_memory_bytes`) defaults to the memory actually free once the weights are in
place, as vLLM derives it from `gpu_memory_utilization`: on accelerators the device's free memory
(`mem_get_info`), on CPUs the host's MemAvailable less the mapped checkpoint bytes that will take
RAM as they are read; minus a margin for activations, the allocator and everything else (a tenth
of the memory, at least 1 GiB, at most half of what the weights leave), divided over the ranks
that share that memory (local CPU ranks).
A derived budget is never larger than the cache can use (every sequence at the model's context).

The budget holds, per cache group (cache/spec.py):
  - bounded groups (window, open compressor windows): per running sequence its span plus a
    partial block at each end, the step's chunk on top, and a reserve that keeps finished
    requests' blocks for prefix hits: at most max_num_seqs sequences' worth and at most an eighth
    of the budget (it was twice max_num_seqs whatever the budget);
  - one trash block per pool (cache/paged.py);
  - the rest: compressed entries (the long-range context), at least two blocks.
`max_num_seqs` not given: 32, lowered to what the budget holds (the running sequences' window
and compressor rows in at most half of it), with a one-line notice.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

DEFAULT_MAX_NUM_SEQS = 32
MIN_ENTRY_BLOCKS = 2
RESERVE_SHARE = 8  # the finished requests' reserve takes at most budget / 8
ROWS_SHARE = 2  # a derived max_num_seqs keeps its sequences' rows within budget / 2
FALLBACK_BUDGET = 512 * 2**20  # devices that report no free memory


def margin(total: int, free: int) -> int:
    """Memory left to everything but the cache (activations, the allocator, other processes): a
    tenth of the total, at least 1 GiB, and at most half of `free` (what the weights leave), so a
    machine short of memory still gives the cache the other half."""
    return min(max(2**30, total // 10), max(free, 0) // 2)


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


# ---- the machine -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Memory:
    """What one rank sees: `available` bytes free now (MemAvailable on CPUs, mem_get_info's free on
    accelerators) of `total`; `to_page_in`: this rank's weight bytes mapped from the checkpoint
    files (counted in MemAvailable as page cache or not resident yet: they take RAM as they are
    read); `share`: ranks sharing this memory (local CPU ranks); `streamed`: the part of
    `to_page_in` that is routed experts read in place (ops/experts.py), which can stream from disk
    through the page cache when the checkpoint does not fit."""
    source: str
    available: int
    total: int
    to_page_in: int = 0
    share: int = 1
    streamed: int = 0

    @property
    def page_in(self) -> int:
        """Mapped weight bytes counted against the cache: all of them when they fit beside the
        margin; else (a checkpoint larger than memory, its experts streamed from disk) the other
        weights and half of the memory they leave, the other half for the cache."""
        left = self.available - self.share * self.to_page_in
        if not self.streamed or left - margin(self.total, left) > 0:
            return self.to_page_in
        fixed = self.to_page_in - self.streamed
        room = self.available - self.share * fixed
        room -= margin(self.total, room)
        return fixed + min(self.streamed, max(0, room) // (2 * self.share))

    @property
    def margin(self) -> int:
        return margin(self.total, self.available - self.share * self.page_in)

    @property
    def budget(self) -> int:
        return max(0, (self.available - self.share * self.page_in - self.margin) // self.share)

    def describe(self) -> str:
        s = f"{self.source} {gb(self.available)}"
        if self.page_in != self.to_page_in:
            s += (f" - {self.share} x {gb(self.page_in)} of mapped weights (of {gb(self.to_page_in)}: the routed "
                  f"experts stream from disk, half of the rest is left to their page cache)")
        elif self.to_page_in:
            s += f" - {self.share} x {gb(self.to_page_in)} of mapped weights"
        s += f" - margin {gb(self.margin)}"
        return s + (f", over {self.share} local ranks" if self.share > 1 else "")


def meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    out = {}
    with open(path) as f:
        for line in f:
            k, _, v = line.partition(":")
            parts = v.split()
            if parts:
                out[k] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def file_backed(spans: list[tuple[int, int]], maps: str = "/proc/self/maps") -> int:
    """Bytes of the (disjoint, sorted) address ranges `spans` that lie in file-backed mappings."""
    files = []
    with open(maps) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[4] != "0" and not parts[5].startswith("["):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                files.append((lo, hi))
    files.sort()
    total, i = 0, 0
    for lo, hi in spans:
        while i < len(files) and files[i][1] <= lo:
            i += 1
        j = i
        while j < len(files) and files[j][0] < hi:
            total += max(0, min(hi, files[j][1]) - max(lo, files[j][0]))
            j += 1
    return total


def tensor_spans(tensors) -> list[tuple[int, int]]:
    """The union of the tensors' byte ranges, sorted and disjoint (views counted once)."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors
                   if t.device.type != "meta" and t.numel())
    out: list[list[int]] = []
    for lo, hi in spans:
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def local_ranks(tp: int) -> int:
    """Ranks on this host: torchrun says so; dayzero starts all of its ranks locally."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", tp))


def probe(device: torch.device, weight_spans: list[tuple[int, int]], tp: int,
          streamed_spans: list[tuple[int, int]] = ()) -> Memory | None:
    """This rank's Memory (None where the device reports no free memory); `streamed_spans`: the
    routed experts read in place (a subset of `weight_spans`)."""
    if device.type == "cpu":
        try:
            info = meminfo()
            avail, total = info["MemAvailable"], info["MemTotal"]
        except (OSError, KeyError):
            return None
        try:
            mapped, streamed = file_backed(weight_spans), file_backed(list(streamed_spans))
        except OSError:
            mapped = streamed = 0
        return Memory("MemAvailable", avail, total, mapped, local_ranks(tp), streamed)
    mod = getattr(torch, device.type, None)
    get = getattr(mod, "mem_get_info", None)
    if get is None:
        return None
    empty = getattr(mod, "empty_cache", None)
    if empty is not None:
        empty()  # blocks the allocator holds but no tensor uses are free for the cache
    free, total = get(device)
    return Memory(f"{device.type} free memory", int(free), int(total))


def derived_budget(mems: list[Memory | None]) -> tuple[int, str]:
    """The smallest rank's budget (every rank gets the same pools) and how it was derived."""
    if any(m is None for m in mems):
        return FALLBACK_BUDGET, f"{gb(FALLBACK_BUDGET)} (the device reports no free memory)"
    low = min(mems, key=lambda m: m.budget)
    return low.budget, low.describe()


# ---- the split -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Capacity:
    num_blocks: dict[str, int]
    max_num_seqs: int
    reserve_seqs: int  # finished sequences' window and compressor blocks kept beyond the running ones
    budget: int
    budget_source: str
    rows_bytes: int  # pools of the bounded groups (window, compressor rows), trash blocks included
    entries_bytes: int  # pools of the compressed entries, trash blocks included
    max_tokens: int  # tokens of entries that fit
    lowered: bool  # max_num_seqs was derived below DEFAULT_MAX_NUM_SEQS

    @property
    def cache_bytes(self) -> int:
        return self.rows_bytes + self.entries_bytes


def bounded_blocks(groups, args, bs: int, max_num_seqs: int, max_num_batched_tokens: int,
                   reserve_seqs: int = 0) -> dict[str, int]:
    """Blocks of each group whose rows per sequence are bounded (the window, open compressor
    windows): per sequence (running, or kept: `reserve_seqs`) its span plus a partial block at
    each end, and the step's chunk on top."""
    blocks = {}
    for g in groups:
        if g.keep != "all":
            span = args.window_size - 1 if g.keep == "window" else g.window_ratio * (2 if g.overlap else 1)
            blocks[g.name] = ((max_num_seqs + reserve_seqs) * (math.ceil(span / bs) + 2)
                              + math.ceil(max_num_batched_tokens / bs))
    return blocks


class Sizes:
    """Bytes of the cache for a given number of sequences (one dtype, one set of groups)."""

    def __init__(self, groups, args, dtype: torch.dtype, bs: int, max_num_batched_tokens: int):
        self.groups, self.args, self.bs, self.tokens = groups, args, bs, max_num_batched_tokens
        self.block = {g.name: g.block_bytes(dtype) for g in groups}
        one = bounded_blocks(groups, args, bs, 1, 0)
        chunk = bounded_blocks(groups, args, bs, 0, max_num_batched_tokens)
        self.per_seq = sum(n * self.block[k] for k, n in one.items())  # one sequence's bounded blocks
        self.chunk = sum(n * self.block[k] for k, n in chunk.items())
        self.trash = sum(self.block.values())
        self.per_entry_block = sum(self.block[g.name] for g in groups if g.keep == "all")
        self.min_entries = MIN_ENTRY_BLOCKS * self.per_entry_block

    def needed(self, seqs: int) -> int:
        """The least budget for `seqs` running sequences: their rows, the chunk, the trash blocks
        and the fewest entry blocks."""
        return seqs * self.per_seq + self.chunk + self.trash + self.min_entries

    def seqs_that_fit(self, budget: int) -> int:
        return max(0, (budget - self.chunk - self.trash - self.min_entries) // self.per_seq)


def plan(groups, args, dtype: torch.dtype, bs: int, budget: int, budget_source: str,
         max_num_seqs: int | None, max_num_batched_tokens: int, budget_given: bool) -> Capacity:
    """Split `budget` over the groups; max_num_seqs None: derived (see the module's docstring).
    ValueError naming the setting, what it needs and values that fit when it cannot."""
    z = Sizes(groups, args, dtype, bs, max_num_batched_tokens)
    fits = z.seqs_that_fit(budget)
    where = f"kv_cache_memory_bytes={budget}" if budget_given else \
        f"the memory free for the cache ({gb(budget)}: {budget_source})"
    fix_budget = ("kv_cache_memory_bytes" if budget_given else
                  "free memory, pass kv_cache_memory_bytes (what the cache may take) or split the model "
                  "with tensor_parallel_size; kv_cache_memory_bytes")
    chunk_note = (f"; max_num_batched_tokens={max_num_batched_tokens} alone takes {z.chunk} bytes of window and "
                  f"compressor rows for a step's chunk: a smaller one needs less" if z.chunk * 2 > budget else "")
    if max_num_seqs is None:
        if fits < 1:
            raise ValueError(
                f"{where} leaves no room for one sequence: max_num_seqs=1 needs at least {z.needed(1)} bytes "
                f"(window and compressor rows {z.per_seq}, the step's chunk {z.chunk}, one trash block per pool "
                f"{z.trash}, {MIN_ENTRY_BLOCKS} blocks of compressed entries {z.min_entries}); "
                f"{fix_budget} >= {z.needed(1)} would fit{chunk_note}")
        half = (budget // ROWS_SHARE) // z.per_seq
        seqs = max(1, min(DEFAULT_MAX_NUM_SEQS, fits, half))
    else:
        seqs = max_num_seqs
        if seqs > fits:
            works = f"max_num_seqs <= {fits} fits it, or " if fits >= 1 else ""
            raise ValueError(
                f"{where} leaves no room for max_num_seqs={seqs}: it needs at least {z.needed(seqs)} bytes "
                f"(window and compressor rows {z.per_seq} per sequence, {seqs * z.per_seq} in all; the step's "
                f"chunk {z.chunk}; one trash block per pool {z.trash}; {MIN_ENTRY_BLOCKS} blocks of compressed "
                f"entries {z.min_entries}); {works}{fix_budget} >= {z.needed(seqs)}{chunk_note}")
    spare = budget - z.needed(seqs)
    reserve = max(0, min(seqs, (budget // RESERVE_SHARE) // z.per_seq, spare // z.per_seq))
    blocks = bounded_blocks(groups, args, bs, seqs, max_num_batched_tokens, reserve)
    rows = sum(n * z.block[k] for k, n in blocks.items()) + sum(z.block[k] for k in blocks)
    growing = [g for g in groups if g.keep == "all"]
    if not growing:  # a sliding-window-only model: the context is bounded by max_seq_len only
        return Capacity(blocks, seqs, reserve, budget, budget_source, rows, 0, args.max_seq_len * seqs,
                        max_num_seqs is None and seqs < DEFAULT_MAX_NUM_SEQS)
    n = (budget - rows - z.per_entry_block) // z.per_entry_block  # less the entries' trash blocks
    if not budget_given:  # never more than every sequence at the model's context can use
        n = min(n, seqs * math.ceil((args.max_seq_len + 1) / bs))
    for g in growing:
        blocks[g.name] = n
    return Capacity(blocks, seqs, reserve, budget, budget_source, rows, (n + 1) * z.per_entry_block, n * bs,
                    max_num_seqs is None and seqs < DEFAULT_MAX_NUM_SEQS)
