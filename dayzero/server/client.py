"""`dayzero chat`: a terminal chat client for a running `dayzero serve`, or, with --local, for the
same server started inside this process on a free loopback port.

Streams /v1/chat/completions, keeps the conversation, prints reasoning dimmed when thinking is on.
Commands: /reset clears the conversation, /exit (or Ctrl-D) leaves.
"""
from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request


def add_arguments(p) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="bearer token (also read from DAYZERO_API_KEY)")
    p.add_argument("--model", default=None, help="model id (default: the server's first model)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--thinking", action="store_true", help="thinking mode: the model reasons before answering "
                                                           "(DeepSeek checkpoints; default: off)")
    p.add_argument("--reasoning-effort", choices=["low", "high", "xhigh", "max"], default=None,
                   help="thinking effort (implies --thinking), as deepseek-recipe renders it")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="reply length limit (default: the server's; 256 for the built-in model)")
    p.add_argument("--temperature", type=float, default=None,
                   help="default: the server's (the built-in model: 0.8 with top-p 0.95, docs/BUILTIN.md)")
    p.add_argument("--top-p", type=float, default=None, help="default: the server's")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a reply")
    p.add_argument("--local", nargs="?", const="", default=None, metavar="DIR",
                   help="run the model in this process instead of connecting to --url: DIR, or the "
                        "built-in model when DIR is left out")


def start_local(model_dir: str) -> str:
    """Serve `model_dir` (or the built-in model) from a background thread; return its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    from pathlib import Path

    from dayzero import LLM
    from dayzero.builtin import BUILTIN_NAME, BUILTIN_NAMES, builtin_path
    from dayzero.engine.llm import resolve_model
    from dayzero.server.app import ServerArgs, build_app

    llm = LLM(model_dir or None)
    path = resolve_model(model_dir or None).resolve()
    builtin = path in {builtin_path(n).resolve() for n in BUILTIN_NAMES}
    name = BUILTIN_NAME if not model_dir else Path(model_dir).resolve().name  # what `serve` would call it
    app = build_app(llm, ServerArgs(model_name=name, model_dir=str(path), builtin=builtin))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", http="h11"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


class ChatClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def _open(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=self.headers,
                                     method="GET" if body is None else "POST")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read())["error"]["message"]
            except Exception:  # noqa: BLE001 - not our error shape
                msg = e.reason
            raise RuntimeError(f"HTTP {e.code}: {msg}") from None
        except urllib.error.URLError as e:
            raise RuntimeError(f"cannot reach {self.url}: {e.reason}") from None

    def models(self) -> list[str]:
        with self._open("/v1/models") as r:
            return [m["id"] for m in json.loads(r.read())["data"]]

    def stream(self, body: dict):
        """Yield (kind, text) with kind 'reasoning' or 'content'; the last item is ('finish', reason)."""
        with self._open("/v1/chat/completions", dict(body, stream=True)) as r:
            for raw in r:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return
                obj = json.loads(data)
                if "error" in obj:
                    raise RuntimeError(obj["error"]["message"])
                for ch in obj.get("choices", []):
                    d = ch.get("delta", {})
                    if d.get("reasoning_content"):
                        yield "reasoning", d["reasoning_content"]
                    if d.get("content"):
                        yield "content", d["content"]
                    for tc in d.get("tool_calls") or []:  # argument fragments after a first one with the name
                        fn = tc.get("function") or {}
                        if fn.get("name"):
                            yield "content", f"\n[tool call {fn['name']}: "
                        if fn.get("arguments"):
                            yield "content", fn["arguments"]
                    if ch.get("finish_reason"):
                        yield "finish", ch["finish_reason"]


def chat_main(a) -> int:
    if a.local is not None:
        try:
            a.url = start_local(a.local)
        except ValueError as e:  # a bad DIR: an input error, as every command reports them
            print(f"dayzero chat: error: {e}", file=sys.stderr)
            return 2
        except RuntimeError as e:
            print(f"dayzero chat: {e}", file=sys.stderr)
            return 1
    client = ChatClient(a.url, a.api_key or os.environ.get("DAYZERO_API_KEY"), a.timeout)
    try:
        model = a.model or client.models()[0]
    except RuntimeError as e:
        print(f"dayzero chat: {e}", file=sys.stderr)
        return 1
    dim, reset = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
    history: list[dict] = [{"role": "system", "content": a.system}] if a.system else []
    print(f"dayzero chat with {model!r} at {a.url}  (/reset, /exit)", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if a.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        body = {"model": model, "messages": history,
                "thinking": {"type": "enabled" if a.thinking or a.reasoning_effort else "disabled"}}
        for key in ("max_tokens", "temperature", "top_p", "seed"):
            if getattr(a, key) is not None:
                body[key] = getattr(a, key)
        if a.reasoning_effort:
            body["reasoning_effort"] = a.reasoning_effort
        answer, kind = [], None
        try:
            for kind_, text in client.stream(body):
                if kind_ == "finish":
                    if text == "tool_calls":
                        print("]", end="")
                    if text == "length":
                        print(f"\n{dim}[stopped at --max-tokens]{reset}", end="")
                    continue
                if kind_ != kind and kind == "reasoning":
                    print()
                kind = kind_
                if kind_ == "reasoning":
                    print(f"{dim}{text}{reset}", end="", flush=True)
                else:
                    answer.append(text)
                    print(text, end="", flush=True)
        except KeyboardInterrupt:
            print(f"\n{dim}[interrupted]{reset}", end="")
        except RuntimeError as e:
            print(f"\ndayzero chat: {e}", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": "".join(answer)})
