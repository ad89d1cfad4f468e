"""Lightning-indexer distillation for the built-in model (DeepSeek-V3.2's indexer training, used by
`train_builtin.py indexer`).

For each query t of a CSA layer and its usable compressed entries s < (t + 1) // r:
  target p_t[s] = the layer's DENSE attention (window + every usable entry, sink in the
                  denominator) on entry s, summed over heads, L1-normalised over the entries;
                  detached (Attention.entry_target);
  q_t = softmax over the usable entries of the indexer's pre-top-k scores I[t, s];
  loss = KL(p_t || q_t), averaged over the queries with >= 1 usable entry, then over CSA layers.
The indexer's inputs (x, q_lat) enter detached, so the loss reaches only the indexer's own
parameters (`wq_b`, `weights_proj`, its compressor). The capture is the training-only hook
`Indexer.capture` of dayzero/reference/attention.py.

Stages:
  warmup  everything but the indexers frozen, KL loss only (V3.2 "dense warm-up"; the forward
          itself keeps the model's top-k selection, the target is the dense attention).
  sparse  the whole model trains on its LM loss (+ MTP) with the indexer's top-k selecting, and the
          indexer keeps its KL loss (V3.2 "sparse training"; indexer input detached).
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from dayzero.config import ModelArgs
from dayzero.loader.model_io import dense_state, load_model
from dayzero.reference.attention import Indexer
from dayzero.reference.model import Transformer


# ---------------------------------------------------------------------------------------------
# capture and parameters
# ---------------------------------------------------------------------------------------------
def indexers(model: Transformer) -> list[Indexer]:
    return [m for m in model.modules() if isinstance(m, Indexer)]


@contextlib.contextmanager
def capturing(model: Transformer):
    """Within the block every CSA layer's forward appends its record to the yielded list."""
    records: list[dict] = []
    for ix in indexers(model):
        ix.capture = records
    try:
        yield records
    finally:
        for ix in indexers(model):
            ix.__dict__.pop("capture", None)


def indexer_param_names(model: Transformer) -> list[str]:
    return [n for n, p in model.named_parameters() if ".indexer." in n and p.is_floating_point()]


def freeze_all_but_indexers(model: Transformer) -> list[torch.nn.Parameter]:
    """requires_grad only on the indexers' floating parameters; returns them."""
    names = set(indexer_param_names(model))
    out = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
        if n in names:
            out.append(p)
    return out


