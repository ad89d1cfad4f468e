"""dayzero's V4.1 model at the released V4.1-Flash shapes (built on the meta device: no memory): its
tensors per layer kind are the official names and shapes of research/v41-and-dspark.md 1.4; and the
model's own input errors."""
from __future__ import annotations

import pytest
import torch

from dayzero.v41 import V41Args
from dayzero.v41.model import V41Block, V41Transformer
from tests.v41.tiny import flash_hub, hub, text_config

# research 1.4, per backbone layer (dim 5120, hc 4, H 64, hd 512, q_lora 1280, G 8, o_lora 1024,
# E 384, I 2304, index head dim 128, index heads 32)
EVERY = {
    "hc_attn_fn": (24, 20480), "hc_attn_base": (24,), "hc_attn_scale": (3,), "attn_norm.weight": (5120,),
    "hc_ffn_fn": (24, 20480), "hc_ffn_base": (24,), "hc_ffn_scale": (3,), "ffn_norm.weight": (5120,),
    "attn.attn_sink": (64,), "attn.wq_a.weight": (1280, 5120), "attn.q_norm.weight": (1280,),
    "attn.wq_b.weight": (32768, 1280), "attn.wkv.weight": (512, 5120), "attn.kv_norm.weight": (512,),
    "attn.wo_a.weight": (8192, 4096), "attn.wo_b.weight": (5120, 8192),
    "ffn.gate.weight": (384, 5120), "ffn.gate.bias": (384,), "ffn.gate.bias_vl": (384,),
    "ffn.shared_experts.w1.weight": (2304, 5120), "ffn.shared_experts.w3.weight": (2304, 5120),
    "ffn.shared_experts.w2.weight": (5120, 2304),
    **{f"ffn.experts.{e}.w{w}.weight": (5120, 2304) if w == 2 else (2304, 5120) for e in range(384) for w in (1, 2, 3)},
}
KV_SOURCE = {"attn.compressor.wkv.weight": (512, 5120), "attn.compressor.norm.weight": (512,),
             "attn.indexer.wk.weight": (128, 512), "attn.indexer.k_norm.weight": (128,)}
POOLED = {"attn.compressor.wgate.weight": (512, 5120)}
INDEX_SOURCE = {"attn.indexer.wq_b.weight": (4096, 1280), "attn.indexer.weights_proj.weight": (32, 5120)}


def engram(rows: int) -> dict:
    return {"engram.embed.weight": (rows, 256), "engram.embed.scale": (rows, 8),
            "engram.wkv.weight": (25600, 6144), "engram.q_weight": (4, 5120), "engram.k_weight": (4, 5120)}


@pytest.mark.parametrize("layer,want", [
    (1, {**EVERY, **engram(384006168)}),  # sliding-only, Engram
    (2, {**EVERY, **KV_SOURCE, **POOLED, **INDEX_SOURCE}),  # first pooled KV source
    (14, {**EVERY, **KV_SOURCE, **POOLED, **INDEX_SOURCE, **engram(384016682)}),
    (20, {**EVERY, **KV_SOURCE, **INDEX_SOURCE}),  # ratio-1 KV source (no gate), candidate source
    (24, {**EVERY, **INDEX_SOURCE}),  # reindex
    (25, EVERY),  # reuse
], ids=["engram-sliding", "pooled-source", "pooled-source-engram", "ratio1-source", "reindex", "reuse"])
def test_released_layer_tensors_are_the_official_names_and_shapes(layer, want):
    args = V41Args.from_dict(flash_hub())
    with torch.device("meta"):
        block = V41Block(args, layer, torch.bfloat16)
    got = {k: (tuple(v.shape), v.dtype) for k, v in block.state_dict().items()}
    assert got == stored(want)
    with torch.device("meta"):  # a config without quantization_config: every weight dense, in its dtype
        dense = V41Block(args.replace(quant=None, expert_dtype=None), layer, torch.bfloat16)
    assert {k: tuple(v.shape) for k, v in dense.state_dict().items()} == want


F32 = ("hc_", "attn_sink", "gate.bias")
DENSE_FP8 = ("attn.wq_a.", "attn.wq_b.", "attn.wkv.", "attn.wo_a.", "attn.wo_b.", "indexer.wq_b.",
             "shared_experts.", "engram.wkv.")


