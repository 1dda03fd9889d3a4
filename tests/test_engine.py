"""Engine with random (B != 0) adapters: swapping, KV correctness, mixing, LRU budget, thread
safety, streaming. On the tiny base (tests/tiny_gguf.py): none of this needs real language. KV
invalidation across swaps and flash attention run on the real SmolLM2 base too (slow), where
real text gives long shared prefixes and realistic attention."""

from __future__ import annotations

import threading
from pathlib import Path

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


def _adapters(d: Path, base: Path) -> dict[str, Path]:
    return {
        "a": write_adapter(d / "a.gguf", base, seed=1, b_std=0.05),
        "b": write_adapter(d / "b.gguf", base, seed=2, b_std=0.05, rank=4),
        "c": write_adapter(d / "c.gguf", base, seed=3, b_std=0.05, targets=("attn_q", "attn_v")),
    }


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_base):
    return _adapters(tmp_path_factory.mktemp("adapters"), tiny_base)


@pytest.fixture(params=["tiny", pytest.param("real", marks=pytest.mark.slow)])
def any_base(request) -> tuple[Path, int]:
    """(base, threads): the tiny base on one thread (fast lane), the real one on two (slow)."""
    if request.param == "tiny":
        return request.getfixturevalue("tiny_base"), 1
    return request.getfixturevalue("base_path"), 2


SELECTED = object()


def _greedy(eng: Engine, adapter, prompt: str) -> str:
    """Greedy answer; adapter=SELECTED uses the engine's selected set, None forces the base."""
    msgs = [{"role": "user", "content": prompt}]
    kw = {} if adapter is SELECTED else {"adapter": adapter}
    return eng.chat(msgs, max_tokens=N, **kw).text


def test_the_tiny_base_is_a_stand_in_for_the_real_one(tiny_base, tiny_engine):
    """What the fast lane relies on: llama.cpp loads the tiny base in milliseconds, renders its
    ChatML template, knows `<|im_end|>` as end of generation, round-trips text through its vocab,
    and greedy answers are deterministic, prompt-dependent and not a short loop."""
    from tiny_gguf import IM_END

    assert tiny_engine.load_ms < 1000                  # ~12 ms here; the real base ~200 ms
    prompt = tiny_engine.chat_prompt([{"role": "user", "content": "Hi there!"}])
    assert prompt.endswith("<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")  # the template's default system prompt
    toks = tiny_engine.tokenize(prompt)
    assert toks.count(IM_END) == 2 and tiny_engine._b.is_eog(IM_END)
    text = "Mixed text: {\"a\": [1, 2.5]} ~ ok?"
    assert tiny_engine._b.detokenize(tiny_engine.tokenize(text)) == text
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    a = tiny_engine.chat(msgs, adapter=None, max_tokens=200)
    assert a.completion_tokens == 200 and a.finish_reason == "length"
    assert tiny_engine.chat(msgs, adapter=None, max_tokens=200).text == a.text
    assert tiny_engine.chat([{"role": "user", "content": PROMPTS[1]}], adapter=None, max_tokens=20).text != a.text[:20]
    assert a.text.isprintable() and len(set(a.text)) > 30 and a.text.count(" ") > 10
    assert len({a.text[i:i + 8] for i in range(len(a.text) - 8)}) > 150    # no short cycle


def test_adapters_change_output_and_none_restores_base(tiny_engine, adapters):
    tiny_engine.use(None)
    base = [_greedy(tiny_engine, None, p) for p in PROMPTS]
    a = [_greedy(tiny_engine, str(adapters["a"]), p) for p in PROMPTS]
    b = [_greedy(tiny_engine, str(adapters["b"]), p) for p in PROMPTS]
    assert a != base and b != base and a != b, "test adapters must change the output, else nothing is tested"
    assert [_greedy(tiny_engine, None, p) for p in PROMPTS] == base


