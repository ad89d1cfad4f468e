"""The `v4.1-flash` preset (the released DeepSeek-V4.1-Flash shapes, research/v41-and-dspark.md 1.2), its
parameter / byte census by role, computed from the checkpoint inventory that dayzero/v41/checkpoint.py
derives, and the planned KV-cache bytes of the V4.1 engine path.

`kv_plan` gives the bytes of the planned layout (window rows per layer; compressed entries and indexer
keys stored once per KV-source group, in the QAT formats or bf16), not of a running cache: the engine's
own figures are v41/cache.py's (`kv_cache_dtype="qat"` stores the same 890 B/token, docs/V41.md).

Census roles:
  backbone_dense   every backbone tensor except the routed experts and the Engram tables (attention,
                   shared expert, router, norms, mHC, embed, head, engram.wkv / q_weight / k_weight)
  routed_experts   `layers.{i}.ffn.experts.*` (MXFP4: 2 parameters per stored int8 byte)
  engram_tables    `layers.{i}.engram.embed.*` (FP8 rows + E8M0 per 32)
  dspark           the `mtp.{0,1,2}` stages: each a sliding-only block with DSpark's own expert bank
                   (v41/dspark.py V41DSparkStage: a V41Block at a sliding-only layer with
                   `dspark_n_routed_experts`; the census is the built stages' state), plus the stage extras
                   (`mtp.0.main_proj` FP8 32x32, `mtp.0.main_norm`, `mtp.2.norm`,
                   `mtp.2.markov_head.{embed,head}` BF16 (V4-0731 names them markov_w1 / markov_w2),
                   `mtp.2.confidence_head.proj` BF16 (sources disagree: a header-checked inventory says BF16,
                   research 2.2 says F32; a loader accepts either, CONFIDENCE_DTYPES); no hc_head).
  vision           not in the inventory (the vision tower is not built; research gives its config, not its
                   tensors): absent here; docs/V41.md states it by difference from the published total.
Logical parameters count an MXFP4 value as one parameter and leave out `.scale` tensors.
"""
from __future__ import annotations

import copy
import functools
import math

import torch

from dayzero.v41.config import V41Args

# research/v41-and-dspark.md 1.2: the released config.json (text_config values; vision: layer count only)
_FLASH_TEXT = {
    "model_type": "deepseek_v41_text", "vocab_size": 129280, "hidden_size": 5120, "moe_intermediate_size": 2304,
    "num_hidden_layers": 40, "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512,
    "qk_rope_head_dim": 64, "q_lora_rank": 1280, "o_lora_rank": 1024, "o_groups": 8, "hidden_act": "silu",
    "swiglu_limit": 10.0, "rms_norm_eps": 1e-20, "tie_word_embeddings": False, "max_position_embeddings": 1048576,
    "rope_theta": 10000, "rope_scaling": {"rope_type": "yarn", "factor": 16, "beta_fast": 32, "beta_slow": 1,
                                          "original_max_position_embeddings": 65536},
    "n_routed_experts": 384, "n_shared_experts": 1, "num_experts_per_tok": 6, "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 1.5, "sliding_window": 128,
    "compress_ratios": [0, 0] + [2] * 18 + [1] * 20 + [0, 0, 0], "compress_rope_theta": 160000,
    "kv_source_layer_ids": [2, 8, 14, 20], "index_source_layer_ids": [2, 8, 14, 20, 24, 28, 32, 36],
    "index_n_heads": 32, "index_head_dim": 128, "index_topk": 512, "candidate_source_layer_id": 20,
    "candidate_topk_blocks": 2048, "candidate_block_size": 8, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-06,
    "engram_layer_ids": [1, 14], "engram_num_embeddings": [384006168, 384016682], "engram_max_ngram_size": 4,
    "engram_vocab_size": 16000000, "engram_n_heads": 8, "engram_head_dim": 256, "engram_pad_token_id": 2,
    "engram_compressed_vocab_size": 99092, "num_nextn_predict_layers": 3, "dspark_block_size": 5,
    "dspark_noise_token_id": 128799, "dspark_target_layer_ids": [37, 38, 39], "dspark_markov_rank": 256,
    "dspark_n_routed_experts": 128, "dspark_num_experts_per_tok": 3,
}
_FLASH_HUB = {
    "architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41", "image_token_id": 129264,
    "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32],
                            "scale_fmt": "ue8m0", "expert_dtype": "fp4"},
    "text_config": _FLASH_TEXT,
    "vision_config": {"model_type": "deepseek_v41_vision", "num_hidden_layers": 32, "hidden_size": 1024,
                      "num_attention_heads": 16, "intermediate_size": 2816, "patch_size": 14},
}


def v41_flash_config() -> dict:
    """The hub config.json of DeepSeek-V4.1-Flash (a copy: callers may edit it)."""
    return copy.deepcopy(_FLASH_HUB)


def v41_flash() -> V41Args:
    """DeepSeek-V4.1-Flash as released: FP8 32x32 dense, MXFP4 experts, Engram on layers 1 and 14, 3 DSpark stages."""
    return V41Args.from_dict(v41_flash_config(), source="preset v4.1-flash")


V41_PRESETS = {"v4.1-flash": v41_flash}


def v41_preset(name: str) -> V41Args:
    if name not in V41_PRESETS:
        raise ValueError(f"unknown DeepSeek-V4.1 preset {name!r} (one of: {', '.join(V41_PRESETS)})")
    return V41_PRESETS[name]()


