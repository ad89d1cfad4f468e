"""Load benchmark of `dayzero serve` (not a test): N concurrent streaming clients for a fixed time.

Each client sends streaming /v1/completions requests back to back (ignore_eos, so every request
generates --max-tokens) and records time to first token, time per output token after the first,
and end-to-end latency. Prints percentiles and throughput; appends a JSON line to
bench/results/server_load.jsonl.

--noisy adds the "noisy neighbour" run: a quiet phase (the streaming clients plus one client polling
/health every 50 ms) and then a noisy phase of the same length in which one more client posts
--noisy-bytes JSON bodies (a prompt of that many characters) back to back. It records /health
latency and the streaming clients' TTFT percentiles of both phases, and what the noisy client got.

    python -m bench.server_load --model toy-model --clients 8 --duration 20     # starts a server
    python -m bench.server_load --url http://127.0.0.1:8000 --clients 32        # uses a running one
    python -m bench.server_load --model toy-model --clients 4 --duration 15 --noisy
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx

from bench.common import append, environment

WORDS = ("the quick brown fox jumps over a lazy dog while sliding windows compress entries and experts "
         "route tokens by hash or by learned gates").split()


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def client_loop(c: httpx.AsyncClient, url: str, model: str, i: int, args, stop_at: float, out: list) -> None:
    k = 0
    while time.monotonic() < stop_at:
        words = [WORDS[(i * 7 + k * 3 + j) % len(WORDS)] for j in range(args.prompt_words)]
        body = {"model": model, "prompt": f"{i}.{k} " + " ".join(words), "max_tokens": args.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        k += 1
        t0 = time.monotonic()
        first = None
        n_out = 0
        async with c.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.append({"status": r.status_code})
                await r.aread()
                await asyncio.sleep(0.05)
                continue
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if obj.get("choices") and first is None:
                    first = time.monotonic()
                if obj.get("usage"):
                    n_out = obj["usage"]["completion_tokens"]
        t1 = time.monotonic()
        out.append({"status": 200, "ttft": first - t0 if first else None, "e2e": t1 - t0, "tokens": n_out,
                    "tpot": (t1 - first) / (n_out - 1) if first and n_out > 1 else None, "end": t1})


async def health_loop(c: httpx.AsyncClient, url: str, stop_at: float, out: list) -> None:
    """GET /health every 50 ms; each latency in seconds (a failed probe counts as its time to fail)."""
    while time.monotonic() < stop_at:
        t0 = time.monotonic()
        try:
            await c.get(url + "/health")
        except httpx.HTTPError:
            pass
        out.append(time.monotonic() - t0)
        await asyncio.sleep(max(0.0, 0.05 - (time.monotonic() - t0)))


async def noisy_loop(c: httpx.AsyncClient, url: str, model: str, nbytes: int, stop_at: float, out: list) -> None:
    """Post a body with a prompt of `nbytes` characters, back to back (status and seconds of each)."""
    words = " ".join(WORDS)
    prompt = (words + " ") * (nbytes // (len(words) + 1) + 1)
    body = json.dumps({"model": model, "prompt": prompt[:nbytes], "max_tokens": 1}).encode()
    while time.monotonic() < stop_at:
        t0 = time.monotonic()
        r = await c.post(url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
        out.append({"status": r.status_code, "s": time.monotonic() - t0, "bytes": len(body)})


async def run(url: str, model: str, args, nbytes: int = 0) -> dict:
    """One phase: the streaming clients for --duration seconds; with --noisy also a /health poller,
    and with nbytes > 0 the noisy client."""
    results: list[dict] = []
    health: list[float] = []
    noisy: list[dict] = []
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=args.duration + 300, limits=limits,
                                 headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else None) as c:
        t0 = time.monotonic()
        stop_at = t0 + args.duration
        jobs = [client_loop(c, url, model, i, args, stop_at, results) for i in range(args.clients)]
        if args.noisy:
            jobs.append(health_loop(c, url, stop_at, health))
        if nbytes:
            jobs.append(noisy_loop(c, url, model, nbytes, stop_at, noisy))
        await asyncio.gather(*jobs)
        elapsed = time.monotonic() - t0
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    e2e = [r["e2e"] for r in ok]
    toks = sum(r["tokens"] for r in ok)
    summary = {"scenario": f"server load, {args.clients} streaming clients", "clients": args.clients,
               "duration_s": args.duration, "elapsed_s": elapsed, "max_tokens": args.max_tokens,
               "prompt_words": args.prompt_words, "requests_ok": len(ok), "requests_rejected": len(results) - len(ok),
               "output_tokens": toks, "output_tokens_per_s": toks / elapsed, "requests_per_s": len(ok) / elapsed}
    for name, xs in (("ttft_s", ttft), ("tpot_s", tpot), ("e2e_s", e2e)):
        for p in (50, 90, 99):
            summary[f"{name}_p{p}"] = pct(xs, p)
    if args.noisy:
        summary["scenario"] = (f"noisy neighbour: {args.clients} streaming clients + /health poller"
                               + (f" + 1 client posting {nbytes}-character prompts" if nbytes else " (quiet)"))
        summary["ttft_s_max"] = max(ttft, default=None)
        summary["health_probes"] = len(health)
        for p in (50, 90, 99):
            summary[f"health_s_p{p}"] = pct(health, p)
        summary["health_s_max"] = max(health, default=None)
    if nbytes:
        statuses: dict[str, int] = {}
        for r in noisy:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        summary.update(noisy_prompt_chars=nbytes, noisy_body_bytes=noisy[0]["bytes"] if noisy else None,
                       noisy_requests=len(noisy), noisy_statuses=statuses,
                       noisy_s_p50=pct([r["s"] for r in noisy], 50))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running server; without it --model starts one")
    ap.add_argument("--model", default=None, help="checkpoint directory to serve on a free loopback port")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load (requests in flight then finish)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--serve-args", default="", help="extra `dayzero serve` arguments when --model is given")
    ap.add_argument("--noisy", action="store_true",
                    help="noisy-neighbour run: a quiet phase, then a phase with one client posting big bodies; "
                         "/health latency and TTFT percentiles of both")
    ap.add_argument("--noisy-bytes", type=int, default=2_000_000,
                    help="prompt characters of the noisy client's bodies (default 2,000,000: a ~2 MB body)")
    ap.add_argument("--label", default=None, help="a note stored with the record (e.g. before/after)")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to bench/results")
    args = ap.parse_args(argv)
    if (args.url is None) == (args.model is None):
        ap.error("give exactly one of --url or --model")
    proc = None
    url = args.url
    try:
        if args.model:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            url = f"http://127.0.0.1:{port}"
            proc = subprocess.Popen([sys.executable, "-m", "dayzero", "serve", "--model", args.model, "--port",
                                     str(port), *args.serve_args.split()], env=dict(os.environ))
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("server did not start")
                time.sleep(0.3)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
        model = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
        phases = [0, args.noisy_bytes] if args.noisy else [0]
        records = []
        for nbytes in phases:
            summary = asyncio.run(run(url, model, args, nbytes))
            summary["model"] = model
            summary["serve_args"] = args.serve_args
            summary["server_omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
            if args.label:
                summary["label"] = args.label
            summary.update(environment())
            print(json.dumps(summary, indent=1))
            records.append(summary)
        if not args.no_record:
            print(f"appended to {append('server_load.jsonl', records)}", file=sys.stderr)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