def test_kv_invalidated_on_swap_matches_fresh_engines(any_base, tmp_path):
    """A, then B, then A again on shared-prefix prompts == a fresh engine with only A (and B)."""
    base_path, threads = any_base
    adapters = _adapters(tmp_path, base_path)
    fresh = {}
    for k in ("a", "b"):
        with Engine(str(base_path), n_ctx=1024, n_threads=threads) as e:
            e.use(str(adapters[k]))
            fresh[k] = [_greedy(e, SELECTED, p) for p in PROMPTS]
    assert fresh["a"] != fresh["b"]
    with Engine(str(base_path), n_ctx=1024, n_threads=threads) as e:
        e.load_adapter(adapters["a"], name="A")
        e.load_adapter(adapters["b"], name="B")
        got = {"a": [], "b": []}
        for p in PROMPTS:  # interleave per prompt: A, B, A
            got["a"].append(_greedy(e, "A", p))
            got["b"].append(_greedy(e, "B", p))
            assert _greedy(e, "A", p) == got["a"][-1]
        assert got == fresh
        # the prefix is reused when the adapter set does not change, and never across a swap: C has
        # computed nothing yet, so no K/V can be reused under it (a prompt cache may keep K/V per set)
        e.load_adapter(adapters["c"], name="C")
        e.use("A")
        e.chat([{"role": "user", "content": PROMPTS[0]}], max_tokens=2)
        r = e.chat([{"role": "user", "content": PROMPTS[1]}], max_tokens=2)
        assert r.reused_prefix > 10
        e.use("C")
        r = e.chat([{"role": "user", "content": PROMPTS[1]}], max_tokens=2)
        assert r.reused_prefix == 0


def test_same_shape_swaps_are_exact_and_skip_the_reserve_when_patched(tiny_base, tmp_path):
    """Adapters of one shape (same tensors, rank, dtype) swapped back and forth: every logit equals
    a fresh engine's under that set. With edgeft's llama.cpp patch such swaps skip the scheduler
    re-reserve (the first-request penalty); a set of another shape still re-reserves."""
    from edgeft import _llama

    s1 = write_adapter(tmp_path / "s1.gguf", tiny_base, seed=11, b_std=0.05)
    s2 = write_adapter(tmp_path / "s2.gguf", tiny_base, seed=12, b_std=0.05)
    other = write_adapter(tmp_path / "o.gguf", tiny_base, seed=13, b_std=0.05, rank=4)
    expected = {}
    with Engine(str(tiny_base), n_ctx=512, n_threads=1) as e:
        toks = e.tokenize("Swapping adapters of one shape must not change what each one computes.")
    sels = [("s1", 1.0), ("s2", 1.0), ("s1", 0.5), ("s2", 1.0), ("s1", 1.0)]
    for name, scale in set(sels):
        with Engine(str(tiny_base), n_ctx=512, n_threads=1) as fresh:
            p = {"s1": s1, "s2": s2}[name]
            fresh.load_adapter(p)
            expected[(name, scale)] = fresh.logits(toks, adapter={name: scale})
    assert np.abs(expected[("s1", 1.0)] - expected[("s2", 1.0)]).max() > 0.5  # the two really differ
    with Engine(str(tiny_base), n_ctx=512, n_threads=1) as e:
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
        # patch 0001 counts the reserves itself (no log text read)
        assert hasattr(_llama.llama_cpp.llama_cpp._lib, "edgeft_llama_sched_reserves")
    else:  # a stock build re-reserves on every change of the set (the first entry is no change)
        assert same_shape_reserves == sum(a != b for a, b in zip([("s1", 1.0)] + sels, sels)) == 4


def test_logits_follow_adapter_set(tiny_engine, adapters):
    toks = tiny_engine.tokenize("The quick brown fox")
    base = tiny_engine.logits(toks, adapter=None)
    a = tiny_engine.logits(toks, adapter=str(adapters["a"]))
    assert np.abs(a - base).max() > 0.5
    np.testing.assert_array_equal(tiny_engine.logits(toks, adapter=None), base)


def test_mix_with_scales(tiny_engine, adapters):
    toks = tiny_engine.tokenize("Mixing adapters works like this:")
    a, c = str(adapters["a"]), str(adapters["c"])
    base = tiny_engine.logits(toks, adapter=None)
    only_a = tiny_engine.logits(toks, adapter={a: 1.0})
    zero = tiny_engine.logits(toks, adapter={a: 0.0})
    np.testing.assert_allclose(zero, base, atol=1e-4)  # scale 0 is the base
    mix = tiny_engine.logits(toks, adapter={a: 1.0, c: 0.5})
    assert np.abs(mix - only_a).max() > 0.1
    half = tiny_engine.logits(toks, adapter={a: 0.5})
    assert 0 < np.abs(half - base).mean() < np.abs(only_a - base).mean()
    # selection via use() and the string form
    assert tiny_engine.use(f"{a}=1,{c}=0.5") == {"a": 1.0, "c": 0.5}
    np.testing.assert_allclose(tiny_engine.logits(toks), mix, atol=1e-5)
    tiny_engine.use(None)


