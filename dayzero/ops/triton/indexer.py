"""The lightning indexer's scores over a paged key pool (twin: ops/ref.py indexer_scores_paged).

indexer_scores_paged: grid (N * ceil(T / (BLOCK_T * TILES))): one program = one query, TILES
blocks of BLOCK_T entries. All H heads of q [H, Di] (V4: 64 x 128 bf16 = 16 KiB) stay in
registers; each key block [BLOCK_T, Di] is gathered once, s = q @ keys^T [H, BLOCK_T], relu,
weighted by w [H] and summed over heads in registers; only fp32 [BLOCK_T] scores are written.

As in attention.py, the interpreter's tl.dot is wrong on 16-bit operands: USE_F32 (under
TRITON_INTERPRET=1, or when an operand is fp32) feeds the dot fp32 in IEEE precision.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dayzero.ops.triton import tuning
from dayzero.ops.triton.attention import _check_float, _check_idx, _rand_idx, _rows, _use_f32


def _indexer_key(h: int, di: int) -> str:
    """The head shape only: BLOCK_T and num_warps shape the sum over heads (batch invariance)."""
    return f"D{di}-H{h}"


@triton.jit
def _indexer_kernel(q_ptr, w_ptr, pool, s_pool, idx_ptr, s_idx, out_ptr, H, DI, T, n_tb,
                    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                    TILES: tl.constexpr, USE_F32: tl.constexpr):
    pid = tl.program_id(0)
    n = (pid // n_tb).to(tl.int64)
    tb = pid % n_tb
    offs_h = tl.arange(0, BLOCK_H)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < H
    d_ok = offs_d < DI
    q = tl.load(q_ptr + (n * H + offs_h)[:, None] * DI + offs_d[None, :], mask=h_ok[:, None] & d_ok[None, :],
                other=0.0)
    if USE_F32:
        q = q.to(tl.float32)
    w = tl.load(w_ptr + n * H + offs_h, mask=h_ok, other=0.0).to(tl.float32)  # padded heads weigh 0
    for i in range(TILES):
        t = (tb * TILES + i) * BLOCK_T + offs_t
        t_ok = t < T
        ids = tl.load(idx_ptr + n * s_idx + t, mask=t_ok, other=-1).to(tl.int64)
        ok = ids >= 0
        k = tl.load(pool + ids[:, None] * s_pool + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        if USE_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)))
        r = tl.sum(tl.maximum(s, 0.0) * w[:, None], axis=0)
        tl.store(out_ptr + n * T + t, tl.where(ok, r, float("-inf")), mask=t_ok)


IDX_DEFAULT = {"BLOCK_T": 64, "TILES": 1, "num_warps": 4, "num_stages": 2}


def indexer_scores_paged(q: torch.Tensor, w: torch.Tensor, pool: torch.Tensor, idx: torch.Tensor, *,
                         config: dict | None = None) -> torch.Tensor:
    """q [N,H,Di], w [N,H], pool [P,Di], idx [N,T] (-1 = none) -> fp32 [N,T] (see ref.indexer_scores_paged)."""
    _check_float("q", q, 3)
    N, H, DI = q.shape
    dev = q.device
    _check_float("w", w, 2)
    if w.shape != (N, H) or w.device != dev:
        raise ValueError(f"w must be [{N}, {H}] on {dev}, got {tuple(w.shape)} on {w.device}")
    pool = _rows("pool", pool, DI, dev)
    idx = _check_idx("idx", idx, N, dev)
    T = idx.shape[1]
    out = torch.empty(N, T, device=dev, dtype=torch.float32)
    if N == 0 or T == 0:
        return out
    if H == 0:
        return out.fill_(0.0).masked_fill_(idx < 0, float("-inf"))
    q, w = q.contiguous(), w.contiguous()
    key = _indexer_key(H, DI)
    cfg = {**IDX_DEFAULT, **(config if config is not None
                             else tuning.config("indexer_scores_paged", key, IDX_DEFAULT, dev))}
    block_t, tiles = int(cfg["BLOCK_T"]), int(cfg["TILES"])
    n_tb = triton.cdiv(T, block_t * tiles)
    _indexer_kernel[(N * n_tb,)](
        q, w, pool, pool.stride(0), idx, idx.stride(0), out, H, DI, T, n_tb,
        BLOCK_H=max(16, triton.next_power_of_2(H)), BLOCK_T=block_t, BLOCK_D=max(16, triton.next_power_of_2(DI)),
        TILES=tiles, USE_F32=_use_f32(q, pool), num_warps=int(cfg["num_warps"]), num_stages=int(cfg["num_stages"]))
    return out


def _indexer_cases(device: torch.device):
    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda":  # 64 index heads x 128; 256K tokens of context / 4 = 64K entries
        H, DI, dt, P, shapes = 64, 128, torch.bfloat16, 1 << 16, [(1, 1 << 16), (256, 1 << 14)]
    else:
        H, DI, dt, P, shapes = 4, 32, torch.float32, 64, [(2, 70), (70, 20)]
    out = []
    for n, t in shapes:
        q = torch.randn(n, H, DI, generator=gen).to(device, dt)
        w = torch.randn(n, H, generator=gen).to(device, dt)
        pool = torch.randn(P, DI, generator=gen).to(device, dt)
        idx = _rand_idx(n, t, P, device, gen)
        out.append((_indexer_key(H, DI),
                    lambda cfg, q=q, w=w, p=pool, i=idx: indexer_scores_paged(q, w, p, i, config=cfg)))
    return out


TUNABLES = {
    "indexer_scores_paged": tuning.Tunable(space=(
        IDX_DEFAULT,
        {"BLOCK_T": 128, "TILES": 1, "num_warps": 8, "num_stages": 2},
        {"BLOCK_T": 32, "TILES": 1, "num_warps": 4, "num_stages": 2},
        {"BLOCK_T": 64, "TILES": 4, "num_warps": 4, "num_stages": 3},
        {"BLOCK_T": 128, "TILES": 2, "num_warps": 4, "num_stages": 2},
    ), cases=_indexer_cases),
}
