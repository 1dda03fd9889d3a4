"""`edgeft serve`: an OpenAI-compatible HTTP API over one Engine, with a LoRA adapter per request.

    app.py        the Server: routes for /v1/chat/completions, /v1/completions, /v1/models,
                  /v1/adapters and /health (see its docstring and docs/server.md)
    requests.py   request bodies -> a checked GenRequest (limits, JSON schemas, messages)
    responses.py  OpenAI response bodies and server-sent events
    scheduler.py  the worker thread that owns the engine, and its queue with adapter affinity
    auth.py       the Host / API key / body size guard in front of every route
    listen.py     binding the port and running uvicorn
    errors.py     errors in OpenAI's shape

This package imports starlette and uvicorn (the `serve` extra); only `edgeft serve` imports it.
"""

from __future__ import annotations

from .app import Server, ServerConfig, create_app
from .auth import is_loopback
from .errors import ApiError
from .listen import bind_socket, serve
from .requests import GenRequest
from .scheduler import AFFINITY_SKIPS, COUNTERS, Job, Worker

__all__ = ["AFFINITY_SKIPS", "ApiError", "COUNTERS", "GenRequest", "Job", "Server", "ServerConfig", "Worker",
           "bind_socket", "create_app", "is_loopback", "serve"]
