"""`edgeft run` (one answer, or JSONL batches) and `edgeft chat` (interactive, streamed)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from ..errors import EdgeftError, InputError
from .common import Adapter, Base, EngineOptions, engine_options


def _load_adapters(eng, adapters: list[str] | None, force: bool) -> dict:
    from ..engine import parse_adapter_spec

    spec = parse_adapter_spec(adapters or [])
    for ref in spec:
        eng.load_adapter(ref, force=force)
    return eng.use(spec)


def read_task(path: str):
    """The `task` section of a card file as a TaskSpec, every problem as one clear error."""
    from pathlib import Path

    from ..tasks import TaskSpec

    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"cannot read task card {path}: {type(e).__name__}: {e}", "give a JSON card like `edgeft card infer` writes") from None
    if not isinstance(d, dict) or not isinstance(d.get("task"), dict):
        raise InputError(f"task card {path} has no 'task' section", "give a JSON card like `edgeft card infer` writes")
    try:
        return TaskSpec.from_dict(d["task"])
    except (TypeError, ValueError) as e:
        raise InputError(f"task card {path}: bad 'task': {e}") from None


def _result_json(res, adapters: dict) -> dict:
    return {"text": res.text, "value": res.value, "adapters": adapters, "finish_reason": res.finish_reason,
            "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "ttft_ms": round(res.ttft_ms, 2), "decode_tps": round(res.decode_tps, 1)}


def run(
    text: Annotated[Optional[str], typer.Argument(help="Input text; read from stdin when omitted or '-'.")] = None,
    base: Base = None,
    adapter: Adapter = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", "-n", help="Most tokens to generate (default: the task card's, else 256).")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="0 = greedy (default: the task card's).")] = None,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed (with temperature > 0).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the answer and timings.")] = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Read one request per stdin line: {\"text\": ..., \"adapter\": ...}; print one JSON result per line (waiting lines are answered in one batch, each under its own adapter).")] = False,
    task_card: Annotated[Optional[str], typer.Option("--task-card", help="Task card JSON (or a bundle's adapter.json) to answer under: gives a merged model or the bare base a task's prompt and output constraint.")] = None,
    *,
    opts: EngineOptions,
) -> None:
    """Answer one input (or a JSONL batch), honouring the adapter's task card."""
    if jsonl:
        if text not in (None, "-"):
            raise InputError("--jsonl reads requests from stdin", "drop the TEXT argument")
    else:
        if text is None or text == "-":
            text = sys.stdin.read() if not sys.stdin.isatty() else ""
        if not text.strip():
            raise InputError("empty input", 'pass TEXT, e.g. edgeft run "Hello", or pipe it on stdin')
    task = read_task(task_card) if task_card else None
    with opts.open(base) as eng:
        active = _load_adapters(eng, adapter, opts.force)
        gen = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        if task is not None:
            gen["task"] = task
        if not jsonl:
            res = eng.run(text, **gen)
            if as_json:
                typer.echo(json.dumps(_result_json(res, active), ensure_ascii=False))
            else:
                typer.echo(res.text)
            return
        _run_jsonl(eng, active, gen)


def _run_jsonl(eng, default_adapters: dict, gen: dict) -> None:
    from .jsonl import run_jsonl

    n_err = run_jsonl(eng, default_adapters, gen, _result_json)
    if n_err:
        typer.echo(f"{n_err} line(s) failed", err=True)
        raise typer.Exit(1)


CHAT_HELP = """\
/use NAME | /use ner=1,style=0.5 | /use none   switch adapters (hot swap)
/adapters                                      list loaded adapters
/stats                                         last swap, TTFT and tok/s
/reset                                         forget the conversation
/help, /exit                                   this help, leave (Ctrl-D too)
Ctrl-C stops the current answer."""


