"""Constrained decoding of `response_format` (json_schema, json_object, regex) with llguidance.

deepseek-recipe turns a request's `response_format` into an OutputConstraint (`json` with a schema,
or an empty schema for any JSON value; `regex`); this module compiles it into an llguidance
matcher over the checkpoint's tokenizer and gives the engine a per-request logits processor
(SamplingParams.logits_processor): `mask` sets every token the grammar forbids to -inf before
sampling, `accept` advances the matcher by the sampled token. Once the grammar is complete only
EOS is allowed. In thinking mode the constraint starts after the `</think>` token: the reasoning
is free text, the answer is constrained.

llguidance is chosen because it is a single abi3 wheel (Linux x86-64 / aarch64, macOS arm64,
Windows) with no dependency on torch or transformers.
"""
from __future__ import annotations

import torch

from dayzero.server.protocol import APIError

END_THINK = "</think>"


class Constrainer:
    """The llguidance tokenizer of one server (built once: it scans the vocabulary)."""

    def __init__(self, tokenizer, eos_id: int, vocab_size: int):
        try:
            import llguidance
        except ImportError:  # pragma: no cover - a dependency of dayzero
            llguidance = None
        self.ll = llguidance
        self.vocab_size = vocab_size
        self.end_think = tokenizer.token_to_id(END_THINK)
        self.lltok = None
        if llguidance is not None:
            self.lltok = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=eos_id)

    def grammar(self, kind: str, schema: str, api: str) -> str:
        ll = self.ll
        if kind == "json":
            try:
                # compact JSON: a flexible-whitespace grammar lets a weak model pad with blanks forever
                return ll.LLMatcher.grammar_from_json_schema(schema or "{}", defaults={"whitespace_flexible": False})
            except ValueError as e:
                raise _bad(api, f"response_format: the JSON schema is not valid ({e})")
        return ll.LLMatcher.grammar_from_regex(schema)

    def processor(self, constraint, thinking: bool, api: str) -> "Processor":
        if self.lltok is None:
            raise _bad(api, "response_format: constrained decoding needs the llguidance package "
                            "(pip install llguidance)")
        if thinking and self.end_think is None:
            raise _bad(api, "response_format: in thinking mode the constraint starts after </think>, which this "
                            "model's tokenizer has no token for; disable thinking "
                            "(thinking: {\"type\": \"disabled\"})")
        grammar = self.grammar(constraint.kind, constraint.schema, api)
        err = self.ll.LLMatcher.validate_grammar(grammar, self.lltok)
        if err:
            raise _bad(api, f"response_format: this {constraint.kind} constraint is not supported: {err}")
        matcher = self.ll.LLMatcher(self.lltok, grammar, log_level=0)
        if matcher.is_error():
            raise _bad(api, f"response_format: this {constraint.kind} constraint is not supported: "
                            f"{matcher.get_error()}")
        return Processor(matcher, self.vocab_size, self.end_think if thinking else None)


class Processor:
    """Per-request state: the matcher, and whether the constrained part has begun."""

    def __init__(self, matcher, vocab_size: int, wait_for: int | None):
        self.matcher, self.vocab_size = matcher, vocab_size
        self.wait_for = wait_for  # a token id before which nothing is constrained (thinking mode)

    @property
    def active(self) -> bool:
        return self.wait_for is None

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.active or self.matcher.is_error():
            return logits
        bits = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        allowed = ((bits.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten().bool()
        n = logits.shape[-1]
        allowed = allowed[:n] if allowed.numel() >= n else torch.nn.functional.pad(allowed, (0, n - allowed.numel()))
        return logits.float().masked_fill(~allowed.to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        if not self.active:
            if token == self.wait_for:
                self.wait_for = None
            return
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)


def _bad(api: str, message: str) -> APIError:
    e = APIError(400, message, param="response_format")
    e.api = api
    return e
