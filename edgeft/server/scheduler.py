"""The worker thread that owns the Engine, and the bounded queue in front of it.

One worker thread runs one request at a time (llama.cpp is blocking and the context is
single-sequence); the event loop only parses, queues and streams. Waiting requests sit in a
bounded queue (full -> 503); the worker prefers a waiting request for the adapter set that is
already applied, so its prompt prefix is reused instead of recomputed, but never skips a request
more than `AFFINITY_SKIPS` times. Answers do not depend on the order: the engine clears its KV
cache on every change of adapter set, so greedy output equals `edgeft run`'s.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..errors import EdgeftError
from .errors import ApiError, _from_edgeft, _internal, _shutting_down

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger(__name__)

AFFINITY_SKIPS = 4          # most times a waiting request may be passed over for a same-adapter one


class Job:
    """One unit of engine work. `fn(engine, job)` runs on the worker thread and reports through
    `emit`, which hands (kind, payload) events to the request's coroutine on the event loop."""

    def __init__(self, fn: Callable[[Engine, "Job"], None], *, key: Any = None, stream: bool = False):
        self.fn = fn
        self.key = key
        self.stream = stream
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.enqueued = time.perf_counter()
        self.started = 0.0
        self.skipped = 0

    def emit(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (shutdown)
            self.cancelled.set()


@dataclass
class Counters:
    served: int = 0
    cancelled: int = 0
    rejected: int = 0
    errors: int = 0
    busy_s: float = 0.0


class Worker:
    def __init__(self, engine: Engine, queue_size: int):
        self.engine = engine
        self.queue_size = queue_size
        self.counters = Counters()
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._current: Job | None = None
        self._last_key: Any = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edgeft-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._current is not None

    @property
    def queued(self) -> int:
        return len(self._pending)

    def count(self, what: str) -> None:
        with self._cond:
            setattr(self.counters, what, getattr(self.counters, what) + 1)

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stopping:
                raise _shutting_down()
            if len(self._pending) >= self.queue_size:
                self.counters.rejected += 1
                raise ApiError(503, f"the server is busy ({len(self._pending)} requests waiting); retry shortly",
                               type="server_error", code="server_overloaded", headers={"Retry-After": "1"})
            self._pending.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a waiting job, or make a running one stop at its next token."""
        if job.cancelled.is_set():
            return
        job.cancelled.set()
        with self._cond:
            try:
                self._pending.remove(job)
                self.counters.cancelled += 1
            except ValueError:
                pass

    def drain(self) -> None:
        """Take no more work; waiting and running jobs end now with a 503 'shutting down'."""
        with self._cond:
            self._stopping = True
            jobs = list(self._pending) + ([self._current] if self._current is not None else [])
            self._pending = deque()
            self._cond.notify_all()
        for job in jobs:
            if not job.cancelled.is_set():
                job.cancelled.set()
                job.emit("error", _shutting_down())

    def stop(self, timeout: float = 30.0) -> None:
        self.drain()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _pick(self) -> Job:
        head = self._pending[0]
        if self._last_key is not None and head.key != self._last_key and head.skipped < AFFINITY_SKIPS:
            for i, job in enumerate(self._pending):
                if job.key == self._last_key:
                    for j in range(i):
                        self._pending[j].skipped += 1
                    del self._pending[i]
                    return job
        return self._pending.popleft()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._pick()
                self._current = job
            t0 = time.perf_counter()
            job.started = t0
            try:
                if job.cancelled.is_set():
                    self.count("cancelled")
                    continue
                job.fn(self.engine, job)
                if job.key is not None:
                    self._last_key = job.key
            except ApiError as e:
                job.emit("error", e)
            except EdgeftError as e:
                job.emit("error", _from_edgeft(e))
            except Exception as e:  # a bug: log it here, never send a traceback to the client
                self.count("errors")
                log.exception("request failed")
                job.emit("error", _internal(e))
            finally:
                self.counters.busy_s += time.perf_counter() - t0
                self._current = None
