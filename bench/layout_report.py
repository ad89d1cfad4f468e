"""Per-rank bytes of the parallel layouts (distributed/layout.py) for V4-Flash and V4-Pro, from the
project's own accounting: each rank's model is built on the meta device with its `Layout` and its
state_dict (the tensors it would load, in their checkpoint dtypes) is summed. Beside it, the bytes
each rank's collectives move per decoded token (ring all-reduce / all-gather: 2(N-1)/N and (N-1)/N
of the tensor) and what that costs at nominal link rates, and the long-range KV bytes per token,
which tensor parallel replicates on every rank (one K=V head). DP-attention + EP rows (`DP N+EP`):
attention, shared expert, embedding and head whole on every rank, routed experts E/N; each rank's
KV holds only its own requests; collectives per MoE layer: the tokens with their routing as one row
of bytes all-gathered, the fp32 partial sums reduce-scattered (reference/moe.py `_forward_dp`; the
token counts come with the step call).

    python -m bench.layout_report      # prints the tables, writes bench/results/layout.json
"""
from __future__ import annotations

import json

import torch

from bench.common import RESULTS, environment
from dayzero.cache.spec import kv_report
from dayzero.config import flash, pro
from dayzero.distributed.layout import Layout, LayoutError
from dayzero.reference.model import Transformer

LAYOUTS = [(1, False, 1), (2, False, 1), (4, False, 1), (8, False, 1), (8, True, 1), (16, True, 1),
           (8, True, 8), (16, True, 16)]  # (ranks, enable_expert_parallel, data_parallel_size)
# nominal one-direction rates, GB/s (vendor figures, not measured here)
LINKS = {"NVLink4 (H100/H200 SXM)": 450.0, "PCIe 5.0 x16": 64.0, "RoCE 200 Gb/s (DGX Spark CX-7)": 25.0,
         "10 GbE": 1.25}


def rank_bytes(args, layout: Layout) -> dict:
    with torch.device("meta"):
        model = Transformer(args, layout=layout)
    sd = model.state_dict()
    total = sum(t.numel() * t.element_size() for t in sd.values())
    experts = sum(t.numel() * t.element_size() for n, t in sd.items() if ".experts." in n and "shared" not in n)
    return {"weight_bytes": total, "routed_expert_bytes": experts, "other_bytes": total - experts}


def collective_bytes(args, n: int, act_bytes: int = 2) -> dict:
    """Bytes one rank sends per decoded token (one row), per step of the model (MTP excluded):
    per layer one all-reduce of the attention output and one of the MoE output (both fp32); the
    embedding's all-reduce (compute dtype); the head's all-gather of fp32 logits."""
    if n == 1:
        return {"all_reduces": 0, "bytes": 0}
    ar = lambda size: 2 * (n - 1) / n * size  # noqa: E731 - ring all-reduce, bytes sent per rank
    per_layer = ar(args.dim * 4) + ar(args.dim * 4)
    total = args.n_layers * per_layer + ar(args.dim * act_bytes) + (n - 1) / n * args.vocab_size * 4
    return {"all_reduces": 2 * args.n_layers + 1, "bytes": int(total)}


def dp_collective_bytes(args, n: int, act_bytes: int = 2) -> dict:
    """DP-attention + EP: bytes one rank sends per decode step with one token on every rank (ring
    all-gather and reduce-scatter: (N-1) chunks of one rank's share sent per rank), per MoE layer:
    the token's row (compute dtype) with its routing (k weights + k ids, fp32) in one all-gather, and
    the reduce-scatter of the fp32 partial sums of the N tokens. MTP excluded."""
    if n == 1:
        return {"collectives": 0, "bytes": 0}
    per_layer = (n - 1) * (args.dim * act_bytes + 2 * args.n_activated_experts * 4 + args.dim * 4)
    return {"collectives": 2 * args.n_layers, "bytes": int(args.n_layers * per_layer)}


def main() -> None:
    out = {"environment": environment(), "links_GBps_nominal": LINKS, "models": {}}
    for name, args in (("v4-flash", flash()), ("v4-pro", pro())):
        kv = kv_report(args, torch.bfloat16)["bytes_per_token_all_layers"]
        rows = []
        print(f"\n{name}: KV {kv:,.0f} B/token on every rank (replicated under tensor parallel)")
        print(f"{'layout':14} {'weights/rank':>13} {'experts':>10} {'other':>9} {'coll. B/step':>14} "
              + " ".join(f"{k.split(' (')[0]:>11}" for k in LINKS))
        for n, ep, dp in LAYOUTS:
            label = (f"DP{n}" if dp > 1 else f"TP{n}") + ("+EP" if ep else "")
            lay = Layout(1, 0, ep, dp) if dp > 1 else Layout(n, 0, ep)
            try:
                lay.check(args)
            except LayoutError as e:
                rows.append({"layout": label, "fits": False, "why": str(e)})
                print(f"{label:14} does not fit: {str(e).splitlines()[1].strip()}")
                continue
            b = rank_bytes(args, lay)
            c = dp_collective_bytes(args, n) if dp > 1 else collective_bytes(args, n)
            link_us = {k: c["bytes"] / (v * 1e9) * 1e6 for k, v in LINKS.items()}
            # a decode step: one token in all under TP, one on every rank (N in all) under DP-attention
            rows.append({"layout": label, "fits": True, **b, "collectives_per_step": c, "tokens_per_step": dp,
                         "collective_bytes_per_token": c["bytes"] // dp,
                         "collective_us_per_step_at_link": link_us, "kv_bytes_per_token": kv})
            print(f"{label:14} {b['weight_bytes'] / 1e9:11.1f}GB {b['routed_expert_bytes'] / 1e9:8.1f}GB "
                  f"{b['other_bytes'] / 1e9:7.1f}GB {c['bytes']:14,d} "
                  + " ".join(f"{link_us[k]:9.1f}us" for k in LINKS))
        out["models"][name] = rows
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "layout.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
