"""The worker thread that owns the Engine, and the bounded queue in front of it.

Generation requests are served by continuous batching (edgeft/continuous.py): the worker opens
a batch for the adapter set of the request at the head of the queue, and between decode steps
admits waiting requests that fit (a free sequence and KV cells), oldest first, so up to
`Engine.parallel` answers share each llama_decode and a request joins while others decode. On a
build with patch 0003 a request under another adapter set joins too (each sequence of a step
carries its own set) as long as its adapters are loaded; otherwise, and for a request whose
adapters must be loaded first, it waits until the batch drains; to keep that wait bounded, a
batch stops admitting once such a request has been passed over `AFFINITY_SKIPS` times. Other
jobs (loading, unloading adapters) run alone between batches. Waiting requests sit
in a bounded queue (full -> 503). Cancelling a request (client gone) ends its answer before the
next step; the others in the batch go on untouched.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..errors import EdgeftError
from .errors import ApiError, _from_edgeft, _internal, _shutting_down

if TYPE_CHECKING:
    from ..continuous import Answer, ContinuousBatch
    from ..engine import Engine

log = logging.getLogger(__name__)

AFFINITY_SKIPS = 4          # most times a waiting request may be passed over for a same-adapter one


@dataclass
class Plan:
    """A generation request made concrete on the worker: prompt tokens and how to answer."""

    tokens: list[int]
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    sampling: dict = field(default_factory=dict)   # temperature, top_p, top_k, min_p, seed, grammar
    ignore_eos: bool = False


class Planner(Protocol):
    """What the worker asks the app for a generation job (app.Server implements it)."""

    def select(self, eng: Engine, request: Any) -> dict[str, float]: ...   # loads what it needs
    def ready(self, eng: Engine, request: Any) -> dict[str, float] | None: ...  # None: must load
    def plan(self, cb: ContinuousBatch, request: Any, selection: dict[str, float]) -> Plan: ...
    def settle(self, eng: Engine) -> None: ...                           # after a batch


class Job:
    """One unit of engine work: a generation `request` (served in a batch; see Planner), or
    `fn(engine, job)` run alone. Either reports through `emit`, which hands (kind, payload)
    events to the request's coroutine on the event loop."""

    def __init__(self, fn: Callable[[Engine, "Job"], None] | None = None, *, key: Any = None,
                 stream: bool = False, request: Any = None):
        self.fn = fn
        self.request = request
        self.key = key
        self.stream = stream
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.enqueued = time.perf_counter()
        self.started = 0.0
        self.skipped = 0
        self.plan: Plan | None = None
        self.shown_start = False

    def emit(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (shutdown)
            self.cancelled.set()


COUNTERS = ("served", "cancelled", "rejected", "errors")   # the request outcomes /health reports


class Worker:
    def __init__(self, engine: Engine, queue_size: int, planner: Planner):
        self.engine = engine
        self.queue_size = queue_size
        self.planner = planner
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._running: dict[Any, Job] = {}     # Answer (or the job itself for a plain job) -> Job
        self.peak = 0                          # most answers running at once since start (/health)
        self._last_key: Any = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edgeft-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def busy(self) -> bool:
        return bool(self._running)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def count(self, what: str) -> None:
        with self._cond:
            self.counters[what] += 1

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stopping:
                raise _shutting_down()
            if len(self._pending) >= self.queue_size:
                self.counters["rejected"] += 1
                raise ApiError(503, f"the server is busy ({len(self._pending)} requests waiting); retry shortly",
                               type="server_error", code="server_overloaded", headers={"Retry-After": "1"})
            self._pending.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a waiting job, or make a running one stop before its next token."""
        if job.cancelled.is_set():
            return
        job.cancelled.set()
        with self._cond:
            try:
                self._pending.remove(job)
                self.counters["cancelled"] += 1
            except ValueError:
                pass

    def drain(self) -> None:
        """Take no more work; waiting and running jobs end now with a 503 'shutting down'."""
        with self._cond:
            self._stopping = True
            jobs = list(self._pending) + list(self._running.values())
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
                job.started = time.perf_counter()
            if job.cancelled.is_set():
                self.count("cancelled")
                continue
            try:
                if job.request is not None:
                    self._serve(job)
                else:
                    self._track(job, job)
                    job.fn(self.engine, job)
                if job.key is not None:
                    self._last_key = job.key
            except Exception as e:
                self._fail(job, e)
            finally:
                with self._cond:
                    self._running.clear()

    def _fail(self, job: Job, e: Exception) -> None:
        if isinstance(e, ApiError):
            job.emit("error", e)
        elif isinstance(e, EdgeftError):
            job.emit("error", _from_edgeft(e))
        else:  # a bug: log it here, never send a traceback to the client
            self.count("errors")
            log.exception("request failed", exc_info=e)
            job.emit("error", _internal(e))

    # -- generation: continuous batching ------------------------------------------------------
    def _serve(self, first: Job) -> None:
        """A batch under `first`'s adapter set, open while any of its answers runs."""
        eng = self.engine
        selection = self.planner.select(eng, first.request)
        try:
            with eng.batch(selection) as cb:
                if self._join(cb, first, selection) is False:   # cannot happen: a lone request fits
                    raise ApiError(400, "the request does not fit this server's context", code="context_length_exceeded")
                while self._running:
                    self._admit(cb, first.key)
                    for a in cb.step():
                        self._report(a)
        except Exception as e:   # the engine failed: every answer of the batch gets the error
            with self._cond:
                jobs = list(self._running.values()) or [first]
                self._running.clear()
            for job in jobs:
                if not job.cancelled.is_set():
                    self._fail(job, e)
        finally:
            self.planner.settle(eng)

    def _join(self, cb: ContinuousBatch, job: Job, selection: dict[str, float]) -> bool | None:
        """Plan `job` and add it to the batch: True if added, False if it does not fit yet,
        None if it failed (its error is sent)."""
        try:
            if job.plan is None:
                job.plan = self.planner.plan(cb, job.request, selection)
            p = job.plan
            if not cb.fits(p.tokens, p.max_tokens, selection):
                return False
            a = cb.add(p.tokens, max_tokens=p.max_tokens, stop=p.stop, cancel=job.cancelled, ignore_eos=p.ignore_eos,
                       adapter=selection, **p.sampling)
        except (ApiError, EdgeftError) as e:
            self._fail(job, e)
            return None
        job.started = time.perf_counter()
        self._track(a, job)
        return True

    def _track(self, key: Any, job: Job | None) -> None:
        with self._cond:
            if job is None:
                self._running.pop(key, None)
            else:
                self._running[key] = job
                self.peak = max(self.peak, len(self._running))

    def _admit(self, cb: ContinuousBatch, key: Any) -> None:
        """Waiting requests that can join this batch (its adapter set, or any loaded set when the
        batch mixes sets) join it, oldest first, while they fit and no request that cannot join
        has been passed over too often."""
        while cb.slots:
            with self._cond:
                if self._stopping:
                    return
                job, selection, others = None, None, []
                for j in self._pending:
                    if j.request is None:
                        others.append(j)
                        continue
                    if j.cancelled.is_set():      # cancel() takes it out
                        continue
                    sel = self.planner.ready(self.engine, j.request) if j.key == key or cb.mixed else None
                    if sel is None or not cb.accepts(sel):
                        others.append(j)
                    elif job is None:
                        job, selection = j, sel
                if any(j.skipped >= AFFINITY_SKIPS for j in others) or job is None:
                    return
            joined = self._join(cb, job, selection)
            if joined is False:
                return      # it waits for room; keep first-come order
            with self._cond:
                try:
                    self._pending.remove(job)
                except ValueError:   # cancelled meanwhile: its answer ends at the next step
                    pass
                if joined:
                    for j in others:
                        if j.enqueued < job.enqueued:
                            j.skipped += 1

    def _report(self, a: Answer) -> None:
        job = self._running.get(a)
        if job is None:
            return
        if job.cancelled.is_set():
            if a.done:
                self._track(a, None)
                self.count("cancelled")
            return
        if a.error is not None:
            self._track(a, None)
            self._fail(job, a.error)
            return
        if a.started and not job.shown_start:
            job.shown_start = True
            job.emit("start")
        piece = a.take()
        if piece and job.stream:
            job.emit("piece", piece)
        if a.done:
            self._track(a, None)
            self.count("served")
            job.emit("done", a.gen)
