"""The bounded-replay prefill of V4.1's causal encoder-decoder schedule: an opt-in approximation
(research/v41-and-dspark.md 1.3, "CED": TRT-LLM's "approximate bounded replay", vLLM's decoder replay).

The decoder layers are the layers strictly after the last KV source (V4.1-Flash: 21..39; the last KV
source, 20, is the candidate source and runs in full). They own only their sliding-window K=V rows: no
compressor, no indexer keys; they read the last KV source's compressed entries, which the encoder
part computes on every token. A token's window reaches `window` rows back (itself included), so after
a prompt of L tokens no later token reads a decoder layer's row below L - window + 1. The peers run
the decoder layers, in prefill, on each request's last `window` prompt tokens only; so does this:

- a sequence's replay floor f = max(0, L - window) (`replay_start`): the decoder layers run only on
  positions >= f; every layer up to and including the last KV source runs on every token (exact);
- a kept token's decoder-layer window is cut at f: it reads the rows at max(f, p - window + 1) .. p
  (the rows below f were never computed). This is the approximation: the exact prefill's rows at
  f .. L - 1 saw the decoder layers' full history; here the first kept token sees only itself;
- the positions below f produce no hidden state and no logits: `forward_packed` returns NaN rows for
  them (`forward`: NaN logits rows), so no one can read them by mistake;
- when L <= window, f = 0 and the call is the exact prefill, bit for bit (the same code path).

The floor is a per-sequence, per-request constant: every call of that sequence (prefill chunks and
decode) passes the same floor, so chunked prefill, batching and preemption still change no bit of the
approximated result (the rows a kept token reads do not depend on how the prompt was split), and a
decode token at p >= L reads rows >= p - window + 1 > f, all of which were computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dayzero.reference.model import ModelState
from dayzero.reference.seqcache import Batch


def replay_start(prompt_len: int, window: int) -> int:
    """The replay floor of a prompt of `prompt_len` tokens: its last `window` tokens run the decoder layers."""
    return max(0, int(prompt_len) - int(window))


def decoder_layers(args) -> range:
    """The layers that bounded replay skips on the tokens below the floor: those strictly after the
    last KV source (empty when the schedule has no KV source: then no layer reads compressed KV and
    every layer's state is exact only over the full history, so nothing may be skipped)."""
    kv = list(args.kv_source_layers)
    return range(kv[-1] + 1, args.n_layers) if kv else range(args.n_layers, args.n_layers)


@dataclass
class V41State(ModelState):
    """The reference's per-batch state plus the batch's replay floor (None: exact prefill), fixed by
    the call that prefilled with bounded replay and applied to every later call."""
    replay_from: int | None = None


class ReplayBatch(Batch):
    """The kept tokens of `batch` (positions >= its member's floor, in order) as a Batch over the same
    cache, whose window lookups stop at the floor. Members with no kept token are left out."""

    def __init__(self, batch: Batch, floors: Sequence[int]):
        starts, lengths, ids = [], [], []
        for s, n, i, f in zip(batch.starts, batch.lengths, batch.ids, floors):
            lo = max(s, f)
            if lo < s + n:
                starts.append(lo)
                lengths.append(s + n - lo)
                ids.append(i)
        super().__init__(starts, lengths, batch.cache, batch.positions.device, ids)
        by_id = dict(zip(batch.ids, floors))
        self.floor = torch.tensor([by_id[i] for i, n in zip(ids, lengths) for _ in range(n)], dtype=torch.long,
                                  device=batch.positions.device)

    def window(self, size: int, offset: int = 0):
        memo = self.__dict__.setdefault("_window", {})
        got = memo.get((size, offset))
        if got is None:
            pos = self.positions[:, None] - size + 1 + torch.arange(size, device=self.positions.device)[None, :]
            got = memo[(size, offset)] = (self.seq[:, None], pos + offset, pos >= self.floor[:, None])
        return got


def kept_rows(batch: Batch, floors: Sequence[int]) -> torch.Tensor:
    """bool [N]: the batch's tokens at or above their member's floor (the rows ReplayBatch keeps, in order)."""
    by_member = torch.tensor([f for f, n in zip(floors, batch.lengths) for _ in range(n)], dtype=torch.long,
                             device=batch.positions.device)
    return batch.positions >= by_member


def check_floors(batch: Batch, replay_from) -> list[int] | None:
    """`replay_from` (one floor per batch member, or None) validated -> a list, or None when every
    floor is 0 (nothing to skip: the exact path)."""
    if replay_from is None:
        return None
    if not hasattr(batch, "lengths"):
        raise ValueError(f"bounded replay needs each sequence's starts and lengths; a {type(batch).__name__} "
                         f"(a recorded CUDA-graph step) has none: run bounded-replay prefill eagerly")
    floors = list(replay_from)
    if len(floors) != len(batch.lengths):
        raise ValueError(f"replay_from has {len(floors)} entries but the batch has {len(batch.lengths)} sequences "
                         f"(one replay floor per sequence: replay_start(prompt length, window), 0 for exact)")
    for j, f in enumerate(floors):
        if not isinstance(f, int) or isinstance(f, bool) or f < 0:
            raise ValueError(f"replay_from[{j}] is {f!r}: a replay floor is a token position >= 0 "
                             f"(0: exact prefill)")
    return floors if any(floors) else None


def engine_floor(request, window: int) -> int:
    """The engine's replay floor of a request (engine option `v41_bounded_replay`): fixed by its ORIGINAL
    prompt, so a recompute after preemption (prompt + generated tokens) uses the same floor; 0 for none."""
    return 0 if request is None else replay_start(len(request.prompt_ids), window)


def refuse_v41_options(eargs) -> None:
    """A DeepSeek-V4 model's refusal of the engine options that exist for V4.1 only."""
    if getattr(eargs, "v41_bounded_replay", False):
        raise ValueError("v41_bounded_replay=True: bounded replay is DeepSeek-V4.1's causal encoder-decoder "
                         "approximation (its layers after the last KV source); this is a DeepSeek-V4 model, which "
                         "has no such layers: drop the option (docs/V41.md)")
