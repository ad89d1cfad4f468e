"""The deviation of V4.1's bounded-replay prefill (dayzero/v41/replay.py) from the exact prefill, on tiny
random-weight V4.1 models (random weights are all there is: no trained V4.1 fits here).

For each schedule, window and prompt length: prefill exactly and with bounded replay (fresh states,
same weights and prompt), then compare the next-token logits after the prompt (max abs, max abs
relative to the exact logits' max abs, KL(exact || replay) in nats) and decode N greedy tokens from each
state on its own (each continues its own greedy tokens; agreement = leading tokens equal, and the
positionwise count).

    PYTHONPATH=. python bench/v41_replay.py [--tokens 16] [--seeds 3] [--json bench/results/v41_replay.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch

from dayzero.testing import random_state, tiny_tokenizer
from dayzero.v41 import V41Args
from dayzero.v41.model import V41Transformer
from dayzero.v41.replay import replay_start
from dayzero.v41.toy import TEXT, tiny_config

# (name, text_config changes): the toy's Flash-like schedule (2 sliding, a pooled group, a ratio-1
# candidate group whose layers 6-7 are the decoder part: reuse + re-index inside candidates) with Engram
# on layers 1 and 6 (one in the decoder part), and a two-layer decoder part after a pooled group
SCHEDULES = {
    "toy-flash-8": dict(engram_layer_ids=[1, 6]),
    "pooled-then-2-decoder": dict(num_hidden_layers=6, compress_ratios=[0, 2, 2, 1, 1, 1], kv_source_layer_ids=[1, 3],
                                  index_source_layer_ids=[1, 3, 5], candidate_source_layer_id=3,
                                  engram_layer_ids=[2]),
}


def build(changes: dict, window: int = 4, seed: int = 0) -> V41Transformer:
    """A tiny random-weight V4.1 (dense fp32 weights) with the toy tokenizer bound for Engram."""
    from tokenizers import Tokenizer

    text = copy.deepcopy(TEXT)
    text.update(changes, sliding_window=window, head_dim=40, index_head_dim=24)  # widths no fake-quant block divides
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer.json"
        tiny_tokenizer(tok, vocab_size=320)
        cfg = tiny_config(tok, "bf16", text)
        model = V41Transformer(V41Args.from_dict(cfg).replace(quant=None, expert_dtype=None))
        model.load_state_dict(random_state(model, seed=seed))
        return model.eval().bind_tokenizer(Tokenizer.from_file(str(tok)))


@torch.no_grad()
def greedy(model: V41Transformer, prompt: torch.Tensor, n: int, bounded: bool) -> tuple[torch.Tensor, list[int]]:
    """(logits after the prompt [vocab], n greedy tokens), prefilled exactly or with bounded replay."""
    state = model.new_state()
    first = model(prompt, state, bounded_replay=bounded)[0, -1]
    tokens, nxt = [], first
    for _ in range(n):
        tokens.append(int(nxt.argmax()))
        nxt = model(torch.tensor([[tokens[-1]]]), state)[0, -1]
    return first, tokens


def deviation(exact: torch.Tensor, approx: torch.Tensor) -> dict:
    diff = (exact - approx).abs().max().item()
    lp, lq = exact.log_softmax(-1), approx.log_softmax(-1)
    return {"max_abs": diff, "rel": diff / exact.abs().max().item(),
            "kl": (lp.exp() * (lp - lq)).sum().item(), "top1_equal": int(exact.argmax()) == int(approx.argmax())}


def measure(name: str, window: int, lengths, seeds, n_tokens: int) -> list[dict]:
    model = build(SCHEDULES[name], window)
    out = []
    for length in lengths:
        for seed in seeds:
            prompt = torch.randint(0, model.args.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
            le, te = greedy(model, prompt, n_tokens, False)
            lr, tr = greedy(model, prompt, n_tokens, True)
            lead = next((i for i, (a, b) in enumerate(zip(te, tr)) if a != b), n_tokens)
            out.append({"schedule": name, "window": window, "prompt": length, "seed": seed,
                        "floor": replay_start(length, window), "bit_exact": torch.equal(le, lr),
                        **deviation(le, lr), "greedy_leading_equal": lead,
                        "greedy_positions_equal": sum(a == b for a, b in zip(te, tr)), "tokens": n_tokens})
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens decoded after each prefill")
    p.add_argument("--seeds", type=int, default=3, help="prompts per length")
    p.add_argument("--json", default="bench/results/v41_replay.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    recs = []
    for name in SCHEDULES:
        for window, lengths in ((4, (3, 4, 8, 16, 64)), (16, (16, 32, 64, 128)), (128, (128, 256, 512))):
            recs += measure(name, window, lengths, range(a.seeds), a.tokens)
    print(f"{'schedule':24s} {'W':>3s} {'L':>4s} {'exact':>5s} {'max|d|':>9s} {'rel':>9s} {'KL nats':>9s} "
          f"{'top1':>4s} {'greedy lead/pos':>15s}")
    for r in recs:
        print(f"{r['schedule']:24s} {r['window']:3d} {r['prompt']:4d} {str(r['bit_exact']):>5s} {r['max_abs']:9.2e} "
              f"{r['rel']:9.2e} {r['kl']:9.2e} {str(r['top1_equal']):>4s} "
              f"{r['greedy_leading_equal']:>6d}/{r['greedy_positions_equal']:2d} of {r['tokens']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(recs, indent=1) + "\n")
    return recs


if __name__ == "__main__":
    main()
