"""Parameter-holding primitives of the reference model: Linear in every checkpoint format, RMSNorm.

A module's parameters carry the checkpoint's storage dtype and names (`<name>.weight`,
`<name>.scale`), so `state_dict()` of the model *is* the expected checkpoint inventory.
Weights are dequantised on use: the reference is the spec, not the fast path.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dayzero.distributed.comm import SINGLE, Comm
from dayzero.loader.formats import dequant_fp4, dequant_fp8_block
from dayzero.ops import REF, OpTable, ref

_STORAGE = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def storage_dtype(name: str) -> torch.dtype:
    return _STORAGE[name]


class UsesOps:
    """A module that calls ops through its table: the twins unless `Transformer.set_ops` installed
    a device's table (chosen once, at engine start), and collectives through its comm: identity
    unless `Transformer.set_comm` installed a process group's (tensor parallel ranks)."""
    ops: OpTable = REF
    comm: Comm = SINGLE


def fuse_rows(first: "Linear", second: "Linear") -> bool:
    """Re-home two FP8 linears that read the same input into one [O1 + O2, K] weight (and scale)
    whose row ranges are their parameters (views: nothing is stored twice), so a kernel table runs
    them as one GEMM (`fused_pair`). Only where both are FP8 with whole 128-row scale blocks, the
    same activation quantisation and no dequantised copies; returns whether it did."""
    if not (first.fmt == second.fmt == "fp8" and first.in_features == second.in_features
            and first.out_features % 128 == 0 and first.quant_input == second.quant_input
            and first.__dict__.get("_dequantized") is None and second.__dict__.get("_dequantized") is None):
        return False
    r = first.out_features
    for attr in ("weight", "scale"):
        big = torch.cat([getattr(first, attr), getattr(second, attr)])
        cut = r if attr == "weight" else r // 128
        setattr(first, attr, nn.Parameter(big[:cut], requires_grad=False))
        setattr(second, attr, nn.Parameter(big[cut:], requires_grad=False))
        first.__dict__[f"_pair_{attr}"] = big
    first.__dict__["_pair"] = second
    return True


def fused_pair(first: "Linear", second: "Linear", x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first(x), second(x)): one GEMM when `fuse_rows` joined them, else two calls."""
    if first.__dict__.get("_pair") is not second or torch.is_grad_enabled():
        return first(x), second(x)
    flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y = first.ops.fp8_linear(flat, first.__dict__["_pair_weight"], first.__dict__["_pair_scale"],
                             act_quant=first.quant_input)
    r = first.out_features
    a, b = torch.split_with_sizes(y, (r, y.shape[1] - r), 1)  # one call for both views
    if x.dim() == 2:
        return a, b
    return a.view(*x.shape[:-1], r), b.view(*x.shape[:-1], -1)


def _param(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)


class Linear(UsesOps, nn.Module):
    """y = x W^T. Formats (v4-architecture.md 5.3):
    dense   weight [out, in] in the storage dtype;
    fp8     weight float8_e4m3fn [out, in], scale float8_e8m0fnu [ceil(out/128), ceil(in/128)];
    fp8_f32 as fp8 with float32 block scales (Base checkpoints' experts);
    fp4     weight int8 [out, in/2] (two e2m1 codes per byte, low nibble = even k),
            scale float8_e8m0fnu [out, in/32].
    With `official` numerics an FP8/FP4 weight gets its input FP8-simulated per 128 along K
    (the reference's act_quant before fp8_gemm/fp4_gemm) unless `act_quant=False` (wo_a, which
    the official converter dequantises to BF16)."""

    def __init__(self, in_features: int, out_features: int, fmt: str, dtype: torch.dtype,
                 official: bool = False, act_quant: bool = True, split: int | None = None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        # tensor parallel: this rank's slice of the checkpoint tensor along dim `split` of weight
        # and scale (0: output rows, column-parallel; 1: input columns, row-parallel); the
        # features above are the slice's (distributed/layout.py)
        self.split = split
        self.reads_dequant = False  # True where the model reads dequant() instead of calling forward (wo_a)
        self.quant_input = official and act_quant and fmt != "dense"
        o, i = out_features, in_features
        if fmt == "dense":
            self.weight = _param((o, i), dtype)
        elif fmt in ("fp8", "fp8_f32"):
            self.weight = _param((o, i), torch.float8_e4m3fn)
            sdt = torch.float8_e8m0fnu if fmt == "fp8" else torch.float32
            self.scale = _param((math.ceil(o / 128), math.ceil(i / 128)), sdt)
        elif fmt == "fp4":
            self.weight = _param((o, i // 2), torch.int8)
            self.scale = _param((o, i // 32), torch.float8_e8m0fnu)
        else:
            raise ValueError(f"unknown weight format {fmt!r}")

    def dequant(self, dtype: torch.dtype) -> torch.Tensor:
        cached = self.__dict__.get("_dequantized")
        if cached is not None and cached.dtype == dtype:
            return cached
        if self.fmt == "dense":
            return self.weight.to(dtype)
        if self.fmt == "fp4":
            return dequant_fp4(self.weight, self.scale).to(dtype)
        return dequant_fp8_block(self.weight, self.scale).to(dtype)

    def copy_is_read(self, dtype: torch.dtype, fp32_kernel: bool) -> bool:
        """Whether a copy kept for inputs in `dtype` would be read: not for a dense weight whose
        forward hands fp32 inputs to the table's fp32_linear (which reads the stored weight),
        nor where the stored weight already is `dtype`."""
        if self.fmt == "dense" and self.weight.dtype == dtype:
            return False
        return not (self.fmt == "dense" and dtype == torch.float32 and fp32_kernel and not self.reads_dequant)

    def keep_dequantized(self, dtype: torch.dtype | None) -> None:
        """Keep a dequantised copy for `dtype` (None: drop it): trades memory for speed where the
        device has no FP8/FP4 kernels. The checkpoint tensors stay as they are."""
        self.__dict__["_dequantized"] = None
        if dtype is not None and not (self.fmt == "dense" and self.weight.dtype == dtype):
            self.__dict__["_dequantized"] = self.dequant(dtype)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        kernel = self.fmt != "dense" and self.__dict__.get("_dequantized") is None
        fused = kernel and self.quant_input and self.fmt != "fp4"  # the FP8 GEMM quantises x itself
        if self.quant_input and not fused:
            x = self.ops.fp8_act_sim(x, 128)
        if out_dtype is not None and out_dtype != x.dtype:
            x = x.to(out_dtype)
        if not kernel:
            if (self.fmt == "dense" and x.dtype == torch.float32 and "fp32_linear" in self.ops.kernels
                    and not torch.is_grad_enabled()):  # an fp32 GEMM reading the stored weight
                return self.ops.fp32_linear(x, self.weight)
            return ref.linear(x, self.dequant(x.dtype))  # F.linear, a row alike in any batch
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # the kernels take [M, K]
        if flat.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        if self.fmt == "fp4":
            y = self.ops.fp4_linear(flat, self.weight, self.scale)
        else:
            y = self.ops.fp8_linear(flat, self.weight, self.scale, act_quant=fused)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.fmt}"


class RMSNorm(UsesOps, nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = _param((dim,), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)
