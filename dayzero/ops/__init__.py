"""The kernel seam: one table of op implementations per device, chosen once at engine start.

`REF` holds the PyTorch twins (`ops/ref.py`, every device). `for_device` returns the Triton
table on GPUs Triton supports (CUDA, ROCm and XPU builds of torch), the native CPU table
(`ops/cpu`, C kernels built with the system compiler) on CPUs where it builds, and the twins
elsewhere; `DAYZERO_OPS=ref|triton|cpu` overrides the choice (triton on the CPU needs
TRITON_INTERPRET=1).
Models receive their table through `Transformer.set_ops`; nothing below ops/ checks devices.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch

from dayzero.ops import ref

OP_NAMES = ("rms_norm", "fp8_act_sim", "apply_rope", "fp32_linear", "sparse_attn_paged", "indexer_scores_paged",
            "topk_select", "compress_pool", "hc_pre", "hc_post", "fp8_linear", "fp4_linear", "moe_experts")
# fused ops: one call for a sequence of twins the model runs on every step (per-op dispatch is most
# of a small model's CPU decode step). Their twin is that sequence (ops/ref.py), the default of
# every table; a table with a kernel for one lists it in `fused` (ops/cpu/fused.c: bit-exact), and
# models call it only then (elsewhere they keep calling the table's own ops in sequence).
# fp8_linear_grouped (the attention's grouped wo_a: G fp8_linears side by side): ops/cpu/gemm.c's
# kernel is bit-identical to the CPU table's fp8_linear per group (which is the twin's up to fp32
# summation order, as for fp8_linear itself)
FUSED_NAMES = ("hadamard_fp4_sim", "act_rms_norm", "fp8_nope_sim", "fp8_linear_grouped")


@dataclasses.dataclass(frozen=True)
class OpTable:
    """Implementations of every op in OP_NAMES (same signatures as the twins in ops/ref.py)."""
    name: str
    rms_norm: Callable
    fp8_act_sim: Callable
    apply_rope: Callable
    fp32_linear: Callable
    sparse_attn_paged: Callable
    indexer_scores_paged: Callable
    topk_select: Callable
    compress_pool: Callable
    hc_pre: Callable
    hc_post: Callable
    fp8_linear: Callable
    fp4_linear: Callable
    moe_experts: Callable
    kernels: tuple[str, ...] = ()  # ops that run a kernel of the table (the rest are twins)
    # no op synchronises with the host or makes shapes from data, so a recorded step (a CUDA
    # graph, engine/graphs.py) can contain them all; the twins' moe_experts loops over the
    # experts present (a host read), so REF is not
    capturable: bool = False
    # moe_experts takes each expert's tensors where they lie (ops/experts.py PerExpert: the
    # memory-mapped checkpoint, nothing copied) as well as stacks; otherwise the model stacks them
    moe_per_expert: bool = False
    hadamard_fp4_sim: Callable = ref.hadamard_fp4_sim  # FUSED_NAMES: the twins' composition unless replaced
    act_rms_norm: Callable = ref.act_rms_norm
    fp8_nope_sim: Callable = ref.fp8_nope_sim
    fp8_linear_grouped: Callable = ref.fp8_linear_grouped
    fused: tuple[str, ...] = ()  # fused ops that run a kernel of the table


REF = OpTable(name="ref", **{op: getattr(ref, op) for op in OP_NAMES})


def assemble(name: str, package: str, providers: dict[str, str], skip: frozenset[str] = frozenset(),
             capturable: bool = False) -> OpTable:
    """An op table from kernel modules: op -> `{package}.{providers[op]}`'s function of the same
    name; the twin where no provider is named, the module is in `skip`, does not exist yet, or
    does not define the op (`kernels` lists the ops that got a kernel). `capturable`: the
    kernels are (the table is only if moe_experts got its kernel: its twin is not)."""
    import importlib
    impls, kernels = {}, []
    for op in OP_NAMES:
        fn, module = None, providers.get(op)
        if module is not None and module not in skip:
            try:
                fn = getattr(importlib.import_module(f"{package}.{module}"), op, None)
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{module}":
                    raise
        impls[op] = fn or getattr(REF, op)
        if fn is not None:
            kernels.append(op)
    return OpTable(name=name, kernels=tuple(kernels), capturable=capturable and "moe_experts" in kernels, **impls)


def triton_usable(device: torch.device) -> bool:
    """True when Triton kernels can launch on `device`: a GPU backend with triton importable, or
    any device under TRITON_INTERPRET=1 (the interpreter: correct, slow; used by tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type in ("cuda", "xpu") or os.environ.get("TRITON_INTERPRET") == "1"


CHOICES = ("auto", "ref", "triton", "cpu")


def for_device(device: torch.device | str, choice: str | None = None) -> OpTable:
    """The op table for `device`. choice (or env DAYZERO_OPS): "ref", "triton", "cpu" or None
    (auto: triton on GPUs, cpu on CPUs where the native kernels build, else ref)."""
    device = torch.device(device)
    choice = choice or os.environ.get("DAYZERO_OPS") or "auto"
    if choice not in CHOICES:
        raise ValueError(f"DAYZERO_OPS / ops must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "ref":
        return REF
    if choice == "cpu" or (choice == "auto" and device.type == "cpu"):
        if device.type != "cpu":
            raise ValueError(f"ops='cpu' runs on CPU tensors only, not on {device}")
        from dayzero.ops import cpu
        try:
            return cpu.table()
        except cpu.NativeUnavailable:
            if choice == "cpu":
                raise
            return REF  # no compiler: the twins (slower, same results)
    if choice == "auto" and device.type not in ("cuda", "xpu"):
        return REF  # the interpreter is for tests, never chosen by itself
    if not triton_usable(device):
        if choice == "triton":
            raise RuntimeError(f"ops='triton' asked for but Triton cannot run on {device} "
                               "(no triton, or a CPU without TRITON_INTERPRET=1)")
        return REF
    from dayzero.ops.triton import table
    return table(device)
