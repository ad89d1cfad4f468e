"""The engine: add_request / step / abort over the scheduler, the paged cache and the model.

A step packs the scheduled tokens of every request into one forward (each request a sequence of
the Batch, reading and writing its own blocks), samples where a request reached its last known token,
verifies MTP drafts, runs MTP to draft the next token, and commits finished blocks to the
prefix cache. Nothing a request sees depends on what else is in the batch.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from dayzero.cache.manager import KVCacheManager
from dayzero.cache.paged import CachePools, DeviceTables, PagedBatchCache, check_flags
from dayzero.cache.spec import cache_groups, check_kv_cache_dtype, fixed_bytes_per_sequence
from dayzero.engine.graphs import RecordingFailed, StepGraphs, table_blocks, unsupported
from dayzero.engine.request import Request, Status
from dayzero.engine.sampling import SamplingParams, sample, token_logprobs, verify_draft
from dayzero.engine.scheduler import Scheduled, Scheduler
from dayzero.ops import for_device
from dayzero.reference.model import Transformer
from dayzero.reference.seqcache import Batch


@dataclass(frozen=True)
class EngineArgs:
    """Engine options, named as vLLM names them."""
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int | None = None  # default: 512 MiB on CPU, half the free memory elsewhere
    block_size: int | None = None  # default: the smallest multiple of every compression ratio >= 16
    num_speculative_tokens: int | None = None  # MTP drafts per step: 0 or 1 (default 1 with an MTP module)
    speculative_min_acceptance: float = 0.3  # MTP turns itself off below this after 16 drafts
    ops: str | None = None  # kernel table: "triton", "cpu" (native C), "ref" (PyTorch twins) or None (by device)
    enforce_eager: bool = False  # never replay CUDA graphs (engine/graphs.py); CPUs always run eagerly
    kv_cache_dtype: str = "auto"  # "auto": the compute dtype; "fp8": K=V rows as FP8 nope + rope dims (ops/kvfp8.py)

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        if self.kv_cache_memory_bytes is not None and (
                not isinstance(self.kv_cache_memory_bytes, int) or self.kv_cache_memory_bytes <= 0):
            raise ValueError(f"kv_cache_memory_bytes: must be a positive integer, got {self.kv_cache_memory_bytes!r}")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 1):
            raise ValueError(f"block_size: must be a positive integer, got {self.block_size!r}")
        if self.num_speculative_tokens not in (None, 0, 1):
            raise ValueError(f"num_speculative_tokens: MTP drafts 0 or 1 token, got {self.num_speculative_tokens!r}")
        if self.ops not in (None, "auto", "ref", "triton", "cpu"):
            raise ValueError(f"ops: must be 'triton', 'cpu', 'ref' or None, got {self.ops!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager: must be True or False, got {self.enforce_eager!r}")
        check_kv_cache_dtype(self.kv_cache_dtype)


def bounded_blocks(groups, args, eargs: EngineArgs, bs: int) -> dict[str, int]:
    """Blocks of each group whose rows per sequence are bounded (the window, open compressor
    windows): per running sequence its span plus a partial block at each end, the step's chunk on
    top, and twice that, so finished requests' blocks stay cached for prefix hits a while."""
    blocks = {}
    for g in groups:
        if g.keep != "all":
            span = args.window_size - 1 if g.keep == "window" else g.window_ratio * (2 if g.overlap else 1)
            blocks[g.name] = 2 * (eargs.max_num_seqs * (math.ceil(span / bs) + 2)
                                  + math.ceil(eargs.max_num_batched_tokens / bs))
    return blocks


def _default_block_size(args) -> int:
    lcm = math.lcm(*[r for r in args.compress_ratios if r] or [1])
    return lcm * math.ceil(16 / lcm)


