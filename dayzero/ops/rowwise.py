"""Row-invariant forms of the torch calls the twins and the model make on the CPU (issue 20): a
row's (or element's) bits must not depend on how many rows share the call. Measured causes and
their cures:

- elementwise transcendental ops: torch computes whole vectors with SLEEF polynomials and the tail
  of a range with the scalar libm function, an ulp apart -> `lanewise`;
- matmuls: BLAS takes other paths for 1-3 rows (MKL gemv), and on CPUs with AVX512-BF16 (an Intel
  Xeon of 2026-12) MKL's sgemm and oneDNN's bf16 GEMM round rows differently at many row counts
  (measured: 1-8 of 9+ rows at 1024x1024 fp32; 201 of 256 row counts at 256x512 bf16) -> `linear`
  runs calls of exactly 16 rows, the last padded with zero rows;
- batched matmuls: the path depends on the batch count and the memory layout -> `bmm` in calls of
  exactly 16, contiguous;
- a row mean in the activation dtype -> `row_mean`, summed left to right.
Other devices compute every element alike already: these fall through to torch there. The twins
(ops/ref.py) re-export them as ref.lanewise, ref.linear, ref.bmm, ref.row_mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# A CPU elementwise kernel of torch computes whole vectors (SLEEF polynomials) and the tail of the
# range, past the last multiple of 2 vectors, with the scalar libm function: the two differ by an
# ulp for exp, log1p, sigmoid, silu..., so an element's bits would depend on where it lies in the
# tensor, i.e. on how many rows share the call. `lanewise` runs such a function on a flat copy
# padded to a multiple of _LANES (2 x every vector width torch uses, fp32 and bf16) in chunks
# below at::internal::GRAIN_SIZE (one thread, no range split): every element takes the vector path.
_LANES = 64
_CHUNK = 32768 - _LANES


def lanewise(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) for an elementwise torch function, the same bits for an element wherever it lies in x
    (CPU; other devices compute every element alike already)."""
    if x.device.type != "cpu":
        return fn(x)
    flat = x.reshape(-1)
    n = flat.numel()
    if n % _LANES:
        flat = torch.cat([flat, flat.new_zeros(_LANES - n % _LANES)])
    out = fn(flat) if flat.numel() <= _CHUNK else torch.cat([fn(c) for c in flat.split(_CHUNK)])
    return out[:n].view(x.shape)


_MIN_ROWS = 16


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) with a row's bits independent of the rows beside it on the CPU: BLAS picks its
    path (and so its rounding) by the row count (MKL's gemv for 1-3 rows; on AVX512-BF16 CPUs other
    sgemm and bf16 kernels at many counts), so every call runs in chunks of exactly 16 rows, the last
    padded with zero rows: one shape, one path (checked on fp32 and bf16 at M = 1..200)."""
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type != "cpu" or m == 0:
        return F.linear(x, w)
    flat = x.reshape(m, x.shape[-1]).contiguous()  # one memory layout (BLAS's transposed paths round otherwise)
    pad = -m % _MIN_ROWS
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad, flat.shape[1])])
    if flat.shape[0] == _MIN_ROWS:
        out = F.linear(flat, w)
    else:
        out = torch.cat([F.linear(c, w) for c in flat.split(_MIN_ROWS)])
    return out[:m].view(*x.shape[:-1], w.shape[0])


def bmm(a: torch.Tensor, b: torch.Tensor, block: int = _MIN_ROWS) -> torch.Tensor:
    """torch.bmm(a, b) with each batch element's bits independent of the batch size on the CPU:
    batched BLAS picks its path by the batch count, so it runs in calls of exactly `block`
    elements (the last padded with zeros)."""
    n = a.shape[0]
    if a.device.type != "cpu" or n == 0:
        return torch.bmm(a, b)
    a, b = a.contiguous(), b.contiguous()  # one memory layout (BLAS's transposed paths round otherwise)
    pad = -n % block
    if pad:
        a = torch.cat([a, a.new_zeros(pad, *a.shape[1:])])
        b = torch.cat([b, b.new_zeros(pad, *b.shape[1:])])
    return torch.cat([torch.bmm(x, y) for x, y in zip(a.split(block), b.split(block))])[:n]


def row_mean(x: torch.Tensor) -> torch.Tensor:
    """mean over the last dim (keepdim), in x's dtype, summed in fp32 left to right in every row
    (torch's mean may cut a row between threads when there are few rows: batch-dependent bits)."""
    return (x.float().cumsum(-1)[..., -1:] / x.shape[-1]).to(x.dtype)
