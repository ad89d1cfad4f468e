"""The built-in model (dayzero/builtin/shakespeare): shipped in the official hub layout and
quantized formats, loads strictly, has the DeepSeek-V4 special tokens, and reproduces the held-out
perplexity recorded in docs/BUILTIN.md on a fixed passage.

The passage (tests/fixtures/builtin_heldout.txt) is from The Two Gentlemen of Verona, one of the
two plays held out of training (Project Gutenberg text, public domain)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dayzero.builtin import BUILTIN_NAME, builtin_path
from dayzero.loader.model_io import load_model
from dayzero.tokenizer import Tokenizer

DIR = builtin_path()
PASSAGE = Path(__file__).parent / "fixtures" / "builtin_heldout.txt"
# Recorded with the shipped weights, numerics="official", fp32 compute on CPU (docs/BUILTIN.md).
EXPECTED_TOKENS = 326
EXPECTED_PPL = 69.291
PPL_RTOL = 0.01

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>",
            "</think>", "<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>", "<｜DSML｜invoke", "</｜DSML｜invoke>",
            "<｜DSML｜parameter", "</｜DSML｜parameter>", "<｜latest_reminder｜>"]


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    index = json.loads((DIR / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(DIR / shard), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    assert set(out) == set(index["weight_map"])
    return out


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((DIR / "config.json").read_text())


@pytest.fixture(scope="module")
def model():
    return load_model(DIR, numerics="official")


def test_builtin_path():
    assert BUILTIN_NAME == "shakespeare"
    assert builtin_path() == builtin_path("shakespeare") == DIR
    with pytest.raises(ValueError, match="shakespeare"):
        builtin_path("lear")


def test_layout_and_size():
    names = {p.name for p in DIR.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= names
    assert any(n.startswith("model-") and n.endswith(".safetensors") for n in names)
    assert sum(p.stat().st_size for p in DIR.iterdir()) <= 25 * 2**20


def test_config_declares_the_architecture(config):
    assert config["model_type"] == "deepseek_v4"
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert config["quantization_config"]["scale_fmt"] == "ue8m0"
    assert config["expert_dtype"] == "fp4"
    assert config["num_nextn_predict_layers"] == 1
    assert config["hc_mult"] == 4
    types = config["layer_types"]
    assert {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"} <= set(types)
    assert config["mlp_layer_types"][0] == "hash_moe" and "moe" in config["mlp_layer_types"]


def test_quantized_formats(tensors, config):
    dim, inter = config["hidden_size"], config["moe_intermediate_size"]
    fp8 = [n for n in tensors if n.endswith(".weight") and tensors[n].dtype == torch.float8_e4m3fn]
    assert any(".attn.wq_a." in n for n in fp8) and any("shared_experts" in n for n in fp8)
    for n in fp8:  # FP8 e4m3 with E8M0 128x128 block scales
        w, s = tensors[n], tensors[n[:-len("weight")] + "scale"]
        assert s.dtype == torch.float8_e8m0fnu
        assert tuple(s.shape) == (math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128))
    for name in ("layers.0.attn.wq_a", "layers.1.attn.wkv", "layers.1.attn.wo_b", "mtp.0.e_proj"):
        assert tensors[f"{name}.weight"].dtype == torch.float8_e4m3fn
    w1 = tensors["layers.1.ffn.experts.0.w1.weight"]  # FP4 e2m1, two per int8, E8M0 per 32
    assert w1.dtype == torch.int8 and tuple(w1.shape) == (inter, dim // 2)
    s1 = tensors["layers.1.ffn.experts.0.w1.scale"]
    assert s1.dtype == torch.float8_e8m0fnu and tuple(s1.shape) == (inter, dim // 32)
    n_routed = config["n_routed_experts"]
    fp4 = [n for n in tensors if ".experts." in n and n.endswith(".weight")]
    assert len(fp4) == 3 * n_routed * (config["num_hidden_layers"] + 1)
    assert all(tensors[n].dtype == torch.int8 for n in fp4)
    assert tensors["embed.weight"].dtype == torch.bfloat16 and tensors["head.weight"].dtype == torch.bfloat16
    assert tensors["layers.0.hc_attn_fn"].dtype == torch.float32
    assert tensors["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    assert any(n.startswith("mtp.0.") for n in tensors)
    assert tensors["mtp.0.hc_head_fn"].dtype == torch.float32


def test_tokenizer_special_tokens():
    tok = Tokenizer(DIR / "tokenizer.json")
    for i, t in enumerate(SPECIALS):
        assert tok.token_to_id(t) == i, t
    ids = tok.encode("KING LEAR:")
    assert ids[0] == 0 and 1 not in ids
    assert tok.decode(ids) == "KING LEAR:"


def test_loads_strictly_and_heldout_perplexity(model):
    assert model.args.n_mtp_layers == 1 and len(model.mtp) == 1
    tok = Tokenizer(DIR / "tokenizer.json")
    ids = torch.tensor([tok.encode(PASSAGE.read_text())])
    assert ids.shape[1] == EXPECTED_TOKENS
    with torch.no_grad():
        logits = model(ids)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    ppl = math.exp(nll.item())
    assert ppl == pytest.approx(EXPECTED_PPL, rel=PPL_RTOL)
