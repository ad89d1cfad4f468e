"""Model configuration: `ModelArgs`, built from a hub `config.json` (HF keys) or the official
`inference/config.json` keys, plus presets with the real V4-Flash / V4-Pro / V4-Flash-0731 shapes.

Layer types are kept per layer as "sliding", "csa" (overlapping compressor + lightning indexer +
top-k) or "hca" (non-overlapping compressor, all entries); every layer also has the sliding window.
The MTP module's block is layer id `n_layers` and is always "sliding" (v4-architecture.md 2.4).
A DSpark drafter (V4-Flash-0731, -DSpark; research/v41-and-dspark.md section 2) takes the `mtp.*`
namespace instead: its stages are layer ids n_layers .. n_layers + dspark_stages - 1, all
"sliding", and the checkpoint's `num_nextn_predict_layers` (1 in 0731's root config) does not
describe them: the `dspark_*` keys do.
A DeepSeek-V4.1 config (deepseek_v41) is a different family: dayzero.v41 reads and validates it, and
`from_dict` then refuses it with V41ConfigError (V4's ModelArgs and loader do not describe V4.1; `LLM`,
`dayzero generate` and `dayzero serve` run it through dayzero.v41.served, docs/V41.md).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dayzero.config_keys import (ConfigError, Keys, check_dspark_ids, hub_keys, in_file_terms, official_keys,
                                 read_config_json)
from dayzero.v41 import V41Args, is_v41_config

LAYER_TYPES = ("sliding", "csa", "hca")
_HF_LAYER_NAMES = {
    "sliding_attention": "sliding",
    "compressed_sparse_attention": "csa",
    "heavily_compressed_attention": "hca",
}
_HF_NAME_OF = {v: k for k, v in _HF_LAYER_NAMES.items()}
DENSE_DTYPES = ("bfloat16", "float32", "float16")


class V41ConfigError(ConfigError):
    """A valid DeepSeek-V4.1 config handed to V4's `ModelArgs` (V4's loader, converter, verify): V4.1
    is another family, read by dayzero.v41 and run by the engine through dayzero.v41.served."""


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    layer_types: tuple[str, ...] = ()
    compress_ratios: tuple[int, ...] = ()  # per backbone layer; 0 for sliding
    n_hash_layers: int = 3
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    moe_inter_dim: int = 2048
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0  # YaRN on compressed layers; 1 or original_seq_len 0 disables it
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_seq_len: int = 1048576
    n_mtp_layers: int = 1
    # DSpark (0 stages: none): draft block size, the noise token filling the block after the anchor,
    # the backbone layers whose outputs condition it, the Markov head's rank, its stages (mtp.0..)
    dspark_stages: int = 0
    dspark_block_size: int = 0
    dspark_noise_token_id: int = 0
    dspark_target_layer_ids: tuple[int, ...] = ()
    dspark_markov_rank: int = 0
    dtype: str = "bfloat16"  # storage dtype of dense tensors in the checkpoint
    quant: str | None = "fp8"  # None: dense linears; "fp8": e4m3 weights, E8M0 128x128 scales
    expert_dtype: str | None = "fp4"  # routed experts: None (as `quant`), "fp8" or "fp4"
    bos_token_id: int = 0
    eos_token_id: int = 1
    extra: dict = field(default_factory=dict, compare=False, hash=False)  # unused hub keys, kept

    # ---- derived values -------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @property
    def mtp_layer_type(self) -> str:
        return "sliding"

    @property
    def routed_expert_format(self) -> str:
        """'dense', 'fp8' (E8M0 block scales), 'fp8_f32' (fp32 block scales) or 'fp4'."""
        if self.quant is None:
            return "dense"
        if self.expert_dtype in (None, "fp8"):
            return "fp8" if self.expert_dtype is None else "fp8_f32"
        return "fp4"

    @property
    def linear_format(self) -> str:
        return "dense" if self.quant is None else "fp8"

    def layer_type(self, layer_id: int) -> str:
        return self.mtp_layer_type if layer_id >= self.n_layers else self.layer_types[layer_id]

    def compress_ratio(self, layer_id: int) -> int:
        return 0 if layer_id >= self.n_layers else self.compress_ratios[layer_id]

    def is_hash_layer(self, layer_id: int) -> bool:
        return layer_id < self.n_hash_layers

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    # ---- validation -----------------------------------------------------------------------
    def __post_init__(self) -> None:
        def bad(fieldname: str, why: str) -> None:
            raise ConfigError(f"config field `{fieldname}`: {why}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank", "o_groups",
                     "o_lora_rank", "window_size", "n_routed_experts", "n_activated_experts",
                     "moe_inter_dim", "hc_mult", "hc_sinkhorn_iters", "index_n_heads", "index_head_dim",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(name, f"must be a positive integer, got {value!r}")
        if len(self.layer_types) != self.n_layers:
            bad("layer_types", f"has {len(self.layer_types)} entries but `n_layers` is {self.n_layers}")
        if len(self.compress_ratios) != self.n_layers:
            bad("compress_ratios", f"has {len(self.compress_ratios)} entries but `n_layers` is {self.n_layers}")
        for i, (t, r) in enumerate(zip(self.layer_types, self.compress_ratios)):
            if t not in LAYER_TYPES:
                bad("layer_types", f"layer {i} has unknown type {t!r} (allowed: {', '.join(LAYER_TYPES)})")
            if (t == "sliding") != (r == 0):
                bad("compress_ratios", f"layer {i} is {t!r} but its compression ratio is {r}")
            if r < 0 or (t != "sliding" and r < 2):
                bad("compress_ratios", f"layer {i} has invalid ratio {r}")
        if self.n_heads % self.o_groups:
            bad("o_groups", f"{self.o_groups} does not divide `n_heads` = {self.n_heads}")
        if not 0 < self.rope_head_dim <= self.head_dim or self.rope_head_dim % 2:
            bad("rope_head_dim", f"{self.rope_head_dim} must be even and in (0, `head_dim` = {self.head_dim}]")
        if self.rope_head_dim > self.index_head_dim:
            bad("index_head_dim", f"{self.index_head_dim} is smaller than `rope_head_dim` = {self.rope_head_dim}")
        if self.n_activated_experts > self.n_routed_experts:
            bad("n_activated_experts",
                f"top-k {self.n_activated_experts} exceeds `n_routed_experts` = {self.n_routed_experts}")
        if self.n_shared_experts != 1:
            bad("n_shared_experts", f"DeepSeek-V4 has exactly 1 shared expert, got {self.n_shared_experts}")
        if not 0 <= self.n_hash_layers <= self.n_layers:
            bad("n_hash_layers", f"{self.n_hash_layers} is outside [0, `n_layers` = {self.n_layers}]")
        if self.score_func not in ("sqrtsoftplus", "sigmoid", "softmax"):
            bad("score_func", f"unknown scoring function {self.score_func!r}")
        if self.index_topk <= 0:
            bad("index_topk", f"must be positive, got {self.index_topk}")
        if self.n_mtp_layers not in (0, 1):
            bad("n_mtp_layers", f"only 0 or 1 MTP module is supported, got {self.n_mtp_layers}")
        if self.dspark_stages:
            if self.n_mtp_layers:
                bad("n_mtp_layers", "a DSpark checkpoint's mtp.* tensors are its drafter: no MTP module beside it")
            if self.dspark_stages < 1 or self.dspark_block_size < 1:
                bad("dspark_block_size", f"must be a positive integer, got {self.dspark_block_size}")
            check_dspark_ids(bad, self.dspark_noise_token_id, self.vocab_size, self.dspark_target_layer_ids,
                             self.n_layers)
            if self.dspark_markov_rank < 1:
                bad("dspark_markov_rank", f"must be a positive integer, got {self.dspark_markov_rank}")
        if self.dtype not in DENSE_DTYPES:
            bad("dtype", f"unsupported storage dtype {self.dtype!r} (allowed: {', '.join(DENSE_DTYPES)})")
        if self.quant not in (None, "fp8"):
            bad("quant", f"unsupported weight quantization {self.quant!r}")
        if self.expert_dtype not in (None, "fp8", "fp4"):
            bad("expert_dtype", f"unsupported expert dtype {self.expert_dtype!r}")
        if self.expert_dtype is not None and self.quant is None:
            bad("expert_dtype", f"{self.expert_dtype!r} needs FP8 weights (`quant`)")
        if self.routed_expert_format == "fp4" and (self.dim % 32 or self.moe_inter_dim % 32):
            bad("moe_inter_dim", f"FP4 experts need `dim` ({self.dim}) and `moe_inter_dim` ({self.moe_inter_dim}) "
                                 "divisible by 32")
        if self.index_head_dim & (self.index_head_dim - 1):
            bad("index_head_dim", f"{self.index_head_dim} must be a power of two (Hadamard rotation)")

    # ---- construction from config files ---------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelArgs":
        cfg, source = read_config_json(Path(path), "not a DeepSeek-V4 checkpoint directory")
        return cls.from_dict(cfg, source=source)

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config") -> "ModelArgs":
        """Accepts hub (HF) keys or official `inference/config.json` keys. A ConfigError names
        `source` (the file) and the key as that file spells it (`hidden_size` in a hub config,
        `dim` in an official one), also when the check that fails is on the derived value."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        if is_v41_config(cfg):
            v41 = V41Args.from_dict(cfg, source)  # a ConfigError naming the key if the config is inconsistent
            raise V41ConfigError(
                f"{source}: a DeepSeek-V4.1 config (deepseek_v41): read and validated ({v41.n_layers} layers, "
                f"KV sources {list(v41.kv_source_layers)}, index sources {list(v41.index_source_layers)}), but "
                "it is not a DeepSeek-V4 config: V4's ModelArgs and loader do not read V4.1. LLM(model=...), "
                "`dayzero generate` and `dayzero serve` run it on one rank or over ranks (tensor / expert parallel, "
                "DP-attention + EP; dayzero.v41.served; its DSpark and vision are not built); "
                "dayzero.v41.loader.load_v41 loads it (docs/V41.md)")
        official = "dim" in cfg and "hidden_size" not in cfg
        try:
            return cls._from_official(cfg) if official else cls._from_hf(cfg)
        except ConfigError as e:
            keys = official_keys(cfg) if official else hub_keys(cfg)
            raise ConfigError(f"{source}: {in_file_terms(str(e), keys, _FIELDS)}") from None

    @classmethod
    def _from_official(cls, c: dict) -> "ModelArgs":
        k = Keys(c)
        n_layers = k.int("n_layers")
        ratios = k.list("compress_ratios", [0] * n_layers)
        types = [_type_of_ratio(r, 4) for r in ratios[:n_layers]]
        quant = "fp8" if k.str("dtype", "bf16") == "fp8" else None
        return cls(
            vocab_size=k.int("vocab_size"), dim=k.int("dim"), n_layers=n_layers, n_heads=k.int("n_heads"),
            head_dim=k.int("head_dim", 512), rope_head_dim=k.int("rope_head_dim", 64),
            q_lora_rank=k.int("q_lora_rank"), o_groups=k.int("o_groups"), o_lora_rank=k.int("o_lora_rank"),
            window_size=k.int("window_size", 128), layer_types=tuple(types),
            compress_ratios=tuple(ratios[:n_layers]), n_hash_layers=k.int("n_hash_layers", 0),
            n_routed_experts=k.int("n_routed_experts"), n_shared_experts=k.int("n_shared_experts", 1),
            n_activated_experts=k.int("n_activated_experts"), moe_inter_dim=k.int("moe_inter_dim"),
            score_func=k.str("score_func", "sqrtsoftplus"), route_scale=k.num("route_scale", 1.0),
            swiglu_limit=k.num("swiglu_limit", 0.0), index_n_heads=k.int("index_n_heads", 64),
            index_head_dim=k.int("index_head_dim", 128), index_topk=k.int("index_topk", 512),
            hc_mult=k.int("hc_mult", 4), hc_sinkhorn_iters=k.int("hc_sinkhorn_iters", 20),
            hc_eps=k.num("hc_eps", 1e-6), norm_eps=k.num("norm_eps", 1e-6),
            rope_theta=k.num("rope_theta", 10000.0), compress_rope_theta=k.num("compress_rope_theta", 40000.0),
            rope_factor=k.num("rope_factor", 40.0), original_seq_len=k.int("original_seq_len", 0),
            beta_fast=k.num("beta_fast", 32.0), beta_slow=k.num("beta_slow", 1.0),
            max_seq_len=k.int("max_seq_len", 1048576),
            **_drafter_fields(k, k.int("n_mtp_layers", 1), k.int("n_mtp_layers", 1)),
            dtype="bfloat16", quant=quant,
            expert_dtype=(k.str("expert_dtype", None) if quant else None),
        )

    @classmethod
    def _from_hf(cls, c: dict) -> "ModelArgs":
        k = Keys(c)
        n_layers = k.int("num_hidden_layers")
        rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
        rates.update(k.dict("compress_rates", {}))
        csa_rate, hca_rate = rates["compressed_sparse_attention"], rates["heavily_compressed_attention"]
        if c.get("layer_types") is not None:
            types = []
            for i, name in enumerate(k.list("layer_types")):
                if name not in _HF_LAYER_NAMES:
                    raise ConfigError(f"key `layer_types`: layer {i} has unknown type {name!r} "
                                      f"(allowed: {', '.join(_HF_LAYER_NAMES)})")
                types.append(_HF_LAYER_NAMES[name])
            ratios = [{"sliding": 0, "csa": csa_rate, "hca": hca_rate}[t] for t in types]
        elif c.get("compress_ratios") is not None:
            ratios = k.list("compress_ratios")
            types = [_type_of_ratio(r, csa_rate) for r in ratios]
        else:
            raise ConfigError("needs the key `layer_types` or `compress_ratios`")
        if len(types) < n_layers:
            raise ConfigError(f"key `{'layer_types' if c.get('layer_types') is not None else 'compress_ratios'}`: "
                              f"{len(types)} entries for {n_layers} layers (`num_hidden_layers`)")
        if c.get("mlp_layer_types") is not None:
            mlp = k.list("mlp_layer_types")
            n_hash = sum(1 for t in mlp if t == "hash_moe")
            if mlp != ["hash_moe"] * n_hash + ["moe"] * (len(mlp) - n_hash):
                raise ConfigError(f"key `mlp_layer_types`: hash layers must come first, got {mlp}")
            if k.int("num_hash_layers", n_hash) != n_hash:
                raise ConfigError(f"key `num_hash_layers`: {c['num_hash_layers']} disagrees with "
                                  f"the {n_hash} hash_moe entries of `mlp_layer_types`")
        else:
            n_hash = k.int("num_hash_layers", 3)
        rope_key = "rope_scaling"
        rope = k.dict("rope_scaling", {})
        if not rope and isinstance(c.get("rope_parameters"), dict):
            rope_key = "rope_parameters.compress" if "compress" in c["rope_parameters"] else "rope_parameters"
            rope = c["rope_parameters"].get("compress", c["rope_parameters"])
            if not isinstance(rope, dict):
                raise ConfigError(f"key `{rope_key}`: must be an object, got {rope!r}")
        r = Keys(rope, f"{rope_key}.")
        yarn = rope.get("rope_type", rope.get("type")) == "yarn"
        qc = k.dict("quantization_config", None)
        quant = None
        if qc:
            if qc.get("quant_method") != "fp8" or qc.get("fmt", "e4m3") != "e4m3":
                raise ConfigError(f"key `quantization_config`: unsupported {qc} (only quant_method 'fp8', "
                                  "fmt 'e4m3')")
            if list(qc.get("weight_block_size", [128, 128])) != [128, 128]:
                raise ConfigError("key `quantization_config.weight_block_size`: only [128, 128] is supported, "
                                  f"got {qc.get('weight_block_size')!r}")
            quant = "fp8"
        expert_dtype = c.get("expert_dtype", (qc or {}).get("expert_dtype"))
        if quant and expert_dtype is None:
            expert_dtype = "fp4"  # instruct checkpoints; Base checkpoints say "fp8"
        head_dim = k.int("head_dim", 512)
        used = set(_HF_KEYS_USED)
        return cls(
            vocab_size=k.int("vocab_size"), dim=k.int("hidden_size"), n_layers=n_layers,
            n_heads=k.int("num_attention_heads"), head_dim=head_dim,
            rope_head_dim=(k.int("qk_rope_head_dim") if "qk_rope_head_dim" in c
                           else int(head_dim * k.num("partial_rotary_factor", 0.125))),
            q_lora_rank=k.int("q_lora_rank"), o_groups=k.int("o_groups"), o_lora_rank=k.int("o_lora_rank"),
            window_size=k.int("sliding_window", 128), layer_types=tuple(types[:n_layers]),
            compress_ratios=tuple(ratios[:n_layers]), n_hash_layers=n_hash,
            n_routed_experts=k.int("n_routed_experts"), n_shared_experts=k.int("n_shared_experts", 1),
            n_activated_experts=k.int("num_experts_per_tok"), moe_inter_dim=k.int("moe_intermediate_size"),
            score_func=k.str("scoring_func", "sqrtsoftplus"),
            route_scale=k.num("routed_scaling_factor", 1.0),
            swiglu_limit=k.num("swiglu_limit", 0.0), index_n_heads=k.int("index_n_heads", 64),
            index_head_dim=k.int("index_head_dim", 128), index_topk=k.int("index_topk", 512),
            hc_mult=k.int("hc_mult", 4), hc_sinkhorn_iters=k.int("hc_sinkhorn_iters", 20),
            hc_eps=k.num("hc_eps", 1e-6), norm_eps=k.num("rms_norm_eps", 1e-6),
            rope_theta=k.num("rope_theta", 10000.0), compress_rope_theta=k.num("compress_rope_theta", 160000.0),
            rope_factor=r.num("factor", 1.0) if yarn else 1.0,
            original_seq_len=r.int("original_max_position_embeddings", 0) if yarn else 0,
            beta_fast=r.num("beta_fast", 32.0), beta_slow=r.num("beta_slow", 1.0),
            max_seq_len=k.int("max_position_embeddings", 1048576),
            **_drafter_fields(k, k.int("num_nextn_predict_layers", 0),
                              len(c["compress_ratios"]) - n_layers if isinstance(c.get("compress_ratios"), list)
                              and len(c["compress_ratios"]) > n_layers else DSPARK_STAGES),
            dtype=c.get("torch_dtype", c.get("dtype", "bfloat16")) or "bfloat16", quant=quant,
            expert_dtype=expert_dtype if quant else None,
            bos_token_id=k.int("bos_token_id", 0, allow_none=True) or 0,
            eos_token_id=_first(c.get("eos_token_id", 1)),
            extra={key: v for key, v in c.items() if key not in used},
        )

    def to_hf_dict(self) -> dict:
        """The hub `config.json` for this model (HF keys, readable by transformers too)."""
        rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
        rates.update({_HF_NAME_OF[t]: r for t, r in zip(self.layer_types, self.compress_ratios) if r})
        cfg = dict(self.extra)
        cfg.update({
            "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": 1, "head_dim": self.head_dim,
            "qk_rope_head_dim": self.rope_head_dim, "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups, "o_lora_rank": self.o_lora_rank, "sliding_window": self.window_size,
            "layer_types": [_HF_NAME_OF[t] for t in self.layer_types],
            "compress_rates": rates,
            "compress_ratios": list(self.compress_ratios) + [0] * (self.n_mtp_layers + self.dspark_stages),
            "num_hash_layers": self.n_hash_layers,
            "mlp_layer_types": ["hash_moe"] * self.n_hash_layers + ["moe"] * (self.n_layers - self.n_hash_layers),
            "n_routed_experts": self.n_routed_experts, "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.n_activated_experts, "moe_intermediate_size": self.moe_inter_dim,
            "scoring_func": self.score_func, "topk_method": "noaux_tc", "norm_topk_prob": True,
            "routed_scaling_factor": self.route_scale, "swiglu_limit": self.swiglu_limit,
            "index_n_heads": self.index_n_heads, "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk, "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters, "hc_eps": self.hc_eps,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta,
            # a DSpark checkpoint says 1 next-n layer, as DeepSeek's 0731 root config does
            "max_position_embeddings": self.max_seq_len,
            "num_nextn_predict_layers": 1 if self.dspark_stages else self.n_mtp_layers,
            "hidden_act": "silu", "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": False, "torch_dtype": self.dtype, "attention_bias": False,
        })
        if self.dspark_stages:
            cfg.update({"dspark_block_size": self.dspark_block_size, "dspark_noise_token_id": self.dspark_noise_token_id,
                        "dspark_target_layer_ids": list(self.dspark_target_layer_ids),
                        "dspark_markov_rank": self.dspark_markov_rank})
        if self.yarn:
            cfg["rope_scaling"] = {"type": "yarn", "factor": self.rope_factor,
                                   "original_max_position_embeddings": self.original_seq_len,
                                   "beta_fast": self.beta_fast, "beta_slow": self.beta_slow}
        if self.quant:
            cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
            cfg["expert_dtype"] = self.expert_dtype or "fp8"
        return cfg

    @property
    def yarn(self) -> bool:
        return self.original_seq_len > 0 and self.rope_factor > 1


