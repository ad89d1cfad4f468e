"""What batch invariance costs on the CPU: `dayzero bench` scenarios S1 (MoE decode), S4 (decode
step) and S5 (prefill chunk) on the small Flash slice, run twice in one process: with this tree's
native kernels (batch-invariant) and with the kernels of the last revision before batch invariance
(gemm.c and attention.c built from git, swapped in behind the same op table; torch's elementwise
ops without ref.lanewise); before them the FP8 / FP4 linears and the MoE at decode and prefill row
counts, new and old timed alternately. Each line prints its roofline fraction and new / old time.

    python -m bench.batch_invariance [--rev 0ef106b] [--scenarios S1 S4 S5] [--out bench/results/batch_invariance]

Needs git history (the baseline's sources come from `git show REV:...`) and a C compiler. The
check that the baseline really is batch-variant (and this tree is not) runs first: rows of an FP8
linear alone vs in a call of 41 rows, both libraries.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BASELINE_REV = "0ef106b"  # main before batch invariance (issue 20)


def build_baseline(rev: str) -> dict[str, ctypes.CDLL]:
    """gemm.c and attention.c of `rev`, compiled with this tree's flags into the build cache."""
    from dayzero.ops.cpu import build
    out = build.cache_dir() / f"baseline-{rev}"
    out.mkdir(parents=True, exist_ok=True)
    libs = {}
    for name in ("common.h", "gemm.c", "attention.c"):
        src = subprocess.run(["git", "show", f"{rev}:dayzero/ops/cpu/{name}"], cwd=ROOT, capture_output=True,
                             text=True)
        if src.returncode:
            raise SystemExit(f"bench.batch_invariance: cannot read dayzero/ops/cpu/{name} at revision {rev!r} "
                             f"(needs the git history): {src.stderr.strip()}")
        (out / name).write_text(src.stdout)
    for module in ("gemm", "attention"):
        so = out / f"{module}.so"
        if not so.exists():
            cmd = [build._compiler(), *build.flags(), "-I", str(out), "-o", str(so), str(out / f"{module}.c"), "-lm"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"bench.batch_invariance: building the baseline {module}.c failed:\n{r.stderr[-2000:]}")
        libs[module] = ctypes.CDLL(str(so))
    return libs


class Kernels:
    """Swaps the native table's kernels (and ref.lanewise / row_mean) between this tree's and a
    baseline's; the op table's Python wrappers call whichever is in place."""

    def __init__(self, baseline: dict[str, ctypes.CDLL]):
        from dayzero.ops import ref
        from dayzero.ops.cpu import attention, build, gemm
        self.gemm, self.attention, self.ref = gemm, attention, ref
        self.new = dict(gemm=gemm.kernels, attention=dict(attention._kernels), lanewise=ref.lanewise,
                        row_mean=ref.row_mean)
        self.old = dict(gemm=gemm.bind(baseline["gemm"]),
                        attention={n: build.bind(baseline["attention"], n, "p")
                                   for n in ("dz_sparse_attn_packed", "dz_indexer_scores_packed")},
                        lanewise=lambda fn, x: fn(x), row_mean=lambda x: x.mean(-1, keepdim=True))

    def use(self, which: str) -> None:
        k = self.new if which == "new" else self.old
        self.gemm.kernels = k["gemm"]
        self.attention._kernels.clear()
        self.attention._kernels.update(k["attention"])
        self.ref.lanewise, self.ref.row_mean = k["lanewise"], k["row_mean"]


def row_check(kernels: Kernels) -> dict[str, bool]:
    """Is a row of an FP8 linear (K = O = 4096, bf16) the same alone and in a call of 41 rows?"""
    from dayzero.loader.formats import quant_fp8_block
    from dayzero.ops.cpu import gemm
    g = torch.Generator().manual_seed(0)
    w, s = quant_fp8_block(torch.randn(4096, 4096, generator=g) * 0.02)
    x = torch.randn(41, 4096, generator=g).to(torch.bfloat16)
    out = {}
    for which in ("new", "old"):
        kernels.use(which)
        whole = gemm.fp8_linear(x, w, s, act_quant=True)
        out[which] = all(torch.equal(whole[i:i + 1], gemm.fp8_linear(x[i:i + 1], w, s, act_quant=True))
                         for i in (0, 17, 40))
    kernels.use("new")
    return out


