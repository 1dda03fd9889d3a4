"""PEFT folder -> adapter bundle: the files, the card, the runtime accepting them, atomicity,
--force, task cards, output types, and refusals that leave nothing on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest

pytest.importorskip("peft")

from convert_helpers import ALL_SEVEN, TOKENS, engine, make_peft, tiny  # noqa: E402

from edgeft.bundles import AdapterBundle  # noqa: E402
from edgeft.convert import convert_adapter  # noqa: E402
from edgeft.errors import ConversionError  # noqa: E402
from edgeft.gguf_info import base_info, inspect_adapter  # noqa: E402

TASK = {"name": "sentiment-x", "description": "three labels",
        "task": {"system": "Classify.", "template": "Text: {input}", "output": {"type": "labels", "labels": ["pos", "neg", "neu"]},
                 "generation": {"max_tokens": 4}},
        "metrics": {"dev": {"accuracy": 0.9}}, "homepage": "https://example.org"}


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")


@pytest.fixture(scope="module")
def peft_dir(llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("peft") / "my-adapter"
    make_peft(llama[0], d, target_modules=ALL_SEVEN)
    return d


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def test_bundle_in_edgeft_home_found_by_name(isolated_home, llama, peft_dir):
    model, base = llama
    res = convert_adapter(peft_dir, str(base))
    folder = isolated_home / "adapters" / "my-adapter"
    assert res.folder == folder and sorted(os.listdir(folder)) == ["adapter.gguf", "adapter.json"]
    info = inspect_adapter(folder / "adapter.gguf", base_info(base))  # the runtime's validator
    assert len(info.pairs) == 14 and info.ranks == {4} and info.alpha == 8.0
    card = json.loads((folder / "adapter.json").read_text())
    assert card["name"] == "my-adapter"
    assert card["base"] == {"id": base.stem, "sha256": res.card.base["sha256"], "architecture": "llama"}
    assert len(card["base"]["sha256"]) == 64
    a = card["adapter"]
    assert (a["file"], a["rank"], a["alpha"], a["dtype"], a["tensors"]) == ("adapter.gguf", 4, 8.0, "f32", 14)
    assert a["targets"] == sorted(ALL_SEVEN)
    assert card["source"]["edgeft_version"] and card["source"]["peft_dir"] == str(peft_dir.resolve())
    assert "base_model_name_or_path" in card["source"]
    assert card["reproduce"].startswith("edgeft convert ")
    with engine(base) as eng:  # found by name in EDGEFT_HOME/adapters, loads in llama.cpp
        assert eng.load_adapter("my-adapter") == "my-adapter"


def test_gguf_metadata_and_tensors(tmp_path, llama, peft_dir):
    res = convert_adapter(peft_dir, str(llama[1]), name="x", out_dir=tmp_path / "x")
    r = gguf.GGUFReader(res.gguf_path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["general.architecture"] == "llama" and kv["adapter.lora.alpha"] == 8.0
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == (64, 4)     # ne: [in, r]
    assert shapes["blk.0.attn_q.weight.lora_b"] == (4, 64)     # ne: [r, out]
    assert shapes["blk.1.ffn_down.weight.lora_a"] == (128, 4)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)


def test_task_card_is_merged(tmp_path, llama, peft_dir):
    card_file = tmp_path / "card.json"
    card_file.write_text(json.dumps(TASK))
    res = convert_adapter(peft_dir, str(llama[1]), task_card=card_file, out_dir=tmp_path / "b")
    b = AdapterBundle.load(tmp_path / "b")
    assert b.name == "sentiment-x" and b.card.description == "three labels"
    assert b.card.task.output.labels == ["pos", "neg", "neu"] and b.card.task.max_tokens == 4
    assert b.card.metrics == {"dev": {"accuracy": 0.9}} and b.card.extra["homepage"] == "https://example.org"
    assert b.card.adapter["rank"] == 4 and res.card.base["architecture"] == "llama"


@pytest.mark.parametrize("outtype,types", [("f16", {"F16"}), ("bf16", {"BF16"}), ("q8_0", {"Q8_0", "F16"})])
def test_outtypes(tmp_path, llama, peft_dir, outtype, types):
    res = convert_adapter(peft_dir, str(llama[1]), name="x", out_dir=tmp_path / "x", outtype=outtype)
    r = gguf.GGUFReader(res.gguf_path)
    got = {t.tensor_type.name for t in r.tensors}
    assert got == types
    if outtype == "q8_0":  # rows of 64 go q8_0, rank-4 rows (lora_b) cannot: f16, as llama.cpp's converter does
        assert all(t.tensor_type.name == ("Q8_0" if t.name.endswith("lora_a") else "F16") for t in r.tensors)
    inspect_adapter(res.gguf_path, base_info(llama[1]))


def test_existing_bundle_needs_force(tmp_path, llama, peft_dir):
    out = tmp_path / "b"
    convert_adapter(peft_dir, str(llama[1]), name="b", out_dir=out)
    before = (out / "adapter.gguf").read_bytes()
    with pytest.raises(ConversionError, match="already exists") as ei:
        convert_adapter(peft_dir, str(llama[1]), name="b", out_dir=out, outtype="f16")
    assert "--force" in ei.value.hint
    assert (out / "adapter.gguf").read_bytes() == before
    convert_adapter(peft_dir, str(llama[1]), name="b", out_dir=out, outtype="f16", force=True)
    assert (out / "adapter.gguf").read_bytes() != before
    assert listing(tmp_path) == {"b", "b/adapter.gguf", "b/adapter.json"}  # no temp or backup left


def test_refuses_to_replace_a_folder_that_is_not_a_bundle(tmp_path, llama, peft_dir):
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    with pytest.raises(ConversionError, match="not an adapter bundle"):
        convert_adapter(peft_dir, str(llama[1]), name="b", out_dir=out, force=True)
    assert listing(tmp_path) == {"data", "data/precious.txt"}


def _bad_peft(root: Path, model, kind: str) -> Path:
    d = root / kind
    if kind == "dora":
        make_peft(model, d, use_dora=True)
    elif kind == "bias":
        make_peft(model, d, bias="all")
    elif kind == "lora_bias":
        make_peft(model, d, lora_bias=True)
    elif kind == "modules_to_save":
        make_peft(model, d, modules_to_save=["lm_head"])
    elif kind == "nan":
        import torch

        pm = make_peft(model, d)
        with torch.no_grad():
            next(p for n, p in pm.named_parameters() if "lora_B" in n)[0, 0] = float("nan")
        pm.save_pretrained(str(d))
    elif kind == "inf":
        import torch

        pm = make_peft(model, d)
        with torch.no_grad():
            next(p for n, p in pm.named_parameters() if "lora_A" in n)[0, 0] = float("inf")
        pm.save_pretrained(str(d))
    elif kind == "peft_type":
        from peft import IA3Config, get_peft_model
        import copy

        get_peft_model(copy.deepcopy(model), IA3Config(target_modules=["k_proj", "down_proj"],
                                                       feedforward_modules=["down_proj"])).save_pretrained(str(d))
    elif kind == "shape":
        big = tiny("llama", hidden_size=96)[0]
        make_peft(big, d)
    elif kind == "layers":
        deep = tiny("llama", num_hidden_layers=3)[0]
        make_peft(deep, d, layers_to_transform=[2])
    elif kind == "target":
        make_peft(model, d, target_modules=["q_proj", "lm_head"], modules_to_save=None)
    return d


REFUSALS = {
    "dora": "DoRA", "bias": "bias='all'", "lora_bias": "LoRA bias", "modules_to_save": "modules_to_save",
    "nan": "NaN or Inf", "inf": "NaN or Inf", "peft_type": "peft_type is 'IA3'", "shape": "do not fit the base",
    "layers": "layer 2 does not exist",
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_refusals_leave_nothing_on_disk(isolated_home, tmp_path, llama, kind):
    src = _bad_peft(tmp_path / "src", llama[0], kind)
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as ei:
        convert_adapter(src, str(llama[1]), name="x")
    assert REFUSALS[kind] in ei.value.message, ei.value.message
    assert ei.value.hint
    with pytest.raises(ConversionError):
        convert_adapter(src, str(llama[1]), name="x", out_dir=out / "deep" / "x")
    assert not out.exists()
    assert not (isolated_home / "adapters").exists()


def test_lm_head_on_a_tied_base_is_refused(tmp_path):
    model, base = tiny("llama", tie_word_embeddings=True)
    d = tmp_path / "p"
    make_peft(model, d, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ConversionError, match="ties its output layer") as ei:
        convert_adapter(d, str(base), name="x", out_dir=tmp_path / "x")
    assert "lm_head" in ei.value.hint
    assert not (tmp_path / "x").exists()


def test_embedding_lora_on_a_tied_base_is_refused(tmp_path):
    """llama.cpp would also apply a token_embd LoRA to the tied output matmul and abort (GGML_ASSERT)."""
    model, base = tiny("llama", tie_word_embeddings=True)
    d = tmp_path / "p"
    make_peft(model, d, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ConversionError, match="tied to the embeddings"):
        convert_adapter(d, str(base), name="x", out_dir=tmp_path / "x")


def test_all_problems_of_one_adapter_in_one_error(tmp_path, llama):
    d = tmp_path / "p"
    make_peft(llama[0], d, use_dora=True, bias="all")
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"name": "x"}))  # no task section
    with pytest.raises(ConversionError) as ei:
        convert_adapter(d, str(llama[1]), task_card=card, name="bad name!", outtype="f64")
    msg = ei.value.message
    for needle in ("DoRA", "bias='all'", "no 'task' section", "'bad name!' is not a valid adapter name",
                   "unknown output type 'f64'"):
        assert needle in msg, needle
    assert "\n" not in msg


def test_saved_embedding_copies_are_checked(tmp_path, llama):
    """PEFT saves embed_tokens/lm_head weights next to a LoRA on them: equal to the base's: dropped."""
    import torch

    model, base = llama
    d = tmp_path / "ok"
    make_peft(model, d, target_modules=["embed_tokens", "lm_head", "q_proj"])
    from edgeft.convert.safetensors_np import read_safetensors

    names = read_safetensors(d / "adapter_model.safetensors")[0]
    assert any(n.endswith("embed_tokens.base_layer.weight") for n in names)  # PEFT did save them
    convert_adapter(d, str(base), name="ok", out_dir=tmp_path / "ok-b")
    changed = tmp_path / "changed"
    pm = make_peft(model, changed, target_modules=["embed_tokens", "q_proj"])
    with torch.no_grad():
        pm.base_model.model.model.embed_tokens.base_layer.weight.mul_(3.0)
    pm.save_pretrained(str(changed))
    with pytest.raises(ConversionError, match="differ from the base"):
        convert_adapter(changed, str(base), name="c", out_dir=tmp_path / "c")


