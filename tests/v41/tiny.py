"""Tiny DeepSeek-V4.1 hub configs for the config and schedule tests."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from dayzero.v41 import toy

FLASH_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "v41_flash"  # values of research 1.2

# the toy checkpoint's config (dayzero/v41/toy.py) without Engram, on a 6-layer schedule with 8 indexer heads
TEXT = {**{k: v for k, v in copy.deepcopy(toy.TEXT).items() if not k.startswith("engram")},
        "vocab_size": 64, "num_hidden_layers": 6, "index_n_heads": 8, "compress_ratios": [0, 2, 2, 2, 1, 1],
        "kv_source_layer_ids": [1, 4], "index_source_layer_ids": [1, 3, 4, 5], "candidate_source_layer_id": 4,
        "engram_layer_ids": [], "engram_num_embeddings": []}

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
