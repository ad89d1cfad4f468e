"""DSpark of DeepSeek-V4.1 (`mtp.0` .. `mtp.{n-1}`, layer ids n_layers + i): the three-stage block drafter
as V4.1 ships it. There is no public oracle (transformers' `deepseek_v41` skips `mtp.*`); the facts and
their sources are in docs/V41_DSPARK.md (vLLM, TokenSpeed, fastllm, NeMo AutoModel, a reference
port). What differs from V4-0731's (reference/dspark.py):

- capture: the target's hidden state is the mean over the hc streams at the ENTRY of each layer of
  `dspark_target_layer_ids` (the released [37, 38, 39]: their attention inputs), not a layer's output
  (v41/model.py `forward_packed(capture=)`); concatenated in ascending id order, [N, T * dim].
  At an Engram layer the entry is taken before its injection (vLLM's order; a port takes it after;
  no released target layer has Engram, so this does not matter for the release).
- a stage is a V4.1 block (v41/model.py V41Block) at a sliding-only layer descriptor: no compressor,
  indexer or Engram, no per-head q RMSNorm, the sliding RoPE (`rope_theta`, no YaRN), the attention
  sink, `wo_a` grouped / `wo_b`; its MoE is V4.1's with DSpark's own bank (`dspark_n_routed_experts`,
  top `dspark_n_activated_experts`, same gate: sqrtsoftplus, learned bias for selection, no hash).
- K=V rows, of the context and of the block, pass V4.1's window fake-quantiser (FP8 e4m3, UE8M0 per
  32 channels over all head_dim channels, v41/quant.py `window_kv`), as the backbone's window rows.
- mHC is single-pass and chained over the stages: the draft streams start as the embedding repeated
  hc_mult times with the identity pre (stream 0); each site's sublayer reads the streams collapsed
  with the previous site's pre; the last stage's FFN pre collapses the output (no hc_head).
- head: h = collapse(X, pre) (pre-norm), U = the target's head (fp32) on `norm(h)`;
  Markov: logits_i = U_i + markov_head.head @ markov_head.embed[prev_i] (prev_0 the anchor, then the
  previous draft; V4-0731 calls these markov_w1 / markov_w2); confidence_i = sigmoid(proj [h_i ; e_i]).

Context: stage i keeps one K=V row per committed main position p, window_kv(rope_p(kv_norm(wkv(main_x_p)))),
with main_x = main_norm(main_proj(capture)) (stage 0's tensors), in the window cache at layer
n_layers + i, stored at p + 1 (as V4's DSpark: a cached block's rows then depend only on tokens inside
it). A draft block after the last computed position c - 1 is [anchor, noise x (k - 1)] at positions
c .. c + k - 1; every block row attends to the context rows of positions c - window .. c - 1 and to
all k block rows (non-causal inside the block).

Ranks (distributed/layout.py, as V4's stages, reference/dspark.py): a stage is sliced as a backbone layer,
its attention by heads (wq_b rows, sinks) and output groups (wo_a rows, wo_b input columns; the partial
outputs summed over the tensor-parallel ranks in fp32, as CSA2Attention's), its MoE as V4.1's (shared
expert by inner dim; routed experts by inner dim or, under EP, whole: `dspark_n_routed_experts` / N per
rank); wq_a, wkv, the norms and mHC whole, so the context rows are replicated as the backbone's window
rows. `main_proj` / `main_norm` (its output feeds every stage's whole wkv), `norm` and the Markov and
confidence heads are whole on every rank (vLLM's DSpark `main_proj` is a ReplicatedLinear too); the head
is the target's vocab-parallel one, its slices all-gathered. Under DP-attention + EP only the stages'
routed experts meet the other ranks.
"""
from __future__ import annotations

import torch
from torch import nn

from dayzero.distributed.layout import Layout, LayoutError
from dayzero.ops import ref
from dayzero.reference.attention import rope_table
from dayzero.reference.dspark import block_core, block_inputs
from dayzero.reference.layers import RMSNorm, UsesOps
from dayzero.reference.seqcache import Batch
from dayzero.v41 import quant
from dayzero.v41.config import V41Args
from dayzero.v41.formats import v41_linear
from dayzero.v41.model import V41Block
from dayzero.v41.schedule import V41Layer


