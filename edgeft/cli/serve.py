"""`edgeft serve`: a local OpenAI-compatible server (starlette + uvicorn, the `serve` extra)."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from ..errors import EdgeftError, InputError
from .common import (AdapterDir, Base, Ctx, FlashAttn, Force, GpuLayers, MemoryBudget, Parallel, PromptCacheMB,
                     Threads, open_engine)


def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on. 0.0.0.0 exposes the server to the network: use --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port (0 picks a free one and prints it).")] = 8080,
    base: Base = None,
    adapters: Annotated[Optional[list[str]], typer.Option("--adapter", "-a", "--adapters", help="Adapter to load at start (repeatable, or NAME,NAME): a registered name or bundle path, or 'all' (every registered one). Registered adapters not named here load on their first request.")] = None,
    adapter_dir: AdapterDir = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="EDGEFT_API_KEY", show_envvar=True, help="Require 'Authorization: Bearer KEY' on every route but /health.")] = None,
    max_tokens_limit: Annotated[int, typer.Option("--max-tokens-limit", min=1, help="The most tokens one request may ask for (more: 400).")] = 2048,
    queue: Annotated[int, typer.Option("--queue", min=0, help="Requests that may wait behind the ones being answered (more: 503).")] = 16,
    parallel: Parallel = 8,
    max_body_kb: Annotated[int, typer.Option("--max-body-kb", min=1, help="Largest request body in KiB (more: 413).")] = 1024,
    ctx: Ctx = 2048,
    threads: Threads = None,
    gpu_layers: GpuLayers = 0,
    flash_attn: FlashAttn = False,
    memory_budget: MemoryBudget = None,
    prompt_cache_mb: PromptCacheMB = 32.0,
    force: Force = False,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level: critical, error, warning, info, debug (debug logs every request).")] = "info",
) -> None:
    """Serve the base and its adapters over an OpenAI-compatible HTTP API (/v1/chat/completions, ...)."""
    try:
        from .. import server
    except ModuleNotFoundError as e:
        if e.name in ("starlette", "uvicorn"):
            raise EdgeftError(f"edgeft serve needs {e.name}", "pip install 'edgeft[serve]'") from None
        raise
    if not 0 <= port <= 65535:
        raise InputError(f"--port {port} is not a TCP port", "use 1..65535, or 0 for a free one")
    if log_level.lower() not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise InputError(f"unknown --log-level '{log_level}'", "use critical, error, warning, info or debug")
    if api_key is not None and not api_key.strip():
        raise InputError("--api-key is empty", "pass a non-empty key or leave the option out")
    exposed = not server.is_loopback(host)
    if exposed and not api_key:
        typer.secho(f"WARNING: listening on {host} without --api-key: anyone who can reach this machine can use "
                    "the server (and load or unload adapters). Pass --api-key or bind 127.0.0.1.",
                    fg=typer.colors.RED, bold=True, err=True)
    sock = server.bind_socket(host, port)   # fail on a busy port before loading the model
    try:
        eng = open_engine(base, ctx=ctx, threads=threads, gpu_layers=gpu_layers, adapter_dirs=adapter_dir,
                          memory_budget=memory_budget, flash_attn=flash_attn,
                          prompt_cache_mb=prompt_cache_mb, parallel=parallel)
        with eng:
            loaded = _preload(eng, ",".join(adapters) if adapters else None, adapter_dir or [], force)
            cfg = server.ServerConfig(api_key=api_key, max_tokens_limit=max_tokens_limit, queue_size=queue,
                                      max_body_bytes=max_body_kb * 1024, adapter_dirs=list(adapter_dir or []),
                                      loopback_only=not exposed)
            bound_host, bound_port = sock.getsockname()[:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            typer.echo(f"edgeft serve: http://{shown}:{bound_port}/v1  base {eng.base.id}, "
                       f"adapters loaded: {', '.join(loaded) or 'none'}"
                       f"{', API key required' if api_key else ''}. Ctrl-C stops.", err=False)
            sys.stdout.flush()
            server.serve(eng, cfg, sock, log_level=log_level.lower())
    finally:
        sock.close()


def _preload(eng, adapters: str | None, adapter_dirs: list[str], force: bool) -> list[str]:
    from ..engine import parse_adapter_spec
    from ..registry import available, looks_like_path

    if not adapters:
        return []
    if adapters.strip().lower() == "all":
        refs = list(available(adapter_dirs))
    else:
        refs = list(parse_adapter_spec(adapters))
    # registered adapters keep their registry name, the one requests use in `model`
    return [eng.load_adapter(ref, force=force) if looks_like_path(ref) else eng.load_adapter(ref, name=ref, force=force)
            for ref in refs]


def register(app: typer.Typer) -> None:
    app.command(name="serve")(serve)
