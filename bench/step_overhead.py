"""Per-step overhead of CPU decode on small models (issue 25, item 2): ms per decode step through the
engine (`LLM`), greedy, speculation and prefix caching off, after a short prompt.

    python -m bench.step_overhead [--models builtin,toy] [--batches 1,8] [--new-tokens 64] [--reps 5]
                                  [--compare [fused|lookups]] [--profile] [--threads 2]

builtin: the built-in model (dayzero/builtin/shakespeare); toy: `dayzero toy --preset flash` (random,
FP8 linears + FP4 experts) written to a temporary directory. Each rep decodes `--new-tokens` tokens
for `--batches` requests of 16-token prompts; ms/step is the decode steps' time (after every
request has its first token) over their number; the minimum and median over reps are printed, and
the process's CPU time per step (at --threads 1 the figure least moved by other jobs on a shared
machine; minima are the steadier figure). `--compare` (= `--compare fused`) loads a second engine
whose op table has its fused ops (ops/cpu/fused.c, gemm.c's grouped FP8 linear) replaced by their
twins, i.e. the decode path before them, checks both give the same tokens and times them in
alternating reps; `--compare lookups` does the same with the paged cache's native lookups (ops/cpu/lookup.c) off in the second
configuration (PagedBatchCache.native_lookups, switched around each of its reps). Records are appended to
bench/results/step_overhead.jsonl. `--profile` also prints cProfile's top
functions of one rep and torch.profiler's op table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def decode_ms(llm, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, list[list[int]]]:
    """Wall and CPU (this process, all threads) ms per decode step (the steps after every request
    has its first token), and the output ids."""
    from dayzero import SamplingParams
    p = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    eng = llm.engine
    reqs = [eng.add_request(f"so-{time.monotonic_ns()}-{i}", ids, p) for i, ids in enumerate(prompts)]
    try:
        while not all(r.output_ids for r in reqs):
            eng.step()
        steps, t, c = 0, time.perf_counter(), time.process_time()
        while not all(r.finished for r in reqs):
            eng.step()
            steps += 1
        dt, dc = time.perf_counter() - t, time.process_time() - c
    finally:
        out = [list(r.output_ids) for r in reqs]
        for r in reqs:
            eng.abort(r.rid)
    return dt / max(steps, 1) * 1e3, dc / max(steps, 1) * 1e3, out


def load(name: str, tmp: str):
    from dayzero import LLM
    path = None
    if name == "toy":
        path = f"{tmp}/toy"
        if not os.path.isdir(path):
            from dayzero.cli import main as cli
            cli(["toy", path, "--preset", "flash"])
    return LLM(path, device="cpu", num_speculative_tokens=0, enable_prefix_caching=False,
               kv_cache_memory_bytes=256 << 20)


def without_fused(llm) -> None:
    """Put the twins back for the op table's fused ops (ops FUSED_NAMES) in this engine's model:
    the decode path as it was before ops/cpu/fused.c and the grouped FP8 linear (gemm.c), for an
    interleaved comparison."""
    import dataclasses

    from dayzero.ops import FUSED_NAMES, REF
    from dayzero.reference.layers import UsesOps
    eng = llm.engine
    table = dataclasses.replace(eng.ops, fused=(), **{n: getattr(REF, n) for n in FUSED_NAMES})
    for m in eng.model.modules():
        if isinstance(m, UsesOps) and m.ops is eng.ops:
            m.ops = table
    eng.worker.ops = table


def run(key: str, llm, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, list[list[int]]]:
    """decode_ms with the paged cache's native lookups off for the "torch-lookups" configuration."""
    from dayzero.cache.paged import PagedBatchCache
    PagedBatchCache.native_lookups = key != "torch-lookups"
    try:
        return decode_ms(llm, prompts, new_tokens)
    finally:
        PagedBatchCache.native_lookups = True


def prompts_for(llm, batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(4, llm.args.vocab_size, (batch, 16), generator=g).tolist()


def profile(llm, prompts, new_tokens: int) -> None:
    import cProfile
    import pstats
    pr = cProfile.Profile()
    pr.enable()
    decode_ms(llm, prompts, new_tokens)
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    from torch.profiler import ProfilerActivity, profile as tprofile
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        decode_ms(llm, prompts, new_tokens)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="builtin,toy")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-record", dest="record", action="store_false",
                    help="print only (no line in bench/results/step_overhead.jsonl)")
    ap.add_argument("--compare", nargs="?", const="fused", choices=("fused", "lookups"), default=None,
                    help="also time, interleaved, a second engine with the op table's fused ops put back to "
                         "their twins (fused, the default) or with the paged cache's PyTorch lookups (lookups)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from bench.common import append, environment
    env, records = environment(), []
    tmp = tempfile.mkdtemp()
    for name in a.models.split(","):
        llms = {"fused": load(name, tmp)}
        base = {"fused": "unfused", "lookups": "torch-lookups"}.get(a.compare)
        if a.compare:
            llms[base] = load(name, tmp)
            if a.compare == "fused":
                without_fused(llms[base])
        for b in (int(x) for x in a.batches.split(",")):
            ps = prompts_for(llms["fused"], b)
            toks = {}
            for key, llm in llms.items():
                toks[key] = run(key, llm, ps, 8)[2]  # warm-up
            if a.compare and toks["fused"] != toks[base]:
                raise AssertionError(f"{name} batch {b}: {a.compare} changed the tokens")
            if a.profile:
                profile(llms["fused"], ps, a.new_tokens)
            runs = {key: [] for key in llms}
            for _ in range(a.reps):  # interleaved: each rep runs every configuration once
                for key, llm in llms.items():
                    runs[key].append(run(key, llm, ps, a.new_tokens))
            for key, rs in runs.items():
                ms, cpu = [r[0] for r in rs], [r[1] for r in rs]
                records.append({"scenario": "cpu decode ms/step", "model": name, "batch": b, "ops": key,
                                "compare": a.compare, "new_tokens": a.new_tokens, "reps": a.reps, "threads": torch.get_num_threads(),
                                "ms_per_step_min": min(ms), "ms_per_step_median": statistics.median(ms),
                                "cpu_ms_per_step_min": min(cpu), "cpu_ms_per_step_median": statistics.median(cpu),
                                "loadavg_1m": os.getloadavg()[0], **env})
                label = f" ({key})" if a.compare else ""
                print(f"{name} batch {b}{label}: {min(ms):.3f} ms/step min, {statistics.median(ms):.3f} median; "
                      f"CPU time {min(cpu):.3f} ms/step min, {statistics.median(cpu):.3f} median ({a.reps} reps of "
                      f"{a.new_tokens} tokens; {torch.get_num_threads()} threads)", flush=True)
    if a.record:
        print("appended to", append("step_overhead.jsonl", records))


if __name__ == "__main__":
    main()
