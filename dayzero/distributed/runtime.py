"""Ranks over torch.distributed: process groups, starting local ranks, and the step loop of the
ranks that follow rank 0 (DESIGN.md "Scale-out").

Rank 0 runs everything a user sees (engine, scheduler, sampling, HTTP). Every call into the
workers (engine/worker.py) is first broadcast to the other ranks as one pickled object over a
gloo group (the CPU group beside an accelerator's NCCL/hccl/xccl group), then run on rank 0's own
worker; each rank's worker runs the same call on the same inputs, and the ranks meet in the
forward's collectives (distributed/comm.py). Nothing is sent back but what `gather` asks for.

Starting ranks: `LLM(..., tensor_parallel_size=N)` and `dayzero serve/generate
--tensor-parallel-size N` start N - 1 local processes (`python -m dayzero.distributed.spawned`)
that meet rank 0 at a TCPStore on 127.0.0.1. Under torchrun (WORLD_SIZE in the environment)
nothing is started: every process torchrun started runs the same command, rank 0 goes on and
the others follow it (`LLM(...)` does not return on them: they exit when rank 0 closes).

Failure: a rank that exits breaks the group; rank 0's next call (or the collective it waits in)
raises `RankFailed` naming the rank and its exit code, and the engine goes no further. Collectives
wait at most DAYZERO_DIST_TIMEOUT seconds (default 600) for a rank that neither answers nor dies.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

from dayzero.distributed.comm import GroupComm

BACKENDS = {"cuda": "nccl", "cpu": "gloo", "npu": "hccl", "xpu": "xccl"}


class RankFailed(RuntimeError):
    """Another rank exited or stopped answering; the group cannot compute any more steps."""


def backend_for(device: torch.device) -> str:
    """The collective backend of a device type: NCCL on CUDA (and ROCm, which torch calls cuda),
    gloo on CPUs, hccl (torch_npu) on Ascend, xccl on Intel GPUs."""
    try:
        return BACKENDS[device.type]
    except KeyError:
        raise ValueError(f"tensor_parallel_size > 1: no collective backend known for {device.type!r} devices "
                         f"(known: {', '.join(f'{k}: {v}' for k, v in BACKENDS.items())})") from None


def init_process_group(backend: str, **kwargs) -> None:
    """torch.distributed.init_process_group, with torch._dynamo imported first. Importing dynamo
    while a group exists leaves references to that group outside torch.distributed (measured on
    torch 2.13: ten, none visible to gc), so destroy_process_group then leaves the group and its gloo
    threads alive into interpreter exit, where a thread that drops its last collective's tensor
    needs the GIL and aborts the process ("terminate called without an active exception"; rank 0
    under torchrun, seen on a loaded 2-core machine). Imported before any group exists, it holds
    none, and destroy_process_group joins the threads."""
    import torch._dynamo  # noqa: F401
    import torch.distributed as dist
    dist.init_process_group(backend, **kwargs)


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("DAYZERO_DIST_TIMEOUT", "600")))


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world, local rank) when this process was started by torchrun (WORLD_SIZE and RANK set;
    a world of one included: one rank on the device's backend, how a single GPU checks NCCL)."""
    env = os.environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    world = int(env["WORLD_SIZE"])
    if world == 1 and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
        return None  # a world of one set by something other than a launcher: no group to join
    return int(env["RANK"]), world, int(env.get("LOCAL_RANK", "0"))


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of a rank: CPUs share the host; accelerator ranks take consecutive indices from
    the one given (cuda -> cuda:0, cuda:1, ...)."""
    if device.type == "cpu":
        return device
    dev = torch.device(device.type, (device.index or 0) + local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


class Group:
    """This process's membership: rank, world, device, the collectives the model calls (`comm`)
    and the CPU group step calls travel on. `procs`: the local ranks rank 0 started itself."""

    def __init__(self, rank: int, world: int, device: torch.device, procs: list | None = None):
        import torch.distributed as dist
        self.dist, self.rank, self.world, self.device = dist, rank, world, device
        self.procs = procs or []
        self.comm = GroupComm()
        self.cpu = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=_timeout())
        self.closed = False

    # ---- rank 0 ----------------------------------------------------------------------------
    def check(self) -> None:
        """RankFailed if a local rank rank 0 started has exited."""
        for i, p in enumerate(self.procs, start=1):
            code = p.poll()
            if code is not None:
                raise RankFailed(f"rank {i} of {self.world} exited with code {code}; the model cannot run without it")

    def send(self, msg: tuple) -> None:
        self.check()
        try:
            self.dist.broadcast_object_list([msg], src=0, group=self.cpu)
        except RuntimeError as e:
            self._failed(e)

    def _failed(self, e: Exception):
        time.sleep(0.2)  # a rank that died has usually been reaped by now: name it
        self.check()
        raise RankFailed(f"a collective with the other ranks failed: {e}") from e

    def start(self, spec) -> None:
        """Every other rank builds its worker from `spec` (engine/worker.py)."""
        self.send(("init", (spec,)))

    def runner(self, worker, data_parallel: bool = False):
        """Rank 0's runner: every call to every rank (`Broadcast`), or under DP-attention + EP
        each rank its own requests' rows (distributed/dp.py)."""
        if data_parallel:
            from dayzero.distributed.dp import DataParallel
            return DataParallel(self, worker)
        return Broadcast(self, worker)

    def each(self, worker, method: str, args: list[tuple]) -> list:
        """Run `method` on every rank's worker with that rank's own arguments (args[r], scattered
        from rank 0); rank 0 gets every rank's result, in rank order."""
        self.send(("each", (method,)))
        box, out = [None], [None] * self.world
        try:
            self.dist.scatter_object_list(box, args, src=0, group=self.cpu)
            mine = getattr(worker, method)(*box[0])
            self.dist.gather_object(mine, out, dst=0, group=self.cpu)
        except RuntimeError as e:
            self.check()  # a local rank that died: RankFailed naming it
            if isinstance(e, self.dist.DistError):
                self._failed(e)
            raise
        return out

    def gather(self, worker, method: str, *args) -> list:
        """Run `method` on every rank's worker; rank 0 gets every rank's result, in rank order."""
        self.send(("gather", (method, args)))
        out = [None] * self.world
        try:
            self.dist.gather_object(getattr(worker, method)(*args), out, dst=0, group=self.cpu)
        except RuntimeError as e:
            self._failed(e)
        return out

    def close(self, timeout: float = 30.0) -> None:
        """Stop every rank (rank 0's call): the followers leave their loop and exit."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.rank == 0:
                self.send(("stop", ()))
        except RankFailed:
            pass
        finally:
            deadline = time.monotonic() + timeout
            for p in self.procs:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
            try:
                self.dist.destroy_process_group()
            except Exception:  # a broken group may not tear down cleanly; the processes are gone
                pass

    # ---- ranks 1 .. N-1 ------------------------------------------------------------------------
    def recv(self) -> tuple:
        box = [None]
        self.dist.broadcast_object_list(box, src=0, group=self.cpu)
        return box[0]

    def follow(self, model) -> None:
        """The loop of a rank other than 0: run every call rank 0 sends until it says stop."""
        from dayzero.engine.worker import Worker
        worker = None
        while True:
            method, args = self.recv()
            if method == "stop":
                break
            if method == "init":
                worker = Worker(model, args[0], self.device)
            elif method == "gather":
                name, rest = args
                self.dist.gather_object(getattr(worker, name)(*rest), None, dst=0, group=self.cpu)
            elif method == "each":  # this rank's own arguments (DP-attention), its result back to rank 0
                box = [None]
                self.dist.scatter_object_list(box, None, src=0, group=self.cpu)
                self.dist.gather_object(getattr(worker, args[0])(*box[0]), None, dst=0, group=self.cpu)
            else:
                try:
                    getattr(worker, method)(*args)
                except Exception as e:  # rank 0 raised the same error from the same inputs
                    print(f"dayzero rank {self.rank}: {method} failed: {type(e).__name__}: {e}", file=sys.stderr)
        self.closed = True
        self.dist.destroy_process_group()


class Broadcast:
    """Rank 0's runner for N > 1 ranks: each call is sent to the other ranks, then run here."""

    def __init__(self, group: Group, worker):
        self.group, self.worker = group, worker

    def _call(self, method: str, *args):
        self.group.send((method, args))
        try:
            return getattr(self.worker, method)(*args)
        except RuntimeError as e:
            self.group.check()  # a local rank that died: RankFailed naming it
            if isinstance(e, self.group.dist.DistError):  # a collective broke (a rank gone or unreachable)
                self.group._failed(e)
            raise

    def forward(self, *args):
        return self._call("forward", *args)

    def draft(self, *args):
        return self._call("draft", *args)

    def dspark(self, *args):
        return self._call("dspark", *args)

    def score(self, *args):
        return self._call("score", *args)


