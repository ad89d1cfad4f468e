"""KV cache bytes per token for V4-Flash and V4-Pro shapes at 8K, 128K and 1M context, from the
engine's own accounting (dayzero.cache.spec), next to v4-architecture.md section 4.2, for both
kv_cache_dtype values: "auto" (bf16 rows) and "fp8" (K=V rows packed as FP8 nope + bf16 rope, 584 B
at D=512; the indexer keys stay bf16: the deployed FP4 indexer cache is not built).

Then the engine's defaults (engine/capacity.py): fixed bytes per sequence (the window and open
compressor rows a sequence holds, and the whole 128-token blocks the engine pages them in), and how
a budget splits (derived max_num_seqs, the bounded reserve, tokens of entries), on a CPU (fp32
compute) and a GPU (bf16 compute); compressor rows fp32 under official numerics, bf16 under
transformers numerics on a GPU.

V4.1-Flash: what the engine allocates, and the planned QAT layout. The engine runs V4.1 on one rank
(v41/served.py) with its pools in the compute dtype (dayzero/v41/cache.py `bytes_per_token`,
`fixed_bytes_per_sequence`): compressed entries + indexer keys once per KV-source group (layers 2, 8, 14
at ratio 2, layer 20 at ratio 1), window rows on the 40 backbone layers (no DSpark stages: its drafter is
not built), the pooled sources' open fp32 rows and the Engram history; bf16 on a GPU, fp32 on a CPU.
The plan (dayzero/v41/presets.py `kv_plan`; window rows on 40 + 3 DSpark stages): "qat" = the QAT points
(window FP8 e4m3 + UE8M0 per 32; entries FP4 e2m1 + e4m3 per 16; indexer keys FP4 + UE8M0 per 32), not
built in the engine; "bf16" = every row bf16. Shown next to V4-Flash's rows.

    python -m bench.kv_report [--v41-only] [--out DIR]  # prints tables, writes bench/results/kv_bytes.json
"""
import argparse
import json
from pathlib import Path

import torch

from bench.common import RESULTS, environment
from dayzero.cache.spec import cache_groups, fixed_bytes_per_sequence, kv_report
from dayzero.config import flash, pro
from dayzero.engine.capacity import Sizes, bounded_blocks, plan
from dayzero.v41.cache import bytes_per_token as v41_bytes_per_token
from dayzero.v41.cache import fixed_bytes_per_sequence as v41_fixed_bytes
from dayzero.v41.presets import PLANS, kv_plan, v41_flash

# (device, compute dtype, numerics) profiles and the budgets shown for them (bytes per rank)
PROFILES = (("cpu", torch.float32, "official"), ("gpu", torch.bfloat16, "official"),
            ("gpu", torch.bfloat16, "transformers"))
BUDGETS = {"cpu": (8 * 2**30, 64 * 2**30), "gpu": (8 * 2**30, 40 * 2**30)}
BS, CHUNK = 128, 1024  # V4's block size, the default max_num_batched_tokens


def defaults(args) -> dict:
    """Fixed bytes per sequence and the split of each budget at the engine's defaults (MTP on:
    its window rows count)."""
    out = {}
    for device, dtype, numerics in PROFILES:
        fp32_rows = numerics == "official" or dtype == torch.float32
        groups = cache_groups(args, BS, with_mtp=True, fp32_rows=fp32_rows)
        z = Sizes(groups, args, dtype, BS, CHUNK)
        before = bounded_blocks(groups, args, BS, 2 * 32, 2 * CHUNK)  # twice max_num_seqs=32, as before
        row = {"compute_dtype": str(dtype).removeprefix("torch."), "numerics": numerics,
               "compressor_rows": "float32" if fp32_rows else "bfloat16",
               "fixed_bytes_per_sequence": fixed_bytes_per_sequence(args, dtype, True, fp32_rows=fp32_rows),
               "paged_bytes_per_sequence": z.per_seq,
               "rows_bytes_before_at_32_seqs": sum(n * z.block[k] for k, n in before.items()), "budgets": {}}
        for budget in BUDGETS[device]:
            try:
                cap = plan(groups, args, dtype, BS, budget, "report", None, CHUNK, budget_given=False)
                row["budgets"][str(budget)] = {"max_num_seqs": cap.max_num_seqs, "reserve_seqs": cap.reserve_seqs,
                                               "rows_bytes": cap.rows_bytes, "entries_bytes": cap.entries_bytes,
                                               "tokens": cap.max_tokens}
            except ValueError as e:
                row["budgets"][str(budget)] = {"error": str(e)}
        out[f"{device} {row['compute_dtype']} {numerics}"] = row
    return out

# v4-architecture.md 4.2, bytes per token (compressed entries + indexer keys), all layers: all-BF16,
# and the deployed FP8 entries + FP4 indexer keys
PUBLISHED_BF16 = {"v4-flash": 6880, "v4-pro": 9848}
PUBLISHED_FP8_FP4 = {"v4-flash": 3514, "v4-pro": 5031}


CONTEXTS = ("8192", "131072", "1048576")


