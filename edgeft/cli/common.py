"""Options shared by several commands (written once as Annotated aliases) and engine set-up."""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, fields
from typing import Annotated, Any, Callable, Optional

import typer

Base = Annotated[Optional[str], typer.Option("--base", "-b", help="Base model: manifest id (see `edgeft pull --list`) or path to a .gguf. Default: smollm2-135m.")]
Adapter = Annotated[Optional[list[str]], typer.Option("--adapter", "-a", help="Adapter NAME[=SCALE] (registered name, bundle folder or .gguf). Repeat to mix.")]
AdapterDir = Annotated[Optional[list[str]], typer.Option("--adapter-dir", help="Extra folder to search for adapter bundles (repeatable).")]
Ctx = Annotated[int, typer.Option("--ctx", help="Context size in tokens.")]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t", help="CPU threads (default: all cores).")]
GpuLayers = Annotated[int, typer.Option("--gpu-layers", help="Layers to offload to the GPU (-1: all; needs a GPU build).")]
FlashAttn = Annotated[bool, typer.Option("--flash-attn", help="llama.cpp's flash attention: faster decode, but ggml's CPU kernel sums attention in f16, so outputs can differ slightly (measured in docs/benchmarks.md).")]
MemoryBudget = Annotated[Optional[float], typer.Option("--memory-budget", help="MB that resident adapters may use; least recently used ones are freed.")]
PromptCacheMB = Annotated[float, typer.Option("--prompt-cache-mb", help="MB of saved prompt K/V per adapter set, so a request after a swap skips its task's fixed prefix (0: off).")]
Parallel = Annotated[int, typer.Option("--parallel", min=1, max=63, help="Answers decoded together in one batch (concurrent requests share each decode step, also under different adapters where the build allows: edgeft doctor).")]
Force = Annotated[bool, typer.Option("--force", help="Load adapters even if made for another base (sha256 differs).")]


def progress_printer():
    """A rich progress bar for pulls; returns (callback, close)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   transient=True)
    tasks: dict[str, int] = {}

    def cb(phase: str, done: int, total: int) -> None:
        if not bar.live.is_started:
            bar.start()
        if phase not in tasks:
            tasks[phase] = bar.add_task(f"{phase} base model", total=total or None)
        bar.update(tasks[phase], completed=done, total=total or None)

    def close() -> None:
        if bar.live.is_started:
            bar.stop()

    return cb, close


def open_engine(base: str | None, *, ctx: int = 2048, threads: int | None = None, gpu_layers: int = 0,
                adapter_dirs: list[str] | None = None, memory_budget: float | None = None,
                flash_attn: bool = False, prompt_cache_mb: float = 32.0, parallel: int = 8):
    from ..engine import Engine

    cb, close = progress_printer()
    try:
        return Engine(base, n_ctx=ctx, n_threads=threads, n_gpu_layers=gpu_layers,
                      adapter_dirs=adapter_dirs or [], memory_budget_mb=memory_budget, progress=cb,
                      flash_attn=flash_attn, prompt_cache_mb=prompt_cache_mb, parallel=parallel)
    finally:
        close()


@dataclass
class EngineOptions:
    """The engine options `run` and `chat` share (see `engine_options`)."""

    ctx: Ctx = 2048
    threads: Threads = None
    gpu_layers: GpuLayers = 0
    flash_attn: FlashAttn = False
    adapter_dir: AdapterDir = None
    memory_budget: MemoryBudget = None
    prompt_cache_mb: PromptCacheMB = 32.0
    force: Force = False

    def open(self, base: str | None):
        return open_engine(base, ctx=self.ctx, threads=self.threads, gpu_layers=self.gpu_layers,
                           adapter_dirs=self.adapter_dir, memory_budget=self.memory_budget,
                           flash_attn=self.flash_attn, prompt_cache_mb=self.prompt_cache_mb)


def engine_options(ctx: int = 2048) -> Callable:
    """Give a typer command the EngineOptions flags (--ctx, --threads, ...), written once here;
    the command receives them as its `opts` argument."""
    hints = typing.get_type_hints(EngineOptions, include_extras=True)
    extra = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[f.name],
                               default=ctx if f.name == "ctx" else f.default) for f in fields(EngineOptions)]

    def wrap(command: Callable) -> Callable:
        own_hints = typing.get_type_hints(command, localns={"EngineOptions": EngineOptions}, include_extras=True)
        own = [p.replace(annotation=own_hints.get(p.name, p.annotation))
               for p in inspect.signature(command).parameters.values() if p.name != "opts"]

        @functools.wraps(command)
        def cli(**kw: Any) -> Any:
            opts = EngineOptions(**{p.name: kw.pop(p.name) for p in extra})
            return command(**kw, opts=opts)

        del cli.__wrapped__      # typer reads the signature below, not the command's own
        cli.__signature__ = inspect.Signature(own + extra, return_annotation=None)
        cli.__annotations__ = {p.name: p.annotation for p in own + extra}
        return cli

    return wrap
