"""`dayzero serve` argument handling and the `dayzero chat` terminal client."""
from __future__ import annotations

import os
import subprocess
import sys

ENV = dict(os.environ, OMP_NUM_THREADS="1")
NO_THINK = {"thinking": {"type": "disabled"}}  # what `dayzero chat` sends without --thinking


def test_serve_without_model_serves_the_builtin_model(tmp_path):
    from tests.server.conftest import ServerProcess

    s = ServerProcess(None, name="shakespeare")  # the name the built-in model is served under by default
    try:
        import json
        import urllib.request

        with urllib.request.urlopen(s.url + "/v1/models", timeout=30) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == ["shakespeare"]
    finally:
        s.stop()


def test_chat_client_talks_to_server(server, client):
    want = client.chat.completions.create(model="toy", messages=[{"role": "user", "content": "hello there"}],
                                          max_tokens=8, temperature=0,
                                          extra_body=NO_THINK).choices[0].message.content
    r = subprocess.run([sys.executable, "-m", "dayzero", "chat", "--url", server.url, "--max-tokens", "8", "--temperature", "0"],
                       input="hello there\n/reset\n/exit\n", capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "toy" in r.stderr
    assert want.strip() and want.strip() in r.stdout


def test_chat_client_reports_unreachable_server():
    r = subprocess.run([sys.executable, "-m", "dayzero", "chat", "--url", "http://127.0.0.1:9", "--timeout", "5"],
                       input="", capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 1 and "cannot reach" in r.stderr


def test_chat_runs_a_local_model_in_process(toy_dir, server, client):
    want = client.chat.completions.create(model="toy", messages=[{"role": "user", "content": "hello there"}],
                                          max_tokens=8, temperature=0,
                                          extra_body=NO_THINK).choices[0].message.content
    r = subprocess.run([sys.executable, "-m", "dayzero", "chat", "--local", str(toy_dir), "--max-tokens", "8", "--temperature", "0"],
                       input="hello there\n/exit\n", capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    # named as `serve` would name it (was 'local')
    assert repr(toy_dir.name) in r.stderr and want.strip() in r.stdout
