"""What each attention layer caches, grouped into paged cache groups (no model import).

Every group pages its data in blocks of `block_size` tokens, so logical block k of a sequence
covers tokens [k*bs, (k+1)*bs) in every group and one chain hash names its content everywhere:

  window          ("kv")                  all layers (+ MTP): one K=V row per token; a request keeps
                                          only blocks overlapping its last `window - 1` tokens
  rows r<ratio>   ("rows:attn"/"rows:index") compressor projections (kv, gate + ape), fp32, one row
                                          per token; kept from the start of the open window (CSA:
                                          of the previous window, the overlap half)
  entries r<ratio> ("ent:attn"/"ent:index") one compressed entry per r tokens (bs/r per block);
                                          all kept: they are the long-range context

Byte layout of one block of a group: for each kind, a [members, per_block, *row] array in the
kind's dtype (rows fp32, everything else the compute dtype), members in layer order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dayzero.config import ModelArgs


@dataclass(frozen=True)
class KindSpec:
    row: tuple[int, ...]
    fp32: bool = False


@dataclass(frozen=True)
class GroupSpec:
    name: str
    layers: tuple[int, ...]  # members, in order
    kinds: dict  # kind -> KindSpec
    per_block: int  # rows per block per member
    ratio: int  # tokens per row (1 for per-token groups)
    keep: str  # "window", "open-window", "all"
    overlap: bool = False
    window_ratio: int = 0  # "open-window" groups: the compression ratio whose open window is kept

    def block_bytes(self, dtype: torch.dtype) -> int:
        size = torch.tensor([], dtype=dtype).element_size()
        return sum(len(self.layers) * self.per_block * math.prod(k.row) * (4 if k.fp32 else size)
                   for k in self.kinds.values())

    def keep_from(self, num_tokens: int, window: int) -> int:
        """First token whose block this group still needs once `num_tokens` are computed."""
        if self.keep == "window":
            return max(num_tokens - window + 1, 0)
        if self.keep == "open-window":
            r = self.window_ratio
            return max(r * (num_tokens // r - (1 if self.overlap else 0)), 0)
        return 0


def cache_groups(args: ModelArgs, block_size: int, with_mtp: bool) -> list[GroupSpec]:
    ratios = sorted({r for r in args.compress_ratios if r})
    for r in ratios:
        if block_size % r:
            raise ValueError(f"block_size {block_size} must be a multiple of every compression ratio "
                             f"({ratios}): a block holds block_size/r compressed entries")
    layers = tuple(range(args.n_layers)) + ((args.n_layers,) if with_mtp and args.n_mtp_layers else ())
    groups = [GroupSpec("window", layers, {"kv": KindSpec((args.head_dim,))}, block_size, 1, "window")]
    for r in ratios:
        members = tuple(i for i in range(args.n_layers) if args.compress_ratios[i] == r)
        csa = args.layer_types[members[0]] == "csa"
        width = args.head_dim * (2 if csa else 1)
        rows = {"rows:attn": KindSpec((2, width), fp32=True)}
        ents = {"ent:attn": KindSpec((args.head_dim,))}
        if csa:
            rows["rows:index"] = KindSpec((2, 2 * args.index_head_dim), fp32=True)
            ents["ent:index"] = KindSpec((args.index_head_dim,))
        groups.append(GroupSpec(f"rows r{r}", members, rows, block_size, 1, "open-window", overlap=csa,
                                window_ratio=r))
        groups.append(GroupSpec(f"entries r{r}", members, ents, block_size // r, r, "all"))
    return groups


def bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> dict[str, float]:
    """Long-range cache bytes per token per layer, by layer type (entries only; the window and
    compressor rows are a fixed cost per sequence)."""
    size = torch.tensor([], dtype=dtype).element_size()
    out = {"sliding": 0.0}
    for t, r in zip(args.layer_types, args.compress_ratios):
        if t == "csa":
            out["csa"] = (args.head_dim + args.index_head_dim) * size / r
        elif t == "hca":
            out[f"hca r{r}"] = args.head_dim * size / r
    return out


def fixed_bytes_per_sequence(args: ModelArgs, dtype: torch.dtype, with_mtp: bool = False) -> int:
    """Window rows (last window-1 tokens, every layer) and open compressor windows (fp32 rows)."""
    size = torch.tensor([], dtype=dtype).element_size()
    n_win = args.n_layers + (1 if with_mtp and args.n_mtp_layers else 0)
    total = n_win * (args.window_size - 1) * args.head_dim * size
    for t, r in zip(args.layer_types, args.compress_ratios):
        if t == "csa":
            total += 2 * r * 2 * (2 * args.head_dim + 2 * args.index_head_dim) * 4
        elif t == "hca":
            total += r * 2 * args.head_dim * 4
    return total


def kv_report(args: ModelArgs, dtype: torch.dtype, contexts=(8192, 131072, 1048576)) -> dict:
    """Per-sequence cache bytes at each context length, from the same accounting the engine uses."""
    per_tok = bytes_per_token(args, dtype)
    by_layer = sum(per_tok["csa"] if t == "csa" else per_tok.get(f"hca r{r}", 0.0)
                   for t, r in zip(args.layer_types, args.compress_ratios))
    fixed = fixed_bytes_per_sequence(args, dtype)
    return {
        "bytes_per_token_per_layer": per_tok,
        "bytes_per_token_all_layers": by_layer,
        "fixed_bytes_per_sequence": fixed,
        "per_sequence_bytes": {str(n): int(by_layer * n + fixed) for n in contexts},
    }
