"""Per-rank bytes of the parallel layouts (distributed/layout.py) for V4-Flash and V4-Pro, from the
project's own accounting: each rank's model is built on the meta device with its `Layout` and its
state_dict (the tensors it would load, in their checkpoint dtypes) is summed. Beside it, the bytes
each rank's collectives move per decoded token (ring all-reduce / all-gather: 2(N-1)/N and (N-1)/N
of the tensor) and what that costs at nominal link rates, and the long-range KV bytes per token,
which tensor parallel replicates on every rank (one K=V head).

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

LAYOUTS = [(1, False), (2, False), (4, False), (8, False), (8, True), (16, True)]
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


def main() -> None:
    out = {"environment": environment(), "links_GBps_nominal": LINKS, "models": {}}
    for name, args in (("v4-flash", flash()), ("v4-pro", pro())):
        kv = kv_report(args, torch.bfloat16)["bytes_per_token_all_layers"]
        rows = []
        print(f"\n{name}: KV {kv:,.0f} B/token on every rank (replicated under tensor parallel)")
        print(f"{'layout':14} {'weights/rank':>13} {'experts':>10} {'other':>9} {'coll. B/token':>14} "
              + " ".join(f"{k.split(' (')[0]:>11}" for k in LINKS))
        for n, ep in LAYOUTS:
            label = f"TP{n}" + ("+EP" if ep else "")
            try:
                Layout(n, 0, ep).check(args)
            except LayoutError as e:
                rows.append({"layout": label, "fits": False, "why": str(e)})
                print(f"{label:14} does not fit: {str(e).splitlines()[1].strip()}")
                continue
            b = rank_bytes(args, Layout(n, 0, ep))
            c = collective_bytes(args, n)
            link_us = {k: c["bytes"] / (v * 1e9) * 1e6 for k, v in LINKS.items()}
            rows.append({"layout": label, "fits": True, **b, "collectives_per_token": c,
                         "collective_us_per_token_at_link": link_us, "kv_bytes_per_token": kv})
            print(f"{label:14} {b['weight_bytes'] / 1e9:11.1f}GB {b['routed_expert_bytes'] / 1e9:8.1f}GB "
                  f"{b['other_bytes'] / 1e9:7.1f}GB {c['bytes']:14,d} "
                  + " ".join(f"{link_us[k]:9.1f}us" for k in LINKS))
        out["models"][name] = rows
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "layout.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
