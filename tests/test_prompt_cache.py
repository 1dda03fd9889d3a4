"""The prompt cache per adapter set: bookkeeping (pure Python) and, on the real base, that a
request after a swap reuses only K/V its own adapter set computed, bit for bit."""

from __future__ import annotations

import os

import pytest

from edgeft.prompt_cache import PER_SET, PromptCache, common_prefix

A = (("a", ("a.gguf", 1, 10, 5), 1.0),)
B = (("b", ("b.gguf", 2, 10, 5), 1.0),)


def _state(n: int) -> bytearray:
    return bytearray(n)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5, 6], [5, 6, 7]) == 2


def test_best_is_per_adapter_set_and_longest_prefix():
    c = PromptCache(1.0)
    assert c.put(A, [1, 2, 3, 4, 5, 6, 7, 8], _state(100))
    assert c.put(B, [1, 2, 3, 4, 5, 6, 7, 8, 9], _state(100))
    got = c.best(A, [1, 2, 3, 4, 5, 6, 99], usable=10)
    assert got is not None and got[2] == 6 and got[1][:8] == (1, 2, 3, 4, 5, 6, 7, 8)
    assert c.best((("a", ("a.gguf", 1, 10, 6), 1.0),), [1, 2, 3, 4, 5, 6], usable=10) is None  # file changed
    assert c.best((("a", ("a.gguf", 1, 10, 5), 0.5),), [1, 2, 3, 4, 5, 6], usable=10) is None  # other scale
    assert c.best(A, [1, 2, 3, 4, 5, 6, 7, 8], usable=5)[2] == 5      # never more than usable
    assert c.best(A, [1, 2, 3, 9], usable=10) is None                 # fewer than MIN_REUSE shared
    assert c.best(A, [1, 2, 3, 4, 5, 6, 7], usable=10, at_least=8) is None
    assert c.stats.hits == 2 and c.stats.misses == 4
    assert c.stats.reused_tokens == 6 + 5


def test_budget_evicts_least_recently_used_and_refuses_what_cannot_fit():
    c = PromptCache(0.001)  # 1,000 bytes
    assert c.put(A, list(range(10)), _state(400))
    assert c.put(B, list(range(10)), _state(400))
    assert c.best(A, list(range(10)), usable=9) is not None  # A is now the most recently used
    assert c.put(((("c", (), 1.0)),), list(range(10)), _state(400))
    assert c.nbytes <= 1000 and len(c) == 2 and c.stats.evictions == 1
    assert c.best(B, list(range(10)), usable=9) is None       # B was evicted, A kept
    assert c.best(A, list(range(10)), usable=9) is not None
    assert not c.put(A, list(range(10)), _state(1001))        # larger than the whole budget
    assert not c.put(A, [1, 2], _state(10))                   # too short to be worth restoring
    assert c.nbytes <= 1000


def test_an_entry_replaces_only_entries_it_extends_and_a_set_keeps_at_most_per_set():
    c = PromptCache(1.0)
    head = list(range(100, 140))
    c.put(A, head + [1, 2, 3], _state(10))
    c.put(A, head + [7, 8], _state(10))          # another prompt after the same system prompt: kept beside it
    c.put(A, head + [7, 8, 9, 10], _state(10))   # extends the second: replaces it
    c.put(B, head + [1, 2, 3], _state(10))       # another set: never replaces A's
    assert len(c) == 3 and c.nbytes == 30
    assert c.best(A, head + [7, 8, 9, 11], usable=50)[2] == 43
    assert c.best(A, head + [1, 2, 3, 4], usable=50)[2] == 43
    assert c.longest(A, head + [7, 8, 9, 10], usable=44) == 44 and c.longest(A, [5, 6], usable=9) == 0
    hits = c.stats.hits
    c.longest(A, head, usable=50)
    assert c.stats.hits == hits                   # a look changes nothing
    for i in range(PER_SET + 3):                  # one set's stream of distinct prompts
        c.put(A, head + [200 + i, 1, 2], _state(10))
    assert sum(e.key == A for e in c._entries.values()) == PER_SET
    assert c.best(B, head + [1, 2, 3], usable=50) is not None   # the other set's entry stays
    assert c.best(A, head + [200 + PER_SET + 2, 1], usable=50)[2] == 42  # the newest kept
    assert c.best(A, head + [200, 1], usable=50)[2] == 40       # the oldest went first


def test_disabled_cache_keeps_nothing():
    c = PromptCache(0)
    assert not c.enabled and not c.put(A, list(range(10)), _state(10)) and len(c) == 0
    with pytest.raises(ValueError):
        PromptCache(float("nan"))
    report = c.report()
    assert report["enabled"] is False and report["entries"] == 0