_HF_KEYS_USED = (
    "architectures model_type vocab_size hidden_size num_hidden_layers num_attention_heads "
    "num_key_value_heads head_dim qk_rope_head_dim partial_rotary_factor q_lora_rank o_groups o_lora_rank "
    "sliding_window layer_types compress_rates compress_ratios num_hash_layers mlp_layer_types "
    "n_routed_experts n_shared_experts num_experts_per_tok moe_intermediate_size scoring_func topk_method "
    "norm_topk_prob routed_scaling_factor swiglu_limit index_n_heads index_head_dim index_topk hc_mult "
    "hc_sinkhorn_iters hc_eps rms_norm_eps rope_theta compress_rope_theta rope_scaling rope_parameters "
    "max_position_embeddings num_nextn_predict_layers hidden_act bos_token_id eos_token_id "
    "tie_word_embeddings torch_dtype dtype attention_bias quantization_config expert_dtype"
).split() + ["dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids",
                "dspark_markov_rank"]


DSPARK_STAGES = 3  # every DSpark DeepSeek ships has three stages (mtp.0 .. mtp.2)
_DSPARK_KEYS = ("dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids", "dspark_markov_rank")


def _drafter_fields(k: Keys, n_mtp: int, dspark_stages: int) -> dict:
    """n_mtp_layers and the DSpark fields: a config with `dspark_*` keys ships DSpark under mtp.*
    (whatever its next-n count says: 0731's root config says 1), one without ships MTP."""
    if "dspark_block_size" not in k.c:
        return {"n_mtp_layers": n_mtp}
    return {"n_mtp_layers": 0, "dspark_stages": dspark_stages, "dspark_block_size": k.int("dspark_block_size"),
            "dspark_noise_token_id": k.int("dspark_noise_token_id"),
            "dspark_target_layer_ids": tuple(k.list("dspark_target_layer_ids")),
            "dspark_markov_rank": k.int("dspark_markov_rank")}


