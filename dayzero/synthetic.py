"""Models with random weights written directly in the official storage formats, built on the
target device: V4-Flash-shaped slices for `dayzero verify` and `dayzero bench` (a single GPU
cannot hold V4-Flash, but a few layers with the real per-layer dimensions measure it).

No dense copy is ever made: FP8 weights are random e4m3 codes under E8M0 block scales, FP4
experts random e2m1 nibbles under E8M0 per-32 scales, each scaled so the dequantised weight has
std ~ 1/sqrt(in) (activations keep their size through the layers).
"""
from __future__ import annotations

import math

import torch

from dayzero.config import ModelArgs, flash
from dayzero.reference.layers import Linear
from dayzero.reference.model import Transformer

_FP4_RMS = math.sqrt(sum(v * v for v in (0, .25, 1, 2.25, 4, 9, 16, 36)) / 8)  # of a uniform random nibble


def flash_slice(layer_types: tuple[str, ...] = ("csa", "hca"), n_routed_experts: int = 256,
                vocab_size: int = 8192, n_mtp_layers: int = 0) -> ModelArgs:
    """V4-Flash per-layer shapes (dim 4096, 64 x 512 heads, window 128, CSA r=4 top-512 /
    HCA r=128, 64 x 128 indexer, experts 2048 wide top-6, hc 4), FP8 + FP4, a few layers, a
    smaller vocabulary (the embedding/head are not what a slice measures), no hash layers."""
    ratios = tuple({"sliding": 0, "csa": 4, "hca": 128}[t] for t in layer_types)
    return flash().replace(n_layers=len(layer_types), layer_types=tuple(layer_types), compress_ratios=ratios,
                           n_hash_layers=0, n_routed_experts=n_routed_experts, vocab_size=vocab_size,
                           n_mtp_layers=n_mtp_layers, quant="fp8", expert_dtype="fp4", dtype="bfloat16")


def _e8m0(std: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    e = torch.round(torch.log2(torch.as_tensor(std, dtype=torch.float32))) + 127
    return e.clamp(1, 254).to(torch.uint8).expand_as(like).contiguous().view(torch.float8_e8m0fnu)


def random_model(args: ModelArgs, device="cpu", numerics: str = "official",
                 compute_dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Transformer:
    """The reference model for `args` on `device` with random official-format weights."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(args, numerics=numerics, compute_dtype=compute_dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    lin = {f"{n}.": m for n, m in model.named_modules() if isinstance(m, Linear)}
    state = {}
    for name, t in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        shape, m = tuple(t.shape), lin.get(prefix + ".")

        def randn(std: float = 1.0, dtype=torch.float32):
            return (torch.randn(shape, generator=g, device=device) * std).to(dtype)

        if m is not None and m.fmt == "fp8":
            state[name] = randn(64.0, torch.float8_e4m3fn) if leaf == "weight" else \
                _e8m0(1 / (64 * math.sqrt(m.in_features)), torch.empty(shape, dtype=torch.uint8, device=device))
        elif m is not None and m.fmt == "fp4":
            state[name] = torch.randint(-128, 128, shape, generator=g, device=device, dtype=torch.int8) \
                if leaf == "weight" else \
                _e8m0(1 / (_FP4_RMS * math.sqrt(m.in_features)), torch.empty(shape, dtype=torch.uint8, device=device))
        elif leaf == "tid2eid":
            state[name] = torch.randint(0, args.n_routed_experts, shape, generator=g, device=device)
        elif "hc_" in leaf and leaf.endswith("_fn"):
            state[name] = randn(shape[1] ** -0.5)
        elif "hc_" in leaf and leaf.endswith("_scale"):
            state[name] = 0.5 + torch.rand(shape, generator=g, device=device)
        elif leaf in ("attn_sink", "ape") or ("hc_" in leaf and leaf.endswith("_base")):
            state[name] = randn(0.5)
        elif leaf == "bias":
            state[name] = randn(0.1)
        elif name.endswith("norm.weight"):
            state[name] = 1 + randn(0.1, t.dtype)
        elif leaf == "weight" and len(shape) == 2:
            state[name] = randn(1.0 if name == "embed.weight" else shape[1] ** -0.5, t.dtype)
        else:
            raise AssertionError(f"no random rule for {name} {shape} {t.dtype}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
