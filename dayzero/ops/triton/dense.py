"""The fp32 linear over dense fp32 / bf16 weights (LM head, MoE routers, compressor projections;
twin ref.fp32_linear): x and weight tiles upcast to fp32 exactly and multiplied in fp32 (ieee
tl.dot from 16 rows, broadcast multiply-adds below: no padded rows), bf16 weights read as stored.
Same grid and split-K rule as the quantized linears of gemm.py.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dayzero.ops import ref
from dayzero.ops.triton import tuning
from dayzero.ops.triton.gemm import _interp, _lin, _lin_cases, _mkey, _split_k


@triton.jit
def _fp32_kernel(X, W, Y, M, O, K, sxm, sxk, swo, sys, KSPLIT, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Y[split] = X[:, ks] @ W[:, ks]^T over this split's K range ks, in fp32: x and w tiles
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
    k_lo = tl.program_id(2) * KSPLIT
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
    yp = Y + tl.program_id(2) * sys + rm[:, None] * O + ro[None, :]
    tl.store(yp, acc, mask=m_ok[:, None] & o_ok[None, :])


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
    cfg = config or tuning.config("fp32_linear", f"M{_mkey(M)}-O{O}-K{K}", _fp32_default(M), x.device)
    _check_fp32_cfg(cfg)
    BM, BO, BK = cfg["BLOCK_M"], cfg["BLOCK_O"], cfg["BLOCK_K"]
    split, ksplit = _split_k(x2, triton.cdiv(M, BM) * triton.cdiv(O, BO), K, BK, cfg.get("SPLIT_K", 0))
    if split * M * O > _I32:  # a configured split-K whose workspace offsets would not fit int32
        split, ksplit = 1, triton.cdiv(K, BK) * BK
    y = torch.empty((split, M, O) if split > 1 else (M, O), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(M, BM), triton.cdiv(O, BO), split)
    _fp32_kernel[grid](x2, w, y, M, O, K, x2.stride(0), x2.stride(1), w.stride(0), M * O, ksplit,
                       BLOCK_M=BM, BLOCK_O=BO, BLOCK_K=BK, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    y = y.sum(0) if split > 1 else y  # partials summed in a fixed order: deterministic
    return y.view(*lead, O)


def _check_fp32_cfg(cfg: dict) -> None:
    """Tiles are powers of two (tl.arange); BLOCK_O, BLOCK_K >= 16 (tl.dot), BLOCK_M >= 1 (below
    16 the kernel multiplies without tl.dot)."""
    bm, bo, bk = cfg["BLOCK_M"], cfg["BLOCK_O"], cfg["BLOCK_K"]
    if any(b < 1 or b & (b - 1) for b in (bm, bo, bk)) or bo < 16 or bk < 16:
        raise ValueError(f"config: bad block sizes {cfg}")


def _fp32_default(m: int) -> dict:
    """Untuned: the config of the space made for m rows (one M tile up to 64 rows: the weight is
    read once); the interpreter gets the widest O tiles."""
    space = TUNABLES["fp32_linear"].space
    cfg = space[next((i for i, b in enumerate((1, 4, 8, 16, 64)) if m <= b), 5)]
    return {**cfg, "BLOCK_O": 256} if _interp() else cfg


# LM head (vocab 129280) at decode and prefill, MoE router (256 experts), compressor wkv+wgate
_FP32_GPU = [(1, 129280, 4096), (1, 256, 4096), (1, 1024, 4096), (16, 129280, 4096), (64, 384, 4096),
             (512, 129280, 4096)]

TUNABLES: dict[str, tuning.Tunable] = {
    # indices 0-4: the untuned choice for <= 1, 4, 8, 16, 64 rows (below 16: no tl.dot), 5: more
    "fp32_linear": tuning.Tunable(
        space=(_lin(1, 64, 128, 0, 4, 3), _lin(4, 32, 64, 0, 4, 3), _lin(8, 32, 64, 0, 8, 3),
               _lin(16, 64, 64, 0, 4, 3), _lin(64, 64, 32, 0, 4, 3), _lin(64, 128, 32, 0, 8, 3),
               _lin(1, 32, 256, 0, 4, 3), _lin(128, 128, 32, 0, 8, 3)),
        cases=_lin_cases(fp32_linear, lambda O, K, dev: (torch.randn(O, K, device=dev, dtype=torch.bfloat16),),
                         _FP32_GPU, [(3, 70, 130)])),
}