def _type_of_ratio(r: int, csa_rate: int) -> str:
    if not isinstance(r, int) or r < 0:
        raise ConfigError(f"config field `compress_ratios`: invalid ratio {r!r}")
    return "sliding" if r == 0 else ("csa" if r == csa_rate else "hca")


def _first(x: Any) -> int:
    v = x[0] if isinstance(x, list) and x else x
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"key `eos_token_id`: must be an integer or a list of them, got {x!r}")
    return v


_FIELDS = {f.name for f in dataclasses.fields(ModelArgs)}


# ---- presets with the real shapes (v4-architecture.md sections 2 and 2.4) -------------------
def _schedule(first: list[int], n_pairs: int, tail: list[int]) -> list[int]:
    return first + [4, 128] * n_pairs + tail


def flash() -> ModelArgs:
    ratios = _schedule([0, 0], 20, [4])
    return ModelArgs(layer_types=tuple(_type_of_ratio(r, 4) for r in ratios), compress_ratios=tuple(ratios))


def flash_0731() -> ModelArgs:
    """Same backbone as Flash, with DeepSeek's three-stage DSpark drafter in place of MTP."""
    return flash().replace(n_mtp_layers=0, dspark_stages=3, dspark_block_size=5, dspark_noise_token_id=128799,
                           dspark_target_layer_ids=(40, 41, 42), dspark_markov_rank=256)


def pro() -> ModelArgs:
    ratios = _schedule([128, 128], 29, [4])
    return ModelArgs(dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, o_groups=16,
                     layer_types=tuple(_type_of_ratio(r, 4) for r in ratios), compress_ratios=tuple(ratios),
                     n_routed_experts=384, moe_inter_dim=3072, route_scale=2.5, index_topk=1024)


PRESETS = {"v4-flash": flash, "v4-pro": pro, "v4-flash-0731": flash_0731}


def param_count(args: ModelArgs) -> int:
    """Logical parameter count (FP4 counted as one parameter per value), MTP included."""
    from dayzero.reference.model import Transformer  # local: config must not import model at load

    import torch
    with torch.device("meta"):
        model = Transformer(args.replace(quant=None, expert_dtype=None))
    return sum(math.prod(t.shape) for t in model.state_dict().values())
