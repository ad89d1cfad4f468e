"""Weights larger than RAM on a CPU: V4-Flash-shaped checkpoints (real per-layer shapes: 256 FP4
experts of 2048 x 4096, FP8 attention) whose routed experts the native CPU kernel reads where the
checkpoint maps them (ops/experts.py) instead of stacking a copy. Records peak resident memory
(anonymous vs file-backed), decode tokens/s and the disk roofline: routed-expert bytes a decoded
token touches / measured sequential read bandwidth of the checkpoint's disk.

    python -m bench.out_of_core write DIR --layers 10      # ~35 GB, written one layer at a time
    python -m bench.out_of_core run DIR [--stacked]         # one measured run (JSON on stdout)
    python -m bench.out_of_core all SMALL BIG               # stacked vs in place on SMALL, in place
                                                            # on BIG; bench/results/out_of_core.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import RESULTS, environment


def write(path: str, layers: int, seed: int = 0) -> None:
    """A V4-Flash-shaped checkpoint of `layers` layers (CSA and HCA alternating, 8K vocab, no MTP)
    in the official layout, one shard per layer, never more than one layer in memory."""
    from safetensors.torch import save_file

    from dayzero.synthetic import flash_slice, random_model
    types = tuple(("csa", "hca")[i % 2] for i in range(layers))
    args = flash_slice(types)
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, t in enumerate(types):
        one = random_model(flash_slice((t,)), seed=seed + i).state_dict()
        tensors = {(f"layers.{i}." + n[len("layers.0."):] if n.startswith("layers.0.") else n): v.contiguous()
                   for n, v in one.items() if n.startswith("layers.0.") or i == 0}
        shard = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        save_file(tensors, str(d / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in tensors})
        total += sum(v.numel() * v.element_size() for v in tensors.values())
        print(f"layer {i} ({t}) written: {total / 1e9:.1f} GB so far", file=sys.stderr, flush=True)
        del one, tensors
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": weight_map}, indent=1))
    (d / "config.json").write_text(json.dumps(args.to_hf_dict(), indent=1))


def _status() -> dict:
    """This process's resident bytes: now, peak, anonymous, file-backed (/proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out


def run(path: str, stacked: bool, tokens: int, prompt_len: int) -> dict:
    """Load, decode `tokens` greedy tokens after a `prompt_len`-token prompt on the native CPU
    table (routed experts in place, or stacked into one copy as before), report memory and speed."""
    from dayzero import LLM, SamplingParams
    from dayzero.reference.moe import MoE
    if stacked:  # what the CPU table did before: one stacked copy of every routed expert
        orig = MoE.stack_experts
        MoE.stack_experts = lambda self, in_place=False: orig(self, False)
    t0 = time.perf_counter()
    llm = LLM(path, ops="cpu", dtype="bfloat16", numerics="official", num_speculative_tokens=0,
              kv_cache_memory_bytes=2**30, max_num_seqs=1)
    load_s = time.perf_counter() - t0
    after_load = _status()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, llm.args.vocab_size, (prompt_len,), generator=g).tolist()
    p = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    first = None
    out = []
    for tok, _ in llm.stream(prompt, p):
        out.append(tok)
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    args = llm.args
    expert_bytes = 3 * args.moe_inter_dim * args.dim * (0.5 + 1 / 32)  # FP4 codes + E8M0 per 32
    return {"stacked": stacked, "tokens": out, "load_s": load_s, "prefill_s": first - t0,
            "decode_tok_s": (len(out) - 1) / (end - first) if len(out) > 1 else None,
            "memory_after_load": after_load, "memory_end": _status(),
            "routed_bytes_per_token": int(args.n_layers * args.n_activated_experts * expert_bytes),
            "checkpoint_bytes": sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))}


def read_bandwidth(path: str) -> float:
    """Sequential read GB/s of one shard, page cache dropped first (root only; else cached)."""
    shard = sorted(Path(path).glob("*.safetensors"))[-1]
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass
    t0 = time.perf_counter()
    n = 0
    with open(shard, "rb", buffering=0) as f:
        while chunk := f.read(64 * 2**20):
            n += len(chunk)
    return n / (time.perf_counter() - t0) / 1e9


def _child(path: str, stacked: bool, tokens: int, prompt_len: int) -> dict:
    cmd = [sys.executable, "-m", "bench.out_of_core", "run", path, "--tokens", str(tokens),
           "--prompt-len", str(prompt_len)] + (["--stacked"] if stacked else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        return {"stacked": stacked, "failed": f"exit {r.returncode}", "stderr": r.stderr[-2000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("dir")
    w.add_argument("--layers", type=int, default=10)
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("--stacked", action="store_true")
    r.add_argument("--tokens", type=int, default=16)
    r.add_argument("--prompt-len", type=int, default=32)
    a_ = sub.add_parser("all")
    a_.add_argument("small")
    a_.add_argument("big")
    a_.add_argument("--tokens", type=int, default=16)
    a = p.parse_args(argv)
    if a.cmd == "write":
        write(a.dir, a.layers)
    elif a.cmd == "run":
        print(json.dumps(run(a.dir, a.stacked, a.tokens, a.prompt_len)))
    else:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        rec = {"environment": environment(), "ram_bytes": ram, "runs": []}
        for path, stacked in ((a.small, True), (a.small, False), (a.big, False)):
            res = _child(path, stacked, a.tokens, 32)
            res["checkpoint"] = path
            rec["runs"].append(res)
            print(json.dumps({k: v for k, v in res.items() if k != "tokens"}), flush=True)
        rec["read_GBps"] = read_bandwidth(a.big)
        big = rec["runs"][-1]
        if "decode_tok_s" in big and big["decode_tok_s"]:
            rec["disk_roofline_tok_s"] = rec["read_GBps"] * 1e9 / big["routed_bytes_per_token"]
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "out_of_core.json").write_text(json.dumps(rec, indent=2) + "\n")
        print(json.dumps({k: v for k, v in rec.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