def op_costs(kernels: Kernels, pk: dict, reps: int = 7) -> list[dict]:
    """FP8 / FP4 linears (K = O = 4096) and the routed-expert MoE (16 experts 4096 x 2048, top-6) at
    decode and prefill row counts, each timed new and old alternately (median of `reps` pairs), so
    a machine whose load changes affects both alike."""
    import statistics
    import time

    from dayzero.loader.formats import quant_fp4, quant_fp8_block
    from dayzero.ops.cpu import gemm
    g = torch.Generator().manual_seed(0)
    w8, s8 = quant_fp8_block(torch.randn(4096, 4096, generator=g) * 0.02)
    w4, s4 = quant_fp4(torch.randn(4096, 4096, generator=g) * 0.02)
    E, dim, inter, k = 16, 4096, 2048, 6
    moe_w = []
    for out, inn in ((inter, dim), (inter, dim), (dim, inter)):
        ws, ss = zip(*(quant_fp4(torch.randn(out, inn, generator=g) * inn ** -0.5) for _ in range(E)))
        moe_w += [torch.stack(ws), torch.stack(ss)]
    cases = []
    for dt in (torch.bfloat16, torch.float32):
        for M in (1, 8, 64, 512):
            x = torch.randn(M, 4096, generator=g).to(dt)
            cases.append((f"fp8_linear {str(dt)[6:]}", M, lambda x=x: gemm.fp8_linear(x, w8, s8, act_quant=True),
                          4096 * 4096 + M * 4096 * 2, 2 * M * 4096 * 4096))
            cases.append((f"fp4_linear {str(dt)[6:]}", M, lambda x=x: gemm.fp4_linear(x, w4, s4),
                          4096 * 2048 + 4096 * 128 + M * 4096 * 2, 2 * M * 4096 * 4096))
    for B in (1, 8, 64):
        x = torch.randn(B, dim, generator=g).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(B)])
        wts = torch.rand(B, k, generator=g)
        touched = ids.unique().numel()
        cases.append(("moe_experts bf16", B, lambda x=x, ids=ids, wts=wts: gemm.moe_experts(x, wts, ids, *moe_w, 10.0),
                      touched * 3 * (dim * inter // 2 + dim * inter // 32), 6 * B * k * dim * inter))
    rows = []
    for name, M, fn, nbytes, flops in cases:
        t = {"new": [], "old": []}
        for which in ("new", "old"):  # warm-up
            kernels.use(which)
            fn()
        for _ in range(reps):
            for which in ("new", "old"):
                kernels.use(which)
                t0 = time.perf_counter()
                fn()
                t[which].append(time.perf_counter() - t0)
        kernels.use("new")
        tn, to = statistics.median(t["new"]), statistics.median(t["old"])
        bound = "memory" if M <= 8 else "compute"
        roof = (lambda tt: nbytes / tt / pk["bandwidth"]) if bound == "memory" else (lambda tt: flops / tt / pk["bf16_flops"])
        rows.append(dict(op=name, rows=M, new_us=tn * 1e6, old_us=to * 1e6, new_over_old=tn / to, bound=bound,
                         roofline_new=roof(tn), roofline_old=roof(to)))
        print(f"{name:18s} rows={M:4d} new {tn * 1e6:9.1f} us ({100 * roof(tn):5.1f}% of {bound} roofline)  "
              f"old {to * 1e6:9.1f} us ({100 * roof(to):5.1f}%)  new/old {tn / to:.2f}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", default=BASELINE_REV, help="git revision of the baseline kernels (default %(default)s)")
    p.add_argument("--scenarios", nargs="+", default=["S1", "S4", "S5"])
    p.add_argument("--out", default="bench/results/batch_invariance")
    a = p.parse_args(argv)
    from dayzero import bench
    from dayzero.ops.cpu import available
    if not available("gemm") or not available("attention"):
        raise SystemExit("bench.batch_invariance: the native CPU kernels do not build here")
    kernels = Kernels(build_baseline(a.rev))
    inv = row_check(kernels)
    print(f"rows alone == in a batch of 41 (FP8 linear, bf16): this tree {inv['new']}, baseline {a.rev} {inv['old']}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from dayzero.scenarios import peaks
    pk = peaks(torch.device("cpu"))
    print(f"copy {pk['bandwidth'] / 1e9:.1f} GB/s, bf16 matmul {pk['bf16_flops'] / 1e9:.0f} GFLOP/s (measured now)")
    print("--- ops, new and old timed alternately")
    ops = op_costs(kernels, pk)
    results = {}
    for which in ("new", "old"):
        kernels.use(which)
        print(f"--- {'batch-invariant kernels (this tree)' if which == 'new' else f'baseline kernels ({a.rev})'}")
        results[which] = bench.run(size="small", device="cpu", scenarios=tuple(a.scenarios), out_dir=None,
                                   baseline=False)
    kernels.use("new")
    print("--- cost of batch invariance (time new / old; roofline fraction new vs old)")
    rows = []
    for n, o in zip(results["new"], results["old"]):
        ratio = n["time_us"] / o["time_us"]
        rows.append(dict(scenario=n["scenario"], batch=n["batch"], context=n["context"], new_us=n["time_us"],
                         old_us=o["time_us"], new_over_old=ratio, roofline_new=n["roofline_fraction"],
                         roofline_old=o["roofline_fraction"], device=n["device"], peaks=n["peaks"],
                         baseline_rev=a.rev, commit=n["commit"], row_invariant=inv))
        print(f"{n['scenario']:20s} B={n['batch']!s:3s} ctx={n['context']!s:6s} new {n['time_us']:10.1f} us "
              f"({100 * n['roofline_fraction']:5.1f}% of roofline)  old {o['time_us']:10.1f} us "
              f"({100 * o['roofline_fraction']:5.1f}%)  new/old {ratio:.2f}")
    (out / "cost.json").write_text(json.dumps(dict(peaks=pk, baseline_rev=a.rev, row_invariant=inv, ops=ops,
                                                   scenarios=rows), indent=1))
    print(f"wrote {out / 'cost.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
