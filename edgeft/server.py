"""`edgeft serve`: an OpenAI-compatible HTTP API over one Engine, with a LoRA adapter per request.

    POST /v1/chat/completions    POST /v1/completions     (streaming as SSE, or not)
    GET  /v1/models[/{id}]       GET  /health
    GET|POST|DELETE /v1/adapters[/{name}]                 (list, load, unload at run time)

The `model` field picks the adapter set: `ner`, `BASE:ner`, or the base id for no adapter; the
`adapters` extension field mixes several ({"ner": 1.0, "style": 0.5}). When the set is a single
adapter with a task card, the card shapes the request (see `_apply_card` and docs/server.md).

One worker thread owns the Engine and runs one request at a time (llama.cpp is blocking and the
context is single-sequence); the event loop only parses, queues and streams. Waiting requests sit
in a bounded queue (full -> 503); the worker prefers a waiting request for the adapter set that
is already applied, so its prompt prefix is reused instead of recomputed, but never skips a
request more than `AFFINITY_SKIPS` times. Answers do not depend on the order: the engine clears
its KV cache on every change of adapter set, so greedy output equals `edgeft run`'s.

A client that disconnects (mid-stream or while queued) cancels its request: the engine's stream
is closed, which releases the engine for the next request.

Request data never names a file outside the adapter registry: adapter names are checked with
`registry.is_valid_name` and looked up with `find_in_registry` (no absolute paths, no '..', no
symlink escapes); only adapters already resident reach the engine by name.

This module imports starlette and uvicorn (the `serve` extra); only `edgeft serve` imports it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .bundles import AdapterBundle
from .engine import Engine, parse_adapter_spec
from .errors import AdapterError, EdgeftError, InputError
from .registry import available, find_in_registry, is_valid_name, search_dirs

log = logging.getLogger(__name__)

AFFINITY_SKIPS = 4          # most times a waiting request may be passed over for a same-adapter one
MAX_STOP = 16               # stop sequences per request
MAX_STOP_CHARS = 256
MAX_MIX = 8                 # adapters mixed in one request
OPEN_PATHS = ("/health",)   # the only routes that need no API key


@dataclass
class ServerConfig:
    api_key: str | None = None
    max_tokens_limit: int = 2048      # the most tokens one request may ask for
    default_max_tokens: int = 256     # when neither the request nor a task card says
    queue_size: int = 16              # requests waiting behind the one being generated
    max_body_bytes: int = 1 << 20
    adapter_dirs: Sequence[str] = ()
    loopback_only: bool = True        # answer only Host: localhost/127.0.0.1/[::1] (set for loopback binds)


# -- errors in OpenAI's shape --------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _from_edgeft(e: EdgeftError, param: str | None = None) -> ApiError:
    msg = str(e)
    if isinstance(e, AdapterError) and e.message.startswith(("unknown adapter", "adapter not found")):
        return ApiError(404, msg, param=param or "model", code="model_not_found")
    if isinstance(e, (InputError, AdapterError)):
        return ApiError(400, msg, param=param)
    return ApiError(500, msg, type="server_error", code="internal_error")


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _utf8(text: str, param: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"), which no tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad("text must be valid Unicode (no lone surrogates)", param) from None
    return text


# -- the worker that owns the engine -------------------------------------------------------------
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
                raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
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
                job.emit("error", ApiError(503, "the server is shutting down", type="server_error",
                                           code="shutting_down"))

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
                job.emit("error", ApiError(500, f"internal error: {type(e).__name__}", type="server_error",
                                           code="internal_error"))
            finally:
                self.counters.busy_s += time.perf_counter() - t0
                self._current = None


# -- request parsing -----------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_int(body: dict, key: str, lo: int, hi: int | None = None, *, what: str = "") -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if not _is_int(v):
        raise _bad(f"'{key}' must be an integer", key)
    if v < lo or (hi is not None and v > hi):
        raise _bad(f"'{key}' must be between {lo} and {hi}{what}" if hi is not None else f"'{key}' must be >= {lo}",
                   key, "integer_out_of_range" if hi is not None else None)
    return v


def _opt_num(body: dict, key: str, lo: float, hi: float) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(f"'{key}' must be a number", key)
    if not lo <= v <= hi:
        raise _bad(f"'{key}' must be between {lo:g} and {hi:g}", key)
    return float(v)


def _stops(body: dict) -> list[str] | None:
    v = body.get("stop")
    if v is None:
        return None
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise _bad("'stop' must be a non-empty string or a list of them", "stop")
    if len(items) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in items):
        raise _bad(f"at most {MAX_STOP} stop sequences of at most {MAX_STOP_CHARS} characters", "stop")
    return [_utf8(s, "stop") for s in items]


# A request's JSON schema becomes a GBNF grammar that llama.cpp parses recursively: the converter
# spells `maxLength: n` (and `{0,n}` in patterns) as n nested optional groups, and llama.cpp
# rejects ~2000 levels and crashes the process (stack overflow) at ~20000. Hence these limits.
MAX_SCHEMA_REPEAT = 1000          # minLength/maxLength/minItems/maxItems/... and {m,n} in patterns
MAX_SCHEMA_PROPERTIES = 256       # per object: the grammar grows with the square of optional ones
MAX_GBNF_DEPTH = 1024             # parenthesis nesting of the generated grammar
MAX_GBNF_CHARS = 256 * 1024
_REPEAT_KEYS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
                "minContains", "maxContains")
_PATTERN_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def _check_schema(node: Any, depth: int = 0) -> None:
    """Only local `#/...` references (llama-cpp-python's converter would fetch https:// ones) and
    bounded repetition, before the converter sees the schema."""
    if depth > 64:
        raise _bad("the JSON schema is nested too deeply", "response_format")
    if isinstance(node, dict):
        ref = node.get("$ref")
        if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
            raise _bad("only local '$ref's ('#/...') are allowed in the JSON schema", "response_format")
        for k in _REPEAT_KEYS:
            v = node.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > MAX_SCHEMA_REPEAT:
                raise _bad(f"'{k}' above {MAX_SCHEMA_REPEAT} is not supported in a JSON schema", "response_format")
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            for m in _PATTERN_REPEAT.finditer(pattern):
                if any(g and int(g) > MAX_SCHEMA_REPEAT for g in m.groups()):
                    raise _bad(f"repetition counts above {MAX_SCHEMA_REPEAT} are not supported in a 'pattern'",
                               "response_format")
        props = node.get("properties")
        if isinstance(props, dict) and len(props) > MAX_SCHEMA_PROPERTIES:
            raise _bad(f"at most {MAX_SCHEMA_PROPERTIES} properties per object in a JSON schema", "response_format")
        for v in node.values():
            _check_schema(v, depth + 1)
    elif isinstance(node, list):
        for v in node:
            _check_schema(v, depth + 1)


def _gbnf_depth(g: str) -> int:
    """Deepest parenthesis nesting in GBNF text (string literals, classes and comments skipped)."""
    depth = deepest = i = 0
    n = len(g)
    while i < n:
        c = g[i]
        if c in "\"[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and g[i] != close:
                i += 2 if g[i] == "\\" else 1
        elif c == "#":
            while i < n and g[i] != "\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return deepest


_JSON_OBJECT_GBNF: str | None = None


def _schema_grammar(schema: dict) -> str:
    from . import _llama

    _check_schema(schema)
    try:
        g = _llama.json_schema_to_gbnf(schema)
    except Exception as e:  # the converter asserts, raises, or recurses too deep on what it does not support
        raise _bad(f"unsupported JSON schema: {type(e).__name__}: {str(e)[:200]}", "response_format") from None
    if len(g) > MAX_GBNF_CHARS or _gbnf_depth(g) > MAX_GBNF_DEPTH:
        raise _bad("the JSON schema is too complex (its grammar nests too deeply or is too large)", "response_format")
    return g


def _response_format(body: dict) -> tuple[bool, str | None]:
    """(overrides the card's constraint?, grammar or None)."""
    global _JSON_OBJECT_GBNF
    rf = body.get("response_format")
    if rf is None:
        return False, None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise _bad("'response_format' must be an object with a 'type'", "response_format")
    kind = rf["type"]
    if kind == "text":
        return True, None
    if kind == "json_object":
        if _JSON_OBJECT_GBNF is None:
            _JSON_OBJECT_GBNF = _schema_grammar({"type": "object"})
        return True, _JSON_OBJECT_GBNF
    if kind == "json_schema":
        js = rf.get("json_schema")
        schema = js.get("schema") if isinstance(js, dict) else None
        if not isinstance(schema, dict):
            raise _bad("'response_format.json_schema.schema' must be a JSON schema object", "response_format")
        return True, _schema_grammar(schema)
    raise _bad(f"unknown response_format type '{kind}'", "response_format")


def _text_content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return _utf8(content, "messages")
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise _bad(f"messages[{i}].content: only text parts are supported", "messages")
            parts.append(p["text"])
        return _utf8("".join(parts), "messages")
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", "messages")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a string 'role'", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}]: unsupported role '{m['role']}'", "messages")
        out.append({"role": role, "content": _text_content(m.get("content"), i)})
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise _bad("'messages' needs at least one non-empty user message", "messages")
    return out


