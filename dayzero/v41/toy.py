"""A tiny random-weight DeepSeek-V4.1 checkpoint in the official layout (`dayzero toy --preset v41-flash`):
V4.1-Flash's structure at toy sizes: two sliding-only layers, a pooled (ratio-2) group, a ratio-1 group
whose source publishes the candidate blocks, a re-index and reuse layers, Engram on two layers, FP8
32x32 dense weights, MXFP4 experts, FP8 1x32 Engram rows, and a byte-level BPE tokenizer.json from which
the Engram token map (and so `engram_compressed_vocab_size`) is derived."""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

TEXT = {
    "model_type": "deepseek_v41_text", "hidden_size": 64, "num_hidden_layers": 8,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64, "qk_rope_head_dim": 16,
    "q_lora_rank": 32, "o_groups": 2, "o_lora_rank": 16, "sliding_window": 4, "hidden_act": "silu",
    "swiglu_limit": 10.0, "rms_norm_eps": 1e-20, "tie_word_embeddings": False, "max_position_embeddings": 4096,
    "rope_theta": 10000, "compress_rope_theta": 160000,
    "rope_scaling": {"rope_type": "yarn", "factor": 4, "beta_fast": 32, "beta_slow": 1,
                     "original_max_position_embeddings": 256},
    "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "routed_scaling_factor": 1.5, "index_n_heads": 16, "index_head_dim": 32, "index_topk": 4,
    "candidate_topk_blocks": 2, "candidate_block_size": 2, "hc_mult": 2, "hc_sinkhorn_iters": 3, "hc_eps": 1e-6,
    "compress_ratios": [0, 0, 2, 2, 2, 1, 1, 1], "kv_source_layer_ids": [2, 5],
    "index_source_layer_ids": [2, 3, 5, 7], "candidate_source_layer_id": 5,
    "engram_layer_ids": [1, 3], "engram_max_ngram_size": 3, "engram_vocab_size": 40, "engram_n_heads": 2,
    "engram_head_dim": 32, "engram_pad_id": 5, "num_nextn_predict_layers": 0,
}
# DSpark stages for a toy (v41/dspark.py): 3 stages at V4.1-Flash's structure, the targets the last three
# layers that are not KV sources (as the released [37, 38, 39]), 4 experts top-2, Markov rank 8
DSPARK = {"num_nextn_predict_layers": 3, "dspark_block_size": 5, "dspark_noise_token_id": 300,
          "dspark_target_layer_ids": [4, 6, 7], "dspark_markov_rank": 8, "dspark_n_routed_experts": 4,
          "dspark_num_experts_per_tok": 2}


def dspark_text(text: dict | None = None, **changes) -> dict:
    """A toy text config (`text`, else TEXT) with DSpark stages (DSPARK, then `changes`)."""
    return {**copy.deepcopy(text or TEXT), **DSPARK, **changes}


QUANTIZATION = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32],
                "scale_fmt": "ue8m0", "expert_dtype": "fp4"}
FORMATS = ("fp8", "bf16")  # the release's FP8 + MXFP4 layout, or every weight dense in BF16


def tiny_config(tokenizer_json: str | os.PathLike, fmt: str = "fp8", text: dict | None = None) -> dict:
    """The hub config.json of a tiny V4.1 for this tokenizer: `vocab_size`, `engram_compressed_vocab_size`
    and `engram_num_embeddings` derived from it and from the prime bucket layout, as a real one is."""
    from tokenizers import Tokenizer

    from dayzero.v41.buckets import bucket_primes
    from dayzero.v41.engram import compressed_token_map

    if fmt not in FORMATS:
        raise ValueError(f"--format: a V4.1 toy checkpoint is one of {', '.join(FORMATS)}, got {fmt!r}")
    t = copy.deepcopy(text or TEXT)
    tok = Tokenizer.from_file(str(tokenizer_json))
    _, compressed = compressed_token_map(tok)
    primes = bucket_primes(len(t["engram_layer_ids"]), t["engram_max_ngram_size"], t["engram_n_heads"],
                           t["engram_vocab_size"])
    t.update(vocab_size=tok.get_vocab_size(with_added_tokens=True), engram_compressed_vocab_size=compressed,
             engram_num_embeddings=[sum(sum(per) for per in layer) for layer in primes])
    cfg = {"architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41",
           "image_token_id": t["vocab_size"] - 1, "torch_dtype": "bfloat16", "text_config": t}
    if fmt == "fp8":
        cfg["quantization_config"] = dict(QUANTIZATION)
    return cfg


def write_toy(path: str | os.PathLike, seed: int = 0, fmt: str = "fp8", overwrite: bool = False,
              text: dict | None = None) -> Path:
    """Write the tiny random-weight V4.1 checkpoint (with its tokenizer.json) to `path`; a `text` with
    `num_nextn_predict_layers` > 0 (`dspark_text()`) also writes the DSpark stages `mtp.*`."""
    from dayzero.testing import random_state, tiny_tokenizer
    from dayzero.v41.checkpoint import save_v41
    from dayzero.v41.config import V41Args
    from dayzero.v41.model import V41Transformer

    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer.json"
        tiny_tokenizer(tok, vocab_size=320)
        cfg = tiny_config(tok, fmt, text)
        args = V41Args.from_dict(cfg).replace(quant=None, expert_dtype=None)
        dense = V41Transformer(args, drafter=args.n_mtp_layers > 0)
        return save_v41(path, random_state(dense, seed=seed), cfg, tokenizer_json=tok, overwrite=overwrite)
