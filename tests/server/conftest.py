"""Real `dayzero serve` processes on loopback, for the server tests."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

CONTEXT = 1024  # --max-model-len of the test servers
# flags every test server gets on top of its own: DAYZERO_TEST_SERVE_ARGS="--tensor-parallel-size 2"
# runs the whole server suite against two-rank servers (docs/SCALING.md); empty in CI
SERVE_ARGS = os.environ.get("DAYZERO_TEST_SERVE_ARGS", "").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir, *extra: str, name: str = "toy"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("DAYZERO_API_KEY", None)
        model = [] if model_dir is None else ["--model", str(model_dir)]  # None: the built-in model
        cmd = [sys.executable, "-m", "dayzero", "serve", *model, "--host", "127.0.0.1",
               "--port", str(self.port), "--served-model-name", name, "--max-model-len", str(CONTEXT),
               "--max-num-seqs", "8", "--kv-cache-memory-bytes", str(64 * 2**20), *extra,
               *SERVE_ARGS]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become healthy in 90 s")

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        out = {}
        for line in text.splitlines():
            m = re.match(r"^(dayzero:[a-z_]+)\{[^}]*\} (\S+)$", line)
            if m and m.group(1) not in out:
                out[m.group(1)] = float(m.group(2))
        return out

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["dayzero:num_requests_running"] == 0 and m["dayzero:num_requests_waiting"] == 0
                    and m["dayzero:kv_cache_usage_perc"] == 0 and m["dayzero:num_requests_in_flight"] == 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="session")
def toy_dir(make_ckpt):
    return make_ckpt("flash", "fp32", tokenizer=True)


@pytest.fixture(scope="session")
def server(toy_dir):
    s = ServerProcess(toy_dir)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def recipe_tokenizer(path) -> None:
    """A tiny byte-level BPE at `path` that holds every special token deepseek-recipe's encodings
    spell, as a real V4 / V4.1 tokenizer does, so the library's own `encode` applies to it."""
    import deepseek_recipe as dr
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    names = [n for n in dir(dr.SpecialToken) if n[:1].isupper()]
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"]
    specials += [getattr(dr.SpecialToken, n).default_str() for n in names]
    specials = list(dict.fromkeys(specials))
    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Hello, how are you? The weather in Oslo is sunny. Be brief.", "tool_calls invoke parameter"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))


@pytest.fixture(scope="session")
def full_tok(tmp_path_factory):
    pytest.importorskip("deepseek_recipe")
    from dayzero.tokenizer import Tokenizer

    p = tmp_path_factory.mktemp("fulltok") / "tokenizer.json"
    recipe_tokenizer(p)
    return Tokenizer(p)
