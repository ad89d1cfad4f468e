"""Microbenchmark of the native CPU GEMMs (dayzero/ops/cpu/gemm.c) against their twins.

    OMP_NUM_THREADS=2 python -m bench.cpu_gemm_micro [--reps 200] [--no-small] [--no-s1] [--no-flash] [--s4] [--moe-cold]
    OMP_NUM_THREADS=1 python -m bench.cpu_gemm_micro --cpu-time ...   (a shared machine: CPU time, one core)
    OMP_NUM_THREADS=1 python -m bench.cpu_gemm_micro --grouped-only    (the grouped wo_a A/B alone)
    python -m bench.cpu_gemm_micro --ab LIB    (FP4 decode calls against another tree's gemm library)

Decode-sized calls of the built-in model (M = 1, 2; FP8 256x256 and 512x128, FP4 256x256,
MoE dim 256 x inter 256) in us per call (median and best) against the twins; Flash-sized
linears (4096x4096 FP8 and FP4, bf16 x, M = 1..16) streamed from memory (12 copies of the
weights, beyond the last-level cache), in GB/s of weight bytes and as a fraction of the copy
bandwidth measured in the same run, beside the same call on the fp32 kernels
(`options(0)`, the path without AVX512-BF16), the same kernels with the float-route weight decoding
(`fast_decode(0)`: gemm.c before fastdecode.h, the same results), timed alternately with the
native column, and torch's bf16 matmul on the dequantised weights; and the S1 MoE scenario at
batch 1 and 8 (16 experts, dim 4096 x inter 2048, top-6, FP4) as a fraction of the copy bandwidth
(dayzero.scenarios.peaks / s1_moe accounting), with and without the integer decoding and with the
decode-sized blocks on the tile walk instead of gemm.c's row-pair streams (`moe_streams(0)`),
alternately;
--s4: the S4 decode step of `dayzero bench --size small` (B = 1, 8 at 1K context) the same way;
--moe-cold: the S1 shapes with the experts streamed from memory on every call (as in a decode step);
--grouped / --grouped-only: the Flash attention's grouped wo_a (8 groups of [M, 4096] x [1024, 4096]
FP8, bf16 x, 32 MB a layer, weights rotated over 16 layers' copies) as 8 fp8_linear calls + cat
(Attention._grouped_wo_a before the grouped op) against one fp8_linear_grouped call, alternately,
for 1 and 2 kernel threads: best and median per layer of wall time and of process CPU time;
--ab LIB: this tree's gemm library against another build (LIB), call by call in one process, one
thread, CPU time: fp4_linear at 1 and 2 rows in cache, the S1-shaped MoE at N = 1 from memory.
On a shared machine the best times are the steadier ones. Prints; writes nothing.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dayzero.loader.formats import quant_fp4, quant_fp8_block
from dayzero.ops import ref
from dayzero.ops.cpu import gemm


def _us(fn, reps: int) -> tuple[float, float]:
    """(median, min) microseconds per call after a warmup."""
    for _ in range(max(3, reps // 10)):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6, min(ts) * 1e6


def small(reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    print(f"{'op':40s} {'native us (median / min)':>26s} {'twin us (median / min)':>24s}")

    def row(name, fn, twin, twin_reps=reps):
        a, amin = _us(fn, reps)
        b, bmin = _us(twin, twin_reps)
        print(f"{name:40s} {a:12.1f} / {amin:8.1f}   {b:12.1f} / {bmin:8.1f}   ({b / a:.0f}x)")

    for dt in (torch.bfloat16, torch.float32):
        d = str(dt)[6:]
        for M in (1, 2):
            for O, K in ((256, 256), (512, 128)):
                w, s = quant_fp8_block(torch.randn(O, K, generator=g) * 0.05)
                x = torch.randn(M, K, generator=g).to(dt)
                for aq in (False, True):
                    row(f"fp8_linear {d} M{M} {O}x{K} act_quant={int(aq)}",
                        lambda x=x, w=w, s=s, aq=aq: gemm.fp8_linear(x, w, s, aq),
                        lambda x=x, w=w, s=s, aq=aq: ref.fp8_linear(x, w, s, aq))
            w, s = quant_fp4(torch.randn(256, 256, generator=g))
            x = torch.randn(M, 256, generator=g).to(dt)
            row(f"fp4_linear {d} M{M} 256x256", lambda x=x, w=w, s=s: gemm.fp4_linear(x, w, s),
                lambda x=x, w=w, s=s: ref.fp4_linear(x, w, s))
            E, k, dim, inter = 8, 2, 256, 256
            st = []
            for o, i in ((inter, dim), (inter, dim), (dim, inter)):
                q = [quant_fp4(torch.randn(o, i, generator=g) * i ** -0.5) for _ in range(E)]
                st += [torch.stack([a for a, _ in q]), torch.stack([b for _, b in q])]
            ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(M)])
            wts = torch.rand(M, k, generator=g)
            args = (x, wts, ids, *st, 10.0)
            for sim in (False, True):
                row(f"moe_experts {d} M{M} E{E} k{k} {dim}x{inter} sim={int(sim)}",
                    lambda a=args, h=sim: gemm.moe_experts(*a, h_act_sim=h), lambda a=args, h=sim: ref.moe_experts(*a, h_act_sim=h),
                    max(10, reps // 10))


def flash(rows=(1, 2, 4, 8, 12, 16), copies: int = 12, reps: int = 5) -> None:
    """4096x4096 FP8 / FP4 linears, bf16 x, weights rotated over `copies` copies (memory, not cache)."""
    from dayzero.scenarios import peaks
    bw = peaks(torch.device("cpu"))["bandwidth"]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 4096, generator=g) * 0.05
    mats = {"fp8": quant_fp8_block(w), "fp4": quant_fp4(w)}
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s; best of {reps} sweeps over {copies} weight copies, us per call")
    print(f"{'linear':16s} {'native':>8s} {'GB/s':>6s} {'of copy':>8s} {'float route':>12s} {'of copy':>8s} "
          f"{'fp32 kernels':>13s} {'bf16 matmul':>12s}")
    for name, (q, sc) in mats.items():
        qs = [(q.clone(), sc.clone()) for _ in range(copies)]
        fn = gemm.fp8_linear if name == "fp8" else gemm.fp4_linear
        wd = (ref.fp8_linear if name == "fp8" else ref.fp4_linear)(torch.eye(4096), q, sc).T.contiguous().bfloat16()
        dense = [wd.clone() for _ in range(max(1, copies // 4))]  # bf16 is 2-4x the bytes: fewer copies
        nbytes = q.numel() * q.element_size() + sc.numel() * sc.element_size()
        for M in rows:
            x = torch.randn(M, 4096, generator=g).bfloat16()

            def sweep(f, ws, reps=reps):
                best = float("inf")
                for _ in range(reps):
                    t0 = time.perf_counter()
                    for a in ws:
                        f(a)
                    best = min(best, (time.perf_counter() - t0) / len(ws))
                return best * 1e6
            nat, flt = float("inf"), float("inf")
            for _ in range(reps):  # native and float-route sweeps alternate (a shared machine's load hits both)
                nat = min(nat, sweep(lambda a: fn(x, *a), qs, 1))
                gemm.kernels.fast_decode(0)
                try:
                    flt = min(flt, sweep(lambda a: fn(x, *a), qs, 1))
                finally:
                    gemm.kernels.fast_decode(1)
            gemm.kernels.options(0)
            try:
                f32 = sweep(lambda a: fn(x, *a), qs)
            finally:
                gemm.kernels.options(1)
            mm = sweep(lambda a: x @ a.T, dense)
            print(f"{name + ' M=' + str(M):16s} {nat:8.0f} {nbytes / nat / 1e3:6.1f} {100 * nbytes / nat * 1e6 / bw:7.1f}% "
                  f"{flt:12.0f} {100 * nbytes / flt * 1e6 / bw:7.1f}% {f32:13.0f} {mm:12.0f}")


def s1(batches=(1, 8), reps: int = 10) -> None:
    """dayzero bench S1 (scenarios.s1_moe: its byte accounting, median of 3, the twin baseline),
    plus the median / best of `reps` more calls; fractions are of the copy bandwidth measured here."""
    from dayzero.ops import for_device
    from dayzero.scenarios import _fp4_stack, peaks, s1_moe
    dev = torch.device("cpu")
    table = for_device(dev, "cpu")
    bw = peaks(dev)["bandwidth"]
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s")
    for b in batches:
        r = s1_moe(table, dev, b, 16, 4096, 2048)
        nbytes = r["bytes"]
        g = torch.Generator().manual_seed(0)  # the inputs of s1_moe again, for the extra calls
        stacks = [t for o, i in ((2048, 4096), (2048, 4096), (4096, 2048)) for t in _fp4_stack(16, o, i, dev, g)]
        x = torch.randn(b, 4096, generator=g).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(16, generator=g)[:6] for _ in range(b)])
        wts = torch.rand(b, 6, generator=g)
        call = lambda a=(x, wts, ids, *stacks): table.moe_experts(*a, 10.0)  # noqa: E731
        ts = {1: [], 0: [], 2: []}
        for _ in range(3):
            call()
        for _ in range(reps):  # integer decode on / off, and on without the row-pair streams, alternately
            for f in (1, 0, 2):
                gemm.kernels.fast_decode(int(f != 0))
                gemm.kernels.moe_streams(int(f != 2))
                try:
                    t0 = time.perf_counter()
                    call()
                    ts[f].append(time.perf_counter() - t0)
                finally:
                    gemm.kernels.fast_decode(1)
                    gemm.kernels.moe_streams(1)
        med, best = statistics.median(ts[1]) * 1e6, min(ts[1]) * 1e6

        def other(f, name):
            m, bb = statistics.median(ts[f]) * 1e6, min(ts[f]) * 1e6
            return (f"{name}: median {m / 1e3:.2f} ms ({100 * nbytes / m * 1e6 / bw:.1f}%), best {bb / 1e3:.2f} ms "
                    f"({100 * nbytes / bb * 1e6 / bw:.1f}%)")
        print(f"S1 B={b}: {r['time_s'] * 1e3:.2f} ms = {100 * nbytes / r['time_s'] / bw:.1f}% of copy bandwidth "
              f"(bench accounting); {reps} more calls: median {med / 1e3:.2f} ms ({100 * nbytes / med * 1e6 / bw:.1f}%), "
              f"best {best / 1e3:.2f} ms ({100 * nbytes / best * 1e6 / bw:.1f}%); alternating with them: "
              f"{other(2, 'tile walk (moe_streams(0))')}; {other(0, 'float route')}; "
              f"twin {r['baseline_time_s'] * 1e3:.0f} ms ({r['shape']})")


def moe_cold(rows=(1, 2, 8), sets: int = 8, reps: int = 24) -> None:
    """The S1 shapes (dim 4096 x inter 2048, top-6, FP4, bf16 x) as a decode step meets them: every
    call reads experts the last sets - 1 calls did not (48 experts, `sets` disjoint groups of 6 in
    turn, ~600 MB: beyond the last-level cache), so the weights stream from memory each time; each
    row picks the group's 6 experts (N pairs per expert). The row-pair streams and the tile walk
    (`moe_streams(0)`) alternate call by call; GB/s of expert bytes, as a fraction of the copy
    bandwidth measured here."""
    from dayzero.ops import for_device
    from dayzero.scenarios import _fp4_stack, peaks
    dev = torch.device("cpu")
    table = for_device(dev, "cpu")
    bw = peaks(dev)["bandwidth"]
    g = torch.Generator().manual_seed(0)
    E, dim, inter = 6 * sets, 4096, 2048
    stacks = [t for o, i in ((inter, dim), (inter, dim), (dim, inter)) for t in _fp4_stack(E, o, i, dev, g)]
    nbytes = 6 * sum(t[0].numel() * t.element_size() for t in stacks)
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s")
    for n in rows:
        x = torch.randn(n, dim, generator=g).to(torch.bfloat16)
        wts = torch.rand(n, 6, generator=g)
        groups = [torch.arange(6 * j, 6 * j + 6).expand(n, 6).contiguous() for j in range(sets)]
        ts, i = {1: [], 0: []}, 0
        for r in range(reps + 2):
            for f in (1, 0):
                gemm.kernels.moe_streams(f)
                try:
                    t0 = time.perf_counter()
                    table.moe_experts(x, wts, groups[i % sets], *stacks, 10.0)
                    dt = time.perf_counter() - t0
                finally:
                    gemm.kernels.moe_streams(1)
                i += 1
                if r >= 2:
                    ts[f].append(dt)
        line = [f"{name} median {statistics.median(ts[f]) * 1e3:.2f} ms ({100 * nbytes / statistics.median(ts[f]) / bw:.1f}%), "
                f"best {min(ts[f]) * 1e3:.2f} ms ({100 * nbytes / min(ts[f]) / bw:.1f}%)"
                for f, name in ((1, "row-pair streams"), (0, "tile walk"))]
        print(f"MoE cold N={n} ({nbytes / 1e6:.0f} MB a call): " + "; ".join(line))


def s4(batches=(1, 8), context: int = 1024, reps: int = 7) -> None:
    """dayzero bench S4 at --size small (2-layer Flash slice, 16 experts, `context` tokens): the
    decode step timed with the integer decoding on, on with the MoE's decode blocks on the tile
    walk (`moe_streams(0)`) and off, alternately (best / median of `reps` steps each), as a
    fraction of the copy bandwidth measured here (scenarios.decode_bytes)."""
    from dayzero.bench import SIZES, _prepared
    from dayzero.ops import for_device
    from dayzero.reference.seqcache import Batch
    from dayzero.scenarios import FilledCache, decode_bytes, peaks
    from dayzero.synthetic import flash_slice, random_model
    dev = torch.device("cpu")
    cfg = SIZES["small"]
    args = flash_slice(layer_types=cfg["layers"], n_routed_experts=cfg["experts"]).replace(**cfg.get("slice", {}))
    model = _prepared(random_model(args, device=dev), for_device(dev, "cpu"))
    bw = peaks(dev)["bandwidth"]
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s")
    for b in batches:
        filled = FilledCache(model, b, context, dev)
        ids = torch.randint(0, args.vocab_size, (b,))
        nbytes = decode_bytes(model, b, context)

        def step():
            with torch.no_grad():
                X = model.forward_packed(ids, Batch([context] * b, [1] * b, filled.cache, dev))
                return model.logits(X, model.head_weight())
        ts = {1: [], 0: [], 2: []}
        for _ in range(2):
            step()
        for _ in range(reps):
            for f in (1, 0, 2):
                gemm.kernels.fast_decode(int(f != 0))
                gemm.kernels.moe_streams(int(f != 2))
                try:
                    t0 = time.perf_counter()
                    step()
                    ts[f].append(time.perf_counter() - t0)
                finally:
                    gemm.kernels.fast_decode(1)
                    gemm.kernels.moe_streams(1)
        line = []
        for f, name in ((1, "integer decode"), (2, "MoE tile walk"), (0, "float route")):
            best, med = min(ts[f]), statistics.median(ts[f])
            line.append(f"{name} best {best * 1e3:.1f} ms ({100 * nbytes / best / bw:.1f}%), median {med * 1e3:.1f} ms "
                        f"({100 * nbytes / med / bw:.1f}%)")
        print(f"S4 B={b} ctx={context} ({nbytes / 1e6:.0f} MB): " + "; ".join(line))


def grouped(rows=(1, 8), copies: int = 16, reps: int = 9, threads=(1, 2)) -> None:
    """The grouped wo_a A/B: per layer (one pass over a copy), best / median of `reps` alternating
    sweeps over `copies` weight copies, wall and process CPU time (both threads' CPU under 2).
    "whole": one fp8_linear over all G * R rows against x's first K columns (the same weight
    bytes in one call, not the same computation): what one big call streams at."""
    G, R, K = 8, 1024, 4096
    g = torch.Generator().manual_seed(0)
    w0, s0 = quant_fp8_block(torch.randn(G * R, K, generator=g) * 0.05)
    mats = [(w0.clone(), s0.clone()) for _ in range(copies)]
    views = [[(w[i * R:(i + 1) * R], s[i * R // 128:(i + 1) * R // 128]) for i in range(G)] for w, s in mats]
    nbytes = w0.numel() + s0.numel() * s0.element_size()
    before = torch.get_num_threads()
    names = ("8 calls", "grouped", "whole")
    print(f"grouped wo_a: {G} groups of [M, {K}] x [{R}, {K}] FP8 ({nbytes / 1e6:.1f} MB a layer), bf16 x, "
          f"{copies} copies; ms per layer, best / median of {reps} alternating sweeps (GB/s of the best)")
    print(f"{'':16s}" + "".join(f"{n + ' wall':>24s}" for n in names) + "".join(f"{n + ' CPU':>16s}" for n in names))
    try:
        for nt in threads:
            torch.set_num_threads(nt)
            for M in rows:
                o = torch.randn(M, G, K, generator=g).bfloat16()
                flat = o.reshape(M, G * K)
                fns = (lambda i: torch.cat([gemm.fp8_linear(o[:, j], w, s) for j, (w, s) in enumerate(views[i])], -1),
                       lambda i: gemm.fp8_linear_grouped(flat, *mats[i], G),
                       lambda i: gemm.fp8_linear(flat[:, :K], *mats[i]))
                assert torch.equal(fns[0](0).view(torch.int16), fns[1](0).view(torch.int16))
                wall, cpu = [[] for _ in fns], [[] for _ in fns]
                for _ in range(reps):
                    for f, fn in enumerate(fns):
                        t0, c0 = time.monotonic(), time.process_time()  # monotonic: --cpu-time patches perf_counter
                        for i in range(copies):
                            fn(i)
                        wall[f].append((time.monotonic() - t0) / copies * 1e3)
                        cpu[f].append((time.process_time() - c0) / copies * 1e3)
                line = "".join(f"{min(t):7.2f} / {statistics.median(t):6.2f} ({nbytes / min(t) / 1e6:4.1f})"
                               for t in wall)
                line += "".join(f"{min(t):7.2f} / {statistics.median(t):6.2f}" for t in cpu)
                print(f"{f'threads {nt} M={M}':16s}{line}")
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--no-s1", action="store_true", help="skip the S1 scenario")
    ap.add_argument("--no-flash", action="store_true", help="skip the 4096x4096 linears")
    ap.add_argument("--no-small", action="store_true", help="skip the built-in model's decode-sized calls")
    ap.add_argument("--s4", action="store_true", help="also the S4 decode step (small slice), integer decode on / off")
    ap.add_argument("--moe-cold", action="store_true",
                    help="also the S1-shaped MoE with the experts streamed from memory every call (N = 1, 2, 8), "
                         "row-pair streams against the tile walk")
    ap.add_argument("--grouped", action="store_true",
                    help="also the grouped wo_a A/B (8 fp8_linear calls vs one fp8_linear_grouped), 1 and 2 threads")
    ap.add_argument("--grouped-only", action="store_true", help="only the grouped wo_a A/B")
    ap.add_argument("--ab", metavar="LIB", help="only: FP4 decode calls of this tree's gemm library against the gemm "
                    "library at LIB (another tree's build), alternating, one thread, CPU time")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by the process's CPU time (time.process_time, also inside dayzero.scenarios: the copy "
                         "bandwidth too) instead of wall time: on a shared machine it leaves out the waits for a core; "
                         "one thread only (OMP_NUM_THREADS=1)")
    a = ap.parse_args()
    if a.cpu_time:
        if torch.get_num_threads() != 1:
            ap.error(f"--cpu-time needs one thread (OMP_NUM_THREADS=1), not {torch.get_num_threads()}: "
                     "CPU time adds up the threads")
        time.perf_counter = time.process_time  # this module and dayzero.scenarios read time.perf_counter per call
    print(f"threads {torch.get_num_threads()}")
    if a.grouped_only:
        grouped()
        raise SystemExit
    if a.ab:
        from bench.gemm_ab import ab
        ab(a.ab)
        raise SystemExit
    if not a.no_small:
        small(a.reps)
    if not a.no_flash:
        flash()
    if not a.no_s1:
        s1()
    if a.moe_cold:
        moe_cold()
    if a.s4:
        s4()
    if a.grouped:
        grouped()
