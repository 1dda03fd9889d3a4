"""edgeft's llama.cpp patch 0002 fuses each adapter's LoRA chain (A @ x, B @ t, scale, add) into
one CPU op for single-token decode. Its output must equal the unfused graph's: the same decode
steps run in two processes, one with GGML_CPU_DISABLE_FUSION=1 (read once by ggml at start-up,
hence the subprocesses), on the same tokens.

On an f16 copy of the base. On the Q4_1 base every matmul first quantizes its input to 8 bits,
so a last-bit difference anywhere (f32 sums in another order, t kept in f32 instead of rounded
to f16) can flip a rounding there and move the logits by 0.3-1.1, as much as a whole adapter
(measured: fused vs unfused identical at 11 of 14 steps for an f32 mix, 0.29-0.49 at the other
3). With f16 weights the same differences stay under 0.04 (measured), and a wrong chain would
still move the logits by the adapter's whole effect."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgeft import _llama
from helpers import write_adapter

pytestmark = pytest.mark.skipif(_llama.patch_level() < 2, reason="needs llama.cpp built with cmake/patches (setup.sh)")

SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from edgeft import Engine
    base, out, f32, f16, q8, qv = sys.argv[1:7]
    sels = {"none": {}, "f32": {"f32": 1.0}, "f16": {"f16": 0.7}, "q8_0": {"q8": 1.0},
            "mix": {"f32": 0.5, "qv": 1.5}, "mix3": {"f32": 0.5, "qv": 1.0, "f16": -0.5}}
    from edgeft import _llama
    res = {}
    fused0 = _llama.lora_fused_chains()
    with Engine(base, n_ctx=256, n_threads=2) as eng:
        for name, p in (("f32", f32), ("f16", f16), ("q8", q8), ("qv", qv)):
            eng.load_adapter(p, name=name)
        toks = eng.tokenize("The harbour was quiet that morning, and the boats had not yet gone out to sea.")
        for key, sel in sels.items():
            with eng._lock:  # the backend's single-token decode, as generation runs it
                eng._apply(sel)
                b = eng._b
                steps = []
                for i in range(4, len(toks)):
                    # a fresh prefix each step (a prompt batch: the same K/V bits either way), so
                    # a rounding difference in one step is not carried into the next one's K/V
                    b.memory_clear()
                    b.decode(toks[:i])
                    b.decode_one(toks[i])
                    steps.append(b.last_logits().copy())
                eng._invalidate_kv()
            res[key] = np.stack(steps)
    res["fused_chains"] = np.array(_llama.lora_fused_chains() - fused0)
    res["steps"] = np.array(len(toks) - 4)
    np.savez(out, **res)
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base_path):
    from edgeft.convert.quantize import quantize_model

    d = tmp_path_factory.mktemp("fused")
    base_f16 = quantize_model(base_path, d / "base-f16.gguf", "f16").path
    paths = [
        write_adapter(d / "f32.gguf", base_path, seed=11, b_std=0.03),  # rank 8, all 7 projections
        write_adapter(d / "f16.gguf", base_path, seed=12, b_std=0.03, dtype="f16"),
        write_adapter(d / "q8.gguf", base_path, seed=13, b_std=0.03, dtype="q8_0"),
        write_adapter(d / "qv.gguf", base_path, seed=14, b_std=0.03, rank=16, targets=("attn_q", "attn_v", "ffn_down")),
    ]
    out = {}
    for mode in ("fused", "unfused"):
        env = {k: v for k, v in os.environ.items() if k != "GGML_CPU_DISABLE_FUSION"}
        if mode == "unfused":
            env["GGML_CPU_DISABLE_FUSION"] = "1"
        npz = d / f"{mode}.npz"
        subprocess.run([sys.executable, "-c", SCRIPT, str(base_f16), str(npz), *map(str, paths)],
                       env=env, check=True, timeout=600)
        out[mode] = dict(np.load(npz))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sel", ["f32", "mix", "f16", "q8_0", "mix3"])
def test_fused_decode_equals_the_unfused_graph(runs, sel):
    fused, unfused = runs["fused"][sel], runs["unfused"][sel]
    effect = np.abs(unfused - runs["unfused"]["none"]).max(axis=1)
    diff = np.abs(fused - unfused).max(axis=1)
    # every step's logits move by >= 0.4 with the adapters (measured 0.56-1.24), so a fused chain
    # that dropped, doubled or mis-scaled a delta, or added it to the wrong rows, fails here;
    # rounding (f32 sums in another order; t in f32 where the graph rounds it to f16) stays < 0.04
    assert effect.min() > 0.4, effect
    assert diff.max() < 0.1, (diff, effect)
    assert diff.max() < effect.min() / 5
    assert (fused.argmax(axis=1) == unfused.argmax(axis=1)).mean() >= 0.9


@pytest.mark.slow
def test_the_fusion_engages_only_when_enabled(runs):
    # every adapted matrix of every single-token decode: per step f32, f16, q8_0 (210 each), mix
    # (210 + 90) and mix3 (210 + 90 + 210) = 1440 chains, plus the prompts' last-layer FFNs (the
    # last layer runs on the last token only); a chain that silently stopped matching shows here
    steps = int(runs["fused"]["steps"])
    assert runs["fused"]["fused_chains"] >= steps * 1440
    assert runs["unfused"]["fused_chains"] == 0


@pytest.mark.slow
def test_no_adapter_is_untouched(runs):
    np.testing.assert_array_equal(runs["fused"]["none"], runs["unfused"]["none"])
