"""The `v4.1-flash` preset, its census against the published one (research/v41-and-dspark.md 1.1, 1.4, 2.2),
the planned KV bytes against a hand count, and the V4.1 rows of the KV and layout reports."""
from __future__ import annotations

import json
import pytest

from dayzero.v41 import V41Args
from dayzero.v41.presets import census, kv_plan, v41_flash, v41_preset
from tests.v41.tiny import flash_hub, hub, text_config

PUBLISHED_TOTAL = 763_205_315_794  # logical params of the release (HF API total, research 1.4)


def test_preset_is_the_released_config():
    assert v41_flash() == V41Args.from_dict(flash_hub())
    with pytest.raises(ValueError, match=r"unknown DeepSeek-V4.1 preset 'v41-pro' \(one of: v4.1-flash\)"):
        v41_preset("v41-pro")


def _hand_text_params() -> int:
    """The text model's logical parameters from research 1.4 / 2.2 shapes, counted by hand."""
    d, hc_fn, E, I = 5120, 24 * 20480 + 24 + 3, 384, 2304
    attn = 1280 * d + 1280 + 32768 * 1280 + 512 * d + 512 + 8192 * 4096 + d * 8192 + 64

    def block(experts):
        return 2 * hc_fn + 2 * d + attn + experts * d + 2 * experts + 3 * I * d + experts * 3 * I * d

    layers = 40 * block(E)
    layers += 4 * (512 * d + 512 + 128 * 512 + 128) + 3 * 512 * d  # KV sources (+ gate on the 3 pooled)
    layers += 8 * (4096 * 1280 + 32 * d)  # index sources
    layers += (384006168 + 384016682) * 256 + 2 * (25600 * 6144 + 2 * 4 * d)  # Engram on layers 1, 14
    globals_ = 2 * 129280 * d + d
    dspark = 3 * block(128) + d * 3 * d + 2 * d + 2 * 129280 * 256 + (d + 256)
    return layers + globals_ + dspark


def test_census_matches_the_published_release():
    c = census(v41_flash())
    assert c["text_total"]["params"] == _hand_text_params() == 762_720_047_314
    # published parts: 552B backbone + 196.6B Engram + 14.2B DSpark + 0.5B vision = 763,205,315,794
    assert round((c["backbone_dense"]["params"] + c["routed_experts"]["params"]) / 1e9) == 552
    assert round(c["engram_tables"]["params"] / 1e8) == 1966
    assert round(c["dspark"]["params"] / 1e8) == 142
    vision = PUBLISHED_TOTAL - c["text_total"]["params"]  # the vision tower is not in the inventory
    assert round(vision / 1e8) == 5
    # atlas: 96,085 tensors = text + 266 vision; DSpark 2,401 tensors, 7.4 GiB; 510 GB on disk (vision BF16)
    assert c["text_total"]["tensors"] + 266 == 96085 and c["dspark"]["tensors"] == 2401
    assert round(c["dspark"]["bytes"] / 2**30, 1) == 7.4
    assert round((c["text_total"]["bytes"] + 2 * vision) / 1e9) == 510


def test_kv_plan_stores_entries_and_keys_once_per_kv_source_group():
    # sources: layer 1 (ratio 2, serves 1-3) and layer 4 (ratio 1, serves 4-5); head_dim 64, index_head_dim 32
    args = V41Args.from_dict(hub(text_config([0, 2, 2, 2, 1, 1], [1, 4], [1, 3, 4, 5], 4)))
    entry_fp4 = 64 // 2 + 64 // 16  # e2m1 codes + an e4m3 scale per 16
    key_fp4 = 32 // 2 + 32 // 32  # e2m1 codes + a UE8M0 scale per 32
    qat = kv_plan(args, "qat", contexts=(3, 100))
    assert qat["bytes_per_token_all_layers"] == (entry_fp4 + key_fp4) / 2 + (entry_fp4 + key_fp4) == 79.5
    window_fp8 = 64 + 64 // 32  # e4m3 + a UE8M0 scale per 32
    assert qat["fixed_bytes_per_sequence"] == 6 * 4 * window_fp8  # 6 layers x window 4 rows
    assert qat["per_sequence_bytes"]["3"] == 79.5 * 3 + 6 * 3 * window_fp8
    bf16 = kv_plan(args, "bf16", contexts=(100,))
    assert bf16["bytes_per_token_all_layers"] == 1.5 * (64 * 2 + 32 * 2)
    assert bf16["per_sequence_bytes"]["100"] == 1.5 * 192 * 100 + 6 * 4 * 128
    with pytest.raises(ValueError, match="KV plan 'fp2': one of qat, bf16"):
        kv_plan(args, "fp2")


