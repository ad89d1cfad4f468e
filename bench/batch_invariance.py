"""What batch invariance costs on the CPU: `dayzero bench` scenarios S1 (MoE decode), S4 (decode
step) and S5 (prefill chunk) on the small Flash slice, run twice in one process: with this tree's
native kernels (batch-invariant) and with the kernels of the last revision before batch invariance
(gemm.c and attention.c built from git, swapped in behind the same op table; torch's elementwise
ops without ref.lanewise). Each line prints its roofline fraction; the summary, new / old time.

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
    (out / "bench.jsonl").unlink(missing_ok=True)
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
    (out / "cost.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out / 'cost.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
