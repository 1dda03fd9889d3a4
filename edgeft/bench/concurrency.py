"""The concurrency phase: `edgeft serve`, in its own process on a loopback port, under 1, 4 and 8
concurrent clients; optionally llama.cpp's `llama-server` under the same load.

Each client sends `requests` chat requests one after another (a fixed system prompt, a short
user input, `answer_tokens` greedy tokens). Loads: every request for the first adapter ("same"),
or the two first adapters alternating from request to request and client to client ("mixed");
the 8-client loads also run with the prompt cache off. The inputs cycle, so each prompt comes
back three times in a load (llama-server then reuses a slot's whole cached prompt); a last load
at the most clients ("distinct", one adapter) gives every request a prompt of its own. Reported
per load: generated tokens per second over the load's wall time, request latency p50 / p90, the
most answers the edgeft server decoded together (each answer's `edgeft.batch_size`; nothing
polls the server, whose threads need both cores), the steps that mixed adapter sets (`/health`
before and after), and for the 8-client loads the share of answers identical to the same request
sent alone. llama-server (`--llama-server PATH`, built from the same llama.cpp) gets the same
model, threads and adapters (`--lora`, chosen per request with its `lora` field) and `-np` =
clients.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import InputError
from .cache import INPUTS, SYSTEM
from .stats import _ratio, dist

ANSWER_TOKENS = 48
CLIENTS = (1, 4, 8)


def _get(port: int, path: str, timeout: float = 30.0) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def _healthy(port: int) -> bool:
    """Whether a server on `port` answers GET /health with 200 (False while it starts)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except OSError:
        return False


def _post(port: int, body: dict, timeout: float = 600.0) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        return json.loads(data)
    finally:
        conn.close()


def run_load(port: int, clients: int, requests: int, body_for: Callable[[int, int], dict]) -> dict:
    """`clients` threads, each sending `requests` requests in turn; tok/s over the whole load."""
    lat: list[float] = []
    texts: dict[tuple[int, int], str] = {}
    tokens = [0]
    batch = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(requests):
            t0 = time.perf_counter()
            try:
                out = _post(port, body_for(i, j))
            except (OSError, RuntimeError, ValueError) as e:
                with lock:
                    errors.append(str(e))
                return
            with lock:
                texts[(i, j)] = out["choices"][0]["message"]["content"]
                lat.append(time.perf_counter() - t0)
                tokens[0] += int(out["usage"]["completion_tokens"])
                batch[0] = max(batch[0], int((out.get("edgeft") or {}).get("batch_size") or 0))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed: {errors[0]}")
    return {"clients": clients, "requests": clients * requests, "completion_tokens": tokens[0],
            "wall_s": wall, "tps": tokens[0] / wall if wall > 0 else None,
            "latency_s": dist(lat), "largest_batch": batch[0] or None, "texts": texts}


def identical_alone(port: int, load: dict, body_for: Callable[[int, int], dict]) -> float:
    """Share of a load's answers equal to the same request sent alone (one client, one at a time)."""
    texts = load["texts"]
    same = sum(_post(port, body_for(i, j))["choices"][0]["message"]["content"] == t for (i, j), t in texts.items())
    return same / max(1, len(texts))


def _messages(i: int, j: int, distinct: bool = False) -> list[dict]:
    """Client i's request j: the inputs cycle, so the same prompt comes back from other clients
    (a server may reuse its whole K/V); `distinct` gives every request a prompt of its own
    (a ticket number before the input), as real traffic mostly does."""
    text = INPUTS[(3 * i + j) % len(INPUTS)]
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Ticket {100 + 10 * i + j}: {text}" if distinct else text}]


