"""PEFT (transformers, float32) vs llama.cpp (F32 tiny base + converted adapter): same logits.

Tolerance: llama.cpp keeps its KV cache in f16, so even without an adapter its logits differ from
transformers' by ~1e-3 (logit std ~0.8 here). With the adapter (which moves logits by 1-6 units)
the max abs difference must stay below 0.03 and the mean below 3e-3, top-1 must agree at every
position, and llama.cpp must make PEFT's choice at each of 16 greedy steps (positions whose top-2
margin is under 0.02 count as ties and are left out; random tiny models have a few). A missing q/k
permutation breaks all of these.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("peft")

from convert_helpers import ALL_SEVEN, TOKENS, engine, greedy, make_peft, tiny, torch_logits  # noqa: E402

from edgeft.convert import convert_adapter  # noqa: E402
from edgeft.convert.verify import engine_logits  # noqa: E402

MAX_ABS, MEAN_ABS = 0.03, 3e-3
PHI3 = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


TIE = 0.02  # a top-1/top-2 logit margin below this is a tie: either answer is right


def measure(pm, base, bundle, n_greedy=16) -> dict:
    """Logit differences on TOKENS, and greedy decoding along PEFT's greedy path (teacher-forced):
    llama.cpp must pick the same token at every step that is not a tie."""
    with engine(base) as eng:
        eng.use(eng.load_adapter(str(bundle), force=True))
        cpp = engine_logits(eng, TOKENS)
        ref = torch_logits(pm, TOKENS)
        path = greedy(lambda t: torch_logits(pm, t), TOKENS[:8], n_greedy)
        seq = TOKENS[:8] + path
        g_cpp = engine_logits(eng, seq)[7:-1].argmax(-1)
    g_ref = torch_logits(pm, seq)[7:-1]
    d = np.abs(cpp - ref)
    decisive = _margin(ref) > TIE
    g_decisive = _margin(g_ref) > TIE
    return {"max": float(d.max()), "mean": float(d.mean()),
            "top1": float((cpp.argmax(-1) == ref.argmax(-1))[decisive].mean()), "ties": int((~decisive).sum()),
            "greedy": bool((g_cpp == g_ref.argmax(-1))[g_decisive].all()), "path": path}


def _margin(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def assert_parity(m: dict, max_abs=MAX_ABS, mean_abs=MEAN_ABS):
    assert m["max"] < max_abs and m["mean"] < mean_abs, m
    assert m["top1"] == 1.0, m
    assert m["greedy"], m
    assert m["ties"] <= len(TOKENS) // 6, m  # the comparison is not vacuous


def convert_and_measure(tmp_path, arch, lora, qkv="as-is", outtype="f32", save_dtype=None, **over):
    model, base = tiny(arch, qkv=qkv, **over)
    d = tmp_path / "peft"
    pm = make_peft(model, d, save_dtype=save_dtype, **lora)
    res = convert_adapter(d, str(base), name="t", out_dir=tmp_path / "b", outtype=outtype)
    return measure(pm, base, res.folder), res


def test_base_without_adapter_matches_transformers():
    """The tiny F32 bases themselves are right (names, permutation, norms): the floor is ~1e-3."""
    for arch in ("llama", "qwen2", "phi3", "gemma"):
        model, base = tiny(arch)
        with engine(base) as eng:
            d = np.abs(engine_logits(eng, TOKENS) - torch_logits(model, TOKENS))
        assert d.max() < 1e-2 and d.mean() < 1e-3, (arch, d.max())


LLAMA_VARIANTS = {
    "plain_qv": dict(target_modules=["q_proj", "v_proj"]),
    "all_seven": dict(target_modules=ALL_SEVEN, r=8, lora_alpha=16),
    "rslora": dict(target_modules=ALL_SEVEN, r=8, lora_alpha=4, use_rslora=True),
    "alpha_pattern": dict(target_modules=ALL_SEVEN, alpha_pattern={"k_proj": 32, "down_proj": 2,
                                                                   "layers.1.self_attn.o_proj": 64}),
    "rank_pattern": dict(target_modules=ALL_SEVEN, rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2},
                         alpha_pattern={"up_proj": 3}),
    "rslora_patterns": dict(target_modules=ALL_SEVEN, use_rslora=True, rank_pattern={"v_proj": 16}),
    "embed_and_head": dict(target_modules=["embed_tokens", "lm_head", "q_proj", "k_proj"]),
}


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_llama_parity(tmp_path, variant):
    m, res = convert_and_measure(tmp_path, "llama", LLAMA_VARIANTS[variant])
    assert_parity(m)
    folded = res.card.adapter["scale"]["folded_into_lora_b"]
    assert folded == (variant in ("rslora", "alpha_pattern", "rank_pattern", "rslora_patterns"))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "phi3", "gemma", "gemma2"])
def test_other_architectures(tmp_path, arch):
    targets = PHI3 if arch == "phi3" else ALL_SEVEN
    m, _ = convert_and_measure(tmp_path, arch, dict(target_modules=targets, alpha_pattern={"o_proj": 16}))
    assert_parity(m)


def test_qwen2_embedding_and_head(tmp_path):
    m, _ = convert_and_measure(tmp_path, "qwen2", dict(target_modules=["embed_tokens", "lm_head", "v_proj"]))
    assert_parity(m)


def test_separate_qkv_onto_fused_llama_base(tmp_path):
    m, res = convert_and_measure(tmp_path, "llama", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                         rank_pattern={"k_proj": 2}), qkv="fused")
    assert_parity(m)
    assert res.n_pairs == 4  # attn_qkv + attn_output in each of 2 layers


def test_fused_qkv_onto_split_phi3_base(tmp_path):
    m, res = convert_and_measure(tmp_path, "phi3", dict(target_modules=PHI3), qkv="split")
    assert_parity(m)
    assert res.n_pairs == 2 * 6  # q, k, v, o, ffn_up, ffn_down


def test_bf16_saved_adapter(tmp_path):
    import torch

    m, _ = convert_and_measure(tmp_path, "llama", dict(target_modules=ALL_SEVEN), save_dtype=torch.bfloat16)
    assert_parity(m)


@pytest.mark.parametrize("outtype,max_abs,mean_abs", [("f16", 0.05, 6e-3), ("bf16", 0.3, 0.04), ("q8_0", 0.3, 0.04)])
def test_smaller_outtypes_stay_close(tmp_path, outtype, max_abs, mean_abs):
    """Lower-precision adapter tensors add their own rounding (bf16: 8 bits, q8_0: 8 bits per block)."""
    m, _ = convert_and_measure(tmp_path, "llama", dict(target_modules=ALL_SEVEN), outtype=outtype)
    assert m["max"] < max_abs and m["mean"] < mean_abs, m
    assert m["top1"] >= 0.95, m


def test_missing_permutation_would_be_caught(tmp_path, monkeypatch):
    """Negative control: without the q/k permutation of lora_B the adapter loads but is wrong."""
    import edgeft.convert.names as names

    monkeypatch.setattr(names, "permute_rows", lambda b, n: b)
    m, _ = convert_and_measure(tmp_path, "llama", dict(target_modules=["q_proj", "k_proj"]))
    assert m["max"] > 10 * MAX_ABS and m["top1"] < 1.0


def test_verify_report_on_tiny_model(tmp_path):
    from edgeft.convert.verify import format_report, parity_report

    model, base = tiny("llama")
    d = tmp_path / "peft"
    make_peft(model, d, target_modules=ALL_SEVEN)
    res = convert_adapter(d, str(base), name="t", out_dir=tmp_path / "b")
    rep = parity_report(d, base, res.folder, hf_model=model, n_threads=2)
    assert rep["ok"] and rep["adapter"]["top1"] >= 0.995 and rep["floor"]["top1"] >= 0.995  # near-ties aside
    assert rep["adapter"]["kl_mean"] < 1e-4 and rep["adapter_effect"]["top1"] < 0.9
    assert "OK" in format_report(rep)
    assert not any("lora" in n for n, _ in model.named_modules())  # the caller's model is left clean


def test_cli_verify_stores_parity_in_card(tmp_path, capsys):
    """`edgeft convert --verify`: transformers loads the base GGUF itself; report printed and stored."""
    import json

    from edgeft.cli import main

    model, base = tiny("llama")
    d = tmp_path / "peft"
    make_peft(model, d, target_modules=["q_proj", "v_proj", "down_proj"])
    main(["convert", str(d), "--base", str(base), "-o", str(tmp_path / "b"), "--verify", "--threads", "2"])
    out = capsys.readouterr().out
    assert "PEFT vs llama.cpp:" in out and "  with adapter " in out and "OK:" in out
    card = json.loads((tmp_path / "b" / "adapter.json").read_text())
    assert card["metrics"]["parity"]["ok"] is True
    assert card["metrics"]["parity"]["adapter"]["top1"] >= 0.995
