"""What one rank runs for a step (DESIGN.md seam 4): the model (or this rank's slice of it), its op
table, the cache pools and the device block tables. A worker makes no policy decision: the
engine on rank 0 schedules, samples and keeps the block lists, and hands every rank the same
step inputs (token ids, positions, block tables, which rows to score). One rank is the N = 1
case: the engine calls its own worker directly; with N > 1 ranks each call first goes to the
other ranks (distributed/runtime.py), whose workers run the same call and meet in the forward's
collectives. Under DP-attention + EP (distributed/dp.py) each rank's call carries only its own
requests' rows, and a rank with none joins the MoE collectives alone (`Transformer.idle`).

Calls: `forward` (a step: final streams kept for the step's draft, fp32 logits of the rows asked
for returned on the host), `draft` (the MTP block over the last forward's streams), `dspark`
(DSpark's context rows and draft blocks after the last forward), `score` (one full forward of the
reference, no cache).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dayzero.cache.paged import CachePools, DeviceTables, PagedBatchCache, check_flags
from dayzero.cache.spec import GroupSpec
from dayzero.engine.capacity import Memory, probe, tensor_spans
from dayzero.engine.graphs import RecordingFailed, StepGraphs, table_blocks, unsupported
from dayzero.ops import for_device
from dayzero.ops.experts import PerExpert
from dayzero.reference.model import Transformer
from dayzero.reference.seqcache import Batch


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to set up its model: rank 0 decides it and every rank receives it."""
    ops: str | None
    prepare_weights: bool  # keep dequantised / cast copies where the op table has no kernel for a format
    cpu_experts: bool = False  # hybrid placement: routed experts in host memory on the CPU's op table
    capture: bool = False  # DSpark: forwards keep the target layers' outputs (`Worker.set_capture`)


@dataclass(frozen=True)
class PoolSpec:
    """The cache every rank allocates once the weights are in place (`Worker.allocate`): rank 0
    sizes it from every rank's free memory (engine/capacity.py) and every rank gets the same."""
    groups: tuple[GroupSpec, ...]
    num_blocks: dict
    block_size: int
    max_num_seqs: int
    max_tokens_per_step: int  # the recorded steps' token slots (decode batch, x2 with MTP drafts)
    enforce_eager: bool


