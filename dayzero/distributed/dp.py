"""DP-attention + EP (distributed/layout.py): rank 0's engine assigns every request a rank, and a
step's call carries to each rank only the rows of its own requests.

The scheduler stays single on rank 0 (one engine, one HTTP server). A request's rank (`assign`:
by the prefix each rank has cached and by load, chosen when the request is admitted from
position 0, i.e. on arrival and again after a preemption freed its cache) runs its attention and
holds its KV in that rank's cache pools. Rank 0's block manager keeps one set of block pools per
rank (cache/manager.py partitions), so each rank's cache is its own: N ranks hold N times the
requests and tokens one rank holds, max_num_seqs requests each.
`DataParallel` splits each call of the engine into one call per rank (its sequences, renumbered
from 0; the rows it should return logits for), scatters them over the CPU group, and reassembles
the returned logits in the engine's order. A rank given no sequences joins the MoE collectives
with no tokens (engine/worker.py), so nobody waits on it.
"""
from __future__ import annotations

import torch


def assign(owners: dict[str, int], running: list[str], rid: str, world: int,
           hits: list[int] | None = None, cap: int | None = None) -> int:
    """The rank for request `rid` starting from position 0 (`owners` maps request ids to ranks).
    Among the ranks running fewer than `cap` other requests (the per-rank max_num_seqs) whose
    count is within max(1, 25%) of the least loaded one's, the rank whose prefix cache holds the
    longest prefix of the request (`hits`, tokens per rank), then the fewest running requests,
    then the lowest rank: a shared prefix brings requests to the rank that has it until that rank
    is busier than the balance allows."""
    load = [0] * world
    for other in running:
        if other != rid and other in owners:
            load[owners[other]] += 1
    low = min(load)
    allowed = [i for i in range(world) if load[i] <= low + max(1, low // 4) and (cap is None or load[i] < cap)]
    if not allowed:
        raise RuntimeError(f"request {rid!r}: every rank already runs its {cap} requests (max_num_seqs)")
    hits = hits or [0] * world
    owners[rid] = r = min(allowed, key=lambda i: (-hits[i], load[i], i))
    return r


class DataParallel:
    """Rank 0's runner under DP-attention + EP: `forward`, `draft` and `dspark` take the rank of
    each of the step's sequences (`owners`, the engine's decision) and send each rank its own rows."""

    def __init__(self, group, worker):
        self.group, self.worker, self.world = group, worker, group.world
        self._rows: dict[int, tuple[int, int]] = {}  # the last forward's packed row -> (rank, its row there)
        self._seqs: list[tuple[int, int]] = []  # the last forward's sequence -> (rank, its index there)

    def forward(self, ids: list[int], starts: list[int], lengths: list[int], tables: list[dict],
                protect: list[int], want: list[int], owners: list[int]) -> torch.Tensor | None:
        per = [([], [], [], [], [], []) for _ in range(self.world)]  # ids, starts, lengths, tables, protect, want
        self._rows, self._seqs = {}, []
        off = 0
        for b, (a, n) in enumerate(zip(starts, lengths)):
            r = owners[b]
            p = per[r]
            base = len(p[0])
            self._rows.update({off + j: (r, base + j) for j in range(n)})
            self._seqs.append((r, len(p[1])))
            p[0].extend(ids[off:off + n])
            p[1].append(a)
            p[2].append(n)
            p[3].append(tables[b])
            p[4].append(protect[b])
            off += n
        where = []
        for row in want:
            r, local = self._rows[row]
            where.append((r, len(per[r][5])))
            per[r][5].append(local)
        counts = [len(p[0]) for p in per]  # every rank's rows: sent along, no MoE layer gathers them
        out = self.group.each(self.worker, "forward", [(*p, counts) for p in per])
        return torch.stack([out[r][i] for r, i in where]) if want else None

    def draft(self, rows: list[int], seqs: list[int], starts: list[int], lengths: list[int],
              next_ids: list[int], tables: list[dict], owners: list[int]) -> torch.Tensor:
        """The MTP drafts of the last forward's sequences `seqs` on their ranks (rows, starts,
        lengths and next ids as Worker.draft takes them, in the engine's numbering)."""
        per = [([], [], [], [], [], []) for _ in range(self.world)]  # rows, seqs, starts, lengths, next ids, tables
        for r, (_, _, _, _, _, tabs) in enumerate(per):  # each rank's step tables, in its own order
            tabs.extend(tables[b] for b, (o, _) in enumerate(self._seqs) if o == r)
        where, pos = [], 0
        for seq, a, n in zip(seqs, starts, lengths):
            r, local = self._seqs[seq]
            assert owners[seq] == r, "a draft on another rank than its step"
            p = per[r]
            where.append((r, len(p[1])))
            p[0].extend(self._rows[row][1] for row in rows[pos:pos + n])
            p[1].append(local)
            p[2].append(a)
            p[3].append(n)
            p[4].extend(next_ids[pos:pos + n])
            pos += n
        counts = [len(p[0]) for p in per]
        out = self.group.each(self.worker, "draft", [(*p, counts) for p in per])
        return torch.stack([out[r][i] for r, i in where])

    def dspark(self, rows: list[int], seqs: list[int], starts: list[int], lengths: list[int], tables: list[dict],
               blocks: list[tuple], k: int, threshold: float, owners: list[int]
               ) -> list[tuple[list[int], list[float]]]:
        """DSpark after the last forward (Worker.dspark): each rank writes the context rows of its
        own sequences and drafts its own requests' blocks; a rank with no block joins the stages'
        MoE collectives while another drafts. Blocks come back in the engine's order."""
        per = [([], [], [], [], [], []) for _ in range(self.world)]  # rows, seqs, starts, lengths, tables, blocks
        for r, p in enumerate(per):  # each rank's step tables, in its own order
            p[4].extend(tables[b] for b, (o, _) in enumerate(self._seqs) if o == r)
        pos = 0
        for seq, a, n in zip(seqs, starts, lengths):
            r, local = self._seqs[seq]
            assert owners[seq] == r, "a draft on another rank than its step"
            per[r][0].extend(self._rows[row][1] for row in rows[pos:pos + n])
            per[r][1].append(local)
            per[r][2].append(a)
            per[r][3].append(n)
            pos += n
        where = []
        for blk in blocks:
            r, local = self._seqs[blk[0]]
            where.append((r, len(per[r][5])))
            per[r][5].append((local, *blk[1:]))
        counts = [len(p[5]) * k for p in per]  # every rank's block rows
        out = self.group.each(self.worker, "dspark", [(*p, k, threshold, counts) for p in per])
        return [out[r][i] for r, i in where]

    def score(self, ids: list[int]) -> torch.Tensor:
        """Every rank scores the same sequence (each its own copy: the MoE layers' dispatch then
        hands every rank its own rows summed over all experts); rank 0's result, the others' kept there."""
        counts = [len(ids)] * self.world
        return self.group.each(self.worker, "score", [(ids, r == 0, counts) for r in range(self.world)])[0]
