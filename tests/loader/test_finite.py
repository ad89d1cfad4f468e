"""Non-finite weights: the cheap load-time check names the small tensor, the full scan
(`dayzero verify --weights`) finds every bad tensor, big ones included."""
import json
import shutil

import pytest
import torch

from dayzero import verify
from dayzero.loader import CheckpointError
from dayzero.loader.checkpoint import load_state
from dayzero.loader.finite import SMALL_NUMEL, check_small_finite, is_small, nonfinite_count, scan_checkpoint
from dayzero.config import ModelArgs
from dayzero.loader.model_io import expected_tensors
from tests.loader.conftest import rewrite_shard


def poison(d, name, index=0, value=float("nan")):
    """Set one value of tensor `name` in the checkpoint at `d` to `value` (NaN/inf; in the FP8
    formats: the NaN code of the storage dtype). Returns the shard file name."""
    def edit(state):
        t = state[name]
        flat = t.view(torch.uint8).view(-1) if t.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu) else t.view(-1)
        flat[index] = 0x7F if t.dtype == torch.float8_e4m3fn else 0xFF if t.dtype == torch.float8_e8m0fnu else value
    return rewrite_shard(d, name, edit).name


def _state(d):
    return load_state(d, expected_tensors(ModelArgs.from_dir(d)))


def test_nonfinite_count_per_storage_dtype():
    x = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0])
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert int(nonfinite_count(x.to(dt))) == 3
    assert int(nonfinite_count(torch.tensor([1.0, float("nan"), 448.0]).to(torch.float8_e4m3fn))) == 1
    assert int(nonfinite_count(torch.tensor([1.0, float("inf"), 2.0]).to(torch.float8_e5m2))) == 1
    assert int(nonfinite_count(torch.tensor([1.0, float("nan"), 2.0**-20]).to(torch.float8_e8m0fnu))) == 1
    assert int(nonfinite_count(torch.tensor([-1, 127], dtype=torch.int8))) == 0  # FP4 codes: always finite


def test_clean_checkpoint_passes_both_checks(ckpt):
    state = _state(ckpt)
    n = check_small_finite(state, str(ckpt))
    assert n == sum(1 for k, t in state.items() if is_small(k, t)) and n > 0
    report = scan_checkpoint(ckpt)
    assert report["passed"] and report["non_finite"] == [] and report["tensors"] == len(state)


@pytest.mark.parametrize("name", [
    "layers.1.attn_norm.weight",  # a norm (bf16)
    "layers.1.attn.attn_sink",  # an attention sink (fp32)
    "hc_head_base",  # a hyper-connection parameter
    "layers.1.attn.wq_b.scale",  # an FP8 block scale (E8M0 NaN code)
    "layers.1.ffn.experts.0.w1.scale",  # an expert scale
    "layers.1.attn.wkv.weight",  # a small FP8 weight (e4m3 NaN code)
])
def test_small_tensor_nan_fails_the_load_check_naming_tensor_and_shard(ckpt, name):
    shard = poison(ckpt, name, index=1)
    state = _state(ckpt)
    assert is_small(name, state[name])
    with pytest.raises(CheckpointError) as e:
        check_small_finite(state, str(ckpt))
    msg = str(e.value)
    assert msg.startswith(f"{ckpt}: non-finite weights") and f"tensor {name!r} in {shard}" in msg
    assert "1 of" in msg and f"dayzero verify --weights {ckpt}" in msg


def test_router_bias_inf_is_named(make_ckpt, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(make_ckpt("flash", "fp32"), d)
    bias = next(n for n in json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
                if n.endswith("ffn.gate.bias"))
    poison(d, bias, index=0, value=float("inf"))
    with pytest.raises(CheckpointError, match=f"tensor '{bias}'"):
        check_small_finite(_state(d), str(d))


def test_big_tensor_is_left_to_the_full_scan(ckpt):
    name = "embed.weight"  # 512 x 256 > SMALL_NUMEL: not read by the load-time check
    poison(ckpt, name, index=1000)
    poison(ckpt, name, index=2000, value=float("inf"))
    poison(ckpt, "layers.0.ffn_norm.weight", index=3)
    state = _state(ckpt)
    assert state[name].numel() > SMALL_NUMEL and not is_small(name, state[name])
    with pytest.raises(CheckpointError) as e:
        check_small_finite(state, str(ckpt))
    assert "layers.0.ffn_norm.weight" in str(e.value) and name not in str(e.value)
    report = scan_checkpoint(ckpt)
    assert not report["passed"]
    found = {r["name"]: r for r in report["non_finite"]}
    assert set(found) == {name, "layers.0.ffn_norm.weight"}
    assert found[name]["count"] == 2 and found[name]["numel"] == state[name].numel()
    assert found[name]["file"].endswith(".safetensors")


def test_scan_reads_big_tensors_in_chunks(ckpt, monkeypatch):
    import dayzero.loader.finite as finite
    monkeypatch.setattr(finite, "CHUNK_BYTES", 4096)  # embed.weight (256 KiB of bf16) in 64 chunks
    poison(ckpt, "embed.weight", index=512 * 256 - 1)  # the last element: only the last chunk sees it
    (bad,) = scan_checkpoint(ckpt)["non_finite"]
    assert bad["name"] == "embed.weight" and bad["count"] == 1


def test_verify_weights_report_and_card(ckpt, tmp_path):
    poison(ckpt, "layers.2.attn.wo_a.weight", index=5)
    out = tmp_path / "weights.json"
    report = verify.run_weights(ckpt, out=str(out), quiet=True)
    assert not report["passed"] and json.loads(out.read_text())["non_finite"][0]["name"] == "layers.2.attn.wo_a.weight"
    card = verify.weights_card(report)
    assert "NON-FINITE layers.2.attn.wo_a.weight (F8_E4M3" in card
    assert card.endswith("RESULT: FAIL (1 tensor(s) with NaN or inf)")


def test_load_model_refuses_a_nan_norm(ckpt):
    """The loader's wiring: load_model calls check_small_finite on what it read."""
    from dayzero.loader.model_io import load_model
    poison(ckpt, "norm.weight", index=0)
    with pytest.raises(CheckpointError, match="tensor 'norm.weight'"):
        load_model(ckpt)
