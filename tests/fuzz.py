"""Seeded fuzzing of everything a hostile user can hand edgeft: adapter GGUFs, base GGUF headers,
task cards, PEFT folders and HTTP request bodies.

Each target turns a seeded mutation of a valid input into one outcome:
- "accepted": validation let it through (it is then safe to hand to llama.cpp, which the long
  mode proves for adapters by loading every accepted one in a child process);
- "refused": a clear EdgeftError / ApiError;
- "crash": any other exception, i.e. an `internal error` line for the user: a bug.
A case also records its time, so a hang shows as a slow case instead of a stuck suite.

Used by tests/test_hardening.py (a fast seeded run in CI, a long run with EDGEFT_FUZZ_CASES=N)
and by `python tests/fuzz.py N SEED` for the report in docs/reliability.md.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# -- valid inputs to start from -----------------------------------------------------------------


def write_tiny_adapter(path: Path, *, arch: str = "llama", alpha: float = 8.0, n_blocks: int = 2,
                       dtype=np.float32) -> Path:
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for i in range(n_blocks):
        for t in ("attn_q", "attn_v"):
            w.add_tensor(f"blk.{i}.{t}.weight.lora_a", rng.standard_normal((4, 64)).astype(dtype))
            w.add_tensor(f"blk.{i}.{t}.weight.lora_b", rng.standard_normal((64, 4)).astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_base(path: Path) -> Path:
    """A llama-shaped base GGUF header with a few tiny tensors and a small tokenizer list."""
    import gguf

    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_token_list([f"t{i}" for i in range(32)])
    w.add_tensor("token_embd.weight", rng.standard_normal((32, 64)).astype(np.float32))
    for i in range(2):
        for t in ("attn_q", "attn_v"):
            w.add_tensor(f"blk.{i}.{t}.weight", rng.standard_normal((64, 64)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


VALID_CARD = {
    "format": 1, "name": "route", "description": "router",
    "base": {"id": "smollm2-135m", "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
             "architecture": "llama"},
    "adapter": {"file": "adapter.gguf", "rank": 4, "alpha": 8},
    "task": {"system": "Route it.", "template": "{input}",
             "output": {"type": "json_schema", "schema": {"type": "object", "properties": {
                 "team": {"type": "string", "enum": ["a", "b"]}, "note": {"type": "string", "maxLength": 20}},
                 "required": ["team"]}},
             "generation": {"max_tokens": 16, "temperature": 0.0, "stop": ["\n\n"]},
             "few_shot": [{"input": "x", "output": "{\"team\": \"a\"}"}]},
}
LABEL_TASK = {"template": "{input}", "output": {"type": "labels", "labels": ["a", "b"]},
              "generation": {"max_tokens": 4}}
GBNF_TASK = {"template": "{input}", "output": {"type": "grammar", "gbnf": 'root ::= "yes" | "no"'}}

VALID_PEFT_CONFIG = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
                     "target_modules": ["q_proj", "v_proj"], "bias": "none", "use_dora": False, "use_rslora": False,
                     "modules_to_save": None, "base_model_name_or_path": "tiny", "rank_pattern": {}, "alpha_pattern": {},
                     "fan_in_fan_out": False, "layers_to_transform": None}
PEFT_PREFIX = "base_model.model.model.layers.{i}.self_attn.{m}"

VALID_REQUEST = {"model": "smollm2-135m", "messages": [{"role": "system", "content": "be brief"},
                                                       {"role": "user", "content": "hi"}],
                 "max_tokens": 16, "temperature": 0.5, "top_p": 0.9, "stop": ["\n"], "stream": False,
                 "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                     "type": "object", "properties": {"a": {"type": "integer"}}}}}}

# -- mutators --------------------------------------------------------------------------------------

WEIRD_VALUES: list[Any] = [None, True, False, 0, -5, -1e308, 1e308, 3.4e38, 1e5, 1e7, 1e9, 2 ** 63, -(2 ** 63),
                           math.nan, math.inf, -math.inf, "", "x", "x" * 5000, "\x00", "../../etc/passwd",
                           "/etc/passwd", "https://example.com/s.json", [], [1, 2], ["a"] * 3, "abc", {}, {"a": 1},
                           {"$ref": "https://example.com/x"}, {"$ref": "#/nowhere"}, {"$ref": "#"}, 0.5, -0.5]


def _deep(n: int) -> Any:
    v: Any = "leaf"
    for _ in range(n):
        v = [v]
    return v


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if len(prefix) > 12:      # do not walk into a deep nest made by an earlier mutation
        return out
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _set(root: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    node = root
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return root


def mutate_json(obj: Any, rng: random.Random) -> Any:
    """One to three structural mutations: a value replaced by a weird one or a deep nest, a key
    deleted, an unknown key added."""
    obj = copy.deepcopy(obj)
    for _ in range(rng.randint(1, 3)):
        paths = _paths(obj)
        path = rng.choice(paths)
        r = rng.random()
        if r < 0.6:
            obj = _set(obj, path, copy.deepcopy(rng.choice(WEIRD_VALUES)))
        elif r < 0.7:
            obj = _set(obj, path, _deep(rng.choice([50, 5000, 100000])))
        elif r < 0.85 and path:
            parent = obj
            for p in path[:-1]:
                parent = parent[p]
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif isinstance(parent, list) and parent:
                parent.pop(path[-1] if isinstance(path[-1], int) and path[-1] < len(parent) else 0)
        else:
            node = obj
            for p in path:
                node = node[p]
            if isinstance(node, dict):
                node[rng.choice(["unknown", "use_dora", "$ref", "maxLength", "maxItems", "type"])] = \
                    copy.deepcopy(rng.choice(WEIRD_VALUES))
    return obj


def dumps(obj: Any) -> str:
    try:
        return json.dumps(obj, allow_nan=True)
    except (RecursionError, ValueError):
        return "[" * 100000 + "]" * 100000


def mutate_bytes(data: bytes, rng: random.Random, header_len: int) -> bytes:
    """Bit flips, extreme integers, truncation, insertion or deletion, mostly in the header."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not b:
            break
        where = rng.randrange(min(len(b), header_len)) if rng.random() < 0.85 else rng.randrange(len(b))
        r = rng.random()
        if r < 0.35:
            b[where] ^= 1 << rng.randrange(8)
        elif r < 0.55:
            val = rng.choice([0, 1, 8, 9, 0xFFFFFFFF, 0x7FFFFFFF, 2 ** 63, 2 ** 64 - 1, 30, 1000])
            fmt = "<Q" if val > 0xFFFFFFFF or rng.random() < 0.5 else "<I"
            chunk = struct.pack(fmt, val)
            b[where:where + len(chunk)] = chunk
        elif r < 0.7:
            del b[rng.randrange(len(b)):]
        elif r < 0.85:
            b[where:where] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            del b[where:where + rng.randint(1, 16)]
    return bytes(b)


