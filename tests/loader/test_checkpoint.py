import json

import pytest
import torch
from safetensors.torch import save_file

import dayzero.loader.checkpoint as checkpoint_mod
from dayzero.loader import (
    CheckpointError,
    TensorSpec,
    list_tensors,
    load_state,
    quantize_state,
    read_config,
    save_state,
)

CONFIG = {"model_type": "deepseek_v4", "hidden_size": 64}


def make_state():
    g = torch.Generator().manual_seed(0)
    state = {
        "embed.weight": torch.randn(32, 64, generator=g).to(torch.bfloat16),
        "norm.weight": torch.randn(64, generator=g),
        "hc_head_scale": torch.randn(1, generator=g),
        "layers.0.ffn.gate.tid2eid": torch.randint(0, 8, (32, 6), generator=g),
        "layers.0.attn.wq_a.weight": torch.randn(130, 200, generator=g),
        "layers.0.ffn.experts.0.w1.weight": torch.randn(16, 64, generator=g),
        "layers.0.ffn.experts.1.w1.weight": torch.randn(16, 64, generator=g),
    }
    plan = {
        "layers.0.attn.wq_a.weight": "fp8",
        "layers.0.ffn.experts.0.w1.weight": "fp4",
        "layers.0.ffn.experts.1.w1.weight": "fp8_f32",
    }
    return quantize_state(state, plan)


def specs(state):
    return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in state.items()}


def same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


@pytest.fixture
def ckpt(tmp_path):
    state = make_state()
    d = save_state(tmp_path / "ckpt", state, CONFIG, max_shard_bytes=8000)
    return d, state


def shards(d):
    return sorted(d.glob("model-*.safetensors"))


def edit_index(d, fn):
    p = d / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    fn(idx["weight_map"])
    p.write_text(json.dumps(idx))


