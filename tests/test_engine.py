"""Engine on the real SmolLM2 base with random (B != 0) adapters: swapping, KV correctness,
mixing, LRU budget, thread safety, streaming."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgeft import Engine
from edgeft.errors import AdapterError, InputError
from helpers import write_adapter, write_bundle

PROMPTS = [  # share a long prefix, so stale K/V would be reused if the engine let it
    "Write one sentence about the sea.",
    "Write one sentence about the mountains.",
    "Write one sentence about the city.",
]
N = 20


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, base_path):
    d = tmp_path_factory.mktemp("adapters")
    return {
        "a": write_adapter(d / "a.gguf", base_path, seed=1, b_std=0.05),
        "b": write_adapter(d / "b.gguf", base_path, seed=2, b_std=0.05, rank=4),
        "c": write_adapter(d / "c.gguf", base_path, seed=3, b_std=0.05, targets=("attn_q", "attn_v")),
    }


SELECTED = object()


def _greedy(eng: Engine, adapter, prompt: str) -> str:
    """Greedy answer; adapter=SELECTED uses the engine's selected set, None forces the base."""
    msgs = [{"role": "user", "content": prompt}]
    kw = {} if adapter is SELECTED else {"adapter": adapter}
    return eng.chat(msgs, max_tokens=N, **kw).text


def test_adapters_change_output_and_none_restores_base(engine, adapters):
    engine.use(None)
    base = [_greedy(engine, None, p) for p in PROMPTS]
    a = [_greedy(engine, str(adapters["a"]), p) for p in PROMPTS]
    b = [_greedy(engine, str(adapters["b"]), p) for p in PROMPTS]
    assert a != base and b != base and a != b, "test adapters must change the output, else nothing is tested"
    assert [_greedy(engine, None, p) for p in PROMPTS] == base


def test_kv_invalidated_on_swap_matches_fresh_engines(base_path, adapters):
    """A, then B, then A again on shared-prefix prompts == a fresh engine with only A (and B)."""
    fresh = {}
    for k in ("a", "b"):
        with Engine(str(base_path), n_ctx=1024, n_threads=2) as e:
            e.use(str(adapters[k]))
            fresh[k] = [_greedy(e, SELECTED, p) for p in PROMPTS]
    assert fresh["a"] != fresh["b"]
    with Engine(str(base_path), n_ctx=1024, n_threads=2) as e:
        e.load_adapter(adapters["a"], name="A")
        e.load_adapter(adapters["b"], name="B")
        got = {"a": [], "b": []}
        for p in PROMPTS:  # interleave per prompt: A, B, A
            got["a"].append(_greedy(e, "A", p))
            got["b"].append(_greedy(e, "B", p))
            assert _greedy(e, "A", p) == got["a"][-1]
        assert got == fresh
        # the prefix is reused when the adapter set does not change, and never across a swap
        e.use("A")
        e.chat([{"role": "user", "content": PROMPTS[0]}], max_tokens=2)
        r = e.chat([{"role": "user", "content": PROMPTS[1]}], max_tokens=2)
        assert r.reused_prefix > 10
        e.use("B")
        r = e.chat([{"role": "user", "content": PROMPTS[1]}], max_tokens=2)
        assert r.reused_prefix == 0


