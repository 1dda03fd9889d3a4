"""The real SmolLM2-135M Q4_1 base: PEFT (transformers on the dequantized GGUF) vs llama.cpp
with the converted adapter, on the verify prompt set (~1000 positions).

What is asserted, and why:
- exactness where there is no quantization noise: on an f16 copy of the dequantized base,
  llama.cpp with the bundle reproduces PEFT (the `exact` part of the report decides `ok`);
- on the Q4_1 base as deployed, the mean KL stays near the no-adapter floor;
- top-1 agreement on the Q4_1 base is measured against the floor *with the adapter*: llama.cpp
  Q4_1 + bundle vs llama.cpp f16 + the same bundle (PEFT not involved). Random adapters make
  llama.cpp's quantized arithmetic flip more near-ties (94-98% top-1 against a 99.3% no-adapter
  floor, measured within llama.cpp alone), so the "1 point below the no-adapter floor" rule holds
  for what the converter adds, not for llama.cpp's own quantization noise.
"""

from __future__ import annotations

import pytest

pytest.importorskip("peft")

from convert_helpers import ALL_SEVEN, make_peft  # noqa: E402

from edgeft.convert import convert_adapter  # noqa: E402
from edgeft.convert.verify import compare, format_report, load_hf_base, parity_report  # noqa: E402

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


def test_parity_report_on_the_real_base(hf, base_path, adapter, capsys):
    peft_dir, res = adapter
    rep = parity_report(peft_dir, base_path, res.folder, hf_model=hf, n_threads=2)
    with capsys.disabled():
        print("\n" + format_report(rep))
    assert rep["adapter"]["positions"] >= 900
    assert rep["adapter_effect"]["top1"] < 0.995 and rep["adapter_effect"]["kl_mean"] > 1e-3  # it does something
    ex = rep["exact"]
    assert rep["ok"] and ex["ok"], rep
    assert ex["floor"]["top1"] >= 0.995 and ex["adapter"]["top1"] >= 0.995, ex
    assert ex["adapter"]["kl_mean"] < 1e-4, ex
    assert rep["adapter"]["kl_mean"] < 1.5 * rep["floor"]["kl_mean"], rep  # the Q4_1 base as deployed


def test_top1_on_q4_is_within_a_point_of_llama_cpps_own_noise(hf, base_path, adapter, tmp_path):
    """PEFT vs Q4_1+bundle agrees as well (within 1 point) as llama.cpp f16+bundle vs Q4_1+bundle."""
    import torch  # noqa: F401
    from peft import PeftModel

    from edgeft.convert.quantize import quantize_model
    from edgeft.convert.verify import _cpp_logits, hf_logits

    peft_dir, res = adapter
    toks, _, q4 = _cpp_logits(base_path, res.folder, None, 2)
    f16 = quantize_model(base_path, tmp_path / "f16.gguf", "f16").path
    _, _, fp = _cpp_logits(f16, res.folder, toks, 2)
    pm = PeftModel.from_pretrained(hf, str(peft_dir))
    try:
        ref = hf_logits(pm, toks)
    finally:
        pm.unload()
    ours, llama_own = compare(ref, q4), compare(fp, q4)
    assert ours["top1"] >= llama_own["top1"] - 0.01, (ours, llama_own)
    assert compare(ref, fp)["top1"] >= 0.995


def test_a_trained_adapter_on_q4_is_within_a_point_of_the_no_adapter_floor(hf, base_path, capsys):
    """The issue's rule as written, on an adapter trained on the real base (the shipped
    summarize bundle and its PEFT source): PEFT vs llama.cpp Q4_1 + bundle agrees on top-1 at
    most 1 point less often than without an adapter."""
    from pathlib import Path

    shipped = Path(__file__).resolve().parent.parent / "models" / "adapters" / "summarize"
    rep = parity_report(shipped / "peft", base_path, shipped, hf_model=hf, n_threads=2, exact=False)
    with capsys.disabled():
        print("\n" + format_report(rep))
    assert rep["adapter"]["positions"] >= 900
    assert rep["adapter_effect"]["top1"] < 0.97, rep  # a real adapter: it changes next-token choices
    assert rep["within_floor"] and rep["ok"], rep
    assert rep["adapter"]["top1"] >= rep["floor"]["top1"] - 0.01, rep
