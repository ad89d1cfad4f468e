"""Model-level loading: the official layout of a real (tiny) model, strictly."""
import json

import pytest
import torch

from dayzero.loader import CheckpointError
from dayzero.loader.model_io import dense_state, expected_tensors, load_model, save_model
from dayzero.config import flash
from tests.loader.conftest import rewrite_shard


def test_hub_formats_and_dtypes(ckpt):
    model = load_model(ckpt)
    sd = model.state_dict()
    assert sd["layers.0.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert sd["layers.0.attn.wq_a.scale"].dtype == torch.float8_e8m0fnu
    assert sd["layers.0.attn.wq_a.scale"].shape == (1, 2)  # [ceil(128/128), ceil(256/128)]
    assert sd["layers.2.ffn.experts.3.w2.weight"].dtype == torch.int8  # FP4, two codes per byte
    assert sd["layers.2.ffn.experts.3.w2.weight"].shape == (256, 64)
    assert sd["layers.2.ffn.experts.3.w2.scale"].shape == (256, 4)  # one E8M0 per 32 inputs
    assert sd["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    assert sd["layers.1.attn.compressor.ape"].dtype == torch.float32
    assert sd["layers.1.attn.compressor.wkv.weight"].dtype == torch.bfloat16
    assert sd["embed.weight"].dtype == torch.bfloat16 and sd["hc_head_fn"].dtype == torch.float32
    assert "mtp.0.e_proj.scale" in sd and "layers.1.attn.indexer.compressor.ape" in sd
    assert "layers.0.ffn.gate.bias" not in sd and "layers.2.ffn.gate.bias" in sd  # hash layers: no bias


def test_flash_inventory_matches_the_published_census():
    """Flash: 375 F8_E4M3 weights, 33,792 I8 FP4 expert tensors, 3 I64 tid2eid (v4-arch 5.2)."""
    specs = expected_tensors(flash())
    count = {}
    for s in specs.values():
        count[s.dtype] = count.get(s.dtype, 0) + 1
    assert count[torch.int8] == 33792
    assert count[torch.float8_e4m3fn] == 375
    assert count[torch.int64] == 3
    assert specs["layers.2.attn.wq_b.scale"].shape == (256, 8)
    assert specs["layers.2.ffn.experts.0.w1.scale"].shape == (2048, 128)


def test_missing_tensor_named(ckpt):
    shard = rewrite_shard(ckpt, "layers.1.attn.indexer.wq_b.scale",
                          lambda s: s.pop("layers.1.attn.indexer.wq_b.scale"))
    index = ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["layers.1.attn.indexer.wq_b.scale"]
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.indexer\.wq_b\.scale") as e:
        load_model(ckpt)
    assert "missing" in str(e.value) and shard.name not in ("",)


def test_misshaped_and_mistyped_tensors_named_with_file(ckpt):
    shard = rewrite_shard(ckpt, "layers.2.attn.attn_sink",
                          lambda s: s.update({"layers.2.attn.attn_sink": torch.zeros(5)}))
    with pytest.raises(CheckpointError, match=r"layers\.2\.attn\.attn_sink") as e:
        load_model(ckpt)
    assert shard.name in str(e.value)
    rewrite_shard(ckpt, "layers.2.attn.attn_sink",
                  lambda s: s.update({"layers.2.attn.attn_sink": torch.zeros(4, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=r"layers\.2\.attn\.attn_sink.*bfloat16|BF16"):
        load_model(ckpt)


def test_unexpected_tensor_named(ckpt):
    rewrite_shard(ckpt, "norm.weight", lambda s: s.update({"layers.9.attn.wq_a.weight": torch.zeros(2)}))
    index = ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["layers.9.attn.wq_a.weight"] = data["weight_map"]["norm.weight"]
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"unexpected.*\n.*layers\.9\.attn\.wq_a\.weight"):
        load_model(ckpt)


def test_config_that_disagrees_with_the_tensors(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["quantization_config"], cfg["expert_dtype"]  # says dense, tensors are FP8
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected tensors:\n  'layers\.0\.attn\.wkv\.scale' in model-0000"):
        load_model(ckpt)


def test_bad_config_is_a_checkpoint_error(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["o_groups"] = 3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="o_groups"):
        load_model(ckpt)


def test_save_model_round_trips_every_format(make_ckpt, tmp_path):
    model = load_model(make_ckpt("pro", "fp8"))
    ref = dense_state(model)
    for i, fmt in enumerate([dict(quant=None, expert_dtype=None, dtype="float32"),
                             dict(quant="fp8", expert_dtype="fp4", dtype="bfloat16")]):
        out = save_model(tmp_path / f"o{i}", model, model.args.replace(**fmt))
        again = dense_state(load_model(out))
        for name, t in ref.items():
            # the weights are already on the FP8/FP4 grids with E8M0 scales, so re-quantising is
            # lossless; the rest was stored in bf16 by the source and is exact in fp32 too
            assert torch.equal(again[name], t), name
    # Base layout: FP8 experts with fp32 block scales (amax / 448), within e4m3 precision
    out = save_model(tmp_path / "base", model, model.args.replace(quant="fp8", expert_dtype="fp8"))
    base = load_model(out)
    assert base.state_dict()["layers.3.ffn.experts.1.w1.scale"].dtype == torch.float32
    w, w0 = dense_state(base)["layers.3.ffn.experts.1.w1.weight"], ref["layers.3.ffn.experts.1.w1.weight"]
    assert ((w - w0).abs() <= w0.abs() / 16 + 1e-6).all()
