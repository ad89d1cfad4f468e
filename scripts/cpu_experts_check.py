"""Hybrid placement on a lent GPU (scripts/gpu_session.sh all): the built-in model with its routed
experts in host memory on the native CPU kernels (`cpu_experts`) against the same model wholly on
the GPU. Prints one JSON line: both engines' op tables, weight bytes on the device and in host
memory, greedy agreement over a few prompts (the two place the experts on different op tables, so
agreement is measured, not assumed), and decode tokens/s of each (a record of the run, not a
roofline claim). Exit status 1 if the hybrid engine fails to run or keeps its experts on the GPU.

    python scripts/cpu_experts_check.py [--device cuda] [--max-tokens 32]
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def run(device: str, max_tokens: int, cpu_experts: bool) -> dict:
    from dayzero import LLM, SamplingParams
    prompts = ["KING LEAR:", "ROMEO:\nWhat light", "First Citizen:\nBefore we proceed", "HAMLET:\nTo be"]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm = LLM(device=device, cpu_experts=cpu_experts)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts[:1], params)
    single = max_tokens / (time.perf_counter() - t0)
    outs = llm.generate(prompts, params)
    s = llm.engine.stats()
    return {"ops": s["ops"], "expert_ops": s["expert_ops"], "weight_bytes": s["weight_bytes"],
            "host_expert_bytes": s["host_expert_bytes"], "graphs": s["graphs"], "batch1_tok_s": round(single, 1),
            "tokens": [o.token_ids for o in outs]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-tokens", type=int, default=32)
    a = p.parse_args(argv)
    whole = run(a.device, a.max_tokens, False)
    hybrid = run(a.device, a.max_tokens, True)
    same = sum(x == y for u, v in zip(whole["tokens"], hybrid["tokens"]) for x, y in zip(u, v))
    total = sum(len(u) for u in whole["tokens"])
    out = {"device": a.device, "greedy_tokens_equal": f"{same}/{total}",
           "whole": {k: v for k, v in whole.items() if k != "tokens"},
           "cpu_experts": {k: v for k, v in hybrid.items() if k != "tokens"}}
    print(json.dumps(out))
    ok = hybrid["expert_ops"] == "cpu" and hybrid["host_expert_bytes"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
