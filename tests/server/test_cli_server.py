"""`dayzero serve` argument handling and the `dayzero chat` terminal client."""
from __future__ import annotations

import os
import subprocess
import sys

ENV = dict(os.environ, OMP_NUM_THREADS="1")
NO_THINK = {"thinking": {"type": "disabled"}}  # what `dayzero chat` sends without --thinking


def readme_block(first_line: str) -> str:
    """The README's ```python block that starts with `first_line`."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for block in text.split("```python\n")[1:]:
        if block.startswith(first_line):
            return block.split("```", 1)[0]
    raise AssertionError(f"no README python block starts with {first_line!r}")


def test_readme_python_api_example_runs():
    code = readme_block("from dayzero import LLM, SamplingParams")
    r = subprocess.run([sys.executable, "-c", code + "\nprint(outs[0].text)"], capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_serve_without_model_serves_the_builtin_model(tmp_path):
    from tests.server.conftest import ServerProcess

    s = ServerProcess(None, name="shakespeare")  # the name the built-in model is served under by default
    try:
        import json
        import urllib.request

        with urllib.request.urlopen(s.url + "/v1/models", timeout=30) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == ["shakespeare"]
        # chat without max_tokens: a short reply (256 tokens at most), not the rest of the context
        # (a newcomer's chat ran 4,087 tokens); no reasoning by default on this plain-text model
        body = json.dumps({"messages": [{"role": "user", "content": "KING LEAR:"}], "seed": 0}).encode()
        req = urllib.request.Request(s.url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
        assert 0 < out["usage"]["completion_tokens"] <= 256
        assert out["choices"][0]["message"].get("reasoning_content") is None
        # the README's client example runs as written (on this server's port)
        code = readme_block("from openai import OpenAI").replace("http://127.0.0.1:8000", s.url)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
        assert r.returncode == 0 and r.stdout.strip(), r.stderr
    finally:
        s.stop()


def test_chat_client_talks_to_server(server, client):
    want = client.chat.completions.create(model="toy", messages=[{"role": "user", "content": "hello there"}],
                                          max_tokens=8, temperature=0,
                                          extra_body=NO_THINK).choices[0].message.content
    r = subprocess.run([sys.executable, "-m", "dayzero", "chat", "--url", server.url, "--max-tokens", "8",
                        "--temperature", "0"],
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
    r = subprocess.run([sys.executable, "-m", "dayzero", "chat", "--local", str(toy_dir), "--max-tokens", "8",
                        "--temperature", "0"],
                       input="hello there\n/exit\n", capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    # named as `serve` would name it (was 'local')
    assert repr(toy_dir.name) in r.stderr and want.strip() in r.stdout
