"""Attention of every layer type (v4-architecture.md 3.3-3.8).

Every layer attends to a sliding window of `window` tokens (the current one included). CSA layers
add compressed entries at ratio r=4 built from overlapping 2r-token windows and pick the top-k of
them with the lightning indexer; HCA layers add non-overlapping ratio-r entries and attend to all
closed ones. Entry i is closed once token r*i + r - 1 is processed, is usable by query t iff
i < (t + 1) // r, and is rotated at position r*i.

Tokens arrive packed ([N, dim]) with one `Segment` per sequence; all state lives in the segment's
`SeqCache`, addressed by position (see seqcache.py), so any split of a sequence into calls gives
the same result as one call.
"""
from __future__ import annotations

import torch
from torch import nn

from dayzero.config import ModelArgs
from dayzero.ops import ref
from dayzero.reference.layers import Linear, RMSNorm
from dayzero.reference.seqcache import Segment


def rope_table(args: ModelArgs, compressed: bool) -> torch.Tensor:
    """Sliding-only layers: base rope_theta, no YaRN; CSA/HCA layers: compress_rope_theta + YaRN."""
    if not compressed:
        return ref.rope_inv_freq(args.rope_head_dim, args.rope_theta)
    return ref.rope_inv_freq(args.rope_head_dim, args.compress_rope_theta, args.rope_factor,
                             args.original_seq_len, args.beta_fast, args.beta_slow)


