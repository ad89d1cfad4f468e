"""Per-step overhead of CPU decode on small models (issue 25, item 2): ms per decode step through the
engine (`LLM`), greedy, speculation and prefix caching off, after a short prompt.

    python -m bench.step_overhead [--models builtin,toy] [--batches 1,8] [--new-tokens 64] [--reps 5]
                                  [--profile] [--threads 2]

builtin: the built-in model (dayzero/builtin/shakespeare); toy: `dayzero toy --preset flash` (random,
FP8 linears + FP4 experts) written to a temporary directory. Each rep decodes `--new-tokens` tokens
for `--batches` requests of 16-token prompts; ms/step is the decode steps' time (after every
request has its first token) over their number; the minimum and median over reps are printed, and
the process's CPU time per step (at --threads 1 the figure least moved by other jobs on a shared
machine; minima are the steadier figure). `--profile` also prints cProfile's top
functions of one rep and torch.profiler's op table.
"""
from __future__ import annotations

import argparse
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
        from dayzero.cli import main as cli
        cli(["toy", f"{tmp}/toy", "--preset", "flash"])
        path = f"{tmp}/toy"
    return LLM(path, device="cpu", num_speculative_tokens=0, enable_prefix_caching=False,
               kv_cache_memory_bytes=256 << 20)


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
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = tempfile.mkdtemp()
    for name in a.models.split(","):
        llm = load(name, tmp)
        for b in (int(x) for x in a.batches.split(",")):
            ps = prompts_for(llm, b)
            decode_ms(llm, ps, 8)  # warm-up
            if a.profile:
                profile(llm, ps, a.new_tokens)
            runs = [decode_ms(llm, ps, a.new_tokens) for _ in range(a.reps)]
            ms, cpu = [r[0] for r in runs], [r[1] for r in runs]
            print(f"{name} batch {b}: {min(ms):.3f} ms/step min, {statistics.median(ms):.3f} median; CPU time "
                  f"{min(cpu):.3f} ms/step min ({a.reps} reps of {a.new_tokens} tokens; {torch.get_num_threads()} "
                  f"threads)", flush=True)


if __name__ == "__main__":
    main()
