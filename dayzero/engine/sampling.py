"""Sampling parameters (vLLM names) and the sampler.

Order of operations on a request's fp32 logits: temperature -> top-k -> top-p -> min-p -> draw
with the request's own torch.Generator (seeded by `seed`, so a seeded request is reproducible
whatever else runs beside it). temperature == 0 is greedy. Reported logprobs are the model's
own distribution (log-softmax of the raw logits), before any of those transforms.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

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

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return torch.Generator(device=device).manual_seed(seed)


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


def probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a request samples from: one-hot argmax when greedy."""
    if p.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).float()
    return filter_logits(logits, p).softmax(-1)


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    if p.temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(probs(logits, p), 1, generator=generator))


def verify_draft(target: torch.Tensor, draft_probs: torch.Tensor, draft: int, p: SamplingParams,
                 generator: torch.Generator) -> tuple[bool, int]:
    """Speculative acceptance of one drafted token. Greedy: accept iff it is the argmax. Sampled:
    accept with probability min(1, p(d)/q(d)), else draw from max(0, p - q) renormalised, so the
    output is distributed exactly as sampling from the target p. -> (accepted, token)."""
    if p.temperature == 0:
        best = int(target.argmax())
        return best == draft, best
    pt = probs(target, p)
    ratio = float(pt[draft] / draft_probs[draft].clamp(min=1e-30))
    if float(torch.rand((), generator=generator)) < min(1.0, ratio):
        return True, draft
    residual = (pt - draft_probs).clamp(min=0)
    residual = residual / residual.sum() if residual.sum() > 0 else pt
    return False, int(torch.multinomial(residual, 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token: int, n: int) -> dict[int, float]:
    """{token: logprob} for the chosen token plus the n most likely ones."""
    lp = logits.float().log_softmax(-1)
    out = {token: float(lp[token])}
    if n > 0:
        values, ids = lp.topk(min(n, lp.numel()))
        out.update({int(i): float(v) for i, v in zip(ids, values)})
    return out