class Engine:
    def __init__(self, model: Transformer, eargs: EngineArgs, device: torch.device, tokenizer=None):
        self.model, self.eargs, self.device, self.tokenizer = model, eargs, device, tokenizer
        self.ops = for_device(device, eargs.ops)  # the dispatch decision, once per engine
        model.set_ops(self.ops)
        args = self.args = model.args
        self.block_size = bs = eargs.block_size or _default_block_size(args)
        has_mtp = bool(args.n_mtp_layers)
        spec = eargs.num_speculative_tokens
        if spec and not has_mtp:
            raise ValueError("num_speculative_tokens: this checkpoint has no MTP module to draft with")
        self.spec_enabled = has_mtp if spec is None else bool(spec)
        self.groups = cache_groups(args, bs, with_mtp=self.spec_enabled, kv_cache_dtype=eargs.kv_cache_dtype)
        self.num_blocks, self.max_tokens = self._capacity()
        self.kv = KVCacheManager(self.groups, self.num_blocks, bs, args.window_size, eargs.enable_prefix_caching,
                                 lookahead=int(self.spec_enabled))
        self.pools = CachePools(self.groups, self.num_blocks, model.compute_dtype, device)
        self.scheduler = Scheduler(self.kv, eargs.max_num_seqs, eargs.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self.drafts = self.accepted = 0
        self.num_steps = 0
        self.tokens_generated = 0
        # every step's block tables, kept on the device (one slot per running request + padding):
        # a step uploads what changed (cache/paged.py); recorded steps read them at fixed addresses
        self.tables = DeviceTables(self.pools, eargs.max_num_seqs + 1,
                                   table_blocks(self.args.max_seq_len, self.block_size), device)
        self.graphs: StepGraphs | None = None
        self.graphs_off = "enforce_eager" if eargs.enforce_eager else "not a CUDA device"
        if device.type == "cuda" and not eargs.enforce_eager:
            self.graphs_off = unsupported(model)
            if self.graphs_off is None:
                self.use_graphs("cuda")

    def use_graphs(self, backend: str) -> None:
        """Replay decode steps from recorded graphs (engine/graphs.py): "cuda" on a GPU; "trace"
        records aten ops on any device (how the CPU tests check replayed steps)."""
        e = self.eargs
        self.graphs = StepGraphs(self.model, self.pools, e.max_num_seqs,
                                 min(e.max_num_seqs * (1 + int(self.spec_enabled)), e.max_num_batched_tokens),
                                 self.block_size, self.args.max_seq_len, self.device, backend, self.tables)
        self.graphs_off = None

    # ---- capacity ------------------------------------------------------------------------------
    def _capacity(self) -> tuple[dict[str, int], int]:
        e, args, bs = self.eargs, self.args, self.block_size
        dtype = self.model.compute_dtype
        budget = e.kv_cache_memory_bytes
        if budget is None:
            if self.device.type == "cuda":
                budget = int(torch.cuda.mem_get_info(self.device)[0] * 0.5)
            else:
                budget = 512 * 2**20
        blocks = bounded_blocks(self.groups, args, e, bs)
        fixed = sum(n * g.block_bytes(dtype) for g in self.groups if (n := blocks.get(g.name)))
        fixed += sum(g.block_bytes(dtype) for g in self.groups)  # each pool's trash block (cache/paged.py)
        growing = [g for g in self.groups if g.keep == "all"]
        per_block = sum(g.block_bytes(dtype) for g in growing)
        if not growing:  # sliding-window-only model: context bounded by max_seq_len only
            return blocks, args.max_seq_len * e.max_num_seqs
        n = (budget - fixed) // per_block
        if n < 2:
            raise ValueError(
                f"kv_cache_memory_bytes={budget} leaves no room for compressed entries after the "
                f"{fixed} bytes of window and compressor rows for max_num_seqs={e.max_num_seqs} (and one "
                f"trash block per pool); "
                f"need at least {fixed + 2 * per_block}")
        for g in growing:
            blocks[g.name] = n
        return blocks, n * bs

    def stats(self) -> dict:
        return {
            "ops": self.ops.name,
            "kernels": list(self.ops.kernels),
            "block_size": self.block_size,
            "kv_cache_dtype": self.eargs.kv_cache_dtype,
            "kv_cache_bytes": self.pools.nbytes(),
            "max_tokens_in_cache": self.max_tokens,
            "fixed_bytes_per_sequence": fixed_bytes_per_sequence(self.args, self.model.compute_dtype,
                                                                 self.spec_enabled, self.eargs.kv_cache_dtype),
            "kv_usage": self.kv.usage(),
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_tokens": self.kv.hits,
            "prefix_cache_query_tokens": self.kv.queries,
            "mtp_enabled": self.spec_enabled,
            "mtp_drafts": self.drafts,
            "mtp_accepted": self.accepted,
            "mtp_acceptance": self.accepted / self.drafts if self.drafts else None,
            "steps": self.num_steps,
            "tokens_generated": self.tokens_generated,
            "graphs": self.graphs.stats() if self.graphs is not None else {"off": self.graphs_off},
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

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def release(self, rid: str) -> None:
        """Forget a finished request."""
        self.requests.pop(rid, None)

    # ---- one step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Request]:
        """Run one scheduled batch; return the requests that produced tokens or finished."""
        before = {r.rid for r in self.requests.values() if r.finished}
        batch = self.scheduler.schedule()
        touched = [r for r in self.requests.values() if r.finished and r.rid not in before]
        if not batch:
            return touched
        self.num_steps += 1
        ids, lengths, offsets = [], [], []
        for s in batch:
            r = s.request
            toks = r.all_ids[r.num_computed:r.num_computed + s.num_new - s.verify_draft]
            if s.verify_draft:
                toks.append(r.draft)
            offsets.append(len(ids))
            lengths.append(len(toks))
            ids.extend(toks)
        reqs = [s.request for s in batch]
        starts = [r.num_computed for r in reqs]
        # logits only where something is sampled: a request's last row, and the one before when verifying
        want = []
        for s, off, n in zip(batch, offsets, lengths):
            if s.request.num_computed + s.num_new >= s.request.num_tokens:
                want += [off + n - 2] if s.verify_draft else []
                want.append(off + n - 1)
        rows = {row: i for i, row in enumerate(want)}
        X, logits, cache = self._forward(ids, starts, lengths, reqs, want)
        mtp = ([], [], [], [], [])  # sequence index, start, length, stream rows, next token ids
        for b, (s, off, n) in enumerate(zip(batch, offsets, lengths)):
            r = s.request
            old = r.num_computed
            if old + s.num_new < r.num_tokens:  # a prefill chunk: nothing to sample
                r.num_computed += s.num_new
            else:
                self._sample(r, s, logits, rows, off + n - 1)
            if not r.finished and self.spec_enabled and r.num_computed > old:
                k = r.num_computed - old  # MTP: positions old..num_computed-1 with the tokens after them
                for lst, v in zip(mtp, (b, old, k)):
                    lst.append(v)
                mtp[3].extend(range(off, off + k))
                mtp[4].extend(r.all_ids[old + 1:old + 1 + k])
            touched.append(r)
        if mtp[0]:  # before the commits: the drafts read the step's block tables
            self._draft(X[mtp[3]], mtp, cache, reqs)
        for r in reqs:
            self.kv.commit(r.rid, r.num_computed, r.all_ids)
            if r.finished:
                self.scheduler.finish(r, r.finish_reason)
        return touched

    def _replayed(self, ids, seq, positions, tables, end, streams=None):
        """The step (or MTP draft forward) replayed from its recorded graph; None where graphs
        are off or no bucket holds it. A capture that fails turns graphs off for good (the step
        then runs eagerly: its warm-up's writes are what the eager step writes again)."""
        if self.graphs is None:
            return None
        try:
            return self.graphs.run(ids, seq, positions, tables, end, streams)
        except RecordingFailed as e:
            self.graphs, self.graphs_off = None, f"recording failed: {e}"
            print(f"dayzero: CUDA graphs off, {self.graphs_off}", file=sys.stderr)
            return None

    def _eager_cache(self, tables: list[dict], protect: list[int]) -> PagedBatchCache:
        """The cache of a step run eagerly, over the engine's device block tables: only what changed
        is uploaded (at 1M context a request's table is 8K blocks per group)."""
        return PagedBatchCache.of_slots(self.pools, self.tables, self.tables.update(tables), protect, self.device)

    def _forward(self, ids: list[int], starts: list[int], lengths: list[int], reqs: list[Request],
                 want: list[int]) -> tuple[torch.Tensor, torch.Tensor | None, PagedBatchCache | None]:
        """The step's forward: final streams of every row, fp32 logits of the `want` rows on the
        host, and the step's cache for the MTP draft (None: the step was replayed from a recorded
        graph, and so is the draft where a bucket holds it)."""
        tables = [self.kv.table(r.rid) for r in reqs]
        # every write of a step is at or after its start: protection matters only below it
        protect = [r.protect if r.protect > r.num_computed else 0 for r in reqs]
        end = max(a + n for a, n in zip(starts, lengths))
        if not any(protect):
            run = self._replayed(ids, [b for b, n in enumerate(lengths) for _ in range(n)],
                                 [p for a, n in zip(starts, lengths) for p in range(a, a + n)], tables, end)
            if run is not None:
                logits = run.logits[want].float().cpu() if want else None
                check_flags(run.flags)  # after the step's one synchronisation
                return run.X, logits, None
        cache = self._eager_cache(tables, protect)
        X = self.model.forward_packed(torch.tensor(ids, device=self.device), Batch(starts, lengths, cache, self.device))
        logits = self.model.logits(X[want], self.model.head_weight()).float().cpu() if want else None
        cache.check()  # after the step's first synchronisation: lookups outside held blocks are bugs
        return X, logits, cache

    def _sample(self, r: Request, s: Scheduled, logits, rows, last_row: int) -> None:
        last = logits[rows[last_row]]
        k = len(r.output_ids)  # index of the output token sampled next
        if s.verify_draft:
            target = logits[rows[last_row - 1]]
            self.drafts += 1
            ok, tok = verify_draft(target, r.draft, r.params, r.seed, k)
            r.num_computed += 1  # the last known token's position
            self._append(r, tok, target)
            if ok:
                self.accepted += 1
                if not r.finished:
                    r.num_computed += 1  # the draft's position holds the accepted token
                    self._append(r, sample(last, r.params, r.seed, k + 1), last)
            r.draft = None
            if self.drafts >= 16 and self.accepted < self.eargs.speculative_min_acceptance * self.drafts:
                self._disable_mtp()
        else:
            r.num_computed += s.num_new
            r.draft = None  # a draft the budget left out is stale after this step
            self._append(r, sample(last, r.params, r.seed, k), last)

    def _append(self, r: Request, tok: int, logits: torch.Tensor) -> None:
        r.output_ids.append(tok)
        self.tokens_generated += 1
        p = r.params
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

    def _draft(self, streams, mtp, cache: PagedBatchCache | None, reqs: list[Request]) -> None:
        seqs, starts, lengths, _, next_ids = mtp
        ends = torch.tensor(lengths).cumsum(0) - 1
        tables = [self.kv.table(r.rid) for r in reqs]  # not committed yet: the step's tables
        run = None if cache is not None else self._replayed(
            next_ids, [b for b, n in zip(seqs, lengths) for _ in range(n)],
            [p for a, n in zip(starts, lengths) for p in range(a, a + n)], tables,
            max(a + n for a, n in zip(starts, lengths)), streams)
        if run is not None:
            logits = run.logits[ends.to(self.device)].float().cpu()
            check_flags(run.flags)
        else:
            cache = cache or self._eager_cache(tables, [0] * len(reqs))
            batch = Batch(starts, lengths, cache, self.device, ids=seqs)  # the step's cache, some of its requests
            ids = torch.tensor(next_ids, device=self.device)
            mtp_block = self.model.mtp[0]
            X = mtp_block(streams, self.model.embed_tokens(ids), batch, ids)
            logits = mtp_block.logits(X[ends.to(self.device)], self.model.head_weight()).float().cpu()
            cache.check()
        for b, lg in zip(seqs, logits):
            r = reqs[b]
            # a draft only for decoding requests, where a step can still take two tokens
            if (r.num_computed == r.num_tokens - 1 and len(r.output_ids) + 2 <= r.params.max_tokens
                    and r.num_tokens + 2 <= r.max_len):
                r.draft = sample(lg, r.params, r.seed, len(r.output_ids))  # same noise as the target

    def _disable_mtp(self) -> None:
        self.spec_enabled = False
        for r in self.requests.values():
            r.draft = None
