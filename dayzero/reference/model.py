"""The executable spec of DeepSeek-V4, in paper order (v4-architecture.md section 3).

Module and parameter names are the official checkpoint names, so `Transformer(args).state_dict()`
lists exactly the tensors of an official checkpoint (names, shapes, storage dtypes).

Numerics: `official` adds DeepSeek's quantisation simulation (FP8 activations into FP8/FP4
GEMMs, FP8 KV nope dims, Hadamard + FP4 indexer q/k); `transformers` has none and matches
Hugging Face's DeepseekV4ForCausalLM on the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dayzero.config import ModelArgs
from dayzero.ops import ref
from dayzero.reference.attention import Attention, AttnState
from dayzero.reference.layers import Linear, RMSNorm, storage_dtype
from dayzero.reference.moe import MoE

NUMERICS = ("official", "transformers")


@dataclass
class ModelState:
    """Everything a sequence batch carries between forward calls: tokens processed so far, each
    layer's attention state and, for MTP, its own window and the last main-model streams."""
    pos: int = 0
    layers: list[AttnState] = field(default_factory=list)
    mtp: AttnState = field(default_factory=AttnState)
    mtp_pos: int = 0


def _f32(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape), requires_grad=False)


class Block(nn.Module):
    """One layer: two mHC sites (attention, MoE) around the residual streams [B, S, hc, dim]."""

    def __init__(self, args: ModelArgs, layer_id: int, official: bool):
        super().__init__()
        dtype = storage_dtype(args.dtype)
        n, mix = args.hc_mult, (2 + args.hc_mult) * args.hc_mult
        self.hc_mult, self.iters, self.hc_eps, self.norm_eps = n, args.hc_sinkhorn_iters, args.hc_eps, args.norm_eps
        self.attn_norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.attn = Attention(args, layer_id, dtype, official)
        self.ffn = MoE(args, layer_id, dtype, official)
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = _f32(mix, n * args.dim), _f32(mix), _f32(3)
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = _f32(mix, n * args.dim), _f32(mix), _f32(3)

    def _site(self, X: torch.Tensor, fn, scale, base, sublayer) -> torch.Tensor:
        mixes = ref.hc_mixes(X, fn, self.norm_eps)
        pre, post, comb = ref.hc_split_sinkhorn(mixes, scale, base, self.hc_mult, self.iters, self.hc_eps)
        return ref.hc_post(sublayer(ref.hc_collapse(X, pre)), X, post, comb)

    def forward(self, X: torch.Tensor, start_pos: int, input_ids: torch.Tensor, st: AttnState) -> torch.Tensor:
        X = self._site(X, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base,
                       lambda u: self.attn(self.attn_norm(u), start_pos, st))
        return self._site(X, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base,
                          lambda u: self.ffn(self.ffn_norm(u), input_ids))


class HCHead(nn.Module):
    """Final stream collapse (hc_head) -> RMSNorm -> fp32 LM head."""

    def hc_head(self, X: torch.Tensor) -> torch.Tensor:
        mixes = ref.hc_mixes(X, self.hc_head_fn, self.norm_eps)
        pre = torch.sigmoid(mixes * self.hc_head_scale.float() + self.hc_head_base.float()) + self.hc_eps
        return ref.hc_collapse(X, pre)

    def logits(self, X: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.hc_head(X))
        return torch.nn.functional.linear(h.float(), head.float())


class MTPBlock(Block, HCHead):
    """Multi-token prediction (3.11): streams of the main model at position p plus the embedding
    of token p+1 predict token p+2. The embedding and head are shared with the main model."""

    def __init__(self, args: ModelArgs, official: bool):
        super().__init__(args, args.n_layers, official)
        dtype = storage_dtype(args.dtype)
        fmt = args.linear_format
        self.e_proj = Linear(args.dim, args.dim, fmt, dtype, official)
        self.h_proj = Linear(args.dim, args.dim, fmt, dtype, official)
        self.enorm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.hnorm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = (
            _f32(args.hc_mult, args.hc_mult * args.dim), _f32(args.hc_mult), _f32(1))

    def forward(self, X: torch.Tensor, e: torch.Tensor, start_pos: int, input_ids: torch.Tensor,
                st: AttnState) -> torch.Tensor:
        X = self.e_proj(self.enorm(e)).unsqueeze(2) + self.h_proj(self.hnorm(X))
        return super().forward(X, start_pos, input_ids, st)


class Transformer(HCHead, nn.Module):
    def __init__(self, args: ModelArgs, numerics: str = "official", compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
        official = numerics == "official"
        self.args, self.numerics, self.compute_dtype = args, numerics, compute_dtype
        self.norm_eps, self.hc_eps = args.norm_eps, args.hc_eps
        dtype = storage_dtype(args.dtype)
        self.embed = nn.Embedding(args.vocab_size, args.dim, dtype=dtype)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(args, i, official) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.head = Linear(args.dim, args.vocab_size, "dense", dtype)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = (
            _f32(args.hc_mult, args.hc_mult * args.dim), _f32(args.hc_mult), _f32(1))
        self.mtp = nn.ModuleList(MTPBlock(args, official) for _ in range(args.n_mtp_layers))

    def new_state(self) -> ModelState:
        return ModelState(layers=[AttnState() for _ in self.layers])

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids).to(self.compute_dtype)

    def forward(self, input_ids: torch.Tensor, state: ModelState | None = None,
                return_streams: bool = False):
        """input_ids [B, S] continuing `state` (a fresh one if None) -> logits [B, S, vocab] fp32;
        with return_streams also the final residual streams [B, S, hc, dim] (MTP's input)."""
        state = state if state is not None else self.new_state()
        if not state.layers:
            state.layers = [AttnState() for _ in self.layers]
        start_pos = state.pos
        if start_pos + input_ids.shape[1] > self.args.max_seq_len:
            raise ValueError(f"sequence of {start_pos + input_ids.shape[1]} tokens exceeds "
                             f"max_position_embeddings={self.args.max_seq_len}")
        h = self.embed_tokens(input_ids)
        X = h.unsqueeze(2).repeat(1, 1, self.args.hc_mult, 1)
        for layer, st in zip(self.layers, state.layers):
            X = layer(X, start_pos, input_ids, st)
        state.pos += input_ids.shape[1]
        logits = self.logits(X, self.head.weight)
        return (logits, X) if return_streams else logits

    def mtp_forward(self, streams: torch.Tensor, next_ids: torch.Tensor, state: ModelState) -> torch.Tensor:
        """streams [B, S, hc, dim] of positions p.. and the tokens at p+1.. -> logits for p+2..
        (fp32). Positions continue `state.mtp_pos`, which advances by S."""
        if not self.mtp:
            raise ValueError("this checkpoint has no MTP module (num_nextn_predict_layers = 0)")
        mtp = self.mtp[0]
        X = mtp(streams, self.embed_tokens(next_ids), state.mtp_pos, next_ids, state.mtp)
        state.mtp_pos += next_ids.shape[1]
        return mtp.logits(X, self.head.weight)
