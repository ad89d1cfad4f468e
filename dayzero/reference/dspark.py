"""DSpark, DeepSeek's three-stage block drafter (V4-Flash-0731, V4-Flash-DSpark, V4-Pro-DSpark), as the
checkpoint defines it (research/v41-and-dspark.md section 2; DSpark paper, deepseek-ai/DeepSpec).

Tensors (official names, `mtp.{i}.` for stage i; every stage a full V4 block: mHC sites,
sliding-window attention without compressor or indexer, MoE with learned-bias routing):
  mtp.0.main_proj [dim, T * dim] (FP8 + scale), mtp.0.main_norm [dim]   target projection
  mtp.{last}.norm [dim], hc_head_fn [hc, hc * dim] / _base [hc] / _scale [1]   head collapse
  mtp.{last}.markov_head.markov_w1 / markov_w2 [vocab, rank]          low-rank Markov head
  mtp.{last}.confidence_head.proj [1, dim + rank] (fp32, no bias)     confidence head

Forward:
  1. target capture: main_hidden[p] = concat over dspark_target_layer_ids of the layer's output
     streams averaged over the hc streams, [T * dim];  main_x = main_norm(main_proj(main_hidden)).
  2. context: each stage keeps K=V rows rope(kv_norm(wkv(main_x[p]))) at main position p (its own
     sliding window of `window` rows; the engine stores them in the window cache at p + 1, as
     MTP's rows, so a cached block's rows depend on tokens inside it only).
  3. draft block after the last computed position c - 1: inputs [anchor, noise x (k - 1)] at
     positions c .. c + k - 1 (the anchor is the last known token, itself the first prediction
     position: k inputs give k draft logits); embed -> hc streams -> the stages, each query
     attending to its stage's context rows of positions c - window .. c - 1 and to every row of
     its own block (non-causal inside the block).
  4. head: hc_head collapse -> norm -> the target's LM head: U_i [vocab]; then left to right
     logits_i = U_i + markov_w2 @ markov_w1[prev] (prev: the anchor, then the previous draft),
     a draft token sampled from each; confidence_i = sigmoid(proj [h_i ; markov_w1[prev]]) with
     h_i the collapsed (pre-norm) hidden.
"""
from __future__ import annotations

import torch
from torch import nn

from dayzero.config import ModelArgs
from dayzero.distributed.layout import Layout
from dayzero.ops import ref
from dayzero.reference.attention import _fp8_nope_sim, rope_table, rows_of
from dayzero.reference.layers import Linear, RMSNorm, UsesOps, fused_pair, storage_dtype
from dayzero.reference.model import Block, HCHead, _f32
from dayzero.reference.seqcache import Batch


class _Weight(nn.Module):
    """A bare `.weight` (the official name of a plain tensor in a named sub-module)."""

    def __init__(self, *shape: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)


class MarkovHead(UsesOps, nn.Module):
    """B(prev, v) = markov_w2[v] . markov_w1[prev]: a rank-r bigram bias on the draft logits (through
    the table's fp32_linear, as the LM head: a row's bias does not depend on the other rows)."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype):
        super().__init__()
        self.markov_w1 = _Weight(args.vocab_size, args.dspark_markov_rank, dtype=dtype)
        self.markov_w2 = _Weight(args.vocab_size, args.dspark_markov_rank, dtype=dtype)

    def embed(self, prev: torch.Tensor) -> torch.Tensor:
        return self.markov_w1.weight[prev].float()  # [n, r]

    def bias(self, e: torch.Tensor) -> torch.Tensor:
        return self.ops.fp32_linear(e, self.markov_w2.weight)  # [n, vocab] fp32


class ConfidenceHead(UsesOps, nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.proj = _Weight(1, args.dim + args.dspark_markov_rank, dtype=torch.float32)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Probability that the draft survives verification, [n]."""
        return ref.lanewise(torch.sigmoid, self.ops.fp32_linear(torch.cat([h.float(), e], -1),
                                                               self.proj.weight)).squeeze(-1)