@contextlib.contextmanager
def edgeft_server(base: Path, adapters: Sequence[Path], *, threads: int, ctx: int, parallel: int,
                  prompt_cache_mb: float = 32.0, flash_attn: bool = False):
    """`edgeft serve` in its own process (as users run it: its threads do not share this
    process's interpreter with the clients) on a free loopback port; yields (port, adapter names
    in the order given)."""
    cmd = [sys.executable, "-m", "edgeft", "serve", "--base", str(base), "--port", "0", "--threads", str(threads),
           "--ctx", str(ctx), "--parallel", str(parallel), "--prompt-cache-mb", str(prompt_cache_mb),
           "--queue", "256", "--max-tokens-limit", "4096", "--log-level", "warning"] + (["--flash-attn"] if flash_attn else [])
    for a in adapters:
        cmd += ["--adapter", str(a)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            port, names = _wait_for_banner(proc, out, err)
            yield port, names
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM (both servers drain and exit), SIGKILL if that takes longer than `timeout`."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_for_banner(proc: subprocess.Popen, out, err) -> tuple[int, list[str]]:
    """The port and adapter names from `edgeft serve`'s first line, once /health answers."""
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            err.seek(0)
            raise InputError(f"edgeft serve exited with code {proc.returncode}: {err.read().strip()[-300:]}")
        if time.monotonic() > deadline:
            raise InputError("edgeft serve did not start within 180 s")
        out.seek(0)
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v1 .*adapters loaded: (.*?)(, API key required)?\. Ctrl-C stops\.",
                      out.read())
        if m:
            port = int(m.group(1))
            if _healthy(port):
                return port, [n.strip() for n in m.group(2).split(",") if n.strip() and n.strip() != "none"]
        time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(binary: str | os.PathLike, base: Path, adapters: Sequence[Path], *, threads: int, ctx: int,
                 parallel: int, flash_attn: bool = False):
    """llama.cpp's llama-server on the same model, threads, adapters (none applied by default) and
    attention kernel (its default, `-fa auto`, turns flash attention on; edgeft's is off)."""
    port = _free_port()
    cmd = [str(binary), "-m", str(base), "--port", str(port), "--host", "127.0.0.1", "-t", str(threads),
           "-tb", str(threads), "-c", str(ctx), "-np", str(parallel), "--lora-init-without-apply",
           "--no-webui", "-lv", "0", "-fa", "on" if flash_attn else "off"]
    for a in adapters:
        cmd += ["--lora", str(a)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace")[-300:] if proc.stderr else ""
                raise InputError(f"llama-server exited with code {proc.returncode}: {err.strip()}",
                                 "check that --llama-server is llama.cpp's server built from the same source")
            if _healthy(port):
                break
            if time.monotonic() > deadline:
                raise InputError("llama-server did not answer /health within 120 s")
            time.sleep(0.25)
        yield port
    finally:
        _stop(proc)


def concurrency_phase(base: Path, adapters: Sequence[Path], *, threads: int, ctx: int, requests: int, say,
                      clients: Sequence[int] = CLIENTS, answer_tokens: int = ANSWER_TOKENS, parallel: int = 8,
                      llama_server_bin: str | os.PathLike | None = None, flash_attn: bool = False,
                      cache_off: bool = True) -> dict:
    """{load: result} for edgeft's server (and llama-server when given), plus the ratios. The
    first two adapters are the pair of the "mixed" loads (one adapter: both loads use it)."""
    out: dict[str, Any] = {"answer_tokens": answer_tokens, "requests_per_client": requests, "parallel": parallel,
                           "threads": threads, "ctx": ctx, "flash_attn": flash_attn, "edgeft": {}}
    for cache_mb in ((32.0, 0.0) if cache_off else (32.0,)):
        cache = "on" if cache_mb else "off"
        with edgeft_server(base, adapters[:2], threads=threads, ctx=ctx, parallel=parallel,
                           prompt_cache_mb=cache_mb, flash_attn=flash_attn) as (port, names):
            pair = names[:2] if len(names) > 1 else names * 2
            loads = [(m, n) for m in ("same", "mixed") for n in (clients if cache_mb else [max(clients)])]
            for mode, n in loads + ([("distinct", max(clients))] if cache_mb else []):
                say(f"concurrency, edgeft server, {n} client(s), {mode} adapters, prompt cache {cache}"
                    if mode != "distinct" else f"concurrency, edgeft server, {n} client(s), distinct prompts")

                def body(i: int, j: int, mixed: bool = mode == "mixed", distinct: bool = mode == "distinct") -> dict:
                    return {"model": pair[(i + j) % 2] if mixed else pair[0], "messages": _messages(i, j, distinct),
                            "max_tokens": answer_tokens, "temperature": 0.0, "ignore_eos": True}

                run_load(port, 1, 1, body)   # warm-up
                before = _get(port, "/health").get("mixed_steps", 0)
                r = out["edgeft"][f"{mode}_{n}_cache_{cache}"] = run_load(port, n, requests, body)
                r["mixed_steps"] = _get(port, "/health").get("mixed_steps", 0) - before
                if cache_mb and n == max(clients) and mode != "distinct":
                    say("concurrency, edgeft server, the same requests one at a time")
                    r["identical_to_alone"] = identical_alone(port, r, body)
    top, one = out["edgeft"].get(f"same_{max(clients)}_cache_on"), out["edgeft"].get(f"same_{min(clients)}_cache_on")
    if top and one and max(clients) == 8 and min(clients) == 1:
        out["eight_over_one_same"] = _ratio(top["tps"], one["tps"])
    if llama_server_bin:
        out["llama_server"] = _llama_server_loads(base, adapters[:2], llama_server_bin, threads, ctx, requests,
                                                  clients, answer_tokens, say, flash_attn)
        for key, r in out["llama_server"].items():
            mine = out["edgeft"].get(f"{key}_cache_on")
            if mine:
                out.setdefault("edgeft_over_llama_server", {})[key] = _ratio(mine["tps"], r["tps"])
                out.setdefault("p50_latency_edgeft_over_llama_server", {})[key] = _ratio(
                    mine["latency_s"]["p50"], r["latency_s"]["p50"])
    for loads in (out["edgeft"], out.get("llama_server", {})):
        for r in loads.values():
            r.pop("texts", None)
    return out


def _llama_server_loads(base, adapters, binary, threads, ctx, requests, clients, answer_tokens, say,
                        flash_attn) -> dict:
    res: dict[str, Any] = {}
    n_lora = len(adapters)
    for n in clients:
        with llama_server(binary, Path(base), adapters, threads=threads, ctx=ctx, parallel=n,
                          flash_attn=flash_attn) as port:
            for mode in ("same", "mixed") + (("distinct",) if n == max(clients) else ()):
                say(f"concurrency, llama-server, {n} client(s), {mode} adapters" if mode != "distinct"
                    else f"concurrency, llama-server, {n} client(s), distinct prompts")

                def body(i: int, j: int, mixed: bool = mode == "mixed", distinct: bool = mode == "distinct") -> dict:
                    k = (i + j) % 2 if mixed and n_lora > 1 else 0
                    lora = [{"id": x, "scale": 1.0 if x == k else 0.0} for x in range(n_lora)]
                    return {"model": "base", "messages": _messages(i, j, distinct), "max_tokens": answer_tokens,
                            "temperature": 0.0, "lora": lora, "cache_prompt": True, "ignore_eos": True}

                run_load(port, 1, 1, body)
                res[f"{mode}_{n}"] = run_load(port, n, requests, body)
    return res
