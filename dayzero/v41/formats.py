"""DeepSeek-V4.1's weight formats by role (research/v41-and-dspark.md 1.4-1.5), and the linear that holds
the one V4 does not have.

role     tensors                                                        storage (+ `.scale`)
DENSE    attn.wq_a, wq_b, wkv, wo_a, wo_b; attn.indexer.wq_b;            float8_e4m3fn [out, in], E8M0 scale per
         ffn.shared_experts.w1/w2/w3; engram.wkv                         32x32 block [ceil(out/32), ceil(in/32)]
EXPERT   ffn.experts.{e}.w1/w2/w3                                        MXFP4: int8 [out, in/2] (two e2m1 codes
                                                                         per byte, low nibble = even k), E8M0
                                                                         scale per 32 inputs [out, in/32] (V4's)
ENGRAM   engram.embed.weight                                             float8_e4m3fn [rows, head_dim], E8M0
                                                                         scale per 32 values of a row [rows, head_dim/32]
other    embed, head, norms, compressor.wkv/wgate, indexer.wk,          the storage dtype (BF16 in the release);
         indexer.weights_proj, ffn.gate.weight, engram.q_weight/k_weight F32: hc_*, attn_sink, gate.bias / bias_vl

The DENSE list follows the research table ("attn proj, shared experts, compressor/indexer, engram.wkv")
where it is specific; where the notes leave it open: the compressor projections stay in the storage dtype
(the ratio-2 pooling compressor runs them in fp32 and transformers' deepseek_v41 says its gate ships BF16;
V4's compressor is BF16 too), so does the indexer's `weights_proj` (V4: BF16), and so does the small
latent-key projection `indexer.wk` [128, 512]: with it BF16 the released inventory's tensor count is met
exactly (backbone 93,418 by this table + 2,401 `mtp.*` + 266 vision = 96,085, the checkpoint atlas of
research 1.4; with an FP8 `wk` and its scale there would be 4 more, one per KV source), and the I8 and
F8_E8M0 byte totals agree with the atlas (tests/v41/test_model_shapes.py). The released headers
themselves were not available; a checkpoint that stores a tensor otherwise is refused by the strict
loader, naming the tensor and both dtypes.

FP8 32x32 is V4's FP8 block format with block 32 (loader/formats.py `dequant_fp8_block(.., block=32)`);
MXFP4 is V4's FP4 format unchanged; the Engram row format is new (1x32 blocks along a row).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dayzero.loader.formats import (FP8_AMAX_FLOOR, FP8_MAX, _pow2_exponent, dequant_fp8_block, float_to_e8m0,
                                    quant_fp8_block)
from dayzero.ops import ref
from dayzero.reference.layers import Linear

DENSE_BLOCK = 32
ROW_BLOCK = 32


class Fp8Linear32(Linear):
    """y = x W^T with W float8_e4m3fn [out, in] and an E8M0 scale per 32x32 block, no activation
    quantisation (`transformers` numerics). With the twins' table (the reference forward, what the oracle
    tests compare) or a kept dequantised copy: W dequantised (to x's dtype, exactly: e4m3 values times
    powers of two) and multiplied, as transformers' model does. With a table that has an fp8_linear kernel:
    that op with block=32 (the native CPU kernel decodes W in registers: the same W, fp32 sums in another
    order; other devices' tables, dtypes or shapes they do not take run the twin, which dequantises)."""

    def __init__(self, in_features: int, out_features: int, split: int | None = None):
        nn.Module.__init__(self)  # not Linear.__init__: no dense weight to allocate
        self.in_features, self.out_features, self.fmt = in_features, out_features, "fp8_32"
        self.split, self.reads_dequant, self.quant_input = split, False, False  # split: as Linear's (a rank's slice)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn),
                                   requires_grad=False)
        self.scale = nn.Parameter(torch.zeros(math.ceil(out_features / DENSE_BLOCK), math.ceil(in_features / DENSE_BLOCK),
                                              dtype=torch.float8_e8m0fnu), requires_grad=False)

    def dequant(self, dtype: torch.dtype) -> torch.Tensor:
        cached = self.__dict__.get("_dequantized")
        if cached is not None and cached.dtype == dtype:
            return cached
        return dequant_fp8_block(self.weight, self.scale, DENSE_BLOCK).to(dtype)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        if out_dtype is not None and out_dtype != x.dtype:
            x = x.to(out_dtype)
        if "fp8_linear" not in self.ops.kernels or self.__dict__.get("_dequantized") is not None:
            return ref.linear(x, self.dequant(x.dtype))
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # the kernels take [M, K]
        if flat.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        y = self.ops.fp8_linear(flat, self.weight, self.scale, block=DENSE_BLOCK)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)


def v41_linear(args, in_features: int, out_features: int, dtype: torch.dtype, dense_role: bool = True,
               split: int | None = None) -> Linear:
    """A DENSE-role linear: FP8 32x32 when the checkpoint is quantised (`args.quant`), else `dtype`;
    dense_role=False: always `dtype` (the BF16 projections of the table above). split: a tensor-parallel
    rank's slice along that dim of the weight (and its scale), in_/out_features already the slice's."""
    if dense_role and args.quant == "fp8":
        return Fp8Linear32(in_features, out_features, split)
    return Linear(in_features, out_features, "dense", dtype, split=split)


def expert_format(args) -> str:
    """The routed experts' Linear format: V4's MXFP4 ("fp4") in a quantised checkpoint, else dense."""
    if args.quant != "fp8":
        return "dense"
    if args.expert_dtype != "fp4":
        raise ValueError(f"DeepSeek-V4.1 experts stored as {args.expert_dtype!r} (`quantization_config.expert_dtype`) "
                         f"are not built: only the released 'fp4' (MXFP4) is; convert the experts back to fp4")
    return "fp4"


def quant_fp8_dense(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [out, in] -> (float8_e4m3fn, E8M0 scale per 32x32 block): V4's quantiser with block 32."""
    return quant_fp8_block(w, DENSE_BLOCK)


def quant_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [rows, width] -> (float8_e4m3fn [rows, width], E8M0 [rows, width/32]): per 32 values of a row,
    scale = the smallest power of two >= amax/448 (amax floored as V4's FP8), codes rounded to nearest."""
    rows, width = w.shape
    if width % ROW_BLOCK:
        raise ValueError(f"an Engram table row of {width} values does not split into blocks of {ROW_BLOCK}")
    b = w.float().view(rows, width // ROW_BLOCK, ROW_BLOCK)
    amax = b.abs().amax(-1).clamp_min(FP8_AMAX_FLOOR)
    e, _ = _pow2_exponent(amax / FP8_MAX)
    s = torch.ldexp(torch.ones_like(amax), e)
    q = (b / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(rows, width)
    return q, float_to_e8m0(s)


def dequant_fp8_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The inverse view of quant_fp8_rows: fp32 [rows, width] (for gathered rows: EngramTable does the same)."""
    return (q.float().unflatten(-1, (-1, ROW_BLOCK)) * ref.e8m0_float(scale)[..., None]).flatten(-2)
