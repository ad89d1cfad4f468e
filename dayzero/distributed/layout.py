"""The sharding layout of one rank: which slice of every tensor it holds (research/scale-out.md 1.5-1.6).

Tensor parallel over `tensor_parallel_size` = N ranks (rank r):

  attention   wq_b by heads (rows [r*H/N*D, (r+1)*H/N*D)), attn_sink by heads, wo_a by output
              group (rows of groups [r*G/N, (r+1)*G/N)), wo_b by its input (the same groups'
              o_lora_rank columns: row-parallel, partial sums all-reduced); wq_a, wkv, the norms,
              compressor, indexer replicated (the MQA K=V cache is replicated on every rank)
  MoE         router (gate, bias, tid2eid) replicated; the shared expert split by its inner dim
              (w1/w3 rows, w2 columns); routed experts either split the same way (TP, the default)
              or whole, E/N per rank (`enable_expert_parallel`: experts [r*E/N, (r+1)*E/N)); the
              routed and shared partial sums leave the layer in one all-reduce
  embed/head  vocab-parallel: rows [r*V/N, (r+1)*V/N); the embedding's one non-zero contribution
              per token all-reduced, the head's logits all-gathered
  mHC, norms, hc_head, MTP projections: replicated

DP-attention + expert parallel over `data_parallel_size` = N ranks (`tp` = 1, `ep` on; rank r):

  attention, shared expert, embed/head, norms, router, mHC: whole on every rank (replicated); each
              rank runs them on its own requests (rank 0's engine assigns each request a rank,
              whose cache pools hold its KV)
  routed      whole, E/N per rank: experts [r*E/N, (r+1)*E/N); every MoE layer all-gathers the
              step's tokens of every rank (with their routing), runs its experts on all of them
              and reduce-scatters the fp32 partial sums back to the tokens' ranks
              (reference/moe.py); a rank with no requests joins these collectives with no tokens

Tensor parallel inside a data-parallel rank (tp > 1 and dp > 1) and data parallel with replicated
experts (dp > 1 without `ep`) are not built: `check` refuses them.

A split dimension must divide evenly, and where a weight is FP8 its 128-wide scale blocks (FP4:
32) must not be cut, nor the 128-wide blocks of the official activation simulation; `check` names
the field, its value and the sizes that would work. N = 1 is the whole model (the same code).

DeepSeek-V4.1 (v41/, `V41Args`) is split by the same rules over the same names (attn.wq_b, wo_a, wo_b,
attn_sink, ffn.experts, shared_experts, embed, head); its compressors, indexers, Engram and mHC are
replicated. Its FP8 dense weights have 32x32 scale blocks and its MXFP4 experts 32-wide ones (there is
no activation simulation beyond its fixed fake-quant points, none of which is split), so a V4.1 share
must be a multiple of 32 where V4's must be of 128. DP-attention + EP runs V4.1 as V4 (only its routed
experts are split, whole, E/N per rank).
"""
from __future__ import annotations

from dataclasses import dataclass

from dayzero.config import ModelArgs


class LayoutError(ValueError):
    """A parallel layout this model cannot be split into; the message names the field."""


