"""Reading DeepSeek-V4.1 configs: the released V4.1-Flash values (research/v41-and-dspark.md 1.2) in
both layouts, named errors for bad keys, and dayzero's refusal to load V4.1 after validating it."""
from __future__ import annotations

import copy
import json

import pytest

from dayzero.config import ModelArgs, V41ConfigError, flash, flash_0731
from dayzero.config_keys import ConfigError
from dayzero.loader.model_io import read_args
from dayzero.v41 import V41Args, is_v41_config
from tests.v41.tiny import FLASH_DIR, SCHEDULES, flash_hub, flash_official, hub, text_config


def test_released_flash_config_parses_with_its_values():
    a = V41Args.from_dir(FLASH_DIR)
    assert (a.vocab_size, a.dim, a.n_layers, a.n_heads, a.head_dim, a.rope_head_dim) == (129280, 5120, 40, 64, 512, 64)
    assert (a.q_lora_rank, a.o_groups, a.o_lora_rank, a.window_size) == (1280, 8, 1024, 128)
    assert a.compress_ratios == (0, 0) + (2,) * 18 + (1,) * 20
    assert (a.kv_source_layers, a.index_source_layers) == ((2, 8, 14, 20), (2, 8, 14, 20, 24, 28, 32, 36))
    assert (a.candidate_source_layer, a.candidate_topk_blocks, a.candidate_block_size) == (20, 2048, 8)
    assert (a.index_n_heads, a.index_head_dim, a.index_topk) == (32, 128, 512)
    assert (a.n_routed_experts, a.n_activated_experts, a.moe_inter_dim, a.score_func) == (384, 6, 2304, "sqrtsoftplus")
    assert (a.route_scale, a.swiglu_limit, a.norm_eps, a.gate_temp) == (1.5, 10.0, 1e-20, 1.0)
    assert (a.hc_mult, a.hc_sinkhorn_iters, a.hc_eps) == (4, 20, 1e-6)
    assert (a.rope_theta, a.compress_rope_theta, a.rope_factor, a.original_seq_len) == (10000, 160000, 16, 65536)
    assert (a.engram_layer_ids, a.engram_num_embeddings) == ((1, 14), (384006168, 384016682))
    assert (a.engram_max_ngram_size, a.engram_n_heads, a.engram_head_dim, a.engram_hash_columns) == (4, 8, 256, 24)
    assert (a.engram_vocab_size, a.engram_pad_id, a.engram_compressed_vocab_size) == (16000000, 2, 99092)
    assert (a.n_mtp_layers, a.dspark_block_size, a.dspark_noise_token_id, a.dspark_markov_rank) == (3, 5, 128799, 256)
    assert a.dspark_target_layer_ids == (37, 38, 39)
    assert (a.moe_dims(39), a.moe_dims(40)) == ((384, 6), (128, 3))
    assert (a.quant, a.weight_block_size, a.expert_dtype) == ("fp8", (32, 32), "fp4")
    assert (a.image_token_id, a.vision_layers) == (129264, 32)
    roles = [l.role for l in a.layers]
    assert roles.count("full") == 4 and roles.count("reindex") == 4 and roles.count("sliding") == 2
    assert [l.layer_id for l in a.layers if l.pooled] == [2, 8, 14]
    assert [l.layer_id for l in a.layers if l.candidate_source == 20] == [24, 28, 32, 36]
    assert [l.kv_source for l in a.layers[19:22]] == [14, 20, 20]
    assert [l.layer_id for l in a.layers if l.engram] == [1, 14]


def test_official_inference_config_reads_the_same():
    assert V41Args.from_dir(FLASH_DIR / "inference") == V41Args.from_dir(FLASH_DIR)


