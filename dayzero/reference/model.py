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
from dayzero.distributed.comm import SINGLE, Comm
from dayzero.distributed.layout import Layout
from dayzero.ops import REF, OpTable, ref
from dayzero.reference.attention import Attention
from dayzero.reference.layers import Linear, RMSNorm, UsesOps, fuse_rows, storage_dtype
from dayzero.reference.moe import MoE
from dayzero.reference.seqcache import Batch, DenseBatchCache, DenseSeqCache

NUMERICS = ("official", "transformers")


@dataclass
class ModelState:
    """What a batch of equal-length sequences carries between forward calls of the reference:
    tokens processed so far (main model and MTP) and one position-addressed cache per sequence."""
    pos: int = 0
    mtp_pos: int = 0
    caches: list[DenseSeqCache] = field(default_factory=list)

    def batch(self, batch: int, length: int, start_pos: int, device: torch.device) -> Batch:
        while len(self.caches) < batch:
            self.caches.append(DenseSeqCache())
        return Batch([start_pos] * batch, [length] * batch, DenseBatchCache(self.caches[:batch]), device)


def _f32(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape), requires_grad=False)


class Block(UsesOps, nn.Module):
    """One layer: two mHC sites (attention, MoE) around the residual streams [B, S, hc, dim]."""

    def __init__(self, args: ModelArgs, layer_id: int, official: bool, layout: Layout = Layout()):
        super().__init__()
        dtype = storage_dtype(args.dtype)
        self.layer_id = layer_id
        n, mix = args.hc_mult, (2 + args.hc_mult) * args.hc_mult
        self.hc_mult, self.iters, self.hc_eps, self.norm_eps = n, args.hc_sinkhorn_iters, args.hc_eps, args.norm_eps
        self.attn_norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.attn = Attention(args, layer_id, dtype, official, layout)
        self.ffn = MoE(args, layer_id, dtype, official, layout)
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = _f32(mix, n * args.dim), _f32(mix), _f32(3)
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = _f32(mix, n * args.dim), _f32(mix), _f32(3)

    def _site(self, X: torch.Tensor, fn, scale, base, sublayer) -> torch.Tensor:
        u, post, comb = self.ops.hc_pre(X, fn, scale, base, self.iters, self.norm_eps, self.hc_eps)
        return self.ops.hc_post(sublayer(u), X, post, comb)

    def forward(self, X: torch.Tensor, batch: Batch, input_ids: torch.Tensor) -> torch.Tensor:
        """X [N, hc, dim] streams of packed tokens, input_ids [N] (hash routing)."""
        X = self._site(X, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base,
                       lambda u: self.attn(self.attn_norm(u), batch, self.layer_id))
        return self._site(X, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base,
                          lambda u: self.ffn(self.ffn_norm(u), input_ids))


