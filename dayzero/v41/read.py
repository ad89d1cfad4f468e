"""Reading V4.1's two config layouts into V41Args keyword arguments (research/v41-and-dspark.md 1.2):
the hub config.json (nested `text_config`, quantization and vision at the top level) and DeepSeek's
flat inference/config.json (`dim`, `n_layers`, `kv_source_layers`, `candidate_source_layer`,
`n_mtp_layers`, `dtype`, `vision_*`, ...). Errors name keys as the file spells them."""
from __future__ import annotations

from dayzero.config_keys import ConfigError, Keys

# V41Args field -> hub text_config key, where the names differ
_HUB_TEXT_KEY_OF = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "rope_head_dim": "qk_rope_head_dim", "window_size": "sliding_window",
    "kv_source_layers": "kv_source_layer_ids", "index_source_layers": "index_source_layer_ids",
    "candidate_source_layer": "candidate_source_layer_id", "n_activated_experts": "num_experts_per_tok",
    "moe_inter_dim": "moe_intermediate_size", "score_func": "scoring_func", "route_scale": "routed_scaling_factor",
    "norm_eps": "rms_norm_eps", "rope_factor": "rope_scaling.factor",
    "original_seq_len": "rope_scaling.original_max_position_embeddings", "beta_fast": "rope_scaling.beta_fast",
    "beta_slow": "rope_scaling.beta_slow", "max_seq_len": "max_position_embeddings",
    "n_mtp_layers": "num_nextn_predict_layers", "dspark_n_activated_experts": "dspark_num_experts_per_tok",
}
# fields read from the hub config's top level
_HUB_TOP_KEY_OF = {
    "quant": "quantization_config", "weight_block_size": "quantization_config.weight_block_size",
    "expert_dtype": "quantization_config.expert_dtype", "image_token_id": "image_token_id",
    "vision_layers": "vision_config.num_hidden_layers",
}
_OFFICIAL_KEY_OF = {"quant": "dtype", "weight_block_size": "dtype", "vision_layers": "vision_n_layers"}


def _text(c: dict) -> tuple[dict, str]:
    if "text_config" in c:
        t = c["text_config"]
        if not isinstance(t, dict):
            raise ConfigError(f"key `text_config`: must be an object, got {t!r}")
        if t.get("model_type", "deepseek_v41_text") != "deepseek_v41_text":
            raise ConfigError(f"key `text_config.model_type`: must be 'deepseek_v41_text', got {t['model_type']!r}")
        return t, "text_config."
    if c.get("model_type") == "deepseek_v41_text":
        return c, ""
    raise ConfigError("key `text_config` is missing (a deepseek_v41 config.json nests the text model there)")


def hub_key_map(c: dict) -> dict[str, str]:
    try:
        t, prefix = _text(c)
    except ConfigError:
        t, prefix = {}, "text_config."
    keys = {f: prefix + k for f, k in _HUB_TEXT_KEY_OF.items()}
    keys["engram_pad_id"] = prefix + ("engram_pad_id" if "engram_pad_id" in t else "engram_pad_token_id")
    from dayzero.v41.config import _FIELDS
    for f in _FIELDS:
        keys.setdefault(f, prefix + f)
    keys.update(_HUB_TOP_KEY_OF)
    return keys


def official_key_map() -> dict[str, str]:
    return dict(_OFFICIAL_KEY_OF)


def _ints(k: Keys, key: str, default=None) -> tuple[int, ...]:
    v = k.list(key) if default is None else k.list(key, default)
    for j, x in enumerate(v):
        if not isinstance(x, int) or isinstance(x, bool):
            raise ConfigError(f"key `{k.prefix}{key}`: entry {j} must be an integer, got {x!r}")
    return tuple(v)


def _expect(k: Keys, key: str, want, why: str) -> None:
    if key in k.c and k.c[key] != want:
        raise ConfigError(f"key `{k.prefix}{key}`: must be {want!r} ({why}), got {k.c[key]!r}")


def _ratios(k: Keys, key: str, n_layers: int, n_mtp: int, nextn_key: str) -> tuple[int, ...]:
    """The backbone's ratios; trailing DSpark-stage entries (if the file lists them) must be 0."""
    ratios = _ints(k, key)
    if len(ratios) not in (n_layers, n_layers + n_mtp):
        raise ConfigError(f"key `{k.prefix}{key}`: has {len(ratios)} entries; must be one per layer "
                          f"({n_layers}) or per layer and DSpark stage ({n_layers} + `{k.prefix}{nextn_key}` "
                          f"{n_mtp} = {n_layers + n_mtp})")
    for j, r in enumerate(ratios[n_layers:]):
        if r != 0:
            raise ConfigError(f"key `{k.prefix}{key}`: entry {n_layers + j} (DSpark stage {j}) is {r}; "
                              "DSpark stages are sliding-window only (0)")
    return ratios[:n_layers]


