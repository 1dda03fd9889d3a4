"""`edgeft serve` end to end: a real server process (the CLI, on a free loopback port) with the tiny
base (tests/tiny_gguf.py: none of this needs real language) and random (B != 0) adapters, driven by
real clients (the `openai` package, httpx).

Greedy answers must equal the in-process Engine's / `edgeft run`'s whatever the interleaving; the
server must survive bad input, concurrency, a 1000-request soak (RSS bounded), client
disconnects mid-stream, and must never let a request name a file outside the adapter registry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from helpers import write_bundle  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-test-0123456789"
CTX = 8192           # --ctx: room for answers long enough to be cut off (the tiny base decodes ~3000 tok/s)
LIMIT = 8000         # --max-tokens-limit
BODY_KB = 64         # --max-body-kb
QUEUE = 8            # --queue
BASE_ID = "tiny-llama"   # the base's name in `model`: the tiny base's file stem (conftest.tiny_base)
SENTI = {"system": "Classify the sentiment of the text.", "template": "Text: {input}\nSentiment:",
         "output": {"type": "labels", "labels": ["positive", "negative", "neutral"]},
         "generation": {"max_tokens": 10, "temperature": 0.0}}   # the tiny base spells a label a character a token


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_base):
    reg = tmp_path_factory.mktemp("registry")
    # B large enough that even 8 greedy tokens differ between adapters and from the base
    write_bundle(reg / "a", tiny_base, name="a", seed=1, b_std=0.2)
    write_bundle(reg / "b", tiny_base, name="b", seed=2, b_std=0.2, rank=4)
    write_bundle(reg / "c", tiny_base, name="c", seed=3, b_std=0.3, targets=("attn_q", "attn_v"))
    write_bundle(reg / "senti", tiny_base, name="senti", seed=4, b_std=0.05, task=SENTI)
    outside = tmp_path_factory.mktemp("outside")
    write_bundle(outside / "evil", tiny_base, name="evil", seed=5, b_std=0.05)
    (reg / "link").symlink_to(outside / "evil", target_is_directory=True)   # a symlink escape
    return reg, outside


class Srv:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", KEY), max_retries=0,
                             timeout=120, **kw)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=30).json()

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory, tiny_base):
    reg, _ = registry
    tmp = tmp_path_factory.mktemp("serve")
    home = tmp / "home"
    home.mkdir()
    env = {**os.environ, "EDGEFT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("EDGEFT_API_KEY", None)
    # one llama.cpp thread: the HTTP side and the clients need the other core (and on a busy
    # machine 2 spinning threads are many times slower than 1)
    cmd = [sys.executable, "-m", "edgeft", "serve", "--base", str(tiny_base), "--port", "0", "--threads", "1",
           "--ctx", str(CTX),
           "--adapter-dir", str(reg), "--adapters", "a,senti", "--api-key", KEY, "--queue", str(QUEUE),
           "--max-tokens-limit", str(LIMIT), "--max-body-kb", str(BODY_KB), "--log-level", "warning"]
    out, err = tmp / "stdout.txt", tmp / "stderr.txt"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, cwd=REPO, env=env)
    try:
        url = None
        deadline = time.monotonic() + 180
        while url is None:
            assert proc.poll() is None, f"server exited: {err.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "server did not start"
            for line in out.read_text().splitlines():
                if line.startswith("edgeft serve: http://127.0.0.1:"):
                    url = line.split()[2].removesuffix("/v1")
            time.sleep(0.1)
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.1)
        srv = Srv(proc, url, err)
        yield srv
        srv.http.close()
        assert srv.health()["errors"] == 0, "a request hit an internal error: " + err.read_text()[-3000:]
        t0 = time.monotonic()
        proc.terminate()   # SIGTERM: drains the queue and stops at once
        proc.wait(20)
        assert time.monotonic() - t0 < 10
        assert "Traceback" not in err.read_text(), err.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def ref(registry, tiny_base):
    """The in-process Engine the server's answers must equal (same threads and context)."""
    from edgeft import Engine

    reg, _ = registry
    eng = Engine(str(tiny_base), n_ctx=CTX, n_threads=1, adapter_dirs=[str(reg)])
    for name in ("a", "b", "c", "senti"):
        eng.load_adapter(name, name=name)
    yield eng
    eng.close()


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _err(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in r.text
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


# -- OpenAI client: chat, completions, streaming, models ----------------------------------------
def test_models_list_and_health(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"   # no key needed
    ids = [m.id for m in server.client().models.list()]
    assert ids[0] == BASE_ID
    assert {"a", "b", "c", "senti"} <= set(ids)
    assert "link" not in ids and "evil" not in ids   # the symlink escaping the registry is not offered
    assert server.client().models.retrieve("a").id == "a"
    assert server.client().models.retrieve(f"{BASE_ID}:b").id == f"{BASE_ID}:b"
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("nope")


def test_openai_chat_and_completions_match_engine(server, ref):
    c = server.client()
    msgs = _user("Write one sentence about the sea.")
    want = ref.chat(msgs, adapter="a", max_tokens=8)
    r = c.chat.completions.create(model="a", messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.completion_tokens == want.completion_tokens
    assert r.usage.total_tokens == want.prompt_tokens + want.completion_tokens

    # streaming: same text in OpenAI chunks, usage in the last chunk when asked
    chunks = list(c.chat.completions.create(model="a", messages=msgs, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == want.completion_tokens and not chunks[-1].choices

    # completions, with the BASE:adapter form of `model`; max_completion_tokens on chat
    prompt = "The three primary colours are"
    want_b = ref.complete(prompt, adapter="b", max_tokens=8)
    r = c.completions.create(model=f"{BASE_ID}:b", prompt=prompt, max_tokens=8)
    assert r.choices[0].text == want_b.text and r.usage.prompt_tokens == want_b.prompt_tokens
    pieces = [ch.choices[0].text for ch in c.completions.create(model=f"{BASE_ID}:b", prompt=prompt,
                                                               max_tokens=8, stream=True)]
    assert "".join(pieces) == want_b.text
    want_base = ref.chat(msgs, adapter=None, max_tokens=8).text
    r = c.chat.completions.create(model=BASE_ID, messages=msgs, max_completion_tokens=8)
    assert r.choices[0].message.content == want_base != want.text

    # stop sequences (str and list) are honoured like the engine does
    want_stop = ref.chat(msgs, adapter="a", max_tokens=24, stop=[" "]).text
    r = c.chat.completions.create(model="a", messages=msgs, max_tokens=24, stop=" ")
    assert r.choices[0].message.content == want_stop and r.choices[0].finish_reason == "stop"

    # several adapters mixed with scales through the `adapters` extension field
    mix = {"a": 1.0, "c": 0.5}
    want_mix = ref.chat(msgs, adapter=mix, max_tokens=8).text
    r = c.chat.completions.create(model=BASE_ID, messages=msgs, max_tokens=8, extra_body={"adapters": mix})
    assert r.choices[0].message.content == want_mix
    assert r.model_extra["edgeft"]["adapters"] == mix


def test_task_card_rules(server, ref):
    c = server.client()
    text = "I love this phone, the battery lasts for days!"
    want = ref.run(text, adapter="senti")   # exactly what `edgeft run --adapter senti TEXT` answers
    r = c.chat.completions.create(model="senti", messages=_user(text))
    assert r.choices[0].message.content == want.text and want.text in SENTI["output"]["labels"]
    assert r.usage.prompt_tokens == want.prompt_tokens

    # a system message in the request replaces the card's; the template still wraps the input
    sys_msgs = [{"role": "system", "content": "You label text."}, {"role": "user", "content": text}]
    want_sys = ref.run(text, adapter="senti", system="You label text.")
    r = c.chat.completions.create(model="senti", messages=sys_msgs)
    assert r.choices[0].message.content == want_sys.text

    # response_format overrides the card's output constraint
    schema = {"type": "object", "properties": {"mood": {"enum": ["up", "down"]}}, "required": ["mood"]}
    r = c.chat.completions.create(model="senti", messages=_user(text), max_tokens=32,
                                  response_format={"type": "json_schema",
                                                   "json_schema": {"name": "m", "schema": schema}})
    assert json.loads(r.choices[0].message.content)["mood"] in ("up", "down")
    r = c.chat.completions.create(model="a", messages=_user("Give me a JSON object."), max_tokens=48,
                                  response_format={"type": "json_object"})
    assert r.choices[0].message.content.lstrip().startswith("{")

    # use_task_card=false: the card is ignored, the request is plain chat under the adapter
    want_raw = ref.chat(_user(text), adapter="senti", max_tokens=6).text
    r = c.chat.completions.create(model="senti", messages=_user(text), max_tokens=6,
                                  extra_body={"use_task_card": False})
    assert r.choices[0].message.content == want_raw


def test_prefix_is_reused_for_the_same_adapter_set(server):
    def ask(model, text):
        r = server.http.post("/v1/chat/completions", json={"model": model, "messages": _user(text), "max_tokens": 1})
        assert r.status_code == 200, r.text
        return r.json()["edgeft"]

    ask("b", "Tell me about rivers.")
    assert ask("b", "Tell me about lakes.")["reused_prefix"] > 10   # the chat template's system prompt
    assert ask("c", "Tell me about lakes.")["reused_prefix"] == 0    # never across a swap


# -- concurrency: answers independent of interleaving --------------------------------------------
def test_concurrent_clients_get_the_sequential_answers(server):
    # short prompts (a one-word system message replaces the template's default one) and 6 tokens:
    # the cost is the engine's
    brief = [{"role": "system", "content": "Be brief."}]
    combos = [(kind, model, text) for model in ("a", "b", "c", BASE_ID)
              for kind, text in (("chat", "Name a fruit."), ("completion", "Once upon a"),
                                 ("completion", "The capital of France is"))]
    c = server.client()

    def ask(client, combo) -> str:
        kind, model, text = combo
        if kind == "chat":
            msgs = brief + _user(text)
            return client.chat.completions.create(model=model, messages=msgs, max_tokens=6).choices[0].message.content
        return client.completions.create(model=model, prompt=text, max_tokens=6).choices[0].text

    sequential = {combo: ask(c, combo) for combo in combos}
    for kind, text in {(k, t) for k, _, t in combos}:
        assert len({sequential[(kind, m, text)] for m in ("a", "b", "c", BASE_ID)}) >= 3, \
            "the adapters must change the answers, else nothing is tested"

    n_threads, per_thread = 8, 25
    lat: list[float] = []

    def worker(i: int) -> list[tuple]:
        cl = server.client()
        out = []
        for j in range(per_thread):
            combo = combos[(i * 5 + j) % len(combos)]   # each thread moves to another adapter every request
            t0 = time.perf_counter()
            out.append((combo, ask(cl, combo)))
            lat.append(time.perf_counter() - t0)
        return out

    cpu0, t0 = server.cpu_s(), time.perf_counter()
    with cf.ThreadPoolExecutor(n_threads) as ex:
        results = [r for rs in ex.map(worker, range(n_threads)) for r in rs]
    wall, cpu = time.perf_counter() - t0, server.cpu_s() - cpu0
    assert len(results) == n_threads * per_thread
    wrong = [(combo, got, sequential[combo]) for combo, got in results if got != sequential[combo]]
    assert not wrong, wrong[:5]
    health = server.health()
    if health["mixed_adapter_batches"]:   # patch 0003: answers under different adapters shared steps
        assert health["mixed_steps"] > 0, health
    lat.sort()
    print(f"\nconcurrency: {len(results)} requests in {wall:.1f} s (server CPU {cpu:.1f} s), latency p50 "
          f"{statistics.median(lat) * 1e3:.0f} ms, p95 {lat[int(len(lat) * 0.95)] * 1e3:.0f} ms")


# -- robustness ----------------------------------------------------------------------------------
def test_bad_input_gets_openai_errors_never_500(server):
    h = server.http
    chat = "/v1/chat/completions"
    ok = {"model": "a", "messages": _user("hi"), "max_tokens": 1}
    as_json = {"Content-Type": "application/json"}
    _err(h.post(chat, content=b"{not json", headers=as_json), 400)
    _err(h.post(chat, content=b"\xff\xfe\x00garbage", headers=as_json), 400)
    _err(h.post(chat, content=b"", headers=as_json), 400)
    _err(h.post(chat, json=[1, 2]), 400)
    _err(h.post(chat, content=b"[" * 100000 + b"]" * 100000, headers=as_json), 413)
    _err(h.post(chat, content=b"[" * 20000 + b"]" * 20000, headers=as_json), 400)   # deep nesting, small body
    # not JSON: what a web page may send cross-site without a CORS preflight
    _err(h.post(chat, content=json.dumps(ok).encode(), headers={"Content-Type": "text/plain"}), 415)
    _err(h.post(chat, data={"model": "a"}), 415)
    # a loopback server answers only to loopback Host names (no DNS rebinding)
    _err(h.post(chat, json=ok, headers={"Host": "evil.example"}), 403, "host_not_allowed")
    _err(httpx.get(server.url + "/health", headers={"Host": "attacker.test:80"}), 403)
    assert h.get("/health", headers={"Host": "localhost"}).status_code == 200
    bad = [
        ({"messages": _user("hi")}, "model"), ({**ok, "model": 5}, "model"),
        ({**ok, "messages": "hi"}, "messages"), ({**ok, "messages": []}, "messages"),
        ({**ok, "messages": [{"content": "x"}]}, "messages"), ({**ok, "messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({**ok, "messages": [{"role": "user", "content": 5}]}, "messages"),
        ({**ok, "messages": [{"role": "user", "content": "  "}]}, "messages"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
        ({**ok, "max_tokens": "8"}, "max_tokens"), ({**ok, "max_tokens": 0}, "max_tokens"),
        ({**ok, "max_tokens": LIMIT + 1}, "max_tokens"), ({**ok, "max_tokens": True}, "max_tokens"),
        ({**ok, "temperature": "hot"}, "temperature"), ({**ok, "temperature": 9}, "temperature"),
        ({**ok, "top_p": -1}, "top_p"), ({**ok, "stop": 5}, "stop"), ({**ok, "stop": [""]}, "stop"),
        ({**ok, "stop": ["x"] * 17}, "stop"), ({**ok, "stop": "x" * 257}, "stop"), ({**ok, "stop": "\ud800"}, "stop"),
        ({**ok, "messages": [{"role": "user", "content": "a\ud800b"}]}, "messages"), ({**ok, "top_k": 10 ** 30}, "top_k"),
        ({**ok, "seed": "x"}, "seed"), ({**ok, "n": 2}, "n"), ({**ok, "stream": "yes"}, "stream"),
        ({**ok, "ignore_eos": "yes"}, "ignore_eos"),
        ({**ok, "adapters": {"c": "big"}}, "adapters"), ({**ok, "adapters": 7}, "adapters"),
        ({**ok, "response_format": {"type": "xml"}}, "response_format"),
        ({**ok, "response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "https://example.com/s.json"}}}}, "response_format"),
        ({**ok, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "frob"}}}}, "response_format"),
    ] + [  # schemas whose grammar would nest deeper than llama.cpp can parse (20000 levels crash it)
        ({**ok, "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}, "response_format")
        for schema in ({"type": "string", "maxLength": 20000}, {"type": "array", "minItems": 5000},
                       {"type": "string", "pattern": "^a{0,20000}$"},
                       {"type": "string", "pattern": "(" * 1500 + "a" + ")" * 1500},
                       {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(300)}})
    ]
    for body, param in bad:   # json.dumps escapes lone surrogates as \\udXXX, which httpx's json= cannot send
        e = _err(h.post(chat, content=json.dumps(body), headers=as_json), 400)
        assert e["param"] == param, (body, e)
    for model in ("nope", "../a", "/etc/passwd", "a/../../evil", "link", "evil", "other-base:a", "a.gguf"):
        _err(h.post(chat, json={**ok, "model": model}), 404, "model_not_found")
    _err(h.post(chat, json={**ok, "adapters": {"../../evil": 1.0}}), 404, "model_not_found")
    _err(h.post("/v1/completions", json={"model": "a", "prompt": ""}), 400)
    _err(h.post("/v1/completions", json={"model": "a", "prompt": [1, 2, 3]}), 400)
    _err(h.post("/v1/completions", json={"model": "a", "prompt": "x", "echo": True}), 400)
    _err(h.post("/v1/completions", content=json.dumps({"model": "a", "prompt": "\udfff"}), headers=as_json), 400)
    # odd but valid input is answered
    for body in ({**ok, "messages": _user("nul \x00 byte")}, {**ok, "seed": -(10 ** 30)}, {**ok, "top_k": 50, "min_p": 0.1},
                 {**ok, "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}):
        assert h.post(chat, json=body).status_code == 200, body
    e = _err(h.post(chat, json={**ok, "messages": _user("hello " * (CTX // 5))}), 400, "context_length_exceeded")
    assert str(CTX) in e["message"]
    # body size: by Content-Length, and by counting a chunked body without one
    _err(h.post(chat, json={**ok, "messages": _user("x" * (BODY_KB * 1024))}), 413, "request_too_large")
    _err(h.post(chat, content=iter([b'{"model": "a", "messages": [{"role": "user", "content": "', b"x" * 70000, b'"}]}']),
                headers=as_json), 413, "request_too_large")
    _err(h.get("/v1/nowhere"), 404)
    _err(h.get(chat), 405)
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope", messages=_user("hi"))
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="a", messages=[])
    assert server.health()["errors"] == 0
    assert h.post(chat, json=ok).status_code == 200   # and it still answers


def test_api_key_on_every_route_but_health(server):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                         ("GET", "/v1/adapters"), ("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/a"),
                         ("GET", "/v1/nowhere")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}x"},
                        {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
            r = httpx.request(method, server.url + path, headers=headers, json={"name": "a"})
            _err(r, 401, "invalid_api_key")
    assert httpx.get(server.url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    assert "a" in [a["name"] for a in server.http.get("/v1/adapters").json()["data"]]   # DELETE was refused


def test_adapters_load_unload_and_no_escape_from_registry(server, registry):
    _, outside = registry
    h = server.http
    rows = {a["name"]: a for a in h.get("/v1/adapters").json()["data"]}
    assert rows["a"]["loaded"] and rows["senti"]["task"] == "labels"
    assert "link" not in rows and "evil" not in rows
    r = h.post("/v1/adapters", json={"path": "c", "name": "c2"})
    assert r.status_code == 201 and r.json()["name"] == "c2", r.text
    assert h.post("/v1/adapters", json={"path": "c", "name": "c2"}).status_code == 200   # idempotent
    _err(h.post("/v1/adapters", json={"path": "b", "name": "c2"}), 409)                # name taken
    ask = {"messages": _user("Name a fruit."), "max_tokens": 6}
    same = [h.post("/v1/chat/completions", json={**ask, "model": m}).json()["choices"][0]["message"]["content"]
            for m in ("c", "c2")]
    assert same[0] == same[1]
    assert h.delete("/v1/adapters/c2").status_code == 200
    _err(h.delete("/v1/adapters/c2"), 404)
    _err(h.post("/v1/chat/completions", json={**ask, "model": "c2"}), 404, "model_not_found")  # alias gone
    assert h.request("DELETE", "/v1/adapters", json={"name": "c"}).status_code in (200, 404)
    # a registered adapter unloaded at run time loads again on its next request
    assert h.post("/v1/chat/completions", json={**ask, "model": "c"}).json()["choices"][0]["message"]["content"] == same[0]

    evil = outside / "evil"
    for body in ({"path": "../" + outside.name + "/evil"}, {"path": str(evil)}, {"path": str(evil / "adapter.gguf")},
                 {"path": "a/../../" + outside.name + "/evil"}, {"path": "link"}, {"path": "link/adapter.gguf"},
                 {"path": "~/evil"}, {"path": "a\x00"}, {"name": "../evil"}, {"name": str(evil)},
                 {"path": "a", "name": "../x"}, {"path": ""}, {"name": 5}, {}):
        r = h.post("/v1/adapters", json=body)
        assert r.status_code in (400, 404), (body, r.status_code, r.text)
        _err(r, r.status_code)
    names = [a["name"] for a in h.get("/v1/adapters").json()["data"]]
    assert "evil" not in names and not any("/" in n for n in names)


def test_full_queue_answers_503(server):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=120) as ac:
            # 1000 tokens: ~0.3 s each, so the burst arrives while the first answers run
            body = {"model": "b", "messages": _user("Write a list of animals."), "max_tokens": 1000}
            return await asyncio.gather(*(ac.post("/v1/chat/completions", json=body) for _ in range(QUEUE + 12)))

    rs = asyncio.run(burst())
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 1, codes
    r503 = next(r for r in rs if r.status_code == 503)
    _err(r503, 503, "server_overloaded")
    assert r503.headers["retry-after"] == "1"
    assert server.health()["rejected"] >= 1


def test_client_disconnect_mid_stream_frees_the_engine(server):
    before = server.health()
    body = {"model": BASE_ID, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": LIMIT, "stream": True}
    got = []
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as cl:
        with cl.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    got.append(json.loads(line[6:])["choices"][0]["text"])
                if len(got) >= 3:
                    break
    t_close = time.perf_counter()   # leaving both blocks closed the connection
    while True:
        h = server.health()
        if not h["busy"] and h["cancelled"] > before["cancelled"]:
            break
        assert time.perf_counter() - t_close < 30, h
        time.sleep(0.05)
    freed_ms = (time.perf_counter() - t_close) * 1e3
    t0 = time.perf_counter()
    r = server.http.post("/v1/completions", json={"model": BASE_ID, "prompt": "Hello", "max_tokens": 1})
    assert r.status_code == 200
    next_ms = (time.perf_counter() - t0) * 1e3
    after = server.health()
    assert after["served"] == before["served"] + 1    # the abandoned stream was stopped, not finished
    print(f"\ndisconnect: engine free {freed_ms:.0f} ms after the client left; next request {next_ms:.0f} ms")


def test_a_client_leaving_a_batch_leaves_the_other_answers_whole(server):
    """Requests for one adapter set share decode steps (continuous batching); a streaming client
    that disconnects mid-batch stops only its own answer."""
    prompts = ["Once upon a", "The capital of France is", "1, 2, 3,", "Dear friend,"]

    def ask(p: str) -> dict:
        r = server.http.post("/v1/completions", json={"model": "a", "prompt": p, "max_tokens": 1200,
                                                       "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()

    alone = [ask(p) for p in prompts]
    assert all(a["usage"]["completion_tokens"] == 1200 and a["choices"][0]["finish_reason"] == "length"
               for a in alone)   # ignore_eos: every answer runs to max_tokens
    before = server.health()

    def leaver() -> int:
        body = {"model": "a", "prompt": "Hello there", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        n = 0
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as cl:
            with cl.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    n += line.startswith("data: {")
                    if n >= 20:
                        break
        return n

    with cf.ThreadPoolExecutor(5) as ex:
        left = ex.submit(leaver)
        together = list(ex.map(ask, prompts))
        assert left.result() >= 20
    for a, t in zip(alone, together):
        # whole answers, from the right prompt and adapter: the first token comes from prompt
        # logits, computed alike alone and together. Later decode steps of several answers use
        # llama.cpp's batched kernels, which round differently, and this random model's greedy
        # answers part at near ties within a few tokens (7-511 characters in-process), so the
        # bit-for-bit checks of short batched answers are in tests/test_continuous.py
        assert t["usage"]["completion_tokens"] == 1200 and t["choices"][0]["finish_reason"] == "length"
        assert t["choices"][0]["text"][:1] == a["choices"][0]["text"][:1]
    h = server.health()
    assert h["largest_batch"] >= 3, h              # the answers really shared decode steps
    assert h["cancelled"] == before["cancelled"] + 1 and h["served"] == before["served"] + 4, (before, h)


def test_soak_1000_requests_rss_stays_flat(server):
    """Mostly 1-token completions of one prompt (the engine reuses all but 2 prompt tokens, so each
    costs one small decode), every 20th a chat request, every other one streamed, every 50th on
    the base: all code paths, little compute."""
    msgs = [{"role": "system", "content": "Hi"}, {"role": "user", "content": "Say 1."}]

    def one(client, i: int) -> None:
        model, mt, stream = (BASE_ID if i % 50 == 49 else "a"), 1 + (i % 7 == 0), i % 2 == 1
        if i % 20 == 10:
            r = client.chat.completions.create(model=model, messages=msgs, max_tokens=mt, stream=stream)
        else:
            r = client.completions.create(model=model, prompt="Count: 1, 2,", max_tokens=mt, stream=stream)
        if stream:
            r = list(r)
            assert r[-1].choices[0].finish_reason in ("stop", "length")
        else:
            assert r.usage.completion_tokens <= mt

    def run(n: int, threads: int = 4) -> float:
        def w(t):
            cl = server.client()
            for i in range(t, n, threads):
                one(cl, i)
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(threads) as ex:
            list(ex.map(w, range(threads)))
        return time.perf_counter() - t0

    run(100)
    rss0, cpu0 = server.rss_kb(), server.cpu_s()
    served0 = server.health()["served"]
    wall = run(1000)
    rss1, cpu = server.rss_kb(), server.cpu_s() - cpu0
    assert server.health()["served"] - served0 == 1000
    print(f"\nsoak: 1000 requests in {wall:.1f} s ({1000 / wall:.0f} req/s, server CPU {cpu / 1000 * 1e3:.0f} ms/request), "
          f"RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MB ({(rss1 - rss0) / 1024:+.1f} MB)")
    assert rss1 - rss0 < 16 * 1024, (rss0, rss1)


# -- no server needed ----------------------------------------------------------------------------
def test_busy_port_is_a_clear_cli_error(capsys):
    from edgeft.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(SystemExit) as ex:
            main(["serve", "--port", str(s.getsockname()[1]), "--log-level", "warning"])
    assert ex.value.code == 1
    err = capsys.readouterr().err
    assert "error: cannot listen on 127.0.0.1" in err and "hint:" in err


def test_affinity_scheduling_is_bounded():
    """The worker prefers the adapter set already applied, but passes a waiting job over at most
    AFFINITY_SKIPS times."""
    from edgeft.server import AFFINITY_SKIPS, Job, Worker

    async def order() -> list[str]:
        w = Worker(engine=None, queue_size=100, planner=None)   # not started: _pick is driven by hand
        jobs = [Job(lambda e, j: None, key=k) for k in ["X"] + ["A"] * 10]
        for j in jobs:
            w.submit(j)
        w._last_key = "A"
        picked = []
        while w._pending:
            job = w._pick()
            picked.append(job.key)
            w._last_key = job.key
        return picked

    picked = asyncio.run(order())
    assert picked.index("X") == AFFINITY_SKIPS
    assert sorted(picked) == sorted(["X"] + ["A"] * 10)


def test_is_loopback():
    from edgeft.server import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("example.com")
