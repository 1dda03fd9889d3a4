"""`edgeft merge`: merged model == base + hot adapters, untouched tensors and metadata kept,
re-quantization, and the errors (another base, a folder, an existing output)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft")

from convert_helpers import ALL_SEVEN, TOKENS, engine, make_peft, tiny  # noqa: E402

from edgeft.convert import convert_adapter  # noqa: E402
from edgeft.gguf_header import read_header, tensor_bytes  # noqa: E402
from edgeft.convert.merge import merge_adapter, merge_adapters  # noqa: E402
from edgeft.convert.verify import engine_logits  # noqa: E402
from edgeft.errors import AdapterError, ConversionError  # noqa: E402


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    model, base = tiny("llama")
    root = tmp_path_factory.mktemp("merge")
    out = {}
    for name, lora in {"seven": dict(target_modules=ALL_SEVEN, b_scale=0.3),
                       "qk": dict(target_modules=["q_proj", "k_proj", "lm_head", "embed_tokens"], seed=7, b_scale=0.3,
                                  use_rslora=True)}.items():
        make_peft(model, root / f"p-{name}", **lora)
        out[name] = convert_adapter(root / f"p-{name}", str(base), name=name, out_dir=root / name).folder
    return base, out


def raw_kv(path: Path) -> dict[str, bytes]:
    h = read_header(path)
    data = path.read_bytes()
    return {k: data[a:b] for k, (a, b) in h.kv_spans.items()}


def test_merged_equals_hot_adapters(tmp_path, bundles):
    base, b = bundles
    res = merge_adapters(str(base), [f"{b['seven']}=0.7", f"{b['qk']}=1.5"], tmp_path / "m.gguf")
    assert res.quant == "auto" and set(res.types.values()) == {"F32"} and res.engine == "numpy"  # f32 base: kept
    assert res.adapters == {"seven": 0.7, "qk": 1.5}
    # merged vs hot, measured by merge itself on the prompt set, and here on TOKENS
    assert res.cost["merged_vs_hot"]["top1"] >= 0.995 and res.cost["merged_vs_hot"]["kl_mean"] < 1e-5
    assert res.cost["adapter_effect"]["top1"] < 0.9  # the adapters do change the output
    with engine(base) as hot, engine(tmp_path / "m.gguf") as cold:
        hot.use({str(b["seven"]): 0.7, str(b["qk"]): 1.5})
        d = np.abs(engine_logits(hot, TOKENS) - engine_logits(cold, TOKENS))
    assert d.max() < 5e-3, d.max()
    # every other tensor and all metadata as they were
    h0, h1 = read_header(base), read_header(tmp_path / "m.gguf")
    assert list(h0.tensors) == list(h1.tensors)
    changed = {n for n in h0.tensors if not np.array_equal(tensor_bytes(h0, n), tensor_bytes(h1, n))}
    assert changed == set(res.merged)
    assert "token_embd.weight" in changed and "output.weight" in changed and "blk.1.ffn_down.weight" in changed
    assert raw_kv(tmp_path / "m.gguf") == raw_kv(base)


@pytest.mark.parametrize("quant,types", [("f16", {"F16"}), ("q8_0", {"Q8_0"}), ("q4_1", {"Q4_1", "Q8_0"})])
def test_requantized_merge(tmp_path, bundles, quant, types):
    base, b = bundles
    res = merge_adapters(str(base), [str(b["seven"])], tmp_path / "m.gguf", quant=quant, report=False)
    assert set(res.types.values()) <= types
    h = read_header(tmp_path / "m.gguf")
    assert h.kv["general.file_type"] != read_header(base).kv["general.file_type"]
    with engine(tmp_path / "m.gguf") as eng:
        assert np.isfinite(engine_logits(eng, TOKENS)).all()


def test_k_quant_merge_through_llama_cpp(tmp_path, bundles):
    base, b = bundles
    res = merge_adapters(str(base), [str(b["seven"])], tmp_path / "m.gguf", quant="q4_k_m")
    assert res.engine == "llama.cpp" and res.cost["merged_vs_hot"]["top1"] > 0.8


def test_simple_api_for_the_runtime_benchmark(tmp_path, bundles):
    base, b = bundles
    out = merge_adapter(base, b["qk"] / "adapter.gguf", tmp_path / "m.gguf")
    assert out == tmp_path / "m.gguf" and out.is_file()


def test_errors(tmp_path, bundles):
    base, b = bundles
    (tmp_path / "exists.gguf").write_text("x")
    with pytest.raises(ConversionError, match="already exists"):
        merge_adapters(str(base), [str(b["seven"])], tmp_path / "exists.gguf")
    with pytest.raises(ConversionError, match="overwrite the base"):
        merge_adapters(str(base), [str(b["seven"])], base, force=True)
    with pytest.raises(ConversionError, match="bad adapter scale"):
        merge_adapters(str(base), [f"{b['seven']}=lots"], tmp_path / "m.gguf")
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        merge_adapters(str(base), ["nope"], tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_adapter_for_another_base(tmp_path, bundles):
    base, b = bundles
    # same shapes, other weights: the card's sha256 differs -> refused unless --force
    other_model, other = tiny("llama", initializer_range=0.05)
    with pytest.raises(ConversionError, match="was made for base") as ei:
        merge_adapters(str(other), [str(b["seven"])], tmp_path / "m.gguf")
    assert "--force" in ei.value.hint
    merge_adapters(str(other), [str(b["seven"])], tmp_path / "m.gguf", force=True, report=False)
    # other shapes: the runtime's validator says why
    _, wide = tiny("llama", hidden_size=96)
    with pytest.raises(AdapterError, match="do not fit the base"):
        merge_adapters(str(wide), [str(b["seven"] / "adapter.gguf")], tmp_path / "w.gguf", force=True)


def test_q8_0_adapter_merges(tmp_path, bundles):
    base, _ = bundles
    model, _ = tiny("llama")
    make_peft(model, tmp_path / "p", target_modules=["up_proj", "down_proj"], r=32, lora_alpha=32, b_scale=0.3)
    q8 = convert_adapter(tmp_path / "p", str(base), name="q8", out_dir=tmp_path / "q8", outtype="q8_0").folder
    res = merge_adapters(str(base), [str(q8)], tmp_path / "m.gguf")
    assert res.cost["merged_vs_hot"]["top1"] >= 0.995


def test_cli_merge(tmp_path, bundles, capsys):
    from edgeft.cli import main

    base, b = bundles
    main(["merge", "--base", str(base), "--adapter", f"{b['seven']}=0.5", "-o", str(tmp_path / "m.gguf"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["adapters"] == {"seven": 0.5} and out["cost"]["merged_vs_hot"]["top1"] >= 0.995
    with pytest.raises(SystemExit) as ei:
        main(["merge", "--base", str(base), "--adapter", str(b["seven"]), "-o", str(tmp_path / "m.gguf")])
    assert ei.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and "already exists" in err[0] and err[1].startswith("hint: ")


@pytest.mark.slow
def test_real_base_merge_same_quant(tmp_path, base_path):
    """SmolLM2 Q4_1 + a random rank-8 adapter on all seven projections, merged back to Q4_1."""
    from edgeft.convert.bench import write_synthetic_adapter

    peft_dir = write_synthetic_adapter(read_header(base_path), tmp_path / "peft")
    bundle = convert_adapter(peft_dir, str(base_path), name="syn", out_dir=tmp_path / "syn").folder
    res = merge_adapters(str(base_path), [str(bundle)], tmp_path / "m.gguf", quant="same")
    assert set(res.types.values()) == {"Q4_1"} and len(res.merged) == 210
    h0, h1 = read_header(base_path), read_header(tmp_path / "m.gguf")
    assert h1.tensors["token_embd.weight"].offset - h1.data_start == h0.tensors["token_embd.weight"].offset - h0.data_start
    assert np.array_equal(tensor_bytes(h0, "token_embd.weight"), tensor_bytes(h1, "token_embd.weight"))
    assert raw_kv(tmp_path / "m.gguf") == raw_kv(base_path)
    c = res.cost["merged_vs_hot"]
    # the cost of re-quantizing the merged tensors to Q4_1
    assert c["top1"] >= 0.85 and c["kl_mean"] < 0.05, res.cost


def test_adapter_kept_measures_how_much_of_the_adapter_survives_the_merge():
    from edgeft.convert.merge import adapter_kept

    assert adapter_kept(1.0, 0.35) == 1.0            # merged == base + hot adapter everywhere
    assert adapter_kept(0.35, 0.35) == 0.0           # merged agrees no more than the bare base
    assert adapter_kept(0.30, 0.35) == 0.0
    assert adapter_kept(0.4365, 0.3511) == pytest.approx(0.1316, abs=1e-3)  # sentiment merged into Q4_1
    assert adapter_kept(0.9, 1.0) is None            # an adapter that changes nothing


@pytest.mark.slow
def test_auto_merge_keeps_a_trained_adapter_that_q4_would_lose(tmp_path, base_path):
    """The shipped sentiment adapter: merged back into Q4_1 most of its effect rounds away; the
    default (auto: adapted tensors to Q8_0) keeps it."""
    from pathlib import Path

    shipped = Path(__file__).resolve().parent.parent / "models" / "adapters" / "sentiment"
    auto = merge_adapters(str(base_path), [str(shipped)], tmp_path / "auto.gguf", threads=2)
    assert auto.quant == "auto" and set(auto.types.values()) == {"Q8_0"} and len(auto.merged) == 210
    h0, h1 = read_header(base_path), read_header(tmp_path / "auto.gguf")
    assert np.array_equal(tensor_bytes(h0, "token_embd.weight"), tensor_bytes(h1, "token_embd.weight"))
    same = merge_adapters(str(base_path), [str(shipped)], tmp_path / "same.gguf", quant="same", threads=2)
    assert set(same.types.values()) == {"Q4_1"}
    assert auto.cost["adapter_effect"]["top1"] < 0.9  # the adapter changes many top-1 tokens
    assert auto.cost["adapter_kept"] >= 0.8, auto.cost
    assert same.cost["adapter_kept"] < 0.5, same.cost
