"""How far 2 tensor-parallel ranks are from 1 beyond fp32 `transformers` numerics: greedy tokens
and full-sequence logits of a tiny random FP8/FP4 checkpoint (tiny "flash" config, moe_intermediate
256 so the experts split on 128 blocks), in `official` numerics (FP8 simulation), fp32 and bf16,
with experts split by inner dim and with expert parallel. Not a test: FP8 rounding turns summation
order into other tokens (issue 20); this measures how often.

    python -m bench.tp_agreement            # prints a table, writes bench/results/tp_agreement.json
"""
from __future__ import annotations

import json
import tempfile

import torch

from bench.common import RESULTS, environment
from dayzero import LLM, SamplingParams
from dayzero.loader.model_io import checkpoint_state
from dayzero.loader.writer import save_state
from dayzero.reference.model import Transformer
from dayzero.testing import random_state, tiny_args


def checkpoint(d: str) -> str:
    args = tiny_args("flash", n_mtp_layers=1, moe_inter_dim=256)
    target = args.replace(quant="fp8", expert_dtype="fp4", dtype="bfloat16")
    save_state(d, checkpoint_state(target, random_state(Transformer(args), seed=0)), target.to_hf_dict())
    return d


def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().amax(-1) / b.abs().amax(-1)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 500, (n,), generator=g).tolist() for n in (5, 23, 40, 17, 61, 33)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    out = {"environment": environment(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        d = checkpoint(tmp)
        for dt in ("float32", "bfloat16"):
            one = LLM(d, numerics="official", dtype=dt)
            want = [o.token_ids for o in one.generate(prompts, params)]
            s1 = one.score(prompts[4])
            for ep in (False, True):
                with LLM(d, numerics="official", dtype=dt, tensor_parallel_size=2, enable_expert_parallel=ep) as two:
                    got = [o.token_ids for o in two.generate(prompts, params)]
                    e = rel(two.score(prompts[4]), s1)
                same = sum(x == y for a, b in zip(want, got) for x, y in zip(a, b))
                first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(want, got)]
                run = {"dtype": dt, "enable_expert_parallel": ep, "equal_tokens": same,
                       "tokens": sum(map(len, want)), "first_divergence": first,
                       "logits_rel_first_position": float(e[0]), "logits_rel_max": float(e.max())}
                out["runs"].append(run)
                print(f"{dt:9} ep={ep!s:5} tokens equal {same}/{run['tokens']}, first divergence {first}, "
                      f"logits rel: position 0 {run['logits_rel_first_position']:.2e}, max {run['logits_rel_max']:.2e}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tp_agreement.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
