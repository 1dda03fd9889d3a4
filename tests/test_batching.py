"""Engine.run_many and `edgeft run --jsonl`: several answers decoded in one llama_decode per step,
each with its own sampler, grammar, stop strings and max_tokens, in input order."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from edgeft import _llama
from edgeft.continuous import PREFIX_HOLDERS
from edgeft.errors import InputError
from edgeft.tasks import TaskSpec

LABELS = ["alpha", "beta", "gamma"]
CARD = TaskSpec.from_dict({"system": "Pick a label.", "template": "{input}",
                           "output": {"type": "labels", "labels": LABELS}, "max_tokens": 12})
TEXTS = [f"request number {i}: " + "x" * (i % 5) for i in range(11)]


def test_run_many_equals_run_one_by_one_on_the_tiny_base(tiny_engine, monkeypatch):
    solo = [tiny_engine.run(t, task=CARD) for t in TEXTS]
    b = tiny_engine._b
    calls = []
    real = b.decode_seqs
    monkeypatch.setattr(b, "decode_seqs", lambda toks, *a, **k: calls.append(len(toks)) or real(toks, *a, **k))
    many = tiny_engine.run_many(TEXTS, task=CARD)
    assert [g.text for g in many] == [g.text for g in solo]
    # really batched: one decode per step carries several answers' tokens
    assert max(calls) >= 8 and len(calls) < sum(g.completion_tokens for g in many)
    assert all(g.value in LABELS for g in many)          # each answer under its own grammar
    holders = PREFIX_HOLDERS if _llama.mixed_adapter_batches() else 0
    assert tiny_engine.parallel == 8 and tiny_engine.n_seq_max == 9 + holders   # 11 inputs: 8 at once, 3 join later
    free = [tiny_engine.chat([{"role": "user", "content": t}], max_tokens=6 + i) for i, t in enumerate(TEXTS[:5])]
    batch = tiny_engine.run_many(TEXTS[:5], max_tokens=6)
    assert [g.completion_tokens for g in batch] == [6] * 5 and [g.finish_reason for g in batch] == ["length"] * 5
    assert [g.text for g in batch] == [f.text[:len(g.text)] for f, g in zip(free, batch)]


def test_run_many_stop_strings_and_token_limits_are_per_answer(tiny_engine):
    texts = TEXTS[:4]
    plain = tiny_engine.run_many(texts, max_tokens=30)
    stops = [g.text[5:7] for g in plain]                  # a piece of each answer, 5 characters in
    got = tiny_engine.run_many(texts, max_tokens=30, stop=stops)
    for g, p in zip(got, plain):
        cut = min((i for i in (p.text.find(s) for s in stops) if i >= 0))
        assert g.text == p.text[:cut] and g.finish_reason == "stop"
    assert tiny_engine.run_many(texts, max_tokens=0)[0].text == ""


def test_run_many_keeps_the_kv_rules_after_it(tiny_engine, tmp_path):
    """After a batch, the engine's memory holds only the shared prefix: a request alone answers
    as a fresh engine does, under the same or another adapter set."""
    from edgeft import Engine
    from tests.helpers import write_adapter

    a = write_adapter(tmp_path / "a.gguf", tiny_engine.base.path, seed=3, b_std=0.05)
    with Engine(str(tiny_engine.base.path), n_ctx=4096, n_threads=1) as fresh:
        fresh.load_adapter(str(a), name="a")
        want = [fresh.run(t, task=CARD, adapter=a_) for t, a_ in ((TEXTS[0], "a"), (TEXTS[1], None))]
    with Engine(str(tiny_engine.base.path), n_ctx=4096, n_threads=1) as e:
        e.load_adapter(str(a), name="a")
        e.run_many(TEXTS, task=CARD, adapter="a")
        got = [e.run(TEXTS[0], task=CARD, adapter="a")]
        assert got[0].reused_prefix > 5                      # the card's prefix, left by the batch
        e.run_many(TEXTS[:3], task=CARD)                     # the base: a swap in between
        got.append(e.run(TEXTS[1], task=CARD, adapter=None))
    assert [g.text for g in got] == [g.text for g in want]


def test_run_many_refuses_bad_input_and_can_be_cancelled(tiny_engine):
    with pytest.raises(InputError, match="empty input"):
        tiny_engine.run_many(["fine", "  "])
    with pytest.raises(InputError, match="max_tokens"):
        tiny_engine.run_many(["fine"], max_tokens=-1)
    with pytest.raises(InputError, match="unknown option"):
        tiny_engine.run_many(["fine", "also"], colour="red")
    with pytest.raises(InputError, match="context holds"):
        tiny_engine.run_many(["fine", "word " * 5000])
    cancel = threading.Event()
    cancel.set()
    got = tiny_engine.run_many(TEXTS[:3], max_tokens=50, cancel=cancel)
    assert [g.finish_reason for g in got] == ["cancelled"] * 3 and all(g.completion_tokens == 0 for g in got)
    assert tiny_engine.run_many([]) == []


def test_async_run_many_answers_as_the_sync_one(tiny_engine):
    import asyncio

    from edgeft import AsyncEngine

    async def main():
        return await AsyncEngine.wrap(tiny_engine).run_many(TEXTS[:4], task=CARD)

    assert [g.text for g in asyncio.run(main())] == [g.text for g in tiny_engine.run_many(TEXTS[:4], task=CARD)]


def test_engine_refuses_a_bad_parallel(tiny_base):
    from edgeft import Engine

    for bad in (-1, 64, 2.5, True):
        with pytest.raises(InputError, match="parallel"):
            Engine(str(tiny_base), parallel=bad)


def test_jsonl_batches_waiting_lines_and_keeps_order_and_errors(tiny_base, tmp_path):
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS[:5])]
    lines.insert(2, "not json")
    lines.append(json.dumps({"text": "word " * 5000}))     # too long for the context: its own error
    lines.append(json.dumps({"text": TEXTS[5], "max_tokens": 3}))
    r = subprocess.run([sys.executable, "-m", "edgeft", "run", "--base", str(tiny_base), "--jsonl", "--threads", "1",
                        "--max-tokens", "8"], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "2 line(s) failed" in r.stderr
    out = [json.loads(x) for x in r.stdout.splitlines()]
    assert [o["line"] for o in out] == list(range(1, 9))
    assert "invalid JSON" in out[2]["error"] and "context holds" in out[6]["error"]
    assert [o.get("id") for o in out[:2] + out[3:6]] == [0, 1, 2, 3, 4]
    assert all(o["completion_tokens"] == 8 for o in out[:2] + out[3:6]) and out[7]["completion_tokens"] == 3
    from edgeft import Engine

    with Engine(str(tiny_base), n_ctx=2048, n_threads=1) as e:
        assert [o["text"] for o in out[:2] + out[3:6]] == [
            e.chat([{"role": "user", "content": t}], max_tokens=8).text for t in TEXTS[:5]]


@pytest.mark.slow
def test_run_many_agrees_with_run_on_the_real_base(base_path):
    """Decode steps of two or more answers use llama.cpp's batched kernels, which round
    differently from single-token decoding: on the shipped adapters' answers the greedy text
    agrees here (the bench reports the rate on more inputs)."""
    from edgeft import Engine

    texts = ["Shares fell 5% after the report.", "Profit rose sharply in the third quarter.",
             "The company kept its outlook unchanged.", "Sales were flat.", "Angela Merkel visited Paris.",
             "Apple opened a store in Berlin.", "Tim Cook met Joe Biden in Washington.", "The Louvre is in Paris."]
    with Engine(str(base_path), n_ctx=2048, n_threads=2) as e:
        for name in ("sentiment", "ner"):
            e.load_adapter(name)
            solo = [e.run(t, adapter=name) for t in texts]
            many = e.run_many(texts, adapter=name)
            same = sum(a.text == b.text for a, b in zip(solo, many))
            assert same >= len(texts) - 1, (name, [(a.text, b.text) for a, b in zip(solo, many)])
            assert all(b.value is not None for b in many)
