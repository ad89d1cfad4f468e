"""The draft policy (engine/draft_policy.py) against its same-run baselines: generation with no
speculation, with every draft verified ("fixed") and with the adaptive draft length, on the same
model, prompts and greedy settings, runs interleaved (none, fixed, adaptive, none, ...) so that
drift in the machine's load hits all three alike.

    python -m bench.draft_policy [--model DIR] [--batch 1 8] [--new-tokens 48] [--reps 3]

Default model: the built-in one (its own MTP drafter). Each engine first runs the workload once
(warm-up; the adaptive engine's step-cost table fills there, as a server's does in its first
steps); engines are built per batch size with default options, so speculation may turn itself
off (low acceptance; for the adaptive policy also when the drafter's own time does not pay). Prints tokens/s per configuration (median of the reps) and its ratio to no speculation,
the acceptance, the mean accepted and mean chosen draft lengths, and checks that all three give
the same tokens. No roofline fraction: this compares policies on one device, it does not rate the
device. Appends records to bench/results/draft_policy.jsonl. Not part of CI.
"""
from __future__ import annotations

import argparse
import statistics
import time

from bench.common import append, environment
from dayzero import LLM, SamplingParams

TEXTS = ["KING LEAR:\nAttend the lords of France and Burgundy, Gloucester.\n",
         "ROMEO:\nBut, soft! what light through yonder window breaks?\n", "First Citizen:\n",
         "HAMLET:\nTo be, or not to be, that is the question:\n", "JULIET:\nO Romeo, Romeo!\n",
         "MACBETH:\nIs this a dagger which I see before me,\n", "PROSPERO:\nOur revels now are ended.\n",
         "PORTIA:\nThe quality of mercy is not strain'd,\n"]
CONFIGS = {"none": {"num_speculative_tokens": 0}, "fixed": {"draft_policy": "fixed"},
           "adaptive": {"draft_policy": "adaptive"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="official-layout checkpoint (default: the built-in model)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    params = SamplingParams(temperature=0.0, max_tokens=a.new_tokens, ignore_eos=True)
    env, records = environment(), []
    for n in a.batch:
        prompts = [TEXTS[i % len(TEXTS)] for i in range(n)]
        # fresh engines per batch size, default options (speculation may turn itself off)
        llms = {name: LLM(a.model, device=a.device, speculative_config=cfg) for name, cfg in CONFIGS.items()}
        for llm in llms.values():
            llm.generate(prompts, params)  # warm-up
        times = {name: [] for name in llms}
        before = {name: dict(llm.engine.stats()) for name, llm in llms.items()}
        tokens = {}
        for _ in range(a.reps):
            for name, llm in llms.items():
                t = time.perf_counter()
                out = llm.generate(prompts, params)
                times[name].append(time.perf_counter() - t)
                tokens[name] = [o.token_ids for o in out]
        same = tokens["none"] == tokens["fixed"] == tokens["adaptive"]
        gen = n * a.new_tokens
        base = statistics.median(times["none"])
        for name, llm in llms.items():
            st, b = llm.engine.stats(), before[name]
            d = st["spec_draft_tokens"] - b["spec_draft_tokens"]
            acc = st["spec_accepted_tokens"] - b["spec_accepted_tokens"]
            steps = st["spec_verify_steps"] - b["spec_verify_steps"]
            props = st["spec_proposal_steps"] - b["spec_proposal_steps"]
            t = statistics.median(times[name])
            rec = {"scenario": f"draft policy {name}, {n} prompt(s)", "policy": name, "batch": n,
                   "new_tokens": a.new_tokens, "reps": a.reps, "time_us": t * 1e6, "times_s": times[name],
                   "tokens_per_s": gen / t, "baseline_name": "no speculation (same model, prompts, run)",
                   "baseline_tokens_per_s": gen / base, "ratio_to_baseline": base / t,
                   "acceptance": acc / d if d else None, "mean_accepted_length": acc / steps if steps else None,
                   "mean_draft_length": d / props if props else None, "method": st["spec_method"],
                   "k": st["spec_num_speculative_tokens"], "step_cost_seconds": st["spec_step_cost_seconds"],
                   "spec_enabled_at_end": st["spec_enabled"], "payoff": st["spec_payoff"],
                   "same_tokens_as_baseline": same, "ops": llm.engine.ops.name, **env}
            records.append(rec)
            acc_s = f"{acc / d:5.1%}" if d else "    -"
            dl = f"{d / props:4.2f}" if props else "   -"
            print(f"{n:3d} prompt(s) {name:9s} {gen / t:8.1f} tok/s ({base / t:4.2f}x none), acceptance {acc_s}, "
                  f"mean draft length {dl} of {st['spec_num_speculative_tokens']}, "
                  f"{'on' if st['spec_enabled'] else 'off'} at the end, same tokens: {same}")
    print("appended to", append("draft_policy.jsonl", records))


if __name__ == "__main__":
    main()