def test_engine_refuses_a_bad_budget_before_loading():
    from edgeft import Engine
    from edgeft.errors import InputError

    for bad in (-1, float("nan"), True, "32"):
        with pytest.raises(InputError, match="prompt cache budget"):
            Engine(prompt_cache_mb=bad)


# -- the real base: reuse never crosses adapter sets ---------------------------------------------
PROMPTS = ["Write one sentence about the sea.", "Write one sentence about a mountain.",
           "Write one sentence about the sea and the sky.", "Name three colours."]


def _answer(e, adapter, prompt):
    r = e.chat([{"role": "system", "content": "You are a helpful assistant who answers briefly."},
                {"role": "user", "content": prompt}], adapter=adapter, max_tokens=12, temperature=0)
    return r


@pytest.fixture(scope="module")
def strong_adapters(base_path, tmp_path_factory):
    from tests.helpers import write_adapter

    d = tmp_path_factory.mktemp("pc")
    return {k: write_adapter(d / f"{k}.gguf", base_path, seed=s, b_std=0.05) for k, s in (("a", 11), ("b", 12))}


def test_alternating_sets_reuse_only_their_own_kv_and_equal_fresh_engines(base_path, strong_adapters):
    from edgeft import Engine

    fresh = {}
    for k in ("a", "b"):
        with Engine(str(base_path), n_ctx=512, n_threads=2, prompt_cache_mb=0) as e:
            e.load_adapter(str(strong_adapters[k]), name=k)
            fresh[k] = [_answer(e, k, p).text for p in PROMPTS]
    assert fresh["a"] != fresh["b"]   # the adapters change the answers: a K/V mix-up would show
    with Engine(str(base_path), n_ctx=512, n_threads=2, prompt_cache_mb=16) as e:
        for k in ("a", "b"):
            e.load_adapter(str(strong_adapters[k]), name=k)
        got = {"a": [], "b": []}
        reused = []
        for p in PROMPTS:             # A, B, A, B, ...: every request follows a swap
            for k in ("a", "b"):
                r = _answer(e, k, p)
                got[k].append(r.text)
                reused.append(r.reused_prefix)
        assert got == fresh
        assert reused[:2] == [0, 0] and min(reused[2:]) > 10   # the shared system prompt, from the cache
        rep = e.prompt_cache.report()
        # every prompt kept under its own set (the last one is still in sequence 0)
        assert rep["hits"] == len(PROMPTS) * 2 - 2 and rep["entries"] == len(PROMPTS) * 2 - 1
        # the bare base never gets an adapter's K/V: its first request after them reuses nothing
        assert _answer(e, None, PROMPTS[0]).reused_prefix == 0


def test_a_changed_adapter_file_never_reuses_the_old_kv(base_path, tmp_path):
    from edgeft import Engine
    from tests.helpers import write_adapter

    path = write_adapter(tmp_path / "x.gguf", base_path, seed=21, b_std=0.05)
    with Engine(str(base_path), n_ctx=512, n_threads=2, prompt_cache_mb=16) as e:
        e.load_adapter(str(path), name="x")
        _answer(e, "x", PROMPTS[0])
        _answer(e, None, PROMPTS[0])        # swap away: x's prompt is saved
        e.unload_adapter("x")
        write_adapter(path, base_path, seed=22, b_std=0.05)
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a new version even on coarse clocks
        e.load_adapter(str(path), name="x")
        hits = e.prompt_cache.stats.hits
        r = _answer(e, "x", PROMPTS[1])
        assert r.reused_prefix == 0 and e.prompt_cache.stats.hits == hits
    with Engine(str(base_path), n_ctx=512, n_threads=2, prompt_cache_mb=0) as e:
        e.load_adapter(str(path), name="x")
        assert _answer(e, "x", PROMPTS[1]).text == r.text


def test_the_cache_stays_within_its_budget(base_path, strong_adapters):
    from edgeft import Engine

    with Engine(str(base_path), n_ctx=512, n_threads=2, prompt_cache_mb=6) as e:
        for k in ("a", "b"):
            e.load_adapter(str(strong_adapters[k]), name=k)
        sizes = []
        for i in range(6):
            # long, distinct prompts: each saved state is about 4 MB (23 kB a token), so one fits
            text = " ".join(f"word{i}-{j}" for j in range(25))
            _answer(e, ("a", "b")[i % 2], text)
            sizes.append(e.prompt_cache.nbytes)
        assert e.prompt_cache.stats.saves >= 4 and max(sizes) > 3e6
        assert max(sizes) <= 6e6 and e.prompt_cache.stats.evictions >= 3 and len(e.prompt_cache) == 1
