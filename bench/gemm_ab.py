"""A/B of two builds of gemm.c's FP4 decode calls in one process (bench/cpu_gemm_micro.py --ab LIB):
this tree's library against another tree's, call by call, one thread, process CPU time."""
from __future__ import annotations

import statistics
import time

import torch

from dayzero.ops.cpu import gemm


def ab(path: str, reps: int = 1500, sets: int = 16) -> None:
    """This tree's gemm library against another build of gemm.c at `path` (e.g. main's: run
    `python -c "from dayzero.ops.cpu import build; print(build.build('gemm'))"` in that tree), call by
    call in one process, one thread, process CPU time (p10 / median): fp4_linear at 1 and 2 bf16 rows
    in cache (E8M0 scale bytes 118..129), and the S1-shaped MoE at N = 1 with the experts streamed
    from memory (6 x `sets` experts in turn); whether the two agree bit for bit."""
    import ctypes
    before, libs = torch.get_num_threads(), {"this tree": gemm.kernels, "other": gemm.bind(ctypes.CDLL(path))}
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print(f"A/B against {path}: one thread, process CPU time per call, p10 / median")

    def run(name, fn, n, nbytes):  # fn(i): the i-th call's result (the same inputs for both libraries at i = -1)
        ts, out = {k: [] for k in libs}, {}
        try:
            for r in range(n):
                for j, (k, kern) in enumerate(libs.items()):
                    gemm.kernels = kern
                    t0 = time.process_time()
                    fn(2 * r + j)
                    ts[k].append(time.process_time() - t0)
            for k, kern in libs.items():
                gemm.kernels = kern
                out[k] = fn(-1)
        finally:
            gemm.kernels = libs["this tree"]
        cols = [f"{k} {sorted(t)[len(t) // 10] * 1e6:8.1f} / {statistics.median(t) * 1e6:8.1f} us "
                f"({nbytes / sorted(t)[len(t) // 10] / 1e9:5.2f} GB/s)" for k, t in ts.items()]
        same = torch.equal(*out.values())
        print(f"{name:36s}" + "   ".join(cols) + ("   bit-identical" if same else "   RESULTS DIFFER"))

    try:
        for O, K in ((256, 4096), (512, 2048)):
            w = torch.randint(-128, 128, (O, K // 2), dtype=torch.int8, generator=g)
            s = torch.randint(118, 130, (O, K // 32), dtype=torch.uint8, generator=g).view(torch.float8_e8m0fnu)
            for M in (1, 2):
                x = torch.randn(M, K, generator=g).to(torch.bfloat16)
                run(f"fp4_linear M={M} {O}x{K} (in cache)", lambda i, x=x, w=w, s=s: gemm.fp4_linear(x, w, s), reps,
                    O * K // 2)
        E, dim, inter = 6 * sets, 4096, 2048
        st = []
        for o, i in ((inter, dim), (inter, dim), (dim, inter)):
            st += [torch.randint(-128, 128, (E, o, i // 2), dtype=torch.int8, generator=g),
                   torch.randint(118, 130, (E, o, i // 32), dtype=torch.uint8, generator=g).view(torch.float8_e8m0fnu)]
        x, wts = torch.randn(1, dim, generator=g).to(torch.bfloat16), torch.rand(1, 6, generator=g)

        def moe(i):  # call i: the experts of set i % sets, so from memory (6 x sets x 12.6 MB in turn)
            return gemm.moe_experts(x, wts, torch.arange(6).view(1, 6) + 6 * (i % sets), *st, 10.0)
        run("MoE N=1 dim 4096 x 2048 (cold)", moe, 24, 6 * 3 * dim * inter * 17 // 32)
    finally:
        torch.set_num_threads(before)