def _prompt(body: dict) -> str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if not isinstance(p, str):
        raise _bad("'prompt' must be a string (one prompt per request)", "prompt")
    if not p:
        raise _bad("'prompt' is empty", "prompt")
    return _utf8(p, "prompt")


@dataclass
class GenRequest:
    kind: str                         # "chat" | "completion"
    model: str
    adapters: dict[str, float]        # name -> scale
    bundles: dict[str, AdapterBundle]  # registry bundles for names not yet resident
    messages: list[dict] = field(default_factory=list)
    prompt: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    format_set: bool = False
    grammar: str | None = None
    use_card: bool = True
    include_usage: bool = False

    @property
    def key(self) -> tuple:
        return tuple(sorted(self.adapters.items()))


# -- the application -----------------------------------------------------------------------------
class Server:
    def __init__(self, engine: Engine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.roots = search_dirs(config.adapter_dirs)
        self.worker = Worker(engine, config.queue_size)
        self.loaded: dict[str, dict] = {}   # snapshot of resident adapters, replaced by the worker
        self._snapshot()
        self.started = int(time.time())

    # adapters --------------------------------------------------------------------------------
    def _snapshot(self) -> None:
        self._evictions = self.engine.stats.evictions
        snap = {}
        for name, la in self.engine.adapters.items():
            task = la.task
            snap[name] = {"name": name, "loaded": True, "mb": round(la.mb, 2),
                          "description": la.bundle.card.description,
                          "task": task.output.type if task else None}
        self.loaded = snap

    def _registry_bundle(self, name: str) -> AdapterBundle:
        if not is_valid_name(name) or name.endswith(".gguf"):
            raise ApiError(404, f"model '{name}' does not exist", param="model", code="model_not_found")
        try:
            return find_in_registry(name, self.roots)
        except AdapterError as e:
            raise _from_edgeft(e) from None

    def _resolve_model(self, model: Any, mix: Any) -> tuple[dict[str, float], dict[str, AdapterBundle]]:
        """`model` (+ the `adapters` extension) -> ({name: scale}, bundles to load)."""
        if not isinstance(model, str) or not model.strip():
            raise _bad("'model' must be a non-empty string", "model")
        base_id = self.engine.base.id
        m = model.strip()
        wanted: dict[str, float] = {}
        if m != base_id:
            base_part, sep, name = m.rpartition(":")
            if sep and base_part != base_id:
                raise ApiError(404, f"model '{m}' does not exist: this server runs base '{base_id}'",
                               param="model", code="model_not_found")
            if name and name != base_id:
                wanted[name] = 1.0
        if mix is not None:
            if isinstance(mix, dict):
                for k, v in mix.items():
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > 16:
                        raise _bad(f"adapter scale for '{k}' must be a finite number", "adapters")
            elif not (isinstance(mix, str) or (isinstance(mix, list) and all(isinstance(x, str) for x in mix))):
                raise _bad("'adapters' must be an object {name: scale}, a list of names or a string", "adapters")
            try:
                extra = parse_adapter_spec(mix)
            except InputError as e:
                raise _from_edgeft(e, "adapters") from None
            for k, v in extra.items():
                if not math.isfinite(v):
                    raise _bad(f"adapter scale for '{k}' must be a finite number", "adapters")
            wanted.update(extra)
        if len(wanted) > MAX_MIX:
            raise _bad(f"at most {MAX_MIX} adapters per request", "adapters")
        bundles = {}
        for name in wanted:
            if name not in self.loaded:
                bundles[name] = self._registry_bundle(name)
        return wanted, bundles

    def _ensure_loaded(self, eng: Engine, req: GenRequest) -> dict[str, float]:
        """On the worker: load what the request needs (from the bundles resolved for it)."""
        changed = False
        for name in req.adapters:
            if name in eng.adapters:
                continue
            bundle = req.bundles.get(name)
            if bundle is None and name in self.loaded:
                eng.load_adapter(name)   # evicted by --memory-budget: the engine reloads what it had
            else:
                eng.load_adapter(bundle or self._registry_bundle(name), name=name)
            changed = True
        if changed or eng.stats.evictions != self._evictions:
            self._snapshot()
        return dict(req.adapters)

    # request -> generation -----------------------------------------------------------------
    def _parse_gen(self, body: dict, kind: str) -> GenRequest:
        adapters, bundles = self._resolve_model(body.get("model"), body.get("adapters"))
        req = GenRequest(kind=kind, model=body["model"], adapters=adapters, bundles=bundles)
        if kind == "chat":
            req.messages = _messages(body)
        else:
            req.prompt = _prompt(body)
            bo = body.get("best_of")
            for k, unsupported in (("echo", bool(body.get("echo"))), ("suffix", bool(body.get("suffix"))),
                                   ("best_of", bo is not None and bo != 1)):
                if unsupported:
                    raise _bad(f"'{k}' is not supported by edgeft serve", k)
        if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs"):
            raise _bad("logprobs are not supported by edgeft serve", "logprobs")
        limit = self.config.max_tokens_limit
        mt = _opt_int(body, "max_completion_tokens", 1, limit, what=" (the server's --max-tokens-limit)")
        if mt is None:
            mt = _opt_int(body, "max_tokens", 1, limit, what=" (the server's --max-tokens-limit)")
        req.max_tokens = mt
        req.temperature = _opt_num(body, "temperature", 0.0, 2.0)
        top_p = _opt_num(body, "top_p", 0.0, 1.0)
        req.top_p = 1.0 if top_p is None else top_p
        req.top_k = _opt_int(body, "top_k", 0, 1 << 20) or 0
        min_p = _opt_num(body, "min_p", 0.0, 1.0)
        req.min_p = min_p or 0.0
        seed = body.get("seed")
        if seed is not None and not _is_int(seed):
            raise _bad("'seed' must be an integer", "seed")
        req.seed = seed
        req.stop = _stops(body)
        n = body.get("n")
        if n is not None and n != 1:
            raise _bad("only n=1 is supported", "n")
        if body.get("tools"):
            raise _bad("tools are not supported by edgeft serve", "tools")
        use = body.get("use_task_card", True)
        if not isinstance(use, bool):
            raise _bad("'use_task_card' must be a boolean", "use_task_card")
        req.use_card = use
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("'stream' must be a boolean", "stream")
        so = body.get("stream_options")
        if so is not None:
            if not isinstance(so, dict):
                raise _bad("'stream_options' must be an object", "stream_options")
            req.include_usage = bool(so.get("include_usage"))
        return req

    def _plan(self, eng: Engine, req: GenRequest, selection: dict[str, float]) -> tuple[str, dict]:
        """The prompt text and generation options, after the task card (on the worker)."""
        task = None
        if req.use_card and len(selection) == 1:
            task = eng.adapters[next(iter(selection))].task
        grammar = req.grammar
        stop = req.stop
        max_tokens, temperature = req.max_tokens, req.temperature
        if req.kind == "chat":
            msgs = [dict(m) for m in req.messages]
            if task is not None:
                msgs = _apply_card(task, msgs)
            prompt = eng.chat_prompt(msgs)
        else:
            prompt = req.prompt
        if task is not None:
            if not req.format_set:
                grammar = task.output.grammar()
            if stop is None:
                stop = task.stop
            if max_tokens is None:
                max_tokens = min(task.max_tokens, self.config.max_tokens_limit)
            if temperature is None:
                temperature = task.temperature
        opts = {"max_tokens": max_tokens or min(self.config.default_max_tokens, self.config.max_tokens_limit),
                "temperature": 0.0 if temperature is None else temperature,
                "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p, "seed": req.seed,
                "stop": stop or [], "grammar": grammar}
        return prompt, opts

    def _gen_fn(self, req: GenRequest) -> Callable[[Engine, Job], None]:
        def fn(eng: Engine, job: Job) -> None:
            selection = self._ensure_loaded(eng, req)
            prompt, opts = self._plan(eng, req, selection)
            n_prompt = len(eng.tokenize(prompt))
            if n_prompt >= eng.n_ctx:
                raise ApiError(400, f"the prompt has {n_prompt} tokens; this server's context holds {eng.n_ctx} "
                                    "(prompt and answer together)",
                               param="messages" if req.kind == "chat" else "prompt", code="context_length_exceeded")
            it = eng.complete(prompt, adapter=selection, stream=True, **opts)
            cancelled = False
            pieces: list[str] = []
            try:
                first = next(it, None)   # prefill + first token: errors here still get a JSON status
                job.emit("start")
                piece = first
                while piece is not None:
                    if job.cancelled.is_set():
                        cancelled = True
                        break
                    if job.stream:
                        job.emit("piece", piece)
                    else:
                        pieces.append(piece)
                    piece = next(it, None)
            finally:
                it.close()   # releases the engine lock now, also on cancel or error
            if cancelled or job.cancelled.is_set():
                self.worker.count("cancelled")
                return
            gen = it.result
            if eng.stats.evictions != self._evictions:
                self._snapshot()
            self.worker.count("served")
            job.emit("done", gen)

        return fn

    # HTTP handlers ---------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def _generate(self, request: Request, kind: str) -> Response:
        body = await self._json(request)
        req = self._parse_gen(body, kind)
        if body.get("response_format") is not None:   # converting a schema can take a moment
            req.format_set, req.grammar = await run_in_threadpool(_response_format, body)
        stream = bool(body.get("stream"))
        job = self.worker.submit(Job(self._gen_fn(req), key=req.key, stream=stream))
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if not stream:
            kind_, payload = await self._wait(request, job, ("done", "error"))
            if kind_ == "error":
                return payload.response()
            if kind_ == "gone":
                return Response(status_code=499)
            return JSONResponse(self._result(kind, rid, created, req, job, payload))
        kind_, payload = await self._wait(request, job, ("start", "error"))
        if kind_ == "error":
            return payload.response()
        if kind_ == "gone":
            return Response(status_code=499)
        return _SSEResponse(self._sse(kind, rid, created, req, job), on_close=lambda: self.worker.cancel(job))

    async def _wait(self, request: Request, job: Job, kinds: tuple[str, ...]) -> tuple[str, Any]:
        """The job's next event of `kinds`, or ("gone", None) if the client disconnects first."""
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            while True:
                get = asyncio.ensure_future(job.events.get())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    ev = get.result()
                    if ev[0] in kinds:
                        return ev
                    continue
                get.cancel()
                self.worker.cancel(job)
                return "gone", None
        finally:
            gone.cancel()

    def _ext(self, job: Job, gen) -> dict:
        return {"adapters": gen.adapters, "reused_prefix": gen.reused_prefix, "ttft_ms": round(gen.ttft_ms, 2),
                "decode_tps": round(gen.decode_tps, 1), "queue_ms": round((job.started - job.enqueued) * 1e3, 2)}

    @staticmethod
    def _usage(gen) -> dict:
        return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                "total_tokens": gen.prompt_tokens + gen.completion_tokens}

    def _result(self, kind: str, rid: str, created: int, req: GenRequest, job: Job, gen) -> dict:
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": gen.text, "refusal": None},
                      "logprobs": None, "finish_reason": gen.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": gen.text, "logprobs": None, "finish_reason": gen.finish_reason}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice],
                "usage": self._usage(gen), "system_fingerprint": None, "edgeft": self._ext(job, gen)}

    async def _sse(self, kind: str, rid: str, created: int, req: GenRequest, job: Job) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta: dict | None, finish: str | None = None, **extra) -> bytes:
            if kind == "chat":
                choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                     "finish_reason": finish}]
            else:
                choices = [] if delta is None else [{"index": 0, "text": delta.get("content", ""),
                                                     "logprobs": None, "finish_reason": finish}]
            d = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": choices, **extra}
            return b"data: " + json.dumps(d, ensure_ascii=False).encode() + b"\n\n"

        if kind == "chat":
            yield chunk({"role": "assistant", "content": ""})
        while True:
            ev, payload = await job.events.get()
            if ev == "piece":
                yield chunk({"content": payload})
            elif ev == "done":
                yield chunk({}, payload.finish_reason)
                if req.include_usage:
                    yield chunk(None, usage=self._usage(payload), edgeft=self._ext(job, payload))
                break
            elif ev == "error":
                yield b"data: " + json.dumps(payload.body()).encode() + b"\n\n"
                break
        yield b"data: [DONE]\n\n"

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": self._model_list()})

    async def model(self, request: Request) -> Response:
        mid = request.path_params["model"]
        for m in self._model_list():
            if m["id"] == mid:
                return JSONResponse(m)
        self._resolve_model(mid, None)   # BASE:name forms; raises 404 for unknown ones
        return JSONResponse({"id": mid, "object": "model", "created": self.started, "owned_by": "edgeft"})

    def _model_list(self) -> list[dict]:
        base = self.engine.base
        out = [{"id": base.id, "object": "model", "created": self.started, "owned_by": "edgeft",
                "edgeft": {"kind": "base", "n_ctx": self.engine.n_ctx}}]
        for a in self._adapter_rows():
            out.append({"id": a["name"], "object": "model", "created": self.started, "owned_by": "edgeft",
                        "edgeft": {"kind": "adapter", **{k: v for k, v in a.items() if k != "name"}}})
        return out

    def _adapter_rows(self) -> list[dict]:
        rows = dict(self.loaded)
        roots = [r.expanduser().resolve() for r in self.roots]
        for name, folder in available(self.config.adapter_dirs).items():
            if name in rows or not is_valid_name(name):
                continue
            real = folder.resolve()
            if any(real.is_relative_to(r) for r in roots):   # what find_in_registry would load
                rows[name] = {"name": name, "loaded": False}
        return [rows[k] for k in sorted(rows)]

    async def adapters_list(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": self._adapter_rows()})

    async def adapters_load(self, request: Request) -> Response:
        body = await self._json(request)
        ref = body.get("path", body.get("name"))
        alias = body.get("name") if "path" in body else None
        if not isinstance(ref, str) or not ref:
            raise _bad("give 'name' (a registered adapter) or 'path' (inside the adapter registry)", "name")
        if alias is not None and (not isinstance(alias, str) or not is_valid_name(alias)):
            raise _bad("'name' must be a valid adapter name (letters, digits, '.', '_', '-')", "name")
        if "path" not in body and not is_valid_name(ref):
            raise _bad(f"'{ref}' is not a valid adapter name; use 'path' for a bundle inside the registry", "name")
        try:
            bundle = find_in_registry(ref, self.roots)
        except AdapterError as e:
            raise _from_edgeft(e, "path" if "path" in body else "name") from None
        name = alias or (ref if is_valid_name(ref) and not ref.endswith(".gguf") else bundle.name)
        if not is_valid_name(name):
            raise _bad(f"the adapter's name '{name}' is not valid; pass 'name' to choose one", "name")

        def fn(eng: Engine, job: Job) -> None:
            fresh = name not in eng.adapters
            if not fresh and not _same_file(eng.adapters[name].bundle.gguf_path, bundle.gguf_path):
                raise ApiError(409, f"another adapter is already loaded as '{name}'",
                               param="name", code="adapter_name_taken")
            if fresh:
                eng.load_adapter(bundle, name=name)
                self._snapshot()
            job.emit("done", (fresh, self.loaded[name]))

        job = self.worker.submit(Job(fn))
        kind, payload = await self._wait(request, job, ("done", "error"))
        if kind == "error":
            return payload.response()
        fresh, row = payload
        return JSONResponse(row, status_code=201 if fresh else 200)

    async def adapters_unload(self, request: Request) -> Response:
        name = request.path_params.get("name")
        if name is None:
            name = request.query_params.get("name")
        if name is None:
            body = await self._json(request)
            name = body.get("name")
        if not isinstance(name, str) or name not in self.loaded:
            raise ApiError(404, f"adapter '{name}' is not loaded", param="name", code="adapter_not_loaded")

        def fn(eng: Engine, job: Job) -> None:
            if name not in eng.adapters:
                raise ApiError(404, f"adapter '{name}' is not loaded", param="name", code="adapter_not_loaded")
            eng.unload_adapter(name)
            self._snapshot()
            job.emit("done")

        job = self.worker.submit(Job(fn))
        kind, payload = await self._wait(request, job, ("done", "error"))
        if kind == "error":
            return payload.response()
        return JSONResponse({"name": name, "loaded": False, "deleted": True})

    async def health(self, request: Request) -> Response:
        w = self.worker
        c = w.counters
        return JSONResponse({"status": "ok", "busy": w.busy, "queued": w.queued, "served": c.served,
                             "cancelled": c.cancelled, "rejected": c.rejected, "errors": c.errors})

    def begin_shutdown(self) -> None:
        """From a signal handler: end open requests at once instead of after uvicorn's grace period."""
        loop = getattr(self, "_loop", None)
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self.worker.drain)
            except RuntimeError:
                pass

    # plumbing --------------------------------------------------------------------------------
    async def _json(self, request: Request) -> dict:
        # JSON only: a web page can send a cross-site "simple" POST (text/plain, form data) to a
        # local server without asking; an application/json one needs a CORS preflight we refuse
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, "send the body as JSON with 'Content-Type: application/json'",
                           code="unsupported_media_type")
        limit = self.config.max_body_bytes
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")
        try:
            data = json.loads(bytes(buf))
        except (ValueError, RecursionError):
            raise _bad("the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise _bad("the request body must be a JSON object")
        return data

    def app(self) -> Starlette:
        def guarded(handler):
            async def endpoint(request: Request) -> Response:
                try:
                    return await handler(request)
                except ApiError as e:
                    return e.response()
                except EdgeftError as e:
                    return _from_edgeft(e).response()
                except Exception as e:   # never a traceback to the client
                    self.worker.count("errors")
                    log.exception("request failed")
                    return ApiError(500, f"internal error: {type(e).__name__}", type="server_error",
                                    code="internal_error").response()
            return endpoint

        routes = [
            Route("/health", guarded(self.health), methods=["GET"]),
            Route("/v1/chat/completions", guarded(self.chat_completions), methods=["POST"]),
            Route("/v1/completions", guarded(self.completions), methods=["POST"]),
            Route("/v1/models", guarded(self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", guarded(self.model), methods=["GET"]),
            Route("/v1/adapters", guarded(self.adapters_list), methods=["GET"]),
            Route("/v1/adapters", guarded(self.adapters_load), methods=["POST"]),
            Route("/v1/adapters", guarded(self.adapters_unload), methods=["DELETE"]),
            Route("/v1/adapters/{name}", guarded(self.adapters_unload), methods=["DELETE"]),
        ]

        async def http_error(request: Request, exc: HTTPException) -> Response:
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()

        @asynccontextmanager
        async def lifespan(app):
            self._loop = asyncio.get_running_loop()
            self.worker.start()
            try:
                yield
            finally:
                await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)

        inner = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
        hosts = LOOPBACK_NAMES if self.config.loopback_only else None
        return _Guard(inner, self.config.api_key, self.config.max_body_bytes, hosts)


class _SSEResponse(StreamingResponse):
    """Server-sent events that cancel their job however the response ends (done, error, disconnect)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _disconnected(receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class _Guard:
    """ASGI middleware, before any route runs: the Host check (a server on loopback answers only
    to loopback names, so a web page cannot reach it through DNS rebinding), the API key on every
    route but /health (constant-time compare), and the body size limit from Content-Length."""

    def __init__(self, app, api_key: str | None, max_body: int, allowed_hosts: frozenset[str] | None = None):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.lower(), v)
        if self.allowed_hosts is not None and _host_name(headers.get(b"host", b"")) not in self.allowed_hosts:
            err = ApiError(403, "this server answers only to requests for localhost / 127.0.0.1",
                           code="host_not_allowed")
            return await err.response()(scope, receive, send)
        if self.key is not None and scope.get("path") not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
            if not hmac.compare_digest(token, self.key):
                err = ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await err.response()(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n < 0:
                return await _bad("bad Content-Length header").response()(scope, receive, send)
            if n > self.max_body:
                err = ApiError(413, f"request body is larger than {self.max_body} bytes", code="request_too_large")
                return await err.response()(scope, receive, send)
        return await self.app(scope, receive, send)


def _host_name(host: bytes) -> str:
    """The name in a Host header, without port or IPv6 brackets."""
    h = host.decode("latin-1").strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def _apply_card(task, msgs: list[dict]) -> list[dict]:
    """A task card's prompt rules for a chat request (docs/server.md, "Task cards"):
    - no system message in the request -> the card's system prompt goes first;
    - the conversation is one user message (system messages aside) -> the card's template wraps it.
    So [{"role": "user", "content": text}] becomes exactly what `edgeft run text` sends."""
    if task.system and not any(m["role"] == "system" for m in msgs):
        msgs = [{"role": "system", "content": task.system}] + msgs
    turns = [i for i, m in enumerate(msgs) if m["role"] != "system"]
    if len(turns) == 1 and msgs[turns[0]]["role"] == "user":
        i = turns[0]
        msgs[i] = {"role": "user", "content": task.user_message(msgs[i]["content"])}
    return msgs


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def create_app(engine: Engine, config: ServerConfig | None = None):
    """The ASGI app (Starlette inside the auth/size guard) for a loaded engine."""
    return Server(engine, config or ServerConfig()).app()


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before serving, so a busy port is an EdgeftError with a hint, not a uvicorn exit."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"cannot resolve host '{host}': {e}", "use an IP address such as 127.0.0.1") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                         "pick another --port (0 picks a free one), or stop what uses it") from None
    sock.set_inheritable(True)
    return sock


def serve(engine: Engine, config: ServerConfig, sock: socket.socket, *, log_level: str = "info") -> None:
    """Run until Ctrl-C / SIGTERM on an already bound socket."""
    import uvicorn

    srv = Server(engine, config)

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            srv.begin_shutdown()
            super().handle_exit(sig, frame)

    ucfg = uvicorn.Config(srv.app(), log_level=log_level, access_log=log_level == "debug",
                          timeout_graceful_shutdown=5, lifespan="on", server_header=False)
    _Uvicorn(ucfg).run(sockets=[sock])


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