def _threads(local_world: int) -> None:
    """CPU ranks on one host share its cores."""
    if local_world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def join(tp: int, device: torch.device, load: dict) -> Group | None:
    """This process's group of `tp` ranks (tensor_parallel_size x data_parallel_size; None for one
    rank without torchrun). Under torchrun: join the group torchrun set up (its world must be `tp`,
    one included). Otherwise, as rank 0: start tp - 1 local ranks that load the model with `load`
    (LLM's arguments) and meet here."""
    import torch.distributed as dist
    env = torchrun_env()
    if env is not None:
        rank, world, local = env
        if tp != world:
            raise ValueError(f"torchrun started {world} ranks: pass tensor_parallel_size x data_parallel_size = "
                             f"{world} (--tensor-parallel-size {world}, or --data-parallel-size {world} "
                             f"--enable-expert-parallel), got {tp}")
        dev = rank_device(device, local)
        if not dist.is_initialized():
            init_process_group(backend_for(dev), init_method="env://", timeout=_timeout())
        _threads(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        return Group(rank, world, dev)
    if tp == 1:
        return None
    if dist.is_initialized():
        raise ValueError("more than one rank: this process already belongs to a torch.distributed group; "
                         "close the other LLM first (llm.close())")
    backend = backend_for(device)
    store = dist.TCPStore("127.0.0.1", 0, tp, is_master=True, timeout=_timeout(), wait_for_workers=False)
    procs = []
    for r in range(1, tp):
        cmd = [sys.executable, "-m", "dayzero.distributed.spawned", "--rank", str(r), "--world", str(tp),
               "--port", str(store.port), "--device", str(device), "--load", json.dumps(load)]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))
    dev = rank_device(device, 0)
    try:
        init_process_group(backend, store=store, rank=0, world_size=tp, timeout=_timeout())
    except Exception:
        for p in procs:
            p.kill()
        raise
    _threads(tp)
    return Group(0, tp, dev, procs)


