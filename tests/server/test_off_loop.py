"""Per-request CPU work runs off the event loop (issue 24): a request whose tokenization takes a
second leaves /health and other requests answering; prompts that cannot fit are refused before
tokenizing; long streams detokenized in the pool still equal the non-streamed text."""
from __future__ import annotations

import concurrent.futures as cf
import json
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from dayzero.server.app import INLINE_OUTPUT_IDS, LARGE_BODY_BYTES, ServerArgs, build_app  # noqa: E402
from dayzero.tokenizer import Tokenizer  # noqa: E402
from tests.server.test_chat_scripted import ScriptedEngine  # noqa: E402

SLOW = 1.0  # seconds a "big" prompt takes to tokenize
BIG = 70_000  # characters that make a prompt "big" (a body over LARGE_BODY_BYTES)


class SlowTokenizer(Tokenizer):
    """The toy tokenizer, but a big prompt takes SLOW seconds (sleeping, like the Rust tokenizer,
    without the GIL); counts encode calls."""

    calls = 0

    def encode(self, text, add_special_tokens=True):
        type(self).calls += 1
        if len(text) >= BIG:
            time.sleep(SLOW)
        return super().encode(text, add_special_tokens)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from dayzero.testing import tiny_tokenizer

    p = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tiny_tokenizer(p)
    return SlowTokenizer(p)


def client(tok, script_text="abc def", max_seq_len=4096, **sargs) -> TestClient:
    script = Tokenizer.encode(tok, script_text, add_special_tokens=False)
    llm = SimpleNamespace(engine=ScriptedEngine(script, eos=1), tokenizer=tok,
                          args=SimpleNamespace(max_seq_len=max_seq_len, eos_token_id=1, vocab_size=tok.vocab_size))
    return TestClient(build_app(llm, ServerArgs(model_name="scripted", **sargs)))


def test_health_and_small_requests_answer_while_a_big_prompt_tokenizes(tok):
    # context 10**6 tokens: the big prompt passes the size bound and is really tokenized (SLOW s)
    assert BIG > LARGE_BODY_BYTES
    with client(tok, max_seq_len=10**6) as c, cf.ThreadPoolExecutor(4) as ex:
        big = [ex.submit(c.post, "/v1/completions", json={"prompt": "word " * (BIG // 5 + 1), "max_tokens": 1})
               for _ in range(2)]  # two of them: they fill the large lane, not the small one
        time.sleep(0.2)  # both are in the tokenizer now
        t0 = time.monotonic()
        assert c.get("/health").status_code == 200
        health = time.monotonic() - t0
        t0 = time.monotonic()
        small = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
        small_s = time.monotonic() - t0
        assert not any(f.done() for f in big)  # the big prompts were still being tokenized meanwhile
        assert [f.result().status_code for f in big] == [200, 200]
    assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 2
    # on the event loop, each would have waited for a big prompt's tokenization
    assert health < SLOW / 2 and small_s < SLOW / 2, (health, small_s)


def test_prompt_that_cannot_fit_is_refused_before_tokenizing(tok):
    context = 256
    limit = context * tok.max_token_bytes  # at least `context` tokens from this many bytes on
    with client(tok, max_seq_len=context) as c:
        before = SlowTokenizer.calls
        r = c.post("/v1/completions", json={"prompt": "x" * limit})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert f"at least {context} tokens ({limit} bytes of text" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "é" * (limit // 2)}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert SlowTokenizer.calls == before  # neither was tokenized
        # one byte under the bound: tokenized, then refused on its true length
        r = c.post("/v1/completions", json={"prompt": "x" * (limit - tok.max_token_bytes)})
        assert r.status_code == 400 and "the prompt is " in r.json()["error"]["message"]
        assert SlowTokenizer.calls == before + 1


@pytest.mark.parametrize("text", [
    "hello world", "x" * 5000, " " * 3000, "日本語のテキスト" * 200, "emoji 🦊🐕 " * 300,
    "<｜begin▁of▁sentence｜><｜User｜>hi", "\n\n\t" * 1000, "the quick brown fox " * 400,
])
def test_min_tokens_is_a_lower_bound(tok, text):
    at_least, nbytes = tok.min_tokens(text)
    assert nbytes == len(text.encode())
    assert at_least <= len(Tokenizer.encode(tok, text, add_special_tokens=False))


def _stream_text(c, body) -> str:
    out = []
    with c.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(out)


def test_long_stream_detokenized_in_the_pool_equals_the_full_text(tok):
    text = "Ünïcödé fox 🦊 jumps; " * 60
    n = len(Tokenizer.encode(tok, text, add_special_tokens=False))
    assert n > 2 * INLINE_OUTPUT_IDS  # most deltas go through the pool
    with client(tok, script_text=text) as c:
        body = {"prompt": "go", "max_tokens": n + 5}
        full = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert full == text
        assert _stream_text(c, body) == text