class Worker:
    def __init__(self, model: Transformer, spec: WorkerSpec, device: torch.device):
        self.model, self.spec, self.device = model, spec, device
        self.ops = for_device(device, spec.ops)  # the dispatch decision, once per rank
        self.host_ops = None
        if spec.cpu_experts:  # hybrid placement: the routed experts on the CPU's own table
            self.host_ops = host_table(model)
        model.set_ops(self.ops)
        if spec.prepare_weights and getattr(model, "prepares_weights", True):
            from dayzero.loader.model_io import keep_dequantized
            # no FP8/FP4 kernels: dequantise small models once; with them, only cast dense weights
            kernels = self.ops.kernels
            keep_dequantized(model, dense_only="fp8_linear" in kernels, fp32_kernel="fp32_linear" in kernels,
                             host_experts=self.host_ops is not None)
        self.pools: CachePools | None = None  # allocate()
        self.tables: DeviceTables | None = None
        self.pool_spec: PoolSpec | None = None
        self.graphs: StepGraphs | None = None
        self.graphs_off = "no cache allocated yet"
        self._last: tuple[torch.Tensor, PagedBatchCache | None] | None = None  # the last forward's streams, cache
        self.capture = spec.capture
        self.captured: dict[int, torch.Tensor] | None = None

    def set_capture(self, on: bool) -> None:
        """DSpark: keep the target layers' outputs of each forward, eager or replayed (its drafter
        reads them). Off when speculation stops."""
        self.capture = on
        if not on:
            self.captured = None

    def memory(self) -> Memory | None:
        """The memory free for the cache on this rank, its weights in place (engine/capacity.py)."""
        experts = [t for m in self.model.modules() for g in m.__dict__.get("_stacked", ())
                   if isinstance(g, PerExpert) for t in g.tensors]
        return probe(self.device, tensor_spans(self._tensors()), self.model.layout.world, tensor_spans(experts))

    def allocate(self, spec: PoolSpec) -> None:
        """The cache pools, the device block tables and (CUDA) the recorded steps."""
        model, device = self.model, self.device
        self.pool_spec = spec
        self.pools = CachePools(list(spec.groups), spec.num_blocks, model.compute_dtype, device)
        # every step's block tables, kept on the device (one slot per running request + padding):
        # a step uploads what changed (cache/paged.py); recorded steps read them at fixed addresses
        self.tables = DeviceTables(self.pools, spec.max_num_seqs + 1,
                                   table_blocks(model.args.max_seq_len, spec.block_size), device)
        self.graphs_off = "enforce_eager" if spec.enforce_eager else "not a CUDA device"
        if device.type == "cuda" and not spec.enforce_eager:
            self.graphs_off = ("more than one rank: steps with collectives are not recorded"
                               if model.layout.world > 1 else graphs_unsupported(model))
            if self.graphs_off is None:
                self.use_graphs("cuda")

    def use_graphs(self, backend: str) -> None:
        """Replay decode steps from recorded graphs (engine/graphs.py): "cuda" on a GPU; "trace"
        records aten ops on any device (how the CPU tests check replayed steps)."""
        why = getattr(self.model, "graphs_unsupported", None)
        if why:
            raise ValueError(f"recorded steps ({backend}): {why}")
        s = self.pool_spec
        self.graphs = StepGraphs(self.model, self.pools, s.max_num_seqs, s.max_tokens_per_step, s.block_size,
                                 self.model.args.max_seq_len, self.device, backend, self.tables, self.capture)
        self.graphs_off = None

    def _replayed(self, ids, seq, positions, tables, end, streams=None):
        """The step (or MTP draft forward) replayed from its recorded graph; None where graphs
        are off or no bucket holds it. A capture that fails turns graphs off for good (the step
        then runs eagerly: its warm-up's writes are what the eager step writes again)."""
        if self.graphs is None:
            return None
        try:
            return self.graphs.run(ids, seq, positions, tables, end, streams)
        except RecordingFailed as e:
            import sys
            self.graphs, self.graphs_off = None, f"recording failed: {e}"
            print(f"dayzero: CUDA graphs off, {self.graphs_off}", file=sys.stderr)
            return None

    def _eager_cache(self, tables: list[dict], protect: list[int]) -> PagedBatchCache:
        """The cache of a step run eagerly, over the device block tables: only what changed is
        uploaded (at 1M context a request's table is 8K blocks per group)."""
        return PagedBatchCache.of_slots(self.pools, self.tables, self.tables.update(tables), protect, self.device)

    def forward(self, ids: list[int], starts: list[int], lengths: list[int], tables: list[dict],
                protect: list[int], want: list[int], counts: list[int] | None = None,
                floors: list[int] | None = None) -> torch.Tensor | None:
        """One step: sequence b's tokens ids[sum(lengths[:b]):][:lengths[b]] at positions
        starts[b].., reading and writing the blocks tables[b]; writes below protect[b] (a
        prefix-cache hit) are filtered. Returns fp32 logits of the `want` rows on the host (None
        if none); the final streams stay here for `draft`. Under DP-attention + EP a rank given no
        sequences this step (an idle rank) joins the MoE layers' collectives and returns None;
        `counts`: every rank's rows this step (rank 0 sends them, so no MoE layer gathers them).
        `floors` (DeepSeek-V4.1 bounded replay): each sequence's replay floor, passed to the model."""
        with self.model.group_comm.counted(counts):
            return self._forward(ids, starts, lengths, tables, protect, want, floors)

    def draft(self, rows: list[int], seqs: list[int], starts: list[int], lengths: list[int], next_ids: list[int],
              tables: list[dict], counts: list[int] | None = None) -> torch.Tensor:
        """The MTP block over the last forward's final streams at `rows` (sequence seqs[i] of that
        step, positions starts[i] .. + lengths[i]) and the tokens after them -> fp32 logits of each
        sequence's last row, on the host. Reads the step's block tables (before its commits).
        No rows (a DP-attention rank with nothing to draft): the MTP block's collectives only.
        `counts`: every rank's draft rows (as `forward`'s)."""
        with self.model.group_comm.counted(counts):
            return self._draft(rows, seqs, starts, lengths, next_ids, tables)

    def dspark(self, rows: list[int], seqs: list[int], starts: list[int], lengths: list[int], tables: list[dict],
               blocks: list[tuple], k: int, threshold: float, counts: list[int] | None = None
               ) -> list[tuple[list[int], list[float]]]:
        """DSpark after the last forward: its context rows, then the draft blocks and their
        tokens (engine/dspark_drafter.py `dspark_step`), on the step's cache (`tables`: its block
        tables, before its commits). `counts`: every rank's block rows (DP-attention, as `forward`'s)."""
        from dayzero.engine.dspark_drafter import dspark_step
        with self.model.group_comm.counted(counts):
            return dspark_step(self, rows, seqs, starts, lengths, tables, blocks, k, threshold, counts)

    def score(self, ids: list[int], keep: bool = True, counts: list[int] | None = None) -> torch.Tensor | None:
        """Next-token logits at every position of one sequence: [len, vocab] fp32 on the host
        (None with `keep` False: a DP-attention rank computing a copy only for the collectives)."""
        with self.model.group_comm.counted(counts):
            return self._score(ids, keep)

    @torch.no_grad()
    def _forward(self, ids, starts, lengths, tables, protect, want, floors=None):
        self._last = self.captured = None
        if not lengths:
            self.model.idle()
            return None
        end = max(a + n for a, n in zip(starts, lengths))
        replay = {} if floors is None else {"replay_from": floors}
        if not any(protect) and not replay:
            run = self._replayed(ids, [b for b, n in enumerate(lengths) for _ in range(n)],
                                 [p for a, n in zip(starts, lengths) for p in range(a, a + n)], tables, end)
            if run is not None:
                logits = run.logits[want].float().cpu() if want else None
                check_flags(run.flags)  # after the step's one synchronisation
                self._last = (run.X, None)
                self.captured = run.captured if self.capture else None  # DSpark: its buffers, read before the next step
                return logits
        cache = self._eager_cache(tables, protect)
        captured = {} if self.capture else None
        X = self.model.forward_packed(torch.tensor(ids, device=self.device), Batch(starts, lengths, cache, self.device),
                                      captured, **replay)
        rows = X if len(want) == X.shape[0] and want == list(range(len(want))) else X[want]  # decode: every row
        logits = self.model.logits(rows, self.model.head_weight()).float().cpu() if want else None
        if replay and want and logits.isnan().any():  # a row below a floor (not computed) is never sampled
            raise RuntimeError(f"bounded replay: a sampled row is below its sequence's replay floor {floors}")
        cache.check()  # after the step's first synchronisation: lookups outside held blocks are bugs
        self._last, self.captured = (X, cache), captured
        return logits

    @torch.no_grad()
    def _draft(self, rows, seqs, starts, lengths, next_ids, tables):
        if not rows:
            self.model.idle(mtp=True)
            return None
        X, cache = self._last
        streams = X[rows]
        ends = torch.tensor(lengths).cumsum(0) - 1
        run = None if cache is not None else self._replayed(
            next_ids, [b for b, n in zip(seqs, lengths) for _ in range(n)],
            [p for a, n in zip(starts, lengths) for p in range(a, a + n)], tables,
            max(a + n for a, n in zip(starts, lengths)), streams)
        if run is not None:
            logits = run.logits[ends.to(self.device)].float().cpu()
            check_flags(run.flags)
            return logits
        cache = cache or self._eager_cache(tables, [0] * len(tables))
        batch = Batch(starts, lengths, cache, self.device, ids=seqs)  # the step's cache, some of its requests
        ids = torch.tensor(next_ids, device=self.device)
        mtp_block = self.model.mtp[0]
        X = mtp_block(streams, self.model.embed_tokens(ids), batch, ids)
        logits = mtp_block.logits(X[ends.to(self.device)], self.model.head_weight()).float().cpu()
        cache.check()
        return logits

    @torch.no_grad()
    def _score(self, ids, keep):
        logits = self.model(torch.tensor([ids], device=self.device))[0]
        return logits.float().cpu() if keep else None

    def _tensors(self) -> list[torch.Tensor]:
        """Model tensors: parameters, buffers and the copies modules keep (dequantised, fused, stacked)."""
        return _module_tensors(self.model)

    def nbytes(self) -> dict:
        """This rank's bytes: model tensors (a view of another tensor's memory counted once) and
        cache pools: the window and compressor rows (`cache_rows_bytes`) and the compressed
        entries (`cache_entries_bytes`)."""
        tensors = self._tensors()
        hosted = set()
        if self.host_ops is not None:  # hybrid placement: the routed experts' bytes, in host memory
            hosted = {id(t) for m in self.model.modules() if m.__dict__.get("_host_ops") is not None
                      for t in _module_tensors(m.experts)}
        host = sum(hi - lo for lo, hi in tensor_spans([t for t in tensors if id(t) in hosted]))
        weights = sum(hi - lo for lo, hi in tensor_spans([t for t in tensors if id(t) not in hosted]))
        out = {"weight_bytes": weights, "host_expert_bytes": host, "kv_cache_bytes": 0, "cache_rows_bytes": 0,
               "cache_entries_bytes": 0}
        if self.pools is not None:
            out["kv_cache_bytes"] = self.pools.nbytes()
            for (group, _), t in self.pools.tensors.items():
                key = "cache_entries_bytes" if self.pools.groups[group].keep == "all" else "cache_rows_bytes"
                out[key] += t.numel() * t.element_size()
        return out


