"""`edgeft quantize`: numpy types bit-identical to llama.cpp's quantizer, metadata kept, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from convert_helpers import TOKENS, engine, tiny  # noqa: E402

from edgeft.gguf_header import read_header, tensor_bytes  # noqa: E402
from edgeft.convert.quantize import NUMPY_TYPES, llama_quantize, quantize_model  # noqa: E402
from edgeft.convert.verify import engine_logits  # noqa: E402
from edgeft.errors import ConversionError  # noqa: E402


def kv_bytes(path: Path, skip=("general.file_type", "general.quantization_version")) -> dict[str, bytes]:
    h = read_header(path)
    raw = path.read_bytes()
    return {k: raw[a:b] for k, (a, b) in h.kv_spans.items() if k not in skip}


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "f16", "bf16"])
def test_bit_identical_to_llama_cpp_quantizer(tmp_path, qtype):
    _, base = tiny("llama")
    ours = quantize_model(base, tmp_path / "ours.gguf", qtype)
    assert ours.engine == "numpy"
    llama_quantize(base, tmp_path / "ref.gguf", NUMPY_TYPES[qtype][1])
    a, b = read_header(tmp_path / "ours.gguf"), read_header(tmp_path / "ref.gguf")
    assert sorted(a.tensors) == sorted(b.tensors)  # llama.cpp writes them in its own order
    for name in a.tensors:
        assert a.tensors[name].type == b.tensors[name].type, name
        assert np.array_equal(tensor_bytes(a, name), tensor_bytes(b, name)), name
    assert a.kv == b.kv
    assert kv_bytes(tmp_path / "ours.gguf") == kv_bytes(base)  # tokenizer & co copied byte for byte


def test_quantized_model_runs_close_to_f32(tmp_path):
    _, base = tiny("llama")
    quantize_model(base, tmp_path / "q8.gguf", "q8_0")
    with engine(base) as e32, engine(tmp_path / "q8.gguf") as e8:
        a, b = engine_logits(e32, TOKENS), engine_logits(e8, TOKENS)
    assert np.abs(a - b).max() < 0.3 and np.abs(a - b).mean() < 0.03 and (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


def test_k_quants_go_through_llama_cpp(tmp_path, capsys):
    from edgeft.cli import main

    _, base = tiny("llama")
    main(["quantize", str(base), "--type", "q4_k_m", "-o", str(tmp_path / "k.gguf")])
    assert "llama.cpp" in capsys.readouterr().out
    h = read_header(tmp_path / "k.gguf")
    assert h.kv["general.file_type"] == 15  # MOSTLY_Q4_K_M
    with engine(tmp_path / "k.gguf") as eng:
        assert np.isfinite(engine_logits(eng, TOKENS[:8])).all()


def test_a_failing_llama_quantizer_leaves_no_file(tmp_path, monkeypatch):
    """llama.cpp writes its output as it goes; a failure half way must not leave that file."""
    from edgeft import _llama
    from edgeft.errors import ModelError

    def half_then_fail(src, dst, ftype, **kw):
        with open(dst, "wb") as f:
            f.write(b"GGUF" + b"\0" * 1000)
        raise ModelError("llama.cpp could not quantize (code 1)")

    monkeypatch.setattr(_llama, "quantize_model", half_then_fail)
    _, base = tiny("llama")
    with pytest.raises(ModelError, match="could not quantize"):
        quantize_model(base, tmp_path / "k.gguf", "q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_errors(tmp_path):
    _, base = tiny("llama")
    with pytest.raises(ConversionError, match="unknown quantization type 'q3_x'"):
        quantize_model(base, tmp_path / "x.gguf", "q3_x")
    (tmp_path / "x.gguf").write_text("keep")
    with pytest.raises(ConversionError, match="already exists"):
        quantize_model(base, tmp_path / "x.gguf", "q8_0")
    assert (tmp_path / "x.gguf").read_text() == "keep"
    with pytest.raises(ConversionError, match="overwrite the input"):
        quantize_model(base, base, "q8_0", force=True)


def test_adapter_input_is_refused(tmp_path):
    import gguf

    p = tmp_path / "a.gguf"
    w = gguf.GGUFWriter(p, "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConversionError, match="is a LoRA adapter, not a base model") as ei:
        quantize_model(p, tmp_path / "o.gguf", "q8_0")
    assert "--outtype" in ei.value.hint


@pytest.mark.slow
def test_real_base_requantized_like_llama_cpp(tmp_path, base_path):
    """SmolLM2 Q4_1 -> q8_0 (dequantize, requantize): the same bytes as llama.cpp's quantizer
    (--allow-requantize), tokenizer and chat template kept."""
    res = quantize_model(base_path, tmp_path / "q8.gguf", "q8_0")
    assert res.types == {"Q8_0": 211, "F32": 61}
    assert kv_bytes(tmp_path / "q8.gguf") == kv_bytes(base_path)
    llama_quantize(base_path, tmp_path / "ref.gguf", NUMPY_TYPES["q8_0"][1])
    a, b = read_header(tmp_path / "q8.gguf"), read_header(tmp_path / "ref.gguf")
    for name in a.tensors:
        assert a.tensors[name].type == b.tensors[name].type and np.array_equal(tensor_bytes(a, name), tensor_bytes(b, name)), name
