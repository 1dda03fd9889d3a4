"""Continuous batching (edgeft/continuous.py): answers join and leave a running batch, each with
its own sampler, stops, limits and cancel event, and each equal to what it gets alone."""

from __future__ import annotations

import threading

import pytest

from edgeft import _llama
from edgeft.errors import InputError

PROMPTS = [f"<|im_start|>user\nquestion {i}: " + "why " * (i % 4) + "<|im_end|>\n<|im_start|>assistant\n"
           for i in range(10)]


def _solo(eng, prompts, **kw):
    return [eng.complete(p, **kw) for p in prompts]


def _drive(cb, plan):
    """Step the batch; `plan` maps a step number to prompts (token lists) that join before it."""
    added = []
    step = 0
    while True:
        for toks, kw in plan.get(step, []):
            assert cb.fits(toks, kw.get("max_tokens", 256))
            added.append(cb.add(toks, **kw))
        if not cb.answers and step >= max(plan, default=0):
            return added
        cb.step()
        step += 1


def test_answers_joining_mid_decode_equal_their_solo_answers(tiny_engine):
    want = _solo(tiny_engine, PROMPTS[:6], max_tokens=20)
    toks = [tiny_engine.tokenize(p) for p in PROMPTS[:6]]
    calls = []
    b = tiny_engine._b
    real = b.decode_seqs
    b.decode_seqs = lambda t, *a, **k: calls.append(len(t)) or real(t, *a, **k)
    try:
        with tiny_engine.batch() as cb:
            got = _drive(cb, {0: [(toks[0], {"max_tokens": 20})], 3: [(toks[1], {"max_tokens": 20}),
                                                                       (toks[2], {"max_tokens": 20})],
                              7: [(t, {"max_tokens": 20}) for t in toks[3:]]})
    finally:
        del b.decode_seqs
    assert [a.gen.text for a in got] == [g.text for g in want]
    assert [a.gen.completion_tokens for a in got] == [g.completion_tokens for g in want]
    assert max(calls) > 6                          # several answers (and prompts) in one decode
    assert all(a.done and a.gen.finish_reason == w.finish_reason for a, w in zip(got, want))
    assert got[1].gen.reused_prefix > 0            # it shared the chat head with sequence 0
    assert got[0].gen.batch_size == 6 and got[5].gen.batch_size >= 3


def test_cancelling_one_answer_leaves_the_others_untouched(tiny_engine):
    toks = [tiny_engine.tokenize(p) for p in PROMPTS[:4]]
    want = _solo(tiny_engine, PROMPTS[:4], max_tokens=30)
    with tiny_engine.batch() as cb:
        answers = [cb.add(t, max_tokens=30) for t in toks]
        for _ in range(5):
            cb.step()
        answers[1].cancel.set()
        ended = cb.step()
        assert answers[1] in ended and answers[1].done and answers[1].gen.finish_reason == "cancelled"
        n_cut = answers[1].gen.completion_tokens
        while cb.answers:
            cb.step()
    assert 0 < n_cut < 30 and answers[1].gen.text == want[1].text[:len(answers[1].gen.text)]
    for i in (0, 2, 3):
        assert answers[i].gen.text == want[i].text and answers[i].gen.finish_reason == want[i].finish_reason


def test_stops_limits_grammars_and_ignore_eos_are_per_answer(tiny_engine):
    toks = [tiny_engine.tokenize(p) for p in PROMPTS[:3]]
    free = _solo(tiny_engine, PROMPTS[:3], max_tokens=24)
    stop = free[0].text[6:9]
    grammar = 'root ::= "yes" | "no"'
    with tiny_engine.batch() as cb:
        a = cb.add(toks[0], max_tokens=24, stop=[stop])
        b = cb.add(toks[1], max_tokens=5)
        c = cb.add(toks[2], max_tokens=24, grammar=grammar)
        d = cb.add(toks[2], max_tokens=40, ignore_eos=True)
        while cb.answers:
            cb.step()
    assert a.gen.text == free[0].text[:free[0].text.find(stop)] and a.gen.finish_reason == "stop"
    assert b.gen.completion_tokens == 5 and b.gen.text == free[1].text[:len(b.gen.text)]
    assert c.gen.text in ("yes", "no")
    assert d.gen.completion_tokens == 40 and d.gen.finish_reason == "length"
    # streamed pieces add up to the answer, and never show the start of a stop string early
    with tiny_engine.batch() as cb:
        s = cb.add(toks[0], max_tokens=24, stop=[stop])
        shown = ""
        while cb.answers:
            cb.step()
            piece = s.take()
            assert stop not in shown + piece
            shown += piece
    assert shown == a.gen.text


