"""Engine steps as recorded graphs: CUDA graphs on GPUs, a traced op list on any device (tests).

An eager step launches every op of every layer from Python (about a hundred per layer); at batch
1 on a GPU that launch time exceeds the step's memory time. A graph records the step once and
replays it with one launch. Replay re-runs no Python, so a recorded step must read everything
that changes from device buffers and must not synchronise with the host:

- `StaticBatch` (reference/seqcache.py) gives the model shapes fixed by the bucket alone: N token
  slots (padding slots belong to a sequence whose blocks are all the trash block), compressed
  entries looked up over the bucket's context capacity C (unusable ones masked), and every token
  pooling the entry its compression window would close (written only where it does close).
- `PagedBatchCache.over` reads block tables from `DeviceTables`, which keep every running request's
  table on the device in a slot of its own and upload only what changed since the last step.
- the op table must be `capturable` (Triton's is; the twins' moe_experts reads the expert ids
  back to the host) and the routed experts stacked for the grouped kernel.

Buckets, four per octave (`bucket_size`: 1, 2, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, ...), so padding
costs at most a quarter: N token slots up to `max_tokens` (the decode batch: max_num_seqs tokens,
twice with MTP drafts); C = block_size * that many blocks, covering the step's rows and block
tables, at most the model's context rounded up to a block (a 1M-token context records C = 1M +
one block). A bucket is recorded the first time a step needs it (the first step of each size
pays the capture); every bucket shares one memory pool. A step runs eagerly when it has more
tokens than the largest bucket (prefill chunks), when it writes below a prefix-cache hit (the
protected prefix needs a host-side filter), or when graphs are off. The MTP block's forward after
a replayed step is recorded the same way, in buckets of its own (its input streams, the step's
final streams at the drafted positions, are one more buffer). With DSpark (`capture`) a model
step also leaves the target layers' outputs in buffers; the drafter's stages run eagerly after it.

Backends: "cuda" (torch.cuda.CUDAGraph; warm-up on a side stream, capture, replay), and "trace"
(`OpRecorder`: the step's aten ops recorded once, with their arguments, and replayed op by op,
Python not re-run, while the recording rejects what capture forbids). "trace" is how the CPU test
suite proves that a replayed step computes what the eager step computes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dayzero.cache.paged import CachePools, DeviceTables, PagedBatchCache
from dayzero.reference.seqcache import StaticBatch

BACKENDS = ("cuda", "trace")

_aten = torch.ops.aten
# ops that read tensor data back to the host or size their output from it
_SYNCING = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten._unique2.default,
            _aten.unique_dim.default, _aten.unique_consecutive.default, _aten.masked_select.default,
            _aten.lift_fresh.default}
_MASKABLE = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default}


class RecordingFailed(RuntimeError):
    """A bucket's CUDA graph could not be captured (the step ran, eagerly, in its warm-up)."""


class HostSync(RuntimeError):
    """A recorded step would read device data on the host, size a tensor from it, or bake host
    values into the recording."""