def test_bare_text_config_and_rope_parameters_form():
    """transformers' text config saved on its own (model_type deepseek_v41_text, YaRN under
    rope_parameters.compress) reads the same backbone."""
    text = copy.deepcopy(flash_hub()["text_config"])
    text["rope_parameters"] = {"main": {"rope_type": "default", "rope_theta": 10000},
                               "compress": dict(text.pop("rope_scaling"), rope_theta=160000)}
    bare = V41Args.from_dict(text)
    assert bare.replace(quant="fp8", expert_dtype="fp4", image_token_id=129264, vision_layers=32) == \
        V41Args.from_dir(FLASH_DIR)


def test_v41_is_recognised_only_for_v41():
    assert is_v41_config(flash_hub()) and is_v41_config(flash_official())
    assert is_v41_config(flash_hub()["text_config"])
    assert not is_v41_config(flash().to_hf_dict()) and not is_v41_config(flash_0731().to_hf_dict())
    assert not is_v41_config({"dim": 4096, "n_layers": 43, "compress_ratios": [0] * 43})


@pytest.mark.parametrize("path", [FLASH_DIR, FLASH_DIR / "inference"])
def test_v4s_model_args_refuse_v41_after_validation(path):
    with pytest.raises(ValueError) as e:
        read_args(path)
    msg = str(e.value)
    assert f"{path / 'config.json'}: a DeepSeek-V4.1 config" in msg
    assert "read and validated (40 layers, KV sources [2, 8, 14, 20]" in msg
    assert "it is not a DeepSeek-V4 config: V4's ModelArgs and loader do not read V4.1" in msg
    assert ("`dayzero serve` run it on one rank or over ranks (tensor / expert parallel, DP-attention + EP; "
            "dayzero.v41.served; its DSpark and vision are not built)") in msg
    assert "dayzero.v41.loader.load_v41 loads it" in msg
    with pytest.raises(V41ConfigError):
        ModelArgs.from_dir(path)


def test_the_offline_api_takes_the_v41_loader_path():
    """LLM reads a V4.1 config with the V4.1 loader (tests/v41/test_engine.py runs it): this
    directory has the released config but no weights or tokenizer, which the loader names."""
    from dayzero import LLM
    from dayzero.loader.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=r"v41_flash: the config has Engram layers \[1, 14\], .* no tokenizer.json"):
        LLM(model=str(FLASH_DIR))


def test_an_inconsistent_v41_config_gets_its_own_error_not_the_refusal(tmp_path):
    cfg = flash_hub()
    cfg["text_config"].update(kv_source_layer_ids=[2, 8, 14, 21], index_source_layer_ids=[2, 8, 14, 21, 24, 28],
                              candidate_source_layer_id=21)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_dir(tmp_path)
    assert not isinstance(e.value, V41ConfigError)
    assert str(e.value) == (f"{tmp_path / 'config.json'}: key `text_config.compress_ratios`: layer 20 has ratio 1 "
                            "but reads the compressed KV of layer 14, whose ratio is 2")


def _hub_error(change: dict, top: dict | None = None) -> str:
    text = text_config(*SCHEDULES[0][1:], **change)
    with pytest.raises(ConfigError) as e:
        V41Args.from_dict(hub(text, **(top or {})), source="c.json")
    return str(e.value)


