"""Building blocks of `dayzero bench` (dayzero/bench.py): measurement (timing, peaks measured in
the same run, versions) and the scenarios S1-S7 on V4-Flash shapes with random official-format
weights. Each scenario returns a record with the bytes or FLOPs that bound it and its time."""
from __future__ import annotations

import math
import platform
import statistics
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import torch

from dayzero.ops import OpTable, ref
from dayzero.ops.kvfp8 import Fp8Layout, Fp8Rows
from dayzero.ops.kvfp8 import pack as kvfp8_pack

# ---- measurement -------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, warmup: int | None = None, reps: int | None = None) -> float:
    """Median seconds of fn() over `reps` runs after `warmup` (GPU 3 + 10, CPU 1 + 3)."""
    gpu = device.type != "cpu"
    warmup = (3 if gpu else 1) if warmup is None else warmup
    reps = (10 if gpu else 3) if reps is None else reps
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peaks(device: torch.device) -> dict:
    """Copy bandwidth (bytes/s: read + write of a 1 GiB buffer, 256 MiB on the CPU) and bf16
    matmul rate (FLOP/s, 8192^3, 2048^3 on the CPU), measured now on `device`."""
    n = (2**30 if device.type == "cuda" else 2**28) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / timeit(lambda: dst.copy_(src), device)
    m = 8192 if device.type == "cuda" else 2048
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    flops = 2 * m ** 3 / timeit(lambda: a @ a, device, warmup=1, reps=3)
    return dict(bandwidth=bw, bf16_flops=flops)


