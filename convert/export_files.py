"""The text files of an export: README.md, the launch script for the target, client.py and run_hf.py.

client.py is the one place that says how a task card maps onto an OpenAI request; it imports only
the standard library so that it runs wherever the export is served, and the tests run this very
file against `edgeft serve`.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field

# vLLM accepts only these values for --max-lora-rank (vllm/config/lora.py, MaxLoRARanks).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LORAX_IMAGE = "ghcr.io/predibase/lorax:main"


def vllm_rank(r: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds rank r."""
    for v in VLLM_RANKS:
        if v >= r:
            return v
    raise ValueError(f"rank {r} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})")


@dataclass
class ExportInfo:
    target: str
    base_id: str
    base_sha256: str
    gguf_name: str
    dtype: str
    adapters: list[dict]                 # {"name", "rank", "source", "card": dict}
    chat_template_file: str | None
    max_lora_rank: int
    verify: dict | None = None
    notes: list[str] = field(default_factory=list)


def compare_script(info: ExportInfo) -> str:
    """vllm / lorax exports with --verify: start the server, replay edgeft's answers, stop it
    (for a GPU machine; edgeft's tests never need one)."""
    port, engine = ("8000", "vllm") if info.target == "vllm" else ("8080", "lorax")
    return f"""#!/usr/bin/env bash
# Written by `edgeft export --verify`. On a machine that runs {info.target} (a GPU): starts the server
# from this folder, sends edgeft's prompts (edgeft-answers.jsonl), counts identical answers, stops it.
set -euo pipefail
cd "$(dirname "$0")"
export PORT="${{PORT:-{port}}}"
./launch.sh > server.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 900); do
  python3 client.py --base-url "http://127.0.0.1:$PORT/v1" --list >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || {{ echo "compare.sh: the server stopped; see server.log" >&2; exit 1; }}
  sleep 1
done
python3 client.py --engine {engine} --base-url "http://127.0.0.1:$PORT/v1" --compare edgeft-answers.jsonl
"""


def launch_script(info: ExportInfo) -> str:
    """A bash script that starts the target's server on this export (run from anywhere)."""
    head = "#!/usr/bin/env bash\n# Written by `edgeft export`. Serves the dequantized base and its LoRA adapters.\n" \
           'set -euo pipefail\ncd "$(dirname "$0")"\n'
    if info.target == "vllm":
        mods = " ".join(f"{a['name']}=./adapters/{a['name']}" for a in info.adapters)
        tmpl = f" --chat-template ./base/{info.chat_template_file}" if info.chat_template_file else ""
        vdtype = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[info.dtype]
        return head + (f"exec vllm serve ./base --served-model-name {shlex.quote(info.base_id)} --dtype {vdtype}{tmpl} \\\n"
                       f"  --enable-lora --max-lora-rank {info.max_lora_rank} --max-loras {min(len(info.adapters), 8)} \\\n"
                       f"  --lora-modules {mods} \\\n  --port \"${{PORT:-8000}}\" \"$@\"\n")
    if info.target == "lorax":
        return head + ("# Adapters are loaded per request: model=/data/adapters/NAME with \"adapter_source\": \"local\".\n"
                       "exec docker run --gpus all --shm-size 1g -p \"${PORT:-8080}\":80 -v \"$PWD\":/data \\\n"
                       f"  {LORAX_IMAGE} --model-id /data/base \"$@\"\n")
    return head + 'exec python3 run_hf.py "$@"\n'


