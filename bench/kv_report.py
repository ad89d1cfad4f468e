"""KV cache bytes per token for V4-Flash and V4-Pro shapes at 8K, 128K and 1M context, from the
engine's own accounting (dayzero.cache.spec), next to v4-architecture.md section 4.2.

    python bench/kv_report.py          # prints a table, writes bench/results/kv_bytes.json
"""
import json

import torch

from bench.common import RESULTS, environment
from dayzero.cache.spec import kv_report
from dayzero.config import flash, pro

# v4-architecture.md 4.2: all-BF16 bytes per token (compressed entries + indexer keys), all layers
PUBLISHED_BF16 = {"v4-flash": 6880, "v4-pro": 9848}


def main() -> None:
    out = {"environment": environment(), "models": {}}
    print(f"{'model':10} {'B/token':>8} {'published':>9} {'fixed/seq':>10} {'8K':>10} {'128K':>10} {'1M':>10}")
    for name, args in (("v4-flash", flash()), ("v4-pro", pro())):
        rep = kv_report(args, torch.bfloat16)
        out["models"][name] = {**rep, "published_bf16_bytes_per_token": PUBLISHED_BF16[name]}
        seq = rep["per_sequence_bytes"]
        print(f"{name:10} {rep['bytes_per_token_all_layers']:8.0f} {PUBLISHED_BF16[name]:9d} "
              f"{rep['fixed_bytes_per_sequence'] / 2**20:8.1f}Mi "
              + " ".join(f"{seq[k] / 2**30:8.3f}Gi" for k in ("8192", "131072", "1048576")))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kv_bytes.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