def _common(k: Keys) -> dict:
    """Keys both layouts spell alike."""
    return dict(
        vocab_size=k.int("vocab_size"), head_dim=k.int("head_dim"), q_lora_rank=k.int("q_lora_rank"),
        o_groups=k.int("o_groups"), o_lora_rank=k.int("o_lora_rank"),
        candidate_topk_blocks=k.int("candidate_topk_blocks"), candidate_block_size=k.int("candidate_block_size"),
        index_n_heads=k.int("index_n_heads"), index_head_dim=k.int("index_head_dim"),
        index_topk=k.int("index_topk"), n_routed_experts=k.int("n_routed_experts"),
        n_shared_experts=k.int("n_shared_experts", 1), gate_temp=k.num("gate_temp", 1.0),
        swiglu_limit=k.num("swiglu_limit"), hc_mult=k.int("hc_mult"), hc_sinkhorn_iters=k.int("hc_sinkhorn_iters"),
        hc_eps=k.num("hc_eps"), rope_theta=k.num("rope_theta"), compress_rope_theta=k.num("compress_rope_theta"),
        engram_layer_ids=_ints(k, "engram_layer_ids", []),
    )


def _engram(k: Keys, layer_ids: tuple, pad_key: str) -> dict:
    if not layer_ids:
        return dict(engram_num_embeddings=_ints(k, "engram_num_embeddings", []), engram_max_ngram_size=0,
                    engram_vocab_size=0, engram_n_heads=0, engram_head_dim=0, engram_pad_id=0,
                    engram_compressed_vocab_size=0)
    return dict(engram_num_embeddings=_ints(k, "engram_num_embeddings"),
                engram_max_ngram_size=k.int("engram_max_ngram_size"), engram_vocab_size=k.int("engram_vocab_size"),
                engram_n_heads=k.int("engram_n_heads"), engram_head_dim=k.int("engram_head_dim"),
                engram_pad_id=k.int(pad_key), engram_compressed_vocab_size=k.int("engram_compressed_vocab_size"))


def _dspark(k: Keys, n_mtp: int, topk_key: str) -> dict:
    if not n_mtp:
        return dict(n_mtp_layers=0, dspark_block_size=0, dspark_noise_token_id=0, dspark_target_layer_ids=(),
                    dspark_markov_rank=0, dspark_n_routed_experts=0, dspark_n_activated_experts=0)
    return dict(n_mtp_layers=n_mtp, dspark_block_size=k.int("dspark_block_size"),
                dspark_noise_token_id=k.int("dspark_noise_token_id"),
                dspark_target_layer_ids=_ints(k, "dspark_target_layer_ids"),
                dspark_markov_rank=k.int("dspark_markov_rank"),
                dspark_n_routed_experts=k.int("dspark_n_routed_experts"),
                dspark_n_activated_experts=k.int(topk_key))


def _no_v4_only_keys(k: Keys) -> None:
    for key in ("num_hash_layers", "n_hash_layers"):
        if k.c.get(key):
            raise ConfigError(f"key `{k.prefix}{key}`: DeepSeek-V4.1 has no hash-routed layers, got {k.c[key]!r}")
    for key in ("n_group", "topk_group"):
        if k.c.get(key) not in (None, 1):
            raise ConfigError(f"key `{k.prefix}{key}`: DeepSeek-V4.1 routes with a plain top-k over all experts "
                              f"(no expert groups), got {k.c[key]!r}")