def _mapping_rows(info: ExportInfo) -> list[str]:
    rows = ["| adapter | rank | PEFT written from | system prompt | output constraint | vLLM request fields | LoRAX request fields |",
            "|---|---|---|---|---|---|---|"]
    for a in info.adapters:
        task = a["card"].get("task") or {}
        out = task.get("output") or {}
        kind = out.get("type", "text")
        if kind == "labels":
            cons = f"one of {len(out['labels'])} labels"
            vl, lx = '`"structured_outputs": {"choice": [...labels]}` (before vLLM 0.12: `"guided_choice"`)', \
                '`response_format` json_schema `{"type": "string", "enum": [...]}` (answer is a JSON string)'
        elif kind == "json_schema":
            cons = "JSON schema"
            vl = lx = '`"response_format": {"type": "json_schema", "json_schema": {"name": ..., "schema": ...}}`'
        elif kind == "grammar":
            cons, vl, lx = "GBNF grammar", '`"structured_outputs": {"grammar": ...}`', "none (LoRAX has no grammar)"
        else:
            cons, vl, lx = "free text", "none", "none"
        system = (task.get("system") or "").replace("|", "\\|")
        system = (system[:60] + "...") if len(system) > 63 else system
        src = {"peft": "the bundle's PEFT source", "gguf": "its adapter.gguf"}.get(a["source"], a["source"])
        rows.append(f"| `{a['name']}` | {a['rank']} | {src} | {system or '-'} | {cons} | {vl} | {lx} |")
    return rows


def readme(info: ExportInfo) -> str:
    """What is in the folder, how to start it, and how requests carry each task card."""
    start = {"vllm": "./launch.sh            # vllm serve ... --enable-lora --lora-modules NAME=PATH ...",
             "lorax": "./launch.sh            # LoRAX in docker, this folder mounted at /data",
             "hf": "./launch.sh \"text\" --adapter NAME   # transformers + PEFT in this process"}[info.target]
    url = {"vllm": "http://127.0.0.1:8000/v1", "lorax": "http://127.0.0.1:8080/v1", "hf": ""}[info.target]
    names = ", ".join(f"`{a['name']}`" for a in info.adapters)
    lines = [
        f"# edgeft export for {info.target}: `{info.base_id}` and {len(info.adapters)} adapter(s)", "",
        f"- `base/`: the base as a Hugging Face model folder ({info.dtype}): exactly the weights of "
        f"`{info.gguf_name}` (sha256 `{info.base_sha256}`), dequantized, which the adapters were trained and "
        "evaluated on. The original Hugging Face checkpoint is *not* the same model: serving the adapters on it "
        "would quietly change their answers. `base/edgeft-export.json` records the GGUF and its sha256.",
        f"- `adapters/NAME/`: each adapter as a PEFT LoRA folder (adapter_config.json, adapter_model.safetensors) "
        f"with its task card `adapter.json` beside it: {names}.",
        "- `launch.sh`: starts the server; `client.py`: the OpenAI requests for each task (standard library only); "
        "`run_hf.py`: the same answers with transformers + PEFT, no server.", "",
        "## Start", "", "```bash", start, "```", "",
    ]
    if info.target == "vllm":
        lines += [f"vLLM routes by `model`: the base is `{info.base_id}`, each adapter its own name (`GET /v1/models` "
                  f"lists them). `--max-lora-rank {info.max_lora_rank}` holds the largest adapter rank. The chat "
                  "template is the base's own (`base/" + (info.chat_template_file or "tokenizer_config.json") + "`).", ""]
    elif info.target == "lorax":
        lines += ["LoRAX loads an adapter on its first request: `model` is the adapter's path inside the container "
                  "(`/data/adapters/NAME`) and the request carries `\"adapter_source\": \"local\"` (client.py "
                  "`--engine lorax` sends both). The adapters' `base_model_name_or_path` is `/data/base`, the "
                  "launcher's `--model-id`.", ""]
    lines += ["## Requests: the same on edgeft serve and " + ("vLLM / LoRAX" if info.target == "hf" else "here"), "",
              f"```bash\npython3 client.py --base-url {url or 'http://127.0.0.1:8080/v1'} --adapter NAME \"text\"   "
              "# prints the answer; --json shows the request\npython3 client.py --base-url URL --list\n```", "",
              "Each request carries the card's system prompt, its template applied to the input, its generation "
              "defaults (`max_tokens`, `temperature` 0 = greedy, `stop`) and its output constraint. `edgeft serve` "
              "answers the same request with the same answer (it ignores `structured_outputs` and applies the card's "
              "own constraint, which is the same).", ""]
    lines += _mapping_rows(info) + [""]
    if info.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in info.notes] + [""]
    if info.verify:
        lines += ["## Agreement with edgeft (measured at export)", "", "```", format_verify(info.verify), "```", "",
                  "`edgeft-answers.jsonl` holds edgeft's greedy answer to each of these prompts. With the server "
                  "running (a GPU machine for vLLM / LoRAX), `python3 client.py --base-url URL --compare "
                  "edgeft-answers.jsonl` sends the same requests and counts the identical answers per adapter.", ""]
    return "\n".join(lines)