class HCHead(UsesOps, nn.Module):
    """Final stream collapse (hc_head) -> RMSNorm -> fp32 LM head."""

    def hc_head(self, X: torch.Tensor) -> torch.Tensor:
        if "hc_pre" in self.ops.kernels and not torch.is_grad_enabled():  # the table's hc_pre is a kernel
            return self._hc_head_as_site(X)
        mixes = ref.hc_mixes(X, self.hc_head_fn, self.norm_eps)
        pre = ref.lanewise(torch.sigmoid, mixes * self.hc_head_scale.float() + self.hc_head_base.float()) + self.hc_eps
        return ref.hc_collapse(X, pre)

    def _hc_head_as_site(self, X: torch.Tensor) -> torch.Tensor:
        """hc_head through the table's hc_pre (one kernel call): the head's n rows padded to an
        mHC site's (2+n)n with zeros (scale [s, 0, 0], one Sinkhorn iteration on the unused
        part); the site's `pre` is sigmoid(mixes[:n] * s + base) + eps, the head's formula (fp32
        sums of the projection may differ in order)."""
        n = X.shape[-2]
        pad = self.__dict__.get("_hc_head_pad")
        if pad is None or pad[0].device != X.device:
            fn = self.hc_head_fn.float()
            rows = (2 + n) * n - n
            pad = self.__dict__["_hc_head_pad"] = (
                torch.cat([fn, fn.new_zeros(rows, fn.shape[1])]),
                torch.cat([self.hc_head_scale.float(), fn.new_zeros(2)]),
                torch.cat([self.hc_head_base.float(), fn.new_zeros(rows)]))
        return self.ops.hc_pre(X, *pad, 1, self.norm_eps, self.hc_eps)[0]

    def logits(self, X: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """fp32 logits over the whole vocabulary (a vocab-parallel head's slices gathered)."""
        h = self.norm(self.hc_head(X))
        return self.comm.all_gather(self.ops.fp32_linear(h, head), -1)


class MTPBlock(Block, HCHead):
    """Multi-token prediction (3.11): streams of the main model at position p plus the embedding
    of token p+1 predict token p+2. The embedding and head are shared with the main model."""

    def __init__(self, args: ModelArgs, official: bool, layout: Layout = Layout()):
        super().__init__(args, args.n_layers, official, layout)
        dtype = storage_dtype(args.dtype)
        fmt = args.linear_format
        self.e_proj = Linear(args.dim, args.dim, fmt, dtype, official)
        self.h_proj = Linear(args.dim, args.dim, fmt, dtype, official)
        self.enorm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.hnorm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = (
            _f32(args.hc_mult, args.hc_mult * args.dim), _f32(args.hc_mult), _f32(1))

    def forward(self, X: torch.Tensor, e: torch.Tensor, batch: Batch, input_ids: torch.Tensor) -> torch.Tensor:
        X = self.e_proj(self.enorm(e)).unsqueeze(-2) + self.h_proj(self.hnorm(X))
        return super().forward(X, batch, input_ids)


class Transformer(HCHead, nn.Module):
    """`layout` (distributed/layout.py): this rank's slice of a tensor-parallel model; the default
    is the whole model. A sliced model computes the whole model's outputs once `set_comm` installs
    its process group's collectives."""

    def __init__(self, args: ModelArgs, numerics: str = "official", compute_dtype: torch.dtype = torch.float32,
                 layout: Layout = Layout()):
        super().__init__()
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
        layout.check(args)
        official = numerics == "official"
        self.args, self.numerics, self.compute_dtype, self.layout = args, numerics, compute_dtype, layout
        self.norm_eps, self.hc_eps = args.norm_eps, args.hc_eps
        dtype = storage_dtype(args.dtype)
        self.vocab = layout.part(args.vocab_size)  # this rank's rows of embed and head: [start, stop)
        vocab = self.vocab[1] - self.vocab[0]
        self.embed = nn.Embedding(vocab, args.dim, dtype=dtype)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(args, i, official, layout) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.head = Linear(args.dim, vocab, "dense", dtype, split=None if layout.single else 0)
        self.embed.param_splits = {} if layout.single else {"weight": 0}
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = (
            _f32(args.hc_mult, args.hc_mult * args.dim), _f32(args.hc_mult), _f32(1))
        if args.dspark_stages:  # DSpark takes the mtp.* namespace (reference/dspark.py)
            from dayzero.reference.dspark import DSparkStage
            self.mtp = nn.ModuleList(DSparkStage(args, i, official, layout) for i in range(args.dspark_stages))
        else:
            self.mtp = nn.ModuleList(MTPBlock(args, official, layout) for _ in range(args.n_mtp_layers))

    def set_comm(self, comm: Comm) -> None:
        """Install the collectives of this rank's process group in every module; under
        DP-attention + EP only the MoE layers meet the other ranks (everything else is whole here
        and runs on this rank's own requests: identity collectives)."""
        lay = self.layout
        if comm.world != lay.world:
            raise ValueError(f"a model sliced for tensor_parallel_size={lay.tp} x data_parallel_size={lay.dp} "
                             f"needs a group of {lay.world} ranks, got {comm.world}")
        for m in self.modules():
            if isinstance(m, UsesOps):
                m.comm = comm if lay.dp == 1 or isinstance(m, MoE) else SINGLE
        self.__dict__["_group_comm"] = comm

    @property
    def group_comm(self) -> Comm:
        """The process group's collectives (`set_comm`; SINGLE for one rank), whatever modules use."""
        return self.__dict__.get("_group_comm", SINGLE)

    def idle(self, mtp: bool = False) -> None:
        """A DP-attention rank with no requests this step: join the collectives of every MoE layer
        of the step's forward (`mtp`: of the MTP block's draft), in the order the others run them."""
        blocks = self.mtp[:1] if mtp else self.layers
        device = self.norm.weight.device
        for block in blocks:
            block.ffn.idle(self.compute_dtype, device)

    def shard_plan(self) -> dict[str, int]:
        """Tensors this rank holds a slice of: name -> the dim it is sliced along (an even split in
        rank order: this rank's slice is [rank * n, (rank + 1) * n) of the checkpoint tensor, n
        its own size along that dim). Empty for the whole model."""
        plan = {}
        for prefix, m in self.named_modules():
            lead = f"{prefix}." if prefix else ""
            if isinstance(m, Linear) and m.split is not None:
                plan[lead + "weight"] = m.split
                if hasattr(m, "scale"):
                    plan[lead + "scale"] = m.split
            for name, dim in getattr(m, "param_splits", {}).items():
                plan[lead + name] = dim
        return plan

    def set_ops(self, table: OpTable) -> None:
        """Install a device's op table in every module (once, at engine start). Kernel tables get
        the FP4 routed experts grouped for one call: stacked, or left where they lie for a table
        that reads them in place (the native CPU kernel)."""
        for m in self.modules():
            if isinstance(m, UsesOps):
                m.ops = table
        for m in self.modules():
            host = m.__dict__.get("_host_ops")  # hybrid placement: the routed experts keep the host's table
            if host is not None:
                m.host_experts(host)
            t = host or table
            if t is not REF and hasattr(m, "stack_experts") and "_stacked" not in m.__dict__:
                m.stack_experts(in_place=t.moe_per_expert)
        for m in self.modules():  # FP8 pairs that read the same input: one GEMM each
            if isinstance(m, Attention) and "fp8_linear" in table.kernels:
                fuse_rows(m.wq_a, m.wkv)
            elif type(m).__name__ == "Expert" and m.w1.fmt == "fp8" and "fp8_linear" in m.w1.ops.kernels:
                fuse_rows(m.w1, m.w3)

    def host_experts(self, table: OpTable) -> int:
        """Hybrid placement (`cpu_experts`): every MoE layer's routed experts (MTP / DSpark blocks'
        too) run on `table`, the host's op table, over weights in host memory (load them there:
        `load_model(..., cpu_experts=True)`); everything else stays on the model's device and
        table. Call before `set_ops`. Returns the number of MoE layers placed."""
        placed = 0
        for m in self.modules():
            if isinstance(m, MoE):
                m.host_experts(table)
                placed += 1
        return placed

    @property
    def fp32_compressor_rows(self) -> bool:
        """Whether the compressors' rows are fp32 (official numerics) or the compute dtype
        (Compressor.project): the dtype the cache keeps them in."""
        return self.numerics == "official" or self.compute_dtype == torch.float32

    def keep_head_fp32(self, keep: bool) -> None:
        """Keep an fp32 copy of the LM head (it runs in fp32; a bf16 checkpoint head is otherwise
        converted at every call). The checkpoint tensor stays as it is."""
        self.__dict__["_head_f32"] = self.head.weight.float() if keep and self.head.weight.dtype != torch.float32 else None

    def head_weight(self) -> torch.Tensor:
        """The LM head weight as `logits` should receive it (the fp32 copy when one is kept)."""
        cached = self.__dict__.get("_head_f32")
        return cached if cached is not None else self.head.weight

    def new_state(self) -> ModelState:
        return ModelState()

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.layout.single:
            return self.embed(input_ids).to(self.compute_dtype)
        # vocab-parallel: each token's row lives on one rank, the others add zeros (exact)
        lo, hi = self.vocab
        mine = (input_ids >= lo) & (input_ids < hi)
        e = self.embed(torch.where(mine, input_ids - lo, 0)).to(self.compute_dtype)
        return self.comm.all_reduce(e * mine.unsqueeze(-1).to(e.dtype))

    def forward_packed(self, input_ids: torch.Tensor, batch: Batch, capture: dict | None = None) -> torch.Tensor:
        """input_ids [N] packed as `batch` -> final residual streams [N, hc, dim]. capture: a dict
        to receive, for each DSpark target layer, its output streams averaged over hc [N, dim]."""
        end = batch.end
        if end > self.args.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds max_position_embeddings={self.args.max_seq_len}")
        X = self.embed_tokens(input_ids).unsqueeze(1).repeat(1, self.args.hc_mult, 1)
        targets = set(self.args.dspark_target_layer_ids) if capture is not None else ()
        for i, layer in enumerate(self.layers):
            X = layer(X, batch, input_ids)
            if i in targets:
                capture[i] = X.mean(1)
        return X

    def mtp_packed(self, streams: torch.Tensor, next_ids: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Streams of positions p (packed as `batch`, whose positions are those p) and the tokens at
        p + 1 -> MTP logits for the tokens at p + 2, fp32 [N, vocab]."""
        if not self.args.n_mtp_layers:
            raise ValueError("this checkpoint has no MTP module (num_nextn_predict_layers = 0, or its mtp.* is "
                             "a DSpark drafter)")
        mtp = self.mtp[0]
        return mtp.logits(mtp(streams, self.embed_tokens(next_ids), batch, next_ids), self.head_weight())

    def forward(self, input_ids: torch.Tensor, state: ModelState | None = None,
                return_streams: bool = False):
        """input_ids [B, S] continuing `state` (a fresh one if None) -> logits [B, S, vocab] fp32;
        with return_streams also the final residual streams [B, S, hc, dim] (MTP's input)."""
        state = state if state is not None else self.new_state()
        B, S = input_ids.shape
        X = self.forward_packed(input_ids.reshape(-1), state.batch(B, S, state.pos, input_ids.device))
        state.pos += S
        logits = self.logits(X, self.head_weight()).view(B, S, -1)
        return (logits, X.view(B, S, *X.shape[1:])) if return_streams else logits

    def mtp_forward(self, streams: torch.Tensor, next_ids: torch.Tensor, state: ModelState) -> torch.Tensor:
        """streams [B, S, hc, dim] of positions p.. and the tokens at p+1.. -> logits for p+2..
        (fp32). Positions continue `state.mtp_pos`, which advances by S."""
        B, S = next_ids.shape
        batch = state.batch(B, S, state.mtp_pos, next_ids.device)
        logits = self.mtp_packed(streams.reshape(B * S, *streams.shape[2:]), next_ids.reshape(-1), batch)
        state.mtp_pos += S
        return logits.view(B, S, -1)
