"""A V4-Flash-shaped checkpoint started with every default (issue 26): `LLM(model=DIR)` with no
engine option, a short greedy generation, the start-up memory line and peak resident memory.

    python -m bench.default_start write DIR --layers 4   # real V4-Flash layer shapes, random weights
    python -m bench.default_start run DIR                # JSON on stdout (memory line on stderr)

The checkpoint: CSA and HCA layers alternating, 256 FP4 experts of 2048 x 4096, FP8 attention, an
8K vocabulary, no MTP (dayzero.synthetic.flash_slice), written one layer per shard so that never more
than one layer is in memory.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from bench.out_of_core import _status, write


def run(path: str, tokens: int, prompt_len: int) -> dict:
    from dayzero import LLM, SamplingParams
    from dayzero.engine.capacity import meminfo
    before = meminfo()["MemAvailable"]
    t0 = time.perf_counter()
    llm = LLM(path)  # every default
    load_s = time.perf_counter() - t0
    after_load = _status()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, llm.args.vocab_size, (prompt_len,), generator=g).tolist()
    t0 = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True))[0]
    gen_s = time.perf_counter() - t0
    s = llm.engine.stats()
    return {"memory_line": llm.engine.memory_line(), "mem_available_before": before,
            "load_s": round(load_s, 1), "generate_s": round(gen_s, 1), "tokens": len(out.token_ids),
            "token_ids": out.token_ids, "after_load": after_load, "after_generate": _status(),
            "stats": {k: s[k] for k in ("ops", "max_num_seqs", "reserve_seqs", "weight_bytes", "cache_rows_bytes",
                                        "cache_entries_bytes", "kv_cache_budget", "kv_cache_budget_source",
                                        "max_tokens_in_cache", "compressor_rows_dtype", "fixed_bytes_per_sequence")}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("dir")
    w.add_argument("--layers", type=int, default=4)
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("--tokens", type=int, default=8)
    r.add_argument("--prompt-len", type=int, default=32)
    a = p.parse_args(argv)
    if a.cmd == "write":
        write(a.dir, a.layers)
    else:
        print(json.dumps(run(a.dir, a.tokens, a.prompt_len), indent=1))


if __name__ == "__main__":
    main()