# ---------------------------------------------------------------------------------------------
# loss and metrics
# ---------------------------------------------------------------------------------------------
def kl_rows(scores: torch.Tensor, target: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(scores)) over usable entries, per query with >= 1 usable entry -> [M]."""
    rows = usable.any(-1)
    s, p, u = scores[rows], target[rows], usable[rows]
    logq = torch.log_softmax(s.masked_fill(~u, float("-inf")), -1).masked_fill(~u, 0.0)
    p = p.masked_fill(~u, 0.0)
    return (torch.special.xlogy(p, p) - p * logq).sum(-1)


def kl_loss(records: list[dict]) -> tuple[torch.Tensor, dict[int, float]]:
    """Mean over CSA layers of the mean per-query KL -> (loss, {layer: KL})."""
    per, terms = {}, []
    for r in records:
        kl = kl_rows(r["scores"], r["target"], r["usable"])
        if kl.numel():
            terms.append(kl.mean())
            per[r["layer"]] = kl.mean().item()
    if not terms:
        return torch.zeros(()), per
    return torch.stack(terms).mean(), per


@torch.no_grad()
def recall_counts(scores: torch.Tensor, target: torch.Tensor, usable: torch.Tensor, k: int) -> dict[str, float]:
    """Top-k recall: of each query's top-min(k, n_usable) target entries, how many the indexer's
    top-min(k, n_usable) (its selection: stable descending sort) contains. Counts over all queries
    with a usable entry and over the 'pruning' ones (more than k usable entries)."""
    n = usable.sum(-1)
    rows = n > 0
    if not rows.any():
        return {"hits": 0, "total": 0, "hits_pruning": 0, "total_pruning": 0, "mass_pruning": 0.0,
                "best_mass_pruning": 0.0, "rows_pruning": 0}
    s = scores[rows].masked_fill(~usable[rows], float("-inf"))
    p = target[rows].masked_fill(~usable[rows], -1.0)
    n = n[rows]
    kk = min(k, s.shape[-1])
    sel = s.sort(dim=-1, descending=True, stable=True).indices[:, :kk]
    ref = p.sort(dim=-1, descending=True, stable=True).indices[:, :kk]
    live = torch.arange(kk)[None, :] < n.clamp(max=kk)[:, None]  # the first min(k, n) of each
    mark = torch.zeros_like(s, dtype=torch.bool).scatter_(1, sel, live)  # sel: distinct ids
    hits = (torch.gather(mark, 1, ref) & live).sum(-1)
    prune = n > k
    pt = target[rows]
    mass = (torch.gather(pt, 1, sel) * live).sum(-1)  # target mass on the indexer's selection
    best = (torch.gather(pt, 1, ref) * live).sum(-1)  # the most any k entries hold
    return {"hits": hits.sum().item(), "total": live.sum().item(),
            "hits_pruning": hits[prune].sum().item(), "total_pruning": live[prune].sum().item(),
            "mass_pruning": mass[prune].sum().item(), "best_mass_pruning": best[prune].sum().item(),
            "rows_pruning": prune.sum().item()}


@torch.no_grad()
def measure(model: Transformer, windows: torch.Tensor, k: int, batch: int = 8) -> dict:
    """Per CSA layer on `windows` (one forward each, no LM loss): mean KL over queries with a usable
    entry, top-k recall (all such queries, and the 'pruning' ones with more than k usable entries),
    and for the pruning queries the target mass on the indexer's k entries vs the best k."""
    was = model.training
    model.eval()
    acc: dict[int, dict[str, float]] = {}
    for i in range(0, len(windows), batch):
        with capturing(model) as recs:
            model(windows[i:i + batch])
        for r in recs:
            a = acc.setdefault(r["layer"], {"kl_sum": 0.0, "rows": 0, "hits": 0, "total": 0, "hits_pruning": 0,
                                            "total_pruning": 0, "mass_pruning": 0.0, "best_mass_pruning": 0.0,
                                            "rows_pruning": 0})
            kl = kl_rows(r["scores"], r["target"], r["usable"])
            a["kl_sum"] += kl.sum().item()
            a["rows"] += kl.numel()
            for key, v in recall_counts(r["scores"], r["target"], r["usable"], k).items():
                a[key] += v
    model.train(was)
    out = {}
    for layer, a in sorted(acc.items()):
        rp = max(a["rows_pruning"], 1)
        out[f"layer{layer}"] = {"kl": a["kl_sum"] / max(a["rows"], 1), "queries": a["rows"],
                                f"recall@{k}": a["hits"] / max(a["total"], 1),
                                f"recall@{k}_pruning": a["hits_pruning"] / max(a["total_pruning"], 1),
                                "queries_pruning": a["rows_pruning"],
                                "target_mass_selected_pruning": a["mass_pruning"] / rp,
                                f"target_mass_best{k}_pruning": a["best_mass_pruning"] / rp}
    keys = ("kl", f"recall@{k}", f"recall@{k}_pruning", "target_mass_selected_pruning",
            f"target_mass_best{k}_pruning")
    layers = list(out.values())
    out["mean"] = {key: sum(v[key] for v in layers) / len(layers) for key in keys}
    return out