def from_hub(c: dict) -> dict:
    t, prefix = _text(c)
    k = Keys(t, prefix)
    _no_v4_only_keys(k)
    _expect(k, "num_key_value_heads", 1, "one shared K=V latent")
    _expect(k, "tie_word_embeddings", False, "head.weight is its own tensor")
    _expect(k, "hidden_act", "silu", "clamped SwiGLU experts")
    _expect(k, "topk_method", "noaux_tc", "the bias steers selection only")
    _expect(k, "norm_topk_prob", True, "the top-k weights are renormalised")
    n_layers, n_mtp = k.int("num_hidden_layers"), k.int("num_nextn_predict_layers", 0)
    rope_key, rope = "rope_scaling", t.get("rope_scaling")
    if rope is None and isinstance(t.get("rope_parameters"), dict):
        rope_key, rope = "rope_parameters.compress", t["rope_parameters"].get("compress")
    if rope is not None and not isinstance(rope, dict):
        raise ConfigError(f"key `{prefix}{rope_key}`: must be an object, got {rope!r}")
    rope = rope or {}
    r = Keys(rope, f"{prefix}{rope_key}.")
    yarn = rope.get("rope_type", rope.get("type")) == "yarn"
    top = Keys(c)
    qc = top.dict("quantization_config", None)
    quant, block, expert_dtype = None, (32, 32), None
    if qc:
        q = Keys(qc, "quantization_config.")
        if q.str("quant_method") != "fp8":
            raise ConfigError(f"key `quantization_config.quant_method`: V4.1 checkpoints are 'fp8', got "
                              f"{qc['quant_method']!r}")
        if q.str("scale_fmt", "ue8m0") != "ue8m0":
            raise ConfigError(f"key `quantization_config.scale_fmt`: V4.1 scales are 'ue8m0', got {qc['scale_fmt']!r}")
        block = _ints(q, "weight_block_size")
        quant, expert_dtype = "fp8", c.get("expert_dtype", qc.get("expert_dtype", "fp4"))
    vision = top.dict("vision_config", None)
    out = _common(k)
    return dict(
        out, dim=k.int("hidden_size"), n_layers=n_layers, n_heads=k.int("num_attention_heads"),
        rope_head_dim=k.int("qk_rope_head_dim"), window_size=k.int("sliding_window"),
        compress_ratios=_ratios(k, "compress_ratios", n_layers, n_mtp, "num_nextn_predict_layers"),
        kv_source_layers=_ints(k, "kv_source_layer_ids"), index_source_layers=_ints(k, "index_source_layer_ids"),
        candidate_source_layer=k.int("candidate_source_layer_id"),
        n_activated_experts=k.int("num_experts_per_tok"), moe_inter_dim=k.int("moe_intermediate_size"),
        score_func=k.str("scoring_func"), route_scale=k.num("routed_scaling_factor"),
        norm_eps=k.num("rms_norm_eps"),
        rope_factor=r.num("factor") if yarn else 1.0,
        original_seq_len=r.int("original_max_position_embeddings") if yarn else 0,
        beta_fast=r.num("beta_fast", 32.0) if yarn else 32.0, beta_slow=r.num("beta_slow", 1.0) if yarn else 1.0,
        max_seq_len=k.int("max_position_embeddings"),
        **_engram(k, out["engram_layer_ids"], "engram_pad_id" if "engram_pad_id" in t else "engram_pad_token_id"),
        **_dspark(k, n_mtp, "dspark_num_experts_per_tok"),
        quant=quant, weight_block_size=block, expert_dtype=expert_dtype,
        image_token_id=top.int("image_token_id", 0),
        vision_layers=Keys(vision, "vision_config.").int("num_hidden_layers") if vision else 0,
    )


def from_official(c: dict) -> dict:
    k = Keys(c)
    _no_v4_only_keys(k)
    n_layers, n_mtp = k.int("n_layers"), k.int("n_mtp_layers", 0)
    dtype = k.str("dtype", "bf16")
    if dtype not in ("fp8", "bf16"):
        raise ConfigError(f"key `dtype`: must be 'fp8' or 'bf16', got {dtype!r}")
    quant = "fp8" if dtype == "fp8" else None
    out = _common(k)
    return dict(
        out, dim=k.int("dim"), n_layers=n_layers, n_heads=k.int("n_heads"),
        rope_head_dim=k.int("rope_head_dim"), window_size=k.int("window_size"),
        compress_ratios=_ratios(k, "compress_ratios", n_layers, n_mtp, "n_mtp_layers"),
        kv_source_layers=_ints(k, "kv_source_layers"), index_source_layers=_ints(k, "index_source_layers"),
        candidate_source_layer=k.int("candidate_source_layer"),
        n_activated_experts=k.int("n_activated_experts"), moe_inter_dim=k.int("moe_inter_dim"),
        score_func=k.str("score_func"), route_scale=k.num("route_scale"), norm_eps=k.num("norm_eps"),
        rope_factor=k.num("rope_factor", 1.0), original_seq_len=k.int("original_seq_len", 0),
        beta_fast=k.num("beta_fast", 32.0), beta_slow=k.num("beta_slow", 1.0),
        max_seq_len=k.int("max_seq_len", 1048576),
        **_engram(k, out["engram_layer_ids"], "engram_pad_id"),
        **_dspark(k, n_mtp, "dspark_n_activated_experts"),
        # the flat file has no block size: DeepSeek's FP8 format for V4.1 is 32x32 (section 1.5)
        quant=quant, weight_block_size=(32, 32), expert_dtype=k.str("expert_dtype", "fp4") if quant else None,
        image_token_id=k.int("image_token_id", 0), vision_layers=k.int("vision_n_layers", 0),
    )
