"""dayzero's DeepSeek-V4.1 checkpoint layout (dayzero/v41/checkpoint.py, loader.py): what the writer stores
by role, strict loading with named errors (the V4 loader's broken-checkpoint cases for the V4.1 layout),
the Engram tables left as the shard's memory map and read only by row, and `dayzero toy --preset
v41-flash`. Parity of a loaded checkpoint with transformers' deepseek_v41: test_loader_oracle.py."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dayzero.loader.checkpoint import CheckpointError
from dayzero.v41.formats import Fp8Linear32
from dayzero.v41.loader import load_v41
from dayzero.v41.toy import tiny_config
from tests.test_cli import dayzero
from tests.v41.ckpt import cached, one_thread, read_all, rewrite  # noqa: F401 (one_thread: autouse fixture)
from tests.v41.pair import tokenizer_file



def _toy_config() -> dict:
    return tiny_config(tokenizer_file())


def _source():
    return cached("toy", json.dumps(_toy_config()), str(tokenizer_file()))


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(_source(), d)
    return d


@pytest.fixture(scope="module")
def loaded():
    return load_v41(_source())


def _error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_v41(path)
    return str(e.value)


def _shard_of(d, name) -> str:
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]


# ---- what is stored and what the model holds -----------------------------------------------------

def test_formats_by_role_survive_loading(loaded):
    layer = loaded.layers[2]  # a pooled KV source and index source
    assert layer.attn.indexer.wk.fmt == "dense"  # BF16 in the checkpoint (v41/formats.py)
    for lin in (layer.attn.wq_a, layer.attn.wo_a, layer.attn.indexer.wq_b,
                layer.ffn.shared_experts.w2, loaded.layers[1].engram.wkv):
        assert isinstance(lin, Fp8Linear32) and lin.weight.dtype == torch.float8_e4m3fn
        assert lin.scale.dtype == torch.float8_e8m0fnu
        assert tuple(lin.scale.shape) == (-(-lin.out_features // 32), -(-lin.in_features // 32))
    w1 = layer.ffn.experts[0].w1
    assert w1.fmt == "fp4" and w1.weight.dtype == torch.int8 and tuple(w1.scale.shape) == (w1.out_features, w1.in_features // 32)
    table = loaded.layers[1].engram.embed
    assert table.weight.dtype == torch.float8_e4m3fn and table.scale.dtype == torch.float8_e8m0fnu
    # unquantised tensors: stored BF16 (F32 for mHC, sinks, router biases), computed in fp32
    assert layer.attn.compressor.wgate.weight.dtype == torch.float32 and layer.attn_norm.weight.dtype == torch.float32
    stored = read_all(_source())
    assert stored["layers.2.attn.compressor.wgate.weight"].dtype == torch.bfloat16
    assert stored["layers.2.hc_attn_fn"].dtype == torch.float32
    # gate.bias_vl is loaded (image spans are not run, but the tensor is the checkpoint's)
    assert torch.equal(loaded.layers[3].ffn.gate.bias_vl, stored["layers.3.ffn.gate.bias_vl"])
    assert torch.equal(loaded.layers[3].ffn.gate.weight, stored["layers.3.ffn.gate.weight"].float())


def test_incremental_decode_equals_the_full_forward(loaded):
    ids = torch.randint(0, loaded.args.vocab_size, (1, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = loaded(ids)
        state = loaded.new_state()
        steps = [loaded(ids[:, :5], state)] + [loaded(ids[:, t:t + 1], state) for t in range(5, 14)]
    assert torch.isfinite(full).all()
    assert torch.equal(torch.cat(steps, 1), full)


# ---- Engram tables: the shard's memory map, read by row -----------------------------------------

def _mapping_of(ptr: int) -> str | None:
    for line in open("/proc/self/maps"):
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5] if len(parts) > 5 else ""
    return None


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
def test_engram_tables_are_the_mapped_shard_and_read_only_by_row(loaded):
    src = _source()
    for layer in loaded.args.engram_layer_ids:
        for leaf in ("weight", "scale"):
            t = getattr(loaded.layers[layer].engram.embed, leaf)
            where = _mapping_of(t.untyped_storage().data_ptr())
            assert where == str(src / _shard_of(src, f"layers.{layer}.engram.embed.{leaf}")), (layer, leaf, where)
    # every op that touches a table during a forward is a row gather (no whole-table read, copy or cast)
    tables = {getattr(loaded.layers[i].engram.embed, leaf).untyped_storage().data_ptr()
              for i in loaded.args.engram_layer_ids for leaf in ("weight", "scale")}
    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            for a in tree_leaves((args, kwargs)):
                if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in tables:
                    seen.append(func.__name__)
            return func(*args, **kwargs)

    ids = torch.randint(0, loaded.args.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), Spy():
        loaded(ids)
    assert seen and set(seen) <= {"index.Tensor"}, set(seen)


# ---- strict loading: each broken checkpoint named --------------------------------------------------

def test_missing_tensor_named(ckpt):
    rewrite(ckpt, lambda t: t.pop("layers.2.attn.wq_a.scale"))
    msg = _error(ckpt)
    assert "1 missing tensors" in msg and "'layers.2.attn.wq_a.scale': expected float8_e8m0fnu [1, 2]" in msg


def test_unexpected_tensor_named_with_its_file(ckpt):
    # layer 0 is sliding-only: it owns no compressor
    rewrite(ckpt, lambda t: t.__setitem__("layers.0.attn.compressor.wkv.weight", torch.zeros(64, 64, dtype=torch.bfloat16)))
    msg = _error(ckpt)
    shard = _shard_of(ckpt, "layers.0.attn.compressor.wkv.weight")
    assert "1 unexpected tensors" in msg
    assert f"'layers.0.attn.compressor.wkv.weight' in {shard}: bfloat16 [64, 64], not expected" in msg


def test_wrong_shape_and_dtype_named_with_file_expected_and_found(ckpt):
    def damage(t):
        t["layers.1.attn.wq_b.weight"] = t["layers.1.attn.wq_b.weight"][:, :16].contiguous()
        t["layers.4.attn.wkv.weight"] = t["layers.4.attn.wkv.weight"].to(torch.bfloat16)  # FP8 expected
    rewrite(ckpt, damage)
    msg = _error(ckpt)
    a, b = _shard_of(ckpt, "layers.1.attn.wq_b.weight"), _shard_of(ckpt, "layers.4.attn.wkv.weight")
    assert f"'layers.1.attn.wq_b.weight' in {a}: shape expected [256, 32], found [256, 16]" in msg
    assert f"'layers.4.attn.wkv.weight' in {b}: dtype expected float8_e4m3fn, found bfloat16" in msg


def test_wrong_scale_shapes_named(ckpt):
    """A V4-style 128x128 dense scale and an expert scale per 64 (not MXFP4's 32) are refused by name."""
    def damage(t):
        t["layers.1.attn.wq_b.scale"] = t["layers.1.attn.wq_b.scale"][:2, :1].contiguous()
        s = t["layers.3.ffn.experts.1.w1.scale"]  # [32, 64 / 32]: one per 64 would be [32, 1]
        t["layers.3.ffn.experts.1.w1.scale"] = s[:, :1].contiguous()
    rewrite(ckpt, damage)
    msg = _error(ckpt)
    a, b = _shard_of(ckpt, "layers.1.attn.wq_b.scale"), _shard_of(ckpt, "layers.3.ffn.experts.1.w1.scale")
    assert "2 shape/dtype mismatches" in msg
    assert f"'layers.1.attn.wq_b.scale' in {a}: shape expected [8, 1], found [2, 1]" in msg
    assert f"'layers.3.ffn.experts.1.w1.scale' in {b}: shape expected [32, 2], found [32, 1]" in msg


def test_truncated_shard_named(ckpt):
    shard = ckpt / _shard_of(ckpt, "layers.3.engram.embed.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) - 100])
    msg = _error(ckpt)
    assert f"{shard}: truncated safetensors file ({len(data) - 100} bytes, header needs {len(data)})" in msg


def test_bad_index_named(ckpt):
    index = ckpt / "model.safetensors.index.json"
    good = index.read_text()
    index.write_text(good[:40])
    assert f"{index}: invalid JSON" in _error(ckpt)
    data = json.loads(good)
    data["weight_map"]["layers.0.attn.wq_a.weight"] = "model-00099-of-00099.safetensors"
    index.write_text(json.dumps(data))
    assert "names missing shard model-00099-of-00099.safetensors" in _error(ckpt)
    index.write_text(json.dumps({"metadata": {}}))
    assert f"{index}: missing or invalid 'weight_map'" in _error(ckpt)


def test_inconsistent_config_named(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    bad = json.loads(json.dumps(cfg))
    bad["text_config"]["kv_source_layer_ids"] = [3, 5]  # layer 3 reuses layer 2's group: not a KV source
    (ckpt / "config.json").write_text(json.dumps(bad))
    msg = _error(ckpt)
    assert str(ckpt / "config.json") in msg and "text_config.kv_source_layer_ids" in msg
    bad = dict(cfg, torch_dtype="float16")
    (ckpt / "config.json").write_text(json.dumps(bad))
    assert "key `torch_dtype`: 'float16' is not a storage dtype" in _error(ckpt)
    # a config that disagrees with the tensors: no quantization_config, the tensors are quantised
    bad = {k: v for k, v in cfg.items() if k != "quantization_config"}
    (ckpt / "config.json").write_text(json.dumps(bad))
    msg = _error(ckpt)
    assert f"{ckpt / 'config.json'} has no `quantization_config`" in msg
    assert f"quantised weights with scales (e.g. 'layers.0.attn.wkv.scale' in {_shard_of(ckpt, 'layers.0.attn.wkv.scale')})" in msg
    # the tensors disagree with the config's shapes: named like any shape mismatch
    bad = json.loads(json.dumps(cfg))
    bad["text_config"]["q_lora_rank"] = 48
    (ckpt / "config.json").write_text(json.dumps(bad))
    assert "'layers.0.attn.q_norm.weight' in model-00001-of-" in _error(ckpt)
    assert "shape expected [48], found [32]" in _error(ckpt)


def test_dense_checkpoint_under_a_quantised_config_named(tmp_path):
    from tests.v41.ckpt import write
    cfg = {k: v for k, v in _toy_config().items() if k != "quantization_config"}
    d = write(tmp_path / "dense", cfg, tokenizer_file())
    assert load_v41(d).layers[0].attn.wq_a.weight.dtype == torch.float32  # a dense V4.1 checkpoint loads
    (d / "config.json").write_text(json.dumps(_toy_config()))
    assert "`quantization_config` says FP8 weights with scales, but the checkpoint has no `.scale` tensors " \
           "('layers.0.attn.wq_a.weight' is torch.bfloat16)" in _error(d)


def test_engram_without_tokenizer_named(ckpt):
    (ckpt / "tokenizer.json").unlink()
    assert "Engram layers [1, 3], whose n-gram hashes come from the tokenizer, but there is no tokenizer.json" \
        in _error(ckpt)


def test_vision_and_dspark_tensors_recognised_and_not_loaded(ckpt):
    extra = {"vision.blocks.0.attn.qkv.weight": torch.ones(8, 8, dtype=torch.bfloat16),
             "aligner.w1.weight": torch.ones(4, 9, dtype=torch.bfloat16),
             "image_newline": torch.ones(64, dtype=torch.bfloat16),
             "mtp.0.ffn.gate.weight": torch.ones(4, 64, dtype=torch.bfloat16)}
    rewrite(ckpt, lambda t: t.update(extra))
    model = load_v41(ckpt)
    names = set(model.state_dict())
    assert not any(n in names for n in extra) and not any(n.startswith(("vision", "aligner", "mtp")) for n in names)
    rewrite(ckpt, lambda t: t.__setitem__("visionary.weight", torch.ones(2, dtype=torch.bfloat16)))
    assert "'visionary.weight'" in _error(ckpt) and "not expected" in _error(ckpt)


# ---- dayzero toy --preset v41-flash --------------------------------------------------------------

def test_toy_v41_flash_writes_a_loadable_official_layout(tmp_path):
    d = tmp_path / "toy"
    r = dayzero("toy", d, "--preset", "v41-flash")
    assert "tiny DeepSeek-V4.1 (v41-flash, fp8" in r.stdout
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v41" and cfg["quantization_config"]["weight_block_size"] == [32, 32]
    model = load_v41(d)
    assert model.args.engram_layer_ids == (1, 3) and model.hasher is not None
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[0, 5, 9, 17]]))).all()
    assert "run it with `dayzero generate --model" in r.stdout
    r = dayzero("toy", tmp_path / "x", "--preset", "v41-flash", "--format", "fp8-base", check=False)
    assert r.returncode == 2 and "a V4.1 toy checkpoint is one of fp8, bf16, got 'fp8-base'" in r.stderr