class OpRecorder(TorchDispatchMode):
    """Records every aten op run under it (after autograd, as kernels would launch) and raises
    HostSync on what a CUDA graph cannot record: host reads of device data (.item(), bool(t),
    .tolist(), .numpy()), ops whose output shape depends on data (nonzero, unique, boolean
    masks) and tensors built from host values (torch.tensor: on a GPU an upload).
    `replay` re-runs the recorded ops, Python not re-run: every tensor no recorded op made (input
    buffers, weights, cache pools, device constants) is read as it is then, as a graph reads its
    fixed addresses. Not thread-safe (it patches Tensor.tolist/.numpy while active); it keeps
    every intermediate of the recorded step alive (a test backend, for small models)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNCING:
            what = "a tensor built from host values (torch.tensor)" if func is _aten.lift_fresh.default else func
            raise HostSync(f"{what} inside a recorded step")
        if func in _MASKABLE and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ()):
            raise HostSync(f"{func} with a boolean mask (its shape comes from the data) inside a recorded step")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out

    def __enter__(self):
        self._saved = {n: getattr(torch.Tensor, n) for n in ("tolist", "numpy")}
        for n in self._saved:
            setattr(torch.Tensor, n, _refuse(n))
        return super().__enter__()

    def __exit__(self, *exc):
        for n, f in self._saved.items():
            setattr(torch.Tensor, n, f)
        return super().__exit__(*exc)

    def replay(self, recorded_outputs):
        """Run the recording again; returns `recorded_outputs` (a tensor, or a list or tuple of
        tensors and lists of them, that the recorded step returned) as this run computed them."""
        env: dict[int, torch.Tensor] = {}

        def sub(x):  # aten arguments nest one level at most (Tensor[] lists)
            if isinstance(x, torch.Tensor):
                return env.get(id(x), x)
            if isinstance(x, (list, tuple)):
                return type(x)(sub(y) for y in x)
            return x

        for func, args, kwargs, out in self.ops:
            new = func(*[sub(a) for a in args], **{k: sub(v) for k, v in kwargs.items()})
            if isinstance(out, torch.Tensor):
                env[id(out)] = new
            elif isinstance(out, (list, tuple)):
                for r, t in zip(out, new):
                    if isinstance(r, torch.Tensor):
                        env[id(r)] = t
        return sub(recorded_outputs)


def _refuse(name):
    def refuse(self, *a, **k):
        raise HostSync(f"Tensor.{name}() inside a recorded step")
    return refuse


def bucket_size(n: int) -> int:
    """The smallest of 1, 2, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, ... (four steps per octave) >= n."""
    if n <= 4:
        return 1 << max(n - 1, 0).bit_length()
    step = 1 << ((n - 1).bit_length() - 3)
    return -(-n // step) * step


@dataclass
class _Graph:
    """One bucket: its input buffers, the recording and where the recording leaves its outputs."""
    tokens: torch.Tensor  # [3, N]: token ids, sequence slots, positions
    capacity: int
    streams: torch.Tensor | None = None  # [N, hc, dim]: the MTP forward's input (None: a model step)
    recording: object = None
    X: torch.Tensor | None = None  # [N, hc, dim] final streams
    logits: torch.Tensor | None = None  # [N, vocab] fp32
    flags: list = field(default_factory=list)  # (group, device bool) of the step's lookups
    captured: dict | None = None  # DSpark: {target layer: [N, dim] its output averaged over hc}
    replays: int = 0


class StepGraphs:
    """Recorded forward + LM head of engine steps (and of the MTP drafts after them), per bucket
    (token slots, context capacity).
    `run` fills a bucket's buffers, records it the first time, replays it otherwise, and returns
    the bucket (X, logits and flags hold this step's results until the next `run`)."""

    def __init__(self, model, pools: CachePools, max_seqs: int, max_tokens: int, block_size: int,
                 max_len: int, device: torch.device, backend: str, tables: DeviceTables | None = None,
                 capture: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f"graph backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "cuda" and torch.device(device).type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        reason = unsupported(model)
        if reason:
            raise ValueError(f"this model's steps cannot be recorded: {reason}")
        self.model, self.pools, self.device, self.backend = model, pools, torch.device(device), backend
        # DSpark: model steps also leave the target layers' outputs (the drafter's input) in buffers
        self.targets = tuple(model.args.dspark_target_layer_ids) if capture else ()
        self.slots = max_seqs + 1  # one table row per request slot, the last for padding
        self.max_tokens, self.bs = bucket_size(max_tokens), block_size
        self.max_capacity = block_size * table_blocks(max_len, block_size)
        self.graphs: dict[tuple[str, int, int], _Graph] = {}  # ("step" | "mtp", N, C)
        width = self.max_capacity // block_size
        if tables is not None and (tables.slots, tables.width) != (self.slots, width):
            raise ValueError(f"device tables of {tables.slots} slots x {tables.width} blocks, the steps need "
                             f"{self.slots} x {width}")
        self.tables = tables or DeviceTables(pools, self.slots, width, self.device)  # the engine's: shared
        self._pool = torch.cuda.graph_pool_handle() if backend == "cuda" else None

    def bucket(self, n_tokens: int, rows: int) -> tuple[int, int] | None:
        """(token slots, context capacity) of a step with n_tokens that addresses positions below
        `rows` (tokens, MTP's row past them, the blocks its tables hold); None when no bucket
        holds it."""
        if n_tokens > self.max_tokens or rows > self.max_capacity:
            return None
        return bucket_size(n_tokens), min(self.bs * bucket_size(math.ceil(rows / self.bs)), self.max_capacity)

    def rows(self, tables: list[dict], end: int) -> int:
        """Positions a step addresses: its context end (+ MTP's row) and every block its tables hold."""
        return max(end + 1, self.bs * max(len(col) for t in tables for col in t.values()))

    def stats(self) -> dict:
        return {"backend": self.backend, "recorded": len(self.graphs),
                "replays": sum(g.replays for g in self.graphs.values()),
                "buckets": sorted(self.graphs)}

    def run(self, ids: list[int], seq: list[int], positions: list[int], tables: list[dict], end: int,
            streams: torch.Tensor | None = None) -> _Graph | None:
        """One step: token ids, the index in `tables` of each one's request, their positions;
        the requests' block tables; the step's context end (checked by the model). With
        `streams` ([n, hc, dim], the model's final streams at those positions; ids: the tokens
        after them) the MTP block's forward + head instead of the model's. None (nothing run)
        when no bucket holds the step."""
        size = self.bucket(len(ids), self.rows(tables, end))
        if size is None:
            return None
        N, C = size
        key = ("step" if streams is None else "mtp", N, C)
        g = self.graphs.get(key)
        new = g is None
        if new:
            dev = self.device
            g = _Graph(tokens=torch.zeros(3, N, dtype=torch.long, device=dev), capacity=C,
                       streams=None if streams is None else streams.new_zeros((N, *streams.shape[1:])))
        pad = N - len(ids)
        if streams is not None:
            g.streams[:len(ids)].copy_(streams)
            g.streams[len(ids):].zero_()
        slot = self.tables.update(tables)
        g.tokens.copy_(torch.tensor([ids + [0] * pad, [slot[b] for b in seq] + [self.slots - 1] * pad,
                                     positions + [0] * pad]))
        if new:
            try:
                self._record(g, end)
            except Exception as e:
                if self.backend != "cuda":
                    raise
                raise RecordingFailed(f"bucket {key}: {type(e).__name__}: {e}") from e
            self.graphs[key] = g
        else:
            self._replay(g)
            g.replays += 1
        return g

    # ---- recording -------------------------------------------------------------------------
    def _forward(self, g: _Graph, end: int):
        cache = PagedBatchCache.over(self.pools, self.tables.tensors, self.tables.live)
        batch = StaticBatch(g.tokens[1], g.tokens[2], g.capacity, self.slots - 1, cache, end)
        ids, head = g.tokens[0], self.model.head_weight()
        if g.streams is None:
            captured = {} if self.targets else None
            X = self.model.forward_packed(ids, batch, captured)
            return X, self.model.logits(X, head), cache.flags(), tuple(captured[i] for i in self.targets)
        mtp = self.model.mtp[0]
        X = mtp(g.streams, self.model.embed_tokens(ids), batch, ids)
        return X, mtp.logits(X, head), cache.flags(), ()

    @torch.no_grad()
    def _record(self, g: _Graph, end: int) -> None:
        if self.backend == "cuda":
            cur = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(cur)
            with torch.cuda.stream(side):  # warm-up: compiles kernels, settles the allocator
                self._forward(g, end)
            cur.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._keep(g, self._forward(g, end))
            g.recording = graph
            graph.replay()  # capture records without computing: this step's results
            return
        rec = OpRecorder()
        # runs the step for real while recording it. Factory calls that name no device make meta
        # tensors here, which fail against the step's own: on a GPU they would be host tensors,
        # whose uploads a CUDA capture refuses (or records from a stale host buffer).
        with rec, torch.device("meta"):
            outputs = self._forward(g, end)
        g.recording = (rec, outputs)
        self._keep(g, outputs)

    def _keep(self, g: _Graph, outputs) -> None:
        g.X, g.logits, g.flags, captured = outputs
        g.captured = dict(zip(self.targets, captured)) if self.targets and g.streams is None else None

    def _replay(self, g: _Graph) -> None:
        if self.backend == "cuda":
            g.recording.replay()
            return
        rec, outputs = g.recording  # the buffers were refilled in place
        self._keep(g, rec.replay(outputs))


def table_blocks(max_len: int, block_size: int) -> int:
    """Blocks a request's table can reach: its context, plus the step's token and MTP's row past it."""
    return math.ceil((max_len + 2) / block_size)


def unsupported(model) -> str | None:
    """Why a model's steps cannot be recorded (None: they can)."""
    ops = model.ops
    if any(m.__dict__.get("_host_ops") is not None for m in model.modules()):
        return "routed experts in host memory (cpu_experts): a step waits on the CPU's experts"
    if not ops.capturable:
        return f"op table {ops.name!r} is not capturable (its moe_experts reads expert ids on the host)"
    for m in model.modules():
        if hasattr(m, "stack_experts") and "_stacked" not in m.__dict__:
            return "routed experts are not FP4 (the per-expert loop reads expert ids on the host)"
    return None
