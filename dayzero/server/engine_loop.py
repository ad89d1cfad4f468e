"""One thread owns the (synchronous, single-threaded) engine; asyncio handlers talk to it by queues.

Handlers put ("add", ...) and ("abort", rid) commands in the inbox; the thread applies them between
steps, runs `engine.step()` while there is work, and hands each request's new tokens to that
request's asyncio queue with `call_soon_threadsafe`. Nothing else touches the engine.
"""
from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import traceback
from dataclasses import dataclass, field

from dayzero.distributed.runtime import RankFailed
from dayzero.engine.sampling import SamplingParams


@dataclass
class Delta:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # set on the last delta of a request
    error: str | None = None

    @property
    def last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Overloaded(Exception):
    pass


class EngineDead(Exception):
    pass


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    sent: int = 0


class EngineLoop:
    def __init__(self, engine, max_in_flight: int):
        self.engine = engine
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # touched only from the event loop
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # touched only from the engine thread
        self._stop = threading.Event()
        self.error: str | None = None  # set when the thread died
        self.stats: dict = engine.stats()  # a snapshot the thread refreshes; read by /metrics
        self._thread = threading.Thread(target=self._run, name="dayzero-engine", daemon=True)
        self.on_dead = None  # called (from the engine thread) when the loop dies: `serve` shuts the server down

    # ---- event-loop side --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def reserve(self) -> None:
        """Claim an in-flight slot (call before the request's work starts); raises Overloaded / EngineDead."""
        if not self.alive:
            raise EngineDead(self.error or "the engine loop is not running")
        if self.in_flight >= self.max_in_flight:
            raise Overloaded(f"{self.in_flight} requests in flight (limit {self.max_in_flight})")
        self.in_flight += 1

    def unreserve(self) -> None:
        self.in_flight -= 1

    async def generate(self, rid: str, prompt_ids: list[int], params: SamplingParams):
        """Yield Deltas until the last one. Leaving early (cancelled, client gone) aborts the request."""
        q: asyncio.Queue = asyncio.Queue()
        self._inbox.put(("add", rid, prompt_ids, params, asyncio.get_running_loop(), q))
        done = False
        try:
            while True:
                d = await q.get()
                done = d.last
                yield d
                if done:
                    return
        finally:
            if not done:
                self._inbox.put(("abort", rid))

    # ---- engine thread ----------------------------------------------------------------------------
    def _push(self, rid: str, d: Delta) -> None:
        s = self._streams.get(rid)
        if s is None:
            return
        if d.last:
            del self._streams[rid]
        try:
            s.loop.call_soon_threadsafe(s.queue.put_nowait, d)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _apply(self, cmd) -> None:
        if cmd[0] == "add":
            _, rid, ids, params, loop, q = cmd
            self._streams[rid] = _Stream(loop, q)
            try:
                self.engine.add_request(rid, ids, params)
            except ValueError as e:
                self._push(rid, Delta(error=str(e)))
        elif cmd[0] == "abort":
            rid = cmd[1]
            self._streams.pop(rid, None)
            self.engine.abort(rid)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                busy = self.engine.has_unfinished()
                try:
                    cmd = self._inbox.get_nowait() if busy else self._inbox.get(timeout=0.5)
                    while True:
                        self._apply(cmd)
                        cmd = self._inbox.get_nowait()
                except queue.Empty:
                    pass
                if self.engine.has_unfinished():
                    self._step()
                self.stats = self.engine.stats()
        except BaseException:  # noqa: BLE001 - record why, answer everyone, then stop
            self.error = "engine loop crashed: " + traceback.format_exc(limit=3).strip().splitlines()[-1]
            for rid in list(self._streams):
                self._push(rid, Delta(error=self.error))
            if self.on_dead is not None:
                self.on_dead()
            raise

    def _step(self) -> None:
        try:
            touched = self.engine.step()
        except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
            msg = f"engine step failed: {type(e).__name__}: {e}"
            for rid in list(self._streams):
                self.engine.abort(rid)
                self._push(rid, Delta(error=msg))
            if isinstance(e, RankFailed):  # ...unless a rank is gone: no step can run any more
                raise
            return
        for r in touched:
            s = self._streams.get(r.rid)
            if s is None:
                continue
            n = len(r.output_ids)
            d = Delta(token_ids=r.output_ids[s.sent:n],
                      logprobs=None if r.logprobs is None else r.logprobs[s.sent:n])
            s.sent = n
            if r.finished:
                d.finish_reason = r.finish_reason or "abort"
                d.error = r.error
                self.engine.release(r.rid)
            if d.token_ids or d.last:
                self._push(r.rid, d)


async def finished_or_left(task: "asyncio.Task", request) -> bool:
    """Wait for a non-streamed request's generation `task`, polling the client every 0.25 s: True
    when it finished (its result or exception is the caller's), False when the client left first
    (the task is cancelled, which aborts the request and frees its cache at once)."""
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False
    return True
