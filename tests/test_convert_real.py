"""The real SmolLM2-135M Q4_1 base: PEFT (transformers on the dequantized GGUF) vs llama.cpp
with the converted adapter, on the verify prompt set (~1000 positions).

Two checks: the acceptance rule of `--verify` on the quantized base (top-1 agreement at most
1 point below the no-adapter floor), and exactness on the same weights without quantization
noise (the base dequantized to an F32 GGUF, where llama.cpp and PEFT must agree everywhere).
"""

from __future__ import annotations

import pytest

pytest.importorskip("peft")

from convert_helpers import ALL_SEVEN, make_peft  # noqa: E402

from edgeft.convert import convert_adapter  # noqa: E402
from edgeft.convert.verify import format_report, load_hf_base, parity_report  # noqa: E402

pytestmark = pytest.mark.slow
B_SCALE = 0.05  # random B scaled so the adapter changes a few % of PEFT's top-1 tokens: a moderate adapter


@pytest.fixture(scope="module")
def hf(base_path):
    return load_hf_base(base_path)


@pytest.fixture(scope="module")
def adapter(hf, base_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    make_peft(hf, root / "peft", r=8, lora_alpha=16, target_modules=ALL_SEVEN, b_scale=B_SCALE)
    res = convert_adapter(root / "peft", str(base_path), name="real", out_dir=root / "bundle")
    return root / "peft", res


def test_parity_on_the_quantized_base(hf, base_path, adapter, capsys):
    peft_dir, res = adapter
    rep = parity_report(peft_dir, base_path, res.folder, hf_model=hf, n_threads=2)
    with capsys.disabled():
        print("\n" + format_report(rep))
    assert rep["adapter"]["positions"] >= 900
    assert rep["adapter_effect"]["top1"] < 0.995  # the adapter does change PEFT's predictions
    assert rep["ok"], rep
    assert rep["adapter"]["top1"] >= rep["floor"]["top1"] - 0.01
    assert rep["adapter"]["kl_mean"] < 2 * rep["floor"]["kl_mean"]


def test_exact_on_the_dequantized_base(hf, base_path, adapter, tmp_path):
    """Same weights in F32: no quantization noise, so any conversion error would show."""
    from edgeft.convert.quantize import quantize_model

    f32 = quantize_model(base_path, tmp_path / "smollm2-f32.gguf", "f32").path
    peft_dir, res = adapter
    rep = parity_report(peft_dir, f32, res.folder, hf_model=hf, n_threads=2)
    assert rep["floor"]["top1"] >= 0.999 and rep["floor"]["kl_mean"] < 1e-4, rep
    assert rep["adapter"]["top1"] >= 0.998 and rep["adapter"]["kl_mean"] < 1e-4, rep
