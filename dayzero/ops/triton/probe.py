"""Can this Triton interpreter run dayzero's kernels? One tiny kernel that loops over a bound given
as a kernel argument, as most kernels here do (`for start in range(0, N, BLOCK)`).

triton 3.6's interpreter passes scalar arguments as 1-element arrays and turns them into Python ints
with `int(array)`, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python
scalars"): every such kernel then fails. triton 3.9 squeezes the array first. Checked once, so a
user gets one error naming the versions instead of a TypeError from inside each kernel.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _loop_kernel(out_ptr, n):
    acc = 0
    for _ in range(0, n, 1):
        acc += 1
    tl.store(out_ptr, acc)


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str | None:
    """None when Triton kernels run compiled (TRITON_INTERPRET unset) or the interpreter runs the
    probe right; else why the interpreter cannot run dayzero's kernels, and the fix."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import numpy

    versions = f"triton {triton.__version__} with numpy {numpy.__version__}"
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_kernel[(1,)](out, 3)
    except Exception as e:  # noqa: BLE001 - any failure means the kernels cannot run here
        return (f"the Triton interpreter ({versions}) cannot run a loop over a kernel argument "
                f"({type(e).__name__}: {e}); triton 3.6's interpreter needs numpy < 2.4: "
                "pip install 'numpy<2.4', or a newer triton (3.9 works)")
    if int(out[0]) != 3:
        return f"the Triton interpreter ({versions}) counted a 3-step loop as {int(out[0])}"
    return None