class Compressor(nn.Module):
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

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [N, dim] -> fp32 rows [N, 2, width]: (kv, gate + ape[position mod r])."""
        kv = self.wkv(x.float())
        gate = self.wgate(x.float()) + self.ape[positions % self.ratio]
        return torch.stack([kv, gate], 1)

    def update(self, rows: torch.Tensor, seg: Segment, layer: int, kind: str, inv_freq: torch.Tensor,
               dtype: torch.dtype) -> int:
        """Store the segment's rows, build the entries its tokens close; return the number of
        closed entries after the segment."""
        r, C, n = self.ratio, self.head_dim, seg.start_pos
        dev = rows.device
        cache = seg.cache
        cache.write(layer, "rows:" + kind, n + torch.arange(seg.length, device=dev), rows)
        first, end = n // r, (n + seg.length) // r
        if end == first:
            return end
        lo = max(first - 1, 0) if self.overlap else first
        stored = cache.read(layer, "rows:" + kind, torch.arange(lo * r, end * r, device=dev)).float()
        win = stored.unflatten(0, (end - lo, r))  # [windows, r, 2, width]
        kv, gate = win[:, :, 0], win[:, :, 1]
        if self.overlap:  # slots: previous window's first half, then the own window's second half
            prev_kv, prev_gate = kv[:, :, :C], gate[:, :, :C]
            if lo == first:  # entry 0: no previous window
                prev_kv = torch.cat([torch.zeros_like(prev_kv[:1]), prev_kv], 0)
                prev_gate = torch.cat([torch.full_like(prev_gate[:1], float("-inf")), prev_gate], 0)
            kv = torch.cat([prev_kv[:-1], kv[1 if lo < first else 0:, :, C:]], 1)
            gate = torch.cat([prev_gate[:-1], gate[1 if lo < first else 0:, :, C:]], 1)
        entries = self.norm(ref.compress_pool(kv, gate).to(dtype))
        ids = torch.arange(first, end, device=dev)
        cos, sin = ref.rope_cos_sin(r * ids, inv_freq)
        entries = ref.apply_rope(entries, cos, sin)
        if self.official:
            if self.rotate:
                entries = ref.fp4_act_sim(ref.hadamard(entries), 32)
            else:
                entries = _fp8_nope_sim(entries, self.rope_dim)
        cache.write(layer, "ent:" + kind, ids, entries)
        return end


def _fp8_nope_sim(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """FP8 simulation of the non-rope dims in blocks of 64; the rope dims stay as they are."""
    return torch.cat([ref.fp8_act_sim(x[..., :-rope_dim], 64), x[..., -rope_dim:]], -1)


class Indexer(nn.Module):
    """Lightning indexer: I[t,s] = sum_h w[t,h] relu(q[t,h] . k[s]), top-k over usable entries."""

    def __init__(self, args: ModelArgs, ratio: int, dtype: torch.dtype, official: bool):
        super().__init__()
        self.n_heads, self.head_dim, self.topk, self.ratio = (
            args.index_n_heads, args.index_head_dim, args.index_topk, ratio)
        self.official = official
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim, args.linear_format, dtype, official)
        self.weights_proj = Linear(args.dim, self.n_heads, "dense", dtype)
        self.compressor = Compressor(args, ratio, self.head_dim, overlap=True, rotate=True,
                                     dtype=dtype, official=official)

    def select(self, x: torch.Tensor, q_lat: torch.Tensor, positions: torch.Tensor, seg: Segment,
               layer: int, inv_freq: torch.Tensor) -> torch.Tensor:
        """One segment's queries -> compressed-entry ids [S, k], -1 where fewer usable entries exist."""
        T = self.compressor.update(self.compressor.project(x, positions), seg, layer, "index", inv_freq, x.dtype)
        if T == 0:
            return torch.empty(seg.length, 0, dtype=torch.long, device=x.device)
        keys = seg.cache.read(layer, "ent:index", torch.arange(T, device=x.device))
        q = self.wq_b(q_lat).unflatten(-1, (self.n_heads, self.head_dim))
        cos, sin = ref.rope_cos_sin(positions, inv_freq)
        q = ref.apply_rope(q, cos[:, None], sin[:, None])
        if self.official:
            q = ref.fp4_act_sim(ref.hadamard(q), 32)
        w = self.weights_proj(x).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        scores = ref.indexer_scores(q[None], keys[None], w[None])[0]  # [S, T]
        usable = torch.arange(T, device=x.device)[None, :] < ((positions + 1) // self.ratio)[:, None]
        scores = scores.masked_fill(~usable, float("-inf"))
        # stable descending sort: ties (e.g. entries whose every head's ReLU is 0) go to the lower
        # index, so the selection does not depend on how the sequence was split into calls
        top = scores.sort(dim=-1, descending=True, stable=True).indices[:, :min(self.topk, T)]
        return torch.where(torch.gather(usable, 1, top), top, -1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, dtype: torch.dtype, official: bool):
        super().__init__()
        self.layer_type = args.layer_type(layer_id)
        ratio = args.compress_ratio(layer_id)
        self.ratio, self.official = ratio, official
        self.n_heads, self.head_dim, self.rope_dim = args.n_heads, args.head_dim, args.rope_head_dim
        self.window, self.eps, self.o_groups = args.window_size, args.norm_eps, args.o_groups
        fmt = args.linear_format
        self.attn_sink = nn.Parameter(torch.zeros(args.n_heads), requires_grad=False)
        self.wq_a = Linear(args.dim, args.q_lora_rank, fmt, dtype, official)
        self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps, dtype)
        self.wq_b = Linear(args.q_lora_rank, args.n_heads * args.head_dim, fmt, dtype, official)
        self.wkv = Linear(args.dim, args.head_dim, fmt, dtype, official)
        self.kv_norm = RMSNorm(args.head_dim, args.norm_eps, dtype)
        self.wo_a = Linear(args.n_heads * args.head_dim // args.o_groups, args.o_groups * args.o_lora_rank,
                           fmt, dtype, official, act_quant=False)
        self.wo_b = Linear(args.o_groups * args.o_lora_rank, args.dim, fmt, dtype, official)
        if self.layer_type != "sliding":
            self.compressor = Compressor(args, ratio, args.head_dim, overlap=self.layer_type == "csa",
                                         rotate=False, dtype=dtype, official=official)
        if self.layer_type == "csa":
            self.indexer = Indexer(args, ratio, dtype, official)
        self.inv_freq_cpu = rope_table(args, self.layer_type != "sliding")  # not a checkpoint tensor
        # the MTP block stores its window row for position p at p + 1, the position of the token it
        # embeds, so a cached block's rows depend only on tokens inside that block (prefix caching)
        self.store_offset = 1 if layer_id >= args.n_layers else 0

    def forward(self, x: torch.Tensor, segs: list[Segment], layer: int) -> torch.Tensor:
        """x [N, dim] packed tokens of `segs` -> [N, dim]."""
        dev = x.device
        positions = torch.cat([s.start_pos + torch.arange(s.length, device=dev) for s in segs])
        inv_freq = self.inv_freq_cpu.to(dev)
        cos, sin = ref.rope_cos_sin(positions, inv_freq)
        q_lat = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_lat).unflatten(-1, (self.n_heads, self.head_dim))
        if self.official:  # the reference normalises in the activation dtype
            q = q * torch.rsqrt(q.square().mean(-1, keepdim=True) + self.eps)
        else:
            q = ref.rms_norm(q, None, self.eps)
        q = ref.apply_rope(q, cos[:, None], sin[:, None])
        kv = ref.apply_rope(self.kv_norm(self.wkv(x)), cos, sin)
        if self.official:
            kv = _fp8_nope_sim(kv, self.rope_dim)
        rows = self.compressor.project(x, positions) if self.layer_type != "sliding" else None
        o = torch.cat([self._attend(q[s.rows], kv[s.rows], None if rows is None else rows[s.rows],
                                    x[s.rows], q_lat[s.rows], positions[s.rows], s, layer, inv_freq)
                       for s in segs])
        o = ref.apply_rope(o, cos[:, None], sin[:, None], inverse=True)
        o = o.flatten(1).unflatten(-1, (self.o_groups, -1))
        wo_a = self.wo_a.dequant(o.dtype).view(self.o_groups, -1, o.shape[-1])
        o = torch.einsum("ngd,grd->ngr", o, wo_a).flatten(1)
        return self.wo_b(o)

    def _attend(self, q, kv, rows, x, q_lat, positions, seg: Segment, layer: int, inv_freq) -> torch.Tensor:
        """One sequence: store its window rows, build its compressed entries, attend."""
        dev, S, w, n = q.device, seg.length, self.window, seg.start_pos
        off = self.store_offset
        seg.cache.write(layer, "kv", positions + off, kv)
        lo = max(n - w + 1, 0)  # oldest position any query of the segment sees
        keys = seg.cache.read(layer, "kv", torch.arange(lo, n + S, device=dev) + off)
        key_pos = positions[:, None] - w + 1 + torch.arange(w, device=dev)[None, :]  # [S, w]
        idx = torch.where(key_pos >= 0, key_pos - lo, -1)
        if self.layer_type != "sliding":
            T = self.compressor.update(rows, seg, layer, "attn", inv_freq, q.dtype)
            if self.layer_type == "csa":  # always: its own compressor consumes the segment's rows
                cidx = self.indexer.select(x, q_lat, positions, seg, layer, inv_freq)
            else:
                ids = torch.arange(T, device=dev)[None, :]
                cidx = torch.where(ids < ((positions + 1) // self.ratio)[:, None], ids, -1)
            if T > 0:
                entries = seg.cache.read(layer, "ent:attn", torch.arange(T, device=dev))
                idx = torch.cat([idx, torch.where(cidx >= 0, cidx + keys.shape[0], -1)], -1)
                keys = torch.cat([keys, entries.to(keys.dtype)], 0)
        return ref.sparse_attn(q[None], keys[None], self.attn_sink, idx[None], self.head_dim ** -0.5)[0]
