"""Per-request block tables over every cache group, with prefix caching (plain Python).

Logical block k of a request covers tokens [k*bs, (k+1)*bs) in every group. A group frees the
blocks a request no longer reads (window and open compressor windows slide; entries stay). A
block is named by the chain hash of the tokens up to its end once the request has computed past
it; freed named blocks stay findable until evicted, so a new request whose prompt shares the
first k*bs tokens takes them back: compressed entries, indexer keys, the window and the open
compressor rows, i.e. exactly the state at position k*bs.

Partitions (DP-attention, distributed/dp.py): each rank holds its own requests' rows in its own
cache pools, so the manager keeps one set of block pools per rank (`parts`): a request's blocks
come from, are named in and are found again only in its rank's pools. One rank: one partition.
"""
from __future__ import annotations

from dayzero.cache.block_pool import BlockPool
from dayzero.cache.spec import GroupSpec


def chain_hashes(tokens: list[int], block_size: int, n_blocks: int, start: list[int] | None = None,
                 salt: int = 0) -> list[int]:
    """The chain hash of each whole block; `salt` starts the chain (a different salt, disjoint names)."""
    out = list(start or [])
    h = out[-1] if out else salt
    for k in range(len(out), n_blocks):
        h = hash((h, tuple(tokens[k * block_size:(k + 1) * block_size])))
        out.append(h)
    return out


BOUNDED_SALT = hash("dayzero: DeepSeek-V4.1 bounded-replay blocks")