def test_same_shape_swaps_are_exact_and_skip_the_reserve_when_patched(base_path, tmp_path):
    """Adapters of one shape (same tensors, rank, dtype) swapped back and forth: every logit equals
    a fresh engine's under that set. With edgeft's llama.cpp patch such swaps skip the scheduler
    re-reserve (the first-request penalty); a set of another shape still re-reserves."""
    from edgeft import _llama

    s1 = write_adapter(tmp_path / "s1.gguf", base_path, seed=11, b_std=0.05)
    s2 = write_adapter(tmp_path / "s2.gguf", base_path, seed=12, b_std=0.05)
    other = write_adapter(tmp_path / "o.gguf", base_path, seed=13, b_std=0.05, rank=4)
    expected = {}
    with Engine(str(base_path), n_ctx=512, n_threads=2) as e:
        toks = e.tokenize("Swapping adapters of one shape must not change what each one computes.")
    sels = [("s1", 1.0), ("s2", 1.0), ("s1", 0.5), ("s2", 1.0), ("s1", 1.0)]
    for name, scale in set(sels):
        with Engine(str(base_path), n_ctx=512, n_threads=2) as fresh:
            p = {"s1": s1, "s2": s2}[name]
            fresh.load_adapter(p)
            expected[(name, scale)] = fresh.logits(toks, adapter={name: scale})
    assert np.abs(expected[("s1", 1.0)] - expected[("s2", 1.0)]).max() > 0.5  # the two really differ
    with Engine(str(base_path), n_ctx=512, n_threads=2) as e:
        for p in (s1, s2, other):
            e.load_adapter(p)
        e.logits(toks, adapter={"s1": 1.0})
        before = _llama.scheduler_reserves()
        for name, scale in sels:
            np.testing.assert_array_equal(e.logits(toks, adapter={name: scale}), expected[(name, scale)])
        same_shape_reserves = _llama.scheduler_reserves() - before
        e.logits(toks, adapter={"o": 1.0})
        assert _llama.scheduler_reserves() - before == same_shape_reserves + 1  # another shape re-reserves
        np.testing.assert_array_equal(e.logits(toks, adapter={"s2": 1.0}), expected[("s2", 1.0)])
    if _llama.patch_level() >= 1:
        assert same_shape_reserves == 0
    else:  # a stock build re-reserves on every change of the set (the first entry is no change)
        assert same_shape_reserves == sum(a != b for a, b in zip([("s1", 1.0)] + sels, sels)) == 4


def test_logits_follow_adapter_set(engine, adapters):
    toks = engine.tokenize("The quick brown fox")
    base = engine.logits(toks, adapter=None)
    a = engine.logits(toks, adapter=str(adapters["a"]))
    assert np.abs(a - base).max() > 0.5
    np.testing.assert_array_equal(engine.logits(toks, adapter=None), base)


def test_mix_with_scales(engine, adapters):
    toks = engine.tokenize("Mixing adapters works like this:")
    a, c = str(adapters["a"]), str(adapters["c"])
    base = engine.logits(toks, adapter=None)
    only_a = engine.logits(toks, adapter={a: 1.0})
    zero = engine.logits(toks, adapter={a: 0.0})
    np.testing.assert_allclose(zero, base, atol=1e-4)  # scale 0 is the base
    mix = engine.logits(toks, adapter={a: 1.0, c: 0.5})
    assert np.abs(mix - only_a).max() > 0.1
    half = engine.logits(toks, adapter={a: 0.5})
    assert 0 < np.abs(half - base).mean() < np.abs(only_a - base).mean()
    # selection via use() and the string form
    assert engine.use(f"{a}=1,{c}=0.5") == {"a": 1.0, "c": 0.5}
    np.testing.assert_allclose(engine.logits(toks), mix, atol=1e-5)
    engine.use(None)


def test_swap_cost_is_small_and_counted(engine, adapters):
    engine.load_adapter(adapters["a"])
    engine.load_adapter(adapters["b"])
    before = engine.stats.swaps
    for i in range(10):
        engine.chat([{"role": "user", "content": "hi"}], adapter="a" if i % 2 else "b", max_tokens=1)
    assert engine.stats.swaps - before == 10
    assert all(ms >= 0 for ms in engine.stats.swap_ms)


def _resident_mb(base_path, path) -> float:
    """What one adapter counts against the memory budget."""
    with Engine(str(base_path), n_ctx=512, n_threads=2) as probe:
        name = probe.load_adapter(path)
        return probe.adapters[name].mb


