"""The concurrency phase: edgeft's own HTTP server, in this process on a loopback port, under 1, 4
and 8 concurrent clients; optionally llama.cpp's `llama-server` under the same load.

Each client sends `requests` chat requests one after another (a fixed system prompt, a short user
input, `answer_tokens` greedy tokens). Loads: every request for the first adapter ("same"), or
the two first adapters alternating from request to request and client to client ("mixed"); the
8-client loads also run with the prompt cache off. Reported per load: generated tokens per
second over the load's wall time, request latency p50 / p90, and the edgeft server's largest
batch. llama-server (`--llama-server PATH`, built from the same llama.cpp) gets the same model,
threads and adapters (`--lora`, chosen per request with its `lora` field) and `-np` = clients.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import InputError
from .cache import INPUTS, SYSTEM
from .stats import _ratio, dist

ANSWER_TOKENS = 48
CLIENTS = (1, 4, 8)


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
    tokens = [0]
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
                lat.append(time.perf_counter() - t0)
                tokens[0] += int(out["usage"]["completion_tokens"])

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
            "latency_s": dist(lat)}


def _messages(i: int, j: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": INPUTS[(3 * i + j) % len(INPUTS)]}]


@contextlib.contextmanager
def edgeft_server(eng: Any):
    """The real edgeft server (starlette app under uvicorn) for `eng`, on a free loopback port."""
    import uvicorn

    from ..server import ServerConfig, bind_socket
    from ..server.app import Server

    sock = bind_socket("127.0.0.1", 0)
    srv = Server(eng, ServerConfig(queue_size=256, max_tokens_limit=4096))
    userver = uvicorn.Server(uvicorn.Config(srv.app(), log_level="error", lifespan="on", access_log=False))
    thread = threading.Thread(target=userver.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not userver.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the edgeft server did not start")
            time.sleep(0.02)
        yield srv, sock.getsockname()[1]
    finally:
        userver.should_exit = True
        thread.join(30)
        sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(binary: str | os.PathLike, base: Path, adapters: Sequence[Path], *, threads: int, ctx: int,
                 parallel: int):
    """llama.cpp's llama-server on the same model, threads and adapters (none applied by default)."""
    port = _free_port()
    cmd = [str(binary), "-m", str(base), "--port", str(port), "--host", "127.0.0.1", "-t", str(threads),
           "-tb", str(threads), "-c", str(ctx), "-np", str(parallel), "--lora-init-without-apply",
           "--no-webui", "-lv", "0"]
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
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            if time.monotonic() > deadline:
                raise InputError("llama-server did not answer /health within 120 s")
            time.sleep(0.25)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def concurrency_phase(eng: Any, names: Sequence[str], *, requests: int, say, clients: Sequence[int] = CLIENTS,
                      answer_tokens: int = ANSWER_TOKENS, llama_server_bin: str | os.PathLike | None = None,
                      adapter_paths: Sequence[Path] = ()) -> dict:
    """{load: result} for edgeft's server (and llama-server when given), plus the ratios."""
    from ..prompt_cache import PromptCache

    pair = list(names[:2]) if len(names) > 1 else [names[0], names[0]]

    def edgeft_body(mixed: bool) -> Callable[[int, int], dict]:
        return lambda i, j: {"model": pair[(i + j) % 2] if mixed else pair[0], "messages": _messages(i, j),
                             "max_tokens": answer_tokens, "temperature": 0.0, "ignore_eos": True}

    out: dict[str, Any] = {"answer_tokens": answer_tokens, "requests_per_client": requests,
                           "parallel": eng.parallel, "edgeft": {}}
    saved = eng.prompt_cache
    try:
        with edgeft_server(eng) as (srv, port):
            for mode in ("same", "mixed"):
                for n in clients:
                    for cache in (("on", "off") if n == max(clients) else ("on",)):
                        eng.prompt_cache = saved if cache == "on" else PromptCache(0.0)
                        say(f"concurrency, edgeft server, {n} client(s), {mode} adapters, prompt cache {cache}")
                        run_load(port, 1, 1, edgeft_body(mode == "mixed"))   # warm-up
                        srv.worker.peak = 0
                        r = run_load(port, n, requests, edgeft_body(mode == "mixed"))
                        r["largest_batch"] = srv.worker.peak
                        out["edgeft"][f"{mode}_{n}_cache_{cache}"] = r
    finally:
        eng.prompt_cache = saved
    top, one = out["edgeft"].get(f"same_{max(clients)}_cache_on"), out["edgeft"].get(f"same_{min(clients)}_cache_on")
    if top and one and max(clients) == 8 and min(clients) == 1:
        out["eight_over_one_same"] = _ratio(top["tps"], one["tps"])
    if llama_server_bin:
        out["llama_server"] = _llama_server_loads(eng, pair, names, adapter_paths, llama_server_bin, requests,
                                                  clients, answer_tokens, say)
        for key, r in out["llama_server"].items():
            mine = out["edgeft"].get(f"{key}_cache_on")
            if mine:
                out.setdefault("edgeft_over_llama_server", {})[key] = _ratio(mine["tps"], r["tps"])
    return out


def _llama_server_loads(eng, pair, names, adapter_paths, binary, requests, clients, answer_tokens, say) -> dict:
    ids = {n: i for i, n in enumerate(names)}
    res: dict[str, Any] = {}
    for n in clients:
        with llama_server(binary, Path(eng.base.path), adapter_paths, threads=eng.n_threads, ctx=eng.n_ctx,
                          parallel=n) as port:
            for mode in ("same", "mixed"):
                say(f"concurrency, llama-server, {n} client(s), {mode} adapters")

                def body(i: int, j: int, mixed=mode == "mixed") -> dict:
                    name = pair[(i + j) % 2] if mixed else pair[0]
                    lora = [{"id": k, "scale": 1.0 if k == ids[name] else 0.0} for k in range(len(names))]
                    return {"model": "base", "messages": _messages(i, j), "max_tokens": answer_tokens,
                            "temperature": 0.0, "lora": lora, "cache_prompt": True, "ignore_eos": True}

                run_load(port, 1, 1, body)
                res[f"{mode}_{n}"] = run_load(port, n, requests, body)
    return res

