"""edgeft's llama.cpp patch 0002 fuses each adapter's LoRA chain (A @ x, B @ t, scale, add) into
one CPU op for single-token decode. Its output must equal the unfused graph's: the same decode
steps run in two processes, one with GGML_CPU_DISABLE_FUSION=1 (read once by ggml at start-up,
hence the subprocesses), on the same tokens.

On an f16 copy of the base. On the Q4_1 base every matmul first quantizes its input to 8 bits,
so a last-bit difference anywhere (f32 sums in another order, t kept in f32 instead of rounded
to f16) can flip a rounding there and move the logits by 0.3-1.1, as much as a whole adapter
(measured: fused vs unfused identical at 11 of 14 steps for an f32 mix, 0.29-0.49 at the other
3). With f16 weights the same differences stay under 0.04 (measured), and a wrong chain would
still move the logits by the adapter's whole effect.

Bases whose weights llama.cpp repacks for its CPU kernels (Q4_0, Q4_K, IQ4_NL on AVX2/NEON)
compute W @ x in that buffer type's kernel, not mul_mat's; the chains then run as their own
fused nodes. Patch level 2 fused them into mul_mat's kernel there too and produced NaN; the
repacked tests below caught that. They use f32 adapters, whose fused sums match the graph's to
the last bits or nearly: with f16 adapters the graph rounds t to f16 and the fused op does not,
and on a 4-bit base a difference that small moves the logits as much as changing the adapter's
scale by 0.01% does in the graph alone (measured: 0.46-0.70 either way, on Q4_0)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgeft import _llama
from helpers import write_adapter

pytestmark = pytest.mark.skipif(_llama.patch_level() < 3, reason="needs llama.cpp built with cmake/patches (setup.sh)")

SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from edgeft import Engine
    base, out, f32, f16, q8, qv, keys = sys.argv[1:8]
    sels = {"none": {}, "f32": {"f32": 1.0}, "f16": {"f16": 0.7}, "q8_0": {"q8": 1.0},
            "mix": {"f32": 0.5, "qv": 1.5}, "mix3": {"f32": 0.5, "qv": 1.0, "f16": -0.5}}
    sels = {k: v for k, v in sels.items() if k in keys.split(",")}
    from edgeft import _llama
    res = {}
    fused0 = _llama.lora_fused_chains()
    # verbose: llama.cpp's load log (stderr) names the buffer types, e.g. CPU_REPACK
    with Engine(base, n_ctx=256, n_threads=2, verbose=True) as eng:
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


ALL_SELS = "none,f32,f16,q8_0,mix,mix3"


def _run_both(base, d, paths, keys: str = ALL_SELS) -> dict:
    """The SCRIPT once fused and once with ggml's fusions off; {mode: arrays, mode_log: stderr}."""
    out = {}
    for mode in ("fused", "unfused"):
        env = {k: v for k, v in os.environ.items() if k != "GGML_CPU_DISABLE_FUSION"}
        if mode == "unfused":
            env["GGML_CPU_DISABLE_FUSION"] = "1"
        npz = d / f"{Path(base).stem}-{mode}.npz"
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(base), str(npz), *map(str, paths), keys],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[mode] = dict(np.load(npz))
        out[f"{mode}_log"] = proc.stderr
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, base_path):
    d = tmp_path_factory.mktemp("fused")
    return d, [
        write_adapter(d / "f32.gguf", base_path, seed=11, b_std=0.03),  # rank 8, all 7 projections
        write_adapter(d / "f16.gguf", base_path, seed=12, b_std=0.03, dtype="f16"),
        write_adapter(d / "q8.gguf", base_path, seed=13, b_std=0.03, dtype="q8_0"),
        write_adapter(d / "qv.gguf", base_path, seed=14, b_std=0.03, rank=16, targets=("attn_q", "attn_v", "ffn_down")),
    ]


@pytest.fixture(scope="module")
def runs(adapters, base_path):
    from edgeft.convert.quantize import quantize_model

    d, paths = adapters
    base_f16 = quantize_model(base_path, d / "base-f16.gguf", "f16").path
    return _run_both(base_f16, d, paths)


@pytest.fixture(scope="module", params=["q4_0", "q4_k_m"])
def repacked_runs(request, adapters, base_path):
    from edgeft.convert.quantize import quantize_model

    d, paths = adapters
    base = quantize_model(base_path, d / f"base-{request.param}.gguf", request.param).path
    return request.param, _run_both(base, d, paths, "none,f32,mix")


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


@pytest.mark.slow
def test_repacked_bases_decode_like_the_unfused_graph(repacked_runs):
    qtype, r = repacked_runs
    info = _llama.system_info()
    if "REPACK = 1" in info and ("AVX2 = 1" in info or "NEON = 1" in info):
        # otherwise this base is not repacked here and the test proves less than it says
        assert "CPU_REPACK" in r["fused_log"], r["fused_log"][-2000:]
    for sel in ("f32", "mix"):
        fused, unfused = r["fused"][sel], r["unfused"][sel]
        effect = np.abs(unfused - r["unfused"]["none"]).max(axis=1)
        diff = np.abs(fused - unfused).max(axis=1)
        assert np.isfinite(fused).all(), (qtype, sel)
        assert effect.min() > 0.4, (qtype, sel, effect)
        # the chains run as their own nodes after the repacked product: the graph's sums but for
        # their order; a last-bit difference may still flip the 8-bit rounding of a later input
        # at some step (measured: 12 of 14 steps identical, 0.61 and 0.74 at the other two,
        # where the adapters move the logits by 1.4-3.3)
        assert np.median(diff) < 0.05, (qtype, sel, diff, effect)
        assert (diff < effect / 5).mean() >= 0.7, (qtype, sel, diff, effect)
        assert (diff < effect).all(), (qtype, sel, diff, effect)
        assert (fused.argmax(axis=1) == unfused.argmax(axis=1)).mean() >= 0.7
    steps = int(r["fused"]["steps"])
    assert r["fused"]["fused_chains"] >= steps * (210 + 210 + 90)
    assert r["unfused"]["fused_chains"] == 0


def test_a_build_with_the_broken_level_2_fusion_runs_unfused(monkeypatch):
    # setenv first, so that teardown puts back the variable as it was: a delenv of an unset name
    # records nothing, and the later delenv would "restore" the "1" set below, turning the fusion
    # off for every later model load in this process and every child process
    monkeypatch.setenv("GGML_CPU_DISABLE_FUSION", "")
    monkeypatch.delenv("GGML_CPU_DISABLE_FUSION")
    monkeypatch.setattr(_llama.patches, "patch_level", lambda: 2)
    _llama.patches._turn_off_broken_fusion()
    assert os.environ.get("GGML_CPU_DISABLE_FUSION") == "1"
    assert not _llama.lora_decode_fused()
    assert "rerun ./setup.sh" in _llama.api_names()["lora_decode"]
    monkeypatch.delenv("GGML_CPU_DISABLE_FUSION")
    monkeypatch.setattr(_llama.patches, "patch_level", lambda: 3)
    _llama.patches._turn_off_broken_fusion()
    assert "GGML_CPU_DISABLE_FUSION" not in os.environ
    assert _llama.lora_decode_fused()