@pytest.mark.parametrize("change,top,message", [
    (dict(compress_ratios=[0, 2, 2, 2, 1, 1, 0]), None,
     "c.json: key `text_config.compress_ratios`: has 7 entries; must be one per layer (6) or per layer and DSpark "
     "stage (6 + `text_config.num_nextn_predict_layers` 0 = 6)"),
    (dict(num_nextn_predict_layers=1, compress_ratios=[0, 2, 2, 2, 1, 1, 2], dspark_block_size=5,
          dspark_noise_token_id=7, dspark_target_layer_ids=[5], dspark_markov_rank=8, dspark_n_routed_experts=4,
          dspark_num_experts_per_tok=2), None,
     "c.json: key `text_config.compress_ratios`: entry 6 (DSpark stage 0) is 2; DSpark stages are sliding-window "
     "only (0)"),
    (dict(compress_ratios=[0, 2, 2, 2.0, 1, 1]), None, "c.json: key `text_config.compress_ratios`: entry 3 must be "
                                                      "an integer, got 2.0"),
    (dict(candidate_source_layer_id=6), None, "c.json: key `text_config.candidate_source_layer_id`: 6 is not a "
                                              "layer id below `text_config.num_hidden_layers` = 6"),
    (dict(hidden_size="64"), None, "c.json: key `text_config.hidden_size`: must be an integer, got '64'"),
    (dict(num_hash_layers=3), None, "c.json: key `text_config.num_hash_layers`: DeepSeek-V4.1 has no hash-routed "
                                    "layers, got 3"),
    (dict(num_key_value_heads=2), None, "c.json: key `text_config.num_key_value_heads`: must be 1"),
    (dict(engram_layer_ids=[1, 9], engram_num_embeddings=[72, 138], engram_max_ngram_size=3,
          engram_vocab_size=13, engram_n_heads=2, engram_head_dim=16, engram_pad_token_id=2,
          engram_compressed_vocab_size=50), None,
     "c.json: key `text_config.engram_layer_ids`: entry 1 is 9: must be a distinct layer id in [0, 6)"),
    (dict(engram_layer_ids=[1, 3], engram_num_embeddings=[72], engram_max_ngram_size=3, engram_vocab_size=13,
          engram_n_heads=2, engram_head_dim=16, engram_pad_token_id=2, engram_compressed_vocab_size=50), None,
     "c.json: key `text_config.engram_num_embeddings`: has 1 entries for 2 `text_config.engram_layer_ids`"),
    (dict(engram_layer_ids=[1], engram_num_embeddings=[40], engram_max_ngram_size=3, engram_vocab_size=13,
          engram_n_heads=2, engram_head_dim=16, engram_pad_token_id=2, engram_compressed_vocab_size=50), None,
     "c.json: key `text_config.engram_num_embeddings`: layer 1 has 40 rows, but its 4 prime buckets above "
     "`text_config.engram_vocab_size` = 13 hold 72"),
    (dict(num_nextn_predict_layers=1, dspark_block_size=5, dspark_noise_token_id=7, dspark_target_layer_ids=[6],
          dspark_markov_rank=8, dspark_n_routed_experts=4, dspark_num_experts_per_tok=2), None,
     "c.json: key `text_config.dspark_target_layer_ids`: must be distinct backbone layer ids in [0, 6), got [6]"),
    ({}, {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}},
     "c.json: key `quantization_config.weight_block_size`: V4.1 stores dense FP8 weights in 32x32 blocks, got "
     "[128, 128]"),
    ({}, {"text_config": "nope"}, "c.json: key `text_config`: must be an object, got 'nope'"),
])
def test_hub_key_errors_name_the_file_and_key(change, top, message):
    assert _hub_error(change, top).startswith(message)


def test_official_layout_errors_speak_its_keys():
    cfg = flash_official()
    cfg["index_source_layers"] = [2, 8, 20, 24]
    with pytest.raises(ConfigError) as e:
        V41Args.from_dict(cfg, source="inference/config.json")
    assert str(e.value).startswith("inference/config.json: key `index_source_layers`: layer 14 is a KV source but "
                                   "not an index source")
    cfg = flash_official()
    del cfg["candidate_source_layer"]
    with pytest.raises(ConfigError, match=r"^inference/config.json: key `candidate_source_layer` is missing$"):
        V41Args.from_dict(cfg, source="inference/config.json")
    cfg = flash_official()
    cfg["compress_ratios"] = cfg["compress_ratios"][:39]
    with pytest.raises(ConfigError, match=r"key `compress_ratios`: has 39 entries; must be one per layer \(40\) or "
                                          r"per layer and DSpark stage \(40 \+ `n_mtp_layers` 3 = 43\)"):
        V41Args.from_dict(cfg, source="inference/config.json")
