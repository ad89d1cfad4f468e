"""What each attention layer caches, grouped into paged cache groups (no model import).

Every group pages its data in blocks of `block_size` tokens, so logical block k of a sequence
covers tokens [k*bs, (k+1)*bs) in every group and one chain hash names its content everywhere:

  window          ("kv")                  all layers (+ MTP): one K=V row per token; a request keeps
                                          only blocks overlapping its last `window - 1` tokens
  rows r<ratio>   ("rows:attn"/"rows:index") compressor projections (kv, gate + ape), one row per
                                          token, fp32 under official numerics (DeepSeek's reference
                                          keeps fp32 compressor state), the compute dtype under
                                          transformers numerics (transformers keeps them in the model
                                          dtype); kept from the start of the open window (CSA: of the
                                          previous window, the overlap half)
  entries r<ratio> ("ent:attn"/"ent:index") one compressed entry per r tokens (bs/r per block);
                                          all kept: they are the long-range context

Byte layout of one block of a group: for each kind, a [members, per_block, *row] array in the
kind's dtype (rows fp32 or the compute dtype as above, everything else the compute dtype), members in layer order. With
kv_cache_dtype "fp8" the K=V rows ("kv", "ent:attn") are packed uint8 rows instead
([members, per_block, width], ops/kvfp8.py: FP8 nope dims + compute-dtype rope dims + scales).
DeepSeek-V4.1's groups are its own (v41/cache.py); with kv_cache_dtype "qat" its quantised kinds are
packed uint8 rows of a `KindSpec.qat` format (v41/kvpack.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dayzero.config import ModelArgs


# "auto": rows in the compute dtype; "fp8": DeepSeek-V4's K=V rows packed as FP8 nope + compute-dtype rope
# dims (ops/kvfp8.py; rounds the nope dims under numerics="transformers"); "qat": DeepSeek-V4.1's cached rows
# in the formats its QAT fake-quantisers produce (v41/kvpack.py: FP8 window, FP4 entries and indexer keys,
# lossless because the model caches quantiser outputs). Each model family refuses the other's value.
KV_CACHE_DTYPES = ("auto", "fp8", "qat")


@dataclass(frozen=True)
class KindSpec:
    row: tuple[int, ...]
    fp32: bool = False
    fp8_rope: int = 0  # > 0: a packed FP8 row (ops/kvfp8.py) whose last fp8_rope dims stay in the compute dtype
    dtype: torch.dtype | None = None  # a fixed row dtype whatever the compute dtype (V4.1's token ids: int64)
    qat: str = ""  # a V4.1 QAT row format (v41/kvpack.py FORMATS): the row packed as codes + scales

    def pool_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The pool's element dtype under compute dtype `dtype` (packed FP8 / QAT kinds: uint8)."""
        if self.fp8_rope or self.qat:
            return torch.uint8
        return self.dtype or (torch.float32 if self.fp32 else dtype)

    def layout(self, dtype: torch.dtype):
        """The packed row format of an FP8 or QAT kind in compute dtype `dtype` (None for other kinds)."""
        if self.qat:
            from dayzero.v41.kvpack import QatLayout
            return QatLayout(self.row[0], self.qat, dtype)
        if not self.fp8_rope:
            return None
        from dayzero.ops.kvfp8 import Fp8Layout
        return Fp8Layout(self.row[0], self.fp8_rope, dtype)

    def row_bytes(self, dtype: torch.dtype) -> int:
        if self.fp8_rope or self.qat:
            return self.layout(dtype).width
        return math.prod(self.row) * torch.tensor([], dtype=self.pool_dtype(dtype)).element_size()


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
        return sum(len(self.layers) * self.per_block * k.row_bytes(dtype) for k in self.kinds.values())

    def keep_from(self, num_tokens: int, window: int) -> int:
        """First token whose block this group still needs once `num_tokens` are computed."""
        if self.keep == "window":
            return max(num_tokens - window + 1, 0)
        if self.keep == "open-window":
            r = self.window_ratio
            return max(r * (num_tokens // r - (1 if self.overlap else 0)), 0)
        return 0


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")


def _check_v4(kv_cache_dtype: str) -> None:
    check_kv_cache_dtype(kv_cache_dtype)
    if kv_cache_dtype == "qat":
        raise ValueError("kv_cache_dtype='qat' is DeepSeek-V4.1's (its QAT row formats); DeepSeek-V4 takes 'auto' "
                         "or 'fp8'")


def drafter_layers(args: ModelArgs) -> int:
    """Window layers a checkpoint's drafter keeps per sequence: 1 for MTP, one per DSpark stage."""
    return args.dspark_stages or args.n_mtp_layers


def cache_groups(args: ModelArgs, block_size: int, with_mtp: bool, kv_cache_dtype: str = "auto",
                 fp32_rows: bool = True) -> list[GroupSpec]:
    """kv_cache_dtype "auto": every row in the compute dtype (compressor rows fp32 if `fp32_rows`);
    "fp8": K=V rows (window and compressed attention entries) packed as FP8 nope + compute-dtype
    rope dims. fp32_rows: the model's `fp32_compressor_rows` (official numerics)."""
    _check_v4(kv_cache_dtype)
    kv = KindSpec((args.head_dim,), fp8_rope=args.rope_head_dim if kv_cache_dtype == "fp8" else 0)
    ratios = sorted({r for r in args.compress_ratios if r})
    for r in ratios:
        if block_size % r:
            raise ValueError(f"block_size {block_size} must be a multiple of every compression ratio "
                             f"({ratios}): a block holds block_size/r compressed entries")
    # the drafter's window layers (with_mtp: speculation on): MTP's block, or DSpark's stages'
    # context rows, layer ids n_layers.. (engine/drafter.py)
    layers = tuple(range(args.n_layers + (drafter_layers(args) if with_mtp else 0)))
    groups = [GroupSpec("window", layers, {"kv": kv}, block_size, 1, "window")]
    for r in ratios:
        members = tuple(i for i in range(args.n_layers) if args.compress_ratios[i] == r)
        csa = args.layer_types[members[0]] == "csa"
        width = args.head_dim * (2 if csa else 1)
        rows = {"rows:attn": KindSpec((2, width), fp32=fp32_rows)}
        ents = {"ent:attn": kv}
        if csa:
            rows["rows:index"] = KindSpec((2, 2 * args.index_head_dim), fp32=fp32_rows)
            ents["ent:index"] = KindSpec((args.index_head_dim,))
        groups.append(GroupSpec(f"rows r{r}", members, rows, block_size, 1, "open-window", overlap=csa,
                                window_ratio=r))
        groups.append(GroupSpec(f"entries r{r}", members, ents, block_size // r, r, "all"))
    return groups


def model_cache_groups(model, block_size: int, with_mtp: bool, kv_cache_dtype: str = "auto") -> list[GroupSpec]:
    """The engine's cache groups for `model`: its own `cache_groups` where it has one (DeepSeek-V4.1,
    v41/served.py), else V4's from its args (compressor rows fp32 per `fp32_compressor_rows`)."""
    own = getattr(model, "cache_groups", None)
    if own is not None:
        return own(block_size, with_mtp, kv_cache_dtype)
    return cache_groups(model.args, block_size, with_mtp, kv_cache_dtype, model.fp32_compressor_rows)


def model_fixed_bytes(model, with_mtp: bool, kv_cache_dtype: str = "auto") -> int:
    """`fixed_bytes_per_sequence` of `model` (its own where it has one, as `model_cache_groups`)."""
    own = getattr(model, "fixed_bytes_per_sequence", None)
    if own is not None:
        return own(with_mtp, kv_cache_dtype)
    return fixed_bytes_per_sequence(model.args, model.compute_dtype, with_mtp, kv_cache_dtype,
                                    model.fp32_compressor_rows)


def _kv_row_bytes(args: ModelArgs, dtype: torch.dtype, kv_cache_dtype: str) -> int:
    _check_v4(kv_cache_dtype)
    return KindSpec((args.head_dim,), fp8_rope=args.rope_head_dim if kv_cache_dtype == "fp8" else 0).row_bytes(dtype)


def bytes_per_token(args: ModelArgs, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> dict[str, float]:
    """Long-range cache bytes per token per layer, by layer type (entries only; the window and
    compressor rows are a fixed cost per sequence)."""
    size = torch.tensor([], dtype=dtype).element_size()
    kv = _kv_row_bytes(args, dtype, kv_cache_dtype)
    out = {"sliding": 0.0}
    for t, r in zip(args.layer_types, args.compress_ratios):
        if t == "csa":
            out["csa"] = (kv + args.index_head_dim * size) / r
        elif t == "hca":
            out[f"hca r{r}"] = kv / r
    return out


def fixed_bytes_per_sequence(args: ModelArgs, dtype: torch.dtype, with_mtp: bool = False,
                             kv_cache_dtype: str = "auto", fp32_rows: bool = True) -> int:
    """Window rows (last window-1 tokens, every layer) and open compressor windows (rows fp32 if
    `fp32_rows`, else the compute dtype): the rows a sequence holds, not the whole blocks the
    engine pages them in (engine/capacity.py)."""
    n_win = args.n_layers + (drafter_layers(args) if with_mtp else 0)
    total = n_win * (args.window_size - 1) * _kv_row_bytes(args, dtype, kv_cache_dtype)
    size = 4 if fp32_rows else torch.tensor([], dtype=dtype).element_size()
    for t, r in zip(args.layer_types, args.compress_ratios):
        if t == "csa":
            total += 2 * r * 2 * (2 * args.head_dim + 2 * args.index_head_dim) * size
        elif t == "hca":
            total += r * 2 * args.head_dim * size
    return total


def kv_report(args: ModelArgs, dtype: torch.dtype, contexts=(8192, 131072, 1048576), kv_cache_dtype: str = "auto",
              fp32_rows: bool = True) -> dict:
    """Per-sequence cache bytes at each context length, from the same accounting the engine uses."""
    per_tok = bytes_per_token(args, dtype, kv_cache_dtype)
    by_layer = sum(per_tok["csa"] if t == "csa" else per_tok.get(f"hca r{r}", 0.0)
                   for t, r in zip(args.layer_types, args.compress_ratios))
    fixed = fixed_bytes_per_sequence(args, dtype, kv_cache_dtype=kv_cache_dtype, fp32_rows=fp32_rows)
    return {
        "kv_cache_dtype": kv_cache_dtype,
        "compressor_rows": "float32" if fp32_rows else str(dtype).removeprefix("torch."),
        "bytes_per_token_per_layer": per_tok,
        "bytes_per_token_all_layers": by_layer,
        "fixed_bytes_per_sequence": fixed,
        "per_sequence_bytes": {str(n): int(by_layer * n + fixed) for n in contexts},
    }