def retype_string_as_array(data: bytes, rng: random.Random) -> bytes:
    """The hang the fuzzing pass found: a metadata value's type STRING (8) changed to ARRAY (9)."""
    b = bytearray(data)
    spots = [i for i in range(24, min(len(b) - 4, 4096)) if b[i:i + 4] == struct.pack("<I", 8)]
    if spots:
        i = rng.choice(spots)
        b[i:i + 4] = struct.pack("<I", 9)
    return bytes(b)


# -- targets -------------------------------------------------------------------------------------


@dataclass
class Outcome:
    target: str
    case: int
    result: str                  # accepted | refused | crash
    seconds: float
    detail: str = ""
    path: Path | None = None     # the accepted file, for a real load


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter] = {}
        for o in self.outcomes:
            out.setdefault(o.target, Counter())[o.result] += 1
        return {k: dict(v) for k, v in out.items()}

    def crashes(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.result == "crash"]

    def slowest(self) -> Outcome | None:
        return max(self.outcomes, key=lambda o: o.seconds, default=None)


def _classify(target: str, case: int, fn: Callable[[], Any], path: Path | None = None) -> Outcome:
    from edgeft.errors import EdgeftError
    from edgeft.server.errors import ApiError

    t0 = time.perf_counter()
    try:
        fn()
        res, detail = "accepted", ""
    except (EdgeftError, ApiError) as e:
        res, detail = "refused", str(e)[:160]
    except Exception as e:  # anything else is the bug this hunts
        res, detail = "crash", f"{type(e).__name__}: {str(e)[:200]}"
        if os.environ.get("FUZZ_TRACE"):
            import traceback

            traceback.print_exc(limit=-6)
    return Outcome(target, case, res, time.perf_counter() - t0, detail, path if res == "accepted" else None)


