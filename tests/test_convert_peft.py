"""Reading PEFT folders without torch: safetensors (bf16 too), scales, and every refusal at once."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from edgeft.convert.peft import load_peft, pattern_key, read_peft
from edgeft.convert.safetensors_np import read_safetensors, write_safetensors
from edgeft.errors import ConversionError

P = "base_model.model.model.layers.{i}.self_attn.{m}"


def write_peft(folder, tensors=None, bf16=(), **cfg):
    """A PEFT folder as save_pretrained writes it (two layers, q/v rank 4, random weights)."""
    rng = np.random.default_rng(0)
    if tensors is None:
        tensors = {}
        for i in range(2):
            for m in ("q_proj", "v_proj"):
                tensors[f"{P.format(i=i, m=m)}.lora_A.weight"] = rng.standard_normal((4, 64)).astype(np.float32)
                tensors[f"{P.format(i=i, m=m)}.lora_B.weight"] = rng.standard_normal((64 if m == "q_proj" else 32, 4)).astype(np.float32)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "bias": "none", "use_dora": False, "use_rslora": False, "modules_to_save": None,
              "base_model_name_or_path": "tiny", "rank_pattern": {}, "alpha_pattern": {}}
    config.update(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    write_safetensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"}, bf16=set(bf16))
    return folder


def problems_of(folder) -> list[str]:
    with pytest.raises(ConversionError) as ei:
        read_peft(folder)
    return [p.what for p in ei.value.problems]


def test_reads_f32_f16_and_bf16_exactly(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 5)).astype(np.float32)
    write_safetensors(tmp_path / "x.safetensors", {"f32": a, "f16": a.astype(np.float16), "bf16": a}, bf16={"bf16"})
    arrays, dtypes, _ = read_safetensors(tmp_path / "x.safetensors")
    assert dtypes == {"f32": "f32", "f16": "f16", "bf16": "bf16"}
    assert np.array_equal(arrays["f32"], a)
    assert np.array_equal(arrays["f16"], a.astype(np.float16).astype(np.float32))
    assert np.abs(arrays["bf16"] - a).max() <= np.abs(a).max() * 2 ** -8  # bf16 keeps 8 bits of mantissa
    assert arrays["bf16"].dtype == np.float32


def test_bf16_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    t = torch.randn(6, 7).to(torch.bfloat16)
    save_file({"w": t}, str(tmp_path / "t.safetensors"))
    arrays, dtypes, _ = read_safetensors(tmp_path / "t.safetensors")
    assert dtypes["w"] == "bf16"
    assert np.array_equal(arrays["w"], t.float().numpy())


def test_plain_adapter_and_scales(tmp_path):
    ad = read_peft(write_peft(tmp_path / "a"))
    assert sorted(ad.modules) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                  "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert ad.targets == ["q_proj", "v_proj"] and ad.ranks == [4] and ad.base_model == "tiny"
    assert all(m.scale == 2.0 for m in ad.modules.values())


def test_rslora_and_patterns_follow_peft(tmp_path):
    rng = np.random.default_rng(2)
    tensors = {}
    for i, (m, r) in enumerate([("q_proj", 8), ("v_proj", 4)]):
        tensors[f"{P.format(i=0, m=m)}.lora_A.weight"] = rng.standard_normal((r, 64)).astype(np.float32)
        tensors[f"{P.format(i=0, m=m)}.lora_B.weight"] = rng.standard_normal((64, r)).astype(np.float32)
    ad = read_peft(write_peft(tmp_path / "p", tensors, rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 32}))
    assert ad.modules["model.layers.0.self_attn.q_proj"].scale == 8 / 8
    assert ad.modules["model.layers.0.self_attn.v_proj"].scale == 32 / 4
    ad = read_peft(write_peft(tmp_path / "rs", tensors, use_rslora=True, rank_pattern={"q_proj": 8}))
    assert ad.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(8 / math.sqrt(8))
    assert ad.modules["model.layers.0.self_attn.v_proj"].scale == pytest.approx(8 / 2)


def test_pattern_key_is_peft_get_pattern_key():
    peft_other = pytest.importorskip("peft.utils.other")
    keys = ["q_proj", "layers.1.self_attn.o_proj", r"layers\.[0-1]\.mlp\.down_proj", "self_attn.k"]
    for key in ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj", "model.layers.0.self_attn.o_proj",
                "model.layers.1.mlp.down_proj", "model.layers.3.mlp.down_proj", "model.layers.0.self_attn.k_proj"]:
        want = peft_other.get_pattern_key(keys, key)
        got = pattern_key(keys, key)
        assert (got if got is not None else key) == want, key


def test_bf16_adapter_reads_as_float32(tmp_path):
    folder = write_peft(tmp_path / "b", bf16={f"{P.format(i=0, m='q_proj')}.lora_A.weight"})
    ad = read_peft(folder)
    assert ad.dtypes == {"bf16", "f32"}
    assert ad.modules["model.layers.0.self_attn.q_proj"].a.dtype == np.float32


REFUSALS = [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias='all'"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"lora_bias": True}, "LoRA bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"trainable_token_indices": [5, 6]}, "trainable tokens"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
    ({"alora_invocation_tokens": [1, 2]}, "activated LoRA"),
    ({"use_qalora": True}, "QA-LoRA"),
    ({"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters"),
    ({"use_future_trick": True}, "unknown LoRA option use_future_trick"),
    ({"r": 0}, "r must be a positive integer"),
    ({"lora_alpha": "x"}, "lora_alpha must be a number"),
]


@pytest.mark.parametrize("cfg,needle", REFUSALS, ids=[n for _, n in REFUSALS])
def test_config_refusals(tmp_path, cfg, needle):
    probs = problems_of(write_peft(tmp_path / "a", **cfg))
    assert any(needle in p for p in probs), probs


def test_tensor_refusals_all_in_one_error(tmp_path):
    rng = np.random.default_rng(3)
    q = P.format(i=0, m="q_proj")
    v = P.format(i=1, m="v_proj")
    tensors = {
        f"{q}.lora_A.weight": rng.standard_normal((4, 64)).astype(np.float32),
        f"{q}.lora_B.weight": np.full((64, 4), np.nan, dtype=np.float32),
        f"{q}.lora_magnitude_vector": np.ones(64, dtype=np.float32),
        f"{q}.lora_B.bias": np.zeros(64, dtype=np.float32),
        f"{v}.lora_A.weight": rng.standard_normal((4, 64)).astype(np.float32),  # no lora_B
        "base_model.model.lm_head.modules_to_save.default.weight": np.zeros((8, 64), dtype=np.float32),
        "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": np.full((2, 64), np.inf, dtype=np.float32),
        "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": np.zeros((32, 2), dtype=np.float32),
    }
    with pytest.raises(ConversionError) as ei:
        read_peft(write_peft(tmp_path / "bad", tensors, use_dora=True))
    msg = str(ei.value.message)
    for needle in ("DoRA", "LoRA bias", "NaN or Inf", "has lora_A but no lora_B", "full weights for 'lm_head'",
                   "k_proj' has rank 2 but adapter_config.json says r=4", "k_proj.lora_A' contains NaN or Inf"):
        assert needle in msg, needle
    assert "\n" not in msg  # one line for the CLI
    assert msg.count("DoRA (use_dora=true)") == 1  # config key and magnitude vectors are one problem
    assert len(ei.value.problems) == 7


def test_missing_files(tmp_path):
    (tmp_path / "empty").mkdir()
    probs = problems_of(tmp_path / "empty")
    assert any("adapter_config.json is missing" in p for p in probs)
    assert any("no adapter weights" in p for p in probs)
    with pytest.raises(ConversionError, match="is not a folder"):
        read_peft(tmp_path / "nope")


def test_bin_without_torch_has_a_hint(tmp_path, monkeypatch):
    folder = write_peft(tmp_path / "b")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torch" else real(n, *a))
    with pytest.raises(ConversionError) as ei:
        read_peft(folder)
    assert "needs torch" in ei.value.message and "safe_serialization=True" in ei.value.hint


def test_bin_with_torch_is_read(tmp_path):
    torch = pytest.importorskip("torch")
    folder = write_peft(tmp_path / "b")
    arrays, _, _ = read_safetensors(folder / "adapter_model.safetensors")
    torch.save({k: torch.from_numpy(v.copy()).to(torch.bfloat16) for k, v in arrays.items()}, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    ad = read_peft(folder)
    key = "model.layers.0.self_attn.q_proj"
    assert ad.dtypes == {"bf16"}
    ref = torch.from_numpy(arrays[f"base_model.model.{key}.lora_A.weight"].copy()).to(torch.bfloat16).float().numpy()
    assert np.array_equal(ad.modules[key].a, ref)


def test_config_rank_must_match_weights(tmp_path):
    probs = problems_of(write_peft(tmp_path / "a", r=8))
    assert any("has rank 4 but adapter_config.json says r=8" in p for p in probs)


def test_reader_imports_no_torch(tmp_path):
    import subprocess

    folder = write_peft(tmp_path / "a")
    code = ("import sys; from edgeft.convert.peft import read_peft; read_peft(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
