#!/usr/bin/env python3
"""Train a DSpark drafter (reference/dspark.py: three stages mtp.0..2, Markov and confidence heads) for
the built-in `shakespeare` model, on the CPU, from the frozen model's own hidden states, and ship it in
the official DSpark layout as a drafter directory (loader/drafter_dir.py).

Data (reproducible: the corpus by SHA-256 as scripts/train_builtin.py, seeded choices):
  prompts   --prompts windows of --prompt-len tokens at seeded random places of the training plays
            (the shipped tokenizer; the held-out plays Timon / Two Gentlemen are never used here),
  sequences each prompt continued greedily by the shipped target itself for --gen-len tokens
            (dayzero's engine, no speculation): what the drafter must predict when serving,
  capture   one forward of the shipped target over each sequence keeps the DSpark capture (the
            target layers' outputs averaged over the hc streams) and its greedy token at each
            position, the label: draft i of a block anchored at c is trained to be the target's
            argmax at c + i (cross-entropy), the greedy-verification acceptance event. The Markov
            head's previous token is the anchor, then the previous label (what an accepted draft is).
            Greedy labels, not the teacher's distribution: serving, tests and the benchmark verify
            greedily, and on the target's own greedy text the label is the next token itself.
  confidence head: binary cross-entropy against whether the draft's argmax equals the label.

Training runs the exact forward dayzero serves with (reference/dspark.py: write_context of every
position's context rows, draft_block over [anchor, noise x (k - 1)] blocks, official numerics), with the
stages' weights fake-quantised to their shipped FP8 / FP4 formats (straight-through), the target frozen.
Held-out acceptance (Timon / Two Gentlemen prompts, greedy continuations) is printed per block position
at the end, measured on the exported (quantised) drafter loaded back strictly.

Reproduce the shipped drafter (26 minutes on 2 heavily shared CPU cores, docs/BUILTIN.md):
    python scripts/train_dspark.py --work /tmp/dspark-work --out dayzero/builtin/shakespeare-dspark --threads 2
Data, initialisation and batches are seeded; the learning-rate schedule and the stop follow --steps or
the wall-clock --minutes, whichever runs out first (the shipped run stopped on the clock at step 95), so
a rerun independent of the load needs a clock-free schedule: e.g. --steps 95 --minutes 100000.
"""
from __future__ import annotations

import argparse
import json
import math
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from dayzero import LLM, SamplingParams
from dayzero.builtin import builtin_path
from dayzero.loader.model_io import checkpoint_state, dense_state, load_model
from dayzero.loader.writer import save_state
from dayzero.reference.dspark import draft_block, main_hidden
from dayzero.reference.model import Transformer
from dayzero.reference.seqcache import Batch

from builtin_corpus import HELDOUT, encode_docs, fetch_corpus, load_corpus, sha256
from builtin_model import RouterLoads, init_state, lr_at
from train_builtin import enable_fake_quant

CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # docs/BUILTIN.md


class TrainCache:
    """A BatchCache (reference/seqcache.py) over one [sequences, rows, *row] tensor per (layer, kind),
    written out of place so gradients flow from the block's reads back to the context rows."""

    def __init__(self, n_seq: int, n_rows: int):
        self.n_seq, self.n_rows, self.store = n_seq, n_rows, {}

    def write(self, layer, kind, seq, index, values):
        buf = self.store.get((layer, kind))
        if buf is None:
            buf = values.new_zeros((self.n_seq, self.n_rows, *values.shape[1:]))
        self.store[(layer, kind)] = buf.index_put((seq, index), values.to(buf.dtype))

    def read(self, layer, kind, seq, index):
        return self.store[(layer, kind)][seq, index]


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def windows(stream: torch.Tensor, n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - length, (n,), generator=g).tolist()
    return [stream[s:s + length].tolist() for s in starts]


def generate(prompts: list[list[int]], gen_len: int) -> torch.Tensor:
    """The shipped target's greedy continuations (engine, no speculation): [n, prompt + gen_len]."""
    llm = LLM(builtin_path(), device="cpu", speculative_config={"num_speculative_tokens": 0})
    p = SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True)
    outs = llm.generate(prompts, p)
    return torch.tensor([pr + o.token_ids for pr, o in zip(prompts, outs)])


