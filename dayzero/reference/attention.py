"""Attention of every layer type (v4-architecture.md 3.3-3.8).

Every layer attends to a sliding window of `window` tokens (the current one included). CSA layers
add compressed entries at ratio r=4 built from overlapping 2r-token windows and pick the top-k of
them with the lightning indexer; HCA layers add non-overlapping ratio-r entries and attend to all
closed ones. Entry i is closed once token r*i + r - 1 is processed, is usable by query t iff
i < (t + 1) // r, and is rotated at position r*i.

Tokens of several sequences arrive packed ([N, dim], a `Batch`); all state lives in the batch's
cache, addressed by (sequence, position) (see seqcache.py), so any split of a sequence into calls
gives the same result as one call. Every query gathers its own keys: its window rows and the
compressed entries it may use.
"""
from __future__ import annotations

import torch
from torch import nn

from dayzero.config import ModelArgs
from dayzero.distributed.layout import Layout
from dayzero.ops import OpTable, ref
from dayzero.ops.cpu import lookup
from dayzero.reference.layers import Linear, RMSNorm, UsesOps, fused_pair
from dayzero.reference.seqcache import Batch, BatchCache


_ROPE_TABLES: dict[tuple, torch.Tensor] = {}


def rope_table(args: ModelArgs, compressed: bool, device: torch.device | None = None) -> torch.Tensor:
    """Sliding-only layers: base rope_theta, no YaRN; CSA/HCA layers: compress_rope_theta + YaRN.
    One shared (read-only) tensor per distinct table and device, so every layer of a kind rotates
    with the same object and a batch computes its cos/sin once per table (Batch.rope)."""
    params = ((args.rope_head_dim, args.rope_theta) if not compressed else
              (args.rope_head_dim, args.compress_rope_theta, args.rope_factor, args.original_seq_len,
               args.beta_fast, args.beta_slow))
    key = (params, str(device or "cpu"))
    table = _ROPE_TABLES.get(key)
    if table is None:
        table = ref.rope_inv_freq(*params)
        _ROPE_TABLES[key] = table = table if device is None else table.to(device)
    return table


