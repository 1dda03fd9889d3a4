"""Hostile input: every crash, hang and `internal error` a fuzzing pass found is a named
regression test here, and a seeded fuzz run over the five targets (adapter GGUF, base GGUF
header, task card, PEFT folder, HTTP request) must end with zero crashes. EDGEFT_FUZZ_CASES=N
runs N cases per target (the long mode, docs/reliability.md); the default is a fast lane run."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fuzz
from edgeft.errors import AdapterError, ConversionError, EdgeftError, InputError, ModelError

REPO = Path(__file__).resolve().parent.parent


# -- adapter GGUF ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,name", [(np.int32, "I32"), (np.float64, "F64")])
def test_lora_tensors_of_types_llama_cpp_cannot_run_are_refused(tmp_path, dtype, name):
    """Was: passed validation, then SIGSEGV inside llama.cpp on load."""
    from edgeft.gguf_info import inspect_adapter

    p = fuzz.write_tiny_adapter(tmp_path / "a.gguf", dtype=dtype)
    with pytest.raises(AdapterError, match=f"stored as {name}"):
        inspect_adapter(p)


@pytest.mark.parametrize("alpha", [3.4e38, math.nan, math.inf, -1.0])
def test_non_finite_or_huge_alpha_is_refused(tmp_path, alpha):
    """Was: NaN / 3.4e38 alpha reached llama.cpp -> 'Unexpected empty grammar stack' (SIGABRT)."""
    from edgeft.gguf_info import inspect_adapter

    p = fuzz.write_tiny_adapter(tmp_path / "a.gguf", alpha=alpha)
    with pytest.raises(AdapterError, match="adapter.lora.alpha must be a number"):
        inspect_adapter(p)


def test_alpha_stored_as_a_string_is_a_clear_error(tmp_path):
    """Was: ValueError in gguf_info -> `internal error`."""
    import gguf

    from edgeft.gguf_info import inspect_adapter

    p = tmp_path / "a.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_string(gguf.Keys.Adapter.LORA_ALPHA, "sixteen")
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((4, 64), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.ones((64, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(AdapterError, match="alpha must be a number"):
        inspect_adapter(p)


def test_a_string_retyped_as_an_array_is_refused_without_spinning(tmp_path):
    """Was: gguf.GGUFReader spun for 10-60 s on it. Run in a child with a deadline."""
    good = fuzz.write_tiny_adapter(tmp_path / "a.gguf").read_bytes()
    arch_key = good.index(b"general.architecture")
    type_at = arch_key + len(b"general.architecture")
    assert struct.unpack_from("<I", good, type_at)[0] == 8        # STRING
    bad = good[:type_at] + struct.pack("<I", 9) + good[type_at + 4:]
    (tmp_path / "b.gguf").write_bytes(bad)
    code = ("import sys; from edgeft.gguf_info import inspect_adapter; from edgeft.errors import EdgeftError\n"
            "try:\n    inspect_adapter(sys.argv[1])\nexcept EdgeftError as e:\n    print('refused:', e)")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b.gguf")], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0 and res.stdout.startswith("refused:"), res.stderr[-500:]


def test_a_flipped_byte_in_a_base_header_is_a_model_error(tmp_path):
    """Was: OverflowError in the header reader -> `internal error`."""
    from edgeft.gguf_info import base_info

    good = bytearray(fuzz.write_tiny_base(tmp_path / "b.gguf").read_bytes())
    good[16:24] = struct.pack("<Q", 2 ** 63)          # n_kv
    (tmp_path / "bad.gguf").write_bytes(bytes(good))
    with pytest.raises(ModelError, match="more than the file holds"):
        base_info(tmp_path / "bad.gguf")


# -- task cards ----------------------------------------------------------------------------------

def _card(**over):
    d = json.loads(json.dumps(fuzz.VALID_CARD))
    for path, v in over.items():
        node = d
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = v
    return d


@pytest.mark.parametrize("over,needle", [
    ({"base": "smollm2"}, "'base' must be an object"),
    ({"adapter": [1]}, "'adapter' must be an object"),
    ({"task__generation": "greedy"}, "task.generation must be an object"),
    ({"base__sha256": 12345}, "base.sha256 must be 64 hex digits"),
    ({"base__sha256": ""}, "base.sha256 must be 64 hex digits"),          # was: silently skipped the base check
    ({"adapter__file": None}, "adapter.file must be a file name inside the bundle"),
    ({"adapter__file": "/etc/passwd"}, "adapter.file must be a file name inside the bundle"),   # was: loaded
    ({"adapter__file": "../other/adapter.gguf"}, "adapter.file must be a file name inside the bundle"),
    ({"adapter__file": "x" * 5000}, "adapter.file must be a file name inside the bundle"),   # was: OSError ENAMETOOLONG
    ({"task__generation__stop": [1, 2]}, "stop must be a list"),
    ({"task__generation__stop": "abc"}, "stop must be a list"),           # was: split into 'a', 'b', 'c'
    ({"task__generation__max_tokens": -5}, "max_tokens must be a whole number"),   # was: an empty answer
    ({"task__generation__temperature": math.nan}, "temperature must be a number"),
    ({"task__generation__temperature": 1e308}, "temperature must be a number"),
    ({"task__output": {"type": "labels", "labels": "abc"}}, "labels must be a list"),   # was: split into chars
    ({"task__output": {"type": "grammar", "gbnf": 7}}, "needs a 'gbnf' string"),
    ({"task__few_shot": "x"}, "few_shot must be a list"),
])
def test_card_fields_of_the_wrong_type_name_the_field(over, needle):
    from edgeft.bundles import TaskCard

    with pytest.raises(AdapterError) as e:
        TaskCard.from_dict(_card(**over))
    assert needle in e.value.message


@pytest.mark.parametrize("schema,needle", [
    ({"type": "string", "maxLength": 100000}, "'maxLength' above 1000"),      # was: SIGSEGV
    ({"type": "array", "maxItems": 10_000_000}, "'maxItems' above 1000"),     # was: SIGSEGV
    ({"type": "string", "maxLength": 1e9}, "'maxLength' above 1000"),         # was: a hang of minutes
    ({"$ref": "https://example.com/schema.json"}, "only local '$ref's"),
    ({"$ref": "file:///etc/passwd"}, "only local '$ref's"),
    ({"$ref": "#/definitions/missing"}, "unsupported JSON schema"),
    ({"type": "strange"}, "unsupported JSON schema"),
    ({"type": "string", "pattern": "a{5000}"}, "repetition counts above 1000"),
])
def test_card_json_schemas_are_held_to_the_servers_limits(schema, needle):
    from edgeft.tasks import OutputSpec

    with pytest.raises(InputError) as e:
        OutputSpec(type="json_schema", schema=schema).grammar()
    assert needle in e.value.message


def test_a_cyclic_schema_ref_is_a_clear_error():
    from edgeft.tasks import OutputSpec

    schema = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}
    with pytest.raises(InputError):
        OutputSpec(type="json_schema", schema=schema).grammar()


def test_a_deeply_nested_card_file_is_refused(tmp_path):
    """Was: RecursionError -> `internal error`."""
    from edgeft.bundles import AdapterBundle

    fuzz.write_tiny_adapter(tmp_path / "adapter.gguf")
    (tmp_path / "adapter.json").write_text('{"name": "x", "task": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(AdapterError, match="nested too deeply"):
        AdapterBundle.load(tmp_path)


def test_sampling_values_are_checked_before_llama_cpp():
    """Was: NaN / Inf temperature with a grammar -> SIGABRT in llama.cpp."""
    from edgeft._llama import Sampling

    for bad in (dict(temperature=math.nan), dict(temperature=math.inf), dict(temperature=1e308),
                dict(top_p=2.0), dict(top_k=-1), dict(min_p=math.nan), dict(grammar="   ")):
        with pytest.raises(InputError):
            Sampling(**bad)
    Sampling(temperature=0.7, top_p=0.9, top_k=40, grammar='root ::= "a"')


@pytest.mark.parametrize("spec", [{"a": 1e30}, {"a": math.nan}, "a=inf", ["a=-1e9"]])
def test_adapter_scales_are_bounded(spec):
    from edgeft.engine import parse_adapter_spec

    with pytest.raises(InputError, match="scale"):
        parse_adapter_spec(spec)


# -- PEFT folders -----------------------------------------------------------------------------

def _peft(tmp_path, config=None, tensors=None, raw=None):
    rng = np.random.default_rng(0)
    folder = tmp_path / "peft"
    fuzz._write_peft(folder, config if config is not None else fuzz.VALID_PEFT_CONFIG,
                     tensors if tensors is not None else fuzz._peft_tensors(rng), raw)
    return folder


@pytest.mark.parametrize("over,needle", [
    ({"lora_alpha": 1e300}, "lora_alpha must be a number above 0"),
    ({"lora_alpha": -8}, "lora_alpha must be a number above 0"),           # was: accepted
    ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern has values that are not positive"),   # was: ValueError
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern has values that are not positive"),
    ({"target_modules": []}, "target_modules must be a non-empty list"),    # was: accepted
    ({"target_modules": ["k_proj"]}, "which target_modules ['k_proj'] does not name"),   # was: accepted
    ({"fan_in_fan_out": True}, "fan_in_fan_out=true"),                      # was: converted transposed
    ({"layers_to_transform": "all"}, "layers_to_transform must be"),
])
def test_peft_configs_that_do_not_fit_their_weights_are_refused(tmp_path, over, needle):
    from edgeft.convert.peft import read_peft

    with pytest.raises(ConversionError) as e:
        read_peft(_peft(tmp_path, {**fuzz.VALID_PEFT_CONFIG, **over}))
    assert needle in e.value.message


def test_a_deeply_nested_peft_config_is_refused(tmp_path):
    from edgeft.convert.peft import read_peft

    with pytest.raises(ConversionError, match="not valid JSON"):
        read_peft(_peft(tmp_path, '{"r": ' + "[" * 100000 + "]" * 100000 + "}"))


@pytest.mark.parametrize("kind,needle", [("int", "not floating point"), ("bool", "not floating point"),
                                          ("huge", "far beyond any trained LoRA")])
def test_peft_weights_that_are_integers_or_huge_are_refused(tmp_path, kind, needle):
    from edgeft.convert.peft import read_peft

    t = fuzz._peft_tensors(np.random.default_rng(0))
    k = sorted(t)[0]
    t[k] = {"int": t[k].astype(np.int32), "bool": t[k] > 0, "huge": np.full_like(t[k], 3e38)}[kind]
    with pytest.raises(ConversionError) as e:
        read_peft(_peft(tmp_path, tensors=t))
    assert needle in e.value.message


@pytest.mark.parametrize("header,needle", [
    ([1, 2, 3], "not a JSON object"),
    ({"a.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": ["0", "16"]}}, "malformed header entry"),
    ({"a.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
      "a.lora_B.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}, "overlap"),
])
def test_malformed_safetensors_headers_are_refused(tmp_path, header, needle):
    from edgeft.convert.peft import read_peft

    h = json.dumps(header).encode()
    raw = struct.pack("<Q", len(h)) + h + bytes(64)
    with pytest.raises(ConversionError) as e:
        read_peft(_peft(tmp_path, raw=raw))
    assert needle in e.value.message


# -- the fuzz runs ----------------------------------------------------------------------------

def test_seeded_fuzz_run_has_no_crash(tmp_path):
    n = int(os.environ.get("EDGEFT_FUZZ_CASES", "200"))
    rep = fuzz.run_all(tmp_path, n, seed=int(os.environ.get("EDGEFT_FUZZ_SEED", "0")))
    counts = rep.counts()
    assert set(counts) == {"adapter GGUF", "base GGUF header", "task card", "PEFT folder", "HTTP request"}
    for target, c in counts.items():   # the mutators reach both sides of every gate
        assert c.get("refused", 0) > 0 and c.get("accepted", 0) > 0, (target, c)
    assert rep.crashes() == [], [(o.target, o.case, o.detail) for o in rep.crashes()[:5]]


def test_adapters_that_pass_validation_load_in_llama_cpp_without_a_signal(tmp_path, tiny_base):
    """On the tiny base: what matters is what llama.cpp's loader does with the bytes."""
    rep = fuzz.fuzz_adapter(tmp_path, int(os.environ.get("EDGEFT_FUZZ_CASES", "150")), seed=11,
                            keep_accepted=True, base=tiny_base)
    accepted = [o.path for o in rep if o.path is not None]
    assert accepted and not [o for o in rep if o.result == "crash"]
    rc, log = fuzz.load_for_real(tiny_base, accepted)
    assert rc == 0 and "DONE" in log, log


