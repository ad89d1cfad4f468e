"""Sampling parameters (vLLM names) and the sampler.

Order of operations on a request's fp32 logits: temperature -> top-k -> top-p -> min-p -> draw.
temperature == 0 is greedy. A draw is the Gumbel-max trick, argmax(filtered logits + G), with the
noise G a function of (request seed, index of the output token) only: the k-th token of a seeded
request depends on nothing else (not on the batch, nor on speculation).

Speculative verification (`verify_block`) is rejection sampling coupled through that noise: the
token at each drafted position is what sampling the target's logits there gives anyway, a draft
token is accepted iff it equals it, and the first mismatch ends the block with the target's own
token (the correction). The output is therefore exactly the target's distribution, token for
token the same as without speculation for a given seed; a drafter that samples its proposals
with the same noise (MTP, DSpark) is accepted with the probability that the two Gumbel-max draws
coincide. Reported logprobs are the model's own distribution (log-softmax of the raw logits).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: all tokens
    min_p: float = 0.0
    max_tokens: int = 16
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # also return this many most likely tokens per step
    # constrained decoding (server/constrain.py): an object with mask(logits [V]) -> logits, applied
    # before any filtering, and accept(token) after each output token; None leaves sampling untouched
    logits_processor: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"SamplingParams.{name}: {why}")

        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            bad("temperature", f"must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", f"must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad("seed", f"must be a non-negative integer or None, got {self.seed!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            bad("logprobs", f"must be a non-negative integer or None, got {self.logprobs!r}")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if not all(isinstance(s, str) and s for s in stops):
            bad("stop", f"must be a non-empty string or a list of them, got {self.stop!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids or []):
            bad("stop_token_ids", f"must be a list of token ids, got {self.stop_token_ids!r}")

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def resolve_seed(self) -> int:
        return self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """[V] fp32 logits -> temperature-scaled logits with filtered tokens at -inf."""
    x = logits.float() / p.temperature
    if p.top_k > 0 and p.top_k < x.numel():
        kth = x.topk(p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1:
        sorted_x, order = x.sort(descending=True)
        probs = sorted_x.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        x = x.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    if p.min_p > 0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return x


def gumbel_noise(seed: int, index: int, n: int) -> torch.Tensor:
    """Standard Gumbel noise [n] for output token `index` of the request seeded `seed`."""
    g = torch.Generator().manual_seed(hash((seed, index)) & (2**63 - 1))
    u = torch.rand(n, generator=g).clamp_(min=1e-20, max=1 - 1e-7)
    return -torch.log(-torch.log(u))


def sample(logits: torch.Tensor, p: SamplingParams, seed: int, index: int) -> int:
    """Output token `index` from `logits` [V]: argmax when greedy, else a draw from the filtered
    distribution (Gumbel-max with the noise of (seed, index))."""
    if p.logits_processor is not None:
        logits = p.logits_processor.mask(logits)
    if p.temperature == 0:
        return int(logits.argmax())
    x = filter_logits(logits, p)
    return int((x + gumbel_noise(seed, index, x.numel())).argmax())


def verify_draft(target: torch.Tensor, draft: int, p: SamplingParams, seed: int, index: int
                 ) -> tuple[bool, int]:
    """Speculative verification of a draft for output token `index`: the token is what sampling
    the target gives anyway; the draft (made with the same noise) is accepted iff it equals it."""
    tok = sample(target, p, seed, index)
    return tok == draft, tok


def verify_block(logits: list[torch.Tensor], drafts: list[int], p: SamplingParams, seed: int, index: int
                 ) -> tuple[int, list[int]]:
    """Verification of the drafts d_0..d_{k-1} for output tokens index .. index + k - 1 from the
    target's logits at the k + 1 rows [last known token, d_0, .., d_{k-1}]: (number of drafts
    accepted a, the a + 1 output tokens: the accepted drafts, then the target's token at the first
    rejection or the bonus token after a full accept)."""
    out: list[int] = []
    for i, lg in enumerate(logits[:len(drafts) + 1]):
        out.append(sample(lg, p, seed, index + i))
        if i == len(drafts) or out[-1] != drafts[i]:
            break
    return len(out) - 1, out


def token_logprobs(logits: torch.Tensor, token: int, n: int) -> dict[int, float]:
    """{token: logprob} for the chosen token plus the n most likely ones."""
    lp = logits.float().log_softmax(-1)
    out = {token: float(lp[token])}
    if n > 0:
        values, ids = lp.topk(min(n, lp.numel()))
        out.update({int(i): float(v) for i, v in zip(ids, values)})
    return out
