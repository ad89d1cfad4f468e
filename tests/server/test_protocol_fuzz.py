"""Request validation never raises anything but an APIError (a 4xx), whatever a field holds: dayzero's
own checks and deepseek-recipe's conversion, for all four request APIs."""
from __future__ import annotations

import itertools

import pytest

from dayzero.server.protocol import APIError, Validator

ODD = [None, 0, -1, 1, 2.5, -0.5, float("nan"), 10**30, True, False, "", "x", [], {}, [1], ["a"], [[]], [{}],
       {"a": 1}, {"type": "text"}, [{"type": "text", "text": 1}]]

CHAT = {"model": "toy", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "a", "tool_calls": [
                                         {"id": "c", "type": "function",
                                          "function": {"name": "f", "arguments": "{}"}}]},
                                     {"role": "tool", "tool_call_id": "c", "content": "r"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], "max_tokens": 4,
        "temperature": 0.5, "top_p": 0.9, "seed": 1, "stop": ["x"], "logprobs": True, "top_logprobs": 2,
        "stream": True, "stream_options": {"include_usage": True}, "tool_choice": "auto",
        "reasoning_effort": "high", "thinking": {"type": "enabled"}, "n": 1, "response_format": {"type": "text"},
        "top_k": 5, "min_p": 0.1, "ignore_eos": False, "stop_token_ids": [1]}
RESPONSES = {"model": "toy", "input": [{"role": "user", "content": "hi"}], "instructions": "s",
             "max_output_tokens": 4, "temperature": 0.5, "top_p": 0.9, "stream": True,
             "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
             "reasoning": {"effort": "low"}, "text": {"format": {"type": "text"}}}
MESSAGES = {"model": "toy", "system": "s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0.5, "stream": True, "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "thinking": {"type": "disabled"}, "stop_sequences": ["x"]}
COMPLETION = {"model": "toy", "prompt": "hello", "max_tokens": 4, "temperature": 0.5, "logprobs": 2, "echo": False,
              "stream": False, "seed": 3, "stop": "x", "presence_penalty": 0, "best_of": 1}


@pytest.fixture(scope="module")
def validator(tmp_path_factory):
    from dayzero.testing import tiny_tokenizer
    from dayzero.tokenizer import Tokenizer

    p = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tiny_tokenizer(p)
    return Validator("toy", Tokenizer(p), 512, 4096, {1})


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _set(obj, path, value):
    import copy

    obj = copy.deepcopy(obj)
    if not path:
        return value
    cur = obj
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value
    return obj


@pytest.fixture(scope="module")
def proto(full_tok):
    from dayzero.server.recipe import Protocol

    return Protocol("toy", full_tok, 4096, eos_id=1, vocab_size=full_tok.vocab_size)


@pytest.mark.parametrize("kind", ["chat", "responses", "messages", "completion"])
def test_every_field_every_odd_value(validator, proto, kind):
    base = {"chat": CHAT, "responses": RESPONSES, "messages": MESSAGES, "completion": COMPLETION}[kind]
    if kind == "completion":
        fn = validator.completion
    else:
        def fn(body):
            return proto.prepare(kind, body)
    assert fn(base).params.max_tokens == 4
    n = 0
    for path, value in itertools.product(list(_paths(base)), ODD):
        body = _set(base, path, value)
        try:
            fn(body)
        except APIError as e:
            assert 400 <= e.status < 500 and e.message
        n += 1
    assert n > 200