def test_swap_cost_is_small_and_counted(tiny_engine, adapters):
    tiny_engine.load_adapter(adapters["a"])
    tiny_engine.load_adapter(adapters["b"])
    before = tiny_engine.stats.swaps
    for i in range(10):
        tiny_engine.chat([{"role": "user", "content": "hi"}], adapter="a" if i % 2 else "b", max_tokens=1)
    assert tiny_engine.stats.swaps - before == 10
    assert all(ms >= 0 for ms in tiny_engine.stats.swap_ms)


def _resident_mb(base_path, path) -> float:
    """What one adapter counts against the memory budget."""
    with Engine(str(base_path), n_ctx=512, n_threads=1) as probe:
        name = probe.load_adapter(path)
        return probe.adapters[name].mb


def test_lru_budget_evicts_least_recently_used(tiny_base, tmp_path):
    paths = [write_adapter(tmp_path / f"r{i}.gguf", tiny_base, seed=i, rank=4) for i in range(3)]
    one_mb = _resident_mb(tiny_base, paths[0])
    with Engine(str(tiny_base), n_ctx=512, n_threads=1, memory_budget_mb=one_mb * 2.5) as e:
        e.load_adapter(paths[0])
        e.load_adapter(paths[1])
        e.use("r0")                       # r0 is now the most recently used
        e.load_adapter(paths[2])          # over budget: r1 (LRU, not active) goes
        assert set(e.adapters) == {"r0", "r2"} and e.stats.evictions == 1
        assert e.resident_mb() <= one_mb * 2.5
        e.use("r1")                       # loading it again evicts r0? no: r0 is no longer selected
        assert "r1" in e.adapters and len(e.adapters) == 2 and e.stats.evictions == 2
    with Engine(str(tiny_base), n_ctx=512, n_threads=1, memory_budget_mb=one_mb * 0.5) as e:
        with pytest.raises(AdapterError, match="budget"):
            e.load_adapter(paths[0])


def test_reload_after_eviction_revalidates_a_changed_file(tiny_base, tmp_path):
    """Reloads skip the full validation only while the file is the one validated before."""
    paths = [write_adapter(tmp_path / f"v{i}.gguf", tiny_base, seed=i, rank=4) for i in range(2)]
    one_mb = _resident_mb(tiny_base, paths[0])
    with Engine(str(tiny_base), n_ctx=512, n_threads=1, memory_budget_mb=one_mb * 1.5) as e:
        e.load_adapter(paths[0])
        e.load_adapter(paths[1])                       # evicts v0
        assert set(e.adapters) == {"v1"}
        e.load_adapter("v0")                           # unchanged: reloads (evicting v1)
        assert set(e.adapters) == {"v0"}

        def nan(t):
            t["blk.0.attn_q.weight.lora_b"][0, 0] = np.nan

        write_adapter(paths[1], tiny_base, seed=1, rank=4, mutate=nan)  # v1 changes on disk
        with pytest.raises(AdapterError, match="NaN"):
            e.load_adapter("v1")
        assert set(e.adapters) == {"v0"}


def test_threads_serialized_and_exact(tiny_engine, adapters):
    refs = [None, str(adapters["a"]), str(adapters["b"]), str(adapters["c"])]
    jobs = [(refs[i % 4], PROMPTS[i % 3]) for i in range(16)]
    expected = [_greedy(tiny_engine, r, p) for r, p in jobs]
    got: list = [None] * len(jobs)
    errors = []

    def worker(k: int) -> None:
        try:
            for i in range(k, len(jobs), 4):
                got[i] = _greedy(tiny_engine, *jobs[i])
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