# ---- census -------------------------------------------------------------------------------------------

def _role(name: str) -> str:
    if ".engram.embed." in name:
        return "engram_tables"
    if ".ffn.experts." in name:
        return "routed_experts"
    return "backbone_dense"


def _params(shape, dtype: torch.dtype, name: str) -> int:
    if name.endswith(".scale"):
        return 0
    return math.prod(shape) * (2 if dtype == torch.int8 else 1)  # MXFP4: two e2m1 codes per byte


CONFIDENCE_DTYPES = (torch.bfloat16, torch.float32)  # the confidence head's storage: in doubt (see above)


def dspark_tensors(args: V41Args, storage: torch.dtype = torch.bfloat16) -> dict:
    """name -> TensorSpec of the `mtp.*` tensors: the state of the DSpark stages dayzero builds and loads
    (v41/dspark.py), in checkpoint storage."""
    from dayzero.loader.checkpoint import TensorSpec
    from dayzero.v41.dspark import build_stages

    if not args.n_mtp_layers:
        return {}
    with torch.device("meta"):
        stages = build_stages(args, storage)
    return {f"mtp.{n}": TensorSpec(tuple(t.shape), t.dtype) for n, t in stages.state_dict().items()}


def inventory(args: V41Args, storage: torch.dtype = torch.bfloat16) -> dict:
    """Every text-model tensor of the checkpoint: checkpoint.expected_tensors (backbone) + dspark_tensors.
    Cached (building the backbone on the meta device takes seconds); do not mutate the result."""
    return _inventory(args, storage)


@functools.lru_cache(maxsize=4)
def _inventory(args: V41Args, storage: torch.dtype) -> dict:
    from dayzero.v41.checkpoint import expected_tensors

    return {**expected_tensors(args, storage), **dspark_tensors(args, storage)}


def census(args: V41Args, storage: torch.dtype = torch.bfloat16) -> dict:
    """{role: {"params", "bytes", "tensors"}} for backbone_dense, routed_experts, engram_tables, dspark, and
    "text_total" (their sum), from `inventory`."""
    roles = {k: {"params": 0, "bytes": 0, "tensors": 0} for k in
             ("backbone_dense", "routed_experts", "engram_tables", "dspark")}
    tagged = [("dspark" if n.startswith("mtp.") else _role(n), n, s) for n, s in inventory(args, storage).items()]
    for role, name, spec in tagged:
        r = roles[role]
        r["params"] += _params(spec.shape, spec.dtype, name)
        r["bytes"] += math.prod(spec.shape) * spec.dtype.itemsize
        r["tensors"] += 1
    roles["text_total"] = {k: sum(v[k] for v in roles.values()) for k in ("params", "bytes", "tensors")}
    return roles


# ---- planned KV cache ---------------------------------------------------------------------------------

# bytes of one stored row of `width` values: (bytes per value, values per scale, bytes per scale)
KV_FORMATS = {"fp8": (1.0, 32, 1), "fp4": (0.5, 16, 1), "fp4_b32": (0.5, 32, 1), "bf16": (2.0, 0, 0)}
# the QAT points (research 1.5): window KV FP8 e4m3 + UE8M0 per 32 (rope tail included); compressed KV FP4
# e2m1 + e4m3 scale per 16; indexer keys FP4 + UE8M0 per 32. "bf16": every row bf16, no scales.
PLANS = {"qat": ("fp8", "fp4", "fp4_b32"), "bf16": ("bf16", "bf16", "bf16")}


def row_bytes(width: int, fmt: str) -> float:
    per, block, scale = KV_FORMATS[fmt]
    return width * per + (math.ceil(width / block) * scale if block else 0)


def kv_plan(args: V41Args, plan: str = "qat", contexts=(8192, 131072, 1048576)) -> dict:
    """Planned KV bytes of V4.1 from the layer schedule: a window of `window_size` raw rows (head_dim wide)
    on every backbone layer and DSpark stage; per KV-source group ONCE: one compressed entry (head_dim)
    per `compress_ratio` tokens and its indexer key (index_head_dim). Reuse / re-index layers store nothing
    more (they read their source's entries and keys; a top-k is not cached). The open ratio-2 pooling row
    (< 1 token per source) is not counted."""
    if plan not in PLANS:
        raise ValueError(f"KV plan {plan!r}: one of {', '.join(PLANS)}")
    win_fmt, entry_fmt, key_fmt = PLANS[plan]
    entry, key = row_bytes(args.head_dim, entry_fmt), row_bytes(args.index_head_dim, key_fmt)
    groups = [la for la in args.layers if la.is_kv_source]
    per_token = sum((entry + key) / la.compress_ratio for la in groups)
    window_row = row_bytes(args.head_dim, win_fmt)
    window_layers = args.n_layers + args.n_mtp_layers
    fixed = window_layers * args.window_size * window_row

    def seq(t: int) -> float:
        return per_token * t + window_layers * min(t, args.window_size) * window_row

    return {"plan": plan, "formats": {"window": win_fmt, "compressed_entry": entry_fmt, "indexer_key": key_fmt},
            "row_bytes": {"window": window_row, "compressed_entry": entry, "indexer_key": key},
            "kv_sources": [(la.layer_id, la.compress_ratio) for la in groups],
            "bytes_per_token_all_layers": per_token, "window_layers": window_layers,
            "fixed_bytes_per_sequence": fixed,
            "per_sequence_bytes": {str(t): seq(t) for t in contexts}}
