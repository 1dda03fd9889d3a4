"""`edgeft export`: the exported base + PEFT folders, loaded by real transformers + PEFT, answer as
edgeft's Engine (real llama.cpp) does, greedy, on a tiny random llama (F32 GGUF, so both sides
compute the same function); and the client written with the export sends vLLM's documented LoRA
requests, which a real `edgeft serve` answers the same way.

The tests can fail: a missing or wrong q/k rotary un-permutation is refused by the export's round
trip, and a PEFT folder with permuted q rows is caught by the agreement measure.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from convert_helpers import ALL_SEVEN, make_peft, tiny  # noqa: E402

from edgeft.errors import ConversionError  # noqa: E402

pytestmark = pytest.mark.slow   # torch + transformers + peft and a server process: about 30 s

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
LABELS = ["positive", "negative", "neutral"]
CARDS = {
    "senti": {"system": "Classify the sentiment.", "template": "{input}",
              "output": {"type": "labels", "labels": LABELS}, "generation": {"max_tokens": 8, "temperature": 0.0}},
    "ents": {"system": "List the entities as JSON.", "template": "{input}",
             "output": {"type": "json_schema", "schema": {"type": "array", "items": {"type": "string"}}},
             "generation": {"max_tokens": 12, "temperature": 0.0}},
    "free": {"system": "Rewrite politely.", "template": "{input}", "output": {"type": "text"},
             "generation": {"max_tokens": 12, "temperature": 0.0, "stop": ["\n"]}},
}
PROMPTS = ["Acme shares jumped", "The battery died fast", "Meeting moved to Friday", "Great quarter for Bolt",
           "Tim met Ann in Paris", "Refund was refused"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny llama base GGUF with a chat template, and three bundles: two written by edgeft convert
    (no PEFT source inside), one that keeps its PEFT source in peft/ (as trained bundles do)."""
    import gguf

    from edgeft.convert.bundle import convert_adapter
    from edgeft.convert.gguf_rewrite import rewrite_gguf
    from edgeft.gguf_header import read_header

    tmp = tmp_path_factory.mktemp("export")
    model, plain = tiny("llama")
    base = tmp / "tiny-chat.gguf"
    rewrite_gguf(read_header(plain), base, types={}, produce=lambda n: None,
                 kv_set={"tokenizer.chat_template": (gguf.GGUFValueType.STRING, TEMPLATE),
                         "tokenizer.ggml.add_bos_token": (gguf.GGUFValueType.BOOL, False)})
    reg = tmp / "registry"
    pefts = {}
    for i, name in enumerate(CARDS):
        pdir = tmp / f"peft-{name}"
        make_peft(model, pdir, seed=10 + i, r=4, lora_alpha=8, target_modules=ALL_SEVEN)
        card = tmp / f"{name}.card.json"
        card.write_text(json.dumps({"name": name, "task": CARDS[name]}))
        convert_adapter(pdir, str(base), name=name, out_dir=reg / name, task_card=card)
        pefts[name] = pdir
    shutil.copytree(pefts["free"], reg / "free" / "peft")    # this one ships its source
    return {"tmp": tmp, "model": model, "base": base, "plain": plain, "reg": reg, "pefts": pefts}


def _export(world, out: Path, **kw):
    from edgeft.convert.export import export

    kw.setdefault("to", "hf")
    kw.setdefault("adapters", [str(world["reg"] / n) for n in CARDS])
    return export(out, base=str(world["base"]), **kw)


@pytest.fixture(scope="module")
def exported(world):
    return _export(world, world["tmp"] / "out-hf", verify=len(PROMPTS), prompts={n: PROMPTS for n in CARDS})