def test_swap_waits_for_running_stream(tiny_engine, adapters):
    tiny_engine.use(str(adapters["a"]))
    ref = tiny_engine.chat([{"role": "user", "content": PROMPTS[0]}], max_tokens=N).text
    stream = tiny_engine.chat([{"role": "user", "content": PROMPTS[0]}], max_tokens=N, stream=True)
    first = next(stream)
    done = threading.Event()

    def swapper():
        tiny_engine.use(str(adapters["b"]))  # must block until the stream finishes
        done.set()

    t = threading.Thread(target=swapper)
    t.start()
    assert not done.wait(0.3)
    text = first + "".join(stream)
    t.join(5)
    assert done.is_set()
    assert text == ref
    tiny_engine.use(None)


def test_stream_equals_blocking_and_stop_strings(tiny_engine):
    msgs = [{"role": "user", "content": "Count from one to ten in words, separated by commas."}]
    full = tiny_engine.chat(msgs, max_tokens=80).text       # one character a token: ~13 words
    assert "".join(tiny_engine.chat(msgs, max_tokens=80, stream=True)) == full
    word = full.split()[len(full.split()) // 2]
    assert len(full.split()) > 6
    cut = tiny_engine.chat(msgs, max_tokens=80, stop=[word])
    assert cut.text == full[: full.index(word)] and cut.finish_reason == "stop"
    streamed = "".join(tiny_engine.chat(msgs, max_tokens=80, stop=[word], stream=True))
    assert streamed == cut.text


def test_bad_requests(tiny_engine):
    with pytest.raises(InputError):
        tiny_engine.chat([])
    with pytest.raises(InputError):
        tiny_engine.chat([{"role": "user"}])
    with pytest.raises(InputError):
        tiny_engine.run("   ")
    with pytest.raises(InputError, match="context"):
        tiny_engine.complete("word " * 2000)           # 10,000 tokens, the context holds 4,096
    with pytest.raises(AdapterError, match="unknown adapter"):
        tiny_engine.use("no-such-adapter")


def test_task_card_labels_constrain_output(tiny_engine, tiny_base, tmp_path):
    """The card's labels / JSON schema bind the answer (the tiny base spells a label one
    character a token, hence the larger max_tokens than a real card's)."""
    labels = ["negative", "neutral", "positive"]
    task = {"system": "Classify the sentiment.", "template": "Text: {input}",
            "output": {"type": "labels", "labels": labels}, "generation": {"max_tokens": 12}}
    folder = write_bundle(tmp_path / "senti", tiny_base, name="senti", task=task, seed=5)
    tiny_engine.load_adapter(folder)
    for text in ("I love it", "The market fell sharply", "Meeting at 3pm"):
        res = tiny_engine.run(text, adapter="senti")
        assert res.text in labels and res.value == res.text
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]}
    folder2 = write_bundle(tmp_path / "js", tiny_base, name="js", seed=6,
                           task={"template": "{input}", "output": {"type": "json_schema", "schema": schema},
                                 "generation": {"max_tokens": 80}})
    tiny_engine.load_adapter(folder2)
    res = tiny_engine.run("Give me a JSON object with a name.", adapter="js")
    assert isinstance(res.value, dict) and isinstance(res.value["name"], str)
    tiny_engine.use(None)


def test_grammar_checked_sampling_equals_grammar_first(tiny_engine, adapters):
    """The fast path (check only the picked token) must give what masking every step gives."""
    import llama_cpp

    from edgeft import _llama

    schema = {"type": "array", "items": {"type": "object", "properties": {
        "text": {"type": "string", "maxLength": 20}, "type": {"enum": ["PER", "ORG", "LOC", "MISC"]}},
        "required": ["text", "type"]}, "maxItems": 3}
    gbnf = _llama.json_schema_to_gbnf(schema)
    b = tiny_engine._b

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
            prompt = tiny_engine.chat_prompt([{"role": "user", "content": f"List the named entities as JSON: {t}"}])
            with tiny_engine._lock:
                tiny_engine._apply(tiny_engine._resolve(ad))
                tiny_engine._invalidate_kv()
                ref = grammar_first(prompt, 40)
            got = tiny_engine.complete(prompt, adapter=ad, grammar=gbnf, max_tokens=40).text
            assert got == ref


