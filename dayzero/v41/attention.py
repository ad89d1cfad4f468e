"""CSA2 attention of DeepSeek-V4.1 (research/v41-and-dspark.md 1.3; schedule in v41/schedule.py).

Every layer attends to a sliding window of `window` raw K=V rows (the current token included,
FP8-quantised). A layer with compress ratio r > 0 also attends to the compressed entries of its
group, shared by all its layers and kept once, under the KV source's layer id:
- the KV source's compressor makes entry i from tokens r*i .. r*i + r - 1 (r = 2: per-channel
  softmax pooling with an fp32 gate; r = 1: one token, no gate), RMS-normalised (the "latent");
  the entry is the latent rotated at position r*i (compress RoPE), FP4-quantised; the group's
  indexer key i is k_norm(wk(latent)) rotated at r*i, FP4-quantised;
- entry i is usable by the token at p iff i < (p + 1) // r;
- an index source scores its queries against the group's keys, sum_h w_h relu(q_h . k) (FP4 q),
  and picks the top `index_topk` usable entries; the layers after it in the group reuse that
  pick (`Context.topk`);
- the candidate source also keeps, per query, the `candidate_topk_blocks` best blocks of
  `candidate_block_size` entries (a block scores its best entry; the block holding the query's
  newest usable entry always stays); every later index source picks only inside them.

State between calls is rows of the batch's cache (reference/seqcache.py), addressed by position:
  (layer, "kv")      window row at token position p
  (src, "c:rows")    a pooled source's projections at p, fp32 [2, head_dim]: (kv, gate)
  (src, "c:ent")     compressed entry i [head_dim]
  (src, "c:key")     indexer key i [index_head_dim]
so a sequence split into calls in any way computes what one call computes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dayzero.distributed.layout import Layout
from dayzero.ops import ref
from dayzero.reference.attention import Attention, rope_table, rows_of
from dayzero.reference.layers import Linear, RMSNorm, UsesOps
from dayzero.reference.seqcache import Batch
from dayzero.v41 import quant
from dayzero.v41.formats import DENSE_BLOCK, v41_linear
from dayzero.v41.schedule import V41Layer


@dataclass
class Context:
    """What one forward call's layers hand each other: the current group's top-k entry ids [N, k]
    (-1: none) and the candidate entries [N, T] (bool) of the candidate source."""
    topk: torch.Tensor | None = None
    candidates: torch.Tensor | None = None


class CSA2Compressor(UsesOps, nn.Module):
    def __init__(self, args, ratio: int, dtype: torch.dtype):
        super().__init__()
        self.ratio = ratio
        self.wkv = Linear(args.dim, args.head_dim, "dense", dtype)
        if ratio > 1:
            self.wgate = Linear(args.dim, args.head_dim, "dense", dtype)
        self.norm = RMSNorm(args.head_dim, args.norm_eps, dtype)

    def latents(self, x: torch.Tensor, batch: Batch, layer: int):
        """The latents of the entries this batch's tokens close, as (seq [E], entry ids [E],
        latents [E, head_dim] in x.dtype), or None."""
        closing = batch.closing(self.ratio, False)
        if self.ratio == 1:  # one entry per token, in token order
            return closing[0], closing[1], self.norm(self.wkv(x))
        rows = torch.stack([self.ops.fp32_linear(x, self.wkv.weight), self.ops.fp32_linear(x, self.wgate.weight)], 1)
        batch.cache.write(layer, "c:rows", batch.seq, batch.positions, rows)
        if closing is None:
            return None
        seq, ids, row_seq, row_pos, _ = closing
        win = batch.cache.read(layer, "c:rows", row_seq, row_pos).float().unflatten(0, (ids.shape[0], self.ratio))
        return seq, ids, self.norm(self.ops.compress_pool(win[:, :, 0], win[:, :, 1]).to(x.dtype))


def candidate_blocks(scores: torch.Tensor, newest: torch.Tensor, n_blocks: int, block: int) -> torch.Tensor:
    """scores [N, T] (-inf: not usable), newest [N] (the query's newest usable entry, -1: none) ->
    bool [N, T]: the entries of each query's `n_blocks` best blocks of `block` entries. A block
    scores its best entry; the newest entry's block is always kept (it is still filling and could
    lose to older full blocks); blocks with no usable entry are never kept."""
    N, T = scores.shape
    pad = -T % block
    s = torch.nn.functional.pad(scores, (0, pad), value=float("-inf")).unflatten(-1, (-1, block)).amax(-1)
    nb = s.shape[1]
    s = s.masked_fill(torch.arange(nb, device=s.device)[None, :] == (newest // block)[:, None], float("inf"))
    top = ref.topk_select(s, n_blocks)  # -1 where the block scores -inf
    keep = torch.zeros(N, nb + 1, dtype=torch.bool, device=s.device)
    keep.scatter_(1, torch.where(top < 0, nb, top), True)
    return keep[:, :nb].repeat_interleave(block, 1)[:, :T]


class CSA2Indexer(UsesOps, nn.Module):
    def __init__(self, args, layer: V41Layer, dtype: torch.dtype):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.cand_blocks, self.cand_block = args.candidate_topk_blocks, args.candidate_block_size
        self.publishes, self.bounded = layer.publishes_candidates, layer.candidate_source is not None
        self.wq_b = v41_linear(args, args.q_lora_rank, self.n_heads * self.head_dim, dtype)
        self.weights_proj = Linear(args.dim, self.n_heads, "dense", dtype)
        if layer.is_kv_source:
            self.wk = Linear(args.head_dim, self.head_dim, "dense", dtype)  # BF16 in the release (v41/formats.py)
            self.k_norm = RMSNorm(self.head_dim, args.norm_eps, dtype)

    def keys(self, latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The group's indexer keys of pre-RoPE latents, rotated with (cos, sin) of their entries."""
        return quant.index_qk(self.ops.apply_rope(self.k_norm(self.wk(latent)), cos, sin))

    def select(self, x: torch.Tensor, q_lat: torch.Tensor, batch: Batch, src: int, ratio: int, count: int,
               inv_freq: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Each query's picked entry ids [N, index_topk] of group `src`, -1 where none."""
        seq_col, ids, usable = batch.entries(ratio, count)
        pool, rows = rows_of(batch.cache, src, "c:key", seq_col, ids, usable, (self.head_dim,), x.dtype)
        q = self.wq_b(q_lat).unflatten(-1, (self.n_heads, self.head_dim))
        q = quant.index_qk(self.ops.apply_rope(q, *batch.rope(inv_freq, heads=True)))
        w = self.weights_proj(x).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        scores = self.ops.indexer_scores_paged(q, w, pool, rows)  # [N, count], -inf where not usable
        if self.publishes:
            newest = (batch.positions + 1) // ratio - 1
            ctx.candidates = candidate_blocks(scores, newest, self.cand_blocks, self.cand_block)
        elif self.bounded and ctx.candidates is not None:
            scores = scores.masked_fill(~ctx.candidates, float("-inf"))
        top = self.ops.topk_select(scores, self.topk)
        # always `index_topk` columns (-1: none), so that the attention's key count, and with it
        # its reduction order, does not depend on how many entries exist yet (causality bit for bit)
        return torch.nn.functional.pad(top, (0, self.topk - top.shape[1]), value=-1)


class CSA2Attention(UsesOps, nn.Module):
    """Tensor parallel (`layout.tp` = N > 1, distributed/layout.py): this rank's H/N heads (wq_b rows,
    sinks) and G/N output groups (wo_a rows, wo_b input columns), their wo_b partial sums added over
    ranks in fp32; wq_a, wkv, the norms, compressor and indexer are whole on every rank (the window and
    compressed caches are replicated)."""

    def __init__(self, args, layer: V41Layer, dtype: torch.dtype, layout: Layout = Layout()):
        super().__init__()
        tp, split = layout.tp, None if layout.single else 0
        self.layer, self.ratio = layer, layer.compress_ratio
        self.n_heads, self.head_dim, self.window = args.n_heads // tp, args.head_dim, args.window_size
        self.o_groups = args.o_groups // tp
        self.attn_sink = nn.Parameter(torch.zeros(self.n_heads), requires_grad=False)
        self.param_splits = {} if layout.single else {"attn_sink": 0}  # reference/model.py Transformer.shard_plan
        self.wq_a = v41_linear(args, args.dim, args.q_lora_rank, dtype)
        self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps, dtype)
        self.wq_b = v41_linear(args, args.q_lora_rank, self.n_heads * args.head_dim, dtype, split=split)
        self.wkv = v41_linear(args, args.dim, args.head_dim, dtype)
        self.kv_norm = RMSNorm(args.head_dim, args.norm_eps, dtype)
        self.wo_a = v41_linear(args, args.n_heads * args.head_dim // args.o_groups,
                               self.o_groups * args.o_lora_rank, dtype, split=split)
        self.wo_b = v41_linear(args, self.o_groups * args.o_lora_rank, args.dim, dtype,
                               split=None if layout.single else 1)
        if layer.is_kv_source:
            self.compressor = CSA2Compressor(args, self.ratio, dtype)
        if layer.is_index_source:
            self.indexer = CSA2Indexer(args, layer, dtype)
        self.rope_args = (args, not layer.sliding_only)  # compress RoPE (+ YaRN) on compressed layers

    def forward(self, x: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        """x [N, dim] packed tokens of `batch` -> [N, dim]."""
        me, cache = self.layer.layer_id, batch.cache
        inv_freq = rope_table(*self.rope_args, None if x.device.type == "cpu" else x.device)
        q_lat = self.q_norm(self.wq_a(x))
        # V4.1 has no per-head RMSNorm of q (V4 has one)
        q = self.ops.apply_rope(self.wq_b(q_lat).unflatten(-1, (self.n_heads, self.head_dim)),
                                *batch.rope(inv_freq, heads=True))
        kv = quant.window_kv(self.ops.apply_rope(self.kv_norm(self.wkv(x)), *batch.rope(inv_freq)))
        cache.write(me, "kv", batch.seq, batch.positions, kv)
        seq_col, key_pos, valid = batch.window(self.window)
        sources = [rows_of(cache, me, "kv", seq_col, key_pos, valid, (self.head_dim,), q.dtype)]
        if self.ratio:
            src = self.layer.kv_source
            if self.layer.is_kv_source:
                self._publish(x, batch, inv_freq)
            count = batch.entry_span(self.ratio)
            if self.layer.is_index_source:
                ctx.topk = (self.indexer.select(x, q_lat, batch, src, self.ratio, count, inv_freq, ctx)
                            if count else None)
            if count and ctx.topk is not None:
                _, ids, usable = batch.entries(self.ratio, count)
                pool, rows = rows_of(cache, src, "c:ent", seq_col, ids, usable, (self.head_dim,), q.dtype)
                top = ctx.topk
                sources.append((pool, torch.gather(rows, 1, top.clamp(min=0)).masked_fill_(top < 0, -1)))
        o = self.ops.sparse_attn_paged(q, sources, self.attn_sink, self.head_dim ** -0.5)
        o = self.ops.apply_rope(o, *batch.rope(inv_freq, heads=True), inverse=True)
        y = self.wo_b(self._grouped_wo_a(o.reshape(o.shape[0], self.o_groups, -1)))
        # tensor parallel: this rank's groups' partial output, summed over ranks in fp32 and rounded once
        return y if self.comm.world == 1 else self.comm.all_reduce(y.float()).to(y.dtype)

    def _grouped_wo_a(self, o: torch.Tensor) -> torch.Tensor:
        """V4's grouped wo_a (reference/attention.py) on o [N, G, d]; an FP8 32x32 wo_a on a table with an
        fp8_linear kernel: each group's rows (whole 32-row scale blocks) through it with block=32, as
        Fp8Linear32.forward (the twins' table: dequantised per call, as V4's reads a non-128 format)."""
        G, lin = self.o_groups, self.wo_a
        r = lin.out_features // G
        if (lin.fmt != "fp8_32" or "fp8_linear" not in self.ops.kernels or r % DENSE_BLOCK
                or lin.__dict__.get("_dequantized") is not None):
            return Attention._grouped_wo_a(self, o)
        groups = lin.__dict__.get("_groups")
        if groups is None or groups[0][0].data_ptr() != lin.weight.data_ptr():  # views, made once
            b = r // DENSE_BLOCK  # scale rows per group
            groups = lin.__dict__["_groups"] = [(lin.weight[g * r:(g + 1) * r], lin.scale[g * b:(g + 1) * b])
                                                for g in range(G)]
        return torch.cat([self.ops.fp8_linear(o[:, g], w, s, block=DENSE_BLOCK) for g, (w, s) in enumerate(groups)], -1)

    def _publish(self, x: torch.Tensor, batch: Batch, inv_freq: torch.Tensor) -> None:
        """KV source: store the group's entries and indexer keys that this batch closes."""
        got = self.compressor.latents(x, batch, self.layer.layer_id)
        if got is None:
            return
        seq, ids, latent = got
        cos, sin = ref.rope_cos_sin(self.ratio * ids, inv_freq)
        me = self.layer.layer_id
        batch.cache.write(me, "c:key", seq, ids, self.indexer.keys(latent, cos, sin))
        batch.cache.write(me, "c:ent", seq, ids, quant.compressed_kv(self.ops.apply_rope(latent, cos, sin)))