def format_verify(r: dict) -> str:
    out = [f"transformers + PEFT on this folder vs edgeft (llama.cpp on {r.get('gguf', 'the GGUF')}), greedy:",
           f"{'adapter':16} {'kind':12} {'n':>4} {'identical':>9} {'prompt ids':>10} {'top-1':>7} {'mean KL':>9}"]
    for name, a in r["adapters"].items():
        out.append(f"{name:16} {a['kind']:12} {a['n']:4d} {a['identical_rate'] * 100:8.1f}% "
                   f"{a['prompt_tokens_identical_rate'] * 100:9.1f}% {a['top1'] * 100:6.2f}% {a['kl_mean']:9.2e}")
    if r.get("base"):
        b = r["base"]
        out.append(f"{'(base, no adapter)':16} {'prompts':12} {b['prompts']:4d} {'':>9} {'':>10} "
                   f"{b['top1'] * 100:6.2f}% {b['kl_mean']:9.2e}")
    lab = r.get("label_identical_rate")
    out.append(f"label tasks identical: {'-' if lab is None else f'{lab * 100:.1f}%'} (target >= "
               f"{r['target'] * 100:.0f}%): {'OK' if r['ok'] else 'BELOW TARGET'}; {r['seconds']:.0f} s")
    return "\n".join(out)


RUN_HF = '''#!/usr/bin/env python3
"""Answer with transformers + PEFT on this export (what vLLM and LoRAX load), greedy, as edgeft does.

usage: python3 run_hf.py --adapter NAME "text"
"""
import argparse, json, os

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ap = argparse.ArgumentParser()
ap.add_argument("--adapter", required=True)
ap.add_argument("text")
args = ap.parse_args()
card = json.load(open(os.path.join(HERE, "adapters", args.adapter, "adapter.json")))
task = card.get("task") or {}
tok = AutoTokenizer.from_pretrained(os.path.join(HERE, "base"))
model = AutoModelForCausalLM.from_pretrained(os.path.join(HERE, "base"), dtype=torch.float32)
model = PeftModel.from_pretrained(model, os.path.join(HERE, "adapters", args.adapter)).eval()
msgs = ([{"role": "system", "content": task["system"]}] if task.get("system") else []) + \\
    [{"role": "user", "content": task.get("template", "{input}").replace("{input}", args.text)}]
text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
gen = task.get("generation") or {}
with torch.inference_mode():
    out = model.generate(ids, max_new_tokens=gen.get("max_tokens", 256), do_sample=False)
answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
for s in gen.get("stop") or []:
    answer = answer.split(s)[0]
print(answer.strip())
'''

