"""Chat, Responses and Messages end to end in-process, with a scripted engine that "generates" a fixed
text, so deepseek-recipe's reasoning / content / tool_calls mapping is exercised through dayzero on
outputs a random-weight model never writes."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from dayzero.server.app import ServerArgs, build_app  # noqa: E402


class ScriptedEngine:
    """The Engine surface the server uses; each step appends the next token of a fixed script."""

    def __init__(self, script: list[int], eos: int):
        self.script, self.eos = script, eos
        self.eargs = SimpleNamespace(max_num_seqs=4)
        self.max_num_seqs = 4
        self.max_tokens = 10**6
        self.requests = {}

    def add_request(self, rid, prompt_ids, params, prompt=None):
        r = SimpleNamespace(rid=rid, prompt_ids=prompt_ids, params=params, output_ids=[], finished=False,
                            finish_reason=None, error=None,
                            logprobs=[] if params.logprobs is not None else None)
        self.requests[rid] = r
        return r

    def step(self):
        out = []
        for r in list(self.requests.values()):
            if r.finished:
                continue
            n = len(r.output_ids)
            tok = self.script[n] if n < len(self.script) else self.eos
            r.output_ids.append(tok)
            if r.logprobs is not None:
                r.logprobs.append({tok: -0.5})
            if tok == self.eos:
                r.finished, r.finish_reason = True, "stop"
            elif len(r.output_ids) >= r.params.max_tokens:
                r.finished, r.finish_reason = True, "length"
            out.append(r)
        return out

    def abort(self, rid):
        self.requests.pop(rid, None)

    def release(self, rid):
        self.requests.pop(rid, None)

    def has_unfinished(self):
        return any(not r.finished for r in self.requests.values())

    def stats(self):
        return {"running": sum(not r.finished for r in self.requests.values()), "waiting": 0, "kv_usage": 0.0}


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    from dayzero.testing import tiny_tokenizer
    from dayzero.tokenizer import Tokenizer

    p = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tiny_tokenizer(p)
    return Tokenizer(p)


@pytest.fixture(scope="module", params=["native", "text"])
def tok(request, full_tok, tiny_tok):
    """native: a tokenizer with the library's special tokens (token chunks, parsed by id, as real
    checkpoints); text: one without them (the toy's; dayzero decodes, the library parses text)."""
    return full_tok if request.param == "native" else tiny_tok


def make_client(tok, output: str) -> TestClient:
    script = tok.encode(output, add_special_tokens=False)
    llm = SimpleNamespace(engine=ScriptedEngine(script, eos=1), tokenizer=tok,
                          args=SimpleNamespace(max_seq_len=4096, eos_token_id=1, vocab_size=tok.vocab_size))
    return TestClient(build_app(llm, ServerArgs(model_name="scripted")))


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
# V4 DSML, as the library's tool section tells the model to write it
CALL = ('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
        '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
THINK = {"thinking": {"type": "enabled"}}
NO_THINK = {"thinking": {"type": "disabled"}}


def _both(c: TestClient, body: dict, path: str = "/v1/chat/completions"):
    full = c.post(path, json=body)
    assert full.status_code == 200, full.text
    events = []
    with c.stream("POST", path, json=dict(body, stream=True)) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return full.json(), events


def test_reasoning_and_content(tok):
    with make_client(tok, "The fox is quick.</think>It jumps.") as c:
        body = {"messages": [{"role": "user", "content": "Why?"}], "max_tokens": 200, **THINK}
        full, chunks = _both(c, body)
    msg = full["choices"][0]
    assert msg["message"]["content"] == "It jumps."
    assert msg["message"]["reasoning_content"] == "The fox is quick."
    assert msg["finish_reason"] == "stop"
    deltas = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "The fox is quick."
    assert "".join(d.get("content") or "" for d in deltas) == "It jumps."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(ch["object"] == "chat.completion.chunk" and ch["id"] == chunks[0]["id"] for ch in chunks)
    assert full["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0


def test_tool_calls_stream_as_argument_fragments(tok):
    with make_client(tok, "Let me check." + CALL) as c:
        body = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": TOOLS, "max_tokens": 400,
                **NO_THINK}
        full, chunks = _both(c, body)
    choice = full["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo", "days": 2}
    deltas = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "Let me check."
    frags = [tc for d in deltas for tc in d.get("tool_calls") or []]
    assert len(frags) > 2 and all(f["index"] == 0 for f in frags)  # the arguments come in pieces
    assert frags[0]["function"]["name"] == "get_weather" and frags[0]["id"]
    assert json.loads("".join(f["function"].get("arguments", "") for f in frags)) == {"city": "Oslo", "days": 2}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any("DSML" in (d.get("content") or "") for d in deltas)


def test_responses_and_messages_tool_calls(tok):
    with make_client(tok, "Let me check." + CALL) as c:
        rtools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
        full, events = _both(c, {"input": "Weather in Oslo?", "tools": rtools, "max_output_tokens": 400,
                                 "reasoning": {"effort": "low"}}, "/v1/responses")
        fc = [o for o in full["output"] if o["type"] == "function_call"]
        assert len(fc) == 1 and fc[0]["name"] == "get_weather"
        assert json.loads(fc[0]["arguments"]) == {"city": "Oslo", "days": 2}
        assert events[-1]["type"] == "response.completed"
        sfc = [o for o in events[-1]["response"]["output"] if o["type"] == "function_call"]
        assert [(o["name"], o["arguments"]) for o in sfc] == [(o["name"], o["arguments"]) for o in fc]
        deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
        assert len(deltas) > 1 and json.loads("".join(deltas)) == {"city": "Oslo", "days": 2}
        atools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
        full, events = _both(c, {"messages": [{"role": "user", "content": "Weather?"}], "tools": atools,
                                 "max_tokens": 400, "thinking": {"type": "disabled"}}, "/v1/messages")
        (use,) = [b for b in full["content"] if b["type"] == "tool_use"]
        assert use["name"] == "get_weather" and use["input"] == {"city": "Oslo", "days": 2}
        assert full["stop_reason"] == "tool_use"
        parts = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"
                 and e["delta"]["type"] == "input_json_delta"]
        assert json.loads("".join(parts)) == {"city": "Oslo", "days": 2}
        assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"


def test_logprobs_and_usage(full_tok, tiny_tok):
    with make_client(tiny_tok, "abc") as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "logprobs": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    with make_client(full_tok, "abc def") as c:
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "logprobs": True,
                "top_logprobs": 1, **NO_THINK}
        full, chunks = _both(c, body)
    assert full["choices"][0]["finish_reason"] == "length" and full["usage"]["completion_tokens"] == 3
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    lps = [t for ch in chunks if ch["choices"] and ch["choices"][0]["logprobs"]
           for t in ch["choices"][0]["logprobs"]["content"]]
    assert lps == full["choices"][0]["logprobs"]["content"] and len(lps) == 3
    assert all(t["logprob"] == -0.5 for t in lps)


