"""The indexer's top-k selection (topk.c), the twin ref.topk_select: a radix select per row over
order-preserving keys instead of sorting all T scores; the same integers as the twin's stable sort,
ties, -0.0 / +0.0 and -inf rows included."""
from __future__ import annotations

import ctypes

import torch

from dayzero.ops import ref
from dayzero.ops.cpu import build

_kernel = build.function("topk", "dz_topk_select", "piiiippi")


def topk_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    # supported: fp32 [N, T] CPU tensors with T < 2^32 and an int k >= 0; anything else -> the twin
    if (not isinstance(scores, torch.Tensor) or scores.dtype != torch.float32 or not scores.is_cpu
            or scores.dim() != 2 or isinstance(k, bool) or not isinstance(k, int) or k < 0
            or scores.shape[1] >= 1 << 32):
        return ref.topk_select(scores, k)
    N, T = scores.shape
    m = min(k, T)
    out = torch.empty(N, m, dtype=torch.int64)
    if out.numel() == 0:
        return out
    if scores.stride(1) != 1 or scores.stride(0) < T:
        scores = scores.contiguous()
    status = ctypes.c_int64(0)
    _kernel(scores.data_ptr(), N, T, scores.stride(0), k, out.data_ptr(), ctypes.addressof(status),
            torch.get_num_threads())
    if status.value:
        raise MemoryError("topk_select: the native kernel could not allocate its scratch")
    return out
