import json

import pytest

from dayzero.config import ConfigError, ModelArgs, flash, flash_0731, param_count, pro

# Official V4-Flash inference/config.json values (v4-architecture.md 2.2)
OFFICIAL_FLASH = {
    "vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43, "n_hash_layers": 3,
    "n_heads": 64, "n_routed_experts": 256, "n_shared_experts": 1, "n_activated_experts": 6,
    "score_func": "sqrtsoftplus", "route_scale": 1.5, "swiglu_limit": 10.0, "q_lora_rank": 1024,
    "head_dim": 512, "rope_head_dim": 64, "o_groups": 8, "o_lora_rank": 1024, "window_size": 128,
    "original_seq_len": 65536, "rope_theta": 10000, "rope_factor": 16, "beta_fast": 32, "beta_slow": 1,
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20,
    "dtype": "fp8", "scale_fmt": "ue8m0", "expert_dtype": "fp4", "compress_rope_theta": 160000,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
}


def test_official_and_hub_keys_give_the_same_flash():
    official = ModelArgs.from_dict(OFFICIAL_FLASH)
    hub = ModelArgs.from_dict(flash().to_hf_dict())
    assert official == hub == flash().replace(max_seq_len=1048576)
    assert official.layer_types[:4] == ("sliding", "sliding", "csa", "hca")
    assert official.layer_types[42] == "csa"  # Flash layer 42 is CSA, not SWA (v4-arch 10.2)
    assert official.routed_expert_format == "fp4" and official.linear_format == "fp8"


def test_schedules_of_the_presets():
    f, p = flash(), pro()
    assert (f.layer_types.count("csa"), f.layer_types.count("hca"), f.layer_types.count("sliding")) == (21, 20, 2)
    assert (p.layer_types.count("csa"), p.layer_types.count("hca"), p.layer_types.count("sliding")) == (30, 31, 0)
    assert p.layer_types[2] == "csa"  # Pro's phase: layer 2 is CSA (transformers' default is the opposite)
    assert flash_0731().layer_types == f.layer_types


def test_preset_parameter_counts_match_published_totals():
    # 290.94B (Flash) and 1598.84B (Pro) logical parameters including MTP (v4-architecture.md 1)
    assert round(param_count(flash()) / 1e9, 2) == 290.94
    assert round(param_count(pro()) / 1e9, 2) == 1598.84


def test_hf_style_keys_layer_types_and_mlp_layer_types():
    cfg = flash().to_hf_dict()
    del cfg["compress_ratios"], cfg["num_hash_layers"]
    args = ModelArgs.from_dict(cfg)
    assert args.layer_types == flash().layer_types and args.n_hash_layers == 3
    assert args.yarn and args.rope_factor == 16 and args.original_seq_len == 65536


def test_transformers_saved_rope_parameters_are_understood():
    cfg = flash().to_hf_dict()
    rope = cfg.pop("rope_scaling")
    cfg["rope_parameters"] = {"main": {"rope_type": "default", "rope_theta": 10000.0},
                              "compress": {**rope, "rope_type": "yarn", "rope_theta": 160000.0}}
    assert ModelArgs.from_dict(cfg).rope_factor == 16


def test_base_checkpoint_expert_dtype():
    cfg = flash().to_hf_dict()
    cfg["expert_dtype"] = "fp8"
    assert ModelArgs.from_dict(cfg).routed_expert_format == "fp8_f32"
    del cfg["expert_dtype"]
    assert ModelArgs.from_dict(cfg).routed_expert_format == "fp4"  # instruct default