def test_errors_in_each_api_shape(tok):
    with make_client(tok, "abc") as c:
        r = c.post("/v1/messages", json={"model": "nope", "messages": [], "max_tokens": 5})
        assert r.status_code == 404 and r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "not_found_error"
        r = c.post("/v1/messages", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 5,
                                         "temperature": 7})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = c.post("/v1/responses", json={"input": "x", "temperature": 7})
        assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                 "presence_penalty": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "presence_penalty"


class FlakyEngine(ScriptedEngine):
    """Fails its next step once armed."""
    fail_next = False

    def step(self):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated device error")
        return super().step()


def test_failed_step_fails_its_requests_and_server_goes_on(tiny_tok):
    tok = tiny_tok
    script = tok.encode("abc def ghi", add_special_tokens=False)
    eng = FlakyEngine(script, eos=1)
    llm = SimpleNamespace(engine=eng, tokenizer=tok,
                          args=SimpleNamespace(max_seq_len=4096, eos_token_id=1, vocab_size=tok.vocab_size))
    with TestClient(build_app(llm, ServerArgs(model_name="scripted"))) as c:
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5, **NO_THINK}
        eng.fail_next = True
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 503 and "simulated device error" in r.json()["error"]["message"]
        eng.fail_next = True
        with c.stream("POST", "/v1/chat/completions", json=dict(body, stream=True)) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        assert "simulated device error" in events[-1]["error"]["message"]
        assert c.get("/health").status_code == 200
        ok = c.post("/v1/chat/completions", json=body)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
        assert "dayzero:num_requests_in_flight{model_name=\"scripted\"} 0" in c.get("/metrics").text


def test_stop_sequences_end_the_reply(tok):
    """The library cuts at a stop sequence; the tokens the engine still sends are not part of the reply
    (and the request is aborted)."""
    with make_client(tok, "abc def ghi jkl") as c:
        body = {"messages": [{"role": "user", "content": "x"}], "stop": ["ghi"], "max_tokens": 50, **NO_THINK}
        full, chunks = _both(c, body)
        assert full["choices"][0]["message"]["content"] == "abc def "
        assert full["choices"][0]["finish_reason"] == "stop"
        assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"]) == "abc def "
        m = c.post("/v1/messages", json={"messages": [{"role": "user", "content": "x"}], "stop_sequences": ["ghi"],
                                         "max_tokens": 50, **NO_THINK}).json()
        assert m["content"][0]["text"] == "abc def " and m["stop_reason"] == "stop_sequence"
        assert m["stop_sequence"] == "ghi"
