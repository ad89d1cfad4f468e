"""Issue 20's first reproduction: 32 concurrent streamed chat requests against `dayzero serve` with
the built-in model and every default (official numerics, FP8 weights, the native CPU table) give
exactly the text and logprobs of the same requests sent one at a time."""
from __future__ import annotations

import concurrent.futures as cf

import pytest

from tests.server.conftest import ServerProcess

QUESTIONS = ["Who art thou?", "Tell me of the king.", "What news from France?", "Speak of love.",
             "Where is the duke?", "Why weep you so?"]


@pytest.fixture(scope="module")
def builtin_server():
    s = ServerProcess(None, name="shakespeare")
    yield s
    s.stop()


def _chat(client, question: str, stream: bool):
    kw = dict(model="shakespeare", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=20)
    if not stream:
        return client.chat.completions.create(**kw).choices[0].message.content
    return "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(stream=True, **kw)
                   if ch.choices)


def _complete(client, prompt: str, stream: bool):
    kw = dict(model="shakespeare", prompt=prompt, temperature=0, max_tokens=20, logprobs=2)
    if not stream:
        c = client.completions.create(**kw).choices[0]
        return c.text, c.logprobs.token_logprobs
    text, lps = [], []
    for ch in client.completions.create(stream=True, **kw):
        if ch.choices:
            text.append(ch.choices[0].text)
            lps += ch.choices[0].logprobs.token_logprobs if ch.choices[0].logprobs else []
    return "".join(text), lps


def test_concurrent_chats_match_one_at_a_time_in_official_numerics(builtin_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=builtin_server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    alone = {q: _chat(client, q, stream=True) for q in QUESTIONS}
    crowd = [QUESTIONS[i % len(QUESTIONS)] for i in range(32)]
    with cf.ThreadPoolExecutor(32) as ex:
        got = list(ex.map(lambda q: _chat(client, q, stream=True), crowd))
    assert got == [alone[q] for q in crowd]
    prompts = [f"KING HENRY:\n{q}\n" for q in QUESTIONS]
    want = {p: _complete(client, p, stream=False) for p in prompts}
    with cf.ThreadPoolExecutor(24) as ex:
        batched = list(ex.map(lambda p: _complete(client, p, stream=True), prompts * 4))
    assert batched == [want[p] for p in prompts * 4]  # logprobs too, bit for bit
