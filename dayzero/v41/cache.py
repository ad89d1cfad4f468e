"""The paged cache groups of DeepSeek-V4.1 (cache/spec.py `GroupSpec`s; the engine's pools are
cache/paged.py, its block tables cache/manager.py).

What the V4.1 forward keeps between calls (v41/attention.py, v41/engram.py), as groups of the
engine's paged cache, every group paged in blocks of `block_size` tokens:

  window           ("kv")          every backbone layer (and, speculation on, each DSpark stage at layer
                                   n_layers + i: its context row of position p stored at p + 1): one
                                   K=V row [head_dim] per token; a request keeps the blocks of its last
                                   `window - 1` tokens
  entries L<s>     ("c:ent",       ONE pool per KV source s (ratio r), shared by its whole group:
                    "c:key")       compressed entry i [head_dim] and indexer key i [index_head_dim],
                                   bs / r per block; all kept (the long-range context)
  rows L<s>        ("c:rows")      pooled (ratio-2) sources only: the compressor's fp32 (kv, gate)
                                   projections [2, head_dim] per token, kept from the start of the
                                   open pooling window
  engram           ("engram:tok")  Engram models only, layer -1: the sequence's compressed token id
                                   per token (int64: ids round-trip exactly), the n-gram history;
                                   kept like the window (the hash reads the last max_ngram - 1)

Rows are in the compute dtype except "c:rows" (fp32, as the compressor computes them) and
"engram:tok" (int64). kv_cache_dtype "qat" stores "kv", "c:ent" and "c:key" in the formats the model's
QAT fake-quantisers produce (v41/kvpack.py: FP8 e4m3 + UE8M0 per 32, FP4 e2m1 + e4m3 per 16, FP4 e2m1 +
UE8M0 per 32): the model caches quantiser outputs (v41/attention.py), so the packed pools decode to
the same rows bit for bit. A kind whose width is not a multiple of its quantiser's block is cached
unquantised by the model (v41/quant.py) and stays in the compute dtype. "c:rows" (the compressor's
pre-quantisation projections) and "engram:tok" are never packed. `bytes_per_token` for V4.1-Flash:
3,200 B/token in bf16 ("auto"), 890 with "qat" (v41/presets.py `kv_plan`'s QAT figure: the same rows,
no padding); 6,400 in fp32.
"""
from __future__ import annotations

import torch

from dayzero.cache.spec import GroupSpec, KindSpec, check_kv_cache_dtype
from dayzero.v41 import quant
from dayzero.v41.config import V41Args
from dayzero.v41.engram import HISTORY

TOKEN_DTYPE = torch.int64  # the Engram history's rows: compressed token ids, stored exactly


QAT_FORMATS = {"kv": ("fp8", quant.WINDOW_BLOCK), "c:ent": ("fp4_e4m3", quant.ENTRY_BLOCK),
               "c:key": ("fp4_ue8m0", quant.INDEX_BLOCK)}  # kind -> (v41/kvpack.py format, quantiser block)


def _check(args: V41Args, block_size: int, kv_cache_dtype: str) -> None:
    check_kv_cache_dtype(kv_cache_dtype)
    if kv_cache_dtype == "fp8":
        raise ValueError("kv_cache_dtype='fp8': DeepSeek-V4.1's cache has no packed FP8 rows of V4's format (FP8 "
                         "nope + bf16 rope dims); use 'qat' (its rows in their QAT formats, lossless) or 'auto'")
    ratios = sorted({r for r in args.compress_ratios if r})
    for r in ratios:
        if block_size % r:
            raise ValueError(f"block_size {block_size} must be a multiple of every compression ratio "
                             f"({ratios}): a block holds block_size/r compressed entries")
    if args.engram_layer_ids and args.engram_max_ngram_size > args.window_size:
        raise ValueError(f"engram_max_ngram_size {args.engram_max_ngram_size} exceeds the window of "
                         f"{args.window_size} tokens: the paged cache keeps the n-gram history for the window")


def _kind(kind: str, width: int, kv_cache_dtype: str) -> KindSpec:
    """A quantised kind's spec: packed in its QAT format under "qat" where the model quantises it."""
    fmt, block = QAT_FORMATS[kind]
    return KindSpec((width,), qat=fmt if kv_cache_dtype == "qat" and width % block == 0 else "")


def v41_cache_groups(args: V41Args, block_size: int, kv_cache_dtype: str = "auto", stages: int = 0
                     ) -> list[GroupSpec]:
    """The cache groups of a V4.1 model (module docstring; `stages`: the DSpark stages' window layers, 0
    without speculation). ValueError naming the setting when `block_size` is not a multiple of every
    ratio, or for kv_cache_dtype "fp8" (V4's format)."""
    _check(args, block_size, kv_cache_dtype)
    layers = tuple(range(args.n_layers + stages))
    groups = [GroupSpec("window", layers, {"kv": _kind("kv", args.head_dim, kv_cache_dtype)},
                        block_size, 1, "window")]
    for layer in args.layers:
        if not layer.is_kv_source:
            continue
        s, r = layer.layer_id, layer.compress_ratio
        if layer.pooled:
            groups.append(GroupSpec(f"rows L{s}", (s,), {"c:rows": KindSpec((2, args.head_dim), fp32=True)},
                                    block_size, 1, "open-window", window_ratio=r))
        groups.append(GroupSpec(f"entries L{s}", (s,), {"c:ent": _kind("c:ent", args.head_dim, kv_cache_dtype),
                                                         "c:key": _kind("c:key", args.index_head_dim, kv_cache_dtype)},
                                block_size // r, r, "all"))
    if args.engram_layer_ids:
        layer, kind = HISTORY
        groups.append(GroupSpec("engram", (layer,), {kind: KindSpec((), dtype=TOKEN_DTYPE)}, block_size, 1, "window"))
    return groups


def bytes_per_token(args: V41Args, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> float:
    """Compressed entries + indexer keys per token over every KV-source group (the window, the
    pooling rows and the Engram history are a fixed cost per sequence), as the pools store them."""
    check_kv_cache_dtype(kv_cache_dtype)
    ent = _kind("c:ent", args.head_dim, kv_cache_dtype).row_bytes(dtype)
    key = _kind("c:key", args.index_head_dim, kv_cache_dtype).row_bytes(dtype)
    return sum((ent + key) / layer.compress_ratio for layer in args.layers if layer.is_kv_source)


def fixed_bytes_per_sequence(args: V41Args, dtype: torch.dtype, kv_cache_dtype: str = "auto", stages: int = 0) -> int:
    """Window rows (last window - 1 tokens, every layer and DSpark stage in use), open pooling windows (fp32)
    and the Engram history (last max_ngram - 1 ids): the rows a sequence holds, not the whole blocks paging them."""
    check_kv_cache_dtype(kv_cache_dtype)
    total = (args.n_layers + stages) * (args.window_size - 1) * _kind("kv", args.head_dim, kv_cache_dtype).row_bytes(dtype)
    total += sum(layer.compress_ratio * 2 * args.head_dim * 4 for layer in args.layers if layer.is_kv_source and layer.pooled)
    if args.engram_layer_ids:
        total += (args.engram_max_ngram_size - 1) * torch.tensor([], dtype=TOKEN_DTYPE).element_size()
    return total
