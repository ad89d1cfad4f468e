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

V4.1-Flash rows (`v41_layout`): per-rank bytes of the layouts the engine runs V4.1 in
(distributed/layout.py; the DSpark stages included, as the engine loads them with speculation on). Tensors from the
census inventory (dayzero/v41/presets.py: backbone from
checkpoint.expected_tensors, DSpark stages from dspark_tensors: `inventory`), in their checkpoint dtypes, split by
V4's TP rules (wq_b / attn_sink by heads, wo_a / wo_b by output group, shared expert by its inner dim,
routed experts by inner dim, or E/N whole under EP, embed / head by vocab; everything else, DSpark's
extras included, replicated), or under DP-attention + EP only the routed experts E/N. Engram tables are
not on the GPU: one memory-mapped copy per host (FP8 rows + scales), gathered by row; engram.wkv,
q_weight, k_weight stay resident. A split must divide and must not cut a 32-wide scale block.

    python -m bench.layout_report [--v41-only] [--out DIR]  # prints the tables, writes bench/results/layout.json
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from bench.common import RESULTS, environment
from dayzero.cache.spec import kv_report
from dayzero.config import flash, pro
from dayzero.distributed.layout import Layout, LayoutError
from dayzero.reference.model import Transformer
from dayzero.v41.presets import inventory, kv_plan, v41_flash

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


_TP_SPLIT = ("attn.wq_b.", "attn.attn_sink", "attn.wo_a.", "attn.wo_b.", "shared_experts.", "ffn.experts.")


def _v41_fits(args, n: int, ep: bool, dp: int) -> str | None:
    """Why the planned V4.1 layout cannot split this way, or None."""
    if ep and (args.n_routed_experts % n or args.dspark_n_routed_experts % n):
        return f"EP{n}: {args.n_routed_experts} / {args.dspark_n_routed_experts} experts do not split in {n}"
    if dp > 1:
        return None
    if args.n_heads % n or args.o_groups % n or args.vocab_size % n:
        return f"TP{n}: n_heads {args.n_heads}, o_groups {args.o_groups}, vocab {args.vocab_size} must divide by {n}"
    if (args.moe_inter_dim // n) % 32 or args.moe_inter_dim % n:
        return f"TP{n}: moe_inter_dim {args.moe_inter_dim} / {n} cuts a 32-wide scale block"
    return None


def v41_rank_bytes(args, n: int, ep: bool, dp: int) -> dict:
    inv = inventory(args)
    gpu = experts = host = 0
    for name, spec in inv.items():
        b = math.prod(spec.shape) * spec.dtype.itemsize
        if ".engram.embed." in name:
            host += b
            continue
        routed = ".ffn.experts." in name
        if routed and ep:  # rank 0's experts [0, E/N), whole
            e, bank = int(name.split(".ffn.experts.")[1].split(".")[0]), (
                args.dspark_n_routed_experts if name.startswith("mtp.") else args.n_routed_experts)
            b = b if e < bank // n else 0
        elif dp == 1 and (any(k in name for k in _TP_SPLIT) or name.split(".")[0] in ("embed", "head")):
            b //= n  # exact: _v41_fits checked every split divides
        gpu += b
        experts += b if routed else 0
    return {"gpu_weight_bytes": gpu, "routed_expert_bytes": experts, "other_bytes": gpu - experts,
            "host_engram_bytes_per_host": host}


def v41_layout(out: dict) -> None:
    args = v41_flash()
    kv = kv_plan(args)["bytes_per_token_all_layers"]
    print(f"\nv4.1-flash: the engine's layouts (DSpark stages included); KV {kv:,.0f} B/token "
          f"(QAT formats) on every rank under TP, own requests only under DP")
    print(f"{'layout':14} {'GPU weights/rank':>17} {'experts':>10} {'other':>9} {'host Engram (mmap, per host)':>30}")
    rows = []
    for n, ep, dp in LAYOUTS:
        label = (f"DP{n}" if dp > 1 else f"TP{n}") + ("+EP" if ep else "")
        why = _v41_fits(args, n, ep, dp)
        if why:
            rows.append({"layout": label, "fits": False, "why": why})
            print(f"{label:14} does not fit: {why}")
            continue
        b = v41_rank_bytes(args, n, ep, dp)
        rows.append({"layout": label, "fits": True, **b, "kv_bytes_per_token": kv})
        print(f"{label:14} {b['gpu_weight_bytes'] / 1e9:15.1f}GB {b['routed_expert_bytes'] / 1e9:8.1f}GB "
              f"{b['other_bytes'] / 1e9:7.1f}GB {b['host_engram_bytes_per_host'] / 1e9:28.1f}GB")
    # Engram rows gathered per token: every hash column of every Engram layer, FP8 row + E8M0 per 32
    row = args.engram_head_dim + args.engram_head_dim // 32
    gather = {"rows_per_token": len(args.engram_layer_ids) * args.engram_hash_columns, "row_bytes": row,
              "bytes_per_token": len(args.engram_layer_ids) * args.engram_hash_columns * row}
    print(f"Engram gathers per token: {gather['rows_per_token']} rows of {row} B = {gather['bytes_per_token']:,} B "
          f"(host RAM or NVMe -> GPU)")
    out["models"]["v4.1-flash"] = {"status": "the engine's layouts; DSpark stages included", "rows": rows,
                                   "engram_gather": gather}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--v41-only", action="store_true", help="only the V4.1-Flash rows")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for layout.json (default bench/results)")
    a = ap.parse_args(argv)
    out = {"environment": environment(), "links_GBps_nominal": LINKS, "models": {}}
    if not a.v41_only:
        v4_layouts(out)
    v41_layout(out)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "layout.json").write_text(json.dumps(out, indent=2) + "\n")


def v4_layouts(out: dict) -> None:
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


if __name__ == "__main__":
    main()