def _module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """A module's parameters, buffers and the tensors its modules keep (dequantised, fused, stacked)."""
    tensors = list(module.parameters()) + list(module.buffers())
    for m in module.modules():
        for v in m.__dict__.values():
            vs = v if isinstance(v, (tuple, list)) else (v,)
            tensors += [t for t in vs if isinstance(t, torch.Tensor)]
    return tensors


def graphs_unsupported(model) -> str | None:
    """Why `model`'s steps cannot be recorded: its own reason (DeepSeek-V4.1), else graphs.py's."""
    return getattr(model, "graphs_unsupported", None) or unsupported(model)


def host_table(model: Transformer):
    """Hybrid placement (`cpu_experts`): the CPU's op table (the native kernels where they build,
    else the twins), installed for every MoE layer's routed experts, whose weights must be in host
    memory (`load_model(..., cpu_experts=True)` leaves them there)."""
    for name, t in model.state_dict().items():
        if ".ffn.experts." in name and t.device.type != "cpu":
            raise ValueError(f"cpu_experts: routed expert tensor {name!r} is on {t.device}, not in host memory; "
                             "load the model with load_model(..., cpu_experts=True) (LLM and `dayzero serve` do)")
    table = for_device("cpu")
    if not model.host_experts(table):
        raise ValueError("cpu_experts: this model has no MoE layer (no routed experts to place in host memory)")
    return table