def versions() -> dict:
    v = dict(torch=torch.__version__, python=platform.python_version())
    for mod in ("triton", "transformers"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            v[mod] = None
    return v


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---- op scenarios (S1-S3) ----------------------------------------------------------------------
def _fp4_stack(E, out, inn, device, g):
    w = torch.randint(-128, 128, (E, out, inn // 2), dtype=torch.int8, device=device, generator=g)
    s = torch.full((E, out, inn // 32), 120, dtype=torch.uint8, device=device).view(torch.float8_e8m0fnu)
    return w, s


def s1_moe(table: OpTable, device, batch: int, experts: int, dim=4096, inter=2048, k=6):
    g = torch.Generator(device=device).manual_seed(0)
    w1, s1 = _fp4_stack(experts, inter, dim, device, g)
    w3, s3 = _fp4_stack(experts, inter, dim, device, g)
    w2, s2 = _fp4_stack(experts, dim, inter, device, g)
    x = torch.randn(batch, dim, device=device, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(experts, device=device, generator=g)[:k] for _ in range(batch)])
    weights = torch.rand(batch, k, device=device, generator=g)
    args = (x, weights, ids, w1, s1, w3, s3, w2, s2, 10.0)
    touched = ids.unique().numel()
    per_expert = 3 * (dim * inter // 2 + dim * inter // 32)  # FP4 bytes + E8M0 scales
    nbytes = touched * per_expert + x.numel() * 2 + batch * dim * 4
    t = timeit(lambda: table.moe_experts(*args), device)
    tb = timeit(lambda: ref.moe_experts(*args), device, warmup=1, reps=3)
    return dict(scenario="S1 moe decode", batch=batch, context=None, bytes=nbytes, time_s=t,
                baseline_name="pytorch twin (dequantise per expert + matmul)", baseline_time_s=tb,
                shape=f"{experts} experts {dim}x{inter} FP4 top-{k}, {touched} touched")


def s2_attention(table: OpTable, device, batch: int, H=64, D=512, window=128, topk=512, pool_rows=1 << 16,
                 kv_cache_dtype: str = "auto"):
    """kv_cache_dtype "fp8": the same keys in the FP8 cache format (ops/kvfp8.py, 584 B a row), with
    the table's own kernel over the bf16 pools as the baseline."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, H, D, device=device, generator=g).to(torch.bfloat16)
    pw = torch.randn(pool_rows, D, device=device, generator=g).to(torch.bfloat16)
    pe = torch.randn(pool_rows, D, device=device, generator=g).to(torch.bfloat16)
    iw = torch.randint(0, pool_rows, (batch, window), device=device, generator=g, dtype=torch.int32)
    ie = torch.randint(0, pool_rows, (batch, topk), device=device, generator=g, dtype=torch.int32)
    sink = torch.randn(H, device=device, generator=g)
    args = (q, [(pw, iw), (pe, ie)], sink, D ** -0.5)
    row = D * 2
    if kv_cache_dtype == "fp8":
        lay = Fp8Layout(D, 64, torch.bfloat16)
        row = lay.width
        packed = (q, [(Fp8Rows(kvfp8_pack(pw, lay), lay), iw), (Fp8Rows(kvfp8_pack(pe, lay), lay), ie)], sink, D ** -0.5)
        t = timeit(lambda: table.sparse_attn_paged(*packed), device)
        tb = timeit(lambda: table.sparse_attn_paged(*args), device)
        base, label = f"{table.name} kernel over bf16 pools", "S2 sparse attention (fp8 cache)"
    else:
        t = timeit(lambda: table.sparse_attn_paged(*args), device)
        tb = timeit(lambda: ref.sparse_attn_paged(*args), device, warmup=1, reps=3)
        base, label = "pytorch twin (gather + einsum)", "S2 sparse attention"
    nbytes = batch * ((window + topk) * (row + 4) + 2 * H * D * 2)
    return dict(scenario=label, batch=batch, context=None, bytes=nbytes, time_s=t,
                baseline_name=base, baseline_time_s=tb,
                shape=f"{H} heads x {D}, {window} window + {topk} top-k rows of {row} B")


def s3_indexer(table: OpTable, device, context: int, H=64, Di=128, topk=512, batch=1):
    T = context // 4
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, H, Di, device=device, generator=g).to(torch.bfloat16)
    w = torch.randn(batch, H, device=device, generator=g) * (Di ** -0.5 * H ** -0.5)
    pool = torch.randn(T, Di, device=device, generator=g).to(torch.bfloat16)
    idx = torch.arange(T, device=device, dtype=torch.int32).expand(batch, T).contiguous()

    def run(fn):
        return fn(q, w, pool, idx).topk(min(topk, T), dim=-1).indices

    nbytes = batch * T * (Di * 2 + 4 + 4)  # keys, index, scores written
    t = timeit(lambda: run(table.indexer_scores_paged), device)
    tb = timeit(lambda: run(ref.indexer_scores_paged), device, warmup=1, reps=3)
    return dict(scenario="S3 indexer + top-k", batch=batch, context=context, bytes=nbytes, time_s=t,
                baseline_name="pytorch twin (gather + einsum) + topk", baseline_time_s=tb,
                shape=f"{T} entries x {H} heads x {Di}, top-{topk}")


# ---- model scenarios (S4-S6) -------------------------------------------------------------------
class FilledCache:
    """Paged pools of a slice filled with random rows for `batch` sequences of `context` tokens:
    blocks only where a request would hold them (window and open compressor windows: the last
    blocks; entries and indexer keys: all)."""

    def __init__(self, model, batch: int, context: int, device, extra_tokens: int = 1):
        from dayzero.cache.paged import CachePools, PagedBatchCache
        from dayzero.cache.spec import cache_groups
        args = model.args
        bs = math.lcm(*[r for r in args.compress_ratios if r] or [1], 16)
        groups = cache_groups(args, bs, with_mtp=False, fp32_rows=model.fp32_compressor_rows)
        end = context + extra_tokens
        tables, counts = [{} for _ in range(batch)], {}
        for gs in groups:
            first = gs.keep_from(context, args.window_size) // bs
            n = 0
            for t in tables:
                t[gs.name] = [None] * first + list(range(n, n + math.ceil(end / bs) - first))
                n += math.ceil(end / bs) - first
            counts[gs.name] = max(n, 1)
        self.pools = CachePools(groups, counts, model.compute_dtype, device)
        g = torch.Generator(device=device).manual_seed(0)
        for tensor in self.pools.tensors.values():
            tensor.normal_(generator=g)
        self.cache = PagedBatchCache(self.pools, tables, [0] * batch, device)
        self.tables, self.block_size, self.end = tables, bs, end
        self.bytes = self.pools.nbytes()


def _layer_bytes(model, batch: int) -> int:
    """Weight bytes one decode step reads: every linear/norm/mHC tensor, routed experts only for
    the expected number touched by `batch` tokens (E * (1 - (1 - k/E)^batch)), plus the head."""
    args, total = model.args, 0
    E, k = args.n_routed_experts, args.n_activated_experts
    touched = E * (1 - (1 - k / E) ** batch)
    for name, t in model.named_parameters():
        nbytes = t.numel() * t.element_size()
        if ".experts." in name:
            total += nbytes * touched / E
        elif name != "embed.weight":
            total += nbytes
    return int(total)


def _kv_bytes(model, batch: int, context: int) -> int:
    """Cache bytes one decode step reads per the model's layer types: window rows, top-k CSA
    entries + every indexer key, every HCA entry (compute dtype)."""
    args = model.args
    size = torch.tensor([], dtype=model.compute_dtype).element_size()
    per = 0
    for t, r in zip(args.layer_types, args.compress_ratios):
        per += args.window_size * args.head_dim * size
        if t == "csa":
            per += min(args.index_topk, context // r) * args.head_dim * size + context // r * args.index_head_dim * size
        elif t == "hca":
            per += context // r * args.head_dim * size
    return batch * per


def decode_bytes(model, batch: int, context: int) -> int:
    """Bytes one decode step must move: weights (experts as touched) and the cache rows read."""
    return _layer_bytes(model, batch) + _kv_bytes(model, batch, context)


def decode_step(model, batch: int, context: int, device, graphs: str | None = None) -> tuple[float, int]:
    """Seconds per decode step of `batch` sequences at `context` (one token each, logits
    included) and the bytes it must move. graphs="cuda" ("trace" on a CPU): the step replayed
    from a recorded graph as the engine replays it, its per-step buffer uploads included
    (engine/graphs.py)."""
    from dayzero.reference.seqcache import Batch
    filled = FilledCache(model, batch, context, device)
    ids = torch.randint(0, model.args.vocab_size, (batch,), device=device)

    if graphs:
        from dayzero.engine.graphs import StepGraphs
        g = StepGraphs(model, filled.pools, batch, batch, filled.block_size, model.args.max_seq_len, device, graphs)
        host_ids = ids.tolist()

        def step():
            return g.run(host_ids, list(range(batch)), [context] * batch, filled.tables, filled.end).logits
    else:
        def step():
            with torch.no_grad():
                b = Batch([context] * batch, [1] * batch, filled.cache, device)
                X = model.forward_packed(ids, b)
                return model.logits(X, model.head_weight())

    t = timeit(step, device)
    return t, decode_bytes(model, batch, context)


def engine_long_context(model, device, tokens: int, chunk: int, short: int, decode_steps: int = 3
                        ) -> tuple[float, float, float]:
    """A `tokens`-token random prompt through the engine as a user's request runs: chunked
    prefill in `chunk`-token steps (the window and compressor rows recycled, entries kept), then
    `decode_steps` timed decode steps; the same for a `short`-token prompt. Returns (prefill
    seconds, seconds per decode step at `tokens`, at `short`). The model keeps its op table; the
    KV budget is what the prompt needs."""
    from dayzero.cache.spec import cache_groups
    from dayzero.engine.capacity import bounded_blocks
    from dayzero.engine.engine import Engine, EngineArgs, _default_block_size
    from dayzero.engine.sampling import SamplingParams
    args = model.args
    eargs = EngineArgs(max_num_seqs=1, max_num_batched_tokens=chunk, enable_prefix_caching=False,
                       num_speculative_tokens=0, ops=model.ops.name, block_size=None)
    bs = _default_block_size(args)
    groups = cache_groups(args, bs, with_mtp=False, fp32_rows=model.fp32_compressor_rows)
    bounded = bounded_blocks(groups, args, bs, 1, chunk, reserve_seqs=1)  # the reserve takes at most one sequence
    grow = math.ceil((tokens + chunk + decode_steps + 2) / bs) + 2
    budget = sum(((bounded.get(g.name) or grow) + 1) * g.block_bytes(model.compute_dtype) for g in groups)  # + trash
    eng = Engine(model, replace(eargs, kv_cache_memory_bytes=budget), device)
    gen = torch.Generator().manual_seed(0)

    def run(n: int, rid: str) -> tuple[float, float]:
        prompt = torch.randint(2, args.vocab_size, (n,), generator=gen).tolist()
        eng.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=decode_steps + 2, ignore_eos=True))
        req = eng.requests[rid]
        sync(device)
        t0 = time.perf_counter()
        while not req.output_ids:  # the prefill chunks; the last one samples the first token
            eng.step()
        sync(device)
        t_pre = time.perf_counter() - t0
        eng.step()  # untimed: on a GPU the first decode step at this context records its graph
        t1 = time.perf_counter()
        while not req.finished:  # each step: one decode token (logits to the host: synchronous)
            eng.step()
        t2 = time.perf_counter()
        eng.release(rid)
        return t_pre, (t2 - t1) / decode_steps

    run(min(short, chunk), "warm-up")
    prefill, long_step = run(tokens, "long")
    _, short_step = run(short, "short")
    if eng.scheduler.num_preemptions:  # the budget is sized for the prompt: a preemption is a bug here
        raise RuntimeError(f"the {tokens}-token request was preempted {eng.scheduler.num_preemptions} times")
    return prefill, long_step, short_step


def prefill_flops(model, tokens: int) -> float:
    """2 x active weights per token x tokens, plus attention (QK and PV over window + top-k or all
    entries, 64 heads x 512) and indexer scores (64 x 128 over the entries visible), averaged
    over a chunk starting at 0."""
    args = model.args
    E, k = args.n_routed_experts, args.n_activated_experts
    active = 0
    for name, t in model.named_parameters():
        if t.dim() != 2 or name == "embed.weight":
            continue
        n = t.numel() * (2 if t.dtype == torch.int8 else 1)  # FP4: two values a byte
        active += n * k / E if ".experts." in name else n
    flops = 2 * active * tokens
    for t, r in zip(args.layer_types, args.compress_ratios):
        keys = args.window_size + (min(args.index_topk, tokens // (2 * r)) if t == "csa" else
                                   tokens // (2 * r) if t == "hca" else 0)
        flops += 4 * tokens * args.n_heads * args.head_dim * keys
        if t == "csa":
            flops += 2 * tokens * (tokens // (2 * r)) * args.index_n_heads * args.index_head_dim
    return flops


def transformers_decode(args, device, context: int) -> float | None:
    """Seconds per decode step of transformers' DeepseekV4ForCausalLM (bf16, random weights) on
    the slice's shapes at batch 1 after a `context`-token prefill; None if transformers is absent
    or it runs out of memory."""
    try:
        from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    except ImportError:
        return None
    cfg = DeepseekV4Config(**{k: v for k, v in args.replace(quant=None, expert_dtype=None).to_hf_dict().items()
                              if k != "quantization_config"})
    try:
        with torch.device(device):
            hf = DeepseekV4ForCausalLM(cfg).to(torch.bfloat16).eval()
        ids = torch.randint(0, args.vocab_size, (1, context), device=device)
        with torch.no_grad():
            out = hf(ids, use_cache=True)
            past = out.past_key_values
            nxt = torch.randint(0, args.vocab_size, (1, 1), device=device)
            pos = torch.tensor([[context]], device=device)

            def step():  # each step appends one token: context .. context + 3, close enough
                hf(nxt, past_key_values=past, position_ids=pos, use_cache=True)
            t = timeit(step, device, warmup=1, reps=3)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return t
