"""`dayzero bench`: the scenarios of research/perf-anchors.md section 7 on V4-Flash shapes with
random official-format weights, each against its roofline and a baseline measured in the same run.

  S1  MoE decode: routed FP4 experts for B tokens (256 experts x 2048, top-6)
  S2  sparse attention core: 64 heads x 512 over a 128-row window + 512 top-k entries (and again
      over the same keys in the FP8 cache format, beside the kernel over the bf16 pools)
  S3  indexer scores + top-k over a 128K / 1M-token context (32K / 256K entries, 64 x 128)
  S4  decode step of a 4-layer Flash slice (csa, hca, csa, hca) at B=1/64, 8K/128K context
  S5  8K-token prefill chunk of the same slice
  S6  the slice's decode step at 1M context vs at 8K (long-context cost), caches filled at random
  S7  a 1M-token prompt through the engine on the slice: chunked prefill (8K steps), then its
      decode step vs an 8K prompt's (the issue's "1M prefills, decode <= 1.5x the 8K step")

Roofline: memory-bound scenarios (S1-S4, S6) use bytes that must move / the device's copy
bandwidth measured in the same run; S5 uses FLOPs / the device's bf16 matmul rate measured in
the same run. Decode caches are filled with random rows (no prefill needed to time a step at 1M).
Baselines: the PyTorch twins (S1-S3), transformers' DeepseekV4ForCausalLM on Flash-shaped layers
where it fits in memory (S4: 2 layers, B=1, 2K context, as in the issue's measurement). On CUDA
with a capturable op table S4 times the step replayed from a CUDA graph, as the engine runs
decode steps, with the same step run eagerly as its baseline.
Sizes: "flash" (real per-layer shapes, for GPUs) or "small" (same structure, CPU-sized).
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from dayzero.engine.graphs import unsupported
from dayzero.ops import OpTable, for_device
from dayzero.scenarios import (FilledCache, commit, decode_bytes, decode_step, engine_long_context, peaks,
                               prefill_flops, s1_moe, s2_attention, s3_indexer, timeit, transformers_decode,
                               versions)

SCENARIOS = ("S1", "S2", "S3", "S4", "S5", "S6", "S7")
SIZES = {
    "flash": dict(experts=256, moe=(4096, 2048), contexts=(8192, 131072), batches=(1, 64), index_contexts=(131072, 1048576),
                  long=1048576, prefill=8192, layers=("csa", "hca", "csa", "hca"), engine_long=1048576 - 8),
    # "tiny": the harness itself (tests); the slice shrinks too
    "tiny": dict(experts=8, moe=(512, 256), contexts=(512,), batches=(1, 2), index_contexts=(2048,), long=4096,
                 prefill=64, layers=("csa", "hca"), engine_long=1024,
                 slice=dict(dim=256, n_heads=4, head_dim=128, q_lora_rank=64, o_lora_rank=64, o_groups=2,
                            moe_inter_dim=64, index_n_heads=4, index_head_dim=64, index_topk=8, window_size=16)),
    "small": dict(experts=16, moe=(4096, 2048), contexts=(1024, 8192), batches=(1, 8), index_contexts=(8192, 65536),
                  long=65536, prefill=512, layers=("csa", "hca"), engine_long=4096),
}


# ---- driver ------------------------------------------------------------------------------------
def _prepared(model, table: OpTable):
    """The model as the engine runs it with `table`: kernel tables read FP8/FP4 weights directly;
    without FP8 kernels (the twins) small models keep dequantised copies, as `LLM` does."""
    from dayzero.loader.model_io import keep_dequantized
    model.set_ops(table)
    keep_dequantized(model, dense_only="fp8_linear" in table.kernels, fp32_kernel="fp32_linear" in table.kernels)
    return model


def run(size: str | None = None, device=None, choice: str | None = None, scenarios=SCENARIOS,
        out_dir: str | Path | None = "bench/results", baseline: bool = True, log=print) -> list[dict]:
    from dayzero.synthetic import flash_slice, random_model
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = size or ("flash" if device.type == "cuda" else "small")
    cfg = SIZES[size]
    table = for_device(device, choice)
    pk = peaks(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    log(f"{name}: copy {pk['bandwidth'] / 1e9:.0f} GB/s, bf16 matmul {pk['bf16_flops'] / 1e12:.1f} TFLOP/s, "
        f"ops table {table.name} (kernels: {', '.join(table.kernels) or 'none'})")
    recs = []
    out = Path(out_dir) if out_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    def add(r: dict, bound: str = "memory") -> None:
        t = r.pop("time_s")
        tb = r.pop("baseline_time_s", None)
        if bound == "memory":
            achieved, roof = r["bytes"] / t, pk["bandwidth"]
            r["achieved"] = f"{achieved / 1e9:.1f} GB/s"
        else:
            achieved, roof = r["flops"] / t, pk["bf16_flops"]
            r["achieved"] = f"{achieved / 1e12:.2f} TFLOP/s"
        r.update(device=name, time_us=t * 1e6, roofline_fraction=achieved / roof,
                 baseline_time_us=None if tb is None else tb * 1e6, ops=table.name, size=size,
                 peaks=pk, commit=commit(), versions=versions())
        r.setdefault("baseline_name", None)
        recs.append(r)
        if out:  # appended as measured: a run cut short (a device time limit) keeps what it measured
            with open(out / "bench.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")
        base = "" if tb is None else f"   baseline {tb * 1e6:10.1f} us ({t and tb / t:.2f}x): {r['baseline_name']}"
        log(f"{r['scenario']:22s} B={r['batch']!s:3s} ctx={r['context']!s:8s} {t * 1e6:10.1f} us "
            f"{r['achieved']:>16s} {100 * r['roofline_fraction']:5.1f}% of roofline{base}")

    if "S1" in scenarios:
        for b in cfg["batches"]:
            add(s1_moe(table, device, b, cfg["experts"], *cfg["moe"]))
    if "S2" in scenarios:
        for b in cfg["batches"]:
            add(s2_attention(table, device, b))
            add(s2_attention(table, device, b, kv_cache_dtype="fp8"))
    if "S3" in scenarios:
        for c in cfg["index_contexts"]:
            add(s3_indexer(table, device, c))
    if any(s in scenarios for s in ("S4", "S5", "S6", "S7")):
        args = flash_slice(layer_types=cfg["layers"], n_routed_experts=cfg["experts"]).replace(**cfg.get("slice", {}))
        model = _prepared(random_model(args, device=device), table)
        shape = f"{len(args.layer_types)}-layer Flash slice {'/'.join(args.layer_types)}, {cfg['experts']} experts"
        graphs = device.type == "cuda" and unsupported(model) is None  # as the engine replays decode steps
        if "S4" in scenarios:
            for c in cfg["contexts"]:
                for b in cfg["batches"]:
                    t, nbytes = decode_step(model, b, c, device)
                    rec = dict(scenario="S4 decode step", batch=b, context=c, bytes=nbytes, time_s=t, shape=shape,
                               graphs=False)
                    if graphs:  # the replayed step, with the eager one beside it
                        rec.update(time_s=decode_step(model, b, c, device, graphs="cuda")[0], graphs=True,
                                   baseline_name="same step, eager (no CUDA graph)", baseline_time_s=t)
                    add(rec)
        if "S5" in scenarios:
            from dayzero.reference.seqcache import Batch
            n = cfg["prefill"]
            filled = FilledCache(model, 1, 0, device, extra_tokens=n)
            ids = torch.randint(0, args.vocab_size, (n,), device=device)

            def prefill():
                with torch.no_grad():
                    model.forward_packed(ids, Batch([0], [n], filled.cache, device))
            add(dict(scenario="S5 prefill chunk", batch=1, context=n, flops=prefill_flops(model, n),
                     time_s=timeit(prefill, device, warmup=1, reps=3), shape=shape), bound="compute")
        if "S6" in scenarios:
            short, long_ = cfg["contexts"][0], cfg["long"]
            ts, _ = decode_step(model, 1, short, device)
            tl, nbytes = decode_step(model, 1, long_, device)
            add(dict(scenario="S6 long-context decode", batch=1, context=long_, bytes=nbytes, time_s=tl,
                     baseline_name=f"same slice at {short} context", baseline_time_s=ts, shape=shape))
        if "S7" in scenarios:
            n, short, chunk = cfg["engine_long"], cfg["contexts"][0], cfg["prefill"]
            pre, t_long, t_short = engine_long_context(model, device, n, chunk, short)
            add(dict(scenario="S7 engine prefill", batch=1, context=n, flops=prefill_flops(model, n), time_s=pre,
                     shape=f"{shape}, {chunk}-token chunks"), bound="compute")
            add(dict(scenario="S7 decode after it", batch=1, context=n,
                     bytes=decode_bytes(model, 1, n), time_s=t_long,
                     baseline_name=f"same engine, {short}-token prompt", baseline_time_s=t_short, shape=shape))
        del model
        if baseline and "S4" in scenarios:
            ctx = 2048 if size == "flash" else 256
            args2 = flash_slice(layer_types=cfg["layers"][:2], n_routed_experts=cfg["experts"]).replace(
                **cfg.get("slice", {}))
            hf_t = transformers_decode(args2, device, ctx)
            ours = _prepared(random_model(args2, device=device), table)
            t, nbytes = decode_step(ours, 1, ctx, device, graphs="cuda" if graphs else None)
            add(dict(scenario="S4 vs transformers", batch=1, context=ctx, bytes=nbytes, time_s=t, graphs=graphs,
                     baseline_name="transformers DeepseekV4ForCausalLM, bf16, same 2 layers"
                     + ("" if hf_t is not None else " (did not fit / not installed)"),
                     baseline_time_s=hf_t, shape=f"2-layer Flash slice {'/'.join(args2.layer_types)}"))
    if out:
        part = "" if set(scenarios) >= set(SCENARIOS) else "-" + "-".join(sorted(set(scenarios)))  # a subset: its own chart
        png = out / f"roofline-{size}-{device.type}{part}.png"
        log(f"chart {png}" if chart(recs, png) else f"no chart ({png.name}): matplotlib is not installed")
    return recs


def chart(recs: list[dict], path: Path) -> bool:
    """Bar chart of each record's roofline fraction; False (nothing written) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{r['scenario'].split()[0]} B{r['batch']} {r['context'] or ''}".strip() for r in recs]
    fig, ax = plt.subplots(figsize=(max(6, len(recs) * 0.6), 4))
    ax.bar(range(len(recs)), [100 * r["roofline_fraction"] for r in recs])
    ax.axhline(100, color="k", lw=0.8)
    ax.set_xticks(range(len(recs)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("% of roofline (measured peak)")
    ax.set_title(f"dayzero bench: {recs[0]['device']} ({recs[0]['ops']} ops)" if recs else "dayzero bench")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
