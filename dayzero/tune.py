"""`dayzero tune`: pick the fastest launch configuration of every Triton kernel for this device and
cache it (dayzero/ops/triton/tuning.py names the file by device and triton version), so the first
`serve` on a new device runs tuned kernels.

For each tunable kernel and each shape key it declares, every candidate config is run on the key's
cases, its outputs compared with the default config's (a config that changes results is rejected,
never chosen) and timed; the one with the least total time over the key's cases is written.
Keys of kernels with reductions name shapes, never row counts (batch invariance, issue 20: one
config, so one reduction order, for every row count): a key's cases are e.g. a decode and a
prefill row count, and the config chosen serves both.
"""
from __future__ import annotations

import importlib
import time

import torch

from dayzero.verify import rel_error

FAMILIES = ("attention", "indexer", "gemm", "dense", "moe", "mhc", "norm", "topk")


def _outputs(x):
    return x if isinstance(x, tuple) else (x,)


def _time(fn, device: torch.device) -> float:
    """Median milliseconds of fn() (GPU: triton's do_bench; interpreter: one timed call)."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=10, rep=50))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def tunables() -> dict:
    found = {}
    for fam in FAMILIES:
        mod = importlib.import_module(f"dayzero.ops.triton.{fam}")
        found.update(getattr(mod, "TUNABLES", {}))
    return found


def run(device: torch.device | str | None = None, kernels: list[str] | None = None, tol: float = 1e-2,
        log=print) -> dict:
    """Tune, save, and return {kernel: {shape key: {"config", "ms", "default_ms", "rejected"}}}."""
    from dayzero.ops import triton_usable
    from dayzero.ops.triton import tuning
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not triton_usable(device):
        raise ValueError(f"Triton cannot run on {device}: nothing to tune (the PyTorch twins have no configs)")
    report, table = {}, {}
    for name, tun in tunables().items():
        if kernels and name not in kernels:
            continue
        keyed: dict[str, list] = {}  # a key's cases: e.g. one decode and one prefill row count
        for key, run_case in tun.cases(device):
            keyed.setdefault(key, []).append(run_case)
        for key, runs in keyed.items():
            wants = [_outputs(run(tun.space[0])) for run in runs]
            timed, rejected = [], []
            for cfg in tun.space:
                try:
                    err = max(rel_error(g, w) for run, want in zip(runs, wants)
                              for g, w in zip(_outputs(run(cfg)), want))
                except Exception as e:  # a config the device cannot launch (e.g. out of shared memory)
                    rejected.append(dict(config=cfg, reason=f"{type(e).__name__}: {str(e)[:120]}"))
                    continue
                if err > tol:
                    rejected.append(dict(config=cfg, reason=f"changes the result (rel error {err:.2e})"))
                    continue
                timed.append((sum(_time(lambda r=run: r(cfg), device) for run in runs), cfg))
            if not timed:
                raise RuntimeError(f"{name} {key}: no candidate config ran correctly: {rejected}")
            ms, best = min(timed, key=lambda t: t[0])
            default_ms = next((t for t, c in timed if c == tun.space[0]), float("nan"))
            table.setdefault(name, {})[key] = best
            report.setdefault(name, {})[key] = dict(config=best, ms=ms, default_ms=default_ms, rejected=rejected,
                                                    cases=len(runs))
            log(f"{name:28s} {key:28s} best {ms:9.4f} ms (default {default_ms:9.4f} ms) {best}"
                + (f"  [{len(runs)} cases]" if len(runs) > 1 else "")
                + (f"  [{len(rejected)} rejected]" if rejected else ""))
    path = tuning.save(device, table)
    log(f"wrote {path}")
    return report
