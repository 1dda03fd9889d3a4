"""`edgeft run --jsonl`: one request per stdin line, one JSON result per line, in input order.

Consecutive lines with the same options are answered together (`Engine.run_many`, up to the
engine's `parallel` at a time, each line under its own adapter and task card; on a build
without mixed adapter batches, only lines with the same adapter) when they are already waiting: a
file or a fast producer gets full batches, while a client that writes one line and waits for
its answer gets it at once (a batch is closed as soon as no further line is waiting). A batch
that fails is answered line by line, so one bad line costs only its own answer.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
from typing import Iterator, TextIO

import typer

from .. import _llama
from ..errors import EdgeftError, InputError

_OPTS = ("max_tokens", "temperature", "seed")


def _lines(stream: TextIO) -> Iterator[tuple[int, str, bool]]:
    """(line number, line, whether another line is already waiting), read by a thread."""
    q: queue.Queue = queue.Queue(maxsize=4096)

    def read() -> None:
        try:
            for item in enumerate(stream, 1):
                q.put(item)
        finally:
            q.put(None)

    threading.Thread(target=read, name="edgeft-jsonl-reader", daemon=True).start()
    while True:
        item = q.get()
        if item is None:
            return
        yield item[0], item[1], not q.empty()


def run_jsonl(eng, default_adapters: dict, gen: dict, result_json, stream: TextIO | None = None) -> int:
    """Answer every line of `stream` (stdin); returns how many lines failed."""
    failed = 0
    mixed = _llama.mixed_adapter_batches() and eng.parallel > 0
    batch: list[tuple[int, dict]] = []
    key: tuple | None = None

    def emit(out: dict) -> None:
        typer.echo(json.dumps(out, ensure_ascii=False))

    def flush() -> None:
        nonlocal batch, key, failed
        if not batch:
            return
        opts = batch[0][1]["_opts"]
        try:
            results = eng.run_many([r["text"] for _, r in batch], adapters=[r["_spec"] for _, r in batch],
                                   **opts) if len(batch) > 1 else None
        except EdgeftError:
            results = None   # answered line by line below: one bad line costs only its own answer
        for j, (lineno, req) in enumerate(batch):
            head = {"line": lineno, **({"id": req["id"]} if "id" in req else {})}
            try:
                res = results[j] if results is not None else eng.run(req["text"], adapter=req["_spec"], **opts)
                emit({**head, **result_json(res, dict(res.adapters))})
            except EdgeftError as e:
                failed += 1
                emit({**head, "error": e.message})
        batch, key = [], None

    for lineno, line, more in _lines(stream or sys.stdin):
        if line.strip():
            try:
                req = json.loads(line)
                if not isinstance(req, dict) or not isinstance(req.get("text"), str):
                    raise InputError('each line must be a JSON object with a "text" string')
                req["_spec"] = req.get("adapter", req.get("adapters", default_adapters))
                req["_opts"] = {**gen, **{k: req[k] for k in _OPTS if k in req}}
                k = (json.dumps(req["_spec"], sort_keys=True, default=str) if not mixed else "",
                     json.dumps(req["_opts"], sort_keys=True, default=str))
            except (ValueError, EdgeftError) as e:
                flush()
                failed += 1
                emit({"line": lineno, "error": e.message if isinstance(e, EdgeftError) else f"invalid JSON: {e}"})
                continue
            if batch and (k != key or len(batch) >= max(1, eng.parallel)):
                flush()
            batch.append((lineno, req))
            key = k
        if not more:
            flush()
    flush()
    return failed
