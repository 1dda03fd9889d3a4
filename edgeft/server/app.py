"""The HTTP application: one `Server` over one Engine, with a LoRA adapter set per request.

    POST /v1/chat/completions    POST /v1/completions     (streaming as SSE, or not)
    GET  /v1/models[/{id}]       GET  /health
    GET|POST|DELETE /v1/adapters[/{name}]                 (list, load, unload at run time)

The `model` field picks the adapter set: `ner`, `BASE:ner`, or the base id for no adapter; the
`adapters` extension field mixes several ({"ner": 1.0, "style": 0.5}). When the set is a single
adapter with a task card, the card shapes the request (see `_apply_card` and docs/server.md).

The engine work runs on the worker thread (see scheduler.py); handlers here parse, queue and stream.
A client that disconnects (mid-stream or while queued) cancels its request: the engine's stream
is closed, which releases the engine for the next request.

Request data never names a file outside the adapter registry: adapter names are checked with
`registry.is_valid_name` and looked up with `find_in_registry` (no absolute paths, no '..', no
symlink escapes); only adapters already resident reach the engine by name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import _llama
from ..bundles import AdapterBundle
from ..continuous import ContinuousBatch
from ..engine import Engine
from ..errors import AdapterError, EdgeftError, InputError
from ..registry import available, find_in_registry, is_valid_name, search_dirs
from .auth import LOOPBACK_NAMES, _Guard
from .errors import ApiError, _bad, _from_edgeft, _internal
from .requests import GenRequest, _gen_request, _response_format, _wanted_adapters
from .responses import _result, _sse, _SSEResponse
from .scheduler import Job, Plan, Worker

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    api_key: str | None = None
    max_tokens_limit: int = 2048      # the most tokens one request may ask for
    default_max_tokens: int = 256     # when neither the request nor a task card says
    queue_size: int = 16              # requests waiting behind the one being generated
    max_body_bytes: int = 1 << 20
    adapter_dirs: Sequence[str] = ()
    loopback_only: bool = True        # answer only Host: localhost/127.0.0.1/[::1] (set for loopback binds)


class Server:
    def __init__(self, engine: Engine, config: ServerConfig):
        if engine.parallel < 1:
            raise InputError("the server decodes requests in batches; this engine has parallel=0",
                             "make the Engine with parallel >= 1 (edgeft serve --parallel)")
        self.engine = engine
        self.config = config
        self.roots = search_dirs(config.adapter_dirs)
        self.worker = Worker(engine, config.queue_size, planner=self)
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
        wanted = _wanted_adapters(model, mix, self.engine.base.id)
        bundles = {}
        for name in wanted:
            if name not in self.loaded:
                bundles[name] = self._registry_bundle(name)
        return wanted, bundles

    # the worker's Planner: request -> adapter set -> prompt tokens and options ----------------
    def select(self, eng: Engine, req: GenRequest) -> dict[str, float]:
        """On the worker, before a batch: load what the request needs (from the bundles resolved
        for it) and return its adapter set."""
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

    def ready(self, eng: Engine, req: GenRequest) -> dict[str, float] | None:
        """Inside a batch: the request's adapter set when every adapter of it is loaded (a batch
        cannot load one), else None (it waits for the batch to end, then `select` loads it)."""
        loaded = eng.adapters
        return dict(req.adapters) if all(n in loaded for n in req.adapters) else None

    def settle(self, eng: Engine) -> None:
        if eng.stats.evictions != self._evictions:
            self._snapshot()

    def _parse_gen(self, body: dict, kind: str) -> GenRequest:
        adapters, bundles = self._resolve_model(body.get("model"), body.get("adapters"))
        return _gen_request(body, kind, adapters, bundles, self.config.max_tokens_limit)

    def plan(self, cb: ContinuousBatch, req: GenRequest, selection: dict[str, float]) -> Plan:
        """The prompt tokens and generation options, after the task card (on the worker, inside
        the batch: `cb` tokenizes while the batch holds the engine)."""
        task = None
        if req.use_card and len(selection) == 1:
            task = self.engine.adapters[next(iter(selection))].task
        grammar = req.grammar
        stop = req.stop
        max_tokens, temperature = req.max_tokens, req.temperature
        if req.kind == "chat":
            msgs = [dict(m) for m in req.messages]
            if task is not None:
                msgs = _apply_card(task, msgs)
            prompt = cb.chat_prompt(msgs)
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
        tokens = cb.tokenize(prompt)
        n_ctx = self.engine.n_ctx
        if len(tokens) >= n_ctx:
            raise ApiError(400, f"the prompt has {len(tokens)} tokens; this server's context holds {n_ctx} "
                                "(prompt and answer together)",
                           param="messages" if req.kind == "chat" else "prompt", code="context_length_exceeded")
        sampling = {"temperature": 0.0 if temperature is None else float(temperature), "top_p": float(req.top_p),
                    "top_k": int(req.top_k), "min_p": float(req.min_p), "seed": req.seed, "grammar": grammar}
        limit = max_tokens or min(self.config.default_max_tokens, self.config.max_tokens_limit)
        return Plan(tokens, int(limit), list(stop or []), sampling, req.ignore_eos)

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
        job = self.worker.submit(Job(key=req.key, stream=stream, request=req))
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if not stream:
            kind_, payload = await self._wait(request, job, ("done", "error"))
            if kind_ == "error":
                return payload.response()
            if kind_ == "gone":
                return Response(status_code=499)
            return JSONResponse(_result(kind, rid, created, req, job, payload))
        kind_, payload = await self._wait(request, job, ("start", "error"))
        if kind_ == "error":
            return payload.response()
        if kind_ == "gone":
            return Response(status_code=499)
        return _SSEResponse(_sse(kind, rid, created, req, job), on_close=lambda: self.worker.cancel(job))

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
        return JSONResponse({"status": "ok", "busy": w.busy, "running": w.running, "queued": w.queued,
                             "parallel": self.engine.parallel, "largest_batch": w.peak,
                             "mixed_adapter_batches": _llama.mixed_adapter_batches(),
                             "mixed_steps": self.engine.stats.mixed_steps, **w.counters,
                             "prompt_cache": self.engine.prompt_cache.report()})

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
                    return _internal(e).response()
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


async def _disconnected(receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


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