def test_quantized_dtypes():
    state = make_state()
    assert state["layers.0.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert state["layers.0.attn.wq_a.scale"].dtype == torch.float8_e8m0fnu
    assert state["layers.0.attn.wq_a.scale"].shape == (2, 2)
    assert state["layers.0.ffn.experts.0.w1.weight"].dtype == torch.int8
    assert state["layers.0.ffn.experts.0.w1.weight"].shape == (16, 32)
    assert state["layers.0.ffn.experts.0.w1.scale"].shape == (16, 2)
    assert state["layers.0.ffn.experts.1.w1.scale"].dtype == torch.float32


def test_multi_shard_round_trip(ckpt):
    d, state = ckpt
    files = shards(d)
    assert len(files) >= 3
    assert files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"]) == set(state)
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert read_config(d) == CONFIG
    infos = list_tensors(d)
    assert {k: (i.shape, i.dtype) for k, i in infos.items()} == {
        k: (tuple(t.shape), t.dtype) for k, t in state.items()
    }
    loaded = load_state(d, specs(state), progress=True)
    assert set(loaded) == set(state)
    for k, t in state.items():
        assert same_bytes(loaded[k], t), k


def test_single_file_checkpoint(tmp_path):
    state = make_state()
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    save_file(state, str(tmp_path / "model.safetensors"))
    assert {i.file for i in list_tensors(tmp_path).values()} == {"model.safetensors"}
    loaded = load_state(tmp_path, specs(state))
    for k, t in state.items():
        assert same_bytes(loaded[k], t), k


def test_writer_refuses_existing_shards_and_copies_tokenizer(ckpt, tmp_path):
    d, state = ckpt
    with pytest.raises(FileExistsError):
        save_state(d, state, CONFIG)
    tok = tmp_path / "tok.json"
    tok.write_text('{"model": {}}')
    save_state(d, state, CONFIG, overwrite=True, tokenizer_json=tok)
    assert len(shards(d)) == 1 and (d / "tokenizer.json").read_text() == '{"model": {}}'
    assert set(load_state(d, specs(state))) == set(state)


def test_not_a_directory(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        read_config(f)
    with pytest.raises(CheckpointError, match="not a directory"):
        list_tensors(f)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state(tmp_path / "nope", {})


def test_config_missing_or_invalid(ckpt):
    d, _ = ckpt
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json.*invalid JSON"):
        read_config(d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        read_config(d)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        list_tensors(tmp_path)


def test_index_invalid(ckpt):
    d, _ = ckpt
    p = d / "model.safetensors.index.json"
    p.write_text("{")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*invalid JSON"):
        list_tensors(d)
    p.write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="weight_map"):
        list_tensors(d)


def test_index_names_missing_shard(ckpt):
    d, _ = ckpt
    victim = shards(d)[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        list_tensors(d)


def test_truncated_shard(ckpt):
    d, state = ckpt
    victim = shards(d)[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=f"{victim.name}.*truncated"):
        load_state(d, specs(state))


@pytest.mark.parametrize("at,junk", [(0, b"\xff" * 8), (8, b"\x00garbage")])
def test_corrupt_header(ckpt, at, junk):
    d, state = ckpt
    victim = shards(d)[0]
    data = bytearray(victim.read_bytes())
    data[at : at + len(junk)] = junk
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{victim.name}.*corrupt"):
        load_state(d, specs(state))


def test_tensor_in_index_but_not_in_shard(ckpt):
    d, state = ckpt
    shard = shards(d)[0].name
    edit_index(d, lambda wm: wm.__setitem__("ghost.weight", shard))
    with pytest.raises(CheckpointError, match=f"'ghost.weight'.*{shard}"):
        list_tensors(d)


def test_tensor_in_shard_but_not_in_index(ckpt):
    d, state = ckpt
    edit_index(d, lambda wm: wm.pop("norm.weight"))
    with pytest.raises(CheckpointError, match=r"'norm\.weight': present in model-\d+.*not in the index"):
        list_tensors(d)


def test_missing_expected_tensor(ckpt):
    d, state = ckpt
    expected = specs(state) | {"layers.9.attn.wkv.weight": TensorSpec((4, 4), torch.bfloat16)}
    with pytest.raises(CheckpointError, match=r"missing tensors:\n.*'layers\.9\.attn\.wkv\.weight'"):
        load_state(d, expected)


def test_unexpected_tensor_and_ignore(ckpt):
    d, state = ckpt
    expected = specs(state)
    del expected["layers.0.ffn.gate.tid2eid"]
    with pytest.raises(CheckpointError, match=r"unexpected.*\n.*'layers\.0\.ffn\.gate\.tid2eid' in model-"):
        load_state(d, expected)
    loaded = load_state(d, expected, ignore=lambda n: n.endswith("tid2eid"))
    assert "layers.0.ffn.gate.tid2eid" not in loaded and len(loaded) == len(expected)


def test_wrong_shape(ckpt):
    d, state = ckpt
    expected = specs(state)
    expected["embed.weight"] = TensorSpec((33, 64), torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"'embed\.weight' in model-\d+-of-\d+\.safetensors: shape expected \[33, 64\], found \[32, 64\]"):
        load_state(d, expected)


def test_wrong_dtype(ckpt):
    d, state = ckpt
    expected = specs(state)
    expected["layers.0.attn.wq_a.scale"] = TensorSpec((2, 2), torch.float32)
    with pytest.raises(CheckpointError, match=r"'layers\.0\.attn\.wq_a\.scale'.*dtype expected float32, found float8_e8m0fnu"):
        load_state(d, expected)


def test_problem_list_is_capped(ckpt):
    d, state = ckpt
    expected = specs(state) | {f"extra.{i}": TensorSpec((1,), torch.float32) for i in range(50)}
    del expected["norm.weight"]
    with pytest.raises(CheckpointError) as e:
        load_state(d, expected)
    msg = str(e.value)
    assert "50 missing tensors" in msg and "and 30 more" in msg and "also 1 unexpected" in msg
    assert len(msg.splitlines()) <= 23


def test_read_error_names_tensor_and_file(ckpt, monkeypatch):
    d, state = ckpt

    class Broken:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def get_tensor(self, name):
            raise OSError("disk on fire")

    monkeypatch.setattr(checkpoint_mod, "safe_open", Broken)
    with pytest.raises(CheckpointError, match=r"tensor '[^']+' from .*model-\d+.*disk on fire"):
        load_state(d, specs(state))


def test_quantize_state_errors():
    state = {"a.weight": torch.zeros(4, 48), "b.weight": torch.zeros(4), "a.bias": torch.zeros(4)}
    with pytest.raises(ValueError, match="'a.weight'.*multiple of 32"):
        quantize_state(state, {"a.weight": "fp4"})
    with pytest.raises(ValueError, match="'b.weight'.*2-D"):
        quantize_state(state, {"b.weight": "fp8"})
    with pytest.raises(ValueError, match="'c.weight'.*not in the state"):
        quantize_state(state, {"c.weight": "fp8"})
    with pytest.raises(ValueError, match="'a.bias'"):
        quantize_state(state, {"a.bias": "fp8"})
    with pytest.raises(ValueError, match="unknown"):
        quantize_state(state, {"a.weight": "int4"})
    out = quantize_state(state, {"a.weight": "fp8"})
    assert list(out) == ["a.weight", "a.scale", "b.weight", "a.bias"]
    assert out["b.weight"] is state["b.weight"]
