"""The fake-quantisation points of DeepSeek-V4.1 that are part of its forward in every numerics mode
(QAT semantics: the model was trained through them; research/v41-and-dspark.md 1.5):

- window KV rows: FP8 e4m3, one power-of-two (UE8M0) scale per 32 channels, RoPE tail included;
- compressed KV entries: FP4 e2m1, one e4m3 scale per 16 channels;
- indexer keys and queries: FP4 e2m1, one power-of-two scale per 32 channels (no Hadamard, unlike V4).

A row whose width is not a multiple of the block stays unquantised (as in transformers'
`deepseek_v41`, which cannot block such widths; only tiny test shapes have them). Rounding is the
twins' (ops/ref.py: fp8_act_sim, fp4_round): round to nearest, ties to the even code.
"""
from __future__ import annotations

import torch

from dayzero.ops import ref

WINDOW_BLOCK = 32
ENTRY_BLOCK = 16
INDEX_BLOCK = 32
_E4M3_SCALE_FLOOR = ref.FP4_MAX * 2.0 ** -9  # amax floor: the smallest e4m3 subnormal scale, times 6


def window_kv(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % WINDOW_BLOCK:
        return x
    return ref.fp8_act_sim(x, WINDOW_BLOCK)


def index_qk(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % INDEX_BLOCK:
        return x
    return ref.fp4_act_sim(x, INDEX_BLOCK)


def compressed_kv(x: torch.Tensor) -> torch.Tensor:
    """FP4 e2m1 values with an e4m3 (not power-of-two) scale per 16: scale = e4m3(amax / 6), the
    quotient clamped to the e2m1 range before rounding."""
    n = x.shape[-1]
    if n % ENTRY_BLOCK:
        return x
    b = x.float().unflatten(-1, (-1, ENTRY_BLOCK))
    scale = (b.abs().amax(-1, keepdim=True).clamp(min=_E4M3_SCALE_FLOOR) / ref.FP4_MAX)
    scale = scale.to(torch.float8_e4m3fn).float()
    q = ref.fp4_round((b / scale).clamp(-ref.FP4_MAX, ref.FP4_MAX)) * scale
    return q.flatten(-2).to(x.dtype)
