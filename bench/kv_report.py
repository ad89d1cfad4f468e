"""KV cache bytes per token for V4-Flash and V4-Pro shapes at 8K, 128K and 1M context, from the
engine's own accounting (dayzero.cache.spec), next to v4-architecture.md section 4.2, for both
kv_cache_dtype values: "auto" (bf16 rows) and "fp8" (K=V rows packed as FP8 nope + bf16 rope, 584 B
at D=512; the indexer keys stay bf16: the deployed FP4 indexer cache is not built).

    python bench/kv_report.py          # prints a table, writes bench/results/kv_bytes.json
"""
import json

import torch

from bench.common import RESULTS, environment
from dayzero.cache.spec import kv_report
from dayzero.config import flash, pro

# v4-architecture.md 4.2, bytes per token (compressed entries + indexer keys), all layers: all-BF16,
# and the deployed FP8 entries + FP4 indexer keys
PUBLISHED_BF16 = {"v4-flash": 6880, "v4-pro": 9848}
PUBLISHED_FP8_FP4 = {"v4-flash": 3514, "v4-pro": 5031}


def main() -> None:
    out = {"environment": environment(), "models": {}}
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
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kv_bytes.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