class KVCacheManager:
    def __init__(self, groups: list[GroupSpec], num_blocks: dict[str, int], block_size: int, window: int,
                 enable_prefix_caching: bool = True, lookahead: int = 0, partitions: int = 1):
        """lookahead: rows stored past the last computed token (the MTP block stores the row of
        position p at p + 1). partitions: ranks holding their own requests' rows (DP-attention),
        each with `num_blocks` blocks per group."""
        self.groups, self.bs, self.window, self.lookahead = groups, block_size, window, lookahead
        self.caching = enable_prefix_caching
        self.parts = [{g.name: BlockPool(num_blocks[g.name], g.name) for g in groups} for _ in range(partitions)]
        self.pools = self.parts[0]  # partition 0's pools (one rank: the only ones)
        self.tables: dict[str, dict[str, list[int | None]]] = {}
        self.hashes: dict[str, list[int]] = {}
        self.part: dict[str, int] = {}  # request -> its partition (DP rank) where not 0
        self.hits = self.queries = 0  # prefix-cache tokens hit / asked, for stats
        # DeepSeek-V4.1 bounded replay (engine option v41_bounded_replay): rid -> its replay floor (0: exact).
        # A request with a floor f > 0 names and finds its blocks in a salted chain (exact requests never
        # take blocks its decoder layers left unwritten or approximated) and takes a hit of at most f tokens
        self.floor_of = None

    def _replay(self, rid: str | None) -> tuple[int, int | None]:
        """(chain salt, hit cap in tokens) of a request: (0, None) unless it has a bounded-replay floor."""
        f = self.floor_of(rid) if self.floor_of is not None and rid is not None else 0
        return (0, None) if not f else (BOUNDED_SALT, f)

    def part_of(self, rid: str) -> int:
        return self.part.get(rid, 0)

    def _pools(self, rid: str) -> dict[str, BlockPool]:
        return self.parts[self.part.get(rid, 0)]

    def table(self, rid: str) -> dict[str, list[int | None]]:
        return self.tables.setdefault(rid, {g.name: [] for g in self.groups})

    def _needed_from(self, g: GroupSpec, n: int) -> int:
        """First logical block group g must hold to continue from n computed tokens (whose step
        re-reads position n - 1's window when resuming from a prefix hit)."""
        return g.keep_from(max(n - 1, 0), self.window) // self.bs

    # ---- prefix cache ------------------------------------------------------------------------
    def _longest(self, tokens: list[int], part: int, rid: str | None = None):
        """The longest cached prefix of `tokens` in partition `part`: (blocks k, the blocks each
        group holds of it, the chain hashes), k = 0 if none."""
        salt, cap = self._replay(rid)
        m = (len(tokens) - 1) // self.bs
        if cap is not None:
            m = min(m, cap // self.bs)
        if not self.caching or m == 0:
            return 0, {}, []
        hashes, pools = chain_hashes(tokens, self.bs, m, salt=salt), self.parts[part]
        for k in range(m, 0, -1):
            found = {}
            for g in self.groups:
                blocks = [pools[g.name].lookup(hashes[j]) for j in range(self._needed_from(g, k * self.bs), k)]
                if any(b is None for b in blocks):
                    break
                found[g.name] = blocks
            else:
                return k, found, hashes[:k]
        return 0, {}, []

    def probe_prefix(self, tokens: list[int], part: int = 0) -> int:
        """The length `lookup_prefix` would find in partition `part`, taking nothing."""
        return self._longest(tokens, part)[0] * self.bs

    def lookup_prefix(self, rid: str, tokens: list[int], part: int = 0) -> int:
        """Take the longest cached prefix of `tokens` (whole blocks, at least one token left to
        compute) in partition `part`, which becomes the request's (its blocks are named there from
        now on); return its length L (0 if none). The caller recomputes position L-1 without
        writing (see PagedBatchCache's `protect`) and continues from L."""
        assert not any(self.table(rid).values()), "prefix lookup on a request that holds blocks"
        self.queries += len(tokens)
        if part:
            self.part[rid] = part
        else:
            self.part.pop(rid, None)
        k, found, hashes = self._longest(tokens, part, rid)
        if k == 0:
            return 0
        tab, pools = self.table(rid), self.parts[part]
        for g in self.groups:
            for b in found[g.name]:
                pools[g.name].take(b)
            tab[g.name] = [None] * (k - len(found[g.name])) + found[g.name]
        self.hashes[rid] = hashes
        self.hits += k * self.bs
        return k * self.bs

    # ---- allocation --------------------------------------------------------------------------
    def can_allocate(self, rid: str, end: int) -> bool:
        tab, pools = self.table(rid), self._pools(rid)
        need = -(-(end + self.lookahead) // self.bs)
        return all(need - len(tab[g.name]) <= pools[g.name].num_free for g in self.groups)

    def allocate(self, rid: str, end: int) -> bool:
        """Blocks for tokens up to `end` in every group, all or nothing."""
        if not self.can_allocate(rid, end):
            return False
        tab, pools = self.table(rid), self._pools(rid)
        need = -(-(end + self.lookahead) // self.bs)
        for g in self.groups:
            t = tab[g.name]
            t.extend(pools[g.name].allocate(max(need - len(t), 0)))
        return True

    def commit(self, rid: str, num_computed: int, tokens: list[int]) -> None:
        """After a step: name newly completed blocks, free what no group reads any more."""
        tab, pools = self.table(rid), self._pools(rid)
        full = num_computed // self.bs
        if self.caching:
            old = self.hashes.get(rid, [])
            hashes = self.hashes[rid] = chain_hashes(tokens, self.bs, full, old, self._replay(rid)[0])
            for k in range(len(old), full):
                for g in self.groups:
                    b = tab[g.name][k]
                    if b is not None:
                        pools[g.name].cache(b, hashes[k])
        for g in self.groups:
            t = tab[g.name]
            for k in range(min(g.keep_from(num_computed, self.window) // self.bs, len(t))):
                if t[k] is not None:
                    pools[g.name].free([t[k]])
                    t[k] = None

    def free(self, rid: str) -> None:
        pools = self._pools(rid)
        for g in self.groups:
            pools[g.name].free(self.table(rid)[g.name])
        self.tables.pop(rid, None)
        self.hashes.pop(rid, None)
        self.part.pop(rid, None)

    def usage(self) -> float:
        return max(p.usage for pools in self.parts for p in pools.values())
