"""bench/v41_step.py at the tiny size: the record's fields, the byte count against a hand count of the tiny
slice's shapes, and a finite decode step over the filled cache (no timing is asserted)."""
from __future__ import annotations

import json
import pytest
import torch

from bench import v41_step as vs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dayzero.testing import tiny_tokenizer
    tok = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tiny_tokenizer(tok, vocab_size=320)
    args = vs.slice_args(tok, "tiny")
    return args, vs.random_v41(args, tok)


def test_slice_is_the_real_schedule_pattern(tiny):
    args, _ = tiny
    assert [l.role for l in args.layers] == ["sliding", "sliding", "full", "full", "reuse"]
    assert [l.engram for l in args.layers] == [False, True, False, False, False]
    assert args.layers[2].pooled and args.layers[3].publishes_candidates and args.layers[4].kv_source == 3


def test_flash_slice_has_the_released_per_layer_shapes(tmp_path):
    from dayzero.testing import tiny_tokenizer
    from dayzero.v41.presets import v41_flash
    tok = tmp_path / "tokenizer.json"
    tiny_tokenizer(tok, vocab_size=320)
    a, real = vs.slice_args(tok, "flash"), v41_flash()
    for f in ("dim", "n_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "window_size", "index_n_heads",
              "index_head_dim", "index_topk", "candidate_topk_blocks", "candidate_block_size", "hc_mult",
              "moe_inter_dim", "n_activated_experts", "engram_head_dim", "engram_n_heads", "engram_max_ngram_size",
              "quant", "expert_dtype"):
        assert getattr(a, f) == getattr(real, f), f
    assert a.n_routed_experts == 16 and a.vocab_size == 320  # smaller where a token's bytes do not depend on it


def test_step_bytes_equal_a_hand_count(tiny):
    args, model = tiny
    c = 64
    parts = vs.step_bytes(model, c)
    # window rows: 5 layers x 16 rows x 128 x bf16; layer 2 (r2, index source): top-8 of 32 entries + 32
    # keys x 64; layer 3 (r1, index source): top-8 + 65 keys; layer 4 (reuse): top-8; n-gram ids 4 x int64
    kv = 5 * 16 * 128 * 2 + (8 * 128 * 2 + 32 * 64 * 2) + (8 * 128 * 2 + 65 * 64 * 2) + 8 * 128 * 2 + 4 * 8
    assert parts["kv"] == kv
    # 6 of 8 MXFP4 experts per layer: w1, w3 [64, 256/2] int8 + E8M0 [64, 8]; w2 [256, 64/2] + [256, 2]
    assert parts["experts"] == 5 * 6 * (2 * (64 * 128 + 64 * 8) + (256 * 32 + 256 * 2))
    assert parts["engram_rows"] == 3 * 8 * (64 + 2)  # (4-gram - 1) x 8 heads rows of 64 FP8 + 2 E8M0
    assert parts["embed_row"] == 256 * 2
    every = sum(t.numel() * t.element_size() for t in model.parameters())
    experts = sum(t.numel() * t.element_size() for n, t in model.named_parameters() if ".experts." in n)
    tables = sum(t.numel() * t.element_size() for n, t in model.named_parameters() if ".engram.embed." in n)
    assert parts["dense"] == every - experts - tables - model.embed.weight.numel() * 2
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


def test_decode_over_the_filled_cache_is_finite(tiny):
    args, model = tiny
    state = vs.filled_state(model, 64)
    assert state.pos == 64 and state.caches[0].store[(3, "c:key")].shape[0] >= 64
    with torch.no_grad():
        logits = model(torch.tensor([[5]]), state)
    assert logits.shape == (1, 1, args.vocab_size) and torch.isfinite(logits).all()


def test_record_fields(tiny, tmp_path):
    out = tmp_path / "r.json"
    lines = []
    recs = vs.run("tiny", (32,), baseline=True, out=str(out), log=lines.append)
    assert json.loads(out.read_text()) == json.loads(json.dumps(recs))
    r = recs[0]
    for k in ("time_us", "bytes", "bytes_by_part", "achieved_gbps", "roofline_fraction", "peaks", "baseline_name",
              "baseline_time_us", "baseline_bytes", "baseline_roofline_fraction", "commit", "versions", "layers"):
        assert k in r, k
    assert r["bytes"] == r["bytes_by_part"]["total"] == vs.step_bytes(tiny[1], 32)["total"]
    assert r["baseline_bytes"] > 0 and r["context"] == 32 and r["batch"] == 1
    assert abs(r["achieved_gbps"] * 1e9 - r["bytes"] / (r["time_us"] / 1e6)) <= 1e-6 * r["bytes"] / (r["time_us"] / 1e6)
    assert abs(r["roofline_fraction"] - r["achieved_gbps"] * 1e9 / r["peaks"]["bandwidth"]) < 1e-9
    assert any("% of copy bandwidth" in line for line in lines)
    from dayzero.ops import for_device
    engine_table = for_device(torch.device("cpu"))  # both models on the table the engine picks here
    assert r["ops"] == r["baseline_ops"] == engine_table.name and r["kernels"] == list(engine_table.kernels)
    assert any(f"ops table {engine_table.name}" in line for line in lines)
