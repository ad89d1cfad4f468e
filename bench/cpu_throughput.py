"""Offline generation throughput on CPU: dayzero's engine vs transformers' generate on the same
model, prompts and greedy settings, measured in the same run.

    python -m bench.cpu_throughput [--model DIR] [--prompts 32] [--new-tokens 32]

Without --model it writes a random-weight tiny V4 (the `flash` test preset: SWA, CSA, HCA, hash
and learned MoE, MTP). Both sides run fp32 with numerics="transformers" (identical math), so the
greedy tokens must agree, which the script checks. Appends records to bench/results/cpu_throughput.jsonl.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from bench.common import append, environment
from dayzero import LLM, SamplingParams
from dayzero.loader.model_io import save_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="official-layout checkpoint (default: a random tiny one)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--ops", choices=["cpu", "ref"], default=None,
                    help="dayzero's op table (default: by device: the native CPU kernels where they build)")
    a = ap.parse_args()
    from transformers import DeepseekV4ForCausalLM

    tmp = tempfile.mkdtemp()
    if a.model is None:
        from dayzero.cli import main as cli

        cli(["toy", f"{tmp}/toy", "--format", "fp32"])
        a.model = f"{tmp}/toy"
    llm = LLM(a.model, numerics="transformers", dtype="float32", ops=a.ops)
    dense = save_model(f"{tmp}/dense", llm.model, llm.args.replace(quant=None, expert_dtype=None, dtype="float32"))
    hf = DeepseekV4ForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, llm.args.vocab_size, (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=a.new_tokens, ignore_eos=True)

    def ours(ps):
        t = time.perf_counter()
        out = llm.generate(ps, params)
        return time.perf_counter() - t, [o.token_ids for o in out]

    def theirs(ps):
        t = time.perf_counter()
        out = []
        with torch.no_grad():
            for p in ps:  # transformers' DeepSeek-V4 cache has no padding support: one prompt at a time
                ids = hf.generate(torch.tensor([p]), max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
                out.append(ids[0, len(p):].tolist())
        return time.perf_counter() - t, out

    ours(prompts[:1])  # warm-up both
    theirs(prompts[:1])
    env = environment()
    records = []
    for n in (1, a.prompts):
        t_ours, tok_ours = ours(prompts[:n])
        t_hf, tok_hf = theirs(prompts[:n])
        agree = sum(x == y for x, y in zip(tok_ours, tok_hf))
        gen = n * a.new_tokens
        rec = {"scenario": f"cpu offline generate, {n} prompt(s)", "batch": n, "prompt_len": a.prompt_len,
               "new_tokens": a.new_tokens, "time_us": t_ours * 1e6, "tokens_per_s": gen / t_ours,
               "baseline_name": "transformers DeepseekV4ForCausalLM.generate (greedy, batch 1 each)",
               "baseline_time_us": t_hf * 1e6, "baseline_tokens_per_s": gen / t_hf,
               "speedup": t_hf / t_ours, "greedy_agreement": f"{agree}/{n}",
               "mtp": llm.engine.stats()["spec_acceptance"], "ops": llm.engine.ops.name, **env}
        records.append(rec)
        print(f"{n:3d} prompt(s): dayzero ({llm.engine.ops.name} ops) {gen / t_ours:8.1f} tok/s, transformers {gen / t_hf:8.1f} tok/s, "
              f"speedup {t_hf / t_ours:5.2f}x, greedy agreement {agree}/{n}")
    print("appended to", append("cpu_throughput.jsonl", records))


if __name__ == "__main__":
    main()