def gather(cache: BatchCache, layer: int, kind: str, seq: torch.Tensor, index: torch.Tensor,
           valid: torch.Tensor, row: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rows index[...] of sequences seq[...] where valid, zeros elsewhere: [*index.shape, *row]."""
    out = torch.zeros(*index.shape, *row, dtype=dtype, device=index.device)
    if valid.any():
        out[valid] = cache.read(layer, kind, seq.expand_as(index)[valid], index[valid]).to(dtype)
    return out


def rows_of(cache: BatchCache, layer: int, kind: str, seq: torch.Tensor, index: torch.Tensor,
            valid: torch.Tensor, row: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows index[n, k] of sequence seq[n] as (pool [P, *row], idx [N, K] with -1 where not valid)
    for the paged ops: the cache's own pool where it has one (`locate_rows`), else a gathered copy."""
    if hasattr(cache, "locate_rows"):
        return cache.locate_rows(layer, kind, seq, index, valid)
    keys = gather(cache, layer, kind, seq, index, valid, row, dtype)
    idx = torch.arange(index.numel(), device=index.device).view(index.shape)
    return keys.flatten(0, 1), torch.where(valid, idx, -1)


class Compressor(UsesOps, nn.Module):
    """Gated pooling of r-token windows into one `head_dim` entry. `overlap` (CSA): projections
    are 2*head_dim wide; rows [:head_dim] feed the NEXT window's entry, rows [head_dim:] the own
    window's, and an entry pools 2r slots with one softmax. `rotate` (indexer keys): Hadamard +
    FP4 simulation instead of the FP8 simulation of the nope dims (official numerics only)."""

    def __init__(self, args: ModelArgs, ratio: int, head_dim: int, overlap: bool, rotate: bool,
                 dtype: torch.dtype, official: bool):
        super().__init__()
        self.ratio, self.head_dim, self.overlap, self.rotate = ratio, head_dim, overlap, rotate
        self.rope_dim, self.official = args.rope_head_dim, official
        width = head_dim * (2 if overlap else 1)
        self.wkv = Linear(args.dim, width, "dense", dtype)
        self.wgate = Linear(args.dim, width, "dense", dtype)
        self.ape = nn.Parameter(torch.zeros(ratio, width), requires_grad=False)
        self.norm = RMSNorm(head_dim, args.norm_eps, dtype)

    def project(self, x: torch.Tensor, phase: torch.Tensor, x32: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, dim], phase [N] = position mod r (Batch.phase), x32: x.float() where the caller
        has it -> rows [N, 2, width]: (kv, gate + ape[phase]), computed in fp32 and
        kept fp32 under official numerics (DeepSeek's reference keeps fp32 compressor state),
        rounded to the activation dtype otherwise (transformers projects in the model dtype and
        keeps its compressor buffer so): the dtype the cache stores them in (cache/spec.py)."""
        rows_dtype = torch.float32 if self.official else x.dtype
        x = x.float() if x32 is None else x32
        both = self.__dict__.get("_wkv_wgate")  # inference: one GEMM for both projections
        if both is not None and not torch.is_grad_enabled():
            rows = self.ops.fp32_linear(x, both)
            width = rows.shape[1] // 2
            # gate += ape[phase] in place (no write-back copy): one native call under the CPU table
            if not (_native_glue(self.ops) and lookup.add_rows_at(rows, width, self.ape, phase)):
                rows[:, width:].add_(self.ape.index_select(0, phase))
            rows = rows.view(rows.shape[0], 2, width)
            return rows if rows.dtype == rows_dtype else rows.to(rows_dtype)
        kv = self.wkv(x)
        gate = self.wgate(x) + self.ape.index_select(0, phase)
        return torch.stack([kv, gate], 1).to(rows_dtype)

    def fuse_projections(self, dtype: torch.dtype | None = None) -> None:
        """Keep wkv and wgate stacked (a copy in `dtype`, default their storage dtype; the
        checkpoint tensors stay) so that inference projects with one fp32 GEMM. Both are dense
        and small (dim x 2 * head_dim each)."""
        w = torch.cat([self.wkv.weight, self.wgate.weight])
        self.__dict__["_wkv_wgate"] = w if dtype is None else w.to(dtype)

    def update(self, rows: torch.Tensor, batch: Batch, layer: int, kind: str, inv_freq: torch.Tensor,
               dtype: torch.dtype) -> None:
        """Store the batch's rows, build the entries its tokens close."""
        r, C, cache = self.ratio, self.head_dim, batch.cache
        cache.write(layer, "rows:" + kind, batch.seq, batch.positions, rows)
        closing = batch.closing(r, self.overlap)
        if closing is None:  # no window closes in this batch (most decode steps)
            return
        seq, ids, row_seq, row_pos, missing = closing
        win = cache.read(layer, "rows:" + kind, row_seq, row_pos).float()
        win = win.unflatten(0, (ids.shape[0], -1))  # [E, span, 2, width]
        if self.overlap:  # slots: the previous window's first half, then the own window's second half
            prev = torch.arange(2 * r, device=win.device)[:, None] < r
            kv = torch.where(prev, win[:, :, 0, :C], win[:, :, 0, C:]).masked_fill_(missing, 0)
            gate = torch.where(prev, win[:, :, 1, :C], win[:, :, 1, C:]).masked_fill_(missing, float("-inf"))
        else:
            kv, gate = win[:, :, 0], win[:, :, 1]
        entries = self.norm(self.ops.compress_pool(kv, gate).to(dtype))
        entries = self.ops.apply_rope(entries, *batch.closing_rope(r, self.overlap, inv_freq))
        if self.official:
            if self.rotate:
                entries = self.ops.hadamard_fp4_sim(entries, 32)
            else:
                entries = _fp8_nope_sim(self.ops, entries, self.rope_dim)
        cache.write(layer, "ent:" + kind, seq, ids, entries)


def _native_glue(ops: OpTable) -> bool:
    """Whether the step's integer/copy glue may call lookup.c directly: only under the CPU op table,
    whose steps run eagerly (a recorded step, engine/graphs.py, must see every op; other devices
    keep the PyTorch ops)."""
    return ops.name == "cpu"


def _fp8_nope_sim(ops: OpTable, x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """FP8 simulation of the non-rope dims in blocks of 64; the rope dims stay as they are: the
    table's fused kernel where it has one (bit-exact with ref.fp8_nope_sim), else its fp8_act_sim."""
    if "fp8_nope_sim" in ops.fused:
        return ops.fp8_nope_sim(x, rope_dim, 64)
    return torch.cat([ops.fp8_act_sim(x[..., :-rope_dim], 64), x[..., -rope_dim:]], -1)


class Indexer(UsesOps, nn.Module):
    """Lightning indexer: I[t,s] = sum_h w[t,h] relu(q[t,h] . k[s]), top-k over usable entries.

    Training only (indexer distillation, scripts/indexer_distill.py): when `capture` is a list,
    each call appends {"layer", "positions", "usable" [N, T], "scores" [N, T] (pre-top-k, with
    grad to the indexer's own parameters; x and q_lat enter detached)} and the layer's Attention
    adds "target" [N, T], the detached dense attention over every usable entry. None (the
    default) changes nothing."""
    capture: list | None = None

    def __init__(self, args: ModelArgs, ratio: int, dtype: torch.dtype, official: bool):
        super().__init__()
        self.n_heads, self.head_dim, self.topk, self.ratio = (
            args.index_n_heads, args.index_head_dim, args.index_topk, ratio)
        self.official = official
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim, args.linear_format, dtype, official)
        self.weights_proj = Linear(args.dim, self.n_heads, "dense", dtype)
        self.compressor = Compressor(args, ratio, self.head_dim, overlap=True, rotate=True,
                                     dtype=dtype, official=official)

    def select(self, x: torch.Tensor, q_lat: torch.Tensor, batch: Batch, layer: int,
               inv_freq: torch.Tensor, x32: torch.Tensor | None = None) -> torch.Tensor:
        """Each query's compressed-entry ids [N, k], -1 where fewer usable entries exist (x32:
        x.float() where the caller has it)."""
        positions, dev = batch.positions, x.device
        if self.capture is not None:
            x, q_lat, x32 = x.detach(), q_lat.detach(), None
        rows = self.compressor.project(x, batch.phase(self.ratio), x32)
        self.compressor.update(rows, batch, layer, "index", inv_freq, x.dtype)
        T = batch.entry_span(self.ratio)
        if T == 0:
            if self.capture is not None:
                none = torch.zeros(x.shape[0], 0, device=dev)
                self.capture.append({"layer": layer, "positions": positions, "usable": none.bool(), "scores": none})
            return torch.empty(x.shape[0], 0, dtype=torch.long, device=dev)
        seq_col, ids, usable = batch.entries(self.ratio, T)  # [N, T]
        pool, rows = rows_of(batch.cache, layer, "ent:index", seq_col, ids, usable, (self.head_dim,), x.dtype)
        q = self.wq_b(q_lat)
        q = q.view(q.shape[0], self.n_heads, self.head_dim)
        q = self.ops.apply_rope(q, *batch.rope(inv_freq, heads=True))
        if self.official:
            q = self.ops.hadamard_fp4_sim(q, 32)
        w = self.weights_proj(x).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        scores = self.ops.indexer_scores_paged(q, w, pool, rows)  # [N, T], -inf where not usable
        if self.capture is not None:
            self.capture.append({"layer": layer, "positions": positions, "usable": usable, "scores": scores})
        # the order of a stable descending sort: ties (e.g. entries whose every head's ReLU is 0)
        # go to the lower index, so the selection does not depend on how the sequence was split
        # into calls; -1 where the pick scores -inf (not usable)
        return self.ops.topk_select(scores, self.topk)


class Attention(UsesOps, nn.Module):
    """Tensor parallel (`layout.tp` = N > 1): this rank's H/N heads (wq_b rows, sinks) and G/N
    output groups (wo_a rows, wo_b input columns); the rest is replicated, and the partial wo_b
    outputs are summed over ranks (distributed/layout.py)."""

    def __init__(self, args: ModelArgs, layer_id: int, dtype: torch.dtype, official: bool,
                 layout: Layout = Layout()):
        super().__init__()
        self.layer_type = args.layer_type(layer_id)
        ratio = args.compress_ratio(layer_id)
        self.ratio, self.official = ratio, official
        tp = layout.tp
        self.n_heads, self.head_dim, self.rope_dim = args.n_heads // tp, args.head_dim, args.rope_head_dim
        self.window, self.eps, self.o_groups = args.window_size, args.norm_eps, args.o_groups // tp
        fmt = args.linear_format
        split = None if layout.single else 0  # slices along dim 0 (rows), 1 (columns) when sharded
        self.attn_sink = nn.Parameter(torch.zeros(self.n_heads), requires_grad=False)
        self.param_splits = {} if layout.single else {"attn_sink": 0}  # see Transformer.shard_plan
        self.wq_a = Linear(args.dim, args.q_lora_rank, fmt, dtype, official)
        self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps, dtype)
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * args.head_dim, fmt, dtype, official, split=split)
        self.wkv = Linear(args.dim, args.head_dim, fmt, dtype, official)
        self.kv_norm = RMSNorm(args.head_dim, args.norm_eps, dtype)
        self.wo_a = Linear(args.n_heads * args.head_dim // args.o_groups, self.o_groups * args.o_lora_rank,
                           fmt, dtype, official, act_quant=False, split=split)
        self.wo_a.reads_dequant = True  # _grouped_wo_a reads dequant() (a kept copy), not forward
        self.wo_b = Linear(self.o_groups * args.o_lora_rank, args.dim, fmt, dtype, official,
                           split=None if layout.single else 1)
        if self.layer_type != "sliding":
            self.compressor = Compressor(args, ratio, args.head_dim, overlap=self.layer_type == "csa",
                                         rotate=False, dtype=dtype, official=official)
        if self.layer_type == "csa":
            self.indexer = Indexer(args, ratio, dtype, official)
        self.args_rope = (args, self.layer_type != "sliding")  # the RoPE table's inputs (not a checkpoint tensor)
        self.inv_freq_cpu = rope_table(*self.args_rope)
        # the MTP block stores its window row for position p at p + 1, the position of the token it
        # embeds, so a cached block's rows depend only on tokens inside that block (prefix caching)
        self.store_offset = 1 if layer_id >= args.n_layers else 0

    def forward(self, x: torch.Tensor, batch: Batch, layer: int) -> torch.Tensor:
        """x [N, dim] packed tokens of `batch` -> [N, dim]."""
        dev, positions, seq, cache = x.device, batch.positions, batch.seq, batch.cache
        inv_freq = self.inv_freq_cpu if dev.type == "cpu" else rope_table(*self.args_rope, dev)
        cos, sin = batch.rope(inv_freq)
        q_lat, kv = fused_pair(self.wq_a, self.wkv, x)
        q_lat = self.q_norm(q_lat)
        q = self.wq_b(q_lat)
        q = q.view(q.shape[0], self.n_heads, self.head_dim)
        if self.official:  # the reference normalises in the activation dtype (ref.act_rms_norm)
            q = self.ops.act_rms_norm(q, self.eps)
        else:
            q = self.ops.rms_norm(q, None, self.eps)
        q = self.ops.apply_rope(q, *batch.rope(inv_freq, heads=True))
        kv = self.ops.apply_rope(self.kv_norm(kv), cos, sin)
        if self.official:
            kv = _fp8_nope_sim(self.ops, kv, self.rope_dim)

        # the window: positions p - w + 1 .. p of the query's own sequence
        off = self.store_offset
        cache.write(layer, "kv", seq, batch.stored(off), kv)
        seq_col, key_pos, valid = batch.window(self.window, off)
        sources = [rows_of(cache, layer, "kv", seq_col, key_pos, valid, (self.head_dim,), q.dtype)]
        if self.layer_type != "sliding":
            x32 = x.float()  # both compressors of a CSA layer project it
            rows = self.compressor.project(x, batch.phase(self.ratio), x32)
            self.compressor.update(rows, batch, layer, "attn", inv_freq, q.dtype)
            # every closed entry the query may use (the same lookup as the indexer's keys)
            _, ids, usable = batch.entries(self.ratio, batch.entry_span(self.ratio))
            pool, rows = rows_of(cache, layer, "ent:attn", seq_col, ids, usable, (self.head_dim,), q.dtype)
            if self.layer_type == "csa":  # always: its own compressor consumes the batch's rows
                top = self.indexer.select(x, q_lat, batch, layer, inv_freq, x32)  # [N, k] entry ids, -1 = none
                if self.indexer.capture is not None:
                    self.indexer.capture[-1]["target"] = self.entry_target(q, sources[0], batch, layer)
                if _native_glue(self.ops):  # rows[n, top[n, j]], -1 where top is -1, in one call
                    rows = lookup.pick_rows(rows, top)
                else:
                    rows = torch.gather(rows, 1, top.clamp(min=0)).masked_fill_(top < 0, -1)
            sources.append((pool, rows))
        o = self.ops.sparse_attn_paged(q, sources, self.attn_sink, self.head_dim ** -0.5)
        o = self.ops.apply_rope(o, *batch.rope(inv_freq, heads=True), inverse=True)
        return self.output(o)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """o [N, H, D] (this rank's heads, rope undone) -> [N, dim]: the grouped wo_a, wo_b, and
        under tensor parallel the ranks' partial sums added in fp32 (a bf16 sum would round at
        every step of the reduction), rounded once to the compute dtype."""
        y = self.wo_b(self._grouped_wo_a(o.reshape(o.shape[0], self.o_groups, -1)))  # heads -> groups
        if self.comm.world == 1:
            return y
        return self.comm.all_reduce(y.float()).to(y.dtype)

    def _grouped_wo_a(self, o: torch.Tensor) -> torch.Tensor:
        """The grouped low-rank output projection: group g of o [N, G, d] through rows
        g*r .. (g+1)*r of wo_a -> [N, G*r]. FP8 weights without a dequantised copy go through the
        table's fp8_linear one group at a time (each group's rows are whole 128-row scale blocks), or
        its fp8_linear_grouped kernel where it has one (all groups in one call, the same results)."""
        G, lin = self.o_groups, self.wo_a
        if lin.fmt != "fp8" or lin.__dict__.get("_dequantized") is not None or lin.out_features // G % 128:
            w = lin.dequant(o.dtype).view(G, -1, o.shape[-1])
            return torch.cat([ref.linear(o[:, g], w[g]) for g in range(G)], -1)  # rows alike in any batch
        if "fp8_linear_grouped" in self.ops.fused:
            return self.ops.fp8_linear_grouped(o.reshape(o.shape[0], -1), lin.weight, lin.scale, G)
        groups = lin.__dict__.get("_groups")
        if groups is None or groups[0][0].data_ptr() != lin.weight.data_ptr():  # views, made once
            r = lin.out_features // G
            groups = lin.__dict__["_groups"] = [(lin.weight[g * r:(g + 1) * r], lin.scale[g * r // 128:(g + 1) * r // 128])
                                                for g in range(G)]
        return torch.cat([self.ops.fp8_linear(o[:, g], w, s) for g, (w, s) in enumerate(groups)], -1)

    @torch.no_grad()
    def entry_target(self, q: torch.Tensor, window: tuple[torch.Tensor, torch.Tensor], batch: Batch,
                     layer: int) -> torch.Tensor:
        """Training only (indexer distillation): the DENSE attention of each query over its window
        and every usable compressed entry (sink in the denominator), its probabilities on the
        entries summed over heads and L1-normalised -> fp32 [N, T], 0 on unusable entries (and on
        every entry of a query that has none)."""
        positions, dev = batch.positions, q.device
        T = batch.entry_span(self.ratio)
        if T == 0:
            return torch.zeros(q.shape[0], 0, device=dev)
        ids = torch.arange(T, device=dev)[None, :].expand(q.shape[0], T)
        usable = ids < ((positions + 1) // self.ratio)[:, None]
        ent = rows_of(batch.cache, layer, "ent:attn", batch.seq[:, None], ids, usable, (self.head_dim,), q.dtype)
        keys, valid = zip(*(ref.gather_rows(pool, idx) for pool, idx in (window, ent)))
        keys, valid = torch.cat(keys, 1).float(), torch.cat(valid, 1)
        logits = torch.einsum("nhd,nkd->nhk", q.float(), keys) * self.head_dim ** -0.5
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        sink = self.attn_sink.float().view(1, -1, 1).expand(q.shape[0], -1, 1)
        probs = torch.cat([logits, sink], -1).softmax(-1)[..., -T - 1:-1].sum(1)  # entries, summed over heads
        probs = probs.masked_fill(~usable, 0)
        return probs / probs.sum(-1, keepdim=True).clamp(min=1e-30)