def test_a_failing_answer_ends_alone(tiny_engine):
    toks = [tiny_engine.tokenize(p) for p in PROMPTS[:2]]
    with tiny_engine.batch() as cb:
        ok = cb.add(toks[0], max_tokens=10)
        # the grammar is complete after "x" and ignore_eos masks the end: no token can follow
        bad = cb.add(toks[1], max_tokens=10, grammar='root ::= "x"', ignore_eos=True)
        while cb.answers:
            cb.step()
    assert bad.gen.finish_reason == "error" and isinstance(bad.error, InputError)
    assert ok.gen.finish_reason in ("stop", "length") and ok.error is None
    assert ok.gen.text == tiny_engine.complete(PROMPTS[0], max_tokens=10).text


def test_admission_keeps_prompts_and_answers_within_the_context(tiny_base):
    from edgeft import Engine

    with Engine(str(tiny_base), n_ctx=256, n_threads=1) as eng:
        toks = [eng.tokenize(p) for p in PROMPTS[:6]]
        want = _solo(eng, PROMPTS[:6], max_tokens=60, )
        out = eng.complete_many(PROMPTS[:6], max_tokens=60)
        assert [g.text for g in out] == [g.text for g in want]
        with eng.batch() as cb:
            cb.add(toks[0], max_tokens=60)
            cb.add(toks[1], max_tokens=60)
            # two answers hold about 2 x (suffix + 60) cells beside the prefix: a third does not fit
            assert not cb.fits(toks[2], 200)
            assert cb.fits(toks[2], 10)
            with pytest.raises(InputError, match="no room"):
                cb.add(toks[2], max_tokens=200)
            while cb.answers:
                cb.step()
            assert cb.fits(toks[2], 200)       # alone, its answer is cut to the context instead
            big = cb.add(toks[2], max_tokens=1000, ignore_eos=True)
            while cb.answers:
                cb.step()
        assert big.gen.completion_tokens == 256 - len(toks[2])


def test_bad_requests_are_refused_before_llama_cpp(tiny_engine):
    with tiny_engine.batch() as cb:
        for bad in ({"max_tokens": -1}, {"max_tokens": True}, {"temperature": float("nan")},
                    {"grammar": ""}, {"top_k": -2}, {"beam": 3}):
            with pytest.raises(InputError):
                cb.add([1, 2, 3], **{"max_tokens": 4, **bad})
        with pytest.raises(InputError, match="empty prompt"):
            cb.add([], max_tokens=4)
        with pytest.raises(InputError, match="context holds"):
            cb.add([1] * tiny_engine.n_ctx, max_tokens=4)
        assert cb.answers == [] and cb.slots == tiny_engine.parallel


def test_the_batch_holds_the_engine_and_leaves_its_kv_rules(tiny_engine):
    """While a batch is open other callers wait; after it, a request alone answers as a fresh
    engine would (only the prompt prefix stays in sequence 0)."""
    done = threading.Event()

    def other():
        tiny_engine.complete(PROMPTS[5], max_tokens=3)
        done.set()

    with tiny_engine.batch() as cb:
        t = threading.Thread(target=other)
        t.start()
        cb.add(tiny_engine._b.tokenize(PROMPTS[0]), max_tokens=5)
        while cb.answers:
            cb.step()
        assert not done.wait(0.3)
    t.join(30)
    assert done.is_set()
    again = tiny_engine.complete(PROMPTS[0], max_tokens=12)
    tiny_engine.reset()
    assert again.text == tiny_engine.complete(PROMPTS[0], max_tokens=12).text


@pytest.mark.skipif(not _llama.patches.batch_attention_own_cells(),
                    reason="needs llama.cpp built with cmake/patches 0006 (setup.sh)")
