"""Every malformed or out-of-range request gets its 4xx with an OpenAI-style error naming the field,
and the server stays healthy."""
from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import CONTEXT

USER = [{"role": "user", "content": "hi"}]
C, CH = "/v1/completions", "/v1/chat/completions"

CASES = [
    # (id, path, body (dict, or raw bytes), status, param)
    ("bad-json", CH, b'{"messages": [', 400, None),
    ("not-utf8", C, b'\xff\xfe', 400, None),
    ("json-too-deep", C, b'[' * 100000 + b']' * 100000, 400, None),
    ("body-not-object", CH, b'[1, 2]', 400, None),
    ("messages-missing", CH, {"model": "toy"}, 400, "messages"),
    ("messages-empty", CH, {"messages": []}, 400, "messages"),
    ("messages-not-list", CH, {"messages": "hi"}, 400, "messages"),
    ("message-not-object", CH, {"messages": ["hi"]}, 400, "messages[0]"),
    ("unknown-role", CH, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("content-wrong-type", CH, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("image-part", CH, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
    ("negative-temperature", CH, {"messages": USER, "temperature": -0.5}, 400, "temperature"),
    ("temperature-string", C, {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("temperature-nan", C, b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("top-p-zero", C, {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("top-k-bad", C, {"prompt": "hi", "top_k": -7}, 400, "top_k"),
    ("max-tokens-zero", C, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-float", C, {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ("max-tokens-bool", C, {"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ("max-tokens-past-context", C, {"prompt": "hi", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("max-completion-tokens-past-context", CH, {"messages": USER, "max_completion_tokens": 10**6}, 400,
     "max_completion_tokens"),
    ("prompt-too-long", C, {"prompt": [5] * CONTEXT}, 400, "prompt"),
    ("chat-prompt-too-long", CH, {"messages": [{"role": "user", "content": "word " * 2000}]}, 400, "messages"),
    ("prompt-missing", C, {"max_tokens": 3}, 400, "prompt"),
    ("prompt-empty", C, {"prompt": ""}, 400, "prompt"),
    ("prompt-bad-id", C, {"prompt": [1, 99999]}, 400, "prompt"),
    ("prompt-lone-surrogate", C, b'{"prompt": "a\\ud800b"}', 400, "prompt"),
    ("chat-lone-surrogate", CH, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400,
     "messages[0].content"),
    ("prompt-batch", C, {"prompt": ["a", "b"]}, 400, "prompt"),
    ("n-2", C, {"prompt": "hi", "n": 2}, 400, "n"),
    ("logprobs-too-many", C, {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("top-logprobs-without-logprobs", CH, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    ("stop-wrong-type", C, {"prompt": "hi", "stop": 7}, 400, "stop"),
    ("seed-negative", C, {"prompt": "hi", "seed": -1}, 400, "seed"),
    ("stream-not-bool", C, {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("stream-options-without-stream", C, {"prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("tools-bad", CH, {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools[0]"),
    # the library's own rejections, param = the field its message names
    ("tool-choice-required-thinking", CH, {"messages": USER, "tool_choice": "required",
                                           "thinking": {"type": "enabled"},
                                           "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tool_choice"),
    ("empty-messages-responses", "/v1/responses", {"input": []}, 400, None),
    ("reasoning-effort-bogus", CH, {"messages": USER, "reasoning_effort": "extreme"}, 400, "reasoning_effort"),
    ("penalty", C, {"prompt": "hi", "presence_penalty": 1.0}, 400, "presence_penalty"),
    ("model-wrong-type", C, {"prompt": "hi", "model": 3}, 400, "model"),
    ("unknown-model", CH, {"model": "gpt-9", "messages": USER}, 404, "model"),
    # messages validated completely (issue 24)
    ("user-without-content", CH, {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("user-null-content", CH, {"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
    ("system-without-content", CH, {"messages": [{"role": "system"}] + USER}, 400, "messages[0].content"),
    ("role-missing", CH, {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("name-not-string", CH, {"messages": [{"role": "user", "content": "hi", "name": 3}]}, 400, "messages[0].name"),
    ("assistant-empty", CH, {"messages": USER + [{"role": "assistant"}] + USER}, 400, "messages[1].content"),
    ("tool-without-content", CH, {"messages": USER + [{"role": "tool", "tool_call_id": "c1"}]}, 400,
     "messages[1].content"),
    ("tool-call-empty-arguments", CH, {"messages": USER + [{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}]}] + USER}, 400,
     "messages[1].tool_calls[0].function.arguments"),
    ("tool-call-arguments-missing", CH, {"messages": USER + [{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f"}}]}] + USER}, 400,
     "messages[1].tool_calls[0].function.arguments"),
    ("tool-call-arguments-not-json", CH, {"messages": USER + [{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{city: Oslo"}}]}] + USER}, 400,
     "messages[1].tool_calls[0].function.arguments"),
    ("tool-call-arguments-array", CH, {"messages": USER + [{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}]}] + USER}, 400,
     "messages[1].tool_calls[0].function.arguments"),
    ("tool-call-name-empty", CH, {"messages": USER + [{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "", "arguments": "{}"}}]}] + USER}, 400,
     "messages[1].tool_calls[0].function.name"),
    ("tool-call-not-object", CH, {"messages": USER + [{"role": "assistant", "tool_calls": ["f()"]}] + USER}, 400,
     "messages[1].tool_calls[0]"),
    ("tool-call-type", CH, {"messages": USER + [{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "code", "function": {"name": "f", "arguments": "{}"}}]}] + USER}, 400,
     "messages[1].tool_calls[0].type"),
    ("tool-parameters-not-object", CH, {"messages": USER, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": "none"}}]}, 400, "tools[0].function.parameters"),
    # refused before tokenizing: more bytes than CONTEXT tokens can cover
    ("prompt-cannot-fit", C, {"prompt": "word " * 20000}, 400, "prompt"),
    ("chat-cannot-fit", CH, {"messages": [{"role": "user", "content": "word " * 20000}]}, 400, "messages"),
]


@pytest.mark.parametrize("path,body,status,param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request(server, path, body, status, param):
    if isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = httpx.post(server.url + path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]
    if param:
        assert param in err["message"]


def test_unknown_paths_and_methods_are_json(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_errors_and_server_stays_healthy(server, client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="toy", messages=USER, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="toy", prompt="hi", max_tokens=CONTEXT * 4)
    assert httpx.get(server.url + "/health").status_code == 200
    r = client.completions.create(model="toy", prompt="hi", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
    m = server.wait_idle()
    assert m["dayzero:num_requests_running"] == 0


def test_valid_tool_call_history_is_accepted(server):
    body = {"messages": USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}], "max_tokens": 2}
    r = httpx.post(server.url + CH, json=body, timeout=60)
    assert r.status_code == 200, r.text


def test_prompt_that_cannot_fit_is_refused_with_the_bound(server):
    r = httpx.post(server.url + C, json={"prompt": "x" * 2_000_000}, timeout=60)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert msg.startswith("prompt: the prompt is at least ") and "2000000 bytes of text" in msg
    assert f"context is {CONTEXT} tokens" in msg
