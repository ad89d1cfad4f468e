"""Tiny configurations and random non-trivial weights, for tests, examples and `dayzero toy`.

Random weights are drawn so that every mechanism matters: sinks, router biases, mHC weights,
compressor position biases and norm weights are all away from their init values, and hash
tables route each token to distinct experts.
"""
from __future__ import annotations

import math

import torch

from dayzero.config import ModelArgs

_BASE = dict(vocab_size=512, dim=256, n_heads=4, head_dim=128, rope_head_dim=64, q_lora_rank=128,
             o_groups=2, o_lora_rank=128, window_size=16, n_routed_experts=8, n_activated_experts=2,
             moe_inter_dim=128, index_n_heads=16, index_head_dim=64, index_topk=4, max_seq_len=1048576,
             route_scale=1.5, swiglu_limit=10.0, dtype="float32", quant=None, expert_dtype=None)

# name -> (compress ratios per layer with HCA ratio 16, n_hash_layers, hc_mult)
TINY = {
    # Flash-like: SWA first, then CSA/HCA alternating; hash routing in an SWA and a CSA layer
    "flash": ([0, 4, 16, 4, 16], 2, 4),
    # Pro-like: HCA first, no SWA-only backbone layer
    "pro": ([16, 16, 4, 16, 4], 3, 2),
    # every type, learned routing only, three streams
    "mixed": ([4, 0, 16], 0, 3),
}


# presets with DeepSeek's DSpark drafter in mtp.* (V4-Flash-0731's layout): name -> its backbone's
# preset; three stages, blocks of 5, conditioned on the last three layers (research/v41-and-dspark.md 2)
DSPARK_TINY = {"flash-0731": "flash"}


def tiny_args(name: str = "flash", **changes) -> ModelArgs:
    ratios, n_hash, hc = TINY[DSPARK_TINY.get(name, name)]
    types = tuple("sliding" if r == 0 else "csa" if r == 4 else "hca" for r in ratios)
    kw = dict(_BASE, n_layers=len(ratios), layer_types=types, compress_ratios=tuple(ratios),
              n_hash_layers=n_hash, hc_mult=hc)
    if name in DSPARK_TINY:
        n = len(ratios)
        kw.update(n_mtp_layers=0, dspark_stages=3, dspark_block_size=5, dspark_noise_token_id=_BASE["vocab_size"] - 1,
                  dspark_target_layer_ids=(n - 3, n - 2, n - 1), dspark_markov_rank=16)
    kw.update(changes)
    return ModelArgs(**kw)


def random_state(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Dense fp32 random values for every tensor of `model` (built with quant=None)."""
    g = torch.Generator().manual_seed(seed)
    args: ModelArgs = model.args
    out = {}
    for name, t in model.state_dict().items():
        shape = tuple(t.shape)
        leaf = name.rsplit(".", 1)[-1]

        def randn(std: float = 1.0) -> torch.Tensor:
            return torch.randn(shape, generator=g) * std

        if leaf == "tid2eid":
            out[name] = torch.stack([torch.randperm(args.n_routed_experts, generator=g)[:shape[1]]
                                     for _ in range(shape[0])])
        elif "hc_" in leaf and leaf.endswith("_fn"):
            out[name] = randn(1 / math.sqrt(shape[1]))
        elif "hc_" in leaf and leaf.endswith("_base"):
            out[name] = randn(0.5)
        elif "hc_" in leaf and leaf.endswith("_scale"):
            out[name] = 0.5 + torch.rand(shape, generator=g)
        elif leaf == "attn_sink":
            out[name] = randn(1.0)
        elif leaf == "ape":
            out[name] = randn(0.5)
        elif leaf in ("bias", "bias_vl"):  # bias_vl: V4.1's router bias for image spans
            out[name] = randn(0.1)
        elif leaf in ("q_weight", "k_weight"):  # V4.1 Engram gate weights (used as a product)
            out[name] = 1 + randn(0.3)
        elif name.endswith("engram.embed.scale"):  # V4.1 Engram row scales: read only for FP8 rows
            out[name] = torch.ones(shape)
        elif name.endswith("norm.weight"):
            out[name] = 1 + randn(0.1)
        elif name == "embed.weight":
            out[name] = randn(1.0)
        elif leaf == "weight" and len(shape) == 2:
            out[name] = randn(1 / math.sqrt(shape[1]))
        else:
            raise AssertionError(f"no random rule for {name} {shape}")
    return out


BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A faithful model computes the same tokens on every "
    "device. Sliding windows, compressed entries and a lightning indexer decide what each query sees. "
    "Hyper-connections mix four residual streams; experts are routed by hash or by a learned gate. "
)


def tiny_tokenizer(path, vocab_size: int = 512) -> None:
    """Write a byte-level BPE tokenizer.json (BOS id 0, EOS id 1, BOS prepended) of `vocab_size`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    tok.save(str(path))