def test_export_layout_and_exact_base(world, exported):
    from safetensors.numpy import load_file

    out = exported.folder
    for f in ("README.md", "launch.sh", "client.py", "run_hf.py", "edgeft-export.json", "base/config.json",
              "base/model.safetensors", "base/tokenizer_config.json", "base/edgeft-export.json"):
        assert (out / f).is_file(), f
    assert os.access(out / "launch.sh", os.X_OK)
    meta = json.loads((out / "base" / "edgeft-export.json").read_text())
    assert meta["sha256"] == hashlib.sha256(world["base"].read_bytes()).hexdigest() and meta["dtype"] == "f32"
    # the base holds exactly the GGUF's weights (F32 here, so exactly the HF model they came from)
    saved = load_file(str(out / "base" / "model.safetensors"))
    for k, v in world["model"].state_dict().items():
        assert np.array_equal(saved[k], v.numpy()), k
    cfg = json.loads((out / "base" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    # also readable by the transformers 4.x that serving images pin (rope base, dtype, tokenizer class, template)
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] and cfg["torch_dtype"] == "float32"
    tc = json.loads((out / "base" / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and tc["chat_template"] == TEMPLATE
    for n in CARDS:
        a = out / "adapters" / n
        assert {"adapter_config.json", "adapter_model.safetensors", "adapter.json"} <= {p.name for p in a.iterdir()}
        assert json.loads((a / "adapter.json").read_text())["task"]["output"] == CARDS[n]["output"]
        assert json.loads((a / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"
    src = {a.name: a.source for a in exported.adapters}
    assert src == {"senti": "gguf", "ents": "gguf", "free": "peft"}
    assert all(a.round_trip < 1e-5 and a.rank == 4 for a in exported.adapters)


def test_peft_written_from_gguf_equals_the_trained_adapter(world, exported):
    """Module by module, scale * B @ A of the folder written from the GGUF equals the original PEFT
    adapter's: llama's q/k rows un-permuted, llama.cpp's scale folded back."""
    from edgeft.convert.peft import read_peft

    for name in ("senti", "ents"):
        orig = read_peft(world["pefts"][name]).modules
        got = read_peft(exported.folder / "adapters" / name).modules
        assert set(orig) == set(got)
        for key, m in orig.items():
            want = m.scale * m.b.astype(np.float64) @ m.a
            have = got[key].scale * got[key].b.astype(np.float64) @ got[key].a
            assert np.allclose(have, want, rtol=1e-5, atol=1e-6), key


def test_transformers_peft_reproduce_the_engine(exported):
    """Greedy answers identical on every prompt, identical prompt token ids (tokenizer + chat
    template), next-token top-1 agreement ~1 and KL ~0 along the answers."""
    r = exported.info.verify
    assert r["ok"] and r["label_identical_rate"] == 1.0
    for name, a in r["adapters"].items():
        assert a["n"] == len(PROMPTS) and a["identical_rate"] == 1.0, (name, a["differences"])
        assert a["prompt_tokens_identical_rate"] == 1.0, name
        assert a["top1"] >= 0.99 and a["kl_mean"] < 1e-4 and a["positions"] >= len(PROMPTS), (name, a)
    assert r["base"]["top1"] >= 0.99 and r["base"]["kl_mean"] < 1e-4
    answers = {a["kind"] for a in r["adapters"].values()}
    assert answers == {"labels", "json_schema", "text"}
    readme = (exported.folder / "README.md").read_text()
    assert "Agreement with edgeft" in readme and "label tasks identical: 100.0%" in readme


def test_wrong_rotary_permutation_is_caught(world, exported, monkeypatch, tmp_path):
    from edgeft.convert import export_peft
    from edgeft.convert.export_verify import verify_export
    from edgeft.convert.names import permute_rows
    from edgeft.convert.safetensors_np import read_safetensors, write_safetensors
    from edgeft.bundles import AdapterBundle

    # 1. an export that forgot to un-permute q/k is refused by its round trip, and leaves nothing
    monkeypatch.setattr(export_peft, "unpermute_rows", lambda b, n_head: b)
    with pytest.raises(ConversionError, match="computes another update than its GGUF"):
        _export(world, tmp_path / "bad", adapters=[str(world["reg"] / "senti")])
    assert not (tmp_path / "bad").exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # 2. a PEFT folder whose q rows are in llama.cpp's order: the agreement measure sees it
    bad = tmp_path / "corrupt"
    shutil.copytree(exported.folder, bad)
    st = bad / "adapters" / "ents" / "adapter_model.safetensors"
    tensors, _, _ = read_safetensors(st)
    for k in [k for k in tensors if re.search(r"\.(q|k)_proj\.lora_B\.weight$", k)]:
        tensors[k] = permute_rows(tensors[k], 4 if ".q_proj" in k else 2)
    write_safetensors(st, tensors, {"format": "pt"})
    r = verify_export(bad, world["base"], [AdapterBundle.load(world["reg"] / "ents")], n=len(PROMPTS),
                      prompts={"ents": PROMPTS})
    a = r["adapters"]["ents"]
    assert a["kl_mean"] > 1e-3 and a["top1"] < 0.9, a


def test_targets_launch_scripts_and_atomic_replace(world, exported, tmp_path, monkeypatch):
    from edgeft.convert import export as export_mod

    out = tmp_path / "v"
    res = _export(world, out, to="vllm", adapters=[str(world["reg"] / "senti"), str(world["reg"] / "free")])
    sh = (out / "launch.sh").read_text()
    assert "vllm serve ./base --served-model-name tiny-chat --dtype bfloat16" in sh
    assert "--enable-lora --max-lora-rank 8 --max-loras 2" in sh    # rank 4 -> vLLM's smallest allowed >= 4
    assert "--lora-modules senti=./adapters/senti free=./adapters/free" in sh and "--chat-template" in sh
    assert res.info.dtype == "bf16" and '"structured_outputs": {"choice"' in (out / "README.md").read_text()
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(ConversionError, match="already exists"):
        _export(world, out, to="vllm")
    # a failure half way through a replacing export leaves the old export as it was
    monkeypatch.setattr(export_mod, "export_adapter", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        _export(world, out, to="lorax", force=True)
    assert sorted(p.name for p in out.rglob("*")) == before and sorted(p.name for p in tmp_path.iterdir()) == ["v"]
    monkeypatch.undo()
    _export(world, out, to="lorax", force=True, adapters=[str(world["reg"] / "senti")])
    assert "--model-id /data/base" in (out / "launch.sh").read_text()
    cfg = json.loads((out / "adapters" / "senti" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "/data/base" and not (out / "adapters" / "free").exists()


def _cli(*args, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "EDGEFT_DEBUG"}
    return subprocess.run([sys.executable, "-m", "edgeft", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def test_cli_errors_are_one_line(world, tmp_path):
    for args, needle in ((["--to", "nope"], "unknown target 'nope'"),
                         (["--base", str(world["plain"])], "was made for another base")):
        r = _cli("export", str(tmp_path / "x"), "--adapters", str(world["reg"] / "senti"), "--base",
                 str(world["base"]), *args)
        assert r.returncode == 1, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert lines[0].startswith("error: ") and needle in lines[0] and len(lines) <= 2, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()


class _Recorder:
    """A loopback reverse proxy that records what a client sends, then forwards it."""

    def __init__(self, upstream: str):
        self.seen: list[tuple[str, str, dict | None]] = []
        rec = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _forward(self, body: bytes | None):
                rec.seen.append((self.command, self.path, json.loads(body) if body else None))
                req = urllib.request.Request(upstream + self.path, data=body, method=self.command,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=120) as r:
                    data = r.read()
                self.send_response(r.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def serve(world):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    log = world["tmp"] / "serve.out"
    env = {**os.environ, "EDGEFT_HOME": str(world["tmp"] / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("EDGEFT_API_KEY", None)
    with open(log, "w") as fo:
        proc = subprocess.Popen([sys.executable, "-m", "edgeft", "serve", "--port", "0", "--threads", "1",
                                 "--base", str(world["base"]), "--ctx", "512", "--adapter-dir", str(world["reg"]),
                                 "--adapters", ",".join(CARDS), "--log-level", "warning"],
                                stdout=fo, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        deadline, url = time.monotonic() + 90, None
        while url is None:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            m = re.search(r"edgeft serve: (http://127\.0\.0\.1:\d+)/v1", log.read_text())
            url = m.group(1) if m else None
            time.sleep(0.1)
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=5).read()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_client_sends_vllm_lora_requests_and_edgeft_serve_answers_them(world, exported, serve):
    """The export's client.py, unchanged, against a real edgeft serve: the requests it sends are the
    shapes vLLM documents for LoRA models (model = LoRA name, /v1/chat/completions, /v1/models
    listing the adapters, structured_outputs.choice / response_format json_schema), and the answers
    are the Engine's."""
    from edgeft.engine import Engine

    rec = _Recorder(serve)
    client = [sys.executable, str(exported.folder / "client.py"), "--base-url", rec.url + "/v1"]
    listed = subprocess.run([*client, "--list"], capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert set(CARDS) <= set(listed)
    answers = {}
    for name in CARDS:
        r = subprocess.run([*client, "--json", "--adapter", name, PROMPTS[0]], capture_output=True, text=True,
                           timeout=120, check=True)
        answers[name] = json.loads(r.stdout)["answer"]
    assert rec.seen[0][:2] == ("GET", "/v1/models")
    posts = {b["model"]: (p, b) for m, p, b in rec.seen if m == "POST"}
    assert set(posts) == set(CARDS) and all(p == "/v1/chat/completions" for p, _ in posts.values())
    for name, (_, body) in posts.items():
        card = CARDS[name]
        assert body["messages"] == [{"role": "system", "content": card["system"]},
                                    {"role": "user", "content": PROMPTS[0]}]
        assert body["max_tokens"] == card["generation"]["max_tokens"] and body["temperature"] == 0.0
    assert posts["senti"][1]["structured_outputs"] == {"choice": LABELS}
    assert posts["ents"][1]["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "ents", "schema": CARDS["ents"]["output"]["schema"]}}
    assert "response_format" not in posts["free"][1] and posts["free"][1]["stop"] == ["\n"]
    with Engine(str(world["base"]), n_ctx=512, n_threads=1) as eng:
        for name in CARDS:
            eng.load_adapter(world["reg"] / name)
            assert answers[name] == eng.run(PROMPTS[0], adapter=name).text, name
    assert answers["senti"] in LABELS


def test_client_compare_replays_edgefts_answers_against_a_server(exported, serve):
    """`edgeft export --verify` leaves edgeft's answers beside the export; client.py --compare asks
    a running server the same requests (on a GPU machine: vLLM) and counts identical answers. Against
    edgeft serve on the same base, every answer must be identical."""
    rows = [json.loads(x) for x in (exported.folder / "edgeft-answers.jsonl").read_text().splitlines()]
    assert {r["adapter"] for r in rows} == set(CARDS) and len(rows) == len(CARDS) * len(PROMPTS)
    r = subprocess.run([sys.executable, str(exported.folder / "client.py"), "--base-url", serve + "/v1",
                        "--compare", str(exported.folder / "edgeft-answers.jsonl")],
                       capture_output=True, text=True, timeout=300, check=True)
    for name in CARDS:
        assert f"{name:16} {len(PROMPTS)}/{len(PROMPTS)} identical to edgeft (100.0%)" in r.stdout, r.stdout
    bad = exported.folder.parent / "wrong-answers.jsonl"
    bad.write_text("".join(json.dumps({**x, "edgeft": x["edgeft"] + " not it"}) + "\n" for x in rows))
    r = subprocess.run([sys.executable, str(exported.folder / "client.py"), "--base-url", serve + "/v1",
                        "--compare", str(bad)], capture_output=True, text=True, timeout=300, check=True)
    assert f"0/{len(PROMPTS)} identical" in r.stdout


def test_compare_script_for_gpu_machines_is_valid_bash():
    from edgeft.convert.export_files import ExportInfo, compare_script

    for target, port in (("vllm", "8000"), ("lorax", "8080")):
        script = compare_script(ExportInfo(target, "b", "0" * 64, "b.gguf", "bf16", [], None, 16))
        assert f"PORT:-{port}" in script and "--compare edgeft-answers.jsonl" in script
        assert f"--engine {target}" in script
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_client_request_shapes_for_each_engine(exported):
    """client.py's mapping of a card onto a request, per engine (no server needed)."""
    import runpy

    client = runpy.run_path(str(exported.folder / "client.py"))
    card = json.loads((exported.folder / "adapters" / "senti" / "adapter.json").read_text())
    lorax = client["build_request"](card, "x", "lorax")
    assert lorax["model"] == "/data/adapters/senti" and lorax["adapter_source"] == "local"
    assert lorax["response_format"]["json_schema"]["schema"] == {"type": "string", "enum": LABELS}
    assert client["build_request"](card, "x", "vllm-legacy")["guided_choice"] == LABELS
    assert client["build_request"](card, "x", "edgeft") == {"model": "senti", "messages": [{"role": "user", "content": "x"}]}
