"""The executable spec of DeepSeek-V4.1's text model (research/v41-and-dspark.md 1.3-1.4).

Module and parameter names are the official checkpoint names (`embed.weight`, `layers.{i}.attn.*`,
`layers.{i}.ffn.gate.bias_vl`, `layers.{i}.engram.embed.weight`, `norm.weight`, `head.weight`, no
`hc_head_*`), so `V41Transformer(args).state_dict()` lists the backbone tensors of a checkpoint: for
a quantised config (`quantization_config`) in the formats of v41/formats.py by role (FP8 32x32, MXFP4
experts, FP8 1x32 Engram rows, with their `.scale` tensors), else dense (the `mtp.*` / vision tensors
are not built). v41/loader.py loads a checkpoint into it.

Numerics: only `transformers`, what transformers' `deepseek_v41` computes, its fake-quantisation
points included (v41/quant.py). The forward is exact full prefill of the causal encoder-decoder
schedule: every layer runs on every token (no bounded replay of the decoder layers).
"""
from __future__ import annotations

import torch
from torch import nn

from dayzero.ops import ref
from dayzero.reference.layers import Linear, RMSNorm, UsesOps
from dayzero.reference.model import ModelState
from dayzero.reference.seqcache import Batch
from dayzero.v41.attention import Context, CSA2Attention
from dayzero.v41.config import V41Args
from dayzero.v41.engram import Engram, NgramHasher, compressed_token_map
from dayzero.v41.moe import V41MoE

NUMERICS = ("transformers",)


def _f32(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape), requires_grad=False)


class V41Block(UsesOps, nn.Module):
    """One layer: the Engram lookup (its layers) into the streams, then two single-pass mHC sites.

    Single-pass mHC: a site computes (pre, post, comb) from the streams it receives, but its
    sublayer reads the streams collapsed with the PREVIOUS site's `pre` (attention: the previous
    layer's FFN site; the first attention: stream 0); its own `pre` goes to the next site, and the
    last FFN site's to the final collapse (no hc_head)."""

    def __init__(self, args: V41Args, layer_id: int, dtype: torch.dtype):
        super().__init__()
        n, mix = args.hc_mult, (2 + args.hc_mult) * args.hc_mult
        self.layer_id, self.iters, self.hc_eps, self.norm_eps = layer_id, args.hc_sinkhorn_iters, args.hc_eps, args.norm_eps
        layer = args.layers[layer_id]
        if layer.engram:
            self.engram = Engram(args, args.engram_layer_ids.index(layer_id), dtype)
        self.attn_norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.attn = CSA2Attention(args, layer, dtype)
        self.ffn = V41MoE(args, dtype)
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = _f32(mix, n * args.dim), _f32(mix), _f32(3)
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = _f32(mix, n * args.dim), _f32(mix), _f32(3)

    def _site(self, X, pre, fn, scale, base, sublayer):
        mixes = ref.hc_mixes(X, fn, self.norm_eps)
        own_pre, post, comb = ref.hc_split_sinkhorn(mixes, scale, base, X.shape[-2], self.iters, self.hc_eps)
        return self.ops.hc_post(sublayer(ref.hc_collapse(X, pre)), X, post, comb), own_pre

    def forward(self, X: torch.Tensor, pre: torch.Tensor, batch: Batch, ctx: Context, input_ids: torch.Tensor,
                hash_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """X [N, hc, dim] streams, pre [N, hc] of the previous site -> (streams, this layer's FFN pre)."""
        if hasattr(self, "engram"):
            X = self.engram(X, hash_ids)
        X, pre = self._site(X, pre, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base,
                            lambda u: self.attn(self.attn_norm(u), batch, ctx))
        return self._site(X, pre, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base,
                          lambda u: self.ffn(self.ffn_norm(u), input_ids))


class V41Transformer(nn.Module):
    def __init__(self, args: V41Args, numerics: str = "transformers", dtype: torch.dtype = torch.float32):
        super().__init__()
        if numerics not in NUMERICS:
            raise ValueError(f"DeepSeek-V4.1 numerics must be one of {NUMERICS}, got {numerics!r} (the official "
                             f"mode's extra quantisation simulation is not built for V4.1)")
        self.args, self.numerics, self.compute_dtype = args, numerics, dtype
        self.embed = nn.Embedding(args.vocab_size, args.dim, dtype=dtype)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(V41Block(args, i, dtype) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.head = Linear(args.dim, args.vocab_size, "dense", dtype)
        self.hasher: NgramHasher | None = None

    def bind_tokenizer(self, tokenizer) -> "V41Transformer":
        """Derive the Engram token map from the checkpoint's tokenizer (a `tokenizers.Tokenizer`)."""
        if self.args.engram_layer_ids:
            self.hasher = NgramHasher(self.args, *compressed_token_map(tokenizer))
        return self

    def new_state(self) -> ModelState:
        return ModelState()

    def forward_packed(self, input_ids: torch.Tensor, batch: Batch) -> torch.Tensor:
        """input_ids [N] packed as `batch` -> the final collapsed hidden [N, dim] (before `norm`)."""
        if batch.end > self.args.max_seq_len:
            raise ValueError(f"sequence of {batch.end} tokens exceeds max_position_embeddings={self.args.max_seq_len}")
        hash_ids = None
        if self.args.engram_layer_ids:
            if self.hasher is None:
                raise ValueError("this DeepSeek-V4.1 model has Engram layers "
                                 f"{list(self.args.engram_layer_ids)}: bind the checkpoint's tokenizer first "
                                 "(V41Transformer.bind_tokenizer), its token map defines the n-gram hashes")
            hash_ids = self.hasher(input_ids, batch)
        X = self.embed(input_ids).to(self.compute_dtype).unsqueeze(1).repeat(1, self.args.hc_mult, 1)
        pre = torch.zeros(X.shape[:2], device=X.device)
        pre[:, 0] = 1.0  # the first site reads stream 0
        ctx = Context()
        for layer in self.layers:
            X, pre = layer(X, pre, batch, ctx, input_ids, hash_ids)
        return ref.hc_collapse(X, pre)

    def forward(self, input_ids: torch.Tensor, state: ModelState | None = None) -> torch.Tensor:
        """input_ids [B, S] continuing `state` (a fresh one if None) -> logits [B, S, vocab] fp32."""
        state = state if state is not None else self.new_state()
        B, S = input_ids.shape
        h = self.forward_packed(input_ids.reshape(-1), state.batch(B, S, state.pos, input_ids.device))
        state.pos += S
        return ref.fp32_linear(self.norm(h), self.head.weight).view(B, S, -1)
