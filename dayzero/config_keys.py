"""Reading a model's config.json in the file's own terms: typed reads whose errors name the key as
the file spells it (`Keys`), and the map from ModelArgs fields to the hub config's keys
(`hidden_size`, `num_hidden_layers`, ...) or the official inference/config.json's (`dim`,
`n_layers`, ...), so a check on a derived value still names the key the user wrote (config.py)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path


class ConfigError(ValueError):
    """An inconsistent or unsupported model configuration; the message names the field."""


_REQUIRED = object()


class Keys:
    """Typed reads of a config dict; every error names the key as the file spells it."""

    def __init__(self, c: dict, prefix: str = ""):
        self.c, self.prefix = c, prefix

    def _get(self, key: str, default):
        v = self.c.get(key, _REQUIRED)
        if v is _REQUIRED:
            if default is _REQUIRED:
                raise ConfigError(f"key `{self.prefix}{key}` is missing")
            return default
        return v

    def _bad(self, key: str, what: str, v) -> ConfigError:
        return ConfigError(f"key `{self.prefix}{key}`: must be {what}, got {v!r}")

    def int(self, key: str, default=_REQUIRED, allow_none: bool = False) -> int:
        v = self._get(key, default)
        if v is None and allow_none:
            return v
        if not isinstance(v, int) or isinstance(v, bool):
            raise self._bad(key, "an integer", v)
        return v

    def num(self, key: str, default=_REQUIRED) -> float:
        v = self._get(key, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise self._bad(key, "a finite number", v)
        return float(v)

    def str(self, key: str, default=_REQUIRED):
        v = self._get(key, default)
        if v is not None and not isinstance(v, str):
            raise self._bad(key, "a string", v)
        return v

    def list(self, key: str, default=_REQUIRED) -> list:
        v = self._get(key, default)
        if not isinstance(v, list):
            raise self._bad(key, "a list", v)
        return list(v)

    def dict(self, key: str, default=_REQUIRED):
        v = self._get(key, default)
        if v is None:
            return default
        if not isinstance(v, dict):
            raise self._bad(key, "an object", v)
        return v


# ModelArgs field -> the key it comes from, per config form; fields absent here share their key's name
_HUB_KEY_OF = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "rope_head_dim": "qk_rope_head_dim", "window_size": "sliding_window", "n_hash_layers": "num_hash_layers",
    "n_activated_experts": "num_experts_per_tok", "moe_inter_dim": "moe_intermediate_size",
    "score_func": "scoring_func", "route_scale": "routed_scaling_factor", "norm_eps": "rms_norm_eps",
    "rope_factor": "rope_scaling.factor", "original_seq_len": "rope_scaling.original_max_position_embeddings",
    "beta_fast": "rope_scaling.beta_fast", "beta_slow": "rope_scaling.beta_slow",
    "max_seq_len": "max_position_embeddings", "n_mtp_layers": "num_nextn_predict_layers",
    "dtype": "torch_dtype", "quant": "quantization_config", "dspark_stages": "compress_ratios",
}
_OFFICIAL_KEY_OF = {"layer_types": "compress_ratios", "quant": "dtype", "dtype": "dtype",
                    "dspark_stages": "n_mtp_layers"}


def read_config_json(path, what: str = "") -> tuple:
    """The object in directory `path`'s config.json and that file's name (a ConfigError names the
    directory when the file is missing, `what` saying what it should have been, and the file when
    it is not JSON)."""
    cfg_path = Path(path) / "config.json"
    try:
        return json.loads(cfg_path.read_text()), str(cfg_path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json{f' ({what})' if what else ''}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_path}: invalid JSON ({e})") from None


def hub_keys(c: dict) -> dict[str, str]:
    keys = dict(_HUB_KEY_OF)
    if "qk_rope_head_dim" not in c:
        keys["rope_head_dim"] = "partial_rotary_factor"
    if c.get("layer_types") is None:
        keys["layer_types"] = "compress_ratios"
    else:
        keys["compress_ratios"] = "compress_rates"
    if c.get("mlp_layer_types") is not None and "num_hash_layers" not in c:
        keys["n_hash_layers"] = "mlp_layer_types"
    if "torch_dtype" not in c and "dtype" in c:
        keys["dtype"] = "dtype"
    if "rope_scaling" not in c and isinstance(c.get("rope_parameters"), dict):
        base = "rope_parameters.compress" if "compress" in c["rope_parameters"] else "rope_parameters"
        for f, sub in (("rope_factor", "factor"), ("original_seq_len", "original_max_position_embeddings"),
                       ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow")):
            keys[f] = f"{base}.{sub}"
    if "expert_dtype" not in c and "expert_dtype" in (c.get("quantization_config") or {}):
        keys["expert_dtype"] = "quantization_config.expert_dtype"
    return keys


def official_keys(c: dict) -> dict[str, str]:
    return dict(_OFFICIAL_KEY_OF)


def in_file_terms(message: str, keys: dict[str, str], fields: set[str]) -> str:
    """Rewrite a validation message from ModelArgs field names (`fields`, in backticks) to the
    config file's keys."""
    def key(m: re.Match) -> str:
        name = m.group(1)
        return f"`{keys.get(name, name)}`" if name in fields else m.group(0)
    message = re.sub(r"^config field `", "key `", message)
    return re.sub(r"`([a-z_0-9.]+)`", key, message)


def check_dspark_ids(bad, noise_token_id: int, vocab_size: int, target_layer_ids, n_layers: int) -> None:
    """The DSpark keys V4-Flash-0731 and V4.1 configs share: the noise token and the target layers
    (`bad(field, why)` raises the config's error)."""
    if not 0 <= noise_token_id < vocab_size:
        bad("dspark_noise_token_id", f"{noise_token_id} is not a token id below `vocab_size` = {vocab_size}")
    ids = target_layer_ids
    if not ids or len(set(ids)) != len(ids) or not all(0 <= i < n_layers for i in ids):
        bad("dspark_target_layer_ids", f"must be distinct backbone layer ids in [0, {n_layers}), got {list(ids)}")
