"""`V41Args`: the configuration of DeepSeek-V4.1 (model_type deepseek_v41), read from the hub
config.json (nested `text_config`, or a bare `deepseek_v41_text` config) or the official flat
inference/config.json (research/v41-and-dspark.md 1.2), typed and validated. Errors name the file
and the key as that file spells it (`text_config.kv_source_layer_ids` in a hub config,
`kv_source_layers` in the official one), and for schedule errors the layer and its value.

The reference forward built from it is dayzero/v41/model.py; the engine runs it (one rank, or tensor /
expert parallel ranks) through dayzero/v41/served.py (docs/V41.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from dayzero.config_keys import ConfigError, check_dspark_ids, in_file_terms, read_config_json
from dayzero.v41.buckets import bucket_primes
from dayzero.v41.read import from_hub, from_official, hub_key_map, official_key_map
from dayzero.v41.schedule import V41Layer, derive_layers

MODEL_TYPES = ("deepseek_v41", "deepseek_v41_text")
ARCHITECTURE = "DeepseekV41ForCausalLM"
# Keys only a V4.1 official flat inference/config.json carries (V4's has none of them)
_OFFICIAL_V41_KEYS = ("kv_source_layers", "index_source_layers", "candidate_source_layer", "engram_layer_ids")
SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
DENSE_BLOCK = (32, 32)  # FP8 dense weights, E8M0 scale per 32x32 block (V4 used 128x128); section 1.5
EXPERT_BLOCK = 32  # MXFP4 experts: one E8M0 scale per 32 values along the input dim
ENGRAM_ROW_BLOCK = 32  # Engram table rows: FP8 with one E8M0 scale per 32 values (1x32)


@dataclass(frozen=True)
class V41Args:
    # backbone shape
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    head_dim: int
    rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window_size: int
    # CSA2 schedule (backbone layers only; DSpark stages are sliding-only)
    compress_ratios: tuple[int, ...]
    kv_source_layers: tuple[int, ...]
    index_source_layers: tuple[int, ...]
    candidate_source_layer: int  # < 0: no candidate level
    candidate_topk_blocks: int
    candidate_block_size: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    # MoE: every layer, plain top-k (no hash layers, no groups); gate.bias_vl for image spans
    n_routed_experts: int
    n_shared_experts: int
    n_activated_experts: int
    moe_inter_dim: int
    score_func: str
    gate_temp: float
    route_scale: float
    swiglu_limit: float
    # single-pass mHC (no hc_head)
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    norm_eps: float
    # RoPE: rope_theta on sliding-only layers, compress_rope_theta + YaRN on compressed ones
    rope_theta: float
    compress_rope_theta: float
    rope_factor: float
    original_seq_len: int  # 0: no YaRN
    beta_fast: float
    beta_slow: float
    max_seq_len: int
    # Engram (no layers: off)
    engram_layer_ids: tuple[int, ...]
    engram_num_embeddings: tuple[int, ...]
    engram_max_ngram_size: int
    engram_vocab_size: int
    engram_n_heads: int
    engram_head_dim: int
    engram_pad_id: int
    engram_compressed_vocab_size: int
    # DSpark: n_mtp_layers stages mtp.0.. with their own expert bank
    n_mtp_layers: int
    dspark_block_size: int
    dspark_noise_token_id: int
    dspark_target_layer_ids: tuple[int, ...]
    dspark_markov_rank: int
    dspark_n_routed_experts: int
    dspark_n_activated_experts: int
    # quantisation: None (dense) or "fp8" (dense FP8 in weight_block_size blocks, E8M0 scales)
    quant: str | None
    weight_block_size: tuple[int, int]
    expert_dtype: str | None  # "fp4" (MXFP4) or "fp8" (converted); None when not quantized
    image_token_id: int
    vision_layers: int  # 0: no vision tower declared

    # ---- derived -------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[V41Layer, ...]:
        return derive_layers(self.n_layers, self.compress_ratios, self.kv_source_layers,
                             self.index_source_layers, self.candidate_source_layer, self.engram_layer_ids)

    @property
    def engram_hash_columns(self) -> int:
        """(max n-gram - 1) sizes x heads: hash ids per position; engram.wkv input is this x head_dim."""
        return (self.engram_max_ngram_size - 1) * self.engram_n_heads

    def moe_dims(self, layer_id: int) -> tuple[int, int]:
        """(routed experts, top-k) of backbone layer ids < n_layers and of DSpark stage ids after them."""
        if layer_id < self.n_layers:
            return self.n_routed_experts, self.n_activated_experts
        return self.dspark_n_routed_experts, self.dspark_n_activated_experts

    # ---- validation ----------------------------------------------------------------------
    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ConfigError(f"config field `{name}`: {why}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "rope_head_dim", "q_lora_rank",
                     "o_groups", "o_lora_rank", "window_size", "candidate_topk_blocks", "candidate_block_size",
                     "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts", "n_activated_experts",
                     "moe_inter_dim", "hc_mult", "hc_sinkhorn_iters", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, f"must be a positive integer, got {v!r}")
        self.layers  # the schedule: raises naming the field, layer and value
        if self.n_heads % self.o_groups:
            bad("o_groups", f"{self.o_groups} does not divide `n_heads` = {self.n_heads}")
        if self.rope_head_dim % 2 or self.rope_head_dim > self.head_dim:
            bad("rope_head_dim", f"{self.rope_head_dim} must be even and at most `head_dim` = {self.head_dim}")
        if self.n_activated_experts > self.n_routed_experts:
            bad("n_activated_experts", f"top-k {self.n_activated_experts} exceeds `n_routed_experts` = "
                                       f"{self.n_routed_experts}")
        if self.n_shared_experts != 1:
            bad("n_shared_experts", f"DeepSeek-V4.1 has exactly 1 shared expert, got {self.n_shared_experts}")
        if self.score_func not in SCORE_FUNCS:
            bad("score_func", f"unknown scoring function {self.score_func!r} (allowed: {', '.join(SCORE_FUNCS)})")
        if len(self.engram_num_embeddings) != len(self.engram_layer_ids):
            bad("engram_num_embeddings", f"has {len(self.engram_num_embeddings)} entries for "
                                         f"{len(self.engram_layer_ids)} `engram_layer_ids`")
        if self.engram_layer_ids:
            for name in ("engram_vocab_size", "engram_n_heads", "engram_head_dim", "engram_compressed_vocab_size"):
                if getattr(self, name) <= 0:
                    bad(name, f"must be a positive integer, got {getattr(self, name)!r}")
            if self.engram_max_ngram_size < 2:
                bad("engram_max_ngram_size", f"must be at least 2 (2-grams and up), got {self.engram_max_ngram_size}")
            if self.engram_compressed_vocab_size > self.vocab_size:
                bad("engram_compressed_vocab_size", f"{self.engram_compressed_vocab_size} exceeds `vocab_size` = "
                                                    f"{self.vocab_size}")
            if not 0 <= self.engram_pad_id < self.vocab_size:
                bad("engram_pad_id", f"{self.engram_pad_id} is not a token id below `vocab_size` = {self.vocab_size}")
            # each (n-gram, head) bucket range is a distinct prime above engram_vocab_size - 1 (v41/buckets.py)
            layout = bucket_primes(len(self.engram_layer_ids), self.engram_max_ngram_size, self.engram_n_heads,
                                   self.engram_vocab_size)
            for layer, rows, primes in zip(self.engram_layer_ids, self.engram_num_embeddings, layout):
                want = sum(sum(per) for per in primes)
                if rows != want:
                    bad("engram_num_embeddings", f"layer {layer} has {rows!r} rows, but its "
                                                 f"{self.engram_hash_columns} prime buckets above "
                                                 f"`engram_vocab_size` = {self.engram_vocab_size} hold {want}")
        if self.n_mtp_layers < 0:
            bad("n_mtp_layers", f"must be 0 or more, got {self.n_mtp_layers}")
        if self.n_mtp_layers:
            for name in ("dspark_block_size", "dspark_markov_rank", "dspark_n_routed_experts",
                         "dspark_n_activated_experts"):
                if getattr(self, name) <= 0:
                    bad(name, f"must be a positive integer, got {getattr(self, name)!r}")
            if self.dspark_n_activated_experts > self.dspark_n_routed_experts:
                bad("dspark_n_activated_experts", f"top-k {self.dspark_n_activated_experts} exceeds "
                                                  f"`dspark_n_routed_experts` = {self.dspark_n_routed_experts}")
            check_dspark_ids(bad, self.dspark_noise_token_id, self.vocab_size, self.dspark_target_layer_ids,
                             self.n_layers)
        if self.quant not in (None, "fp8"):
            bad("quant", f"unsupported weight quantization {self.quant!r} (V4.1 ships 'fp8')")
        if self.quant and tuple(self.weight_block_size) != DENSE_BLOCK:
            bad("weight_block_size", f"V4.1 stores dense FP8 weights in 32x32 blocks, got "
                                     f"{list(self.weight_block_size)}")
        if self.quant and self.expert_dtype not in ("fp4", "fp8"):
            bad("expert_dtype", f"unsupported expert dtype {self.expert_dtype!r} (allowed: fp4, fp8)")
        if self.quant and self.expert_dtype == "fp4" and (self.dim % EXPERT_BLOCK or self.moe_inter_dim % EXPERT_BLOCK):
            bad("moe_inter_dim", f"MXFP4 experts need `dim` ({self.dim}) and `moe_inter_dim` "
                                 f"({self.moe_inter_dim}) divisible by {EXPERT_BLOCK}")

    def replace(self, **changes) -> "V41Args":
        return dataclasses.replace(self, **changes)

    # ---- construction from config files --------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "V41Args":
        cfg, source = read_config_json(path)
        return cls.from_dict(cfg, source=source)

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config") -> "V41Args":
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        official = is_official_layout(cfg)
        try:
            return cls(**(from_official(cfg) if official else from_hub(cfg)))
        except ConfigError as e:
            keys = official_key_map() if official else hub_key_map(cfg)
            raise ConfigError(f"{source}: {in_file_terms(str(e), keys, _FIELDS)}") from None


def is_official_layout(cfg: dict) -> bool:
    return "dim" in cfg and "hidden_size" not in cfg and "text_config" not in cfg


def is_v41_config(cfg: dict) -> bool:
    """True for a V4.1 hub config (model_type or architecture) or an official flat one (its CSA2 keys)."""
    if not isinstance(cfg, dict):
        return False
    if cfg.get("model_type") in MODEL_TYPES or ARCHITECTURE in (cfg.get("architectures") or ()):
        return True
    return is_official_layout(cfg) and any(k in cfg for k in _OFFICIAL_V41_KEYS)


_FIELDS = {f.name for f in dataclasses.fields(V41Args)}
