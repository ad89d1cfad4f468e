"""The fp32 linear over dense fp32 / bf16 weights (LM head, MoE routers, compressor projections;
twin ref.fp32_linear): x and weight tiles upcast to fp32 exactly and multiplied in fp32 (ieee
tl.dot for BLOCK_M >= 16, broadcast multiply-adds below), bf16 weights read as stored.
Same grid, K ranges and batch-invariance rule as the quantized linears of gemm.py: the config
(BLOCK_M included, which picks the tl.dot or the multiply-add form) is chosen per weight shape,
never per row count. Default BLOCK_M 16 for every M: decode rows (M < 16) pay the padded rows'
FMAs where a 1-row multiply-add kernel ran before (the LM head's decode is about as much FMA
work as weight streaming at 16 rows on an H100; expected slower, not measured: no GPU was lent).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dayzero.ops import ref
from dayzero.ops.triton import tuning
from dayzero.ops.triton.gemm import _interp, _lin, _lin_cases, k_ranges, spread, sum_splits


@triton.jit
def _fp32_kernel(X, W, Y, M, O, K, sxm, sxk, swo, sys, KSPLIT, SPLITS, BLOCK_M: tl.constexpr,
                 BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y[program] = the sum, in order, of X[:, ks] @ W[:, ks]^T over this program's SPLITS K ranges
    ks of KSPLIT elements (gemm.py), in fp32: x and w tiles
    (fp32, bf16 or fp16) upcast exactly, every product and sum fp32. BLOCK_M >= 16: tl.dot with
    input_precision="ieee" (FMA, never TF32). BLOCK_M < 16 (decode rows, where a 16-row dot
    would multiply padding): broadcast multiply-adds into a [BLOCK_M, BLOCK_O, BLOCK_K]
    accumulator, reduced over K once at the end; the tiles are loaded as [BLOCK_M, 1, BLOCK_K]
    and [1, BLOCK_O, BLOCK_K] so that the weight arrives in the accumulator's layout (vector
    loads; 2-D loads expanded to 3-D went through a shared-memory layout conversion)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ro = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    rk = tl.arange(0, BLOCK_K)
    m_ok, o_ok = rm < M, ro < O
    xr, wr = X + rm * sxm, W + ro * swo  # strides as args: sxk == 1 and swo % 16 are specialised
    total = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    for sp in range(tl.program_id(2) * SPLITS, (tl.program_id(2) + 1) * SPLITS):  # K ranges, in order
        k_lo = sp * KSPLIT
        k_hi = tl.minimum(K, k_lo + KSPLIT)
        if BLOCK_M >= 16:
            acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                kk = k0 + rk
                k_ok = kk < k_hi
                x = tl.load(xr[:, None] + kk[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0)
                w = tl.load(wr[None, :] + kk[:, None], mask=o_ok[None, :] & k_ok[:, None], other=0).to(tl.float32)
                if X.dtype.element_ty == tl.float32 and W.dtype.element_ty != tl.float32:
                    # + 0.0 (exact up to a zero's sign) routes the fp32 x tile through registers like
                    # the upcast w tile; read straight from the pipeline's shared memory instead,
                    # triton 3.9 spills ~600 B per thread at BLOCK_M >= 64 (scripts/aot_compile.py)
                    x = x + 0.0
                acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc3 = tl.zeros([BLOCK_M, BLOCK_O, BLOCK_K], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                kk = k0 + rk
                k_ok = kk < k_hi
                x = tl.load(xr[:, None, None] + kk[None, None, :] * sxk,
                            mask=m_ok[:, None, None] & k_ok[None, None, :], other=0)
                w = tl.load(wr[None, :, None] + kk[None, None, :], mask=o_ok[None, :, None] & k_ok[None, None, :],
                            other=0)
                acc3 += x.to(tl.float32) * w.to(tl.float32)
            acc = tl.sum(acc3, axis=2)
        total += acc
    yp = Y + tl.program_id(2) * sys + rm[:, None] * O + ro[None, :]
    tl.store(yp, total, mask=m_ok[:, None] & o_ok[None, :])


_FP32_IN = (torch.float32, torch.bfloat16, torch.float16)  # upcast to fp32 exactly
_I32 = 2 ** 31 - 1  # the kernel's element offsets are int32


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, *, config: dict | None = None) -> torch.Tensor:
    """ref.fp32_linear: x [..., K] @ weight [O, K]^T -> fp32 [..., O] (the LM head, MoE routers,
    compressor projections), bf16 weights read as stored (no fp32 copy), fp32 accumulation.
    Grid (M tiles, O tiles, split-K) as the quantized linears: decode streams the weight once."""
    if (weight.dim() != 2 or weight.dtype not in _FP32_IN or x.dtype not in _FP32_IN or x.dim() < 1
            or x.shape[-1] != weight.shape[1] or x.device != weight.device
            or weight.shape[0] * max(weight.stride(0), weight.shape[1]) > _I32):
        # other dtypes (fp64, fp8 stored as such, ...), weights past int32 offsets (> 4 GB in
        # bf16, no such dense weight in V4) or malformed calls: the twin computes or raises
        return ref.fp32_linear(x, weight)
    O, K = weight.shape
    lead = x.shape[:-1]
    M = math.prod(lead)
    if M == 0 or O == 0 or K == 0:
        return torch.zeros((*lead, O), device=x.device, dtype=torch.float32)
    x2 = x.reshape(M, K)  # a view where the strides allow one: the kernel takes both strides
    rows = (_I32 - K * x2.stride(1)) // max(O, x2.stride(0))  # rows whose x and y offsets fit int32
    if M > rows:  # e.g. 16K prompt rows of a 129280-entry LM head: row chunks, each its own launch
        return torch.cat([fp32_linear(x2[r:r + rows], weight, config=config)
                          for r in range(0, M, rows)]).view(*lead, O)
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    # the config is looked up by the weight shape, never M (batch invariance: see gemm.py)
    cfg = config or tuning.config("fp32_linear", f"O{O}-K{K}", _fp32_default(), x.device)
    _check_fp32_cfg(cfg)
    BM, BO, BK = cfg["BLOCK_M"], cfg["BLOCK_O"], cfg["BLOCK_K"]
    S, ksplit = k_ranges(x2, K, BK, triton.cdiv(O, BO), cfg.get("SPLIT_K", 0))
    wide = spread(cfg, triton.cdiv(M, BM) * triton.cdiv(O, BO), S, x2) and S * M * O <= _I32
    y = torch.empty((M, O), device=x.device, dtype=torch.float32)
    part = torch.empty((S, M, O), device=x.device, dtype=torch.float32) if wide else y
    grid = (triton.cdiv(M, BM), triton.cdiv(O, BO), S if wide else 1)
    _fp32_kernel[grid](x2, w, part, M, O, K, x2.stride(0), x2.stride(1), w.stride(0), M * O, ksplit,
                       1 if wide else S, BLOCK_M=BM, BLOCK_O=BO, BLOCK_K=BK, num_warps=cfg["num_warps"],
                       num_stages=cfg["num_stages"])
    y = sum_splits(part, y) if wide else y  # the ranges' partials added in order: the same bits
    return y.view(*lead, O)


def _check_fp32_cfg(cfg: dict) -> None:
    """Tiles are powers of two (tl.arange); BLOCK_O, BLOCK_K >= 16 (tl.dot), BLOCK_M >= 1 (below
    16 the kernel multiplies without tl.dot)."""
    bm, bo, bk = cfg["BLOCK_M"], cfg["BLOCK_O"], cfg["BLOCK_K"]
    if any(b < 1 or b & (b - 1) for b in (bm, bo, bk)) or bo < 16 or bk < 16:
        raise ValueError(f"config: bad block sizes {cfg}")


def _fp32_default() -> dict:
    """Untuned: the space's first config (16-row tl.dot tiles) for every row count; the
    interpreter gets the widest O tiles."""
    cfg = TUNABLES["fp32_linear"].space[0]
    return {**cfg, "BLOCK_O": 256} if _interp() else cfg


# LM head (vocab 129280) at decode and prefill, MoE router (256 experts), compressor wkv+wgate
_FP32_GPU = [(m, o, 4096) for o in (129280, 256, 1024, 384) for m in (1, 512)]

TUNABLES: dict[str, tuning.Tunable] = {
    # index 0: the untuned choice for every row count (BLOCK_M < 16: multiply-adds, no tl.dot)
    "fp32_linear": tuning.Tunable(
        space=(_lin(16, 64, 64, 0, 4, 3), _lin(1, 64, 128, 0, 4, 3), _lin(4, 32, 64, 0, 4, 3),
               _lin(8, 32, 64, 0, 8, 3), _lin(64, 64, 32, 0, 4, 3), _lin(64, 128, 32, 0, 8, 3),
               _lin(1, 32, 256, 0, 4, 3), _lin(128, 128, 32, 0, 8, 3)),
        cases=_lin_cases(fp32_linear, lambda O, K, dev: (torch.randn(O, K, device=dev, dtype=torch.bfloat16),),
                         _FP32_GPU, [(3, 70, 130)])),
}