def test_greedy_fast_path_picks_what_llama_cpps_greedy_sampler_picks(tiny_engine, adapters):
    """Greedy decoding takes argmax over the logits instead of llama.cpp's greedy sampler; both
    must give the same tokens, with and without an adapter."""
    import llama_cpp

    from edgeft import _llama

    b = tiny_engine._b
    fast = b.sampler(_llama.Sampling(temperature=0.0))
    assert fast._greedy
    params = llama_cpp.llama_sampler_chain_default_params()
    ref = llama_cpp.llama_sampler_chain_init(params)
    llama_cpp.llama_sampler_chain_add(ref, llama_cpp.llama_sampler_init_greedy())
    try:
        picks = []
        for ad in (None, str(adapters["a"])):
            with tiny_engine._lock:
                tiny_engine._apply(tiny_engine._resolve(ad))
                b.memory_clear()
                b.decode(b.tokenize("The three largest cities of Australia are"))
                for _ in range(24):
                    tok = b.sample(fast)
                    assert tok == llama_cpp.llama_sampler_sample(ref, b.ctx, -1)
                    picks.append(tok)
                    b.decode_one(tok)
                tiny_engine._invalidate_kv()
        assert len(set(picks)) > 5  # text, not one token repeated
    finally:
        fast.close()
        llama_cpp.llama_sampler_free(ref)
    tiny_engine.use(None)


def test_same_file_name_from_two_folders_gets_two_names(tiny_base, tmp_path):
    a = write_adapter((tmp_path / "x").mkdir() or tmp_path / "x" / "adapter.gguf", tiny_base, seed=1, rank=2)
    b = write_adapter((tmp_path / "y").mkdir() or tmp_path / "y" / "adapter.gguf", tiny_base, seed=2, rank=2)
    with Engine(str(tiny_base), n_ctx=256, n_threads=1) as e:
        assert e.load_adapter(a) == "adapter"
        assert e.load_adapter(b) == "adapter-2"
        assert e.load_adapter(a) == "adapter"          # the same file again: the same adapter
        toks = e.tokenize("Hello there")
        assert np.abs(e.logits(toks, adapter="adapter") - e.logits(toks, adapter="adapter-2")).max() > 0.01


def test_stream_result_carries_the_generation(tiny_engine):
    msgs = [{"role": "user", "content": "Name a color."}]
    with tiny_engine.chat(msgs, max_tokens=6, stream=True) as s:
        assert s.result is None
        text = "".join(s)
    g = s.result
    assert g.text == text and g.completion_tokens <= 6 and g.prompt_tokens > 5
    s2 = tiny_engine.chat(msgs, max_tokens=30, stream=True)
    next(s2)
    s2.close()                      # closing early frees the tiny_engine at once
    assert tiny_engine.chat(msgs, max_tokens=6).text == text


def test_flash_attention_reaches_llama_cpp_and_stays_close(any_base, tmp_path):
    """`flash_attn=True` is llama.cpp's flash attention: close to the default path, not equal
    (ggml's CPU kernel sums softmax @ V in f16), with and without an adapter."""
    base_path, threads = any_base
    a = write_adapter(tmp_path / "a.gguf", base_path, seed=1, b_std=0.05)
    text = ("The committee met on Tuesday to review the quarterly results. Revenue grew by eight percent "
            "compared with the same period last year, driven mostly by the new subscription plans.")
    with Engine(str(base_path), n_ctx=1024, n_threads=threads) as engine, \
            Engine(str(base_path), n_ctx=1024, n_threads=threads, flash_attn=True) as fa:
        toks = engine.tokenize(text)
        assert fa.flash_attn and not engine.flash_attn
        for sel in (None, str(a)):
            off, on = engine.logits(toks, adapter=sel), fa.logits(toks, adapter=sel)
            assert np.isfinite(on).all()
            assert not np.array_equal(on, off)                      # the flag reached llama.cpp
            assert np.abs(on - off).max() < 0.5 * off.std()         # ~0.6-1.2 here, logits' spread ~6
            assert (on.argmax(1) == off.argmax(1)).mean() >= 0.8    # 0.91-0.94 here


def test_logits_view_follows_llama_cpps_buffer(tiny_base):
    """The generation loop reads logits through a view cached by buffer address: after
    `Engine.logits` (all-token outputs: llama.cpp reallocates its output buffer) the next
    generation must read the new buffer, not a stale one. A fresh engine, so its buffer starts
    at one row whatever other tests did."""
    prompt = "Write one sentence about rivers."
    with Engine(str(tiny_base), n_ctx=512, n_threads=1) as eng:
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
