"""The scheduler: one rule, plain Python over token counts and block ids (no tensors).

Rule: every step, each request's computed tokens catch up with its known tokens, as far as
`max_num_batched_tokens` (shared, first come first served) and `max_num_seqs` allow. A prompt
is prefilled in chunks by that rule; a decoding request asks for its one new token (1 + k with k
draft tokens to verify; a budget that cannot hold them all verifies the first ones). When the
cache cannot hold a running request's next tokens, the most recently arrived running request is
preempted: its blocks are freed and it recomputes later (from whatever prefix is still cached).
Under DP-attention every rank has its own cache (cache/manager.py partitions): a request is placed
on a rank when admitted (`place`), and only a request of the same rank is preempted for it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from dayzero.cache.manager import KVCacheManager
from dayzero.engine.request import Request, Status


@dataclass
class Scheduled:
    request: Request
    num_new: int  # tokens computed this step, from request.num_computed
    num_draft: int = 0  # the last num_draft of them are draft tokens (not yet known tokens)

    @property
    def verify_draft(self) -> bool:
        return self.num_draft > 0


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv, self.max_num_seqs, self.max_tokens = kv, max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # the cache partition of a request starting from position 0 (its DP rank: Engine sets the
        # rule under DP-attention, distributed/dp.py `assign`); one rank: partition 0
        self.place: Callable[[Request], int] = lambda req: 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def finish(self, req: Request, reason: str) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.rid)
        req.status, req.finish_reason = Status.FINISHED, req.finish_reason or reason

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.rid)
        req.num_computed, req.protect, req.draft, req.draft_conf = 0, 0, [], None
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _wanted(self, req: Request) -> tuple[int, int]:
        remaining = req.num_tokens - req.num_computed
        if req.draft and remaining == 1:
            return 1 + len(req.draft), len(req.draft)
        return remaining, 0

    def schedule(self) -> list[Scheduled]:
        budget = self.max_tokens
        out: list[Scheduled] = []
        for req in sorted(self.running, key=lambda r: r.arrival):
            if req not in self.running:  # preempted below for an earlier request
                continue
            want, drafts = self._wanted(req)
            n = min(want, budget)
            drafts = min(drafts, max(n - 1, 0))  # the first drafts the budget holds
            if n <= 0:
                continue
            while not self.kv.allocate(req.rid, req.num_computed + n):
                part = self.kv.part_of(req.rid)  # only its own rank's cache can make room
                victim = max((r for r in self.running if self.kv.part_of(r.rid) == part), key=lambda r: r.arrival)
                self._preempt(victim)
                if victim is req:
                    break
            else:
                out.append(Scheduled(req, n, drafts))
                budget -= n
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            req = self.waiting[0]
            if req.num_computed == 0:
                hit = self.kv.lookup_prefix(req.rid, req.all_ids, self.place(req))
                if hit:
                    req.num_computed, req.protect = hit - 1, hit
            n = min(req.num_tokens - req.num_computed, budget)
            if not self.kv.allocate(req.rid, req.num_computed + n):
                part = self.kv.part_of(req.rid)
                self.kv.free(req.rid)  # give back prefix-hit blocks; look up again next time
                req.num_computed, req.protect = 0, 0
                if not any(self.kv.part_of(r.rid) == part for r in self.running):
                    # it cannot fit even alone: fail this request, not the engine
                    req.error = (f"{req.num_tokens} tokens do not fit in the KV cache; raise "
                                 "kv_cache_memory_bytes or lower max_num_batched_tokens")
                    self.finish(req, "abort")
                    continue
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            out.append(Scheduled(req, n))
            budget -= n
        return out

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
