"""The engine: add_request / step / abort over the scheduler, the paged cache and the model.

A step packs the scheduled tokens of every request into one forward (each request a sequence of
the Batch, reading and writing its own blocks), samples where a request reached its last known token,
verifies the drafts in the same forward, lets the drafter (engine/drafter.py) propose the next
ones, and commits finished blocks to the prefix cache. Nothing a request sees depends on what else
is in the batch.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch

from dayzero.cache.manager import KVCacheManager
from dayzero.cache.spec import check_kv_cache_dtype, model_cache_groups, model_fixed_bytes
from dayzero.engine.request import Request, Status
from dayzero.engine.drafter import DraftPlan, check_speculative_config, make_drafter, resolve
from dayzero.engine.draft_policy import DraftPolicy
from dayzero.engine.sampling import SamplingParams, sample, token_logprobs, verify_block
from dayzero.engine.scheduler import Scheduled, Scheduler
from dayzero.engine.capacity import DEFAULT_MAX_NUM_SEQS, Capacity, derived_budget, gb, plan
from dayzero.engine.worker import PoolSpec, Worker, WorkerSpec
from dayzero.distributed.dp import assign
from dayzero.reference.model import Transformer
from dayzero.v41.replay import engine_floor, refuse_v41_options


@dataclass(frozen=True)
class EngineArgs:
    """Engine options, named as vLLM names them."""
    max_num_seqs: int | None = None  # default: 32, lowered to what the cache budget holds (engine/capacity.py)
    max_num_batched_tokens: int = 1024
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int | None = None  # default: the memory free after the weights, less a margin (capacity.py)
    block_size: int | None = None  # default: the smallest multiple of every compression ratio >= 16
    # speculation (engine/drafter.py): {"method": "dspark" | "mtp", "num_speculative_tokens": k};
    # None: the checkpoint's drafter (DSpark, else MTP) at its k; k = 0: off
    speculative_config: dict | None = None
    num_speculative_tokens: int | None = None  # the same k as a keyword of its own
    # speculation turns itself off below this after 16 draft tokens, and (adaptive draft policy) when the
    # measured steps say it does not pay (engine/draft_policy.py); 0: it never turns itself off
    speculative_min_acceptance: float = 0.3
    ops: str | None = None  # kernel table: "triton", "cpu" (native C), "ref" (PyTorch twins) or None (by device)
    enforce_eager: bool = False  # never replay CUDA graphs (engine/graphs.py); CPUs always run eagerly
    kv_cache_dtype: str = "auto"  # "auto": the compute dtype; "fp8": K=V rows as FP8 nope + rope dims (ops/kvfp8.py);
    # "qat": DeepSeek-V4.1's cached rows in its QAT formats (v41/kvpack.py)
    tensor_parallel_size: int = 1  # ranks the model is split over (distributed/layout.py); 1: this process alone
    enable_expert_parallel: bool = False  # routed experts whole, E/N per rank, instead of split by inner dim
    data_parallel_size: int = 1  # ranks each running attention on its own requests (with enable_expert_parallel)
    cpu_experts: bool = False  # hybrid placement: routed experts in host memory on the CPU's kernels, the rest on the device
    v41_bounded_replay: bool = False  # DeepSeek-V4.1 only: the opt-in bounded-replay prefill (docs/V41.md)

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if v is None and name == "max_num_seqs":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        if self.kv_cache_memory_bytes is not None and (
                not isinstance(self.kv_cache_memory_bytes, int) or self.kv_cache_memory_bytes <= 0):
            raise ValueError(f"kv_cache_memory_bytes: must be a positive integer, got {self.kv_cache_memory_bytes!r}")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 1):
            raise ValueError(f"block_size: must be a positive integer, got {self.block_size!r}")
        check_speculative_config(self.speculative_config, self.num_speculative_tokens)
        if self.ops not in (None, "auto", "ref", "triton", "cpu"):
            raise ValueError(f"ops: must be 'triton', 'cpu', 'ref' or None, got {self.ops!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager: must be True or False, got {self.enforce_eager!r}")
        check_kv_cache_dtype(self.kv_cache_dtype)
        for name in ("tensor_parallel_size", "data_parallel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        for name in ("enable_expert_parallel", "cpu_experts", "v41_bounded_replay"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be True or False, got {getattr(self, name)!r}")


def _default_block_size(args) -> int:
    lcm = math.lcm(*[r for r in args.compress_ratios if r] or [1])
    return lcm * math.ceil(16 / lcm)


class Engine:
    """Rank 0's scheduler, cache bookkeeping and sampling over the workers that run the steps: its
    own (`self.worker`, the model on `device`) and, with `ranks` (distributed/runtime.py), every
    other rank's, which receive each call before rank 0 runs it. prepare_weights: let the worker
    keep dequantised or cast weight copies its op table needs (what `LLM` does)."""

    def __init__(self, model: Transformer, eargs: EngineArgs, device: torch.device, tokenizer=None,
                 ranks=None, prepare_weights: bool = False):
        self.model, self.eargs, self.device, self.tokenizer = model, eargs, device, tokenizer
        lay = model.layout
        if (ranks.world if ranks is not None else 1) != lay.world:
            raise ValueError(f"a model split for tensor_parallel_size={lay.tp} x data_parallel_size={lay.dp} needs "
                             f"{lay.world} ranks, got {ranks.world if ranks is not None else 1}")
        # DP-attention + EP: each request's blocks are written on its own rank only, so its blocks
        # are named in its rank's partition of the prefix cache (cache/manager.py), and a request
        # is placed when admitted from position 0 (`_place`)
        self.dp = lay.dp
        self.dp_owner: dict[str, int] = {}  # request id -> its rank (distributed/dp.py)
        getattr(model, "check_engine_args", refuse_v41_options)(eargs)  # a model's own refusals (V4.1: v41/served.py)
        args = self.args = model.args
        self.block_size = bs = eargs.block_size or _default_block_size(args)
        self.spec_method, self.spec_k = resolve(args, eargs.speculative_config, eargs.num_speculative_tokens)
        self.drafter = make_drafter(self)
        self.spec_enabled = self.drafter is not None
        self.policy = DraftPolicy((eargs.speculative_config or {}).get("draft_policy", "adaptive"))
        self.groups = model_cache_groups(model, bs, self.spec_enabled, eargs.kv_cache_dtype)
        self.ranks = ranks
        wspec = WorkerSpec(ops=eargs.ops, prepare_weights=prepare_weights, cpu_experts=eargs.cpu_experts,
                           capture=getattr(self.drafter, "captures", False))
        if ranks is not None:
            ranks.start(wspec)  # the other ranks build their workers first; they meet rank 0's in collectives
        self.worker = Worker(model, wspec, device)
        # the cache is sized once every rank's weights are in place, from the smallest rank's free memory
        self.capacity = cap = self._capacity()
        self.num_blocks, self.max_tokens, self.max_num_seqs = cap.num_blocks, cap.max_tokens, cap.max_num_seqs
        if cap.lowered:
            print(f"dayzero: max_num_seqs={cap.max_num_seqs} (not {DEFAULT_MAX_NUM_SEQS}): the cache budget of "
                  f"{gb(cap.budget)} holds the window and compressor rows of {cap.max_num_seqs} sequences in half "
                  f"of it; pass max_num_seqs or kv_cache_memory_bytes to choose", file=sys.stderr)
        # DP-attention: one cache per rank, each of num_blocks, max_num_seqs requests a rank
        self.kv = KVCacheManager(self.groups, self.num_blocks, bs, args.window_size, eargs.enable_prefix_caching,
                                 lookahead=int(self.spec_enabled), partitions=self.dp)
        if eargs.v41_bounded_replay:  # each request's floor, from its original prompt (v41/replay.py)
            self.kv.floor_of = lambda rid: engine_floor(self.requests.get(rid), args.window_size)
        self.scheduler = Scheduler(self.kv, self.max_num_seqs * self.dp, eargs.max_num_batched_tokens)
        if self.dp > 1:
            self.scheduler.place = self._place
        self.requests: dict[str, Request] = {}
        self.drafts = self.accepted = 0  # draft tokens verified / accepted
        self.verify_rounds = 0  # (request, step) pairs that verified drafts
        self.num_steps = 0
        self.tokens_generated = 0
        pspec = PoolSpec(
            groups=tuple(self.groups), num_blocks=dict(self.num_blocks), block_size=bs,
            max_num_seqs=self.max_num_seqs,
            max_tokens_per_step=min(self.max_num_seqs * (1 + self.spec_k), eargs.max_num_batched_tokens),
            enforce_eager=eargs.enforce_eager)
        self._on_ranks("allocate", pspec)
        self.runner = self.worker if ranks is None else ranks.runner(self.worker, data_parallel=self.dp > 1)
        # resident bytes of every rank (weights and cache pools: fixed from here on)
        self.rank_bytes = self._on_ranks("nbytes")

    def _on_ranks(self, method: str, *args) -> list:
        """`method` on every rank's worker (rank 0's included), results in rank order."""
        if self.ranks is None:
            return [getattr(self.worker, method)(*args)]
        return self.ranks.gather(self.worker, method, *args)

    # rank 0's worker: its op table, pools, device tables and recorded steps
    ops = property(lambda self: self.worker.ops)
    pools = property(lambda self: self.worker.pools)
    tables = property(lambda self: self.worker.tables)
    graphs = property(lambda self: self.worker.graphs)
    graphs_off = property(lambda self: self.worker.graphs_off)

    def use_graphs(self, backend: str) -> None:
        """Replay decode steps from recorded graphs (engine/graphs.py; one rank only)."""
        if self.ranks is not None:
            raise ValueError("recorded steps need tensor_parallel_size=1")
        self.worker.use_graphs(backend)

    # ---- capacity ------------------------------------------------------------------------------
    def _capacity(self) -> Capacity:
        e = self.eargs
        budget, source = e.kv_cache_memory_bytes, "kv_cache_memory_bytes"
        if budget is None:
            if self.ranks is not None:
                self._on_ranks("nbytes")  # a barrier: every rank has prepared its weights before any measures
            budget, source = derived_budget(self._on_ranks("memory"))
        return plan(self.groups, self.args, self.model.compute_dtype, self.block_size, budget, source,
                    e.max_num_seqs, e.max_num_batched_tokens, budget_given=e.kv_cache_memory_bytes is not None)

    def memory_line(self) -> str:
        """One line: weights, window and compressor rows, entries, per rank, and the budget's origin."""
        c, b = self.capacity, self.rank_bytes[0]
        per = " per rank" if len(self.rank_bytes) > 1 else ""
        host = f" (+ routed experts in host memory {gb(b['host_expert_bytes'])})" if self.eargs.cpu_experts else ""
        return (f"dayzero: memory{per}: weights {gb(b['weight_bytes'])}{host}, cache {gb(b['kv_cache_bytes'])} = window and "
                f"compressor rows {gb(b['cache_rows_bytes'])} ({c.max_num_seqs} sequences + {c.reserve_seqs} kept "
                f"for prefix hits) + compressed entries {gb(b['cache_entries_bytes'])} ({c.max_tokens} tokens); "
                f"budget {gb(c.budget)} from {c.budget_source}")

    def stats(self) -> dict:
        return {
            "ops": self.ops.name,
            "kernels": list(self.ops.kernels),
            "block_size": self.block_size,
            "kv_cache_dtype": self.eargs.kv_cache_dtype,
            "kv_cache_bytes": self.pools.nbytes(),
            "weight_bytes": self.rank_bytes[0]["weight_bytes"],
            "cpu_experts": self.eargs.cpu_experts,
            "expert_ops": (self.worker.host_ops or self.ops).name,  # the table the routed experts run on
            "host_expert_bytes": self.rank_bytes[0]["host_expert_bytes"],
            "cache_rows_bytes": self.rank_bytes[0]["cache_rows_bytes"],
            "cache_entries_bytes": self.rank_bytes[0]["cache_entries_bytes"],
            "kv_cache_budget": self.capacity.budget,
            "kv_cache_budget_source": self.capacity.budget_source,
            "max_num_seqs": self.max_num_seqs,
            "reserve_seqs": self.capacity.reserve_seqs,
            "compressor_rows_dtype": "float32" if self.model.fp32_compressor_rows
            else str(self.model.compute_dtype).removeprefix("torch."),
            "max_tokens_in_cache": self.max_tokens,
            "fixed_bytes_per_sequence": model_fixed_bytes(self.model, self.spec_enabled, self.eargs.kv_cache_dtype),
            "kv_usage": self.kv.usage(),
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_tokens": self.kv.hits,
            "prefix_cache_query_tokens": self.kv.queries,
            **self.spec_stats(),
            "steps": self.num_steps,
            "tokens_generated": self.tokens_generated,
            "graphs": self.graphs.stats() if self.graphs is not None else {"off": self.graphs_off},
            "tensor_parallel_size": self.model.layout.tp,
            "enable_expert_parallel": self.model.layout.ep,
            "data_parallel_size": self.dp,
            "enable_prefix_caching": self.eargs.enable_prefix_caching,
            "ranks": [{"rank": i, **b} for i, b in enumerate(self.rank_bytes)],
        }

    def spec_stats(self) -> dict:
        """Speculation figures: draft tokens verified and accepted, their ratio, and the mean
        accepted length (accepted draft tokens per verifying request-step; each such step also
        yields one token of the target's own); the draft policy's mean chosen length (verified
        drafts per request-step that had a proposal, 0 included) and its step-cost table."""
        return {
            "spec_method": self.spec_method,
            "spec_num_speculative_tokens": self.spec_k,
            "spec_enabled": self.spec_enabled,
            "spec_draft_tokens": self.drafts,
            "spec_accepted_tokens": self.accepted,
            "spec_acceptance": self.accepted / self.drafts if self.drafts else None,
            "spec_verify_steps": self.verify_rounds,
            "spec_mean_accepted_length": self.accepted / self.verify_rounds if self.verify_rounds else None,
            **self.policy.stats(),
        }

    # ---- API -----------------------------------------------------------------------------------
    def add_request(self, rid: str, prompt_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> Request:
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        limit = self.args.max_seq_len
        if len(prompt_ids) >= limit:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in the {limit}-token context")
        req = Request(rid, list(prompt_ids), params, prompt=prompt,
                      max_len=min(limit, len(prompt_ids) + params.max_tokens))
        self.requests[rid] = req
        self.scheduler.add(req)
        return req

    def abort(self, rid: str) -> None:
        req = self.requests.pop(rid, None)
        if req is not None and not req.finished:
            self.scheduler.finish(req, "abort")
        self.dp_owner.pop(rid, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def release(self, rid: str) -> None:
        """Forget a finished request."""
        self.requests.pop(rid, None)

    # ---- one step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Request]:
        """Run one scheduled batch; return the requests that produced tokens or finished."""
        t0 = time.perf_counter()
        before = {r.rid for r in self.requests.values() if r.finished}
        batch = self.scheduler.schedule()
        touched = [r for r in self.requests.values() if r.finished and r.rid not in before]
        if not batch:
            return touched
        self.num_steps += 1
        if self.spec_enabled:
            self.policy.cut(batch)  # each request's draft length this step (engine/draft_policy.py)
        ids, lengths, offsets = [], [], []
        for s in batch:
            r = s.request
            toks = r.all_ids[r.num_computed:r.num_computed + s.num_new - s.num_draft] + r.draft[:s.num_draft]
            offsets.append(len(ids))
            lengths.append(len(toks))
            ids.extend(toks)
        reqs = [s.request for s in batch]
        starts = [r.num_computed for r in reqs]
        # logits only where something is sampled: a request's last row, and the draft rows' before it
        want = []
        for s, off, n in zip(batch, offsets, lengths):
            if s.request.num_computed + s.num_new - s.num_draft >= s.request.num_tokens:
                want += range(off + n - 1 - s.num_draft, off + n)
        rows = {row: i for i, row in enumerate(want)}
        logits = self._forward(ids, starts, lengths, reqs, want)
        plan = DraftPlan([], [], [], [], [], reqs, [])
        for b, (s, off, n) in enumerate(zip(batch, offsets, lengths)):
            r = s.request
            old = r.num_computed
            if old + s.num_new - s.num_draft < r.num_tokens:  # a prefill chunk: nothing to sample
                r.num_computed += s.num_new
            else:
                self._sample(r, s, logits, rows, off + n - 1)
            if not r.finished and self.spec_enabled and r.num_computed > old:
                k = r.num_computed - old  # positions old..num_computed-1 (accepted), the tokens after them
                plan.seqs.append(b)
                plan.starts.append(old)
                plan.lengths.append(k)
                plan.rows.extend(range(off, off + k))
                plan.next_ids.extend(r.all_ids[old + 1:old + 1 + k])
            touched.append(r)
        if plan.seqs:  # before the commits: the drafts read the step's block tables
            plan.tables = [self.kv.table(r.rid) for r in reqs]
            t = time.perf_counter()
            self.drafter.propose(self, plan)
            self.policy.draft_cost.observe(len(ids), time.perf_counter() - t)
        for r in reqs:
            self.kv.commit(r.rid, r.num_computed, r.all_ids)
            if r.finished:
                self.scheduler.finish(r, r.finish_reason)
                self.dp_owner.pop(r.rid, None)
        self.policy.cost.observe(len(ids), time.perf_counter() - t0)
        if self.spec_enabled and self.eargs.speculative_min_acceptance and not self.policy.pays():
            print(f"dayzero: speculation off: with the drafter's own time, the measured steps give "
                  f"{self.policy.payoff:.2f}x the rate of no speculation", file=sys.stderr)
            self._disable_speculation()
        return touched

    def _place(self, req: Request) -> int:
        """DP-attention + EP: the rank of a request admitted from position 0 (new, or again after a
        preemption), given how much of its prompt each rank's prefix cache holds (dp.py `assign`)."""
        hits = [self.kv.probe_prefix(req.all_ids, r) for r in range(self.dp)]
        return assign(self.dp_owner, [r.rid for r in self.scheduler.running], req.rid, self.dp, hits,
                      cap=self.max_num_seqs)

    def _forward(self, ids: list[int], starts: list[int], lengths: list[int], reqs: list[Request],
                 want: list[int]) -> torch.Tensor | None:
        """The step's forward on every rank: fp32 logits of the `want` rows on the host (the final
        streams stay on the workers for the step's MTP draft)."""
        tables = [self.kv.table(r.rid) for r in reqs]
        # every write of a step is at or after its start: protection matters only below it
        protect = [r.protect if r.protect > r.num_computed else 0 for r in reqs]
        if self.dp > 1:  # each request on its rank, placed when admitted from position 0 (`_place`)
            owners = [self.dp_owner[r.rid] for r in reqs]
            return self.runner.forward(ids, starts, lengths, tables, protect, want, owners)
        if self.eargs.v41_bounded_replay:  # V4.1: every step passes each request's floor (to every TP rank)
            return self.runner.forward(ids, starts, lengths, tables, protect, want, None,
                                       [engine_floor(r, self.args.window_size) for r in reqs])
        return self.runner.forward(ids, starts, lengths, tables, protect, want)

    def _sample(self, r: Request, s: Scheduled, logits, rows, last_row: int) -> None:
        k = len(r.output_ids)  # index of the output token sampled next
        d = s.num_draft
        targets = [logits[rows[row]] for row in range(last_row - d, last_row + 1)]
        r.num_computed += s.num_new - d  # up to the last known token's position
        if d:
            drafts = r.draft[:d]
            accepted, toks = verify_block(targets, drafts, r.params, r.seed, k)
            self.drafts += d
            self.accepted += accepted
            self.verify_rounds += 1
        else:
            toks = [sample(targets[0], r.params, r.seed, k)]
        if r.draft:
            self.policy.observe(r, r.draft, toks)  # every proposed draft's outcome, verified or not
        r.draft, r.draft_conf = [], None  # drafts the budget left out are stale after this step
        for i, tok in enumerate(toks):
            if i:
                r.num_computed += 1  # draft i - 1's position holds the accepted token
            self._append(r, tok, targets[i])
            if r.finished:
                break
        if d and self.drafts >= 16 and self.accepted < self.eargs.speculative_min_acceptance * self.drafts:
            self._disable_speculation()

    def _append(self, r: Request, tok: int, logits: torch.Tensor) -> None:
        r.output_ids.append(tok)
        self.tokens_generated += 1
        p = r.params
        if p.logits_processor is not None:
            p.logits_processor.accept(tok)
        if r.logprobs is not None:
            r.logprobs.append(token_logprobs(logits, tok, p.logprobs))
        # text is decoded only where stop strings need it, and once at the end
        if p.stop and self.tokenizer is not None:
            r.text = self.tokenizer.decode(r.output_ids)
        if (tok == self.args.eos_token_id and not p.ignore_eos) or tok in (p.stop_token_ids or ()):
            r.finish_reason = "stop"
        elif p.stop and any(x in r.text for x in p.stop_strings):
            r.text = r.text[:min(r.text.index(x) for x in p.stop_strings if x in r.text)]
            r.finish_reason = "stop"
            r.status = Status.FINISHED
            return
        elif len(r.output_ids) >= p.max_tokens or r.num_tokens >= r.max_len:
            r.finish_reason = "length"
        if r.finish_reason:
            r.status = Status.FINISHED
            if self.tokenizer is not None:
                r.text = self.tokenizer.decode(r.output_ids)

    def _disable_speculation(self) -> None:
        self.spec_enabled = False
        if self.worker.capture:
            self._on_ranks("set_capture", False)
        for r in self.requests.values():
            r.draft, r.draft_conf = [], None
