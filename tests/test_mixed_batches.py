"""Answers under different adapter sets in one batch (patch 0003, edgeft/continuous.py): each
sequence of a step carries its own set through per-sequence adapter scales. The rows of a mixed
step must equal, bit for bit, the same rows decoded under their own set alone; answers must equal
their solo answers; nothing computed under one set may be reused under another; adapters in use
are never evicted; a build or batch without mixing keeps one set per batch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgeft import Engine, _llama
from edgeft.errors import AdapterError, InputError
from edgeft.gguf_info import base_info
from helpers import write_adapter

needs_patch = pytest.mark.skipif(not _llama.mixed_adapter_batches(),
                                 reason="needs llama.cpp built with cmake/patches 0003 (setup.sh)")

PROMPTS = [f"<|im_start|>user\nquestion {i}: " + "why " * (i % 4) + "<|im_end|>\n<|im_start|>assistant\n"
           for i in range(8)]
SETS = ["a", "b", "c", {"a": 0.5, "c": 1.0}, None, "a", "b", "c"]


def _embedding_and_head(base):
    """`mutate` for write_adapter: LoRA on the token embeddings and the output head too (their own
    graph paths in llama.cpp: get_rows of A for the embeddings, the head on the output rows)."""
    n_embd, n_vocab = base_info(base).tensors["token_embd.weight"]
    rng = np.random.default_rng(7)

    def mutate(t: dict) -> None:
        t["token_embd.weight.lora_a"] = rng.standard_normal((n_vocab, 8)).astype(np.float32) * 0.5
        t["token_embd.weight.lora_b"] = rng.standard_normal((n_embd, 8)).astype(np.float32) * 0.5
        t["output.weight.lora_a"] = (rng.standard_normal((8, n_embd)) / np.sqrt(n_embd)).astype(np.float32)
        t["output.weight.lora_b"] = rng.standard_normal((n_vocab, 8)).astype(np.float32) * 0.5
    return mutate


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_base):
    d = tmp_path_factory.mktemp("mixed-adapters")
    return {"a": write_adapter(d / "a.gguf", tiny_base, seed=1, b_std=0.05),
            "b": write_adapter(d / "b.gguf", tiny_base, seed=2, b_std=0.05, rank=4),
            "c": write_adapter(d / "c.gguf", tiny_base, seed=3, b_std=0.05, targets=("attn_q", "attn_v")),
            "e": write_adapter(d / "e.gguf", tiny_base, seed=4, b_std=0.05, targets=("ffn_down",),
                               mutate=_embedding_and_head(tiny_base))}


@pytest.fixture(scope="module")
def eng(tiny_base, adapters):
    e = Engine(str(tiny_base), n_ctx=4096, n_threads=1)
    for name, path in adapters.items():
        e.load_adapter(str(path), name=name)
    yield e
    e.close()


@pytest.fixture
def raw(eng):
    """The engine's backend driven directly; the engine's own state is reset afterwards."""
    yield eng._b
    eng._b.set_adapters([], [])
    eng._applied, eng._applied_key = (), ()
    eng._invalidate_kv()


def _rows(b, handles, scales, tokens, pos, seqs, want, per_seq=(), step=False):
    b.memory_clear()
    b.set_adapters(handles, scales)
    for h, sc in per_seq:
        b.set_adapter_seq_scales(h, sc)
    b.decode_seqs(tokens, pos, seqs, want, step=step)
    out = {i: b.logits_at(i).copy() for i, w in enumerate(want) if w}
    for h, _ in per_seq:
        b.set_adapter_seq_scales(h, [])
    b.memory_clear()
    return out


@needs_patch
@pytest.mark.parametrize("outputs", ["every row", "last rows only"])
def test_rows_of_a_mixed_step_equal_the_same_rows_under_their_own_set(eng, raw, outputs):
    """Five sequences, five sets (a; b at 0.5; a+c; e, which adapts the embeddings and the head;
    a at 0.5) in one llama_decode: each row's logits equal those of the same batch decoded under
    that row's set alone, bit for bit. b and c each have one scale (rows switched on and off
    before B); a has two (1.0 and 0.5: each row's product scaled by its own). 'last rows only'
    keeps logits for a few rows, so the last layer and the head run on the output rows."""
    b = raw
    h = {n: eng._adapters[n].handle for n in ("a", "b", "c", "e")}
    toks = [eng.tokenize(p) for p in PROMPTS[:5]]
    tokens = [t for ts in toks for t in ts]
    pos = [i for ts in toks for i in range(len(ts))]
    seqs = [s + 1 for s, ts in enumerate(toks) for _ in ts]
    ends = {sum(len(x) for x in toks[:k + 1]) - 1 for k in range(5)}
    want = [True] * len(tokens) if outputs == "every row" else [i in ends or i == 1 for i in range(len(tokens))]
    own = [([h["a"]], [1.0]), ([h["b"]], [0.5]), ([h["a"], h["c"]], [1.0, 1.0]), ([h["e"]], [1.0]),
           ([h["a"]], [0.5])]
    alone = [_rows(b, hs, sc, tokens, pos, seqs, want) for hs, sc in own]
    mixed = _rows(b, [h["a"], h["b"], h["c"], h["e"]], [1.0] * 4, tokens, pos, seqs, want,
                  per_seq=[(h["a"], [0, 1.0, 0, 1.0, 0, 0.5]), (h["b"], [0, 0, 0.5, 0, 0, 0]),
                           (h["c"], [0, 0, 0, 1.0, 0, 0]), (h["e"], [0, 0, 0, 0, 1.0, 0])])
    base = _rows(b, [], [], tokens, pos, seqs, want)
    checked = 0
    for i, s in enumerate(seqs):
        if want[i]:
            assert np.array_equal(mixed[i], alone[s - 1][i]), (i, s)
            checked += 1
    assert checked >= 6
    for k in (1, 2, 3, 4):                                # the sets really differ
        assert max(np.abs(alone[0][i] - alone[k][i]).max() for i in mixed) > 1e-2
    assert max(np.abs(base[i] - alone[0][i]).max() for i in mixed) > 1e-2
    head = [i for i in mixed if seqs[i] == 4]             # e's head LoRA moves its output rows a lot
    assert max(np.abs(base[i] - alone[3][i]).max() for i in head) > 1.0


@needs_patch
def test_bad_per_sequence_scales_are_refused(eng, raw):
    b = raw
    ha = eng._adapters["a"].handle
    b.set_adapters([ha], [1.0])
    for bad in ([float("nan")], [0.0] * (b.n_seq_max + 1), [float("inf")]):
        with pytest.raises(ValueError):
            b.set_adapter_seq_scales(ha, bad)
    with pytest.raises(ValueError):     # an adapter that is not in the context's set
        b.set_adapter_seq_scales(eng._adapters["b"].handle, [1.0])
    b.set_adapter_seq_scales(ha, [1.0, 0.0])
    b.set_adapter_seq_scales(ha, [])


@needs_patch
def test_answers_under_different_sets_share_steps_and_equal_their_solo_answers(eng, tiny_base, adapters):
    solo = [eng.complete(p, adapter=s, max_tokens=20) for p, s in zip(PROMPTS, SETS)]
    toks = [eng.tokenize(p) for p in PROMPTS]
    before = eng.stats.mixed_steps
    with eng.batch("a") as cb:
        answers = []
        for t, s in zip(toks, SETS):        # one joins per step: sets change while others decode
            assert cb.accepts(cb.resolve(s)) and cb.fits(t, 20, s)
            answers.append(cb.add(t, max_tokens=20, adapter=s))
            cb.step()
        while cb.answers:
            cb.step()
    assert [a.gen.text for a in answers] == [g.text for g in solo]
    assert [a.gen.adapters for a in answers] == [g.adapters for g in solo]
    assert eng.stats.mixed_steps - before >= 8
    assert max(a.gen.batch_size for a in answers) >= 5
    # after the batch the context applies its home set again and reuses nothing across sets
    fresh = Engine(str(tiny_base), n_ctx=4096, n_threads=1, prompt_cache_mb=0)
    try:
        for n, p in adapters.items():
            fresh.load_adapter(str(p), name=n)
        for p, s in [(PROMPTS[1], "a"), (PROMPTS[1], "b"), (PROMPTS[3], {"a": 0.5, "c": 1.0})]:
            assert eng.complete(p, adapter=s, max_tokens=20).text == fresh.complete(p, adapter=s, max_tokens=20).text
    finally:
        fresh.close()


@needs_patch
def test_cancelling_an_answer_of_one_set_leaves_the_other_sets_untouched(eng):
    solo = [eng.complete(p, adapter=s, max_tokens=24) for p, s in zip(PROMPTS[:3], SETS[:3])]
    with eng.batch("a") as cb:
        got = [cb.add(eng._b.tokenize(p, add_special=True, parse_special=True), max_tokens=24, adapter=s)
               for p, s in zip(PROMPTS[:3], SETS[:3])]
        for _ in range(4):
            cb.step()
        got[1].cancel.set()
        while cb.answers:
            cb.step()
    assert got[1].gen.finish_reason == "cancelled" and got[1].gen.completion_tokens < 24
    assert got[0].gen.text == solo[0].text and got[2].gen.text == solo[2].text


@needs_patch
def test_adapters_in_use_are_never_evicted_for_another(tiny_base, adapters):
    e = Engine(str(tiny_base), n_ctx=2048, n_threads=1)
    try:
        e.load_adapter(str(adapters["a"]), name="a")
        e.load_adapter(str(adapters["c"]), name="c")
        e.memory_budget_mb = e.resident_mb() + 0.01    # room for what is loaded, nothing more
        toks = e.tokenize(PROMPTS[0])
        with e.batch("a") as cb:
            cb.add(toks, max_tokens=8)
            cb.add(toks, max_tokens=8, adapter="c")
            cb.step()
            with pytest.raises(AdapterError, match="in use"):
                cb.resolve(str(adapters["b"]))
            assert set(e.adapters) == {"a", "c"}
            while cb.answers:
                cb.step()
    finally:
        e.close()


def test_a_batch_that_does_not_mix_keeps_one_set_at_a_time(eng):
    """mixed=False (and any build without patch 0003): another set waits for the batch to drain,
    then the batch moves to it; a request that joins anyway is refused in one clear line."""
    toks = eng.tokenize(PROMPTS[0])
    want_b = eng.complete(PROMPTS[0], adapter="b", max_tokens=12).text
    with eng.batch("a", mixed=False) as cb:
        assert not cb.mixed
        cb.add(toks, max_tokens=12)
        assert not cb.accepts(cb.resolve("b")) and not cb.fits(toks, 12, "b")
        with pytest.raises(InputError, match="one adapter set per batch"):
            cb.add(toks, max_tokens=12, adapter="b")
        while cb.answers:
            cb.step()
        assert cb.accepts(cb.resolve("b"))
        got = cb.add(toks, max_tokens=12, adapter="b")
        while cb.answers:
            cb.step()
    assert got.gen.text == want_b and got.gen.adapters == {"b": 1.0}


SYSTEM = "<|im_start|>system\nYou answer in one short line, politely, and never add anything else.<|im_end|>\n"


def _asks(n: int) -> list[str]:
    return [SYSTEM + f"<|im_start|>user\nitem {i}: " + "what " * (i % 3) + "<|im_end|>\n<|im_start|>assistant\n"
            for i in range(n)]


@needs_patch
def test_each_set_shares_its_own_prefix_holder_and_the_prompt_cache_keeps_it(tiny_base, adapters):
    """The home set shares sequence 0; the first answer of another set makes that set a holder
    (prefilled), later answers of the set share it; idle holders stay until the batch starts
    over, when their K/V go to the prompt cache under their set, so the set's next first answer
    restores them. Every answer equals its solo answer, and nothing is reused across sets."""
    e = Engine(str(tiny_base), n_ctx=4096, n_threads=1)
    try:
        for n, p in adapters.items():
            e.load_adapter(str(p), name=n)
        asks = _asks(6)
        sets = ["a", "b", "b", "a", "c", "b"]
        solo = [e.complete(p, adapter=s, max_tokens=12) for p, s in zip(asks, sets)]
        e.reset()
        e.prompt_cache.clear()          # what b's late answer restores must come from its holder
        toks = [e.tokenize(p) for p in asks]
        with e.batch("a") as cb:
            got = [cb.add(toks[0], max_tokens=12, adapter="a")]
            cb.step()
            got += [cb.add(toks[i], max_tokens=12, adapter=sets[i]) for i in (1, 2, 3, 4)]
            assert set(cb._holders) == {(("b", 1.0),), (("c", 1.0),)}
            while cb.answers:
                cb.step()
            assert set(cb._holders) == {(("b", 1.0),), (("c", 1.0),)}   # idle: kept until needed
            before = e.prompt_cache.report()["entries"]
            first = cb.add(toks[0], max_tokens=12, adapter="a")   # an empty batch starts over
            assert not cb._holders
            saved = e.prompt_cache.report()["entries"] - before    # the holders went to the prompt cache
            late_b = cb.add(toks[5], max_tokens=12, adapter="b")   # b's prefix comes back from it
            while cb.answers:
                cb.step()
        prefix = len(e.tokenize(SYSTEM))
        assert got[1].gen.reused_prefix == 0 or got[1].gen.reused_prefix >= prefix - 2  # b's first: prefilled
        assert got[2].gen.reused_prefix >= prefix     # shared b's holder
        assert got[3].gen.reused_prefix >= prefix     # shared sequence 0 (home set a)
        assert saved >= 2 and late_b.gen.reused_prefix >= prefix
        assert [a.gen.text for a in got] + [late_b.gen.text] == [g.text for g in solo[:5]] + [solo[5].text]
        assert first.gen.text == solo[0].text
    finally:
        e.close()


@needs_patch
def test_holders_count_in_the_cell_budget(tiny_base, adapters):
    """A holder's cells count like sequence 0's: admission never promises cells held by one."""
    e = Engine(str(tiny_base), n_ctx=1024, n_threads=1, prompt_cache_mb=0)
    try:
        for n in ("a", "b"):
            e.load_adapter(str(adapters[n]), name=n)
        asks = [e.tokenize(p) for p in _asks(4)]
        with e.batch("a") as cb:
            cb.add(asks[0], max_tokens=40)
            cb.add(asks[1], max_tokens=40, adapter="b")
            held = cb._held()
            assert held >= 2 * (len(asks[0]) - 2)
            shared = cb._shared(asks[2], (("b", 1.0),))
            assert shared >= len(cb.tokenize(SYSTEM))          # it would share b's holder
            most = 1024 - held - cb._reserved - (len(asks[2]) - shared)
            assert cb.fits(asks[2], most, "b") and not cb.fits(asks[2], most + 1, "b")
            while cb.answers:
                cb.step()
    finally:
        e.close()


@needs_patch
def test_a_new_scale_value_is_never_served_by_the_previous_graph(eng, raw):
    """One nonzero per-sequence scale is baked into the graph (rows switched on and off): a new
    value, the same batch shape otherwise, must rebuild it rather than reuse the old one."""
    b = raw
    ha, hb = eng._adapters["a"].handle, eng._adapters["b"].handle
    toks = [eng.tokenize(p) for p in PROMPTS[:2]]
    tokens, pos = toks[0] + toks[1], list(range(len(toks[0]))) + list(range(len(toks[1])))
    seqs = [1] * len(toks[0]) + [2] * len(toks[1])
    want = [True] * len(tokens)
    scales = (1.0, 0.5, 0.25, 1.0)
    alone = [_rows(b, [ha], [s], tokens, pos, seqs, want) for s in scales]
    b.set_adapters([ha, hb], [1.0, 1.0])
    b.set_adapter_seq_scales(hb, [0, 0, 1.0])
    for s, ref in zip(scales, alone):       # only the value changes between these decodes
        b.set_adapter_seq_scales(ha, [0, s, 0])
        b.memory_clear()
        b.decode_seqs(tokens, pos, seqs, want)
        assert all(np.array_equal(b.logits_at(i), ref[i]) for i in range(len(toks[0]))), s


@needs_patch
@pytest.mark.slow
def test_shipped_adapters_mixed_in_one_batch_agree_with_run(base_path):
    """The real base and three shipped task adapters, their requests interleaved in one batch
    (each under its card's prompt, grammar and limits): the answers are the ones `run` gives
    alone, within the batched-kernel bound run_many has (at most one differs), and all parse."""
    texts = {"sentiment": ["Shares fell 5% after the report.", "Profit rose sharply in the third quarter."],
             "ner": ["Angela Merkel visited Paris.", "Tim Cook met Joe Biden in Washington."],
             "classification": ["my card got declined at the store", "how do I change my pin number"]}
    with Engine(str(base_path), n_ctx=2048, n_threads=2) as e:
        jobs = []
        for name, ts in texts.items():
            e.load_adapter(name)
            task = e.task_for(name)
            for t in ts:
                toks = e.tokenize(e.chat_prompt(task.messages(t, system=True, shots=0)))
                jobs.append((name, task, toks, e.run(t, adapter=name)))
        steps = e.stats.mixed_steps
        with e.batch("sentiment") as cb:
            got = [cb.add(toks, adapter=name, max_tokens=task.max_tokens, stop=task.stop,
                          temperature=task.temperature, grammar=task.output.grammar())
                   for name, task, toks, _ in jobs[::2] + jobs[1::2]]
            while cb.answers:
                cb.step()
        assert e.stats.mixed_steps - steps >= 3
        solo = [j[3] for j in jobs[::2] + jobs[1::2]]
        same = sum(a.gen.text == s.text for a, s in zip(got, solo))
        assert same >= len(got) - 1, [(a.gen.text, s.text) for a, s in zip(got, solo)]
        tasks = [j[1] for j in jobs[::2] + jobs[1::2]]
        assert all(t.output.parse(a.gen.text) is not None for t, a in zip(tasks, got))


@pytest.mark.skipif(_llama.patch_level() < 5, reason="needs llama.cpp built with cmake/patches 0004 (setup.sh)")
def test_decode_steps_fuse_lora_token_by_token_and_mixed_rows_stay_exact(eng, raw):
    """A batch's decode step (`step=True`, at most 64 rows) computes each adapter's LoRA products
    token by token with the single-token kernels (patch 0004): the fusion engages (the CPU
    backend counts fused chains), the logits stay within rounding of llama.cpp's graph ops, and a
    mixed step's rows still equal the same rows under their own set alone."""
    b = raw
    h = {n: eng._adapters[n].handle for n in ("a", "b", "c")}
    toks = [eng.tokenize(p)[:12] for p in PROMPTS[:3]]
    tokens = [t for ts in toks for t in ts]
    pos = [i for ts in toks for i in range(len(ts))]
    seqs = [s + 1 for s, ts in enumerate(toks) for _ in ts]
    want = [True] * len(tokens)
    per_seq = [(h["a"], [0, 1.0, 0, 0.5]), (h["b"], [0, 0, 1.0, 0]), (h["c"], [0, 0, 1.0, 0])]
    before = _llama.lora_fused_chains()
    mixed = _rows(b, list(h.values()), [1.0] * 3, tokens, pos, seqs, want, per_seq=per_seq, step=True)
    assert _llama.lora_fused_chains() - before >= 3 * 10      # every adapted matrix of the three adapters
    alone = [_rows(b, hs, sc, tokens, pos, seqs, want, step=True)
             for hs, sc in (([h["a"]], [1.0]), ([h["b"], h["c"]], [1.0, 1.0]), ([h["a"]], [0.5]))]
    for i, s in enumerate(seqs):
        assert np.array_equal(mixed[i], alone[s - 1][i]), (i, s)
    graph = _rows(b, list(h.values()), [1.0] * 3, tokens, pos, seqs, want, per_seq=per_seq)
    assert max(np.abs(graph[i] - mixed[i]).max() for i in mixed) < 1e-2


def test_run_many_answers_each_input_under_its_own_adapter(eng, adapters, tmp_path, tiny_base):
    """`run_many(texts, adapters=[...])`: one spec per input (a set, a mix, none), each answered as
    `run` answers it alone; on a build with patch 0003 in shared steps. `edgeft run --jsonl`
    batches waiting lines across adapters the same way."""
    texts = [f"request {i}: " + "y" * i for i in range(6)]
    specs = ["a", "b", None, {"a": 0.5, "c": 1.0}, "c", "a"]
    solo = [eng.run(t, adapter=s, max_tokens=10) for t, s in zip(texts, specs)]
    steps = eng.stats.mixed_steps
    many = eng.run_many(texts, adapters=specs, max_tokens=10)
    assert [g.text for g in many] == [g.text for g in solo]
    assert [g.adapters for g in many] == [g.adapters for g in solo]
    assert (eng.stats.mixed_steps > steps) == _llama.mixed_adapter_batches()
    with pytest.raises(InputError, match="one adapter spec per input"):
        eng.run_many(texts, adapters=specs[:2])
    lines = [json.dumps({"text": t, "adapter": str(adapters[s])}) for t, s in zip(texts[:3], ["a", "b", "c"])]
    r = subprocess.run([sys.executable, "-m", "edgeft", "run", "--base", str(tiny_base), "--jsonl", "--threads", "1",
                        "--max-tokens", "10"], input="\n".join(lines) + "\n", capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = [json.loads(x) for x in r.stdout.splitlines()]
    want = [eng.run(t, adapter=s, max_tokens=10).text for t, s in zip(texts[:3], ["a", "b", "c"])]
    assert [o["text"] for o in out] == want


@pytest.mark.skipif(not _llama.patches.batch_attention_own_cells(),
                    reason="needs llama.cpp built with cmake/patches 0006 (setup.sh)")
def test_a_batch_restores_a_prompt_only_under_the_set_that_computed_it(eng):
    """Batched answers keep their prompts' heads in the prompt cache under their own adapter set:
    the same prompts under another set restore nothing of them, and under the same set again
    they are restored; every answer equals its solo answer."""
    texts = [f"question {i}: " + "why " * i for i in range(4)]
    solo = {n: [eng.run(t, adapter=n, max_tokens=8).text for t in texts] for n in ("a", "b")}
    assert solo["a"] != solo["b"]
    eng.reset()                   # sequence 0's prompt goes to the cache, which is then emptied
    eng.prompt_cache.clear()
    restored = {}
    for i, name in enumerate(("a", "b", "a")):
        hits = eng.prompt_cache.stats.hits
        many = eng.run_many(texts, adapter=name, max_tokens=8)
        assert [g.text for g in many] == solo[name]
        restored[i] = eng.prompt_cache.stats.hits - hits
    assert restored[0] == 0 and restored[1] == 0       # b never restores what a computed
    assert restored[2] >= len(texts) - 1               # a restores its own
    keys = {e.key for e in eng.prompt_cache._entries.values()}
    assert {k[0][0] for k in keys} == {"a", "b"} and all(len(k) == 1 for k in keys)


@needs_patch
def test_random_joins_cancels_and_sets_keep_every_rule(tiny_base, adapters):
    """200 steps of random traffic in a small context: answers under 5 sets (some sharing a
    system prompt) join when `fits` says so, some are cancelled; llama_decode never runs out of
    cells, every answer ends with a known reason, the batch leaves no holder, and afterwards the
    engine answers as a fresh one under each set."""
    import random

    rng = random.Random(7)
    e = Engine(str(tiny_base), n_ctx=512, n_threads=1, parallel=6)
    try:
        for n, p in adapters.items():
            e.load_adapter(str(p), name=n)
        asks = [e.tokenize(p) for p in _asks(6) + PROMPTS[:4]]
        sets = ["a", "b", "c", {"a": 0.5, "c": 1.0}, None]
        answers, refused = [], 0
        with e.batch("a") as cb:
            for _ in range(200):
                if rng.random() < 0.5:
                    toks, s, mt = rng.choice(asks), rng.choice(sets), rng.randint(1, 80)
                    if cb.slots and cb.fits(toks, mt, s):
                        answers.append(cb.add(toks, max_tokens=mt, adapter=s, ignore_eos=rng.random() < 0.5))
                    elif cb.slots:
                        refused += 1        # no room for its cells: the context is really tight
                if cb.answers and rng.random() < 0.1:
                    rng.choice(cb.answers).cancel.set()
                cb.step()
                assert cb._held() + cb._reserved <= e.n_ctx
            while cb.answers:
                cb.step()
        assert not cb._holders and not e._busy
        assert len(answers) >= 30 and e.stats.mixed_steps > 20 and refused > 0
        assert {a.gen.finish_reason for a in answers} <= {"stop", "length", "cancelled"}
        assert any(a.gen.finish_reason == "cancelled" for a in answers)
        fresh = Engine(str(tiny_base), n_ctx=512, n_threads=1, prompt_cache_mb=0)
        try:
            for n, p in adapters.items():
                fresh.load_adapter(str(p), name=n)
            for s in sets:
                p = _asks(2)[1]
                assert e.complete(p, adapter=s, max_tokens=12).text == fresh.complete(p, adapter=s, max_tokens=12).text
        finally:
            fresh.close()
    finally:
        e.close()