def chat(
    base: Base = None,
    adapter: Adapter = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", "-n", help="Default: the task card's, else 512.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature")] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt for plain chat (no task adapter).")] = None,
    *,
    opts: EngineOptions,
) -> None:
    """Interactive chat, streamed; adapters switch with /use without reloading the base."""
    with opts.open(base) as eng:
        active = _load_adapters(eng, adapter, opts.force)
        typer.secho(f"edgeft chat: base {eng.base.id}, adapters {_fmt(active)}. /help for commands.", dim=True)
        history: list[dict] = []
        while True:
            try:
                line = input("> ")
            except EOFError:
                typer.echo()
                return
            except KeyboardInterrupt:
                typer.echo()
                continue
            if not line.strip():
                continue
            if line.startswith("/"):
                if _slash(eng, line.strip(), history) == "exit":
                    return
                continue
            task = eng.task_for()
            try:
                if task is not None:   # task adapters answer each input on its own
                    stream = eng.run(line, stream=True, max_tokens=max_tokens, temperature=temperature)
                else:
                    msgs = ([{"role": "system", "content": system}] if system and not history else []) + \
                        [{"role": "user", "content": line}]
                    history.extend(msgs)
                    stream = eng.chat(history, stream=True, max_tokens=max_tokens or 512,
                                      temperature=temperature or 0.0)
                answer = _stream(stream)
                if task is None:
                    history.append({"role": "assistant", "content": answer})
            except EdgeftError as e:
                typer.secho(f"error: {e.message}" + (f" ({e.hint})" if e.hint else ""), fg="red", err=True)
                if task is None and history and history[-1]["role"] == "user":
                    history.pop()


def _stream(stream) -> str:
    out = []
    try:
        for piece in stream:
            out.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()
        typer.secho(" [stopped]", dim=True)
        return "".join(out)
    typer.echo()
    return "".join(out)


def _fmt(active: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in active.items()) or "none"


def _slash(eng, line: str, history: list) -> str | None:
    cmd, _, arg = line.partition(" ")
    try:
        if cmd in ("/exit", "/quit"):
            return "exit"
        if cmd == "/help":
            typer.echo(CHAT_HELP)
        elif cmd == "/use":
            active = eng.use(arg.strip() or None)
            history.clear()
            typer.secho(f"adapters: {_fmt(active)} (swap {eng.stats.last_swap_ms:.2f} ms at next answer)", dim=True)
        elif cmd == "/adapters":
            if not eng.adapters:
                typer.echo("no adapters loaded")
            for name, la in eng.adapters.items():
                mark = "*" if name in eng.active else " "
                task = la.bundle.card.description or ("task: " + la.task.output.type if la.task else "")
                typer.echo(f"{mark} {name:16} {la.mb:6.1f} MB  {task}")
        elif cmd == "/stats":
            g = eng.stats.last
            typer.echo(f"swaps {eng.stats.swaps}, last swap {eng.stats.last_swap_ms:.3f} ms, evictions {eng.stats.evictions}")
            pc = eng.prompt_cache.report()
            typer.echo(f"prompt cache: {pc['entries']} prompts, {pc['mb']:.1f} of {pc['budget_mb']:.0f} MB, "
                       f"{pc['hits']} hits, {pc['misses']} misses, {pc['reused_tokens']} tokens reused")
            if g:
                typer.echo(f"last answer: prompt {g.prompt_tokens} tok (reused {g.reused_prefix}), TTFT {g.ttft_ms:.1f} ms, "
                           f"{g.completion_tokens} tok at {g.decode_tps:.1f} tok/s")
        elif cmd == "/reset":
            history.clear()
            eng.reset()
            typer.secho("conversation reset", dim=True)
        else:
            typer.echo(f"unknown command {cmd}; /help lists them")
    except EdgeftError as e:
        typer.secho(f"error: {e.message}" + (f" ({e.hint})" if e.hint else ""), fg="red", err=True)
    return None


def register(app: typer.Typer) -> None:
    app.command(name="run")(engine_options(ctx=2048)(run))
    app.command(name="chat")(engine_options(ctx=4096)(chat))