def test_flash_kv_plan_is_about_a_quarter_of_v4_flash():
    qat = kv_plan(v41_flash())  # 3 ratio-2 groups + 1 ratio-1 group, (288 + 68) B each per entry
    assert qat["bytes_per_token_all_layers"] == 2.5 * 356 == 890
    assert 0.2 < 890 / 3514 < 0.3  # V4-Flash FP8 entries + FP4 keys, v4-architecture.md 4.2


@pytest.mark.parametrize("script,out", [("kv_report", "kv_bytes.json"), ("layout_report", "layout.json")])
def test_reports_print_the_v41_rows(tmp_path, capsys, script, out):
    import importlib

    importlib.import_module(f"bench.{script}").main(["--v41-only", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    header, status = (("v4.1-flash: PLANNED layout (kv_plan) and the engine's pools (v41/cache.py)",
                       "planned layout (qat, bf16) and the engine's pools (engine auto, engine qat)")
                      if script == "kv_report" else ("v4.1-flash: the engine's layouts (DSpark stages included)",
                                                     "the engine's layouts; DSpark stages included"))
    assert header in printed
    data = json.loads((tmp_path / out).read_text())["models"]["v4.1-flash"]
    assert data["status"] == status
    if script == "kv_report":
        assert data["qat"]["bytes_per_token_all_layers"] == 890 and data["bf16"]["bytes_per_token_all_layers"] == 3200
        assert data["engine qat"]["bytes_per_token_all_layers"] == 890  # the pools, as planned
        assert data["engine auto"]["bytes_per_token_all_layers"] == 3200
    else:
        rows = {r["layout"]: r for r in data["rows"]}
        c = census(v41_flash())
        whole = c["text_total"]["bytes"] - c["engram_tables"]["bytes"]
        assert rows["TP1"]["gpu_weight_bytes"] == whole
        assert rows["TP1"]["host_engram_bytes_per_host"] == c["engram_tables"]["bytes"]
        # EP: routed experts E/N whole, the rest replicated
        assert rows["DP8+EP"]["routed_expert_bytes"] * 8 == rows["TP1"]["routed_expert_bytes"]
        assert rows["TP8+EP"]["gpu_weight_bytes"] == rows["TP8"]["gpu_weight_bytes"]  # both split experts 1/8
        assert rows["DP8+EP"]["other_bytes"] == rows["TP1"]["other_bytes"]
        assert data["engram_gather"] == {"rows_per_token": 2 * 3 * 8, "row_bytes": 256 + 8,
                                         "bytes_per_token": 48 * 264}  # 2 layers x (2,3,4-grams x 8 heads)
        assert not rows["TP16+EP"]["fits"] and "o_groups 8" in rows["TP16+EP"]["why"]
        # the report's per-rank bytes are those of the rank's model as the engine builds it, DSpark stages included
        import torch

        from dayzero.distributed.layout import Layout
        from dayzero.v41.model import V41Transformer
        for label, layout in (("TP8+EP", Layout(8, 0, True)), ("DP16+EP", Layout(1, 0, True, 16))):
            with torch.device("meta"):
                m = V41Transformer(v41_flash(), dtype=torch.bfloat16, layout=layout, drafter=True)
            built = sum(t.numel() * t.element_size() for n, t in m.state_dict().items() if ".engram.embed." not in n)
            assert rows[label]["gpu_weight_bytes"] == built, label


def test_dspark_census_uses_v41_markov_names_and_a_bf16_confidence_head():
    import torch

    from dayzero.v41.presets import CONFIDENCE_DTYPES, dspark_tensors
    t = dspark_tensors(v41_flash())
    assert t["mtp.2.markov_head.embed.weight"].shape == t["mtp.2.markov_head.head.weight"].shape == (129280, 256)
    assert not [n for n in t if "markov_w" in n or "hc_head" in n]  # V4-0731's names; V4.1 has no hc_head
    assert t["mtp.2.confidence_head.proj.weight"].shape == (1, 5120 + 256)
    assert t["mtp.2.confidence_head.proj.weight"].dtype == torch.bfloat16 and torch.float32 in CONFIDENCE_DTYPES
    assert [n for n in t if "markov" in n or "confidence" in n or "main_" in n or n.endswith("2.norm.weight")] == [
        "mtp.0.main_proj.weight", "mtp.0.main_proj.scale", "mtp.0.main_norm.weight", "mtp.2.norm.weight",
        "mtp.2.markov_head.embed.weight", "mtp.2.markov_head.head.weight", "mtp.2.confidence_head.proj.weight"]
