"""Disconnects free their requests, limits answer 429/413/401, SIGTERM drains in-flight requests."""
from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import threading
import time

import httpx
import pytest

from tests.server.conftest import ServerProcess


def _open_stream(url: str, body: dict, chunks: int, headers=None) -> int:
    """Start a streaming request, read `chunks` SSE events, hang up. Returns the events read."""
    got = 0
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", url, json=body, headers=headers) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got += 1
                    if got >= chunks:
                        break
    return got


def test_stream_hangups_free_everything(server):
    n = 20
    bodies = [({"prompt": f"The quick brown fox {i}", "max_tokens": 200, "stream": True}, "/v1/completions")
              if i % 2 else
              ({"messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 200, "stream": True},
               "/v1/chat/completions") for i in range(n)]
    with cf.ThreadPoolExecutor(n) as ex:
        got = list(ex.map(lambda b: _open_stream(server.url + b[1], b[0], 2), bodies))
    assert got == [2] * n
    m = server.wait_idle(timeout=15)
    assert m["dayzero:num_requests_running"] == 0
    assert m["dayzero:num_requests_waiting"] == 0
    assert m["dayzero:kv_cache_usage_perc"] == 0
    assert m["dayzero:num_requests_in_flight"] == 0
    assert httpx.get(server.url + "/health").status_code == 200


def test_nonstream_hangup_aborts(server):
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 240, "ignore_eos": True},
                   timeout=0.5)
    m = server.wait_idle(timeout=10)
    assert m["dayzero:num_requests_running"] == 0 and m["dayzero:kv_cache_usage_perc"] == 0
    assert m["dayzero:num_requests_in_flight"] == 0


@pytest.fixture(scope="module")
def limited(toy_dir):
    s = ServerProcess(toy_dir, "--api-key", "sekret", "--max-in-flight", "2", "--max-body-bytes", "4096")
    yield s
    s.stop()


def test_api_key(limited):
    import openai

    bad = openai.OpenAI(base_url=limited.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.post(limited.url + "/v1/completions", json={"prompt": "hi"}).status_code == 401
    good = openai.OpenAI(base_url=limited.url + "/v1", api_key="sekret", max_retries=0)
    assert good.completions.create(model="toy", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    assert httpx.get(limited.url + "/health").status_code == 200  # health and metrics stay open
    assert httpx.get(limited.url + "/metrics").status_code == 200


def test_body_too_large(limited):
    r = httpx.post(limited.url + "/v1/completions", json={"prompt": "x" * 10000},
                   headers={"Authorization": "Bearer sekret"})
    assert r.status_code == 413 and r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted while reading
        for _ in range(10):
            yield b" " * 1000
    r = httpx.post(limited.url + "/v1/completions", content=chunks(), headers={"Authorization": "Bearer sekret"})
    assert r.status_code == 413


def test_in_flight_limit_answers_429(limited):
    import openai

    auth = {"Authorization": "Bearer sekret"}
    started = threading.Barrier(3, timeout=60)
    release = threading.Event()

    def hold():
        with httpx.Client(timeout=60) as c, c.stream("POST", limited.url + "/v1/completions", headers=auth, json={
                "prompt": "hold", "max_tokens": 240, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            it = r.iter_lines()
            next(it)
            started.wait()
            release.wait(60)

    with cf.ThreadPoolExecutor(2) as ex:
        futs = [ex.submit(hold) for _ in range(2)]
        started.wait()
        client = openai.OpenAI(base_url=limited.url + "/v1", api_key="sekret", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="toy", prompt="one more", max_tokens=2)
        release.set()
        for f in futs:
            f.result()
    m = limited.wait_idle()
    assert m["dayzero:num_requests_in_flight"] == 0 and m["dayzero:num_requests_running"] == 0
    assert client.completions.create(model="toy", prompt="now", max_tokens=2).usage.completion_tokens >= 1


def test_sigterm_drains_in_flight(toy_dir):
    s = ServerProcess(toy_dir)
    try:
        n, max_tokens = 4, 40
        first = threading.Barrier(n + 1, timeout=60)

        def run(i):
            text, reason, events = [], None, 0
            with httpx.Client(timeout=120) as c, c.stream("POST", s.url + "/v1/completions", json={
                    "prompt": f"drain {i}", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                    "temperature": 0, "stream_options": {"include_usage": True}}) as r:
                usage = None
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    obj = json.loads(line[6:])
                    events += 1
                    if events == 1:
                        first.wait()
                    if obj["choices"]:
                        text.append(obj["choices"][0]["text"])
                        reason = obj["choices"][0]["finish_reason"] or reason
                    if obj.get("usage"):
                        usage = obj["usage"]
            return reason, usage["completion_tokens"]

        with cf.ThreadPoolExecutor(n) as ex:
            futs = [ex.submit(run, i) for i in range(n)]
            first.wait()
            s.terminate()
            results = [f.result() for f in futs]
        assert results == [("length", max_tokens)] * n
        assert s.proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health", timeout=2)
    finally:
        s.stop()
        if s.proc.poll() is None:
            s.proc.kill()
        try:
            s.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0)
