"""Reference twins of every op the model uses: plain PyTorch, CPU-runnable, fp32 inside.

Layout conventions written down once (v4-architecture.md 3.3, 3.8, 10.3-10.5):
- RoPE rotates the LAST `rd` dims of a head, interleaved: pairs (2i, 2i+1) are one complex number.
- FP8 activation simulation: blocks along the last dim, scale = 2^ceil(log2(amax/448)), amax
  floored at 1e-4, values rounded to float8_e4m3fn and multiplied back.
- FP4 simulation: blocks of 32, scale = 2^ceil(log2(amax/6)), amax floored at 6*2^-126, values
  rounded to the nearest e2m1 value (ties to the even code).
- Sparse attention indices: -1 marks "no key" (logit -inf, value 0); the per-head sink enters only
  the softmax denominator.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dayzero.ops.rowwise import bmm, lanewise, linear, row_mean  # noqa: F401  (ref.* spellings)

FP8_MAX = 448.0
FP4_MAX = 6.0
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_ON_DEVICE: dict[tuple[int, str], torch.Tensor] = {}


def _on(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A module constant on `device`, copied there once (a host-to-device copy inside a step
    would synchronise, and a recorded step cannot contain one)."""
    if table.device == device:
        return table
    key = (id(table), str(device))
    got = _ON_DEVICE.get(key)
    if got is None:
        got = _ON_DEVICE[key] = table.to(device)
    return got


# ---- norms -------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32; the weight is applied in fp32, then one cast back."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def act_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMSNorm over the last dim in x's dtype, the rsqrt taken in fp32 and rounded (the
    official reference normalises each query head so; torch's bf16 rsqrt rounds differently in its
    vector and scalar paths). A fused op (ops/__init__.py FUSED_NAMES)."""
    return x * torch.rsqrt((row_mean(x.square()) + eps).float()).to(x.dtype)


# ---- dense fp32 linears (LM head, routers, compressor projections) ---------------------------
def fp32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [O, K]^T in fp32 (x and the weight, e.g. bf16 as stored, upcast
    exactly) -> fp32 [..., O]."""
    return linear(x.float(), weight.float())


# ---- rotary embeddings ---------------------------------------------------------------------
def rope_inv_freq(rd: int, base: float, factor: float = 1.0, original_seq_len: int = 0,
                  beta_fast: float = 32.0, beta_slow: float = 1.0) -> torch.Tensor:
    """[rd/2] fp32 inverse frequencies; YaRN (DeepSeek-V3 form, no mscale) when factor > 1 and
    original_seq_len > 0: pairs below `low` keep their frequency, pairs above `high` are divided
    by `factor`, a linear ramp in between."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.float64, device="cpu") / rd))
    if factor > 1 and original_seq_len > 0:
        def corr_dim(rot: float) -> float:
            return rd * math.log(original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(corr_dim(beta_fast)), 0)
        high = min(math.ceil(corr_dim(beta_slow)), rd - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(rd // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        inv_freq = inv_freq / factor * (1 - smooth) + inv_freq * smooth
    return inv_freq.float()


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [...] int -> cos, sin [..., rd/2] fp32."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the trailing 2*cos.shape[-1] dims of x (interleaved pairs); cos/sin broadcast
    against x[..., :rd/2]. inverse=True applies the conjugate rotation (output de-rotation)."""
    rd = 2 * cos.shape[-1]
    nope, rope = x[..., :-rd], x[..., -rd:].float()
    re, im = rope[..., 0::2], rope[..., 1::2]
    if inverse:
        sin = -sin
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)
    return torch.cat([nope, out.to(x.dtype)], dim=-1)


# ---- quantisation simulation ---------------------------------------------------------------
def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    n = x.shape[-1]
    pad = (-n) % block
    xf = F.pad(x.float(), (0, pad)) if pad else x.float()
    return xf.unflatten(-1, (-1, block)), n


