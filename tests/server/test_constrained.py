"""response_format through constrained decoding (llguidance): a random-weight model's output
always parses; unsupported constraints are 400s; requests without a constraint sample exactly as
before (the processor hook is never entered)."""
from __future__ import annotations

import json
import re

import httpx
import pytest
import torch

pytest.importorskip("llguidance")

from dayzero.engine.sampling import SamplingParams, sample  # noqa: E402

CH = "/v1/chat/completions"
NO_THINK = {"thinking": {"type": "disabled"}}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "color": {"type": "string", "enum": ["red", "green", "blue"]}},
          "required": ["ok", "n", "color"], "additionalProperties": False}


def _chat(server, rf, seed, **extra):
    body = {"messages": [{"role": "user", "content": "Answer in JSON."}], "max_tokens": 64, "seed": seed,
            "temperature": 1.0, "response_format": rf, **NO_THINK, **extra}
    r = httpx.post(server.url + CH, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_json_schema_output_always_parses(server):
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    for seed in range(4):
        choice = _chat(server, rf, seed)
        obj = json.loads(choice["message"]["content"])
        assert set(obj) == {"ok", "n", "color"} and isinstance(obj["ok"], bool)
        assert 0 <= obj["n"] <= 99 and obj["color"] in ("red", "green", "blue")
        assert choice["finish_reason"] == "stop"  # the grammar ended, so only EOS was allowed


def test_regex_output_matches(server):
    for seed in range(3):
        choice = _chat(server, {"type": "regex", "regex": "(yes|no), [0-9]{3}"}, seed)
        assert re.fullmatch("(yes|no), [0-9]{3}", choice["message"]["content"]), choice


def test_streamed_constrained_output_parses(server):
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    body = {"messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 64, "seed": 5,
            "response_format": rf, "stream": True, **NO_THINK}
    text = []
    with httpx.stream("POST", server.url + CH, json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    text.append(ch["delta"].get("content") or "")
    assert set(json.loads("".join(text))) == {"ok", "n", "color"}


def test_unsupported_constraints_are_400(server):
    for rf in ({"type": "regex", "regex": "(a)\\1"},  # a back-reference: not a regular language
               {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}):
        r = httpx.post(server.url + CH, json={"messages": [{"role": "user", "content": "json"}],
                                             "response_format": rf, **NO_THINK}, timeout=60)
        assert r.status_code == 400, (rf, r.text)
        assert r.json()["error"]["param"] == "response_format", r.text


class _Identity:
    def __init__(self):
        self.calls = 0

    def mask(self, logits):
        self.calls += 1
        return logits

    def accept(self, tok):
        pass


def test_no_constraint_samples_exactly_as_before():
    g = torch.Generator().manual_seed(0)
    for temperature, top_p in ((0.0, 1.0), (0.8, 0.95), (1.0, 0.5)):
        logits = torch.randn(4096, generator=g)
        plain = SamplingParams(temperature=temperature, top_p=top_p)
        ident = _Identity()
        hooked = SamplingParams(temperature=temperature, top_p=top_p, logits_processor=ident)
        for k in range(20):
            assert sample(logits, plain, 123, k) == sample(logits, hooked, 123, k)
        assert ident.calls == 20
    assert plain == hooked  # the hook is not part of equality
