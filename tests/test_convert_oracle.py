"""edgeft's converter vs llama.cpp's own convert_lora_to_gguf.py on the same plain LoRA adapter:
the same tensor names, types, shapes and bytes (q/k permutation, token_embd transpose included).

The reference script comes from the llama-cpp-python sdist ($EDGEFT_LLAMA_CPP_SRC, or fetched with
pip into EDGEFT_HOME/src once); it needs torch and transformers, and the base's HF config.json, which the
tiny model provides.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from convert_helpers import ALL_SEVEN, llama_cpp_source, make_peft, run_reference_converter, save_hf_config, tiny  # noqa: E402

from edgeft.convert import convert_adapter  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_src():
    src = llama_cpp_source()
    if src is None:
        pytest.skip("llama.cpp's convert_lora_to_gguf.py is not here and `pip download llama-cpp-python` failed")
    return src


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_same_tensors_as_llama_cpp_converter(tmp_path, reference_src, outtype):
    import gguf

    model, base = tiny("llama")
    peft_dir = tmp_path / "peft"
    make_peft(model, peft_dir, target_modules=ALL_SEVEN + ["embed_tokens", "lm_head"], r=8, lora_alpha=16)
    ref_path = tmp_path / "ref.gguf"
    run_reference_converter(reference_src, peft_dir, save_hf_config(model, tmp_path / "hf"), ref_path, outtype)
    ours = convert_adapter(peft_dir, str(base), name="o", out_dir=tmp_path / "o", outtype=outtype)

    ref, mine = gguf.GGUFReader(ref_path), gguf.GGUFReader(ours.gguf_path)
    rt = {t.name: t for t in ref.tensors}
    mt = {t.name: t for t in mine.tensors}
    assert sorted(rt) == sorted(mt) and len(rt) == 2 * (7 * 2 + 2)
    for name, r in rt.items():
        m = mt[name]
        assert m.tensor_type == r.tensor_type, name
        assert list(m.shape) == list(r.shape), name
        assert np.array_equal(np.asarray(m.data), np.asarray(r.data)), name
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        assert mine.fields[key].contents() == ref.fields[key].contents(), key