def pow2_scale(amax: torch.Tensor, qmax: float, floor: float) -> torch.Tensor:
    """Smallest power of two s with amax / s <= qmax (UE8M0-representable scale), exactly: the
    log2 estimate is off by one where amax / qmax rounds across a power of two in fp32, so it is
    corrected with divisions by powers of two (exact)."""
    a = amax.float().clamp(min=floor)
    s = torch.exp2(torch.ceil(torch.log2(a / qmax)))
    s = torch.where(a / s > qmax, s * 2, s)
    return torch.where(a / (s / 2) <= qmax, s / 2, s)


def fp8_act_sim(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Quantise to FP8 e4m3 per `block` along the last dim with power-of-two scales and
    dequantise again (the reference's act_quant, simulated)."""
    xb, n = _blocks(x, block)
    scale = pow2_scale(xb.abs().amax(-1, keepdim=True), FP8_MAX, 1e-4)
    q = (xb / scale).to(torch.float8_e4m3fn).float() * scale
    return q.flatten(-2)[..., :n].to(x.dtype)


def fp8_nope_sim(x: torch.Tensor, rope_dim: int, block: int = 64) -> torch.Tensor:
    """FP8 simulation of the non-rope dims in blocks of `block`; the last `rope_dim` dims stay as
    they are (the official K=V rows and compressed entries). A fused op (ops/__init__.py)."""
    return torch.cat([fp8_act_sim(x[..., :-rope_dim], block), x[..., -rope_dim:]], -1)


def fp4_round(v: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 value for |v| <= 6, ties to the even code (as a float4 cast rounds)."""
    grid = _on(_E2M1, v.device)
    a = v.abs().clamp(max=FP4_MAX)
    mids = (grid[1:] + grid[:-1]) / 2
    idx = torch.bucketize(a, mids)  # a == mid goes to the lower code
    tie = (a == mids[idx.clamp(max=len(mids) - 1)]) & (idx % 2 == 1)
    idx = idx + tie.long()
    return torch.sign(v) * grid[idx]


def fp4_act_sim(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    xb, n = _blocks(x, block)
    scale = pow2_scale(xb.abs().amax(-1, keepdim=True), FP4_MAX, FP4_MAX * 2.0 ** -126)
    q = fp4_round(xb / scale) * scale
    return q.flatten(-2)[..., :n].to(x.dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard rotation H_n / sqrt(n) over the last dim (n a power of 2)."""
    n = x.shape[-1]
    y = x.float()
    h = 1
    while h < n:
        y = y.unflatten(-1, (-1, 2, h))
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).flatten(-3)
        h *= 2
    return (y * n ** -0.5).to(x.dtype)


def hadamard_fp4_sim(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """FP4 simulation after the Hadamard rotation: the indexer's queries and keys under official
    numerics (v4-architecture.md 3.5). A fused op (ops/__init__.py FUSED_NAMES): this composition
    is its twin."""
    return fp4_act_sim(hadamard(x), block)


# ---- attention ---------------------------------------------------------------------------
def sparse_attn_gathered(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, sink: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """Each query with its own gathered keys: q [N,H,D], keys [N,K,D] (shared K=V), valid [N,K],
    sink [H] -> [N,H,D].

    out = sum_s exp(l_s - M) kv_s / (sum_s exp(l_s - M) + exp(sink_h - M)), l_s = scale q.kv_s over
    valid keys; logits and accumulation in fp32."""
    # batched matmuls of one shape (an einsum may fold the queries into other shapes)
    logits = bmm(q.float(), keys.float().transpose(1, 2)) * scale
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    sink_logit = sink.float().view(1, -1, 1).expand(q.shape[0], -1, 1)
    m = torch.maximum(logits.amax(-1, keepdim=True), sink_logit)
    p = lanewise(torch.exp, logits - m)
    denom = p.sum(-1, keepdim=True) + lanewise(torch.exp, sink_logit - m)
    return bmm(p / denom, keys.float()).to(q.dtype)


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor,
                scale: float) -> torch.Tensor:
    """q [B,S,H,D], kv [B,N,D] (shared K=V), sink [H], idx [B,S,K] int (-1 = none) -> [B,S,H,D]:
    the official kernel's interface, on sparse_attn_gathered."""
    B, S, H, D = q.shape
    keys = torch.gather(kv, 1, idx.clamp(min=0).reshape(B, -1, 1).expand(-1, -1, D)).view(B * S, -1, D)
    out = sparse_attn_gathered(q.reshape(B * S, H, D), keys, (idx >= 0).reshape(B * S, -1), sink, scale)
    return out.view(B, S, H, D)


def compress_pool(kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Gated pooling of a compressor window: kv, gate [..., slots, C] -> [..., C];
    per channel softmax over the slots (gate -inf = empty slot), fp32."""
    return (kv.float() * gate.float().softmax(dim=-2)).sum(dim=-2)


# ---- mHC -----------------------------------------------------------------------------------
def hc_split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int,
                      iters: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixes [..., (2+n)n] fp32 -> pre [..., n], post [..., n], comb [..., n, n] (rows j, cols k).
    Sinkhorn: row softmax + eps, column normalise, then (iters-1) x (row, column) normalisation."""
    s = scale.float()
    b = base.float()
    pre = lanewise(torch.sigmoid, mixes[..., :n] * s[0] + b[:n]) + eps
    post = 2 * lanewise(torch.sigmoid, mixes[..., n:2 * n] * s[1] + b[n:2 * n])
    comb = (mixes[..., 2 * n:] * s[2] + b[2 * n:]).unflatten(-1, (n, n))
    comb = comb.softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


def hc_mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., n, d] streams -> fp32 mixes [..., rows of fn], an unweighted RMSNorm over all n*d
    values (one statistic per token) before the projection."""
    flat = x.flatten(-2).float()
    rsqrt = torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
    return linear(flat, fn.float()) * rsqrt


def hc_collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """sum_j pre_j X_j in fp32, cast to the stream dtype: [..., n, d] -> [..., d]."""
    return (pre[..., None] * x.float()).sum(-2).to(x.dtype)


def hc_post(y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X'_k = post_k y + sum_j comb[j, k] X_j (note the transpose), fp32, cast to y's dtype."""
    lead = x.shape[:-2]
    mixed = bmm(comb.reshape(-1, *comb.shape[-2:]).transpose(1, 2),
                x.float().reshape(-1, *x.shape[-2:])).view(*lead, *x.shape[-2:])
    return (post[..., None] * y.float()[..., None, :] + mixed).to(y.dtype)


# ---- MoE -------------------------------------------------------------------------------------
def route(logits: torch.Tensor, bias: torch.Tensor | None, topk: int, route_scale: float,
          score_func: str = "sqrtsoftplus", hash_idx: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] fp32 -> (weights [N, k] fp32, expert ids [N, k]). The bias only selects;
    weights are the unbiased scores of the chosen experts, normalised (not for softmax), scaled."""
    logits = logits.float()
    if score_func == "sqrtsoftplus":
        scores = lanewise(F.softplus, logits).sqrt()
    elif score_func == "sigmoid":
        scores = lanewise(torch.sigmoid, logits)
    else:
        scores = logits.softmax(-1)
    if hash_idx is not None:
        idx = hash_idx.long()
    else:
        biased = scores if bias is None else scores + bias.float()
        idx = biased.topk(topk, dim=-1).indices
    w = scores.gather(-1, idx)
    if score_func != "softmax":
        w = w / w.sum(-1, keepdim=True)
    return w * route_scale, idx


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, limit)) * clamp(up, -limit, limit) in fp32 (limit <= 0: no clamp)."""
    gate, up = gate.float(), up.float()
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
    return lanewise(F.silu, gate) * up


# ---- ops over paged pools and quantized weights (the seam the Triton kernels implement) ------
def gather_rows(pool, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pool [P, *row] (or an FP8-packed pool, kvfp8.Fp8Rows: its rows decoded), idx [N, K] int
    (-1 = none) -> rows [N, K, *row] (zeros where none), valid [N, K]."""
    valid = idx >= 0
    rows = pool[idx.clamp(min=0).long()]
    return rows.masked_fill(~valid.view(*valid.shape, *([1] * (rows.dim() - 2))), 0), valid


def sparse_attn_paged(q: torch.Tensor, sources: list[tuple[torch.Tensor, torch.Tensor]], sink: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """q [N,H,D]; sources: (pool [P,D] or kvfp8.Fp8Rows, idx [N,K] int32/64, -1 = none) pairs, e.g.
    the window ring and the compressed entries, each query attending to the union of its rows;
    sink [H] -> [N,H,D].
    Keys are read straight from the pools (one shared K=V head), nothing is gathered by the caller."""
    keys, valid = zip(*(gather_rows(pool, idx) for pool, idx in sources))
    return sparse_attn_gathered(q, torch.cat(keys, 1), torch.cat(valid, 1), sink, scale)


def indexer_scores_paged(q: torch.Tensor, w: torch.Tensor, pool: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """q [N,H,Di], w [N,H], pool [P,Di], idx [N,T] (-1 = none) -> fp32 [N,T]:
    sum_h w[n,h] relu(q[n,h] . pool[idx[n,t]]), -inf where idx < 0."""
    keys, valid = gather_rows(pool, idx)
    s = bmm(q.float(), keys.float().transpose(1, 2)).relu()
    return (s * w.float()[..., None]).sum(1).masked_fill(~valid, float("-inf"))


def topk_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores fp32 [N, T] (-inf = unusable entry) -> int64 [N, min(k, T)]: the columns of each row's
    k largest scores in the order of a stable descending sort (equal scores, +0.0 and -0.0
    included, go to the lower column; NaN sorts above +inf), -1 where the selected score is -inf.
    The indexer's top-k: ties (e.g. entries whose every head's ReLU is 0) resolved by position, so
    the selection does not depend on how a sequence was split into calls."""
    top = scores.sort(dim=-1, descending=True, stable=True).indices[:, :min(k, scores.shape[-1])]
    return torch.where(torch.gather(scores, 1, top) == float("-inf"), -1, top)


def e8m0_float(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 scale (float8_e8m0fnu or uint8 bytes) or fp32 scale -> fp32."""
    if scale.dtype == torch.float32:
        return scale
    b = scale.view(torch.uint8).to(torch.int32)
    return torch.exp2((b - 127).float())


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant: bool = False,
               block: int = 128) -> torch.Tensor:
    """x [M,K] @ W^T with W float8_e4m3fn [O,K] in block x block blocks (128: V4's; 32: V4.1's dense
    weights) scaled by `scale` [ceil(O/block), ceil(K/block)] (E8M0 or fp32) -> [M,O] in x.dtype (W
    dequantised to x.dtype). act_quant=True: x is FP8-simulated per 128 first (official numerics;
    kernels with FP8 tensor cores quantise x themselves and multiply FP8 by FP8)."""
    if act_quant:
        x = fp8_act_sim(x, 128)
    s = e8m0_float(scale).repeat_interleave(block, 0).repeat_interleave(block, 1)[:weight.shape[0], :weight.shape[1]]
    w = (weight.float() * s).to(x.dtype)
    return linear(x, w)


def fp8_groups(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int) -> list[tuple]:
    """The G = `groups` independent linears of a grouped FP8 linear (fp8_linear_grouped), as
    (x columns, weight rows, scale rows) views: x [..., G*K], W [G*R, K] with R a multiple of 128
    (each group whole 128-row scale blocks), scale [G*R/128, ceil(K/128)]."""
    O, K = weight.shape
    if type(groups) is not int or groups < 1 or O % groups or O // groups % 128:
        raise ValueError(f"fp8_linear_grouped: {O} weight rows do not split into {groups} groups of whole "
                         "128-row scale blocks")
    if x.shape[-1] != groups * K or scale.dim() != 2 or scale.shape[0] != O // 128:
        raise ValueError(f"fp8_linear_grouped: x [..., {x.shape[-1]}] and scale {tuple(scale.shape)} do not fit "
                         f"{groups} groups of weight [{O}, {K}] (x [..., {groups * K}], scale [{O // 128}, ...])")
    r = O // groups
    return [(x[..., g * K:(g + 1) * K], weight[g * r:(g + 1) * r], scale[g * r // 128:(g + 1) * r // 128])
            for g in range(groups)]


def fp8_linear_grouped(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int) -> torch.Tensor:
    """G = `groups` FP8 linears side by side: x [M, G*K], W e4m3 [G*R, K] (R % 128 == 0), scale
    [G*R/128, ceil(K/128)] -> [M, G*R] in x.dtype, columns g*R .. (g+1)*R - 1 = fp8_linear of x's
    columns g*K .. (g+1)*K - 1 with W's rows g*R .. (g+1)*R - 1 (the attention's grouped wo_a).
    A fused op (ops/__init__.py FUSED_NAMES): this loop + cat is its twin."""
    return torch.cat([fp8_linear(*part) for part in fp8_groups(x, weight, scale, groups)], -1)


_E2M1_SIGNED = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


# byte -> (value of the low nibble, value of the high nibble): one table lookup per byte
_FP4_PAIRS = torch.stack((_E2M1_SIGNED.repeat(16), _E2M1_SIGNED.repeat_interleave(16)), -1)


def fp4_dequant(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [..., O, K/2] (low nibble = even k) + E8M0 [..., O, K/32] -> fp32 [..., O, K]."""
    b = weight.view(torch.uint8).to(torch.int32)
    vals = F.embedding(b, _on(_FP4_PAIRS, weight.device)).flatten(-2)
    return (vals.unflatten(-1, (-1, 32)) * e8m0_float(scale)[..., None]).flatten(-2)


def fp4_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M,K] @ W^T, W FP4 e2m1 packed int8 [O,K/2] with E8M0 per-32 scales [O,K/32] -> [M,O] x.dtype."""
    return linear(x, fp4_dequant(weight, scale).to(x.dtype))


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor,
                w3: torch.Tensor, s3: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor, limit: float,
                h_act_sim: bool = False) -> torch.Tensor:
    """Routed experts with FP4 weights stacked over experts: x [N,dim], weights/ids [N,k] ->
    fp32 [N,dim] = sum_k w2_e((weights_k * swiglu(w1_e x, w3_e x)).to(x.dtype)), e = ids[:, k].
    w1/w3 int8 [E,inter,dim/2], w2 int8 [E,dim,inter/2]; s* E8M0 [E, out, in/32] (stacks, or
    ops/experts.PerExpert lists of each expert's tensor, indexed the same way). The expert
    inputs are used as given (callers apply any activation simulation first); h_act_sim=True
    FP8-simulates the hidden (per 128) before w2, as official numerics do."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        tok, slot = torch.where(ids == e)
        xe = x[tok]
        h = swiglu(fp4_linear(xe, w1[e], s1[e]), fp4_linear(xe, w3[e], s3[e]), limit)
        h = (weights[tok, slot, None] * h).to(x.dtype)
        if h_act_sim:
            h = fp8_act_sim(h, 128)
        y.index_add_(0, tok, fp4_linear(h, w2[e], s2[e]).float())
    return y


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
           norm_eps: float, hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One mHC site's input side: streams x [N,n,d] -> (u [N,d] in x.dtype, post [N,n], comb [N,n,n])
    = hc_mixes + hc_split_sinkhorn + hc_collapse."""
    n = x.shape[-2]
    pre, post, comb = hc_split_sinkhorn(hc_mixes(x, fn, norm_eps), scale, base, n, iters, hc_eps)
    return hc_collapse(x, pre), post, comb