def fuzz_adapter(work: Path, n: int, seed: int, keep_accepted: bool = False, base: Path | None = None) -> list[Outcome]:
    """With `base` (a real base GGUF), mutate an adapter made for it and validate against it, so
    what is accepted is exactly what the runtime would hand to llama.cpp."""
    from edgeft.gguf_info import base_info, inspect_adapter

    if base is None:
        good = write_tiny_adapter(work / "good-adapter.gguf").read_bytes()
        info = None
    else:
        from edgeft.bench.fixtures import write_random_adapter

        good = write_random_adapter(work / "good-adapter.gguf", base, rank=4, blocks=range(1),
                                    targets=("attn_q", "attn_v")).read_bytes()
        info = base_info(base)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        data = retype_string_as_array(good, rng) if rng.random() < 0.15 else mutate_bytes(good, rng, 1024)
        p = work / (f"adapter-{i}.gguf" if keep_accepted else "adapter.gguf")
        p.write_bytes(data)
        o = _classify("adapter GGUF", i, lambda: inspect_adapter(p, info), p)
        out.append(o)
        if o.result != "accepted" and keep_accepted:
            p.unlink()
    return out


def fuzz_base(work: Path, n: int, seed: int) -> list[Outcome]:
    from edgeft.gguf_info import base_info

    good = write_tiny_base(work / "good-base.gguf").read_bytes()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        data = retype_string_as_array(good, rng) if rng.random() < 0.15 else mutate_bytes(good, rng, 2048)
        p = work / f"base-{i % 8}.gguf"       # base_info caches by (path, size, mtime): vary the path
        p.write_bytes(data)
        out.append(_classify("base GGUF header", i, lambda: base_info(p)))
    return out


def _card_check(d: Any) -> None:
    from edgeft.bundles import TaskCard

    card = TaskCard.from_dict(d)
    if card.task is not None:
        card.task.output.grammar()            # the grammar that would reach llama.cpp
        card.task.messages("some input", shots=2)


def fuzz_card(work: Path, n: int, seed: int) -> list[Outcome]:
    from edgeft.bundles import AdapterBundle

    rng = random.Random(seed)
    out = []
    bundle = work / "bundle"
    bundle.mkdir(exist_ok=True)
    write_tiny_adapter(bundle / "adapter.gguf")
    starts = [VALID_CARD, {**VALID_CARD, "task": LABEL_TASK}, {**VALID_CARD, "task": GBNF_TASK}]
    for i in range(n):
        d = mutate_json(rng.choice(starts), rng)
        if i % 2:
            out.append(_classify("task card", i, lambda: _card_check(d)))
        else:   # through the file: JSON text (NaN, deep nesting) and the bundle's own checks
            (bundle / "adapter.json").write_text(dumps(d))
            out.append(_classify("task card", i, lambda: _card_check_bundle(AdapterBundle.load(bundle))))
    return out


def _card_check_bundle(b) -> None:
    if b.card.task is not None:
        b.card.task.output.grammar()
    b.gguf_path.resolve().relative_to(b.folder.resolve())   # a bundle never reaches outside its folder


def _write_peft(folder: Path, config: Any, tensors: dict, raw: bytes | None = None) -> None:
    from edgeft.convert.safetensors_np import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(config if isinstance(config, str) else dumps(config))
    st = folder / "adapter_model.safetensors"
    if raw is not None:
        st.write_bytes(raw)
    else:
        write_safetensors(st, tensors, {"format": "pt"})


def _peft_tensors(rng_np) -> dict:
    t = {}
    for i in range(2):
        for m, out_dim in (("q_proj", 64), ("v_proj", 32)):
            t[f"{PEFT_PREFIX.format(i=i, m=m)}.lora_A.weight"] = rng_np.standard_normal((4, 64)).astype(np.float32)
            t[f"{PEFT_PREFIX.format(i=i, m=m)}.lora_B.weight"] = rng_np.standard_normal((out_dim, 4)).astype(np.float32)
    return t


def fuzz_peft(work: Path, n: int, seed: int) -> list[Outcome]:
    from edgeft.convert.peft import read_peft

    rng = random.Random(seed)
    rng_np = np.random.default_rng(seed)
    good = _peft_tensors(rng_np)
    folder = work / "peft"
    _write_peft(folder, VALID_PEFT_CONFIG, good)
    good_raw = (folder / "adapter_model.safetensors").read_bytes()
    (n_hdr,) = struct.unpack_from("<Q", good_raw, 0)
    out = []
    for i in range(n):
        r = rng.random()
        cfg: Any = VALID_PEFT_CONFIG
        tensors, raw = good, None
        if r < 0.45:
            cfg = mutate_json(VALID_PEFT_CONFIG, rng)
        elif r < 0.65:
            raw = mutate_bytes(good_raw, rng, 8 + n_hdr)
        elif r < 0.8:   # the header as JSON, mutated (lists, string offsets, overlaps)
            header = json.loads(good_raw[8:8 + n_hdr])
            h = dumps(mutate_json(header, rng)).encode()
            raw = struct.pack("<Q", len(h)) + h + good_raw[8 + n_hdr:]
        else:           # weights: non-finite, huge, integer or bool
            tensors = dict(good)
            k = rng.choice(sorted(tensors))
            kind = rng.choice(["nan", "huge", "int", "bool", "shape"])
            a = tensors[k].copy()
            if kind == "nan":
                a.flat[0] = np.nan
            elif kind == "huge":
                a.flat[0] = 3e38
            elif kind == "int":
                a = a.astype(np.int32)
            elif kind == "bool":
                a = a > 0
            else:
                a = a[:, :-1]
            tensors[k] = a
        _write_peft(folder, cfg, tensors, raw)
        out.append(_classify("PEFT folder", i, lambda: read_peft(folder)))
    return out


