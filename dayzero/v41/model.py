"""The executable spec of DeepSeek-V4.1's text model (research/v41-and-dspark.md 1.3-1.4).

Module and parameter names are the official checkpoint names (`embed.weight`, `layers.{i}.attn.*`,
`layers.{i}.ffn.gate.bias_vl`, `layers.{i}.engram.embed.weight`, `norm.weight`, `head.weight`, no
`hc_head_*`), so `V41Transformer(args).state_dict()` lists the backbone tensors of a checkpoint: for
a quantised config (`quantization_config`) in the formats of v41/formats.py by role (FP8 32x32, MXFP4
experts, FP8 1x32 Engram rows, with their `.scale` tensors), else dense (the `mtp.*` / vision tensors
are not built). v41/loader.py loads a checkpoint into it.

Numerics: only `transformers`, what transformers' `deepseek_v41` computes, its fake-quantisation
points included (v41/quant.py). The forward is the exact full prefill of the causal encoder-decoder
schedule (every layer on every token) unless a call opts in to the bounded replay of the decoder layers
(`replay_from` / `bounded_replay`, v41/replay.py), an approximation that is off by default.
"""
from __future__ import annotations

import torch
from torch import nn

from dayzero.distributed.comm import SINGLE, Comm
from dayzero.distributed.layout import Layout
from dayzero.ops import ref
from dayzero.reference.layers import Linear, RMSNorm, UsesOps
from dayzero.reference.model import ModelState, Transformer
from dayzero.reference.seqcache import Batch
from dayzero.v41.attention import Context, CSA2Attention
from dayzero.v41.config import V41Args
from dayzero.v41.engram import Engram, NgramHasher, compressed_token_map
from dayzero.v41.moe import V41MoE
from dayzero.v41.replay import ReplayBatch, V41State, check_floors, decoder_layers, kept_rows, replay_start

NUMERICS = ("transformers",)


def _f32(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape), requires_grad=False)