@dataclass(frozen=True)
class Layout:
    tp: int = 1  # tensor_parallel_size
    rank: int = 0
    ep: bool = False  # enable_expert_parallel: routed experts whole, E/N per rank
    dp: int = 1  # data_parallel_size: ranks running attention on their own requests (with ep)

    def __post_init__(self):
        for name, v in (("tensor_parallel_size", self.tp), ("data_parallel_size", self.dp)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LayoutError(f"{name}: must be a positive integer, got {v!r}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world:
            raise LayoutError(f"rank {self.rank!r} outside [0, {self.world})")
        if not isinstance(self.ep, bool):
            raise LayoutError(f"enable_expert_parallel: must be True or False, got {self.ep!r}")

    @property
    def world(self) -> int:
        """Ranks in all: tensor_parallel_size x data_parallel_size (one of them is 1)."""
        return self.tp * self.dp

    @property
    def single(self) -> bool:
        """No tensor-parallel split: attention, dense layers, embedding and head whole here."""
        return self.tp == 1

    @property
    def whole(self) -> bool:
        """One rank: every tensor of the checkpoint here."""
        return self.world == 1

    def part(self, total: int) -> tuple[int, int]:
        """This rank's [start, stop) of `total` items split evenly over the tensor-parallel ranks
        (checked by `check`)."""
        n = total // self.tp
        r = self.rank % self.tp
        return r * n, (r + 1) * n

    def experts(self, args) -> range:
        """The routed experts this rank holds (whole or split, see `expert_inter`): under expert
        parallel E/N of them by rank over all N = tp x dp ranks."""
        if not self.ep:
            return range(args.n_routed_experts)
        n = args.n_routed_experts // self.world
        return range(self.rank * n, (self.rank + 1) * n)

    def expert_inter(self, args) -> int:
        """Inner width of this rank's routed experts."""
        return args.moe_inter_dim if self.ep else args.moe_inter_dim // self.tp

    def check(self, args: ModelArgs) -> None:
        """Every divisibility the layout needs, as one error naming each field that fails and the
        tensor_parallel_size (or data_parallel_size) values that would fit this model."""
        if self.dp > 1:
            return self._check_dp(args)
        problems = self.problems(args)
        if problems:
            fits = [k for k in range(1, 65) if not Layout(k, 0, self.ep).problems(args)]
            mode = " with enable_expert_parallel" if self.ep else ""
            raise LayoutError(f"tensor_parallel_size={self.tp}{mode} does not fit this model:\n  "
                              + "\n  ".join(problems)
                              + f"\n  tensor_parallel_size values that fit it{mode}: {fits}")

    def _check_dp(self, args: ModelArgs) -> None:
        head = f"data_parallel_size={self.dp}"
        if self.tp > 1:
            raise LayoutError(f"{head} with tensor_parallel_size={self.tp}: tensor parallel inside each data-parallel "
                              f"rank is not built; use data_parallel_size={self.world} with enable_expert_parallel "
                              f"(DP-attention + EP) or tensor_parallel_size={self.world} (TP), "
                              "one of the two sizes 1")
        if not self.ep:
            raise LayoutError(f"{head} needs enable_expert_parallel (--enable-expert-parallel): each rank holds "
                              "E/N routed experts; data parallel with every expert replicated on every rank is "
                              "not built")
        problems = self.problems(args)
        if problems:
            fits = [k for k in range(1, 65) if not Layout(1, 0, True, k).problems(args)]
            raise LayoutError(f"{head} with enable_expert_parallel does not fit this model:\n  "
                              + "\n  ".join(problems)
                              + f"\n  data_parallel_size values that fit it with enable_expert_parallel: {fits}")

    def problems(self, args: ModelArgs) -> list[str]:
        if self.dp > 1:  # only the routed experts are split (by whole experts)
            e = args.n_routed_experts
            return ([] if e % self.world == 0 else
                    [f"config `n_routed_experts`={e} (routed experts, whole, E/N per rank) does not split "
                     f"{self.world} ways"])
        n = self.tp
        out: list[str] = []
        if n == 1:
            return out

        def need(field: str, value: int, what: str, unit: int = 1, block: int = 1, why: str = ""):
            """value items split n ways, each rank's share (x unit) a multiple of block."""
            if value % n or (value // n * unit) % block:
                extra = f" with each rank's share a multiple of {block} ({why})" if block > 1 and value % n == 0 else ""
                out.append(f"config `{field}`={value} ({what}) does not split {n} ways{extra}")

        blk, eblk, efmt = blocks(args)
        need("num_attention_heads", args.n_heads, "attention heads: wq_b rows and sinks by head", args.head_dim,
             blk, f"FP8 {blk}-row blocks of wq_b")
        need("o_groups", args.o_groups, "wo_a output groups and wo_b input columns by group", args.o_lora_rank,
             blk, f"FP8 {blk} blocks of wo_a and wo_b")
        need("vocab_size", args.vocab_size, "embedding and head rows by vocabulary")
        if self.ep:
            need("n_routed_experts", args.n_routed_experts, "routed experts, whole, E/N per rank")
            need("moe_intermediate_size", args.moe_inter_dim, "the shared expert's inner dim", 1, blk,
                 f"FP8 {blk} blocks of its weights and activations")
        else:
            need("moe_intermediate_size", args.moe_inter_dim,
                 "the shared and routed experts' inner dim; enable_expert_parallel keeps routed experts whole",
                 1, max(blk, eblk), f"{efmt} weight and activation blocks")
        return out


def blocks(args) -> tuple[int, int, str]:
    """(dense block, routed-expert block, routed-expert format) a split share must keep whole: V4
    (`ModelArgs`): FP8 128 and FP4 128 (its weight blocks and the official activation simulation);
    V4.1 (`V41Args`, no `linear_format`): FP8 32x32 dense blocks and MXFP4 32-wide expert blocks."""
    if hasattr(args, "linear_format"):
        blk = 128 if args.linear_format == "fp8" else 1
        return blk, 128 if args.routed_expert_format != "dense" else 1, args.routed_expert_format
    if args.quant != "fp8":
        return 1, 1, "dense"
    return args.weight_block_size[0], 32, f"{args.expert_dtype}"
