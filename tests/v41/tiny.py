"""Tiny DeepSeek-V4.1 hub configs for the config and schedule tests."""
from __future__ import annotations

import copy
import json
from pathlib import Path

FLASH_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "v41_flash"  # values of research 1.2

TEXT = {
    "model_type": "deepseek_v41_text", "vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 6,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64, "qk_rope_head_dim": 16,
    "q_lora_rank": 32, "o_groups": 2, "o_lora_rank": 16, "sliding_window": 4, "hidden_act": "silu",
    "swiglu_limit": 10.0, "rms_norm_eps": 1e-20, "tie_word_embeddings": False, "max_position_embeddings": 4096,
    "rope_theta": 10000, "compress_rope_theta": 160000,
    "rope_scaling": {"rope_type": "yarn", "factor": 4, "beta_fast": 32, "beta_slow": 1,
                     "original_max_position_embeddings": 256},
    "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "routed_scaling_factor": 1.5, "index_n_heads": 8, "index_head_dim": 32, "index_topk": 4,
    "candidate_topk_blocks": 2, "candidate_block_size": 2, "hc_mult": 2, "hc_sinkhorn_iters": 3, "hc_eps": 1e-6,
    "compress_ratios": [0, 2, 2, 2, 1, 1], "kv_source_layer_ids": [1, 4], "index_source_layer_ids": [1, 3, 4, 5],
    "candidate_source_layer_id": 4, "engram_layer_ids": [], "engram_num_embeddings": [],
    "num_nextn_predict_layers": 0,
}

# (name, compress_ratios, kv sources, index sources, candidate source)
SCHEDULES = [
    ("readme-6", [0, 2, 2, 2, 1, 1], [1, 4], [1, 3, 4, 5], 4),
    ("flash-like-8", [0, 0, 2, 2, 2, 1, 1, 1], [2, 5], [2, 3, 5, 7], 5),
    ("no-candidates", [0, 2, 2, 1, 1], [1, 3], [1, 3], -1),
    ("candidate-first-source", [0, 1, 1, 1, 1], [1], [1, 3], 1),
    ("sliding-inside-group", [0, 2, 2, 0, 2, 2], [1], [1, 4], -1),
    ("three-pooled-groups", [2, 2, 2, 2, 2, 2, 1, 1], [0, 2, 4, 6], [0, 2, 4, 6, 7], 6),
]


def text_config(ratios, kv, index, cand, **changes) -> dict:
    t = copy.deepcopy(TEXT)
    t.update(num_hidden_layers=len(ratios), compress_ratios=list(ratios), kv_source_layer_ids=list(kv),
             index_source_layer_ids=list(index), candidate_source_layer_id=cand)
    t.update(changes)
    return t


def hub(text: dict, **top) -> dict:
    return {"architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41", "image_token_id": 60,
            "text_config": text, **top}


def flash_hub() -> dict:
    return json.loads((FLASH_DIR / "config.json").read_text())


def flash_official() -> dict:
    return json.loads((FLASH_DIR / "inference" / "config.json").read_text())
