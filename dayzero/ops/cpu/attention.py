"""Sparse MQA attention over paged KV pools and the lightning-indexer scores: native CPU kernels
(attention.c) behind the twins' signatures (ops/ref.py sparse_attn_paged, indexer_scores_paged).

Keys are read from the pools by index inside the kernel (nothing gathered), fp32 or bf16
activations and pools, FP8-packed pools (ops/kvfp8.Fp8Rows, bf16 or fp32 rope dims; decoded as
read), int32 or int64 indices (row strides passed through, so views are not copied). Anything else (fp16, non-CPU tensors, more than two sources) runs the twin. Index values
outside the pool count as no key (the twin raises instead).

Per-call overhead matters (a few calls per layer per decode step): each wrapper is a handful of
attribute reads, one output allocation and one ctypes call whose arguments travel as one packed
int64 block (`struct.pack` bytes; ctypes converts ~25 separate arguments ~4x slower).
"""
from __future__ import annotations

import struct

import torch

from dayzero.ops import ref
from dayzero.ops.cpu import build
from dayzero.ops.kvfp8 import Fp8Rows

_FLOAT = {torch.float32: 0, torch.bfloat16: 1}
_FP8 = {torch.bfloat16: 2, torch.float32: 3}  # attention.c FMT_FP8_* by rope dtype
_INT = {torch.int32: 0, torch.int64: 1}
_ATTN_ARGS = struct.Struct("=27qd")  # dz_sparse_attn_packed's argument block
_INDEX_ARGS = struct.Struct("=16q")  # dz_indexer_scores_packed's
_kernels: dict[str, object] = {}


def _kernel(name: str):
    fn = _kernels.get(name)
    if fn is None:
        fn = _kernels[name] = build.function("attention", name, "p")
    return fn


def _source(src, N: int, D: int):
    """(pool address, format, row stride, rows P, idx address, int64 flag, idx row stride, K,
    pool, idx) of a (pool [P, D], idx [N, K]) pair as the kernel reads it (views with unit element
    strides as they are; the tensors last, to keep any contiguous copy alive over the call), or
    None when the kernel cannot read it. An Fp8Rows pool: its bytes, row stride in bytes."""
    pool, idx = src
    if isinstance(pool, Fp8Rows):
        data, fmt, li = pool.data, _FP8.get(pool.layout.rope_dtype), _INT.get(idx.dtype)
        if fmt is None or li is None or pool.layout.dim != D or not data.is_cpu or not idx.is_cpu:
            return None
        if idx.dim() != 2 or idx.shape[0] != N:
            return None
        if idx.stride(1) != 1 and idx.shape[1] > 1:
            idx = idx.contiguous()
        return (data.data_ptr(), fmt, data.stride(0), data.shape[0], idx.data_ptr(), li, idx.stride(0),
                idx.shape[1], data, idx)
    if not isinstance(pool, torch.Tensor):
        return None
    pb, li = _FLOAT.get(pool.dtype), _INT.get(idx.dtype)
    if pb is None or li is None or not pool.is_cpu or not idx.is_cpu:
        return None
    ps, ish = pool.shape, idx.shape
    if len(ps) != 2 or ps[1] != D or len(ish) != 2 or ish[0] != N:
        return None
    pst, ist = pool.stride(), idx.stride()
    if pst[1] != 1:
        pool = pool.contiguous()
        pst = pool.stride()
    if ist[1] != 1 and ish[1] > 1:
        idx = idx.contiguous()
        ist = idx.stride()
    return pool.data_ptr(), pb, pst[0], ps[0], idx.data_ptr(), li, ist[0], ish[1], pool, idx


def sparse_attn_paged(q: torch.Tensor, sources: list[tuple[torch.Tensor, torch.Tensor]], sink: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """q [N,H,D]; sources: 1 or 2 (pool [P,D] or Fp8Rows, idx [N,K] int32/64, -1 = none); sink [H]
    -> [N,H,D] in q.dtype (ref.sparse_attn_paged)."""
    qb, qs, ns = _FLOAT.get(q.dtype), q.shape, len(sources)
    if qb is None or not q.is_cpu or len(qs) != 3 or not 1 <= ns <= 2:
        return ref.sparse_attn_paged(q, sources, sink, scale)
    N, H, D = qs
    s0 = _source(sources[0], N, D)
    s1 = _source(sources[1], N, D) if ns == 2 else s0
    if s0 is None or s1 is None or not sink.is_cpu or sink.shape != (H,):
        return ref.sparse_attn_paged(q, sources, sink, scale)
    layouts = {src[0].layout for src in sources if isinstance(src[0], Fp8Rows)}
    if len(layouts) > 1:  # one FP8 row layout per call
        return ref.sparse_attn_paged(q, sources, sink, scale)
    lay = layouts.pop() if layouts else None
    q = q.contiguous()
    if sink.dtype != torch.float32 or not sink.is_contiguous():
        sink = sink.float().contiguous()
    out = torch.empty_like(q)
    _kernel("dz_sparse_attn_packed")(_ATTN_ARGS.pack(
        q.data_ptr(), qb, N, H, D, *s0[:7], s0[7], *s1[:7], s1[7] if ns == 2 else 0,
        sink.data_ptr(), out.data_ptr(), torch.get_num_threads(),
        *((lay.nope, lay.rope_off, lay.scale_off) if lay is not None else (0, 0, 0)), scale))
    return out


def indexer_scores_paged(q: torch.Tensor, w: torch.Tensor, pool: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """q [N,H,Di], w [N,H], pool [P,Di], idx [N,T] (-1 = none) -> fp32 [N,T]
    (ref.indexer_scores_paged)."""
    qb, qs = _FLOAT.get(q.dtype), q.shape
    if qb is None or not q.is_cpu or len(qs) != 3 or not w.is_cpu or not w.is_floating_point():
        return ref.indexer_scores_paged(q, w, pool, idx)
    N, H, Di = qs
    src = _source((pool, idx), N, Di)
    if src is None or src[1] > 1 or w.shape != (N, H):  # FP8-packed pools: the twin
        return ref.indexer_scores_paged(q, w, pool, idx)
    q = q.contiguous()
    if w.dtype != torch.float32 or not w.is_contiguous():
        w = w.float().contiguous()
    out = torch.empty((N, src[7]), dtype=torch.float32)
    _kernel("dz_indexer_scores_packed")(_INDEX_ARGS.pack(
        q.data_ptr(), qb, N, H, Di, w.data_ptr(), *src[:8], out.data_ptr(), torch.get_num_threads()))
    return out