class _Weight(nn.Module):
    def __init__(self, *shape: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)


class _Rows(_Weight):
    """`markov_head.embed`: rows of the predecessor tokens, as fp32 [n, rank]."""

    def forward(self, prev: torch.Tensor) -> torch.Tensor:
        return self.weight[prev].float()


class MarkovHead(UsesOps, nn.Module):
    """B(prev, v) = head[v] . embed[prev], a rank-r bigram bias on the draft logits. `embed(prev)` and
    `bias(e)` are the interface engine/dspark_drafter.py `_markov` uses (as V4's MarkovHead)."""

    def __init__(self, args: V41Args, dtype: torch.dtype):
        super().__init__()
        self.embed = _Rows(args.vocab_size, args.dspark_markov_rank, dtype=dtype)
        self.head = _Weight(args.vocab_size, args.dspark_markov_rank, dtype=dtype)

    def bias(self, e: torch.Tensor) -> torch.Tensor:
        return self.ops.fp32_linear(e, self.head.weight)  # [n, vocab] fp32


class ConfidenceHead(UsesOps, nn.Module):
    def __init__(self, args: V41Args, dtype: torch.dtype):
        super().__init__()
        self.proj = _Weight(1, args.dim + args.dspark_markov_rank, dtype=dtype)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Probability that the draft survives verification, [n] (h: the collapsed pre-norm hidden)."""
        return ref.lanewise(torch.sigmoid, self.ops.fp32_linear(torch.cat([h.float(), e], -1),
                                                               self.proj.weight)).squeeze(-1)


def stage_layer(args: V41Args, i: int) -> V41Layer:
    """Stage i's layer descriptor: sliding only (compress ratio 0), no Engram, at layer id n_layers + i."""
    return V41Layer(args.n_layers + i, 0, None, None, None, False, False)


def stage_args(args: V41Args) -> V41Args:
    """The stages' config: DSpark's own expert bank in V4.1's MoE."""
    return args.replace(n_routed_experts=args.dspark_n_routed_experts,
                        n_activated_experts=args.dspark_n_activated_experts)


def check_layout(args: V41Args, layout: Layout) -> None:
    """What the stages need of a layout beyond the backbone's (`layout.check`): their own routed experts,
    whole, E/N per rank under expert parallel (heads, groups and inner dims are the backbone's)."""
    e, n = args.dspark_n_routed_experts, layout.world
    if layout.ep and e % n:
        fits = [k for k in range(1, 65) if e % k == 0]
        size = f"data_parallel_size={layout.dp}" if layout.dp > 1 else f"tensor_parallel_size={layout.tp}"
        raise LayoutError(f"{size} with enable_expert_parallel does not fit the DSpark stages: config "
                          f"`dspark_n_routed_experts`={e} (their routed experts, whole, E/N per rank) does not split "
                          f"{n} ways; sizes that fit them: {fits} (or num_speculative_tokens=0: no stages)")


def build_stages(args: V41Args, dtype: torch.dtype, layout: Layout = Layout()) -> nn.ModuleList:
    check_layout(args, layout)
    return nn.ModuleList(V41DSparkStage(args, i, dtype, layout) for i in range(args.n_mtp_layers))


