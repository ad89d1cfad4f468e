"""Every Triton kernel of ops/triton/{attention,gemm,moe,mhc,norm,topk}.py compiles for sm_90 (H100), no GPU needed.

Runs `scripts/aot_compile.py --cc 90 --quick` in a subprocess with TRITON_INTERPRET removed from the
environment (the conftest sets it on CPU-only machines, and under it @triton.jit gives interpreter
objects): the default config (first of each TUNABLES space) of each op's launcher, bf16
activations, V4-Flash decode shapes, compiled ahead of time to cubin with the ptxas of the triton
wheel. The kernel list is read from the sources here, independently of the script, so a kernel
the script does not reach fails the test.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "aot_compile.py"
MODULES = ("attention", "gemm", "dense", "moe", "mhc", "norm", "topk")


def _nvidia_backend() -> bool:
    try:
        import triton.backends
    except ImportError:
        return False
    return "nvidia" in triton.backends.backends


def _kernels() -> list[str]:
    """@triton.jit functions named *_kernel in the four kernel modules."""
    names = []
    for m in MODULES:
        tree = ast.parse((ROOT / "dayzero" / "ops" / "triton" / f"{m}.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    re.fullmatch(r"triton\.jit(\(.*\))?", ast.unparse(d), re.DOTALL) for d in node.decorator_list):
                names.append(node.name)
    return names


@pytest.mark.skipif(not _nvidia_backend(), reason="triton has no NVIDIA backend (triton.backends lacks 'nvidia', "
                                                  "e.g. a non-x86 triton wheel): cannot compile for sm_90")
def test_every_kernel_compiles_for_sm90():
    kernels = _kernels()
    assert len(kernels) >= 10, kernels
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--cc", "90", "--quick"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    missing = [k for k in kernels if not re.search(rf"^sm_90 {k}\s+ok\b", r.stdout, re.MULTILINE)]
    assert not missing, f"not compiled for sm_90: {missing}\n{out[-6000:]}"