@pytest.mark.parametrize("change, field", [
    ({"num_attention_heads": 60}, "o_groups"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
    ({"n_shared_experts": 2}, "n_shared_experts"),
    ({"num_hash_layers": 50, "mlp_layer_types": None}, "num_hash_layers"),
    ({"num_hash_layers": 2}, "num_hash_layers"),  # disagrees with mlp_layer_types
    ({"index_head_dim": 96}, "index_head_dim"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_size": "256"}, "hidden_size"),
    ({"num_hidden_layers": 44}, "layer_types"),  # 43 entries for 44 layers
    ({"moe_intermediate_size": 100}, "moe_intermediate_size"),
    ({"qk_rope_head_dim": 1000}, "qk_rope_head_dim"),
    ({"num_nextn_predict_layers": 2}, "num_nextn_predict_layers"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
    ({"rope_scaling": {"type": "yarn", "factor": "x"}}, "rope_scaling.factor"),
    ({"torch_dtype": "int8"}, "torch_dtype"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
    ({"scoring_func": "relu"}, "scoring_func"),
])
def test_inconsistent_configs_name_the_field(change, field):
    cfg = flash().to_hf_dict()
    cfg.update(change)
    with pytest.raises(ConfigError, match=f"`{field}"):
        ModelArgs.from_dict(cfg)


def test_unknown_layer_type_and_wrong_lengths_are_rejected():
    cfg = flash().to_hf_dict()
    cfg["layer_types"] = ["sliding_attention", "dense_attention"] + cfg["layer_types"][2:]
    with pytest.raises(ConfigError, match="unknown type 'dense_attention'"):
        ModelArgs.from_dict(cfg)
    cfg = flash().to_hf_dict()
    del cfg["layer_types"]
    cfg["compress_ratios"] = [0, 4]
    with pytest.raises(ConfigError, match="2 entries for 43 layers"):
        ModelArgs.from_dict(cfg)
    cfg = flash().to_hf_dict()
    cfg["mlp_layer_types"] = ["moe", "hash_moe"] + ["moe"] * 41
    with pytest.raises(ConfigError, match="hash layers must come first"):
        ModelArgs.from_dict(cfg)
    with pytest.raises(ConfigError, match="key `vocab_size` is missing"):
        ModelArgs.from_dict({"num_hidden_layers": 2, "layer_types": ["sliding_attention"] * 2})


def test_from_dir_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelArgs.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="invalid JSON"):
        ModelArgs.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(flash().to_hf_dict()))
    assert ModelArgs.from_dir(tmp_path).n_layers == 43


def _message(cfg, source="config.json") -> str:
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_dict(cfg, source=source)
    return str(e.value)


def test_hub_config_errors_speak_hub_keys_never_internal_names():
    cfg = flash().to_hf_dict()
    cfg["hidden_size"] = 0
    msg = _message(cfg, "/ckpt/config.json")
    assert msg.startswith("/ckpt/config.json: key `hidden_size`:") and "`dim`" not in msg
    cfg = flash().to_hf_dict()
    cfg["num_attention_heads"] = 60
    msg = _message(cfg)
    assert "`o_groups`" in msg and "`num_attention_heads` = 60" in msg and "`n_heads`" not in msg
    cfg = flash().to_hf_dict()
    cfg["num_experts_per_tok"] = 300
    msg = _message(cfg)
    assert "key `num_experts_per_tok`" in msg and "`n_routed_experts` = 256" in msg
    cfg = flash().to_hf_dict()  # dtype key spelled as newer transformers write it
    del cfg["torch_dtype"]
    cfg["dtype"] = "int8"
    assert "key `dtype`: unsupported storage dtype 'int8'" in _message(cfg)


def test_official_config_errors_speak_official_keys():
    cfg = dict(OFFICIAL_FLASH, dim="256")
    assert _message(cfg, "/ckpt/inference/config.json") == \
        "/ckpt/inference/config.json: key `dim`: must be an integer, got '256'"
    cfg = dict(OFFICIAL_FLASH, n_layers=45)  # compress_ratios lists 43 layers + the MTP one
    msg = _message(cfg)
    assert "key `compress_ratios`" in msg and "`n_layers` is 45" in msg and "num_hidden_layers" not in msg
    cfg = dict(OFFICIAL_FLASH, n_activated_experts=300)
    assert "key `n_activated_experts`" in _message(cfg)
    cfg = dict(OFFICIAL_FLASH)
    del cfg["n_heads"]
    assert _message(cfg) == "config.json: key `n_heads` is missing"


def test_from_dir_names_the_file_and_the_key(tmp_path):
    cfg = flash().to_hf_dict()
    cfg["num_hidden_layers"] = "43"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_dir(tmp_path)
    assert str(e.value) == f"{tmp_path / 'config.json'}: key `num_hidden_layers`: must be an integer, got '43'"


def test_direct_construction_still_names_the_fields():
    with pytest.raises(ConfigError, match="config field `dim`: must be a positive integer"):
        flash().replace(dim=0)


def test_dspark_keys_decide_what_mtp_holds():
    """0731's root config says one next-n layer while mtp.* holds DSpark's three stages (vLLM #52111):
    the dspark_* keys decide, in hub and official configs; bad values name the key."""
    hub = flash_0731().to_hf_dict()
    assert hub["num_nextn_predict_layers"] == 1 and len(hub["compress_ratios"]) == 46
    a = ModelArgs.from_dict(hub)
    assert (a.n_mtp_layers, a.dspark_stages, a.dspark_block_size, a.dspark_target_layer_ids) == (0, 3, 5, (40, 41, 42))
    assert (a.dspark_noise_token_id, a.dspark_markov_rank) == (128799, 256)
    official = {"vocab_size": 129280, "dim": 4096, "n_layers": 43, "n_heads": 64, "q_lora_rank": 1024, "o_groups": 8,
                "o_lora_rank": 1024, "n_routed_experts": 256, "n_activated_experts": 6, "moe_inter_dim": 2048,
                "compress_ratios": list(flash().compress_ratios) + [0, 0, 0], "n_mtp_layers": 3,
                "dspark_block_size": 5, "dspark_noise_token_id": 128799, "dspark_target_layer_ids": [40, 41, 42],
                "dspark_markov_rank": 256}
    assert ModelArgs.from_dict(official).dspark_stages == 3
    for key, value, msg in [("dspark_target_layer_ids", [40, 43], "dspark_target_layer_ids"),
                            ("dspark_noise_token_id", 129280, "dspark_noise_token_id"),
                            ("dspark_markov_rank", 0, "dspark_markov_rank")]:
        with pytest.raises(ConfigError, match=msg):
            ModelArgs.from_dict({**hub, key: value})