def stored(logical: dict) -> dict:
    """Logical shapes -> the quantised checkpoint's (shape, dtype) per tensor (research 1.5): FP8 + E8M0
    per 32x32 block for the DENSE role, MXFP4 int8 [out, in/2] + E8M0 [out, in/32] for routed experts,
    FP8 rows + E8M0 per 32 for the Engram table, F32 for the mHC / sink / router-bias tensors, else BF16."""
    e8m0, fp8 = torch.float8_e8m0fnu, torch.float8_e4m3fn
    out = {}
    for name, shape in logical.items():
        if name.startswith("ffn.experts."):
            out[name] = ((shape[0], shape[1] // 2), torch.int8)
            out[name.replace(".weight", ".scale")] = ((shape[0], shape[1] // 32), e8m0)
        elif any(k in name for k in DENSE_FP8):
            out[name] = (shape, fp8)
            out[name.replace(".weight", ".scale")] = ((-(-shape[0] // 32), -(-shape[1] // 32)), e8m0)
        elif name == "engram.embed.weight":
            out[name] = (shape, fp8)
        elif name == "engram.embed.scale":
            out[name] = (shape, e8m0)
        else:
            out[name] = (shape, torch.float32 if name.startswith(F32) or ".attn_sink" in name
                         or name.startswith("ffn.gate.bias") else torch.bfloat16)
    return out


def _tiny(**changes) -> V41Args:
    return V41Args.from_dict(hub(text_config([0, 2, 2, 2, 1, 1], [1, 4], [1, 3, 4, 5], 4, **changes)))


def test_official_numerics_are_refused_by_name():
    with pytest.raises(ValueError, match=r"numerics must be one of \('transformers',\), got 'official'"):
        V41Transformer(_tiny(), numerics="official")


def test_engram_without_a_tokenizer_is_a_named_error():
    text = dict(engram_layer_ids=[1], engram_num_embeddings=[72], engram_max_ngram_size=3, engram_vocab_size=13,
                engram_n_heads=2, engram_head_dim=32, engram_pad_id=2, engram_compressed_vocab_size=50)
    model = V41Transformer(_tiny(**text))
    with pytest.raises(ValueError, match=r"Engram layers \[1\]: bind the checkpoint's tokenizer first"):
        model(torch.zeros(1, 3, dtype=torch.long))


def test_a_tokenizer_whose_token_map_does_not_fit_is_a_named_error():
    from tests.v41.pair import tokenizers
    tok, _ = tokenizers()
    text = dict(engram_layer_ids=[1], engram_num_embeddings=[72], engram_max_ngram_size=3, engram_vocab_size=13,
                engram_n_heads=2, engram_head_dim=32, engram_pad_id=2, engram_compressed_vocab_size=50)
    with pytest.raises(ValueError, match=r"compressed Engram vocabulary has \d+ ids but the config's "
                                         r"`engram_compressed_vocab_size` is 50"):
        V41Transformer(_tiny(**text)).bind_tokenizer(tok)


def test_routing_the_shared_router_computes_differently_is_refused():
    with pytest.raises(ValueError, match=r"score_func='softmax' and top-k 2 is not built"):
        V41Transformer(_tiny(scoring_func="softmax"))


def test_released_inventory_matches_the_published_census():
    """research 1.4 (checkpoint atlas of the released V4.1-Flash): 96,085 tensors, of which 2,401 are the
    DSpark stages `mtp.*` and 266 vision / aligner / image delimiters (neither built here); I8 (MXFP4
    experts) 278.6 GB and F8_E8M0 23.6 GB, DSpark's 3 x 128 experts included."""
    import math

    from dayzero.v41.checkpoint import expected_tensors
    args = V41Args.from_dict(flash_hub())
    ex = expected_tensors(args)
    assert len(ex) + 2401 + 266 == 96085
    size = lambda dt: sum(math.prod(s.shape) * dt.itemsize for s in ex.values() if s.dtype == dt)  # noqa: E731
    dspark_experts = args.n_mtp_layers * args.dspark_n_routed_experts * 3 * args.moe_inter_dim * args.dim
    assert round((size(torch.int8) + dspark_experts // 2) / 1e9, 1) == 278.6
    assert round((size(torch.float8_e8m0fnu) + dspark_experts // 32) / 1e9, 1) == 23.6