# ---------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------
def warmup_step(model: Transformer, opt, params, ids: torch.Tensor, clip: float) -> tuple[float, dict]:
    """One optimizer step of the KL loss on the indexers only (the LM head output is unused)."""
    with capturing(model) as recs:
        model(ids)
    loss, per = kl_loss(recs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    return loss.item(), per


def sparse_step(model: Transformer, opt, main_params, idx_params, loads, ids: torch.Tensor, mtp_weight: float,
                kl_weight: float, clip: float, bias_gamma: float) -> dict:
    """Main LM loss + mtp_weight x MTP loss for the whole model (top-k from the indexer) plus
    kl_weight x KL for the indexers (their input detached: each loss reaches only its own side);
    gradients clipped per side; then the router-bias update."""
    from builtin_model import losses

    with capturing(model) as recs:
        main, mtp = losses(model, ids)
    kl, per = kl_loss(recs)
    loss = main + mtp_weight * mtp + kl_weight * kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(main_params, clip)
    torch.nn.utils.clip_grad_norm_(idx_params, clip)
    opt.step()
    return {"loss": loss.item(), "main": main.item(), "mtp": mtp.item(), "kl": kl.item(), "kl_layers": per,
            "max_load": loads.update(bias_gamma)}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min((step - warmup) / max(total - warmup, 1), 1.0)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


# ---------------------------------------------------------------------------------------------
# starting point
# ---------------------------------------------------------------------------------------------
def load_start(path: str | Path) -> tuple[Transformer, dict]:
    """An fp32 `transformers`-numerics model from a training checkpoint (`ckpt.pt` of
    `train_builtin.py train`, or a directory holding one) or from a hub-layout directory (e.g. the
    shipped FP8/FP4 model: its weights dequantised to fp32). -> (model, the checkpoint's extra
    fields: step, elapsed, source)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        hub = load_model(path, numerics="transformers", dtype=torch.float32)
        args = hub.args.replace(quant=None, expert_dtype=None, dtype="float32")
        model = Transformer(args, numerics="transformers", compute_dtype=torch.float32)
        model.load_state_dict(dense_state(hub), strict=True)
        return model, {"source": f"hub:{path}", "step": None, "elapsed": None}
    if path.is_dir():
        path = path / "ckpt.pt"
    ck = torch.load(path, weights_only=False)
    args = ModelArgs.from_dict(ck["args"])
    model = Transformer(args, numerics="transformers", compute_dtype=torch.float32)
    model.load_state_dict(ck["model"], strict=True)
    return model, {"source": f"ckpt:{path}", "step": ck.get("step"), "elapsed": ck.get("elapsed")}


def plot(warmup_log: str, sparse_log: str, png: str) -> None:
    """The indexer-stage figure of docs/BUILTIN.md from the two stages' indexer_log.csv files:
    per-layer KL over both stages and the sparse stage's LM loss."""
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, s = (list(csv.DictReader(open(p))) for p in (warmup_log, sparse_log))
    n = len(w)
    x = [int(r["step"]) for r in w] + [n + int(r["step"]) for r in s]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, name in enumerate(("layer 1", "layer 3")):
        ax[0].plot(x, [float(r["kl_layers"].split()[i]) for r in w + s], label=f"KL, CSA {name}", lw=0.8)
    ax[0].axvline(n, color="gray", ls=":", lw=0.8)
    ax[0].text(n + 2, 0.9, "sparse stage", fontsize=8, transform=ax[0].get_xaxis_transform())
    ax[0].set_xlabel(f"indexer step (warm-up 1-{n}, sparse {n + 1}-{n + len(s)})")
    ax[0].set_ylabel("KL(attention || indexer), train batch")
    ax[0].set_yscale("log")
    ax[0].legend()
    loss = [float(r["main_loss"]) for r in s]
    k = 15
    avg = [sum(loss[max(0, i - k):i + 1]) / (i + 1 - max(0, i - k)) for i in range(len(loss))]
    ax[1].plot(x[n:], avg, label="main LM loss (train, moving avg 16)", lw=0.9)
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("nats/token")
    ax[1].legend()
    fig.suptitle("Built-in model: lightning-indexer distillation (warm-up, then sparse training)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":  # python scripts/indexer_distill.py plot WARMUP_LOG SPARSE_LOG PNG
    import sys

    if len(sys.argv) != 5 or sys.argv[1] != "plot":
        sys.exit("usage: python scripts/indexer_distill.py plot WARMUP/indexer_log.csv SPARSE/indexer_log.csv OUT.png")
    plot(*sys.argv[2:])
