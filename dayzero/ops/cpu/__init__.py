"""Native CPU kernels behind the ops seam: C (OpenMP, -march=native), one shared library per
source file built once per machine by build.py and called through ctypes. Each op has its twin in
ops/ref.py and a parity test in tests/ops/test_cpu_*.py; ops without a kernel here run their twins.

Where they pay: batch-1 decode on the CPU is bound by per-op overhead (an mHC site is ~100 small
PyTorch ops, one call here) and by weight bandwidth (FP4/FP8 weights decoded in registers
instead of dequantised copies).
"""
from __future__ import annotations

import dataclasses

from dayzero.ops import OpTable, assemble
from dayzero.ops.cpu import build
from dayzero.ops.cpu.build import NativeUnavailable, available

# op name -> module of this package (a Python wrapper `<module>.py` over `<module>.c`) providing a
# function of the same name
_PROVIDERS = {
    "rms_norm": "mhc",
    "fp8_act_sim": "mhc",
    "compress_pool": "mhc",
    "apply_rope": "rope",
    "fp32_linear": "dense",
    "sparse_attn_paged": "attention",
    "indexer_scores_paged": "attention",
    "topk_select": "topk",
    "hc_pre": "mhc",
    "hc_post": "mhc",
    "fp8_linear": "gemm",
    "fp4_linear": "gemm",
    "moe_experts": "gemm",
}

FUSED = ("hadamard_fp4_sim", "act_rms_norm", "fp8_nope_sim")  # the fused ops (dayzero.ops FUSED_NAMES) fused.c provides
# (the fourth, fp8_linear_grouped, is gemm.c's: the table has it where the FP8 linear kernel builds)

__all__ = ["NativeUnavailable", "available", "table", "unavailable"]


def unavailable() -> dict[str, str]:
    """module -> why its library cannot be built here (empty when every module builds)."""
    out = {}
    for module in sorted(set(_PROVIDERS.values())):
        try:
            build.lib(module)
        except NativeUnavailable as e:
            out[module] = str(e)
    return out


def table() -> OpTable:
    """The native CPU op table: kernels of every module that builds here, twins elsewhere.
    Raises NativeUnavailable when no module builds (no compiler)."""
    failed = unavailable()
    if failed and len(failed) == len(set(_PROVIDERS.values())):
        raise NativeUnavailable("; ".join(failed.values()))
    t = assemble("cpu", __name__, _PROVIDERS, frozenset(failed))
    # gemm.c's MoE reads an address table: experts stay where the checkpoint maps them
    t = dataclasses.replace(t, moe_per_expert="moe_experts" in t.kernels)
    if build.available("fused"):  # fused.c: one call for a sequence of twins (ops FUSED_NAMES)
        from dayzero.ops.cpu import fused
        t = dataclasses.replace(t, fused=FUSED, **{name: getattr(fused, name) for name in FUSED})
    if "fp8_linear" in t.kernels:  # gemm.c's grouped FP8 linear (a fused op too)
        from dayzero.ops.cpu import gemm
        t = dataclasses.replace(t, fused=t.fused + ("fp8_linear_grouped",), fp8_linear_grouped=gemm.fp8_linear_grouped)
    return t
