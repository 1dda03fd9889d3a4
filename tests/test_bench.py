"""`edgeft bench`: the library pieces on tiny GGUF files, and one real `--quick` run whose JSON
must hold every documented key with a plausible value (types, ranges, signs; never wall-clock
limits, the CI machine is shared)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgeft import _llama, bench
from edgeft.errors import InputError


# -- unit: no llama.cpp -----------------------------------------------------------------------

def _tiny_base(path: Path) -> Path:
    """A two-tensor 'llama' GGUF (not runnable, enough for shapes): q in Q8_0, v in F32."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    q = rng.standard_normal((64, 64)).astype(np.float32)          # [out, in] in numpy order
    qq = gguf.quants.quantize(q, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", qq, raw_shape=qq.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_v.weight", rng.standard_normal((32, 64)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tensors(path: Path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {t.name: t for t in r.tensors}


@pytest.mark.parametrize("dtype,a_type,b_type", [
    (np.float32, "F32", "F32"), ("f16", "F16", "F16"), ("q8_0", "Q8_0", "F16")])
def test_write_random_adapter_dtypes(tmp_path, dtype, a_type, b_type):
    base = _tiny_base(tmp_path / "base.gguf")
    p = bench.write_random_adapter(tmp_path / "a.gguf", base, rank=4, targets=("attn_q", "attn_v"), dtype=dtype)
    ts = _tensors(p)
    assert sorted(ts) == ["blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b",
                          "blk.0.attn_v.weight.lora_a", "blk.0.attn_v.weight.lora_b"]
    assert ts["blk.0.attn_q.weight.lora_a"].tensor_type.name == a_type
    assert ts["blk.0.attn_v.weight.lora_b"].tensor_type.name == b_type
    assert [int(x) for x in ts["blk.0.attn_v.weight.lora_a"].shape] == [64, 4]   # ggml ne: [in, r]
    assert [int(x) for x in ts["blk.0.attn_v.weight.lora_b"].shape] == [4, 32]   # ggml ne: [r, out]
    b = bench._float(ts["blk.0.attn_q.weight.lora_b"])
    assert np.abs(b).max() > 0  # B != 0: the adapter changes the output
    r = gguf.GGUFReader(str(p))
    assert r.fields[gguf.Keys.General.TYPE].contents() == "adapter"
    assert r.fields[gguf.Keys.Adapter.LORA_ALPHA].contents() == 4.0


def test_write_random_adapter_rejects_unknown_dtype(tmp_path):
    base = _tiny_base(tmp_path / "base.gguf")
    with pytest.raises(InputError):
        bench.write_random_adapter(tmp_path / "a.gguf", base, dtype="q4_k")


def test_merge_adapter_adds_scaled_delta(tmp_path):
    base = _tiny_base(tmp_path / "base.gguf")
    ad = bench.write_random_adapter(tmp_path / "a.gguf", base, rank=4, targets=("attn_q", "attn_v"),
                                    alpha=8.0, b_std=0.5, seed=3)
    out = bench.merge_adapter(base, ad, tmp_path / "merged.gguf", scale=0.5)
    bt, at, mt = _tensors(base), _tensors(ad), _tensors(out)
    assert sorted(mt) == sorted(bt)
    s = 0.5 * 8.0 / 4
    for name in ("blk.0.attn_q.weight", "blk.0.attn_v.weight"):
        a, b = bench._float(at[name + ".lora_a"]), bench._float(at[name + ".lora_b"])
        want = bench._float(bt[name]) + s * (b @ a)
        got = bench._float(mt[name])
        assert mt[name].tensor_type == bt[name].tensor_type          # requantized to its own type
        assert got.shape == want.shape
        tol = 1e-6 if bt[name].tensor_type.name == "F32" else np.abs(want).max() / 100  # Q8_0 step
        assert np.abs(got - want).max() <= tol
    assert np.array_equal(mt["output_norm.weight"].data, bt["output_norm.weight"].data)
    r = gguf.GGUFReader(str(out))
    assert r.fields["llama.context_length"].contents() == 64


def test_profiles_and_overrides():
    phone = bench.resolve_profile("phone")
    assert (phone.threads, phone.n_ctx, phone.n_batch, phone.use_mlock) == (2, 1024, 128, False)
    assert phone.adapter_slots and phone.adapter_slots < 3
    lap = bench.resolve_profile("laptop", threads=3, ctx=512)
    assert (lap.threads, lap.n_ctx, lap.n_batch) == (3, 512, 512)
    custom = bench.resolve_profile("pi5")
    assert custom.name == "pi5" and custom.n_ctx == 2048 and custom.threads >= 1
    with pytest.raises(InputError):
        bench.resolve_profile("bad name!")
    with pytest.raises(InputError):
        bench.resolve_profile("laptop", threads=0)


def test_dist_and_rounding():
    d = bench.dist([3.0, 1.0, 2.0, 4.0])
    assert d["p50"] == 2.5 and d["min"] == 1.0 and d["n"] == 4 and d["p50"] <= d["p90"] <= d["p99"]
    assert bench.dist([])["p50"] is None
    r = bench._rounded({"a": 0.0123456, "b": [123.456789, float("nan")], "c": 5})
    assert r == {"a": 0.01235, "b": [123.5, None], "c": 5}


def test_evaluate_targets_handles_missing_values():
    rows = bench.evaluate_targets({"swap_ms": {"p50": 0.05}, "switch_ratio": {"reload_over_swap": 50.0}})
    by = {r["target"].split(" ")[0] + r["unit"]: r for r in rows}
    assert by["swapms"]["met"] is True
    assert by["reload-per-switchx"]["met"] is False
    assert all(r["met"] is None for r in rows if r["value"] is None)
    assert len(rows) == 14


def test_memory_bandwidth_positive():
    bw = bench.memory_bandwidth_gbs(mb=16, repeats=2)
    assert 0.05 < bw["median_gbs"] <= bw["best_gbs"] < 10_000


# -- integration: one real quick run ----------------------------------------------------------

def _num(x, lo=0.0, hi=math.inf, strict=True):
    assert isinstance(x, (int, float)) and not isinstance(x, bool), x
    assert math.isfinite(x), x
    assert (x > lo if strict else x >= lo) and x < hi, x
    return x


def test_concurrency_phase_on_the_tiny_base(tiny_base, tmp_path):
    """`edgeft serve` in its own process under concurrent clients: whole answers, shared steps."""
    from edgeft.bench.concurrency import concurrency_phase

    paths = [bench.write_random_adapter(tmp_path / f"r{i}.gguf", tiny_base, seed=i) for i in range(2)]
    said = []
    cc = concurrency_phase(tiny_base, paths, threads=1, ctx=4096, requests=2, say=said.append, clients=(1, 4),
                           answer_tokens=300)
    assert set(cc["edgeft"]) == {"same_1_cache_on", "same_4_cache_on", "same_4_cache_off", "mixed_1_cache_on",
                                 "mixed_4_cache_on", "mixed_4_cache_off", "distinct_4_cache_on"}
    for v in cc["edgeft"].values():
        assert v["completion_tokens"] == v["requests"] * 300 and v["latency_s"]["n"] == v["requests"]
    assert cc["edgeft"]["same_4_cache_on"]["largest_batch"] >= 2      # the 4 clients shared decode steps
    assert cc["edgeft"]["same_1_cache_on"]["largest_batch"] <= 1
    assert "eight_over_one_same" not in cc and any("4 client(s)" in m for m in said)


def test_llama_server_that_does_not_start_is_a_clear_error(tmp_path, tiny_base):
    from edgeft.bench.concurrency import llama_server
    from edgeft.errors import InputError

    with pytest.raises(InputError, match="llama-server exited with code"):
        with llama_server("/bin/false", tiny_base, [], threads=1, ctx=512, parallel=2):
            pass


@pytest.mark.slow
def test_bench_quick_json(tmp_path, base_path):
    from edgeft.cli import main

    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    # one thread: on a shared CI machine all-core OpenMP decoding slows down 10x or more
    main(["bench", "--quick", "--threads", "1", "--json", str(out), "--plot", str(png)])
    r = json.loads(out.read_text())

    m = r["machine"]
    assert isinstance(m["cpu"], str) and m["cpu"]
    assert m["cores"] >= 1 and m["threads_used"] == 1
    assert "CPU" in m["llama_cpp_features"]
    assert r["base"]["id"] == "smollm2-135m"
    _num(r["base"]["file_mb"], 50, 200)
    assert len(r["adapters"]) == 2 and all(a["generated"] for a in r["adapters"])
    for a in r["adapters"]:
        _num(a["file_mb"], 1, 50)
        assert a["ranks"] == [8] and a["pairs"] == 210 and a["dtypes"] == ["F32"]

    _num(r["load_ms"]["base"])
    _num(r["load_ms"]["adapter"]["p50"])
    sw = r["swap_ms"]
    for k in ("p50", "p90", "p99"):
        _num(sw[k])
    assert sw["p50"] <= sw["p90"] <= sw["p99"]
    pen = r["swap_ttft_penalty_ms"]["p50"]
    assert isinstance(pen, float) and math.isfinite(pen)  # a difference of two times: may be < 0
    _num(r["reload_ms"]["p50"])
    _num(r["switch_ratio"]["reload_over_swap"])
    for k in ("base", "adapter"):
        _num(r["ttft_ms"][k])
        _num(r["prefill_tps"][k])
    for k in ("base", "adapter", "two_adapters", "merged"):
        _num(r["decode_tps"][k], 0, 10_000)
    il = r["decode_ratio_interleaved"]
    for k in ("adapter", "two_adapters", "merged"):
        _num(il[k], 0, 10)
        d = il["detail"][k]
        assert d["tokens"] == 64 and d["ratio"] == il[k]
        _num(d["tps"], 0, 10_000)
        _num(d["base_tps"], 0, 10_000)
        assert d["ratio_p10_p90"][0] <= il[k] <= d["ratio_p10_p90"][1]
    assert r["targets"][4]["value"] == il["adapter"]  # the decode target reads the token-by-token ratio
    fa = r["flash_attn"]
    assert fa["n_ctx"] == r["profile"]["n_ctx"] and fa["adapter"] == r["adapters"][0]["name"]
    for k in ("base", "adapter"):
        _num(fa["decode_tps"]["off"][k], 0, 10_000)
        _num(fa["decode_tps"]["on"][k], 0, 10_000)
        _num(fa["on_over_off"][k], 0, 100)
        assert isinstance(fa["same_greedy_text"][k], bool)
    # merged with edgeft merge's default: the adapted tensors in Q8_0, so larger than the Q4_1 base
    assert r["merged"]["reason"] is None and r["base"]["file_mb"] < r["merged"]["file_mb"] < 2 * r["base"]["file_mb"]

    rss = r["rss_mb"]
    _num(rss["base"], rss["process"])
    assert [p["n"] for p in rss["with_adapters"]] == [1, 2, 4, 8]
    prev = rss["base"]
    for p in rss["with_adapters"]:
        _num(p["mb"], prev)  # each resident adapter adds memory
        _num(p["added_over_file"], 0.5, 3.0)
        prev = p["mb"]
    assert [p["n"] for p in rss["merged_models"]] == [1, 2, 4, 8]
    assert all(_num(p["mb"], 0) and isinstance(p["estimated"], bool) for p in rss["merged_models"])
    assert not rss["merged_models"][0]["estimated"]
    _num(r["bandwidth_gbs"], 0.05, 10_000)
    _num(r["decode_bound_tps"])

    pc = r["prompt_cache"]
    for k in ("same_cache_off", "alternating_cache_off", "same_cache_on", "alternating_cache_on"):
        _num(pc[k]["ttft_ms"]["p50"])
    assert pc["alternating_cache_off"]["reused_tokens_mean"] == 0     # every request follows a swap
    assert pc["alternating_cache_on"]["reused_tokens_mean"] > 20      # the system prompt, from the cache
    assert pc["same_cache_on"]["reused_tokens_mean"] > 20
    assert r["targets"][7]["value"] == pc["cache_off_over_on_alternating"]
    bt = r["batch"]
    assert bt["requests"] == 16 and bt["parallel"] == 8
    _num(bt["tps_one_by_one"], 0, 10_000)
    _num(bt["tps_batched"], 0, 10_000)
    assert 0 <= bt["identical_answers"] <= 1 and r["targets"][8]["value"] == bt["batched_over_one_by_one"]
    cc = r["concurrency"]
    assert set(cc["edgeft"]) == {f"{m}_{n}_cache_{c}" for m in ("same", "mixed") for n, c in
                                 ((1, "on"), (8, "on"), (8, "off"))} | {"distinct_8_cache_on"}
    for v in cc["edgeft"].values():
        assert v["completion_tokens"] == v["requests"] * 48      # ignore_eos: whole answers
        _num(v["tps"], 0, 10_000)
    assert cc["edgeft"]["same_8_cache_on"]["largest_batch"] >= 4  # the 8 clients shared decode steps
    assert r["targets"][9]["value"] == cc["eight_over_one_same"]
    assert all(r["targets"][i]["met"] is None for i in (10, 11, 12, 13))   # no llama-server given
    assert len(r["targets"]) == 14
    mixed = cc["edgeft"]["mixed_8_cache_on"]
    assert mixed["mixed_steps"] > 0 if _llama.mixed_adapter_batches() else mixed["mixed_steps"] == 0
    assert 0.0 <= mixed["identical_to_alone"] <= 1.0
    assert all(t["met"] in (True, False, None) for t in r["targets"])
    assert r["evictions"] is None and r["llama_bench"] is None  # laptop profile, no binary given
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_interleaved_probe_runs_in_a_child_with_the_fusion_off(tmp_path, base_path):
    """The sweep's `unfused_rows` come from this child: ggml reads GGML_CPU_DISABLE_FUSION at
    start-up, so the child (not the parent) must see the environment."""
    from edgeft import _llama

    p = bench.write_random_adapter(tmp_path / "a.gguf", base_path, rank=8, seed=5)
    spec = {"base": str(base_path), "n_ctx": 256, "threads": 1, "tokens": 6, "adapters": {"a": str(p)}}
    off = bench._child(spec, "_interleaved_probe", env={"GGML_CPU_DISABLE_FUSION": "1"})
    assert off["lora_decode_fused"] is False
    _num(off["ratio"]["a"], 0, 10)
    lo, hi = off["ratio_p10_p90"]["a"]
    assert lo <= off["ratio"]["a"] <= hi
    on = bench._child(spec, "_interleaved_probe")
    assert on["lora_decode_fused"] is _llama.lora_decode_fused()  # the parent's environment