def v41_rows(out: dict) -> None:
    """V4.1-Flash's planned bytes per token next to V4-Flash's engine accounting (bf16 and fp8 rows)."""
    print("\nv4.1-flash: the engine's pools (compute dtype) and the planned layouts; V4-Flash from the engine's "
          "accounting")
    print(f"{'model':10} {'storage':34} {'B/token':>8} {'fixed/seq':>10} {'8K':>10} {'128K':>10} {'1M':>10}")
    v4 = {kv: kv_report(flash(), torch.bfloat16, kv_cache_dtype=kv) for kv in ("auto", "fp8")}
    for kv, rep in v4.items():
        seq = rep["per_sequence_bytes"]
        print(f"{'v4-flash':10} {kv + ' (engine)':34} {rep['bytes_per_token_all_layers']:8.0f} "
              f"{rep['fixed_bytes_per_sequence'] / 2**20:8.1f}Mi "
              + " ".join(f"{seq[k] / 2**30:8.3f}Gi" for k in CONTEXTS))
    args, rows = v41_flash(), {}
    for name in PLANS:
        p = rows[name] = kv_plan(args, name, contexts=tuple(int(c) for c in CONTEXTS))
        p["vs_v4_flash_published"] = {"bf16": p["bytes_per_token_all_layers"] / PUBLISHED_BF16["v4-flash"],
                                      "fp8_fp4": p["bytes_per_token_all_layers"] / PUBLISHED_FP8_FP4["v4-flash"]}
        fmt = "/".join(p["formats"].values())
        seq = p["per_sequence_bytes"]
        print(f"{'v4.1-flash':10} {name + ' ' + fmt:34} {p['bytes_per_token_all_layers']:8.0f} "
              f"{p['fixed_bytes_per_sequence'] / 2**20:8.1f}Mi "
              + " ".join(f"{seq[k] / 2**30:8.3f}Gi" for k in CONTEXTS))
    engine = {}
    for dt in (torch.bfloat16, torch.float32):
        name = str(dt).removeprefix("torch.")
        per, fixed = v41_bytes_per_token(args, dt), v41_fixed_bytes(args, dt)
        e = engine[name] = {"compute_dtype": name, "bytes_per_token_all_layers": per, "fixed_bytes_per_sequence": fixed,
                            "per_sequence_bytes": {k: int(per * int(k) + fixed) for k in CONTEXTS},
                            "vs_qat_plan": per / rows["qat"]["bytes_per_token_all_layers"]}
        seq = e["per_sequence_bytes"]
        print(f"{'v4.1-flash':10} {'engine (' + name + ', as computed)':34} {per:8.0f} {fixed / 2**20:8.1f}Mi "
              + " ".join(f"{seq[k] / 2**30:8.3f}Gi" for k in CONTEXTS))
    q = rows["qat"]["bytes_per_token_all_layers"]
    print(f"v4.1-flash qat / v4-flash published FP8+FP4 ({PUBLISHED_FP8_FP4['v4-flash']} B/token): "
          f"{q / PUBLISHED_FP8_FP4['v4-flash']:.3f}")
    print(f"v4.1-flash engine bf16 / qat plan: {engine['bfloat16']['vs_qat_plan']:.2f}x the bytes per token "
          f"(the QAT cache formats are not built)")
    out["models"]["v4.1-flash"] = {
        "status": "the engine runs V4.1 on one rank with its pools in the compute dtype ('engine'); 'qat' is the "
                  "planned packed layout, not built in the engine", "engine": engine, **rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--v41-only", action="store_true", help="only the V4.1-Flash rows (and V4-Flash beside them)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for kv_bytes.json (default bench/results)")
    a = ap.parse_args(argv)
    out = {"environment": environment(), "models": {}}
    if not a.v41_only:
        v4_tables(out)
    v41_rows(out)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "kv_bytes.json").write_text(json.dumps(out, indent=2) + "\n")


def v4_tables(out: dict) -> None:
    print(f"{'model':10} {'kv dtype':8} {'B/token':>8} {'published':>9} {'fixed/seq':>10} {'8K':>10} {'128K':>10} "
          f"{'1M':>10}")
    for name, args in (("v4-flash", flash()), ("v4-pro", pro())):
        for kv in ("auto", "fp8"):
            rep = kv_report(args, torch.bfloat16, kv_cache_dtype=kv)
            key = name if kv == "auto" else f"{name} fp8"
            out["models"][key] = {**rep, "published_bf16_bytes_per_token": PUBLISHED_BF16[name],
                                  "published_fp8_fp4_bytes_per_token": PUBLISHED_FP8_FP4[name]}
            seq = rep["per_sequence_bytes"]
            pub = PUBLISHED_BF16[name] if kv == "auto" else PUBLISHED_FP8_FP4[name]
            print(f"{name:10} {kv:8} {rep['bytes_per_token_all_layers']:8.0f} {pub:9d} "
                  f"{rep['fixed_bytes_per_sequence'] / 2**20:8.1f}Mi "
                  + " ".join(f"{seq[k] / 2**30:8.3f}Gi" for k in ("8192", "131072", "1048576")))
    print("\nat the engine's defaults (MTP on, block 128, max_num_batched_tokens 1024); budget -> derived "
          "max_num_seqs + kept, rows, entries")
    for name, args in (("v4-flash", flash()), ("v4-pro", pro())):
        out["models"][name]["defaults"] = rows = defaults(args)
        for prof, row in rows.items():
            split = "; ".join(f"{int(b) / 2**30:.0f}Gi -> " + (
                f"{c['max_num_seqs']}+{c['reserve_seqs']} seqs, rows {c['rows_bytes'] / 2**30:.2f}Gi, "
                f"{c['tokens'] / 1e6:.2f}M tokens" if "error" not in c else "does not fit")
                for b, c in row["budgets"].items())
            print(f"{name:9} {prof:27} rows {row['compressor_rows']:8} fixed/seq "
                  f"{row['fixed_bytes_per_sequence'] / 2**20:6.1f}Mi paged/seq {row['paged_bytes_per_sequence'] / 2**20:6.1f}Mi "
                  f"(before: 2x32 seqs {row['rows_bytes_before_at_32_seqs'] / 2**30:5.2f}Gi) | {split}")


if __name__ == "__main__":
    main()
