"""The lightning indexer's top-k selection (twin: ops/ref.py topk_select).

scores fp32 [N, T] (V4: T = entries at ratio 4, up to 262144 at a 1M context; N = 1..64 decode
rows or up to 8192 prefill rows), k = 512 (Flash) or 1024 (Pro) -> int64 [N, min(k, T)].

Keys: each score's fp32 bits become a signed 32-bit key in the order of torch's sort (-0.0 taken
as +0.0, every NaN above +inf), and the composite int64 key = key * 2^32 + (2^32 - 1 - column) is
unique per column and larger exactly when the column comes first in the stable descending sort.
The k largest composites, sorted descending, ARE the twin's result (ties, -0.0, -inf rows
included); integer compares only, so the interpreter and every GPU give the same integers.

Method: a tournament. One launch = a grid (rows, splits); a program walks its split of the row in
blocks of BLOCK keys, takes the KP = next_pow2(min(k, T)) largest of each block with a bitonic
top-k network (runs of KP sorted, then pairs of runs halved by an elementwise max and merged) and
merges them into its running top-KP (elementwise max of the running list, descending, and the
block's, ascending: a bitonic sequence, merged in log2 KP steps). With one split the program
decodes its top-KP into columns (-1 where the key is -inf's) and writes min(k, T) of them;
otherwise it writes its KP composites to scratch [N, splits * KP], and the next launch selects
from that (a shorter row) the same way, until one split remains. Splits per row are chosen so
that about `waves` x SMs programs run: decode, one row of 262144 at k 512 on an H100: 64 splits
of 4096 columns, then 8 splits of the 32768 candidates, then one program over 4096; prefill rows
(N >= waves x SMs) get one program each and one launch. Scratch: rows x splits x KP int64 (a few
MB at most).
The networks run on [2] * n hypercube reshapes of the keys, where a compare-exchange across index
bit j is a max and a min over one size-2 axis and a select by position (no tl.sort / tl.topk:
their xor-sum partner exchange is a per-element Python loop in the interpreter, and tl.topk is
missing from older triton releases).
Launch parameters: BLOCK (raised to 2 KP), num_warps, waves; tuned per (KP, decode / prefill)
through tuning.py. Compiled for sm_90 (triton 3.9), every config of the space at k 512 and 1024,
first / candidate / last launch: 79-232 registers, 1 KB of shared memory; spills only at BLOCK
4096 / 8 warps (<= 88 B, candidate and last launches) and 8 B at BLOCK 2048 / 4 warps, k 1024.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dayzero.ops.triton import tuning

_NEG_INF_KEY = tl.constexpr(-2139095041)  # the signed key of -inf: bits 0xFF800000 ^ 0x7FFFFFFF
_LOW = tl.constexpr(-9223372036854775808)  # below every composite key: padding lanes


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a pretend GPU small enough that test shapes take the multi-split path


# ---- bitonic networks on a hypercube ------------------------------------------------------------
# A tensor of 2^n elements reshaped to [2] * n: axis n-1-b is bit b of an element's index, so
# "the partner across bit j" is the other element along one axis, and a compare-exchange is a max
# and a min over that size-2 axis (both plain reductions: fast in the interpreter, in-register or
# shuffles on a GPU) and a select by position.
@triton.jit
def _bit(n: tl.constexpr, b: tl.constexpr):
    """Bit b of the index, as an int32 tensor broadcastable over [2] * n."""
    return tl.reshape(tl.arange(0, 2), [1] * (n - 1 - b) + [2] + [1] * b)


@triton.jit
def _exchange(h, n: tl.constexpr, j: tl.constexpr, b: tl.constexpr, DESC: tl.constexpr):
    """Compare-exchange across index bit j of h ([2] * n) within blocks of 2^b that alternate
    descending / ascending by index bit b (b >= n: one block, descending if DESC): in a
    descending block the lower index of a pair takes the larger key."""
    hi = tl.max(h, axis=n - 1 - j, keep_dims=True)
    lo = tl.min(h, axis=n - 1 - j, keep_dims=True)
    if b < n:
        take_hi = (_bit(n, j) == 0) == (_bit(n, b) == 0)
    elif DESC:
        take_hi = _bit(n, j) == 0
    else:
        take_hi = _bit(n, j) != 0
    return tl.where(take_hi, hi, lo)


@triton.jit
def _top(x, LOG_N: tl.constexpr, LOG_K: tl.constexpr, DESC: tl.constexpr):
    """The 2^LOG_K largest of x (2^LOG_N int64 keys, LOG_N >= LOG_K >= 1), sorted descending (DESC)
    or ascending. Runs of 2^LOG_K are sorted (bitonic sort, neighbours in opposite directions),
    then, while more than one run is left, each pair of runs is replaced by their elementwise max
    (the larger half of the two: a bitonic sequence) and that is merged into a sorted run."""
    h = tl.reshape(x, [2] * LOG_N)
    for p in tl.static_range(1, LOG_K + 1):  # sort runs of 2^p
        for i in tl.static_range(p):
            h = _exchange(h, LOG_N, p - 1 - i, p, DESC)
    for r in tl.static_range(LOG_N - LOG_K):  # halve: pairs of runs differ in index bit LOG_K
        h = tl.max(h, axis=LOG_N - 1 - r - LOG_K)
        for i in tl.static_range(LOG_K):
            h = _exchange(h, LOG_N - 1 - r, LOG_K - 1 - i, LOG_K, DESC)
    return tl.reshape(h, [2 ** LOG_K])


@triton.jit
def _merge_desc(run, new, LOG_K: tl.constexpr):
    """The 2^LOG_K largest of run (descending) and new (ascending), descending."""
    h = tl.reshape(tl.maximum(run, new), [2] * LOG_K)  # bitonic
    for i in tl.static_range(LOG_K):
        h = _exchange(h, LOG_K, LOG_K - 1 - i, LOG_K, True)
    return tl.reshape(h, [2 ** LOG_K])


@triton.jit
def _topk_kernel(src_ptr, dst_ptr, idx_ptr, L, stride, span, m, FIRST: tl.constexpr, LAST: tl.constexpr,
                 BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr, KP: tl.constexpr, LOG_KP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    lo = split * span
    hi = tl.minimum(lo + span, L)
    lanes = tl.arange(0, BLOCK)
    run = tl.full([KP], _LOW, tl.int64)  # the running top-KP of this split, descending
    for start in range(lo, hi, BLOCK):
        cols = start + lanes
        mask = cols < hi
        if FIRST:  # fp32 scores (passed as their int32 bits) -> composite keys
            u = tl.load(src_ptr + row * stride + cols, mask=mask, other=0)
            nan = (u & 0x7FFFFFFF) > 0x7F800000
            u = tl.where(u == -2147483648, 0, u)  # -0.0 sorts as +0.0
            key = tl.where(u < 0, u ^ 0x7FFFFFFF, u)
            key = tl.where(nan, 0x7FFFFFFF, key)  # every NaN above +inf
            # key * 2^32 + (2^32 - 1 - column): the low word is ~column read as unsigned
            x = (key.to(tl.int64) << 32) | (~cols).to(tl.uint32, bitcast=True).to(tl.int64)
            x = tl.where(mask, x, _LOW)
        else:
            x = tl.load(src_ptr + row * stride + cols, mask=mask, other=_LOW)
        run = _merge_desc(run, _top(x, LOG_BLOCK, LOG_KP, False), LOG_KP)
    k = tl.arange(0, KP)
    if LAST:
        col = (~run.to(tl.int32)).to(tl.int64)  # the low word is ~column
        col = tl.where((run >> 32).to(tl.int32) == _NEG_INF_KEY, -1, col)
        tl.store(idx_ptr + row * m + k, col, mask=k < m)
    else:
        tl.store(dst_ptr + (row * nsplit + split) * KP + k, run)


TOPK_DEFAULT = dict(BLOCK=4096, num_warps=8, waves=4)


def _bucket(n: int) -> str:
    return "dec" if n <= 64 else "pre"


def topk_select(scores: torch.Tensor, k: int, *, config: dict | None = None) -> torch.Tensor:
    """Twin: ref.topk_select (fp32 [N, T] on the kernels' device, any row stride)."""
    if not isinstance(scores, torch.Tensor) or scores.dtype != torch.float32 or scores.dim() != 2:
        raise ValueError(f"scores: expected a float32 [N, T] tensor, got "
                         f"{getattr(scores, 'dtype', type(scores).__name__)} {tuple(getattr(scores, 'shape', ()))}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k: expected an int >= 0, got {k!r}")
    N, T = scores.shape
    if T >= 1 << 30:  # column indices and offsets are int32 in the kernel
        raise ValueError(f"scores: at most 2^30 - 1 columns, got {T}")
    m = min(k, T)
    out = torch.empty(N, m, dtype=torch.int64, device=scores.device)
    if out.numel() == 0:
        return out
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    kp = max(2, triton.next_power_of_2(m))
    cfg = {**TOPK_DEFAULT, **(config if config is not None else
                              tuning.config("topk_select", f"K{kp}-{_bucket(N)}", TOPK_DEFAULT, scores.device))}
    want = int(cfg["waves"]) * _sm_count(scores.device)  # programs to keep the device busy
    src, L, stride, first = scores.view(torch.int32), T, scores.stride(0), True
    while True:
        block = max(kp, min(max(int(cfg["BLOCK"]), 2 * kp), triton.next_power_of_2(L)))
        nblk = triton.cdiv(L, block)
        per = triton.cdiv(nblk, max(1, min(nblk, triton.cdiv(want, N))))  # blocks per split
        if triton.cdiv(nblk, per) * kp >= L:  # a split's KP keys would not shorten the row: one split
            per = nblk
        splits = triton.cdiv(nblk, per)
        last = splits == 1
        dst = out if last else torch.empty(N, splits * kp, dtype=torch.int64, device=scores.device)
        _topk_kernel[(N, splits)](src, dst, out, L, stride, per * block, m, FIRST=first, LAST=last, BLOCK=block,
                                  LOG_BLOCK=block.bit_length() - 1, KP=kp, LOG_KP=kp.bit_length() - 1,
                                  num_warps=int(cfg["num_warps"]))
        if last:
            return out
        src, L, stride, first = dst, splits * kp, splits * kp, False


# ---- tuning --------------------------------------------------------------------------------------
def _cases(device: torch.device):
    gpu = device.type == "cuda"
    shapes = [(1, 262144, 512), (64, 65536, 512), (1, 262144, 1024), (2048, 8192, 512)] if gpu else [(2, 700, 8)]
    out = []
    for n, t, k in shapes:
        s = torch.randn(n, t, generator=torch.Generator().manual_seed(0)).relu().to(device)
        kp = max(2, triton.next_power_of_2(min(k, t)))
        out.append((f"K{kp}-{_bucket(n)}", lambda cfg, s=s, k=k: topk_select(s, k, config=cfg)))
    return out


TUNABLES = {
    "topk_select": tuning.Tunable(space=(
        TOPK_DEFAULT,
        dict(BLOCK=2048, num_warps=4, waves=4),
        dict(BLOCK=8192, num_warps=16, waves=2),
        dict(BLOCK=4096, num_warps=4, waves=8),
        dict(BLOCK=2048, num_warps=8, waves=16),
    ), cases=_cases),
}
