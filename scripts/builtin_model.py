"""Model config, initialisation, losses and evaluation of the built-in model (used by
train_builtin.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dayzero.config import ModelArgs
from dayzero.reference.model import Transformer
from dayzero.testing import random_state


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


def train_step(model: Transformer, opt, params, loads: RouterLoads, ids: torch.Tensor, mtp_weight: float,
               clip: float, bias_gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One AdamW step on main + mtp_weight x MTP loss, then the router-bias update.
    -> (loss, main, mtp, max expert load)."""
    main, mtp = losses(model, ids)
    loss = main + mtp_weight * mtp
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    return loss, main, mtp, loads.update(bias_gamma)


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