CLIENT = '''#!/usr/bin/env python3
"""OpenAI-style client for this export (standard library only). The same requests work against
`edgeft serve` and vLLM: model = the adapter's name, POST /v1/chat/completions, GET /v1/models.

  python3 client.py --base-url http://127.0.0.1:8000/v1 --adapter sentiment "Shares of Acme jumped 12%"
  python3 client.py --base-url URL --list
  python3 client.py --engine lorax --base-url http://127.0.0.1:8080/v1 --adapter sentiment "..."
  python3 client.py --base-url URL --compare edgeft-answers.jsonl   # the server's answers vs edgeft's
"""
import argparse, json, os, sys, urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def card(name):
    with open(os.path.join(HERE, "adapters", name, "adapter.json"), encoding="utf-8") as f:
        return json.load(f)


def build_request(card, text, engine="vllm"):
    """One chat request carrying the task card: system prompt, template, generation defaults, constraint."""
    task = card.get("task") or {}
    if engine == "edgeft":   # edgeft serve applies the card itself (system, template, constraint, defaults)
        return {"model": card["name"], "messages": [{"role": "user", "content": text}]}
    msgs = [{"role": "system", "content": task["system"]}] if task.get("system") else []
    msgs.append({"role": "user", "content": task.get("template", "{input}").replace("{input}", text)})
    gen = task.get("generation") or {}
    model = "/data/adapters/" + card["name"] if engine == "lorax" else card["name"]
    body = {"model": model, "messages": msgs, "max_tokens": gen.get("max_tokens", 256),
            "temperature": gen.get("temperature", 0.0)}
    if gen.get("stop"):
        body["stop"] = gen["stop"]
    out = task.get("output") or {}
    kind = out.get("type", "text")
    if kind == "labels" and engine == "lorax":
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "label", "schema": {"type": "string", "enum": out["labels"]}}}
    elif kind == "labels":
        key = "guided_choice" if engine == "vllm-legacy" else "structured_outputs"
        body[key] = out["labels"] if key == "guided_choice" else {"choice": out["labels"]}
    elif kind == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": card["name"], "schema": out["schema"]}}
    elif kind == "grammar" and engine != "lorax":
        key = "guided_grammar" if engine == "vllm-legacy" else "structured_outputs"
        body[key] = out["gbnf"] if key == "guided_grammar" else {"grammar": out["gbnf"]}
    if engine == "lorax":
        body["adapter_source"] = "local"
    return body


def call(base_url, path, body=None, api_key=None, timeout=300):
    req = urllib.request.Request(base_url.rstrip("/") + path, method="POST" if body is not None else "GET",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": "Bearer " + api_key} if api_key else {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def same_answer(a, b):
    """Identical text, or for JSON answers the same value (servers may space JSON differently)."""
    if a.strip() == b.strip():
        return True
    try:
        got = json.loads(a)
    except ValueError:
        return False
    if isinstance(got, str) and got.strip() == b.strip():   # a label sent back as a JSON string (LoRAX)
        return True
    try:
        return got == json.loads(b)
    except ValueError:
        return False


def compare(base_url, path, engine, api_key=None):
    """Send every prompt of edgeft-answers.jsonl (written by `edgeft export --verify N`) and count
    the answers identical to edgeft's greedy ones, per adapter."""
    counts = {}
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        if not isinstance(row["input"], str):
            continue   # multi-turn rows: the card template applies to the last turn only
        body = build_request(card(row["adapter"]), row["input"], engine)
        got = call(base_url, "/chat/completions", body, api_key)["choices"][0]["message"]["content"]
        c = counts.setdefault(row["adapter"], [0, 0])
        c[0] += same_answer(got, row["edgeft"])
        c[1] += 1
    for name, (same, n) in counts.items():
        print(f"{name:16} {same}/{n} identical to edgeft ({100.0 * same / max(n, 1):.1f}%)")
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    ap.add_argument("--engine", choices=("vllm", "vllm-legacy", "lorax", "edgeft"), default="vllm")
    ap.add_argument("--adapter")
    ap.add_argument("--list", action="store_true", help="GET /v1/models")
    ap.add_argument("--compare", metavar="JSONL", help="edgeft's answers (edgeft-answers.jsonl): ask the server the same")
    ap.add_argument("--json", action="store_true", help="print the request and the answer as JSON")
    ap.add_argument("text", nargs="*")
    a = ap.parse_args(argv)
    if a.list:
        for m in call(a.base_url, "/models", api_key=a.api_key)["data"]:
            print(m["id"])
        return 0
    if a.compare:
        compare(a.base_url, a.compare, a.engine, a.api_key)
        return 0
    if not a.adapter or not a.text:
        ap.error("give --adapter NAME and the text (or --list)")
    body = build_request(card(a.adapter), " ".join(a.text), a.engine)
    answer = call(a.base_url, "/chat/completions", body, a.api_key)["choices"][0]["message"]["content"]
    print(json.dumps({"request": body, "answer": answer}, ensure_ascii=False) if a.json else answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def export_manifest(info: ExportInfo, extra: dict) -> str:
    return json.dumps({"target": info.target, "base": {"id": info.base_id, "gguf": info.gguf_name,
                                                        "sha256": info.base_sha256, "dtype": info.dtype},
                       "max_lora_rank": info.max_lora_rank,
                       "adapters": [{k: v for k, v in a.items() if k != "card"} for a in info.adapters],
                       "verify": info.verify, **extra}, indent=2) + "\n"