def fuzz_request(n: int, seed: int) -> list[Outcome]:
    from edgeft.server.requests import _gen_request, _response_format, _wanted_adapters

    rng = random.Random(seed)
    out = []

    def check(body: Any) -> None:
        if not isinstance(body, dict):
            from edgeft.server.errors import _bad
            raise _bad("the body must be a JSON object")
        adapters = _wanted_adapters(body.get("model"), body.get("adapters"), "smollm2-135m")
        _gen_request(body, "chat", adapters, {}, 4096)
        _response_format(body)

    for i in range(n):
        body = mutate_json(VALID_REQUEST, rng)
        out.append(_classify("HTTP request", i, lambda: check(body)))
    return out


TARGETS = ("adapter", "base", "card", "peft", "request")


def run_all(work: Path, n_per_target: int, seed: int, keep_accepted: bool = False, base: Path | None = None) -> Report:
    import logging

    logging.getLogger("edgeft").setLevel(logging.ERROR)   # skipped-row warnings are expected here
    rep = Report()
    rep.outcomes += fuzz_adapter(work, n_per_target, seed, keep_accepted, base)
    rep.outcomes += fuzz_base(work, n_per_target, seed + 1)
    rep.outcomes += fuzz_card(work, n_per_target, seed + 2)
    rep.outcomes += fuzz_peft(work, n_per_target, seed + 3)
    rep.outcomes += fuzz_request(n_per_target, seed + 4)
    return rep


LOAD_SCRIPT = """
import sys
from edgeft import Engine
from edgeft.errors import EdgeftError
eng = Engine(sys.argv[1], n_ctx=256, n_threads=1)
for p in sys.argv[2:]:
    print("LOAD", p, flush=True)
    try:
        name = eng.load_adapter(p, name="a")
        eng.complete("Hello", adapter={"a": 1.0}, max_tokens=2, grammar='root ::= [a-z]+')
        eng.unload_adapter("a")
    except EdgeftError as e:
        print("REFUSED", p, e, flush=True)
print("DONE", flush=True)
"""


def load_for_real(base: Path, paths: list[Path], timeout: float = 600) -> tuple[int, str]:
    """Load adapters that passed validation into llama.cpp (a child process, one base, all of
    them in turn): (return code, output). A signal would show as a negative return code."""
    import subprocess

    res = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(base), *map(str, paths)],
                         capture_output=True, text=True, timeout=timeout)
    return res.returncode, res.stdout[-2000:] + res.stderr[-2000:]


def main(argv: list[str]) -> None:
    """python tests/fuzz.py N_PER_TARGET SEED: a long run, printed as the table in docs/reliability.md."""
    import tempfile

    n = int(argv[0]) if argv else 2000
    seed = int(argv[1]) if len(argv) > 1 else 0
    base = Path(argv[2]) if len(argv) > 2 else None
    t0 = time.perf_counter()
    loaded = None
    with tempfile.TemporaryDirectory() as tmp:
        rep = run_all(Path(tmp), n, seed, keep_accepted=base is not None, base=base)
        if base is not None:
            accepted = [o.path for o in rep.outcomes if o.target == "adapter GGUF" and o.path is not None]
            rc, log = load_for_real(base, accepted)
            loaded = {"adapters": len(accepted), "return_code": rc, "refused_by_llama_cpp": log.count("REFUSED"),
                      "finished": "DONE" in log}
    total = time.perf_counter() - t0
    print(json.dumps({"cases_per_target": n, "seed": seed, "seconds": round(total, 1), "counts": rep.counts(),
                      "accepted_adapters_loaded_in_llama_cpp": loaded,
                      "crashes": [o.__dict__ for o in rep.crashes()][:20],
                      "slowest": {"target": rep.slowest().target, "seconds": round(rep.slowest().seconds, 3),
                                  "detail": rep.slowest().detail} if rep.outcomes else None},
                     indent=1, default=str))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "tests"))
    main(sys.argv[1:])