def test_lru_budget_evicts_least_recently_used(base_path, tmp_path):
    paths = [write_adapter(tmp_path / f"r{i}.gguf", base_path, seed=i, rank=4) for i in range(3)]
    one_mb = _resident_mb(base_path, paths[0])
    with Engine(str(base_path), n_ctx=512, n_threads=2, memory_budget_mb=one_mb * 2.5) as e:
        e.load_adapter(paths[0])
        e.load_adapter(paths[1])
        e.use("r0")                       # r0 is now the most recently used
        e.load_adapter(paths[2])          # over budget: r1 (LRU, not active) goes
        assert set(e.adapters) == {"r0", "r2"} and e.stats.evictions == 1
        assert e.resident_mb() <= one_mb * 2.5
        e.use("r1")                       # loading it again evicts r0? no: r0 is no longer selected
        assert "r1" in e.adapters and len(e.adapters) == 2 and e.stats.evictions == 2
    with Engine(str(base_path), n_ctx=512, n_threads=2, memory_budget_mb=one_mb * 0.5) as e:
        with pytest.raises(AdapterError, match="budget"):
            e.load_adapter(paths[0])


def test_reload_after_eviction_revalidates_a_changed_file(base_path, tmp_path):
    """Reloads skip the full validation only while the file is the one validated before."""
    paths = [write_adapter(tmp_path / f"v{i}.gguf", base_path, seed=i, rank=4) for i in range(2)]
    one_mb = _resident_mb(base_path, paths[0])
    with Engine(str(base_path), n_ctx=512, n_threads=2, memory_budget_mb=one_mb * 1.5) as e:
        e.load_adapter(paths[0])
        e.load_adapter(paths[1])                       # evicts v0
        assert set(e.adapters) == {"v1"}
        e.load_adapter("v0")                           # unchanged: reloads (evicting v1)
        assert set(e.adapters) == {"v0"}

        def nan(t):
            t["blk.0.attn_q.weight.lora_b"][0, 0] = np.nan

        write_adapter(paths[1], base_path, seed=1, rank=4, mutate=nan)  # v1 changes on disk
        with pytest.raises(AdapterError, match="NaN"):
            e.load_adapter("v1")
        assert set(e.adapters) == {"v0"}


