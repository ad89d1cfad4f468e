"""The OpenAI endpoints through the real `openai` client against a real server process."""
from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

PROMPTS = ["The quick brown fox", "A faithful model computes", "Sliding windows decide", "Experts are routed"]


def _complete(client, prompt, **kw):
    r = client.completions.create(model="toy", prompt=prompt, temperature=0, **kw)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage


def _stream(client, prompt, **kw):
    text, reason, usage = [], None, None
    for ch in client.completions.create(model="toy", prompt=prompt, temperature=0, stream=True,
                                        stream_options={"include_usage": True}, **kw):
        if ch.choices:
            text.append(ch.choices[0].text)
            reason = ch.choices[0].finish_reason or reason
        if ch.usage is not None:
            usage = ch.usage
    return "".join(text), reason, usage


def _chat(client, content, stream=False, **kw):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
    if not stream:
        r = client.chat.completions.create(model="toy", messages=msgs, temperature=0, **kw)
        m = r.choices[0].message
        return m.content or "", getattr(m, "reasoning_content", None) or "", r.choices[0].finish_reason
    content, reasoning, reason = [], [], None
    for ch in client.chat.completions.create(model="toy", messages=msgs, temperature=0, stream=True, **kw):
        d = ch.choices[0].delta
        content.append(d.content or "")
        reasoning.append(getattr(d, "reasoning_content", None) or "")
        reason = ch.choices[0].finish_reason or reason
    return "".join(content), "".join(reasoning), reason


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == ["toy"]
    assert client.models.retrieve("toy").id == "toy"


def test_completion_shape_and_usage(client):
    r = client.completions.create(model="toy", prompt="The quick brown fox", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_equals_nonstream_completion(client):
    for p in PROMPTS[:2]:
        a = _complete(client, p, max_tokens=24)
        b = _stream(client, p, max_tokens=24)
        assert a[0] == b[0] and a[1] == b[1]
        assert a[2].completion_tokens == b[2].completion_tokens and a[2].prompt_tokens == b[2].prompt_tokens


def test_stream_equals_nonstream_chat(client):
    for thinking in (False, True):
        # thinking mode samples at temperature 1 whatever is asked (deepseek-recipe): seeded
        extra = {"extra_body": {"thinking": {"type": "enabled" if thinking else "disabled"}, "seed": 3}}
        a = _chat(client, "Say hello", max_tokens=20, **extra)
        b = _chat(client, "Say hello", stream=True, max_tokens=20, **extra)
        assert a == b
        if not thinking:
            assert a[1] == ""


def test_token_id_prompt_matches_text_prompt(toy_dir, client):
    from dayzero.tokenizer import Tokenizer

    ids = Tokenizer(toy_dir / "tokenizer.json").encode("Experts are routed")
    a = client.completions.create(model="toy", prompt=ids, max_tokens=8, temperature=0)
    b = client.completions.create(model="toy", prompt="Experts are routed", max_tokens=8, temperature=0)
    assert a.choices[0].text == b.choices[0].text and a.usage.prompt_tokens == len(ids) == b.usage.prompt_tokens


def test_logprobs_completion_and_chat(client):
    r = client.completions.create(model="toy", prompt="The quick", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) <= 3 and abs(max(top.values()) - chosen) < 1e-5  # greedy: chosen is top
    # chat logprobs need a tokenizer with DeepSeek's special tokens (test_chat_scripted.py); the toy's has none
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="toy", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    assert e.value.body["param"] == "logprobs"


def test_seed_reproducible_and_stop(client):
    kw = dict(model="toy", prompt="A faithful model computes", max_tokens=16, temperature=1.0, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b
    full = _complete(client, "Sliding windows decide", max_tokens=24)[0]
    stop = full[5:8]
    assert stop and full.index(stop) >= 1
    want = full[:full.index(stop)]
    text, reason, _ = _complete(client, "Sliding windows decide", max_tokens=24, stop=[stop])
    assert (text, reason) == (want, "stop")
    text, reason, _ = _stream(client, "Sliding windows decide", max_tokens=24, stop=[stop])
    assert (text, reason) == (want, "stop")


def test_concurrent_streams_match_sequential(server, client):
    n = 32
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    want = {p: _complete(client, p, max_tokens=16)[0] for p in PROMPTS}
    with cf.ThreadPoolExecutor(n) as ex:
        got = list(ex.map(lambda p: _stream(client, p, max_tokens=16), prompts))
    assert [g[0] for g in got] == [want[p] for p in prompts]
    assert all(g[1] in ("length", "stop") for g in got)
    m = server.wait_idle()
    assert m["dayzero:num_requests_running"] == 0 and m["dayzero:kv_cache_usage_perc"] == 0


def test_metrics_exposition(server, client):
    _complete(client, "The quick", max_tokens=4)
    text = httpx.get(server.url + "/metrics").text
    for name in ("dayzero:num_requests_running", "dayzero:num_requests_waiting", "dayzero:kv_cache_usage_perc",
                 "dayzero:prompt_tokens_total", "dayzero:generation_tokens_total",
                 "dayzero:time_to_first_token_seconds_bucket", "dayzero:time_per_output_token_seconds_count",
                 "dayzero:request_success_total", "dayzero:spec_decode_num_draft_tokens_total",
                 "dayzero:spec_decode_acceptance_rate", "dayzero:spec_decode_mean_accepted_length",
                 "dayzero:spec_decode_mean_draft_length"):
        assert name in text, name
    m = server.metrics()
    assert m["dayzero:generation_tokens_total"] >= 4 and m["dayzero:time_to_first_token_seconds_count"] >= 1