class V41Block(UsesOps, nn.Module):
    """One layer: the Engram lookup (its layers) into the streams, then two single-pass mHC sites.

    Single-pass mHC: a site computes (pre, post, comb) from the streams it receives, but its
    sublayer reads the streams collapsed with the PREVIOUS site's `pre` (attention: the previous
    layer's FFN site; the first attention: stream 0); its own `pre` goes to the next site, and the
    last FFN site's to the final collapse (no hc_head)."""

    def __init__(self, args: V41Args, layer_id: int, dtype: torch.dtype, layout: Layout = Layout(),
                 layer=None):
        super().__init__()
        n, mix = args.hc_mult, (2 + args.hc_mult) * args.hc_mult
        self.layer_id, self.iters, self.hc_eps, self.norm_eps = layer_id, args.hc_sinkhorn_iters, args.hc_eps, args.norm_eps
        layer = args.layers[layer_id] if layer is None else layer  # a DSpark stage passes its own (v41/dspark.py)
        if layer.engram:
            self.engram = Engram(args, args.engram_layer_ids.index(layer_id), dtype)
        self.attn_norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.attn = CSA2Attention(args, layer, dtype, layout)
        self.ffn = V41MoE(args, dtype, layout=layout)
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
    """`layout` (distributed/layout.py): this rank's slice of a tensor / expert parallel model (the
    default: the whole model); a sliced model computes the whole model's outputs once `set_comm`
    installs its process group's collectives. Vocab-parallel embedding (each token's row comes from
    the one rank holding it, the others add zeros) and head (fp32 logits all-gathered); the Engram
    tables, mHC and norms are whole on every rank. DP-attention + EP (`layout.dp` > 1): everything but
    the routed experts whole on every rank, run on its own requests; only the MoE layers meet the
    other ranks (`set_comm`, V41MoE), and a rank with no tokens joins them (`idle`)."""

    def __init__(self, args: V41Args, numerics: str = "transformers", dtype: torch.dtype = torch.float32,
                 layout: Layout = Layout(), drafter: bool = False):
        super().__init__()
        if numerics not in NUMERICS:
            raise ValueError(f"DeepSeek-V4.1 numerics must be one of {NUMERICS}, got {numerics!r} (the official "
                             f"mode's extra quantisation simulation is not built for V4.1)")
        layout.check(args)
        self.args, self.numerics, self.compute_dtype, self.layout = args, numerics, dtype, layout
        self.vocab = layout.part(args.vocab_size)  # this rank's rows of embed and head: [start, stop)
        vocab = self.vocab[1] - self.vocab[0]
        self.embed = nn.Embedding(vocab, args.dim, dtype=dtype)
        self.embed.weight.requires_grad_(False)
        self.embed.param_splits = {} if layout.single else {"weight": 0}
        self.layers = nn.ModuleList(V41Block(args, i, dtype, layout) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.head = Linear(args.dim, vocab, "dense", dtype, split=None if layout.single else 0)
        self.hasher: NgramHasher | None = None
        if drafter:  # the DSpark stages mtp.0.. (v41/dspark.py); without them `mtp.*` is not built
            if not args.n_mtp_layers:
                raise ValueError("drafter=True: this DeepSeek-V4.1 config has no DSpark stages (num_nextn_predict_layers 0)")
            from dayzero.v41.dspark import build_stages
            self.mtp = build_stages(args, dtype, layout)

    def set_comm(self, comm: Comm) -> None:
        """Install the collectives of this rank's process group in every module (as V4's)."""
        Transformer.set_comm(self, comm)

    @property
    def group_comm(self) -> Comm:
        return self.__dict__.get("_group_comm", SINGLE)

    @property
    def head_comm(self) -> Comm:
        """The collectives of the vocab-parallel head: the group's under tensor parallel; none (SINGLE)
        where the head is whole (one rank, DP-attention: each rank's logits are its own requests')."""
        return SINGLE if self.layout.single else self.group_comm

    def idle(self) -> None:
        """A DP-attention rank with no requests this step (or none left after a bounded replay's cut):
        join every MoE layer's dispatch and combine, in the order the other ranks run them."""
        self._idle_from(0)

    def _idle_from(self, first: int) -> None:
        if self.layout.dp == 1:
            return
        device = self.norm.weight.device
        for layer in self.layers[first:]:
            layer.ffn.idle(self.compute_dtype, device)

    def shard_plan(self) -> dict[str, int]:
        """Tensors this rank holds a slice of: name -> the dim it is sliced along (as V4's)."""
        return Transformer.shard_plan(self)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.layout.single:
            return self.embed(input_ids).to(self.compute_dtype)
        lo, hi = self.vocab  # vocab-parallel: each token's row lives on one rank, the others add zeros (exact)
        mine = (input_ids >= lo) & (input_ids < hi)
        e = self.embed(torch.where(mine, input_ids - lo, 0)).to(self.compute_dtype)
        return self.group_comm.all_reduce(e * mine.unsqueeze(-1).to(e.dtype))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits over the whole vocabulary of final collapsed hidden h [N, dim] (before `norm`);
        a vocab-parallel head's slices gathered."""
        return self.head_comm.all_gather(ref.fp32_linear(self.norm(h), self.head.weight), -1)

    def bind_tokenizer(self, tokenizer) -> "V41Transformer":
        """Derive the Engram token map from the checkpoint's tokenizer (a `tokenizers.Tokenizer`)."""
        if self.args.engram_layer_ids:
            self.hasher = NgramHasher(self.args, *compressed_token_map(tokenizer))
        return self

    def new_state(self) -> V41State:
        return V41State()

    def forward_packed(self, input_ids: torch.Tensor, batch: Batch, replay_from=None,
                       capture: dict | None = None) -> torch.Tensor:
        """input_ids [N] packed as `batch` -> the final collapsed hidden [N, dim] (before `norm`).

        replay_from (opt-in bounded replay, v41/replay.py): one floor per batch member, the same on every
        call of that sequence (`replay_start(prompt length, window)`; 0: exact). The layers after the last
        KV source run only on positions >= the floor, with their windows cut at it; the rows of the
        positions below it are NaN (no hidden state is computed for them).

        capture (DSpark, v41/dspark.py): a dict that gets, for each layer L of `dspark_target_layer_ids`,
        the streams ENTERING layer L averaged over hc, [N, dim] (not the layer's output)."""
        floors = check_floors(batch, replay_from)
        if capture is not None and floors is not None:
            raise ValueError("DSpark capture under bounded replay is not built (the target layers run on the kept "
                             "rows only); use the exact forward")
        targets = set(self.args.dspark_target_layer_ids) if capture is not None else ()
        if batch.end > self.args.max_seq_len:
            raise ValueError(f"sequence of {batch.end} tokens exceeds max_position_embeddings={self.args.max_seq_len}")
        hash_ids = None
        if self.args.engram_layer_ids:
            if self.hasher is None:
                raise ValueError("this DeepSeek-V4.1 model has Engram layers "
                                 f"{list(self.args.engram_layer_ids)}: bind the checkpoint's tokenizer first "
                                 "(V41Transformer.bind_tokenizer), its token map defines the n-gram hashes")
            hash_ids = self.hasher(input_ids, batch)
        X = self.embed_tokens(input_ids).unsqueeze(1).repeat(1, self.args.hc_mult, 1)
        pre = torch.zeros(X.shape[:2], device=X.device)
        pre[:, 0] = 1.0  # the first site reads stream 0
        ctx = Context()
        skip = decoder_layers(self.args) if floors is not None else range(0)
        keep = None
        for layer in self.layers:
            if len(skip) and layer.layer_id == skip.start:
                keep = kept_rows(batch, floors)
                if not keep.any():
                    self._idle_from(layer.layer_id)  # DP-attention: the other ranks' MoE collectives
                    break
                batch, X, pre, input_ids = ReplayBatch(batch, floors), X[keep], pre[keep], input_ids[keep]
                hash_ids = None if hash_ids is None else hash_ids[keep]
                ratio = self.args.layers[self.args.kv_source_layers[-1]].compress_ratio
                ctx = Context(topk=None if ctx.topk is None else ctx.topk[keep],
                              candidates=None if ctx.candidates is None
                              else ctx.candidates[keep][:, :batch.entry_span(ratio)])
            if layer.layer_id in targets:
                capture[layer.layer_id] = X.mean(1)  # the entry streams (before an Engram injection)
            X, pre = layer(X, pre, batch, ctx, input_ids, hash_ids)
        if keep is None:
            return ref.hc_collapse(X, pre)
        out = torch.full((keep.shape[0], self.args.dim), float("nan"), dtype=X.dtype, device=X.device)
        if keep.any():
            out[keep] = ref.hc_collapse(X, pre)
        return out

    def forward(self, input_ids: torch.Tensor, state: ModelState | None = None, bounded_replay: bool = False,
                replay_from: int | None = None) -> torch.Tensor:
        """input_ids [B, S] continuing `state` (a fresh one if None) -> logits [B, S, vocab] fp32.

        bounded_replay=True: this call ends the prompt; the decoder layers run only on its last `window`
        tokens (floor = replay_start(state.pos + S, window)). replay_from: the floor given explicitly (a
        prompt prefilled in chunks passes the same value on each chunk). The floor is kept in the state
        and applies to every later call; the logits rows below it are NaN (not computed)."""
        state = state if state is not None else self.new_state()
        B, S = input_ids.shape
        floor = self._replay_floor(state, S, bounded_replay, replay_from)
        h = self.forward_packed(input_ids.reshape(-1), state.batch(B, S, state.pos, input_ids.device),
                                None if floor is None else [floor] * B)
        state.pos += S
        if floor is None:
            return self.logits(h).view(B, S, -1)
        keep = ~h.isnan().any(-1)
        logits = torch.full((B * S, self.args.vocab_size), float("nan"), device=h.device)
        if keep.any():
            logits[keep] = self.logits(h[keep])
        return logits.view(B, S, -1)

    def _replay_floor(self, state: ModelState, S: int, bounded_replay: bool, replay_from: int | None) -> int | None:
        if bounded_replay and replay_from is not None:
            raise ValueError("pass either bounded_replay=True (this call ends the prompt) or replay_from=<floor> "
                             "(a chunked prompt's floor), not both")
        want = replay_start(state.pos + S, self.args.window_size) if bounded_replay else replay_from
        have = getattr(state, "replay_from", None)
        if want is None:
            return have
        if not isinstance(want, int) or isinstance(want, bool) or want < 0:
            raise ValueError(f"replay_from is {want!r}: a replay floor is a token position >= 0 (0: exact prefill)")
        if not isinstance(state, V41State):
            raise ValueError("bounded replay keeps its floor in the state: use V41Transformer.new_state() "
                             f"(a V41State), not {type(state).__name__}")
        if have is not None and have != want:
            raise ValueError(f"this state was prefilled with replay floor {have}; a call asks for {want} (a "
                             f"sequence has one floor; later calls apply it without passing it again)")
        state.replay_from = want
        return want
