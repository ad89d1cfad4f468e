"""Routed experts with FP4 weights stacked over experts, on gemm.py's in-kernel decoding.

MoE: the N*k (token, slot) pairs are sorted by expert; a tile table (expert, first row, end row)
is built on device without a host sync. Kernel 1, grid (row tiles, inter tiles): rows gathered
through the token index, w1 and w3 both decoded, swiglu + routing weight fused, h [N*k, inter]
in x.dtype (sorted order). Kernel 2, grid (row tiles, dim tiles): h @ w2^T stored, in x.dtype,
at each pair's own row; the k slots of a token are then summed in fp32 in slot order. Each
touched expert's weights are read once per row tile (once in decode, when its rows fit a tile).

Batch invariance (issue 20): the config (BLOCK_M, BLOCK_K, ...: the tiles and so the reduction
order over dim and inter) is looked up by the expert shape "D-I-E-k" only, never the token
count, and K is walked whole in BLOCK_K steps (no split-K): a (token, slot) row computes the same
whether its expert's tile holds 1 or BLOCK_M rows. The default is the decode tile (16 rows) for
every N, where 64-row tiles were chosen above 64 tokens before: prefill reads each expert's
weights once per 16 rows instead of 64 (expected slower prefill, not measured: no GPU was lent).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dayzero.ops.triton import tuning
from dayzero.ops.triton.gemm import _check_cfg, _fp4_group, _interp, _rand_fp4, _round, _scale_arg, _x2d


# ---- routed experts -------------------------------------------------------------------------------
@triton.jit
def _moe_up_kernel(X, RW, PAIR, TE, TS, TEND, W1, S1, W3, S3, H, DIM, INTER, TOPK, sxm, swe, swo, sse, sso, LIMIT,
                   BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, E8M0: tl.constexpr,
                   CLAMP: tl.constexpr, INTERP: tl.constexpr, IEEE: tl.constexpr):
    t = tl.program_id(0)
    r0, r1 = tl.load(TS + t), tl.load(TEND + t)
    if r0 >= r1:  # beyond the last tile of the table (its size is an upper bound)
        return
    e = tl.load(TE + t).to(tl.int64)
    rows = r0 + tl.arange(0, BLOCK_M)
    r_ok = rows < r1
    pair = tl.load(PAIR + rows, mask=r_ok, other=0)
    xr = X + (pair // TOPK).to(tl.int64) * sxm  # the permutation is fused into the row load
    ro = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = ro < INTER
    w1r, s1r = W1 + e * swe + ro * swo, S1 + e * sse + ro * sso  # w1 and w3 share their strides
    w3r, s3r = W3 + e * swe + ro * swo, S3 + e * sse + ro * sso
    gate = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    for k0 in range(0, DIM, BLOCK_K):
        for g in tl.static_range(BLOCK_K // 32):
            gate = _fp4_group(gate, xr, r_ok, k0 + 32 * g, DIM, w1r, s1r, o_ok, E8M0, False, INTERP, IEEE)
            up = _fp4_group(up, xr, r_ok, k0 + 32 * g, DIM, w3r, s3r, o_ok, E8M0, False, INTERP, IEEE)
    ht = H.dtype.element_ty  # the twin's fp4_linear outputs are in x.dtype before swiglu
    gate = _round(gate, ht, INTERP).to(tl.float32)
    up = _round(up, ht, INTERP).to(tl.float32)
    if CLAMP:
        gate = tl.minimum(gate, LIMIT)
        up = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
    h = gate / (1.0 + tl.exp(-gate)) * up * tl.load(RW + pair, mask=r_ok, other=0)[:, None]
    hp = H + rows[:, None].to(tl.int64) * INTER + ro[None, :]
    tl.store(hp, _round(h, ht, INTERP), mask=r_ok[:, None] & o_ok[None, :])


@triton.jit
def _moe_down_kernel(H, PAIR, TE, TS, TEND, W2, S2, OUT, DIM, INTER, swe, swo, sse, sso, BLOCK_M: tl.constexpr,
                     BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, E8M0: tl.constexpr, ACT_SIM: tl.constexpr,
                     INTERP: tl.constexpr, IEEE: tl.constexpr):
    t = tl.program_id(0)
    r0, r1 = tl.load(TS + t), tl.load(TEND + t)
    if r0 >= r1:
        return
    e = tl.load(TE + t).to(tl.int64)
    rows = r0 + tl.arange(0, BLOCK_M)
    r_ok = rows < r1
    ro = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = ro < DIM
    w2r, s2r = W2 + e * swe + ro * swo, S2 + e * sse + ro * sso
    acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    hr = H + rows.to(tl.int64) * INTER
    for k0 in range(0, INTER, BLOCK_K):
        for g in tl.static_range(BLOCK_K // 32):
            acc = _fp4_group(acc, hr, r_ok, k0 + 32 * g, INTER, w2r, s2r, o_ok, E8M0, ACT_SIM, INTERP, IEEE)
    pair = tl.load(PAIR + rows, mask=r_ok, other=0).to(tl.int64)
    yp = OUT + pair[:, None] * DIM + ro[None, :]  # un-permuted: each pair's own row
    tl.store(yp, _round(acc, OUT.dtype.element_ty, INTERP), mask=r_ok[:, None] & o_ok[None, :])


def _fp4_stack(w: torch.Tensor, s: torch.Tensor, E: int, out: int, inp: int, dev, wn: str, sn: str):
    if w.dtype not in (torch.int8, torch.uint8) or tuple(w.shape) != (E, out, inp // 2):
        raise ValueError(f"{wn} must be int8 [{E}, {out}, {inp // 2}], got {w.dtype} {tuple(w.shape)}")
    if w.device != dev:
        raise ValueError(f"{wn} is on {w.device}, w1 on {dev}")
    return w.contiguous().view(torch.uint8), _scale_arg(s, (E, out, inp // 32), dev, sn)


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor,
                w3: torch.Tensor, s3: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor, limit: float,
                h_act_sim: bool = False, *, config: dict | None = None) -> torch.Tensor:
    """ref.moe_experts: fp32 [N, dim]; h_act_sim FP8-simulates h inside the w2 kernel's loads.
    ids must lie in [0, E) (checked by the device scatter)."""
    if w1.dim() != 3:
        raise ValueError(f"w1 must be [E, inter, dim/2], got {tuple(w1.shape)}")
    E, inter, dim = w1.shape[0], w1.shape[1], 2 * w1.shape[2]
    x = _x2d(x, dim, w1.device)
    if dim % 32 or inter % 32:
        raise ValueError(f"x: dim ({dim}) and w1: inter ({inter}) must be multiples of 32")
    w1, s1 = _fp4_stack(w1, s1, E, inter, dim, x.device, "w1", "s1")
    w3, s3 = _fp4_stack(w3, s3, E, inter, dim, x.device, "w3", "s3")
    w2, s2 = _fp4_stack(w2, s2, E, dim, inter, x.device, "w2", "s2")
    if s1.dtype != s3.dtype:
        raise ValueError(f"s1 and s3 must share a dtype, got {s1.dtype} and {s3.dtype}")
    N = x.shape[0]
    if ids.dim() != 2 or ids.shape[0] != N or ids.dtype.is_floating_point or ids.device != x.device:
        raise ValueError(f"ids must be integer [{N}, k] on {x.device}, got {ids.dtype} {tuple(ids.shape)}")
    if tuple(weights.shape) != tuple(ids.shape) or not weights.is_floating_point():
        raise ValueError(f"weights must be float {tuple(ids.shape)}, got {weights.dtype} {tuple(weights.shape)}")
    k = ids.shape[1]
    if N * k == 0:
        return torch.zeros((N, dim), device=x.device, dtype=torch.float32)
    cfg = config or tuning.config("moe_experts", f"D{dim}-I{inter}-E{E}-k{k}", _default(), x.device)  # never N
    _check_cfg(cfg, lambda bk: bk >= 32)
    BM, BK = cfg["BLOCK_M"], cfg["BLOCK_K"]
    # tile table, all on device (no host sync): tile t -> (expert, first sorted row, end row)
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    tiles = (counts + BM - 1) // BM
    tile_end = tiles.cumsum(0)
    row_end = counts.cumsum(0)
    n_tiles = min(E, N * k) + triton.cdiv(N * k, BM)  # >= sum over touched experts of ceil(c/BM)
    t = torch.arange(n_tiles, device=x.device)
    te = torch.searchsorted(tile_end, t, right=True).clamp(max=E - 1)
    live = t < tile_end[-1]
    ts = row_end[te] - counts[te] + (t - (tile_end[te] - tiles[te])) * BM
    tend = torch.where(live, row_end[te], 0).to(torch.int32)
    ts = torch.where(live, ts, 0).to(torch.int32)
    te, pair = te.to(torch.int32), order.to(torch.int32)
    rw = weights.reshape(-1).float().contiguous()
    h = torch.empty((N * k, inter), device=x.device, dtype=x.dtype)
    out = torch.empty((N * k, dim), device=x.device, dtype=x.dtype)
    common = {"BLOCK_M": BM, "BLOCK_K": BK, "INTERP": _interp(), "IEEE": x.dtype == torch.float32,
              "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    _moe_up_kernel[(n_tiles, triton.cdiv(inter, cfg["BLOCK_O1"]))](
        x, rw, pair, te, ts, tend, w1, s1, w3, s3, h, dim, inter, k, x.stride(0), *w1.stride()[:2],
        *s1.stride()[:2], float(limit), BLOCK_O=cfg["BLOCK_O1"], E8M0=s1.dtype == torch.uint8, CLAMP=limit > 0,
        **common)
    _moe_down_kernel[(n_tiles, triton.cdiv(dim, cfg["BLOCK_O2"]))](
        h, pair, te, ts, tend, w2, s2, out, dim, inter, *w2.stride()[:2], *s2.stride()[:2],
        BLOCK_O=cfg["BLOCK_O2"], E8M0=s2.dtype == torch.uint8, ACT_SIM=bool(h_act_sim), **common)
    return out.view(N, k, dim).float().sum(1)  # fixed slot order: deterministic


# ---- tuning --------------------------------------------------------------------------------------
def _moe(bm, bo1, bo2, bk, warps, stages):
    return {"BLOCK_M": bm, "BLOCK_O1": bo1, "BLOCK_O2": bo2, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}


def _default() -> dict:
    """Untuned: the first config for every token count (batch invariance); the interpreter pays
    per program and per op, not per element: it gets the widest tiles."""
    cfg = TUNABLES["moe_experts"].space[0]
    return {**cfg, "BLOCK_O1": 256, "BLOCK_O2": 256} if _interp() else cfg


def _moe_cases(device):
    """V4-Flash routed experts (256 x dim 4096 x inter 2048, top-6) at decode and prefill sizes."""
    gpu = torch.device(device).type == "cuda"
    E, k, dim, inter = (256, 6, 4096, 2048) if gpu else (9, 2, 64, 32)
    ws = [t for o, i in ((inter, dim), (inter, dim), (dim, inter)) for t in _rand_fp4(E, o, i, dev=device)]
    out = []
    for N in (1, 64, 512) if gpu else (5,):
        ids = torch.rand(N, E, device=device).topk(k, -1).indices
        args = (torch.randn(N, dim, device=device, dtype=torch.bfloat16), torch.rand(N, k, device=device), ids)
        out.append((f"D{dim}-I{inter}-E{E}-k{k}",  # decode and prefill N: one key, times added
                    lambda cfg, a=args: moe_experts(*a, *ws, 10.0, config=cfg)))
    return out


TUNABLES: dict[str, tuning.Tunable] = {
    "moe_experts": tuning.Tunable(
        space=(_moe(16, 32, 64, 128, 4, 4), _moe(16, 64, 64, 128, 4, 4), _moe(16, 32, 32, 256, 4, 3),
               _moe(32, 32, 64, 64, 4, 4), _moe(64, 64, 128, 64, 8, 3)),
        cases=_moe_cases),
}