def _spawned(argv: list[str] | None = None) -> int:
    """Entry of a local rank started by `join`: meet rank 0, load this rank's slice, follow."""
    import torch.distributed as dist
    from dayzero.distributed.layout import Layout
    from dayzero.engine.llm import resolve_dtype
    from dayzero.loader.model_io import load_model
    p = argparse.ArgumentParser()
    for name in ("--rank", "--world", "--port"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--load", required=True)
    a = p.parse_args(argv)
    load = json.loads(a.load)
    dev = rank_device(torch.device(a.device), a.rank)
    store = dist.TCPStore("127.0.0.1", a.port, a.world, is_master=False, timeout=_timeout())
    init_process_group(backend_for(dev), store=store, rank=a.rank, world_size=a.world, timeout=_timeout())
    _threads(a.world)
    group = Group(a.rank, a.world, dev)
    layout = Layout(load["tp"], a.rank, load["ep"], load["dp"])
    if load.get("v41"):  # DeepSeek-V4.1 (v41/served.py)
        from dayzero.v41.served import load_served
        model = load_served(load["path"], resolve_dtype(load["dtype"]), dev, progress=False, layout=layout,
                            cpu_experts=load.get("cpu_experts", False), drafter=load.get("v41_drafter", False))
    else:
        model = load_model(load["path"], numerics=load["numerics"], dtype=resolve_dtype(load["dtype"]), device=dev,
                           progress=False, layout=layout, cpu_experts=load.get("cpu_experts", False),
                           drafter=load.get("drafter"))
    model.set_comm(group.comm)
    group.follow(model)
    return 0
