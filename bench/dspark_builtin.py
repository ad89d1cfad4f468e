"""DSpark vs MTP-1 vs no speculation on the built-in model, same run, on held-out text.

    python -m bench.dspark_builtin [--batch 1 32] [--new-tokens 64] [--reps 3]

Engines (all the built-in `shakespeare` backbone, greedy, same prompts):
  none     speculation off
  mtp      the built-in model's MTP module, one draft token per step
  dspark   the trained drafter `shakespeare-dspark` (docs/BUILTIN.md), blocks of its
           dspark_block_size, loaded with speculative_config={"method": "dspark", "model": ...}
mtp and dspark verify every draft ("draft_policy": "fixed", speculative_min_acceptance 0) so acceptance
and mean accepted length are the drafter's own; `dspark-adaptive` is the engine's default policy, which
drafts only where its measured step cost says it pays. Prompts: passages of the held-out plays (Timon
of Athens, The Two Gentlemen of Verona), never trained on by the model or the drafter. Runs interleave
(none, mtp, dspark, ...) so drift in the machine's load hits all alike; the load average is recorded.

Prints per configuration: tokens/s (the fastest of the reps: on a shared machine contention only adds
time, and one stalled rep of two moves a median by 10x; the median is recorded too) and its ratio to none, acceptance (accepted /
verified drafts), mean accepted draft tokens per verifying request-step and tokens per request-step
(1 + that: the target's own token too), and whether all configurations give the same tokens. No
roofline fraction: this compares drafters on one device, it does not rate the device. Appends to
bench/results/dspark_builtin.jsonl. Not part of CI.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from bench.common import append, environment
from dayzero import LLM, SamplingParams

# held-out passages (Project Gutenberg texts of the two held-out plays, cleaned as the corpus is)
TEXTS = [
    "FLAMINIUS:\nAs you have said, my lord.\n\nFLAVIUS:\n[Aside.] Lord Lucius and Lucullus? hum!\n\n",
    "FLAVIUS:\nI have been bold,--\nFor that I knew it the most general way,--\nTo them to use your signet and "
    "your name;\n",
    "TIMON:\nIs't true? can't be?\n\nFLAVIUS:\nThey answer, in a joint and corporate voice,\n",
    "VALENTINE:\nWelcome, dear Proteus! Mistress, I beseech you\nConfirm his welcome with some special favour.\n\n",
    "SILVIA:\nHis worth is warrant for his welcome hither,\nIf this be he you oft have wish'd to hear from.\n\n",
    "PROTEUS:\nNot so, sweet lady; but too mean a servant\nTo have a look of such a worthy mistress.\n\n",
    "VALENTINE:\nLeave off discourse of disability;\nSweet lady, entertain him for your servant.\n\n",
    "SILVIA:\nToo low a mistress for so high a servant.\n\n",
]
FIXED = {"draft_policy": "fixed"}
CONFIGS = {"none": {"num_speculative_tokens": 0}, "mtp": {"method": "mtp", **FIXED},
           "dspark": {"method": "dspark", "model": "shakespeare-dspark", **FIXED},
           "dspark-adaptive": {"method": "dspark", "model": "shakespeare-dspark"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    params = SamplingParams(temperature=0.0, max_tokens=a.new_tokens, ignore_eos=True)
    env, records = environment(), []
    for n in a.batch:
        prompts = [TEXTS[i % len(TEXTS)] for i in range(n)]
        llms = {name: LLM(device=a.device, speculative_config=CONFIGS[name],
                          speculative_min_acceptance=0.0 if name in ("mtp", "dspark") else 0.3)
                for name in a.configs}
        for llm in llms.values():
            llm.generate(prompts, params)  # warm-up (the adaptive policy's step-cost table fills here)
        times = {name: [] for name in llms}
        before = {name: dict(llm.engine.stats()) for name, llm in llms.items()}
        tokens, load = {}, []
        for _ in range(a.reps):
            for name, llm in llms.items():
                load.append(os.getloadavg()[0])
                t = time.perf_counter()
                out = llm.generate(prompts, params)
                times[name].append(time.perf_counter() - t)
                tokens[name] = [o.token_ids for o in out]
        same = all(tokens[name] == tokens[a.configs[0]] for name in tokens)
        gen = n * a.new_tokens
        base = min(times["none"]) if "none" in times else None
        for name, llm in llms.items():
            st, b = llm.engine.stats(), before[name]
            d = st["spec_draft_tokens"] - b["spec_draft_tokens"]
            acc = st["spec_accepted_tokens"] - b["spec_accepted_tokens"]
            steps = st["spec_verify_steps"] - b["spec_verify_steps"]
            t = min(times[name])
            mal = acc / steps if steps else None
            rec = {"scenario": f"built-in drafter {name}, batch {n}", "config": name, "batch": n,
                   "speculative_config": CONFIGS[name], "new_tokens": a.new_tokens, "reps": a.reps,
                   "time_us": t * 1e6, "times_s": times[name], "tokens_per_s": gen / t, "statistic": "min of reps",
                   "median_tokens_per_s": gen / statistics.median(times[name]),
                   "baseline_name": "no speculation (same model, prompts, run)",
                   "baseline_tokens_per_s": gen / base if base else None,
                   "ratio_to_baseline": base / t if base else None,
                   "acceptance": acc / d if d else None, "mean_accepted_length": mal,
                   "tokens_per_request_step": 1 + mal if mal is not None else None,
                   "method": st["spec_method"], "k": st["spec_num_speculative_tokens"],
                   "spec_enabled_at_end": st["spec_enabled"], "same_tokens_as_baseline": same,
                   "load_average_1min": load, "ops": llm.engine.ops.name, **env}
            records.append(rec)
            acc_s = f"{acc / d:6.1%}" if d else "     -"
            mal_s = f"{mal:4.2f}" if mal is not None else "   -"
            ratio = f"{base / t:4.2f}x none" if base else ""
            print(f"batch {n:3d} {name:15s} {gen / t:8.1f} tok/s ({ratio}), acceptance {acc_s}, mean accepted "
                  f"{mal_s} of k={st['spec_num_speculative_tokens']} per step, same tokens: {same}, "
                  f"load {min(load):.1f}-{max(load):.1f}", flush=True)
    print("appended to", append("dspark_builtin.jsonl", records))


if __name__ == "__main__":
    main()