def test_threads_serialized_and_exact(engine, adapters):
    refs = [None, str(adapters["a"]), str(adapters["b"]), str(adapters["c"])]
    jobs = [(refs[i % 4], PROMPTS[i % 3]) for i in range(16)]
    expected = [_greedy(engine, r, p) for r, p in jobs]
    got: list = [None] * len(jobs)
    errors = []

    def worker(k: int) -> None:
        try:
            for i in range(k, len(jobs), 4):
                got[i] = _greedy(engine, *jobs[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert got == expected
    assert len(set(expected)) > 3


def test_swap_waits_for_running_stream(engine, adapters):
    engine.use(str(adapters["a"]))
    ref = engine.chat([{"role": "user", "content": PROMPTS[0]}], max_tokens=N).text
    stream = engine.chat([{"role": "user", "content": PROMPTS[0]}], max_tokens=N, stream=True)
    first = next(stream)
    done = threading.Event()

    def swapper():
        engine.use(str(adapters["b"]))  # must block until the stream finishes
        done.set()

    t = threading.Thread(target=swapper)
    t.start()
    assert not done.wait(0.3)
    text = first + "".join(stream)
    t.join(5)
    assert done.is_set()
    assert text == ref
    engine.use(None)


def test_stream_equals_blocking_and_stop_strings(engine):
    msgs = [{"role": "user", "content": "Count from one to ten in words, separated by commas."}]
    full = engine.chat(msgs, max_tokens=40).text
    assert "".join(engine.chat(msgs, max_tokens=40, stream=True)) == full
    word = full.split()[len(full.split()) // 2]
    assert len(full.split()) > 6
    cut = engine.chat(msgs, max_tokens=40, stop=[word])
    assert cut.text == full[: full.index(word)] and cut.finish_reason == "stop"
    streamed = "".join(engine.chat(msgs, max_tokens=40, stop=[word], stream=True))
    assert streamed == cut.text


def test_bad_requests(engine):
    with pytest.raises(InputError):
        engine.chat([])
    with pytest.raises(InputError):
        engine.chat([{"role": "user"}])
    with pytest.raises(InputError):
        engine.run("   ")
    with pytest.raises(InputError, match="context"):
        engine.complete("word " * 2000)
    with pytest.raises(AdapterError, match="unknown adapter"):
        engine.use("no-such-adapter")


def test_task_card_labels_constrain_output(engine, base_path, tmp_path):
    labels = ["negative", "neutral", "positive"]
    task = {"system": "Classify the sentiment.", "template": "Text: {input}",
            "output": {"type": "labels", "labels": labels}, "generation": {"max_tokens": 5}}
    folder = write_bundle(tmp_path / "senti", base_path, name="senti", task=task, seed=5)
    engine.load_adapter(folder)
    for text in ("I love it", "The market fell sharply", "Meeting at 3pm"):
        res = engine.run(text, adapter="senti")
        assert res.text in labels and res.value == res.text
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]}
    folder2 = write_bundle(tmp_path / "js", base_path, name="js", seed=6,
                           task={"template": "{input}", "output": {"type": "json_schema", "schema": schema},
                                 "generation": {"max_tokens": 40}})
    engine.load_adapter(folder2)
    res = engine.run("Give me a JSON object with a name.", adapter="js")
    assert isinstance(res.value, dict) and isinstance(res.value["name"], str)
    engine.use(None)


def test_grammar_checked_sampling_equals_grammar_first(engine, adapters):
    """The fast path (check only the picked token) must give what masking every step gives."""
    import llama_cpp

    from edgeft import _llama

    schema = {"type": "array", "items": {"type": "object", "properties": {
        "text": {"type": "string", "maxLength": 20}, "type": {"enum": ["PER", "ORG", "LOC", "MISC"]}},
        "required": ["text", "type"]}, "maxItems": 3}
    gbnf = _llama.json_schema_to_gbnf(schema)
    b = engine._b

    def grammar_first(prompt: str, n: int) -> str:
        params = llama_cpp.llama_sampler_chain_default_params()
        chain = llama_cpp.llama_sampler_chain_init(params)
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_grammar(b.vocab, gbnf.encode(), b"root"))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        b.memory_clear()
        b.decode(b.tokenize(prompt))
        out = []
        for _ in range(n):
            tok = llama_cpp.llama_sampler_sample(chain, b.ctx, -1)
            if b.is_eog(tok):
                break
            out.append(tok)
            b.decode_one(tok)
        llama_cpp.llama_sampler_free(chain)
        b.memory_clear()
        return b.detokenize(out)

    texts = ["Angela Merkel met Tim Cook in Paris.", "The Nile flows through Egypt and Sudan."]
    for ad in (None, str(adapters["a"])):
        for t in texts:
            prompt = engine.chat_prompt([{"role": "user", "content": f"List the named entities as JSON: {t}"}])
            with engine._lock:
                engine._apply(engine._resolve(ad))
                engine._invalidate_kv()
                ref = grammar_first(prompt, 40)
            got = engine.complete(prompt, adapter=ad, grammar=gbnf, max_tokens=40).text
            assert got == ref


def test_greedy_fast_path_picks_what_llama_cpps_greedy_sampler_picks(engine, adapters):
    """Greedy decoding takes argmax over the logits instead of llama.cpp's greedy sampler; both
    must give the same tokens, with and without an adapter."""
    import llama_cpp

    from edgeft import _llama

    b = engine._b
    fast = b.sampler(_llama.Sampling(temperature=0.0))
    assert fast._greedy
    params = llama_cpp.llama_sampler_chain_default_params()
    ref = llama_cpp.llama_sampler_chain_init(params)
    llama_cpp.llama_sampler_chain_add(ref, llama_cpp.llama_sampler_init_greedy())
    try:
        picks = []
        for ad in (None, str(adapters["a"])):
            with engine._lock:
                engine._apply(engine._resolve(ad))
                b.memory_clear()
                b.decode(b.tokenize("The three largest cities of Australia are"))
                for _ in range(24):
                    tok = b.sample(fast)
                    assert tok == llama_cpp.llama_sampler_sample(ref, b.ctx, -1)
                    picks.append(tok)
                    b.decode_one(tok)
                engine._invalidate_kv()
        assert len(set(picks)) > 5  # real text, not one token repeated
    finally:
        fast.close()
        llama_cpp.llama_sampler_free(ref)
    engine.use(None)