def test_f16_overflow_is_refused(tmp_path, llama):
    import torch

    d = tmp_path / "big"
    pm = make_peft(llama[0], d)
    with torch.no_grad():
        next(p for n, p in pm.named_parameters() if "lora_B" in n)[0, 0] = 1e6
    pm.save_pretrained(str(d))
    with pytest.raises(ConversionError, match="float16's range") as ei:
        convert_adapter(d, str(llama[1]), name="x", out_dir=tmp_path / "x", outtype="f16")
    assert "--outtype f32" in ei.value.hint
    convert_adapter(d, str(llama[1]), name="x", out_dir=tmp_path / "x", outtype="f32")


def test_failure_while_writing_leaves_nothing(tmp_path, llama, peft_dir, monkeypatch):
    import edgeft.convert.bundle as B

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(B, "write_adapter", boom)
    out = tmp_path / "new" / "x"
    with pytest.raises(OSError, match="disk full"):
        convert_adapter(peft_dir, str(llama[1]), name="x", out_dir=out)
    assert not (tmp_path / "new").exists()


def test_verify_extra_checked_before_writing(tmp_path, llama, peft_dir, monkeypatch):
    import edgeft.convert.bundle as B

    monkeypatch.setattr(B, "_missing_verify_modules", lambda: ["peft"])
    with pytest.raises(ConversionError, match="--verify needs peft") as ei:
        convert_adapter(peft_dir, str(llama[1]), name="x", out_dir=tmp_path / "x", verify=True)
    assert "edgeft[train]" in ei.value.hint and not (tmp_path / "x").exists()


