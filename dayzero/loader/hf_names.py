"""Official checkpoint names <-> Hugging Face transformers' DeepseekV4ForCausalLM names
(v4-architecture.md Appendix A). Transformers stacks routed experts ([E, 2I, d] gate+up, [E, d, I]
down) and has no MTP module; both directions work on dense (dequantised) tensors.
"""
from __future__ import annotations

import re

import torch

# official suffix within `layers.{L}.` -> HF suffix within `model.layers.{L}.`
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn", "hc_attn_base": "attn_hc.base", "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn", "hc_ffn_base": "ffn_hc.base", "hc_ffn_scale": "ffn_hc.scale",
    "attn.attn_sink": "self_attn.sinks",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_GLOBAL = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
_HF_LAYER = {v: k for k, v in _LAYER.items()}
_HF_GLOBAL = {v: k for k, v in _GLOBAL.items()}
_EXPERT = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight$")


def official_to_hf(state: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """Dense official tensors -> transformers names; `mtp.*` is dropped (transformers has no MTP)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[tuple[int, str], torch.Tensor]] = {}
    for name, t in state.items():
        if name.startswith("mtp."):
            continue
        if name in _GLOBAL:
            out[_GLOBAL[name]] = t
            continue
        m = _EXPERT.match(name)
        if m:
            experts.setdefault(int(m[1]), {})[(int(m[2]), m[3])] = t
            continue
        layer, rest = name.split(".", 2)[1], name.split(".", 2)[2]
        if rest not in _LAYER:
            raise KeyError(f"no transformers name for official tensor {name!r}")
        out[f"model.layers.{layer}.{_LAYER[rest]}"] = t
    for layer, ws in experts.items():
        p = f"model.layers.{layer}.mlp.experts."
        out[p + "gate_up_proj"] = torch.stack(
            [torch.cat([ws[(e, "w1")], ws[(e, "w3")]], 0) for e in range(n_experts)])
        out[p + "down_proj"] = torch.stack([ws[(e, "w2")] for e in range(n_experts)])
    return out


def hf_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers names -> official names (experts unstacked into w1/w3/w2).

    Accepts transformers' module names and also what `save_pretrained` writes for DeepSeek-V4
    (transformers >= 5.2 reverse-maps to official names under a `model.` prefix, except
    `embed_tokens`/`hc_head.*`, and writes the main `attn.kv_norm` as `attn.norm`)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        bare = name[len("model."):] if name.startswith("model.") else name
        glob = {"embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight",
                "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base",
                "hc_head.hc_scale": "hc_head_scale"}
        if name in _HF_GLOBAL or bare in glob or bare in _GLOBAL:
            out[_HF_GLOBAL.get(name) or glob.get(bare) or bare] = t
            continue
        m = re.match(r"layers\.(\d+)\.(.+)$", bare)
        if not m:
            raise KeyError(f"unknown transformers tensor {name!r}")
        layer, rest = m[1], m[2]
        if rest == "mlp.experts.gate_up_proj":
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"layers.{layer}.ffn.experts.{e}.w1.weight"] = t[e, :inter]
                out[f"layers.{layer}.ffn.experts.{e}.w3.weight"] = t[e, inter:]
        elif rest == "mlp.experts.down_proj":
            for e in range(t.shape[0]):
                out[f"layers.{layer}.ffn.experts.{e}.w2.weight"] = t[e]
        elif rest in _HF_LAYER:
            out[f"layers.{layer}.{_HF_LAYER[rest]}"] = t
        elif rest == "attn.norm.weight":
            out[f"layers.{layer}.attn.kv_norm.weight"] = t
        elif rest in _LAYER or _EXPERT.match(bare):
            out[bare] = t
        else:
            raise KeyError(f"unknown transformers tensor {name!r}")
    return out
