"""A DeepSeek-V4.1-Flash-shaped decode step (batch 1) with its roofline fraction, beside the same number of
V4-Flash-shaped layers through dayzero's V4 path measured in the same run.

The V4.1 slice has V4.1-Flash's real per-layer shapes (dim 5120, 64 x 512 heads, window 128, q_lora 1280,
8 x 1024 output groups, 32 x 128 indexer top-512, candidate blocks 2048 x 8, hc 4, Engram 8 heads x 256,
n-grams up to 4; FP8 32x32 dense weights, MXFP4 experts 2304 wide, top-6) in five layers sliced from the
real schedule: sliding; sliding + Engram (Flash's layer 1); a pooled ratio-2 KV source (layer 2); the
ratio-1 KV source that publishes the candidate blocks (layer 20); a ratio-1 reuse layer (decoder, 21).
What is smaller than the release, so that it fits a shared 24 GB CPU host (and says nothing about the
bytes a token touches): 16 routed experts per layer instead of 384 (a token reads its 6 either way), an
Engram table of the prime layout above `engram_vocab_size` 4000 (a token gathers its 24 rows either way),
and a 320-token vocabulary (the real head, 129280 x 5120, is left out: the slice measures layers).
The caches hold random rows for a `context`-token history (what a prefill would leave; timing a step
needs no prefill). Weights are random in the official formats.

Bytes a decoded token must move (the floor; counted from the model's tensors, not from timings):
weights: every tensor except the routed experts (6 of them counted), the embedding (one row) and the
Engram tables (the 24 gathered FP8 rows + E8M0 scales per Engram layer); FP8 weights count their FP8
bytes + scales (the native CPU table's FP8 32x32 kernel reads just these; on the twins `Fp8Linear32`
dequantises them per call, so it moves more than this floor);
cache: every layer's window rows, each compressed layer's top-k entries, each index source's indexer
keys over the whole history, the Engram n-gram history ids. Roofline fraction = bytes / time / the copy
bandwidth measured in the same run (dayzero.scenarios.peaks, as `dayzero bench`).

Op table: both models run with the table the engine picks on this device (`dayzero.ops.for_device`: the
native CPU kernels where they build), applied as the engine applies it: V4.1 through `ServedV41.set_ops`
(its FP8 32x32 linears run the table's `fp8_linear` with block=32: the native kernel on the `cpu` table,
dequantised per call on the twins), V4 through
`dayzero.bench._prepared` (what `LLM`'s worker does). `--ops ref|cpu|triton` picks another; `--twins`
adds a V4.1 row on the PyTorch twins (the reference table) at the first context, for comparison.

    PYTHONPATH=. python bench/v41_step.py [--size flash|tiny] [--contexts 512,4096] [--no-baseline]
                                          [--ops ref|cpu|triton] [--twins]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

from dayzero.reference.seqcache import Batch, DenseBatchCache
from dayzero.v41 import V41Args
from dayzero.v41.presets import v41_flash_config

SLICE = dict(num_hidden_layers=5, compress_ratios=[0, 0, 2, 1, 1], kv_source_layer_ids=[2, 3],
             index_source_layer_ids=[2, 3], candidate_source_layer_id=3, engram_layer_ids=[1],
             n_routed_experts=16, engram_vocab_size=4000, num_nextn_predict_layers=0, dspark_target_layer_ids=[])
ROLES = ("sliding", "sliding+engram", "pooled KV source (r2)", "candidate KV source (r1)", "reuse decoder (r1)")
V4_LAYERS = ("sliding", "sliding", "csa", "csa", "hca")  # the V4-Flash counterpart: same count, V4's types
TINY = dict(hidden_size=256, num_attention_heads=4, head_dim=128, qk_rope_head_dim=64, q_lora_rank=64, o_groups=2,
            o_lora_rank=64, moe_intermediate_size=64, index_n_heads=4, index_head_dim=64, index_topk=8,
            sliding_window=16, n_routed_experts=8, engram_head_dim=64, engram_vocab_size=400,
            candidate_topk_blocks=4, candidate_block_size=4)
TINY_V4 = dict(dim=256, n_heads=4, head_dim=128, q_lora_rank=64, o_lora_rank=64, o_groups=2, moe_inter_dim=64,
               index_n_heads=4, index_head_dim=64, index_topk=8, window_size=16)


def slice_args(tokenizer_json: Path, size: str = "flash") -> V41Args:
    from dayzero.v41.toy import tiny_config
    cfg = v41_flash_config()
    text = copy.deepcopy(cfg["text_config"])
    text.update(SLICE)
    if size == "tiny":
        text.update(TINY)
    toy = tiny_config(tokenizer_json, "fp8", text)  # vocab, compressed vocab and table sizes from the tokenizer
    toy["text_config"]["rope_scaling"] = text["rope_scaling"]
    return V41Args.from_dict(toy, source=f"bench v41_step ({size})")


def random_v41(args: V41Args, tokenizer_json: Path, dtype=torch.bfloat16, seed: int = 0):
    """V41Transformer with random weights in the official formats (built on the meta device, then filled)."""
    from tokenizers import Tokenizer

    from dayzero.synthetic import _FP4_RMS, _e8m0
    from dayzero.v41.model import V41Transformer
    with torch.device("meta"):
        model = V41Transformer(args, dtype=dtype)
    mods = {n: m for n, m in model.named_modules()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        m, shape = mods.get(prefix), tuple(t.shape)

        def randn(std=1.0, dt=torch.float32):
            return (torch.randn(shape, generator=g) * std).to(dt)
        fan_in = getattr(m, "in_features", None) or (shape[1] if len(shape) > 1 else 1)
        if t.dtype == torch.float8_e4m3fn:
            state[name] = randn(64.0, t.dtype)
        elif t.dtype == torch.float8_e8m0fnu:
            std = 1 / (_FP4_RMS * math.sqrt(fan_in)) if getattr(m, "fmt", "") == "fp4" else 1 / (64 * math.sqrt(fan_in))
            state[name] = _e8m0(std, torch.empty(shape, dtype=torch.uint8))
        elif t.dtype == torch.int8:
            state[name] = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
        elif "hc_" in leaf and leaf.endswith("_fn"):
            state[name] = randn(shape[1] ** -0.5)
        elif "hc_" in leaf and leaf.endswith("_scale"):
            state[name] = 0.5 + torch.rand(shape, generator=g)
        elif leaf in ("attn_sink",) or ("hc_" in leaf and leaf.endswith("_base")):
            state[name] = randn(0.5)
        elif leaf in ("bias", "bias_vl"):
            state[name] = randn(0.1)
        elif name.endswith("norm.weight"):
            state[name] = 1 + randn(0.1, t.dtype)
        elif leaf == "weight" and len(shape) == 2:
            state[name] = randn(1.0 if name == "embed.weight" else shape[1] ** -0.5, t.dtype)
        else:
            state[name] = randn(0.1, t.dtype)
    model.load_state_dict(state, assign=True)
    return model.eval().bind_tokenizer(Tokenizer.from_file(str(tokenizer_json)))


def filled_state(model, context: int, seed: int = 0):
    """A state whose cache holds random rows for a `context`-token history (the dtypes and row shapes
    those a short real prefill writes), room for the decoded token, state.pos = context."""
    from dayzero.v41.engram import HISTORY
    state = model.new_state()
    with torch.no_grad():
        model(torch.randint(0, model.args.vocab_size, (1, 8)), state)
    g = torch.Generator().manual_seed(seed)
    store = state.caches[0].store
    for (layer, kind), buf in list(store.items()):
        n = context // model.args.layers[layer].compress_ratio if kind in ("c:ent", "c:key") else context
        new = torch.zeros((n + 16, *buf.shape[1:]), dtype=buf.dtype)
        if (layer, kind) == HISTORY:
            new[:n] = torch.randint(0, model.args.engram_compressed_vocab_size, (n,), generator=g)
        else:
            new[:n] = torch.randn((n, *buf.shape[1:]), generator=g).to(buf.dtype)
        store[(layer, kind)] = new
    state.pos = context
    return state


def step_bytes(model, context: int) -> dict:
    """The bytes one batch-1 decode step must move, by part (see the module docstring)."""
    a = model.args
    parts = dict(dense=0, experts=0, engram_rows=0, embed_row=0, kv=0)
    for name, t in model.named_parameters():
        nb = t.numel() * t.element_size()
        if name == "embed.weight":
            parts["embed_row"] += nb // t.shape[0]
        elif ".experts." in name:
            parts["experts"] += nb * a.n_activated_experts // a.n_routed_experts
        elif ".engram.embed." in name:
            parts["engram_rows"] += a.engram_hash_columns * nb // t.shape[0]
        else:
            parts["dense"] += nb
    for layer in a.layers:
        win = min(context + 1, a.window_size)
        parts["kv"] += win * a.head_dim * _elsize(model)
        if layer.compress_ratio:
            count = (context + 1) // layer.compress_ratio
            parts["kv"] += min(a.index_topk, count) * a.head_dim * _elsize(model)
            if layer.is_index_source:
                parts["kv"] += count * a.index_head_dim * _elsize(model)
    if a.engram_layer_ids:
        parts["kv"] += a.engram_max_ngram_size * 8
    parts["total"] = sum(parts.values())
    return parts


def _elsize(model) -> int:
    """Bytes of a cache value: the reference stores window rows, entries and keys in the compute dtype."""
    return torch.tensor([], dtype=model.compute_dtype).element_size()


def with_table(model, table):
    """The V4.1 model with `table` installed as the engine installs it (ServedV41.set_ops)."""
    from dayzero.v41.served import ServedV41
    ServedV41(model).set_ops(table)
    return model


def time_step(model, state, context: int, reps: int = 3) -> float:
    ids = torch.randint(0, model.args.vocab_size, (1,))
    cache = DenseBatchCache(state.caches[:1])

    def step():
        with torch.no_grad():
            from dayzero.ops import ref
            h = model.forward_packed(ids, Batch([context], [1], cache, ids.device))
            return ref.fp32_linear(model.norm(h), model.head.weight)
    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def v4_baseline(context: int, size: str, vocab: int, experts: int, table) -> tuple[float, int]:
    from dayzero.bench import _prepared
    from dayzero.scenarios import decode_step
    from dayzero.synthetic import flash_slice, random_model
    args = flash_slice(layer_types=V4_LAYERS, n_routed_experts=experts, vocab_size=vocab)
    if size == "tiny":
        args = args.replace(**TINY_V4)
    model = _prepared(random_model(args, device="cpu"), table)  # as the engine's worker prepares it
    try:
        return decode_step(model, 1, context, torch.device("cpu"))
    finally:
        del model


def run(size: str = "flash", contexts=(512, 4096), baseline: bool = True, out: str | None = None,
        log=print, ops: str | None = None, twins: bool = False) -> list[dict]:
    from dayzero.ops import REF, for_device
    from dayzero.scenarios import commit, peaks, versions
    from dayzero.testing import tiny_tokenizer
    dev = torch.device("cpu")
    table = for_device(dev, ops)  # what the engine picks here (ops None), or the one asked for
    pk = peaks(dev)
    log(f"cpu copy bandwidth {pk['bandwidth'] / 1e9:.1f} GB/s (measured now), threads {torch.get_num_threads()}, "
        f"ops table {table.name} (kernels: {', '.join(table.kernels) or 'none'})")
    recs = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer.json"
        tiny_tokenizer(tok, vocab_size=320)
        args = slice_args(tok, size)
        model = random_v41(args, tok)
        # the twins' row first: the engine's table may group the experts for its kernels (set_ops)
        runs = ([(contexts[0], REF)] if twins and table is not REF else []) + [(ctx, table) for ctx in contexts]
        for ctx, tab in runs:
            state = filled_state(with_table(model, tab), ctx)
            t = time_step(model, state, ctx)
            parts = step_bytes(model, ctx)
            del state
            recs.append(dict(scenario="v41 decode step", size=size, batch=1, context=ctx, time_us=t * 1e6,
                             ops=tab.name, kernels=list(tab.kernels),
                             bytes=parts["total"], bytes_by_part=parts, achieved_gbps=parts["total"] / t / 1e9,
                             roofline_fraction=parts["total"] / t / pk["bandwidth"], layers=list(ROLES),
                             shape=dict(dim=args.dim, heads=args.n_heads, head_dim=args.head_dim,
                                        experts=args.n_routed_experts, topk=args.n_activated_experts,
                                        moe_inter=args.moe_inter_dim, window=args.window_size,
                                        index_topk=args.index_topk, vocab=args.vocab_size)))
        vocab, experts = args.vocab_size, args.n_routed_experts
        del model
    for r in recs:
        if baseline and r["ops"] == table.name:
            tb, nb = v4_baseline(r["context"], size, vocab, experts, table)
            r.update(baseline_name=f"V4-Flash-shaped {'/'.join(V4_LAYERS)} slice, dayzero V4 path (paged cache)",
                     baseline_ops=table.name, baseline_time_us=tb * 1e6, baseline_bytes=nb,
                     baseline_roofline_fraction=nb / tb / pk["bandwidth"])
        r.update(peaks=pk, device="cpu: " + (platform.processor() or platform.machine()),
                 threads=torch.get_num_threads(), commit=commit(), versions=versions(),
                 date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        base = "" if "baseline_time_us" not in r else (
            f" | V4 slice {r['baseline_time_us'] / 1e3:8.1f} ms {r['baseline_bytes'] / 1e6:7.1f} MB "
            f"{100 * r['baseline_roofline_fraction']:5.1f}%")
        log(f"V4.1 slice ({r['ops']}) ctx {r['context']:5d}: {r['time_us'] / 1e3:8.1f} ms {r['bytes'] / 1e6:7.1f} MB "
            f"{r['achieved_gbps']:6.2f} GB/s {100 * r['roofline_fraction']:5.1f}% of copy bandwidth{base}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(recs, indent=1) + "\n")
        log(f"wrote {out}")
    return recs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("flash", "tiny"), default="flash")
    p.add_argument("--contexts", default="512,4096")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--ops", choices=("ref", "cpu", "triton"), default=None,
                   help="op table for both models (default: the engine's pick on this device)")
    p.add_argument("--twins", action="store_true", help="also a V4.1 row on the PyTorch twins (first context)")
    p.add_argument("--out", default=None, help="JSON record path (default bench/results/v41_step-<size>.json)")
    a = p.parse_args(argv)
    return run(a.size, tuple(int(c) for c in a.contexts.split(",")), not a.no_baseline,
               a.out or f"bench/results/v41_step-{a.size}.json", ops=a.ops, twins=a.twins)


if __name__ == "__main__":
    main()