class DSparkStage(Block, HCHead):
    """Stage i: a V4 block at layer id n_layers + i (sliding-window attention: compress ratio 0);
    stage 0 also projects the target's hidden states, the last stage also holds the head stack."""

    def __init__(self, args: ModelArgs, i: int, official: bool, layout: Layout = Layout()):
        super().__init__(args, args.n_layers + i, official, layout)
        dtype = storage_dtype(args.dtype)
        self.stage = i
        if i == 0:
            n_t = len(args.dspark_target_layer_ids)
            self.main_proj = Linear(n_t * args.dim, args.dim, args.linear_format, dtype, official)
            self.main_norm = RMSNorm(args.dim, args.norm_eps, dtype)
        if i == args.dspark_stages - 1:
            self.norm = RMSNorm(args.dim, args.norm_eps, dtype)
            self.hc_head_fn, self.hc_head_base, self.hc_head_scale = (
                _f32(args.hc_mult, args.hc_mult * args.dim), _f32(args.hc_mult), _f32(1))
            self.markov_head = MarkovHead(args, dtype)
            self.confidence_head = ConfidenceHead(args)

    # ---- attention over [context rows ; block rows] ------------------------------------------
    def _inv_freq(self, batch: Batch) -> torch.Tensor:
        a, dev = self.attn, batch.positions.device
        return a.inv_freq_cpu if dev.type == "cpu" else rope_table(*a.args_rope, dev)

    def _kv(self, kv: torch.Tensor, batch: Batch, inv: torch.Tensor) -> torch.Tensor:
        a = self.attn
        kv = self.ops.apply_rope(a.kv_norm(kv), *batch.rope(inv))
        return _fp8_nope_sim(self.ops, kv, a.rope_dim) if a.official else kv

    def write_context(self, main_x: torch.Tensor, batch: Batch) -> None:
        """The stage's context rows for the main positions p of `batch` (stored at p + 1)."""
        kv = self._kv(self.attn.wkv(main_x), batch, self._inv_freq(batch))
        batch.cache.write(self.layer_id, "kv", batch.seq, batch.stored(1), kv)

    def block_attention(self, x: torch.Tensor, batch: Batch, k: int) -> torch.Tensor:
        """x [n * k, dim]: n blocks of k rows (block j at positions batch.starts[j] ..)."""
        a, ops = self.attn, self.ops
        inv = self._inv_freq(batch)
        q_lat, kv = fused_pair(a.wq_a, a.wkv, x)
        q = a.wq_b(a.q_norm(q_lat)).unflatten(-1, (a.n_heads, a.head_dim))
        if a.official:  # as Attention.forward
            q = q * torch.rsqrt(q.square().mean(-1, keepdim=True) + a.eps)
        else:
            q = ops.rms_norm(q, None, a.eps)
        q = ops.apply_rope(q, *batch.rope(inv, heads=True))
        kv = self._kv(kv, batch, inv)
        o = block_core(ops, a, self.layer_id, q, kv, batch, k, inv)
        return a.output(o)  # tensor parallel: this rank's heads, partial sums all-reduced

    def forward_block(self, X: torch.Tensor, batch: Batch, ids: torch.Tensor, k: int) -> torch.Tensor:
        X = self._site(X, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base,
                       lambda u: self.block_attention(self.attn_norm(u), batch, k))
        return self._site(X, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base,
                          lambda u: self.ffn(self.ffn_norm(u), ids))

    def head(self, X: torch.Tensor, head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(collapsed hidden h [M, dim], fp32 logits U [M, vocab] before the Markov bias; a
        vocab-parallel head's slices gathered, as Transformer.logits)."""
        h = self.hc_head(X)
        return h, self.comm.all_gather(self.ops.fp32_linear(self.norm(h), head), -1)


def main_hidden(captured: dict[int, torch.Tensor], args: ModelArgs) -> torch.Tensor:
    """The target capture, [N, T * dim]: the listed layers' outputs, each averaged over its hc streams."""
    return torch.cat([captured[i] for i in args.dspark_target_layer_ids], -1)


def draft_block(model, stages: nn.ModuleList, anchors: torch.Tensor, batch: Batch, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft forward of `len(anchors)` blocks of k rows ([anchor, noise x (k - 1)] at positions
    batch.starts[j] ..): (h [n, k, dim], U [n, k, vocab] fp32)."""
    n = anchors.shape[0]
    ids, X = block_inputs(model, anchors, k)
    for st in stages:
        X = st.forward_block(X, batch, ids, k)
    h, U = stages[-1].head(X, model.head_weight())
    return h.view(n, k, -1), U.view(n, k, -1)


def block_inputs(model, anchors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft blocks' token ids [n * k] ([anchor, noise x (k - 1)] per block) and their embeddings
    as residual streams [n * k, hc, dim] (V4's and V4.1's stages alike)."""
    args = model.args
    ids = torch.full((anchors.shape[0], k), args.dspark_noise_token_id, dtype=torch.long, device=anchors.device)
    ids[:, 0] = anchors
    ids = ids.flatten()
    return ids, model.embed_tokens(ids).unsqueeze(1).repeat(1, args.hc_mult, 1)


def block_core(ops, a, layer_id: int, q: torch.Tensor, kv: torch.Tensor, batch: Batch, k: int,
               inv: torch.Tensor) -> torch.Tensor:
    """A DSpark stage's block attention after its projections (V4's stages and V4.1's, v41/dspark.py):
    q [n * k, H, D] (RoPE'd), kv [n * k, D] the blocks' own rows; every query of block j attends to the
    stage's context rows of main positions c - window .. c - 1 (c = batch.starts[j], stored at + 1) and
    to all k rows of its block (non-causal), with the sink -> o [n * k, H, D], RoPE undone."""
    M, dev, W = q.shape[0], q.device, a.window
    first = torch.repeat_interleave(torch.tensor(batch.starts, device=dev), k)
    stored = first[:, None] - W + 1 + torch.arange(W, device=dev)[None, :]
    ctx = rows_of(batch.cache, layer_id, "kv", batch.seq[:, None], stored, stored >= 1, (a.head_dim,), q.dtype)
    own = (torch.arange(M, device=dev) // k * k)[:, None] + torch.arange(k, device=dev)[None, :]
    o = ops.sparse_attn_paged(q, [ctx, (kv, own)], a.attn_sink, a.head_dim ** -0.5)
    return ops.apply_rope(o, *batch.rope(inv, heads=True), inverse=True)
