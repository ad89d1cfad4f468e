"""Chat responses end to end in-process, with a scripted engine that "generates" a fixed text, so the
reasoning / content / tool_calls mapping is exercised on outputs a random-weight model never writes."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from dayzero.server.chat import encode_tool_calls

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
def tok(tmp_path_factory):
    from dayzero.testing import tiny_tokenizer
    from dayzero.tokenizer import Tokenizer

    p = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tiny_tokenizer(p)
    return Tokenizer(p)


def make_client(tok, output: str) -> TestClient:
    script = tok.encode(output, add_special_tokens=False)
    llm = SimpleNamespace(engine=ScriptedEngine(script, eos=1), tokenizer=tok,
                          args=SimpleNamespace(max_seq_len=4096, eos_token_id=1, vocab_size=tok.vocab_size))
    return TestClient(build_app(llm, ServerArgs(model_name="scripted")))


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALL = encode_tool_calls([{"function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo", "days": 2})}}])


def _both(c: TestClient, body: dict, **stream_extra):
    full = c.post("/v1/chat/completions", json=body)
    assert full.status_code == 200, full.text
    chunks = []
    with c.stream("POST", "/v1/chat/completions", json=dict(body, stream=True, **stream_extra)) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return full.json(), chunks


def test_reasoning_and_content(tok):
    with make_client(tok, "The fox is quick.</think>It jumps.") as c:
        body = {"messages": [{"role": "user", "content": "Why?"}], "max_tokens": 200, "thinking": True}
        full, chunks = _both(c, body)
    msg = full["choices"][0]
    assert msg["message"] == {"role": "assistant", "content": "It jumps.", "reasoning_content": "The fox is quick."}
    assert msg["finish_reason"] == "stop"
    deltas = [ch["choices"][0]["delta"] for ch in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "The fox is quick."
    assert "".join(d.get("content", "") for d in deltas) == "It jumps."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(ch["object"] == "chat.completion.chunk" and ch["id"] == chunks[0]["id"] for ch in chunks)


def test_tool_calls(tok):
    with make_client(tok, "Let me check." + CALL) as c:
        body = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": TOOLS, "max_tokens": 400}
        full, chunks = _both(c, body)
        # without tools the same output is plain content
        plain = c.post("/v1/chat/completions", json={"messages": body["messages"], "max_tokens": 400}).json()
    choice = full["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo", "days": 2}
    deltas = [ch["choices"][0]["delta"] for ch in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == "Let me check."
    streamed = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert len(streamed) == 1 and streamed[0]["index"] == 0
    assert streamed[0]["function"] == call["function"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert plain["choices"][0]["message"]["content"] == "Let me check." + CALL
    assert plain["choices"][0]["finish_reason"] == "stop"


def test_logprobs_and_usage_in_stream(tok):
    with make_client(tok, "abc def") as c:
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "logprobs": True}
        full, chunks = _both(c, body, stream_options={"include_usage": True})
    assert full["choices"][0]["finish_reason"] == "length" and full["usage"]["completion_tokens"] == 3
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    lps = [t for ch in chunks[:-1] if ch["choices"][0]["logprobs"] for t in ch["choices"][0]["logprobs"]["content"]]
    assert lps == full["choices"][0]["logprobs"]["content"] and len(lps) == 3


class FlakyEngine(ScriptedEngine):
    """Fails its next step once armed."""
    fail_next = False

    def step(self):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated device error")
        return super().step()


def test_failed_step_fails_its_requests_and_server_goes_on(tok):
    script = tok.encode("abc def ghi", add_special_tokens=False)
    eng = FlakyEngine(script, eos=1)
    llm = SimpleNamespace(engine=eng, tokenizer=tok,
                          args=SimpleNamespace(max_seq_len=4096, eos_token_id=1, vocab_size=tok.vocab_size))
    with TestClient(build_app(llm, ServerArgs(model_name="scripted"))) as c:
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
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