@pytest.mark.slow
def test_a_grammar_with_an_empty_language_is_refused_not_aborted(base_path):
    """Was: `root ::= [^\\x00-\\U0010FFFF]` -> SIGABRT inside llama.cpp. On the real base: with a
    vocab of raw byte tokens (the tiny base's), llama.cpp reads the bytes F4 90.. and F8..FF as code
    points above U+10FFFF, which this class matches, so the language is not empty there."""
    code = ("import sys; from edgeft import Engine; from edgeft.errors import EdgeftError\n"
            "eng = Engine(sys.argv[1], n_ctx=256, n_threads=2)\n"
            "try:\n    eng.complete('Hello', grammar=sys.argv[2], max_tokens=4)\n"
            "except EdgeftError as e:\n    print('refused:', e.message)\n"
            "print(eng.complete('Hello', grammar='root ::= \"ok\"', max_tokens=4).text)")
    res = subprocess.run([sys.executable, "-c", code, str(base_path), r"root ::= [^\x00-\U0010FFFF]"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-800:]
    assert "refused: no token fits the output constraint" in res.stdout and res.stdout.strip().endswith("ok")


def test_errors_are_one_line_with_exit_code_1(tmp_path):
    p = fuzz.write_tiny_adapter(tmp_path / "a.gguf", dtype=np.int32)
    res = subprocess.run([sys.executable, "-m", "edgeft", "adapters", "show", str(p)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr and "internal error" not in res.stderr
    assert res.stderr.startswith("error: ") and "I32" in res.stderr


def test_edgeft_error_hierarchy_is_what_the_cli_catches():
    assert issubclass(AdapterError, EdgeftError) and issubclass(ConversionError, EdgeftError)


def test_a_crash_inside_native_code_is_one_clear_line_with_exit_code_1():
    """Where validation cannot be complete: a fatal signal in a C call (here a NULL read) while
    the runtime loads an adapter reports what it was doing, not a bare signal."""
    code = ("import ctypes; from edgeft import crash\n"
            "assert crash.install_crash_reporter()\n"
            "crash.doing('loading the adapter /data/evil.gguf')\n"
            "ctypes.string_at(0)\n")
    env = {k: v for k, v in os.environ.items() if k != "EDGEFT_DEBUG"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 1
    assert res.stderr.splitlines()[0] == ("error: llama.cpp crashed (a segmentation fault) while loading the adapter "
                                          "/data/evil.gguf")
    assert res.stderr.splitlines()[1].startswith("hint: ")