@torch.no_grad()
def capture(target: Transformer, dargs, seqs: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(main_hidden [n, L, T * dim], the target's greedy token at each position [n, L])."""
    hid, lab = [], []
    for i in range(0, len(seqs), batch):
        ids = seqs[i:i + batch]
        B, L = ids.shape
        state = target.new_state()
        cap: dict = {}
        orig = target.args
        target.args = dargs  # forward_packed reads the capture layer ids from args
        try:
            X = target.forward_packed(ids.reshape(-1), state.batch(B, L, 0, ids.device), capture=cap)
        finally:
            target.args = orig
        hid.append(main_hidden(cap, dargs).view(B, L, -1))
        lab.append(target.logits(X, target.head_weight()).argmax(-1).view(B, L))
    return torch.cat(hid), torch.cat(lab)


# ---------------------------------------------------------------------------------------------
# the drafter's forward and loss (reference/dspark.py, as served)
# ---------------------------------------------------------------------------------------------
def block_forward(model, stages, hidden, seqs, labels, picks, k):
    """picks: (sequence, anchor position c) pairs over the sequences of `hidden` [S, L, T*dim] ->
    (draft logits [n, k, vocab], confidences [n, k], labels [n, k])."""
    S, L, _ = hidden.shape
    dev = hidden.device
    cache = TrainCache(S, L + 1)
    st0 = stages[0]
    main_x = st0.main_norm(st0.main_proj(hidden.reshape(S * L, -1)))
    ctx = Batch([0] * S, [L] * S, cache, dev)
    for st in stages:
        st.write_context(main_x, ctx)
    seq = torch.tensor([s for s, _ in picks])
    c = torch.tensor([c for _, c in picks])
    anchors = seqs[seq, c]
    blk = Batch(c.tolist(), [k] * len(picks), cache, dev, ids=seq.tolist())
    h, U = draft_block(model, stages, anchors, blk, k)
    pos = c[:, None] + torch.arange(k)[None, :]
    lab = labels[seq[:, None], pos]  # the target's argmax at c + i: the token after it
    prev = torch.cat([anchors[:, None], lab[:, :-1]], 1)
    last = stages[-1]
    logits, conf = [], []
    for i in range(k):
        e = last.markov_head.embed(prev[:, i])
        logits.append(U[:, i] + last.markov_head.bias(e))
        conf.append(last.confidence_head(h[:, i], e))
    return torch.stack(logits, 1), torch.stack(conf, 1), lab


def picks_for(n_seq: int, L: int, first: int, k: int, per_seq: int, g: torch.Generator):
    out = []
    for s in range(n_seq):
        for c in torch.randint(first, L - k + 1, (per_seq,), generator=g).tolist():
            out.append((s, c))
    return out


@torch.no_grad()
def acceptance(model, stages, hidden, seqs, labels, first, k, chunk=8) -> dict:
    """Greedy acceptance per block position on every anchor c >= first: position i accepted when the
    drafts 0..i all equal the target's tokens (drafts sampled left to right, the Markov head on the
    previous draft, as served)."""
    n, L, _ = hidden.shape
    acc = torch.zeros(k)
    blocks = 0
    last = stages[-1]
    for s0 in range(0, n, chunk):
        S = min(chunk, n - s0)
        picks = [(s, c) for s in range(S) for c in range(first, L - k + 1)]
        sub = hidden[s0:s0 + S]
        cache = TrainCache(S, L + 1)
        st0 = stages[0]
        main_x = st0.main_norm(st0.main_proj(sub.reshape(S * L, -1)))
        ctx = Batch([0] * S, [L] * S, cache, hidden.device)
        for st in stages:
            st.write_context(main_x, ctx)
        seq = torch.tensor([s for s, _ in picks])
        c = torch.tensor([c for _, c in picks])
        anchors = seqs[s0:s0 + S][seq, c]
        h, U = draft_block(model, stages, anchors, Batch(c.tolist(), [k] * len(picks), cache, hidden.device,
                                                         ids=seq.tolist()), k)
        lab = labels[s0:s0 + S][seq[:, None], c[:, None] + torch.arange(k)[None, :]]
        prev, ok = anchors, torch.ones(len(picks), dtype=torch.bool)
        for i in range(k):
            d = (U[:, i] + last.markov_head.bias(last.markov_head.embed(prev))).argmax(-1)
            ok = ok & (d == lab[:, i])
            acc[i] += ok.sum()
            prev = d
        blocks += len(picks)
    per = (acc / blocks).tolist()
    return {"blocks": blocks, "accepted_through_position": per, "mean_accepted_drafts": sum(per),
            "tokens_per_step": 1 + sum(per)}


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/dspark-work", help="corpus, generated data, logs")
    ap.add_argument("--out", default="dayzero/builtin/shakespeare-dspark", help="the drafter directory to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=192, help="training prompts (windows of the training plays)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=96, help="greedy tokens the target adds to each prompt")
    ap.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts (Timon / Two Gentlemen)")
    ap.add_argument("--block", type=int, default=4, help="dspark_block_size (draft tokens per block, <= 5)")
    ap.add_argument("--markov-rank", type=int, default=64)
    ap.add_argument("--target-layers", default="1,2,3", help="dspark_target_layer_ids")
    ap.add_argument("--noise-token", type=int, default=12,
                    help="dspark_noise_token_id (12: <｜latest_reminder｜>, a special token Shakespeare never uses)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--minutes", type=float, default=14.0, help="stop training after this wall time")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--anchors", type=int, default=24, help="draft blocks per sequence per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--conf-weight", type=float, default=0.1)
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    t0 = time.time()
    work, out = Path(opts.work), Path(opts.out)
    work.mkdir(parents=True, exist_ok=True)
    tarball = fetch_corpus(work)
    if sha256(tarball) != CORPUS_SHA256:
        raise SystemExit(f"{tarball}: SHA-256 {sha256(tarball)} is not the corpus's {CORPUS_SHA256}")
    texts = load_corpus(tarball)
    tok = builtin_path() / "tokenizer.json"
    train_stream = encode_docs(tok, [t for n, t in texts.items() if n not in HELDOUT])
    val_stream = encode_docs(tok, [texts[n] for n in HELDOUT])

    target = load_model(builtin_path(), numerics="official", dtype=torch.float32)
    k = opts.block
    dargs = target.args.replace(n_mtp_layers=0, dspark_stages=3, dspark_block_size=k,
                                dspark_noise_token_id=opts.noise_token,
                                dspark_target_layer_ids=tuple(int(x) for x in opts.target_layers.split(",")),
                                dspark_markov_rank=opts.markov_rank)
    L = opts.prompt_len + opts.gen_len
    data = work / f"data-{opts.seed}-{opts.prompts}-{L}.pt"
    if data.exists():
        seqs, val = torch.load(data)
    else:
        seqs = generate(windows(train_stream, opts.prompts, opts.prompt_len, opts.seed), opts.gen_len)
        val = generate(windows(val_stream, opts.eval_prompts, opts.prompt_len, opts.seed + 1), opts.gen_len)
        torch.save((seqs, val), data)
    print(f"data: {len(seqs)} train / {len(val)} held-out sequences of {L} tokens "
          f"({time.time() - t0:.0f}s)", flush=True)
    hidden, labels = capture(target, dargs, seqs)
    vhidden, vlabels = capture(target, dargs, val)
    agree = (labels[:, opts.prompt_len - 1:-1] == seqs[:, opts.prompt_len:]).float().mean().item()
    print(f"capture done ({time.time() - t0:.0f}s); target argmax = generated token at {agree:.4f} of positions",
          flush=True)

    # the drafter: a dense fp32 copy of the DSpark model, backbone from the shipped target (frozen;
    # only embed and head are used), stages initialised as the built-in model was
    dense = dargs.replace(quant=None, expert_dtype=None, dtype="float32")
    model = Transformer(dense, numerics="official", compute_dtype=torch.float32)
    state = init_state(model, opts.seed)
    state.update({n: t for n, t in dense_state(target).items() if not n.startswith("mtp.")})
    model.load_state_dict(state, strict=True)
    enable_fake_quant(model, dargs)
    stages = model.mtp
    params = []
    for n, p in model.named_parameters():
        train = n.startswith("mtp.") and p.is_floating_point() and not n.endswith("gate.bias")
        p.requires_grad_(train)
        if train:
            params.append(p)
    loads = RouterLoads(model)
    opt = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.95), weight_decay=0.01)
    print(f"drafter: {sum(p.numel() for p in params):,} trainable parameters; block {k}, target layers "
          f"{list(dargs.dspark_target_layer_ids)}, markov rank {opts.markov_rank}", flush=True)
    first = opts.prompt_len  # anchors in the generated part (the positions serving drafts from)
    g = torch.Generator().manual_seed(opts.seed)
    log = []
    start, budget = time.time(), 60 * opts.minutes
    step = 0
    model.train()
    while step < opts.steps and time.time() < start + budget:
        # cosine schedule over --steps or the wall-clock budget, whichever runs out first
        progress = max(step, int(opts.steps * (time.time() - start) / budget))
        for pg in opt.param_groups:
            pg["lr"] = lr_at(progress, opts.steps, opts.lr, 30)
        b = torch.randint(0, len(seqs), (opts.batch,), generator=g)
        picks = picks_for(opts.batch, L, first, k, opts.anchors, g)
        logits, conf, lab = block_forward(model, stages, hidden[b], seqs[b], labels[b], picks, k)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1))
        hit = (logits.argmax(-1) == lab).float()
        bce = F.binary_cross_entropy(conf.clamp(1e-6, 1 - 1e-6), hit)
        loss = ce + opts.conf_weight * bce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loads.update(1e-3)
        step += 1
        log.append({"step": step, "ce": ce.item(), "bce": bce.item(), "hit": hit.mean(0).tolist()})
        if step % 20 == 0 or step == 1:
            print(f"step {step} ce {ce.item():.3f} bce {bce.item():.3f} hit/pos "
                  f"{[round(x, 3) for x in hit.mean(0).tolist()]} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    for m in model.modules():
        m.__dict__.pop("dequant", None)

    # ship: the official DSpark tensors (FP8 / FP4 / BF16 / F32 as the target's formats), mtp.* only
    full = checkpoint_state(dargs, {n: t.detach().float() if t.is_floating_point() else t
                                    for n, t in model.state_dict().items()})
    save_state(out, {n: t for n, t in full.items() if n.startswith("mtp.")}, dargs.to_hf_dict(), overwrite=True)
    shipped = load_model(builtin_path(), numerics="official", dtype=torch.float32, drafter=out)
    view = types.SimpleNamespace(args=shipped.args, embed_tokens=shipped.embed_tokens, head_weight=shipped.head_weight)
    held = acceptance(view, shipped.mtp, vhidden, val, vlabels, first, k)
    train_acc = acceptance(view, shipped.mtp, hidden[:16], seqs[:16], labels[:16], first, k)
    metrics = {"corpus_sha256": CORPUS_SHA256, "opts": vars(opts), "steps": step,
               "train_sequences": len(seqs), "train_tokens": int(seqs.numel()),
               "generated_tokens": len(seqs) * opts.gen_len, "label_agreement": agree,
               "minutes": (time.time() - t0) / 60, "heldout": held, "train_subset": train_acc,
               "size_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
               "final_ce": sum(r["ce"] for r in log[-20:]) / max(len(log[-20:]), 1)}
    (work / "dspark_metrics.json").write_text(json.dumps({**metrics, "log": log}, indent=1) + "\n")
    print("held-out acceptance (shipped drafter, greedy, per block position, cumulative):",
          [round(x, 4) for x in held["accepted_through_position"]], flush=True)
    print(json.dumps({k_: v for k_, v in metrics.items() if k_ != "opts"}), flush=True)


if __name__ == "__main__":
    main()
