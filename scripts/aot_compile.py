"""Ahead-of-time compile every Triton kernel of dayzero/ops/triton/{attention,indexer,gemm,dense,moe,mhc,norm,topk}.py for
NVIDIA sm_90 (H100) and sm_80 (A100) on a machine without a GPU, with the launch configurations the
launchers really use.

How a variant is made (so that signature, constexprs and options are what a real launch produces):
  1. The op's own launcher (e.g. attention.sparse_attn_paged) is called on `meta` tensors of V4-Flash
     shapes (dim 4096, 64 heads x 512, indexer 64 x 128, 256 experts x inter 2048 FP4, hc 4), with
     each config of the module's TUNABLES[op].space passed as `config=`, for bf16 activations and,
     where the launcher takes them, fp32 ones. Its kernels are swapped for recorders, so the
     launcher's own code maps config + dtypes + shapes to constexprs, num_warps, num_stages, grid
     and scalar arguments; nothing of that is re-implemented here. The only stand-ins are the
     device queries a CPU cannot answer: the SM count (132 on sm_90 = H100 SXM, 108 on sm_80 =
     A100; --sms overrides) and gemm._fp8_tensor_cores (cc >= 89).
  2. Each recorded launch goes through triton's own argument specialisation for the target
     (create_function_from_signature + JITFunction._pack_args, as JITFunction.run does): pointer
     element types (*bf16, *fp32, *u8, *i32, *i64, ...), i32/i64/fp32 scalars, ints equal to 1
     turned into constexprs, tt.divisibility=16 attributes.
  3. triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32), options=...) to cubin; the
     registers, stack and local memory come from cuobjdump --dump-resource-usage and the spill
     stores/loads from the ptxas -v log of that same compile (both tools ship with the triton
     wheel); the PTX is searched for wgmma / mma.sync.

One line per distinct compiled variant (identical launches are compiled once; `+n` counts the
others). Exit status 1 if any variant fails to compile, a launcher fails on a config, or a kernel
of the four modules is never compiled for a target. Constructs a target cannot run by design are
skipped with a printed SKIP line (the FP8 tensor-core W8A8 path of gemm.fp8_linear on sm_80).

  python scripts/aot_compile.py                  # sm_90 and sm_80, every config
  python scripts/aot_compile.py --cc 90 --quick  # default config (first of each space), bf16 only
  python scripts/aot_compile.py --cc 90 --ops sparse_attn_paged  # one op's launches only

The work runs in worker subprocesses with TRITON_INTERPRET removed from the environment (under
TRITON_INTERPRET=1 @triton.jit gives interpreter objects) and a fresh TRITON_CACHE_DIR (so every
variant is really compiled; --cache-dir reuses one).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("attention", "indexer", "gemm", "dense", "moe", "mhc", "norm", "topk")
SMS = {90: 132, 80: 108}  # H100 SXM5, A100
TAG = "@@AOT "


# =====================================================================================================
# worker: enumerate launches, specialise, compile (imports triton; TRITON_INTERPRET must be unset)
# =====================================================================================================
def _worker(args) -> int:
    import contextlib
    import inspect
    import io
    import re
    import types
    import warnings

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    if os.environ.get("TRITON_INTERPRET"):
        print("worker: TRITON_INTERPRET is set; kernels would be interpreter objects", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    import importlib

    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature
    from dayzero.ops.kvfp8 import Fp8Layout, Fp8Rows
    mods = {m: importlib.import_module(f"dayzero.ops.triton.{m}") for m in MODULES}
    attention, indexer, gemm, dense, moe, mhc, norm, topk = (mods[m] for m in MODULES)
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cuobjdump = bin_dir / "cuobjdump"

    def emit(rec: dict) -> None:
        sys.stdout.write(TAG + json.dumps(rec, default=str) + "\n")
        sys.stdout.flush()

    # ---- the kernels: jit functions of the four modules that no other jit function calls ----------
    kernels: dict[str, tuple[str, object]] = {}
    for mname, mod in mods.items():
        jits = {n: o for n, o in vars(mod).items() if isinstance(o, JITFunction) and o.__module__ == mod.__name__}
        for n, o in jits.items():
            called = any(re.search(rf"\b{re.escape(n)}\s*\(", p.src) for m2, p in jits.items() if m2 != n)
            if not called:
                kernels[n] = (mname, o)

    # ---- meta-tensor inputs -------------------------------------------------------------------------
    bf16, f32, i32, i64 = torch.bfloat16, torch.float32, torch.int32, torch.int64
    e4m3, e8m0 = torch.float8_e4m3fn, torch.float8_e8m0fnu

    def T(*shape, dt=f32):
        return torch.empty(*shape, device="meta", dtype=dt)

    ACTS = {"bf16": bf16, "fp32": f32}

    # Each op: list of (scenario label, model-realistic inputs under activation dtype `act`) ->
    # thunk(cfg) that calls the launcher. Scenario 0 is decode (used by --quick).
    def sparse_attn_cases(act):
        H, D, win = 64, 512, 128
        out = []
        # (label, tokens, second-source keys or None for a sliding layer, idx dtype): the model's idx
        # are int64 (reference/attention.py rows_of), the tuning cases' int32; key counts past the
        # window are top-512 (CSA), all closed entries (HCA, any count: 1021 = not a multiple of 16)
        # "-fp8": the pools of an FP8 KV cache (ops/kvfp8.py packed rows, rope dims in `act`)
        lay = Fp8Layout(D, 64, act)

        def pool(rows, fp8):
            return Fp8Rows(T(rows, lay.width, dt=torch.uint8), lay) if fp8 else T(rows, D, dt=act)

        for label, n, kc, idt in (("dec-csa512", 1, 512, i64), ("dec-hca8192", 1, 8192, i64),
                                  ("dec-ragged1021", 1, 1021, i64), ("dec-swa", 1, None, i64),
                                  ("pre512-csa512", 512, 512, i64), ("dec-csa512-idx32", 1, 512, i32),
                                  ("dec-csa512-fp8", 1, 512, i64), ("pre512-csa512-fp8", 512, 512, i64)):
            q, fp8 = T(n, H, D, dt=act), label.endswith("-fp8")
            srcs = [(pool(1 << 14, fp8), T(n, win, dt=idt))]
            if kc is not None:
                srcs.append((pool(1 << 16, fp8), T(n, kc, dt=idt)))
            sink = T(H)
            out.append((label, lambda cfg, q=q, s=srcs, k=sink: attention.sparse_attn_paged(q, s, k, D ** -0.5,
                                                                                            config=cfg)))
        return out

    def indexer_cases(act):
        H, DI = 64, 128
        out = []
        for label, n, t in (("dec-T65536", 1, 1 << 16), ("dec-T65533", 1, (1 << 16) - 3), ("pre256-T16384", 256, 1 << 14)):
            # w fp32 and idx int64 as the model passes them (reference/attention.py Indexer.select)
            a = (T(n, H, DI, dt=act), T(n, H), T(1 << 16, DI, dt=act), T(n, t, dt=i64))
            out.append((label, lambda cfg, a=a: indexer.indexer_scores_paged(*a, config=cfg)))
        return out

    def rms_cases(act):
        out = []
        for label, m, c, w in (("dec-C4096", 1, 4096, True), ("pre-C4096", 4096, 4096, True),
                               ("qhead-C512-noW", 64 * 64, 512, False), ("dec-kv-C512", 1, 512, True),
                               ("q-C1024", 256, 1024, True)):
            x, wt = T(m, c, dt=act), (T(c, dt=act) if w else None)
            out.append((label, lambda cfg, x=x, wt=wt: norm.rms_norm(x, wt, 1e-6, config=cfg)))
        return out

    def fp8sim_cases(act):
        return [(f"{lbl}", lambda cfg, x=T(m, n, dt=act), b=b: norm.fp8_act_sim(x, b, config=cfg))
                for lbl, m, n, b in (("dec-4096/128", 1, 4096, 128), ("pre-4096/128", 4096, 4096, 128),
                                     ("nope-448/64", 4096, 448, 64))]

    def pool_cases(act):
        # the model pools in fp32 (reference/attention.py: win.float()) whatever the activations;
        # bf16 kv/gate (accepted by the launcher) under act=bf16 as an extra scenario
        out = []
        for label, m, s, c in (("csa-S8-C512", 1, 8, 512), ("hca-S128-C512", 32, 128, 512), ("idx-S8-C128", 512, 8, 128)):
            out.append((label + "-fp32in", lambda cfg, kv=T(m, s, c), g=T(m, s, c): norm.compress_pool(kv, g, config=cfg)))
            if act == bf16:
                out.append((label + "-bf16in", lambda cfg, kv=T(m, s, c, dt=bf16), g=T(m, s, c, dt=bf16):
                            norm.compress_pool(kv, g, config=cfg)))
        return out

    def rope_cases(act):
        out = []
        for label, n, h in (("dec-q", 1, 64), ("pre-q", 4096, 64), ("pre-kv", 4096, 1)):
            out.append((label, lambda cfg, x=T(n, h, 512, dt=act), c=T(n, 1, 32), s_=T(n, 1, 32):
                        norm.apply_rope(x, c, s_, config=cfg)))
        return out

    def hc_pre_cases(act):
        n, d = 4, 4096
        R = (2 + n) * n
        return [(f"N{N}", lambda cfg, a=(T(N, n, d, dt=act), T(R, n * d), T(3), T(R)):
                 mhc.hc_pre(*a, 20, 1e-6, 1e-6, config=cfg)) for N in (1, 16, 2048)]

    def hc_post_cases(act):
        n, d = 4, 4096
        return [(f"N{N}", lambda cfg, a=(T(N, d, dt=act), T(N, n, d, dt=act), T(N, n), T(N, n, n)):
                 mhc.hc_post(*a, config=cfg)) for N in (1, 2048)]

    def _fp8_w(O, K, sdt=e8m0):
        return T(O, K, dt=e4m3), T(triton.cdiv(O, 128), triton.cdiv(K, 128), dt=sdt)

    def fp8_cases(act, act_quant):
        out = []
        for M, O, K in gemm._FP8_GPU:  # the tuning shapes (V4-Flash wq_a, wq_b, shared experts, prefill)
            w, s = _fp8_w(O, K)
            out.append((f"M{M}-O{O}-K{K}", lambda cfg, x=T(M, K, dt=act), w=w, s=s:
                        gemm.fp8_linear(x, w, s, act_quant=act_quant, config=cfg)))
        w, s = _fp8_w(1024, 4096, f32)  # fp32 block scales (loader.formats.quant_fp8_block supports them)
        out.append(("M1-O1024-K4096-fp32scale", lambda cfg, x=T(1, 4096, dt=act), w=w, s=s:
                    gemm.fp8_linear(x, w, s, act_quant=act_quant, config=cfg)))
        if not act_quant:  # DeepSeek-V4.1's dense 32x32 blocks (W8A16 only): wq_b and wo_b of V4.1-Flash
            for M, O, K in ((1, 32768, 1280), (512, 5120, 8192)):
                w, s = T(O, K, dt=e4m3), T(triton.cdiv(O, 32), triton.cdiv(K, 32), dt=e8m0)
                out.append((f"M{M}-O{O}-K{K}-b32", lambda cfg, x=T(M, K, dt=act), w=w, s=s:
                            gemm.fp8_linear(x, w, s, config=cfg, block=32)))
        return out

    def fp32_cases(act):
        # the tuning shapes (LM head decode / prefill, router, compressor) with bf16 weights as
        # stored, then fp32 weights (a checkpoint stored in fp32)
        out = []
        for M, O, K in dense._FP32_GPU:
            out.append((f"M{M}-O{O}-K{K}", lambda cfg, x=T(M, K, dt=act), w=T(O, K, dt=bf16):
                        dense.fp32_linear(x, w, config=cfg)))
        out.append(("M1-O256-K4096-fp32w", lambda cfg, x=T(1, 4096, dt=act), w=T(256, 4096):
                    dense.fp32_linear(x, w, config=cfg)))
        return out

    def fp4_cases(act):
        out = []
        for M, O, K in gemm._FP4_GPU:
            a = (T(M, K, dt=act), T(O, K // 2, dt=torch.int8), T(O, K // 32, dt=e8m0))
            out.append((f"M{M}-O{O}-K{K}", lambda cfg, a=a: gemm.fp4_linear(*a, config=cfg)))
        return out

    def moe_cases(act):
        E, k, dim, inter = 256, 6, 4096, 2048
        ws = []
        for o, i in ((inter, dim), (inter, dim), (dim, inter)):
            ws += [T(E, o, i // 2, dt=torch.int8), T(E, o, i // 32, dt=e8m0)]
        out = []
        for N in (1, 64, 512):
            for sim in (False, True):  # h_act_sim: the official numerics (reference/moe.py)
                a = (T(N, dim, dt=act), T(N, k), T(N, k, dt=i64))
                out.append((f"N{N}{'-hsim' if sim else ''}", lambda cfg, a=a, sim=sim:
                            moe.moe_experts(*a, *ws, 10.0, sim, config=cfg)))
        return out

    def topk_cases(act):
        # indexer scores are fp32 whatever the activations: (label, rows, entries, k) for V4-Flash
        # (k 512) and V4-Pro (k 1024) decode at a 1M context, a prefill chunk, the built-in model
        out = []
        for label, n, t, k in (("dec-T262144-k512", 1, 1 << 18, 512), ("dec64-T262144-k1024", 64, 1 << 18, 1024),
                               ("pre2048-T16384-k512", 2048, 1 << 14, 512), ("dec-T37-k8", 1, 37, 8)):
            out.append((label, lambda cfg, s=T(n, t), k=k: topk.topk_select(s, k, config=cfg)))
        return out

    OPS = [  # (module, tunable name, cases(act dtype), activation dtypes)
        ("attention", "sparse_attn_paged", sparse_attn_cases, ("bf16", "fp32")),
        ("indexer", "indexer_scores_paged", indexer_cases, ("bf16", "fp32")),
        ("gemm", "fp8_linear", lambda a: fp8_cases(a, False), ("bf16", "fp32")),
        ("gemm", "fp8_linear_w8a8", lambda a: fp8_cases(a, True), ("bf16", "fp32")),
        ("gemm", "fp4_linear", fp4_cases, ("bf16", "fp32")),
        ("dense", "fp32_linear", fp32_cases, ("bf16", "fp32")),
        ("moe", "moe_experts", moe_cases, ("bf16", "fp32")),
        ("mhc", "hc_pre", hc_pre_cases, ("bf16", "fp32")),
        ("mhc", "hc_post", hc_post_cases, ("bf16", "fp32")),
        ("norm", "rms_norm", rms_cases, ("bf16", "fp32")),
        ("norm", "fp8_act_sim", fp8sim_cases, ("bf16", "fp32")),
        ("norm", "compress_pool", pool_cases, ("bf16", "fp32")),
        ("norm", "apply_rope", rope_cases, ("bf16", "fp32")),
        ("topk", "topk_select", topk_cases, ("fp32",)),
    ]
    tunables = {name: mods[m].TUNABLES[name] for m, name, _, _ in OPS}
    for m in MODULES:  # every tunable of the modules has a scenario list here
        missing = set(mods[m].TUNABLES) - set(tunables)
        if missing:
            emit({"t": "error", "msg": f"{m}.TUNABLES has no scenarios in aot_compile.py: {sorted(missing)}"})
            return 1

    # ---- recording launches -------------------------------------------------------------------------
    class Recorder:
        def __init__(self, fn, sink):
            self.fn, self.sink = fn, sink

        def __getitem__(self, grid):
            def launch(*a, **kw):
                self.sink.append((self.fn, grid, a, kw))
            return launch

    _ABSENT = object()

    @contextlib.contextmanager
    def device_stand_in(cc: int, sms: int, sink: list):
        saved = []

        def setattr_saved(obj, name, value):
            saved.append((obj, name, obj.__dict__.get(name, _ABSENT) if isinstance(obj, type) else getattr(obj, name)))
            setattr(obj, name, value)

        for name, (mname, fn) in kernels.items():
            setattr_saved(mods[mname], name, Recorder(fn, sink))
        setattr_saved(attention, "_sm_count", lambda dev: sms)
        setattr_saved(mhc, "_sm_count", lambda dev: sms)
        setattr_saved(topk, "_sm_count", lambda dev: sms)
        setattr_saved(gemm, "_fp8_tensor_cores", lambda dev: cc >= 89)
        # gemm._launch_linear: `torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda`
        setattr_saved(torch.Tensor, "is_cuda", property(lambda self: True))
        setattr_saved(torch.cuda, "get_device_properties",
                      lambda dev=None: types.SimpleNamespace(multi_processor_count=sms, name=f"sm_{cc}"))
        try:
            yield
        finally:
            for obj, name, old in reversed(saved):
                if old is _ABSENT:
                    delattr(obj, name)
                else:
                    setattr(obj, name, old)

    class Arg:  # what triton's specialiser reads of a tensor: dtype and data_ptr (meta: byte offset)
        def __init__(self, t):
            self.dtype = t.dtype
            self._ptr = t.data_ptr()

        def data_ptr(self):
            return self._ptr

    def specialise(fn, backend, a, kw):
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        a = [Arg(x) if isinstance(x, torch.Tensor) else x for x in a]
        kw = {k: Arg(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        kw["debug"] = kw.get("debug", fn.debug) or knobs.runtime.debug  # as JITFunction.run
        kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # triton 3.9 has it, 3.6 does not
            kw["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        bound, spec, opts = binder(*a, **kw)
        options, sig, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
        copts = {k: v for k, v in kw.items() if k in CUDAOptions.__dataclass_fields__}
        return sig, constexprs, attrs, copts, options

    # ---- enumerate ----------------------------------------------------------------------------------
    plan, skips, errors = [], [], []
    index: dict[str, int] = {}
    skipped: dict[tuple[int, int], list[str]] = {}  # (cc, fp8_linear_w8a8 config) -> scenarios
    fp8_src, fp8_line = inspect.getsourcelines(gemm._fp8_kernel.fn)
    fp8_at = f"gemm.py:{fp8_line + next(i for i, l in enumerate(fp8_src) if 'tl.float8e4nv' in l)}"
    for cc in args.cc:
        target = GPUTarget("cuda", cc, 32)
        backend = make_backend(target)
        sms = args.sms or SMS[cc]
        for mname, name, cases, acts in OPS:
            if args.ops and name not in args.ops:
                continue
            space = tunables[name].space
            for ci, cfg in enumerate(space[:1] if args.quick else space):
                for act in (("bf16",) if args.quick else acts):
                    scen = cases(ACTS[act])
                    for label, run in (scen[:1] if args.quick else scen):
                        origin = f"{name}#{ci} {label} act={act}"
                        if name == "fp8_linear_w8a8" and cc < 89:
                            skipped.setdefault((cc, ci), []).append(f"{label} act={act}")
                        sink: list = []
                        try:
                            with device_stand_in(cc, sms, sink):
                                run(cfg)
                        except Exception as e:  # a launcher rejecting a config of its own space is a bug
                            errors.append({"t": "error", "msg": f"sm_{cc} {origin}: launcher raised "
                                                               f"{type(e).__name__}: {e}"})
                            continue
                        if not sink:
                            errors.append({"t": "error", "msg": f"sm_{cc} {origin}: no kernel launched"})
                        for fn, grid, a, kw in sink:
                            try:
                                sig, constexprs, attrs, copts, options = specialise(fn, backend, a, kw)
                            except Exception as e:
                                errors.append({"t": "error", "msg": f"sm_{cc} {origin} {fn.__name__}: specialisation "
                                                                   f"failed: {type(e).__name__}: {e}"})
                                continue
                            key = json.dumps([cc, fn.__name__, sig, sorted(map(repr, constexprs.items())),
                                              sorted(map(repr, attrs.items())), sorted(copts.items())], default=str)
                            if key in index:
                                plan[index[key]]["origins"].append(origin)
                                continue
                            index[key] = len(plan)
                            names = fn.arg_names
                            declared = {p.name for p in fn.params if p.is_constexpr}
                            cx = {names[p[0]]: v for p, v in constexprs.items()}
                            plan.append({"cc": cc, "fn": fn, "kernel": fn.__name__, "sig": sig, "constexprs": constexprs,
                                         "attrs": attrs, "options": copts, "origins": [origin],
                                         "grid": [int(g) for g in grid],
                                         "declared": {k: v for k, v in cx.items() if k in declared},
                                         "specialised": {k: v for k, v in cx.items() if k not in declared},
                                         "num_warps": options.num_warps, "num_stages": options.num_stages})

    for (cc, ci), labels in skipped.items():
        skips.append({"t": "skip", "cc": cc, "kernel": "_fp8_kernel",
                      "what": f"ACT_Q=True for fp8_linear_w8a8#{ci} ({len(labels)} scenarios)",
                      "reason": f"the W8A8 tl.dot on float8e4nv operands ({fp8_at}) needs FP8 tensor cores, sm_89+ "
                                f"(triton on sm_{cc}: 'type fp8e4nv not supported in this architecture'). "
                                f"gemm._fp8_tensor_cores() is False there, so fp8_linear(act_quant=True) runs "
                                f"ref.fp8_act_sim + the W8A16 kernel (ACT_Q=False) with this config: compiled"})

    if args.shard_index == 0:
        emit({"t": "plan", "variants": len(plan), "kernels": {n: m for n, (m, _) in kernels.items()},
              "targets": args.cc, "sms": {cc: args.sms or SMS[cc] for cc in args.cc},
              "compiled_kernels": {str(cc): sorted({p["kernel"] for p in plan if p["cc"] == cc}) for cc in args.cc}})
        for r in skips + errors:
            emit(r)

    # ---- compile this shard -------------------------------------------------------------------------
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output of each compile, printed by triton: captured
    spill_re = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
    for vi, p in enumerate(plan):
        if vi % args.shards != args.shard_index:
            continue
        rec = {"t": "variant", "i": vi, **{k: p[k] for k in ("cc", "kernel", "sig", "origins", "grid", "declared",
                                                                "specialised", "num_warps", "num_stages")}}
        rec["attrs"] = {p["fn"].arg_names[k[0]]: v for k, v in p["attrs"].items() if v}
        t0 = time.time()
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                k = triton.compile(ASTSource(p["fn"], p["sig"], p["constexprs"], p["attrs"]),
                                   target=GPUTarget("cuda", p["cc"], 32), options=dict(p["options"]))
        except Exception as e:
            rec.update(ok=False, secs=round(time.time() - t0, 2),
                       error=f"{type(e).__name__}: {e}".strip()[:6000])
            emit(rec)
            continue
        rec.update(ok=True, secs=round(time.time() - t0, 2))
        m = spill_re.search(log.getvalue())
        if m:
            rec.update(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as fh:
            fh.write(k.asm["cubin"])
        try:
            r = subprocess.run([str(cuobjdump), "--dump-resource-usage", fh.name], capture_output=True, text=True,
                               check=False)
        finally:
            os.unlink(fh.name)
        usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", r.stdout)
        if usage:
            rec.update(regs=int(usage.group(1)), stack=int(usage.group(2)), smem=int(usage.group(3)),
                       local=int(usage.group(4)))
        else:
            rec["usage_error"] = (r.stdout + r.stderr).strip()[-500:]
        ptx = k.asm["ptx"]
        rec.update(wgmma=ptx.count("wgmma.mma_async"), mma=ptx.count("mma.sync"))
        emit(rec)
    return 0


# =====================================================================================================
# driver: spawn workers without TRITON_INTERPRET, print one line per variant and a summary
# =====================================================================================================
def _fmt_cx(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items())


def _line(r: dict) -> str:
    head = f"sm_{r['cc']} {r['kernel']:<20}"
    cx = _fmt_cx(r["declared"]) + (f" | spec {_fmt_cx(r['specialised'])}" if r["specialised"] else "")
    launch = f"w{r['num_warps']} s{r['num_stages']}"
    more = f" +{len(r['origins']) - 1}" if len(r["origins"]) > 1 else ""
    sig = ",".join(v for v in r["sig"].values() if v != "constexpr")
    if not r["ok"]:
        return f"{head} FAIL  {launch} {cx}  [{r['origins'][0]}{more}]\n    {r['error']}"
    core = "wgmma" if r.get("wgmma") else ("mma" if r.get("mma") else "no-mma")
    spill = f"{r.get('spill_stores', '?')}/{r.get('spill_loads', '?')}"
    flag = "  <-- SPILLS" if r.get("spill_stores") or r.get("spill_loads") else ""
    return (f"{head} ok    regs={r.get('regs', '?'):<3} spill(st/ld)={spill:<7} stack={r.get('stack', '?'):<4} "
            f"smem={r.get('smem', '?'):<6} {core:<6}({r.get('wgmma', 0)}/{r.get('mma', 0)}) {launch} {r['secs']:>5.1f}s  "
            f"{cx}  [{r['origins'][0]}{more}]  args({sig}){flag}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cc", type=int, action="append", choices=sorted(SMS), help="target compute capability "
                    "(repeatable; default: 90 and 80)")
    ap.add_argument("--quick", action="store_true", help="only the default config (first of each space), bf16 "
                    "activations, the first (decode) scenario of each op")
    ap.add_argument("--ops", action="append", help="only the launches of this op (repeatable; a name of "
                    "the modules' TUNABLES, e.g. sparse_attn_paged); default: every op")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compile workers")
    ap.add_argument("--sms", type=int, default=0, help="SM count the launchers see (default 132 for sm_90, 108 for sm_80)")
    ap.add_argument("--json", type=Path, help="write every record (variants, skips, errors) to this file")
    ap.add_argument("--cache-dir", type=Path, help="TRITON_CACHE_DIR to use (default: a fresh temporary one)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shard-index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--shards", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.cc = args.cc or [90, 80]
    if args.worker:
        return _worker(args)

    t0 = time.time()
    tmp = tempfile.TemporaryDirectory(prefix="dayzero-aot-")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(args.cache_dir or Path(tmp.name) / "cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default (silences its warning)
    jobs = max(1, args.jobs)
    base = [sys.executable, str(Path(__file__).resolve()), "--worker", "--shards", str(jobs)]
    base += [a for cc in args.cc for a in ("--cc", str(cc))] + (["--quick"] if args.quick else [])
    base += ["--sms", str(args.sms)] if args.sms else []
    base += [a for op in args.ops or () for a in ("--ops", op)]
    print(f"aot_compile: targets {', '.join(f'sm_{c}' for c in args.cc)}{' (quick)' if args.quick else ''}, "
          f"{jobs} worker(s), TRITON_CACHE_DIR={env['TRITON_CACHE_DIR']}", flush=True)

    records: list[dict] = []
    lock = threading.Lock()

    def pump(proc, w):
        for raw in proc.stdout:
            if not raw.startswith(TAG):
                with lock:
                    sys.stdout.write(f"[worker {w}] {raw}")
                continue
            r = json.loads(raw[len(TAG):])
            with lock:
                records.append(r)
                if r["t"] == "plan":
                    print(f"plan: {r['variants']} distinct variants; kernels: {', '.join(sorted(r['kernels']))}", flush=True)
                elif r["t"] == "skip":
                    print(f"sm_{r['cc']} {r['kernel']:<20} SKIP  {r['what']}: {r['reason']}", flush=True)
                elif r["t"] == "error":
                    print(f"ERROR {r['msg']}", flush=True)
                else:
                    print(_line(r), flush=True)

    procs = [subprocess.Popen(base + ["--shard-index", str(w)], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for w in range(jobs)]
    threads = [threading.Thread(target=pump, args=(p, w)) for w, p in enumerate(procs)]
    for t in threads:
        t.start()
    rcs = [p.wait() for p in procs]
    for t in threads:
        t.join()

    plan = next((r for r in records if r["t"] == "plan"), None)
    variants = sorted((r for r in records if r["t"] == "variant"), key=lambda r: r["i"])
    skips = [r for r in records if r["t"] == "skip"]
    errors = [r["msg"] for r in records if r["t"] == "error"]
    errors += [f"worker {w} exited with {rc}" for w, rc in enumerate(rcs) if rc]
    if plan is None:
        errors.append("no plan from worker 0")
    elif len(variants) != plan["variants"]:
        errors.append(f"{plan['variants'] - len(variants)} planned variants produced no result")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1, default=str))

    # ---- summary ------------------------------------------------------------------------------------
    print("\nsummary (per target and kernel: variants ok/total, max registers, spill bytes, tensor-core instr.)")
    failed = [r for r in variants if not r["ok"]]
    for cc in args.cc:
        names = sorted(plan["kernels"]) if plan else []
        for name in names:
            vs = [r for r in variants if r["cc"] == cc and r["kernel"] == name]
            ok = [r for r in vs if r["ok"]]
            if not vs and args.ops:  # a kernel of no op asked for
                continue
            if not vs:
                errors.append(f"sm_{cc}: kernel {plan['kernels'][name]}.{name} was never compiled")
                print(f"  sm_{cc} {name:<20} NOT COMPILED")
                continue
            regs = max((r.get("regs", 0) for r in ok), default=0)
            spills = [r for r in ok if r.get("spill_stores") or r.get("spill_loads")]
            cores = sorted({"wgmma" if r.get("wgmma") else "mma" if r.get("mma") else "none" for r in ok})
            status = "PASS" if len(ok) == len(vs) else "FAIL"
            print(f"  sm_{cc} {name:<20} {status} {len(ok)}/{len(vs)}  max regs {regs:<3}  "
                  f"spilling variants {len(spills)}  tensor cores: {'/'.join(cores) or '-'}")
            for r in spills:
                print(f"      spills: {r.get('spill_stores')}/{r.get('spill_loads')} B st/ld, regs {r.get('regs')}, "
                      f"w{r['num_warps']} s{r['num_stages']} {_fmt_cx(r['declared'])} [{r['origins'][0]}]")
    if skips:
        print(f"  skipped by design: {len(skips)} (see SKIP lines)")
    for r in failed:
        print(f"FAILED sm_{r['cc']} {r['kernel']} {_fmt_cx(r['declared'])} [{r['origins'][0]}]:\n    {r['error']}")
    for e in errors:
        print(f"ERROR {e}")
    n_ok = len(variants) - len(failed)
    print(f"\n{n_ok}/{len(variants)} variants compiled, {len(failed)} failed, {len(errors)} errors, "
          f"{len(skips)} skipped, {time.time() - t0:.0f}s")
    tmp.cleanup()
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