def test_conversion_does_not_import_torch(tmp_path, llama, peft_dir):
    import subprocess
    import sys

    code = ("import sys; from edgeft.convert import convert_adapter; "
            "convert_adapter(sys.argv[1], sys.argv[2], name='x', out_dir=sys.argv[3]); "
            "bad = [m for m in ('torch', 'transformers', 'peft', 'safetensors') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, str(peft_dir), str(llama[1]), str(tmp_path / "x")], check=True,
                   env={**os.environ, "EDGEFT_HOME": str(tmp_path / "home")})


def test_bf16_saved_adapter(tmp_path, llama):
    import torch

    d = tmp_path / "bf"
    make_peft(llama[0], d, save_dtype=torch.bfloat16)
    res = convert_adapter(d, str(llama[1]), name="bf", out_dir=tmp_path / "bf-b")
    assert res.card.source["source_dtype"] == ["bf16"]
    r = gguf.GGUFReader(res.gguf_path)
    a = next(t for t in r.tensors if t.name == "blk.0.attn_v.weight.lora_a")
    from edgeft.convert.safetensors_np import read_safetensors

    src = read_safetensors(d / "adapter_model.safetensors")[0]
    want = src["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"]
    assert np.array_equal(np.asarray(a.data), want)  # bf16 widened exactly
