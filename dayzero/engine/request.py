"""A request's bookkeeping: tokens known and computed, output so far, why it finished."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from dayzero.engine.sampling import SamplingParams

_arrival = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    seed: int | None = None  # sampling noise seed (params.seed, else random)
    status: Status = Status.WAITING
    arrival: int = field(default_factory=lambda: next(_arrival))
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    text: str = ""  # decoded output: kept current only with stop strings, always set when finished
    finish_reason: str | None = None
    error: str | None = None
    num_computed: int = 0  # positions [0, num_computed) are in the cache
    protect: int = 0  # prefix-cache hit length: positions below are shared, never rewritten
    draft: list[int] = field(default_factory=list)  # the drafter's proposals for the tokens after the last known one
    draft_conf: list[float] | None = None  # per proposed token: the drafter's acceptance probability (DSpark)
    accept_rate: float | None = None  # running estimate of its drafts' acceptance (engine/draft_policy.py)
    max_len: int = 0  # context limit for this request (prompt + max_tokens, capped by the model)

    def __post_init__(self):
        if self.seed is None:
            self.seed = self.params.resolve_seed()
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