def test_same_file_name_from_two_folders_gets_two_names(base_path, tmp_path):
    a = write_adapter((tmp_path / "x").mkdir() or tmp_path / "x" / "adapter.gguf", base_path, seed=1, rank=2)
    b = write_adapter((tmp_path / "y").mkdir() or tmp_path / "y" / "adapter.gguf", base_path, seed=2, rank=2)
    with Engine(str(base_path), n_ctx=256, n_threads=2) as e:
        assert e.load_adapter(a) == "adapter"
        assert e.load_adapter(b) == "adapter-2"
        assert e.load_adapter(a) == "adapter"          # the same file again: the same adapter
        toks = e.tokenize("Hello there")
        assert np.abs(e.logits(toks, adapter="adapter") - e.logits(toks, adapter="adapter-2")).max() > 0.01


def test_stream_result_carries_the_generation(engine):
    msgs = [{"role": "user", "content": "Name a color."}]
    with engine.chat(msgs, max_tokens=6, stream=True) as s:
        assert s.result is None
        text = "".join(s)
    g = s.result
    assert g.text == text and g.completion_tokens <= 6 and g.prompt_tokens > 5
    s2 = engine.chat(msgs, max_tokens=30, stream=True)
    next(s2)
    s2.close()                      # closing early frees the engine at once
    assert engine.chat(msgs, max_tokens=6).text == text


def test_flash_attention_reaches_llama_cpp_and_stays_close(engine, base_path, adapters):
    """`flash_attn=True` is llama.cpp's flash attention: close to the default path, not equal
    (ggml's CPU kernel sums softmax @ V in f16), with and without an adapter."""
    text = ("The committee met on Tuesday to review the quarterly results. Revenue grew by eight percent "
            "compared with the same period last year, driven mostly by the new subscription plans.")
    toks = engine.tokenize(text)
    with Engine(str(base_path), n_ctx=1024, n_threads=2, flash_attn=True) as fa:
        assert fa.flash_attn and not engine.flash_attn
        for sel in (None, str(adapters["a"])):
            off, on = engine.logits(toks, adapter=sel), fa.logits(toks, adapter=sel)
            assert np.isfinite(on).all()
            assert not np.array_equal(on, off)                      # the flag reached llama.cpp
            assert np.abs(on - off).max() < 0.5 * off.std()         # ~0.6-1.2 here, logits' spread ~6
            assert (on.argmax(1) == off.argmax(1)).mean() >= 0.8    # 0.91-0.94 here


def test_logits_view_follows_llama_cpps_buffer(base_path):
    """The generation loop reads logits through a view cached by buffer address: after
    `Engine.logits` (all-token outputs: llama.cpp reallocates its output buffer) the next
    generation must read the new buffer, not a stale one. A fresh engine, so its buffer starts
    at one row whatever other tests did."""
    prompt = "Write one sentence about rivers."
    with Engine(str(base_path), n_ctx=512, n_threads=2) as eng:
        before = eng.complete(prompt, adapter=None, max_tokens=12, temperature=0.0).text
        b = eng._b
        first = b._row_address
        toks = eng.tokenize("The quick brown fox jumps over the lazy dog. " * 6)
        all_rows = eng.logits(toks, adapter=None)          # 60+ outputs at once
        with eng._lock:
            b.memory_clear()
            b.decode(toks)
            np.testing.assert_array_equal(b.last_logits(), all_rows[-1])  # batched prefill: same rows bit for bit
            moved = b._row_address != first
            eng._invalidate_kv()
        assert eng.complete(prompt, adapter=None, max_tokens=12, temperature=0.0).text == before
        assert moved, "llama.cpp kept its output buffer: this test no longer covers the address change"
