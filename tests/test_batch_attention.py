"""Attention of a batch's decode steps over each row's own KV cells (patch 0006).

All answers of a batch share one KV buffer; without the patch each row's attention runs over
every cell of it and a mask hides the other answers' cells. With it, a step of several sequences
(`decode_seqs(step=True)`) computes each row over the cells its mask lets it see. The rows must
match llama.cpp's own ops within rounding, a lone sequence must keep llama.cpp's ops bit for bit,
and the fusion must engage where it is meant to."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft import _llama
from edgeft._llama import patches
from edgeft.gguf_info import base_info

pytestmark = pytest.mark.skipif(_llama.patch_level() < 7,
                                reason="needs llama.cpp built with cmake/patches 0006 (setup.sh)")

PROMPTS = [f"<|im_start|>user\nquestion {i}: " + "why " * (i % 4) + "<|im_end|>\n<|im_start|>assistant\n"
           for i in range(4)]


def _step(b, tokens, pos, seqs, *, attention: bool, keep: bool = False) -> tuple[list[np.ndarray], int]:
    """One step (`step=True`: LoRA token by token, patch 0004) with the attention fusion on or
    off; the logits of every row and how many layers ran the fused attention."""
    if not keep:
        b.memory_clear()
    b._step_fusions(True)
    patches.attn_rows_fn()(b.ctx, int(attention))
    before = _llama.attn_rows_fusions()
    try:
        b.decode_seqs(tokens, pos, seqs, [True] * len(tokens), step=True)
        return [b.logits_at(i).astype(np.float64) for i in range(len(tokens))], _llama.attn_rows_fusions() - before
    finally:
        patches.attn_rows_fn()(b.ctx, 1)     # as _step_fusions(True) left it


@pytest.fixture
def raw(tiny_engine):
    yield tiny_engine._b
    tiny_engine._b._step_fusions(False)
    tiny_engine._invalidate_kv()


def _layers(tiny_base) -> int:
    return sum(name.endswith(".attn_q.weight") for name in base_info(tiny_base).tensors)


def _prompts(eng, n):
    toks = [eng.tokenize(p)[:10 + 3 * i] for i, p in enumerate(PROMPTS[:n])]
    return ([t for ts in toks for t in ts], [i for ts in toks for i in range(len(ts))],
            [s + 1 for s, ts in enumerate(toks) for _ in ts], toks)


def test_a_step_of_several_sequences_attends_over_each_rows_own_cells(tiny_engine, tiny_base, raw):
    """Prompt rows of three sequences, then one decode row each (their cells now interleaved in
    the shared buffer): every layer runs the fused attention, and every row's logits equal
    llama.cpp's ops (K @ q, masked softmax, V @ P over all cells) within rounding."""
    tokens, pos, seqs, toks = _prompts(tiny_engine, 3)
    ref, n_ref = _step(raw, tokens, pos, seqs, attention=False)
    got, n_got = _step(raw, tokens, pos, seqs, attention=True)
    assert n_ref == 0 and n_got == _layers(tiny_base)
    scale = max(np.abs(r).max() for r in ref)
    for r, g in zip(ref, got):
        assert np.abs(r - g).max() <= 2e-3 * scale
        assert np.argmax(r) == np.argmax(g)

    # decode rows: each sequence's next cell lands after all prompt rows, beside the others'
    nxt = [int(np.argmax(ref[sum(len(t) for t in toks[:s + 1]) - 1])) for s in range(3)]
    dpos = [len(t) for t in toks]
    rows = {}
    for attention in (False, True):
        _step(raw, tokens, pos, seqs, attention=False)
        rows[attention], n = _step(raw, nxt, dpos, [1, 2, 3], attention=attention, keep=True)
        assert n == (_layers(tiny_base) if attention else 0)
    for r, g in zip(rows[False], rows[True]):
        assert np.abs(r - g).max() <= 2e-3 * scale
        assert np.argmax(r) == np.argmax(g)


def test_the_fused_attention_does_not_read_the_other_sequences_cells(tiny_engine, raw):
    """A row's result depends on its own cells only: changing every token of the other
    sequences leaves its logits bit for bit the same (a kernel that mixed up cells, heads or rows
    would not)."""
    tokens, pos, seqs, toks = _prompts(tiny_engine, 3)
    first, _ = _step(raw, tokens, pos, seqs, attention=True)
    n0 = len(toks[0])
    other = tokens[:n0] + [(t * 7 + 3) % 200 + 10 for t in tokens[n0:]]
    second, n = _step(raw, other, pos, seqs, attention=True)
    assert n > 0
    for i in range(n0):
        assert np.array_equal(first[i], second[i])
    assert any(not np.array_equal(first[i], second[i]) for i in range(n0, len(tokens)))


def test_a_lone_sequence_keeps_llama_cpps_ops_bit_for_bit(tiny_engine, raw):
    """One sequence in a step (and every single request) runs llama.cpp's own attention: the flag
    changes nothing there, so answers alone stay what they were."""
    tokens, pos, seqs, _ = _prompts(tiny_engine, 1)
    off, n_off = _step(raw, tokens, pos, seqs, attention=False)
    on, n_on = _step(raw, tokens, pos, seqs, attention=True)
    assert n_off == n_on == 0
    assert all(np.array_equal(a, b) for a, b in zip(off, on))
    assert "patch 0006" in _llama.api_names()["batch_attention"]      # what `edgeft doctor` shows
    before = _llama.attn_rows_fusions()
    tiny_engine.run("a single request", max_tokens=6)
    assert _llama.attn_rows_fusions() == before


def test_batched_answers_use_it_and_still_equal_their_solo_answers(tiny_engine):
    texts = [f"request number {i}: " + "x" * (i % 5) for i in range(6)]
    solo = [tiny_engine.run(t, max_tokens=12) for t in texts]
    before = _llama.attn_rows_fusions()
    many = tiny_engine.run_many(texts, max_tokens=12)
    assert _llama.attn_rows_fusions() > before
    assert [g.text for g in many] == [g.text for g in solo]