class V41DSparkStage(V41Block):
    """Stage i: a V41Block (sites, attention projections, MoE) at `stage_layer(args, i)`; stage 0 also
    projects the capture (`main_proj`, FP8 32x32 in a quantised checkpoint, `main_norm`), the last stage
    holds `norm` and the Markov and confidence heads. `layout`: this rank's slice (the module docstring)."""

    def __init__(self, args: V41Args, i: int, dtype: torch.dtype, layout: Layout = Layout()):
        super().__init__(stage_args(args), args.n_layers + i, dtype, layout, layer=stage_layer(args, i))
        self.stage = i
        if i == 0:
            n_t = len(args.dspark_target_layer_ids)
            self.main_proj = v41_linear(args, n_t * args.dim, args.dim, dtype)
            self.main_norm = RMSNorm(args.dim, args.norm_eps, dtype)
        if i == args.n_mtp_layers - 1:
            self.norm = RMSNorm(args.dim, args.norm_eps, dtype)
            self.markov_head = MarkovHead(args, dtype)
            self.confidence_head = ConfidenceHead(args, dtype)

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        return rope_table(*self.attn.rope_args, None if device.type == "cpu" else device)

    def _kv(self, kv: torch.Tensor, batch: Batch, inv: torch.Tensor) -> torch.Tensor:
        return quant.window_kv(self.ops.apply_rope(self.attn.kv_norm(kv), *batch.rope(inv)))

    def write_context(self, main_x: torch.Tensor, batch: Batch) -> None:
        """The stage's context rows for the main positions p of `batch` (stored at p + 1)."""
        kv = self._kv(self.attn.wkv(main_x), batch, self._inv_freq(main_x.device))
        batch.cache.write(self.layer_id, "kv", batch.seq, batch.stored(1), kv)

    def block_attention(self, x: torch.Tensor, batch: Batch, k: int) -> torch.Tensor:
        """x [n * k, dim]: n blocks of k rows (block j at positions batch.starts[j] ..) -> [n * k, dim]."""
        a, ops = self.attn, self.ops
        inv = self._inv_freq(x.device)
        q = a.wq_b(a.q_norm(a.wq_a(x))).unflatten(-1, (a.n_heads, a.head_dim))  # no per-head q norm (V4.1)
        q = ops.apply_rope(q, *batch.rope(inv, heads=True))
        kv = self._kv(a.wkv(x), batch, inv)
        o = block_core(ops, a, self.layer_id, q, kv, batch, k, inv)  # V4's: context window + the whole block
        M = x.shape[0]
        y = a.wo_b(a._grouped_wo_a(o.reshape(M, a.o_groups, -1)))  # CSA2Attention: FP8 32x32 groups on the kernel
        # tensor parallel: this rank's heads' partial output, summed over ranks in fp32 (as CSA2Attention.forward)
        return y if a.comm.world == 1 else a.comm.all_reduce(y.float()).to(y.dtype)

    def forward_block(self, X: torch.Tensor, pre: torch.Tensor, batch: Batch, ids: torch.Tensor, k: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Streams X [M, hc, dim] and the previous site's pre [M, hc] -> (streams, this stage's FFN pre)."""
        X, pre = self._site(X, pre, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base,
                            lambda u: self.block_attention(self.attn_norm(u), batch, k))
        return self._site(X, pre, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base,
                          lambda u: self.ffn(self.ffn_norm(u), ids))


def main_hidden(captured: dict[int, torch.Tensor], args: V41Args) -> torch.Tensor:
    """The target capture, [N, T * dim]: each listed layer's entry streams averaged over hc, in id order."""
    return torch.cat([captured[i] for i in sorted(args.dspark_target_layer_ids)], -1)


def main_x(stages: nn.ModuleList, hidden: torch.Tensor) -> torch.Tensor:
    st0 = stages[0]
    return st0.main_norm(st0.main_proj(hidden))


def draft_block(model, stages: nn.ModuleList, anchors: torch.Tensor, batch: Batch, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft forward of `len(anchors)` blocks of k rows ([anchor, noise x (k - 1)] at positions
    batch.starts[j] ..): (h [n, k, dim] collapsed pre-norm, U [n, k, vocab] fp32 before the Markov bias).
    `model`: a V41Transformer (its embedding, head and head collectives)."""
    n = anchors.shape[0]
    ids, X = block_inputs(model, anchors, k)
    pre = torch.zeros(X.shape[:2], device=X.device)
    pre[:, 0] = 1.0  # the first site reads stream 0, as the backbone's
    for st in stages:
        X, pre = st.forward_block(X, pre, batch, ids, k)
    h = ref.hc_collapse(X, pre)
    last = stages[-1]
    U = model.head_comm.all_gather(last.ops.fp32_linear(last.norm(h), model.head.weight), -1)
    return h.view(n, k, -1), U.view(n, k, -1)
