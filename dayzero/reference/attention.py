"""Attention of every layer type (v4-architecture.md 3.3-3.8), with incremental state.

Every layer attends to a 128-token sliding window (the current token included). CSA layers add
compressed entries at ratio r=4 built from overlapping 2r-token windows and pick the top-k of
them with the lightning indexer; HCA layers add non-overlapping ratio-r entries and attend to all
closed ones. Entry i is closed once token r*i + r - 1 is processed, is usable by query t iff
i < (t + 1) // r, and is rotated at position r*i.

A forward call processes S new tokens at absolute positions start_pos .. start_pos+S-1 on top of
an `AttnState`; one call over a whole prompt and many calls over its pieces give the same result.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dayzero.config import ModelArgs
from dayzero.ops import ref
from dayzero.reference.layers import Linear, RMSNorm


@dataclass
class CompressorState:
    """buf: projected rows (kv, gate + ape) of the open window, fp32 [B, n < r, width];
    prev: first half of the last closed window's rows (CSA overlap), fp32 [B, r, width/2];
    entries: all closed entries so far [B, T, head], rope and quantisation simulation applied."""
    buf_kv: torch.Tensor | None = None
    buf_gate: torch.Tensor | None = None
    prev_kv: torch.Tensor | None = None
    prev_gate: torch.Tensor | None = None
    entries: torch.Tensor | None = None


@dataclass
class AttnState:
    window: torch.Tensor | None = None  # last (window - 1) kv rows [B, n, head_dim]
    compressor: CompressorState = field(default_factory=CompressorState)
    indexer: CompressorState = field(default_factory=CompressorState)


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

    def forward(self, x: torch.Tensor, start_pos: int, st: CompressorState,
                inv_freq: torch.Tensor) -> torch.Tensor:
        """Consume x [B,S,dim]; append newly closed entries to st.entries; return all entries."""
        B, S, _ = x.shape
        r, C = self.ratio, self.head_dim
        kv = self.wkv(x.float())
        gate = self.wgate(x.float()) + self.ape[(start_pos + torch.arange(S, device=x.device)) % r]
        if st.buf_kv is not None:
            kv, gate = torch.cat([st.buf_kv, kv], 1), torch.cat([st.buf_gate, gate], 1)
        first_entry = 0 if st.entries is None else st.entries.shape[1]
        n = kv.shape[1] // r
        st.buf_kv, st.buf_gate = kv[:, n * r:], gate[:, n * r:]
        if st.entries is None:
            st.entries = x.new_zeros(B, 0, C)
        if n == 0:
            return st.entries
        kv, gate = kv[:, :n * r].unflatten(1, (n, r)), gate[:, :n * r].unflatten(1, (n, r))
        if self.overlap:
            prev_kv = kv.new_zeros(B, 1, r, C) if st.prev_kv is None else st.prev_kv[:, None]
            prev_gate = gate.new_full((B, 1, r, C), float("-inf")) if st.prev_gate is None else st.prev_gate[:, None]
            prev_kv = torch.cat([prev_kv, kv[:, :-1, :, :C]], 1)
            prev_gate = torch.cat([prev_gate, gate[:, :-1, :, :C]], 1)
            st.prev_kv, st.prev_gate = kv[:, -1, :, :C], gate[:, -1, :, :C]
            kv = torch.cat([prev_kv, kv[..., C:]], 2)
            gate = torch.cat([prev_gate, gate[..., C:]], 2)
        entries = self.norm(ref.compress_pool(kv, gate).to(x.dtype))
        cos, sin = ref.rope_cos_sin(r * (first_entry + torch.arange(n, device=x.device)), inv_freq)
        entries = ref.apply_rope(entries, cos, sin)
        if self.official:
            if self.rotate:
                entries = ref.fp4_act_sim(ref.hadamard(entries), 32)
            else:
                entries = _fp8_nope_sim(entries, self.rope_dim)
        st.entries = torch.cat([st.entries, entries], 1)
        return st.entries


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

    def forward(self, x: torch.Tensor, q_lat: torch.Tensor, positions: torch.Tensor, start_pos: int,
                st: CompressorState, inv_freq: torch.Tensor) -> torch.Tensor:
        """-> compressed-entry ids [B, S, k] per query, -1 where fewer usable entries exist."""
        B, S, _ = x.shape
        keys = self.compressor(x, start_pos, st, inv_freq)
        q = self.wq_b(q_lat).unflatten(-1, (self.n_heads, self.head_dim))
        cos, sin = ref.rope_cos_sin(positions, inv_freq)
        q = ref.apply_rope(q, cos[:, None], sin[:, None])
        if self.official:
            q = ref.fp4_act_sim(ref.hadamard(q), 32)
        w = self.weights_proj(x).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        scores = ref.indexer_scores(q, keys, w)
        T = keys.shape[1]
        usable = torch.arange(T, device=x.device)[None, :] < ((positions + 1) // self.ratio)[:, None]  # [S, T]
        scores = scores.masked_fill(~usable, float("-inf"))
        # stable descending sort: ties (e.g. entries whose every head's ReLU is 0) go to the lower
        # index, so the selection does not depend on how the sequence was split into calls
        top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :min(self.topk, T)]
        ok = torch.gather(usable.expand(B, S, T), 2, top)
        return torch.where(ok, top, -1)


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

    def forward(self, x: torch.Tensor, start_pos: int, st: AttnState) -> torch.Tensor:
        B, S, _ = x.shape
        positions = start_pos + torch.arange(S, device=x.device)
        inv_freq = self.inv_freq_cpu.to(x.device)
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

        # window part: rows of positions start_pos - n_old .. start_pos + S - 1
        old = st.window if st.window is not None else kv.new_zeros(B, 0, self.head_dim)
        rows = torch.cat([old, kv], 1)
        base = start_pos - old.shape[1]
        st.window = rows[:, max(rows.shape[1] - (self.window - 1), 0):]
        key_pos = positions[:, None] - self.window + 1 + torch.arange(self.window, device=x.device)[None, :]
        idx = torch.where((key_pos >= 0) & (key_pos >= base), key_pos - base, -1)
        idx = idx.expand(B, S, self.window)

        if self.layer_type != "sliding":
            entries = self.compressor(x, start_pos, st.compressor, inv_freq)
            T = entries.shape[1]
            if self.layer_type == "csa":
                cidx = self.indexer(x, q_lat, positions, start_pos, st.indexer, inv_freq)
            else:
                ids = torch.arange(T, device=x.device)[None, :]
                cidx = torch.where(ids < ((positions + 1) // self.ratio)[:, None], ids, -1).expand(B, S, T)
            cidx = torch.where(cidx >= 0, cidx + rows.shape[1], -1)
            idx = torch.cat([idx, cidx], -1)
            rows = torch.cat([rows, entries.to(rows.dtype)], 1)

        o = ref.sparse_attn(q, rows, self.attn_sink, idx, self.head_dim ** -0.5)
        o = ref.apply_rope(o, cos[:, None], sin[:, None], inverse=True)
        o = o.reshape(B, S, self.o_groups, -1)
        wo_a = self.wo_a.dequant(o.dtype).view(self.o_groups, -1, o.shape[-1])
        o = torch.einsum("bsgd,grd->bsgr", o, wo_a).flatten(2)
        return self.wo_b(o)