def test_a_prompt_seen_before_is_restored_from_the_prompt_cache_not_prefilled(tiny_engine):
    """With the prompt cache on, each answer's prompt is prefilled apart from the decode steps,
    with llama.cpp's own ops as a single request prefills it, and when the answer ends its head
    (all but the last two prompt tokens) goes to the cache under its adapter set. The same prompt
    later restores that head: two tokens decoded instead of the prompt, and the same answer."""
    e = tiny_engine
    e.prompt_cache.clear()
    toks = [e.tokenize(p) for p in PROMPTS[:5]]
    want = _solo(e, PROMPTS[:5], max_tokens=12)
    calls = []
    b = e._b
    real = b.decode_seqs
    b.decode_seqs = lambda t, *a, step=False, **k: calls.append((len(t), step)) or real(t, *a, step=step, **k)
    try:
        for round_ in range(2):
            calls.clear()
            saves, hits = e.prompt_cache.stats.saves, e.prompt_cache.stats.hits
            with e.batch() as cb:
                got = [cb.add(t, max_tokens=12) for t in toks]
                while cb.answers:
                    cb.step()
            assert [a.gen.text for a in got] == [g.text for g in want]
            # prompt rows only in decodes apart; a step carries one row per answer
            assert all(n <= len(toks) for n, step in calls if step)
            prompt_rows = sum(n for n, step in calls if not step)
            if round_ == 0:
                assert e.prompt_cache.stats.saves - saves == 4     # the first answer's head is sequence 0's
                assert prompt_rows > 2 * len(toks) + 4 * 4            # their own prompt parts
            else:
                assert e.prompt_cache.stats.hits - hits >= 4
                assert [a.gen.reused_prefix for a in got[1:]] == [len(t) - 2 for t in toks[1:]]
                assert prompt_rows == 2 * len(toks)
            assert e.prompt_cache.nbytes <= e.prompt_cache.budget_bytes
    finally:
        del b.decode_seqs


def test_without_the_prompt_cache_prompts_are_prefilled_in_the_steps(tiny_base):
    from edgeft import Engine

    with Engine(str(tiny_base), n_ctx=2048, n_threads=1, prompt_cache_mb=0) as eng:
        toks = [eng.tokenize(p) for p in PROMPTS[:3]]
        calls = []
        real = eng._b.decode_seqs
        eng._b.decode_seqs = lambda t, *a, step=False, **k: calls.append((len(t), step)) or real(t, *a, step=step, **k)
        with eng.batch() as cb:
            got = [cb.add(t, max_tokens=6) for t in toks]
            while cb.answers:
                cb.step()
        assert max(n for n, step in calls if step) > len(toks)     # prompt rows rode in a step
        assert [a.gen.text for a in got] == [g.text for g in _solo(eng, PROMPTS[:3], max_tokens=6)]


def test_parallel_zero_has_no_batches_but_run_many_still_answers(tiny_base):
    from edgeft import Engine

    with Engine(str(tiny_base), n_ctx=1024, n_threads=1, parallel=0) as eng:
        assert eng.parallel == 0 and eng.n_seq_max == 1
        with pytest.raises(InputError, match="n_seq_max"):
            with eng.batch():
                pass
        got = eng.complete_many(PROMPTS[:3], max_tokens=8)
        assert [g.text for g in got] == [g.text for g in _solo(eng, PROMPTS[:3], max_tokens=8)]


@pytest.mark.slow
def test_real_base_lone_answer_is_bit_exact_and_joined_answers_agree(engine):
    """On the real base: a lone answer in a batch equals Engine.complete exactly; answers that
    share decode steps use llama.cpp's batched kernels, so we bound their agreement instead."""
    eng = engine
    prompts = [eng.chat_prompt([{"role": "user", "content": q}]) for q in
               ("Name a fruit.", "What is the capital of France?", "Count to five.", "Say hello politely.")]
    solo = _solo(eng, prompts, max_tokens=24)
    toks = [eng.tokenize(p) for p in prompts]
    with eng.batch() as cb:
        lone = cb.add(toks[0], max_tokens=24)
        while cb.answers:
            cb.step()
    assert lone.gen.text == solo[0].text
    with eng.batch() as cb:
        got = [cb.add(t, max_tokens=24) for t in toks]
        while cb.answers:
            cb.step()
    same_prefix = [len(_common(a.gen.text, s.text)) / max(1, len(s.text)) for a, s in zip(got, solo)]
    assert sum(a.gen.text == s.text for a, s in zip(got, solo)) >= 2, (got, solo)
    assert min(same_prefix) >= 0.25, same_prefix


def _common(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def test_a_grammar_that_does_not_parse_takes_no_slot(tiny_engine):
    toks = tiny_engine.tokenize(PROMPTS[0])
    with tiny_engine.batch() as cb:
        for _ in range(tiny_engine.parallel + 2):
            with pytest.raises(InputError, match="grammar"):
                cb.add(toks, max_tokens=4, grammar="root ::= (")
        assert cb.slots == tiny_engine.parallel and not cb.answers
        ok = cb.add(toks, max_tokens=4)
        while cb.answers:
            cb.step()
    assert ok.gen.completion_tokens == 4 or ok.gen.finish_reason == "stop"
