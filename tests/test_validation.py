"""Bad adapter and base files become one clear error before llama.cpp sees them. Against the tiny
base (tests/tiny_gguf.py): validation reads headers and shapes, any llama base will do."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeft import Engine
from edgeft.bundles import AdapterBundle
from edgeft.errors import AdapterError, ModelError
from edgeft.gguf_info import base_info, inspect_adapter
from helpers import ALL7, write_adapter, write_bundle
from tiny_gguf import write_tiny_base


def test_valid_adapter_passes(tiny_base, tmp_path):
    p = write_adapter(tmp_path / "ok.gguf", tiny_base, rank=4, dtype=np.float16)
    base = base_info(tiny_base)
    info = inspect_adapter(p, base)
    n_blocks = len({n.split(".")[1] for n in base.tensors if n.startswith("blk.")})
    assert n_blocks >= 2 and len(info.pairs) == n_blocks * 7 and info.ranks == {4} and info.alpha == 4.0
    assert info.nbytes == sum(2 * 4 * (s[0] + s[1]) for n, s in base.tensors.items()
                              if n.startswith("blk.") and n.split(".")[2] in ALL7)


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a gguf file at all" * 10, b"GGUF" + b"\x00" * 100])
def test_garbage_adapter(tiny_base, tmp_path, content):
    p = tmp_path / "bad.gguf"
    p.write_bytes(content)
    with pytest.raises(AdapterError):
        inspect_adapter(p, base_info(tiny_base))


def test_truncated_adapter(tiny_base, tmp_path):
    p = write_adapter(tmp_path / "t.gguf", tiny_base)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="truncated|damaged|beyond"):
        inspect_adapter(p, base_info(tiny_base))


def test_wrong_architecture(tiny_base, tmp_path):
    p = write_adapter(tmp_path / "q.gguf", tiny_base, arch="qwen2")
    with pytest.raises(AdapterError, match="architecture 'qwen2'"):
        inspect_adapter(p, base_info(tiny_base))


def test_wrong_shape_missing_pair_nan_all_reported(tiny_base, tmp_path):
    def mutate(t):
        t["blk.0.attn_q.weight.lora_a"] = np.zeros((8, 100), np.float32)     # wrong in-features
        del t["blk.1.attn_k.weight.lora_b"]                                   # missing pair
        t["blk.1.attn_v.weight.lora_b"] = t["blk.1.attn_v.weight.lora_b"].copy()
        t["blk.1.attn_v.weight.lora_b"][0, 0] = np.nan                        # NaN
        t["blk.99.attn_q.weight.lora_a"] = t["blk.1.attn_q.weight.lora_a"]   # no such base tensor
        t["blk.99.attn_q.weight.lora_b"] = t["blk.1.attn_q.weight.lora_b"]

    p = write_adapter(tmp_path / "m.gguf", tiny_base, mutate=mutate)
    with pytest.raises(AdapterError) as ei:
        inspect_adapter(p, base_info(tiny_base))
    msg = ei.value.message
    for needle in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.1.attn_v.weight.lora_b", "NaN",
                   "blk.99.attn_q.weight"):
        assert needle in msg


def test_embedding_lora_on_tied_base_is_refused(tmp_path):
    """SmolLM2 ties its output matrix to token_embd: llama.cpp would run the embedding LoRA as an
    output matmul and abort the process, so the adapter is refused before it gets there. The tiny
    base written tied, as SmolLM2 is."""
    base_path = write_tiny_base(tmp_path / "tied.gguf", tied=True)
    info = base_info(base_path)
    assert "output.weight" not in info.tensors and "token_embd.weight" in info.tensors
    n_embd, n_vocab = info.tensors["token_embd.weight"]
    rng = np.random.default_rng(0)

    def mutate(t):
        t["token_embd.weight.lora_a"] = rng.standard_normal((n_vocab, 4)).astype(np.float32)
        t["token_embd.weight.lora_b"] = rng.standard_normal((n_embd, 4)).astype(np.float32)

    p = write_adapter(tmp_path / "e.gguf", base_path, rank=4, mutate=mutate)
    with pytest.raises(AdapterError, match="tied embeddings") as ei:
        inspect_adapter(p, info)
    assert "token_embd.weight" in ei.value.message
    # the same file without the embedding pair is accepted: the refusal is about that pair only
    ok = write_adapter(tmp_path / "ok.gguf", base_path, rank=4)
    assert "token_embd.weight" not in inspect_adapter(ok, info).pairs


def test_base_model_given_as_adapter(tiny_base):
    with pytest.raises(AdapterError, match="not a LoRA adapter"):
        inspect_adapter(tiny_base)


def test_adapter_given_as_base(tiny_base, tmp_path):
    p = write_adapter(tmp_path / "a.gguf", tiny_base)
    with pytest.raises(ModelError, match="adapter, not a base"):
        base_info(p)


def test_garbage_base(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"\x00" * 4096)
    with pytest.raises(ModelError, match="not a GGUF"):
        base_info(p)
    with pytest.raises(ModelError):
        Engine(str(p))


def test_truncated_base(tiny_base, tmp_path):
    p = tmp_path / "half.gguf"
    data = tiny_base.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated|damaged|beyond"):
        Engine(str(p))


def test_base_sha_mismatch_refused_unless_forced(tiny_engine, tiny_base, tmp_path):
    folder = write_bundle(tmp_path / "other", tiny_base, name="other", base_sha="0" * 64)
    with pytest.raises(AdapterError, match="made for base"):
        tiny_engine.load_adapter(folder)
    assert tiny_engine.load_adapter(folder, force=True) == "other"
    tiny_engine.unload_adapter("other")


def test_bundle_card_errors(tiny_base, tmp_path):
    folder = write_bundle(tmp_path / "b", tiny_base, name="b")
    (folder / "adapter.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        AdapterBundle.load(folder)
    (folder / "adapter.json").write_text(json.dumps({"name": "b", "task": {"output": {"type": "labels"}}}))
    with pytest.raises(AdapterError, match="labels"):
        AdapterBundle.load(folder)
    (folder / "adapter.json").write_text(json.dumps({"name": "b", "adapter": {"file": "missing.gguf"}}))
    with pytest.raises(AdapterError, match="no missing.gguf"):
        AdapterBundle.load(folder)
    with pytest.raises(AdapterError, match="not an adapter bundle"):
        AdapterBundle.load(tmp_path)
