"""The CSA2 layer schedule of DeepSeek-V4.1 as per-layer descriptors, and its validation
(research/v41-and-dspark.md 1.3; the semantics are those of transformers' `deepseek_v41`).

Every layer keeps a sliding window of raw KV. A layer with compress ratio r > 0 also attends over a
compressed KV shared by its group:
- KV source (`kv_source_layers`): owns the compressor (ratio 2: pooled by 2 with a gate; ratio 1:
  unpooled, no gate) and the indexer keys (`indexer.wk` on the latent); layers after it up to the
  next KV source read its compressed KV and keys.
- index source (`index_source_layers`): runs the indexer queries against its KV source's keys and
  publishes a top-k; layers after it up to the next index source reuse that top-k.
- candidate source (`candidate_source_layer`, < 0: none): an index source that also publishes the
  top `candidate_topk_blocks` blocks of `candidate_block_size` compressed positions; every later
  index source scores only inside them.
Role names follow the "SWA / Full / Reindex / Reuse" plan: sliding (r = 0), full (KV source, which
is always an index source), reindex (index source reading an earlier KV source's keys), reuse.

The rules checked here are the oracle's own (range, ratio > 0 for sources, a source at or before
every compressed layer, the candidate source is an index source) plus three it does not check and
whose violation makes its computation meaningless (shapes or positions of one group read by
another): a KV source is an index source, a compressed layer has its KV source's ratio, and no KV
source follows the candidate source.
"""
from __future__ import annotations

from dataclasses import dataclass

from dayzero.config_keys import ConfigError

RATIOS = (0, 1, 2)  # V4.1: 0 sliding only, 1 unpooled compressed KV ("decoder"), 2 pooled by 2 ("encoder")


@dataclass(frozen=True)
class V41Layer:
    """What one backbone layer owns and reads. Layer ids are absolute; a source points at itself."""
    layer_id: int
    compress_ratio: int
    kv_source: int | None  # whose compressed KV (and indexer keys) it reads; None: sliding only
    index_source: int | None  # whose top-k selects its compressed rows; None: sliding only
    candidate_source: int | None  # index sources after the candidate layer: whose blocks bound the top-k
    publishes_candidates: bool
    engram: bool

    @property
    def sliding_only(self) -> bool:
        return self.compress_ratio == 0

    @property
    def is_kv_source(self) -> bool:
        return self.kv_source == self.layer_id

    @property
    def is_index_source(self) -> bool:
        return self.index_source == self.layer_id

    @property
    def pooled(self) -> bool:
        """A KV source with ratio > 1 pools tokens with a gate (`compressor.wgate`); ratio 1 does not."""
        return self.is_kv_source and self.compress_ratio > 1

    @property
    def rope(self) -> str:
        """"compress": compress_rope_theta with YaRN; "main": rope_theta without (ratio 0)."""
        return "compress" if self.compress_ratio else "main"

    @property
    def role(self) -> str:
        if self.sliding_only:
            return "sliding"
        if self.is_kv_source:
            return "full"
        return "reindex" if self.is_index_source else "reuse"


def _bad(field: str, why: str) -> ConfigError:
    return ConfigError(f"config field `{field}`: {why}")


def _check_ids(field: str, ids: tuple, n: int, what: str = "layer ids") -> None:
    for j, i in enumerate(ids):
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n:
            raise _bad(field, f"entry {j} is {i!r}, not a backbone {what[:-1]} in [0, {n}) (`n_layers` = {n})")
        if j and i <= ids[j - 1]:
            raise _bad(field, f"must be strictly increasing {what}; entry {j} is layer {i} after layer {ids[j - 1]}")


def validate_schedule(n_layers: int, ratios: tuple, kv_sources: tuple, index_sources: tuple,
                      candidate_source: int, engram_layers: tuple = ()) -> None:
    """Raise ConfigError naming the field, the layer and the value of the first inconsistency."""
    if len(ratios) != n_layers:
        raise _bad("compress_ratios", f"has {len(ratios)} backbone entries but `n_layers` is {n_layers}")
    for i, r in enumerate(ratios):
        if not isinstance(r, int) or isinstance(r, bool) or r not in RATIOS:
            raise _bad("compress_ratios", f"layer {i} has ratio {r!r} (V4.1 allows {', '.join(map(str, RATIOS))})")
    _check_ids("kv_source_layers", kv_sources, n_layers)
    _check_ids("index_source_layers", index_sources, n_layers)
    for field, ids in (("kv_source_layers", kv_sources), ("index_source_layers", index_sources)):
        for i in ids:
            if ratios[i] == 0:
                raise _bad(field, f"layer {i} is a source but its `compress_ratios` entry is 0 (sliding only)")
    for i in kv_sources:
        if i not in index_sources:
            raise _bad("index_source_layers", f"layer {i} is a KV source but not an index source: its indexer "
                                              f"owns the group's keys (`indexer.wk`), so it must be listed")
    for i, r in enumerate(ratios):
        if r == 0:
            continue
        src = max((s for s in kv_sources if s <= i), default=None)
        if src is None:
            raise _bad("kv_source_layers", f"layer {i} has compress ratio {r} but no KV source at or before "
                                           f"it (first KV source: {kv_sources[0] if kv_sources else 'none'})")
        if ratios[src] != r:
            raise _bad("compress_ratios", f"layer {i} has ratio {r} but reads the compressed KV of layer "
                                          f"{src}, whose ratio is {ratios[src]}")
    if not isinstance(candidate_source, int) or isinstance(candidate_source, bool) or candidate_source >= n_layers:
        raise _bad("candidate_source_layer", f"{candidate_source!r} is not a layer id below `n_layers` = "
                                             f"{n_layers} (a negative value turns candidates off)")
    if candidate_source >= 0:
        if candidate_source not in index_sources:
            raise _bad("candidate_source_layer", f"layer {candidate_source} is not an index source "
                                                 f"(index sources: {list(index_sources)})")
        later = [s for s in kv_sources if s > candidate_source]
        if later:
            raise _bad("candidate_source_layer", f"layer {candidate_source}'s candidate blocks index its own "
                                                 f"KV group, but KV source layer {later[0]} follows it")
    seen = set()
    for j, i in enumerate(engram_layers):
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_layers or i in seen:
            raise _bad("engram_layer_ids", f"entry {j} is {i!r}: must be a distinct layer id in [0, {n_layers})")
        seen.add(i)


def derive_layers(n_layers: int, ratios: tuple, kv_sources: tuple, index_sources: tuple,
                  candidate_source: int, engram_layers: tuple = ()) -> tuple[V41Layer, ...]:
    validate_schedule(n_layers, ratios, kv_sources, index_sources, candidate_source, engram_layers)
    layers = []
    for i, r in enumerate(ratios):
        kv = idx = cand = None
        if r:
            kv = max(s for s in kv_sources if s <= i)
            idx = max(s for s in index_sources if s <= i)  # exists: kv is an index source
            if idx == i and 0 <= candidate_source < i:
                cand = candidate_source
        layers.append(V41Layer(layer_id=i, compress_ratio=r, kv_source=kv, index_source=idx,
                               candidate_source=cand, publishes_candidates=(i == candidate_source),
                               engram=i in engram_layers))
    return tuple(layers)
