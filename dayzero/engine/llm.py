"""The offline API (DESIGN.md "Public API contract"): `LLM(...).generate(...)` and `.score(...)`.

This version runs the reference model directly, one request at a time with its own incremental
state (prefill, then one token per step). The paged engine (continuous batching, prefix caching,
MTP drafts) replaces the runner behind the same API.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from dayzero.engine.sampling import SamplingParams, sample, token_logprobs
from dayzero.loader.model_io import load_model
from dayzero.tokenizer import Tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" (EOS, stop token or string) or "length"
    prompt: str | None = None


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype: expected one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: not a device name: {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available here")
    return dev


class LLM:
    def __init__(self, model: str | os.PathLike | None = None, device=None, dtype=None,
                 numerics: str = "official", **engine_options):
        if engine_options:
            raise TypeError(
                f"LLM: engine options {sorted(engine_options)} need the paged engine, which this version "
                "does not have yet (it runs the reference model one request at a time)")
        if model is None:
            raise ValueError("LLM: no built-in model ships with this version yet; pass model= the path of a "
                             "checkpoint directory in the official hub layout (`dayzero toy DIR` writes a "
                             "small random one)")
        path = Path(model)
        self.device = resolve_device(device)
        self.model = load_model(path, numerics=numerics, dtype=resolve_dtype(dtype), device=self.device)
        self.args = self.model.args
        tok_file = path / "tokenizer.json"
        self.tokenizer = Tokenizer(tok_file) if tok_file.is_file() else None

    # ---- inputs ------------------------------------------------------------------------------
    def _token_ids(self, prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint ships no tokenizer.json: pass prompts as lists of token ids")
            return self.tokenizer.encode(prompt), prompt
        ids = list(prompt)
        if not ids:
            raise ValueError("empty prompt: at least one token is needed")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.args.vocab_size:
                raise ValueError(f"prompt token {t!r} is not an id in [0, {self.args.vocab_size})")
        return ids, None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    # ---- API ---------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Next-token logits at every position of one sequence: [len, vocab] fp32 (one full forward)."""
        ids, _ = self._token_ids(token_ids)
        x = torch.tensor([ids], device=self.device)
        return self.model(x)[0].float().cpu()

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[GenerationOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        encoded = [self._token_ids(p) for p in prompts]  # validate all before running any
        for ids, _ in encoded:
            if len(ids) >= self.args.max_seq_len:
                raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the "
                                 f"{self.args.max_seq_len}-token context")
        return [self._generate_one(ids, text, p) for (ids, text), p in zip(encoded, params)]

    def stream(self, prompt, params: SamplingParams | None = None):
        """Yield (token_id, GenerationOutput so far) as each token is produced."""
        ids, text = self._token_ids(prompt)
        yield from self._run(ids, text, params or SamplingParams())

    def _generate_one(self, ids: list[int], text: str | None, p: SamplingParams) -> GenerationOutput:
        out = None
        for _, out in self._run(ids, text, p):
            pass
        return out

    @torch.no_grad()
    def _run(self, ids: list[int], prompt_text: str | None, p: SamplingParams):
        out = GenerationOutput(prompt_token_ids=list(ids), prompt=prompt_text,
                               logprobs=[] if p.logprobs is not None else None)
        gen = p.make_generator()
        state = self.model.new_state()
        stop_ids = set(p.stop_token_ids or [])
        if not p.ignore_eos:
            stop_ids.add(self.args.eos_token_id)
        budget = min(p.max_tokens, self.args.max_seq_len - len(ids))
        logits = self.model(torch.tensor([ids], device=self.device), state)[0, -1].float().cpu()
        while True:
            tok = sample(logits, p, gen)
            out.token_ids.append(tok)
            if out.logprobs is not None:
                out.logprobs.append(token_logprobs(logits, tok, p.logprobs))
            out.text = self._decode(out.token_ids)
            if tok in stop_ids:
                out.finish_reason = "stop"
            elif any(s in out.text for s in p.stop_strings):
                cut = min(out.text.index(s) for s in p.stop_strings if s in out.text)
                out.text, out.finish_reason = out.text[:cut], "stop"
            elif len(out.token_ids) >= budget:
                out.finish_reason = "length"
            yield tok, out
            if out.finish_reason:
                return
            logits = self.model(torch.tensor([[tok]], device=self.device), state)[0, -1].float().cpu()
