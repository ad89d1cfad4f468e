"""Triton kernels behind the ops seam, one file per op family. Every kernel has its twin in
ops/ref.py and a parity test (tests/ops/) that runs under TRITON_INTERPRET=1 on the CPU.

Kernels are written for triton >= 3.6 (the oldest version a lent GPU has) and current triton.
Tuned launch configurations come from `dayzero.ops.triton.tuning` (written by `dayzero tune`).
"""
from __future__ import annotations


import torch

from dayzero.ops import OpTable, assemble

# op name -> module of this package providing a function of the same name
_PROVIDERS = {
    "rms_norm": "norm",
    "fp8_act_sim": "norm",
    "compress_pool": "norm",
    "apply_rope": "norm",
    "fp32_linear": "dense",
    "sparse_attn_paged": "attention",
    "indexer_scores_paged": "indexer",
    "topk_select": "topk",
    "hc_pre": "mhc",
    "hc_post": "mhc",
    "fp8_linear": "gemm",
    "fp4_linear": "gemm",
    "moe_experts": "moe",
}


def table(device: torch.device) -> OpTable:
    """The Triton op table for `device`: each op from its kernel module, twins for ops no module
    provides yet (listed as absent in docs/HARDWARE.md). The wrappers launch with grids from
    shapes only and build their tile tables on the device (no host reads): capturable. On a CPU
    (the interpreter) it first checks the interpreter can run the kernels at all (ops/triton/probe.py)."""
    if torch.device(device).type == "cpu":
        from dayzero.ops.triton.probe import interpreter_problem

        if (problem := interpreter_problem()) is not None:
            raise RuntimeError(problem)
    return assemble("triton", __name__, _PROVIDERS, capturable=True)
