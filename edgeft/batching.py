"""Several requests under one adapter set, decoded together: one llama_decode per step carries
the next token of every unfinished answer (llama.cpp's multi-sequence batches), so a bulk job
(classify a CSV, `edgeft run --jsonl`) pays for the weights once per step instead of once per
answer. Each request keeps its own sampler, grammar, stop strings and max_tokens.

The requests' shared prompt prefix (a task card's system prompt and template head) is in
sequence 0 when the batch starts (the engine puts it there: reused, restored from the prompt
cache or prefilled); every other sequence shares its cells (`llama_memory_seq_cp`, no copy),
and only each request's own suffix is prefilled, all suffixes in one batch.

Exactness: the prompt K/V are what a request alone would reuse or compute (batched prefill in
both cases). Decode steps with two or more sequences run llama.cpp's batched matrix kernels,
which round differently from the single-token ones a request alone uses, so a greedy answer can
differ from the solo one where two candidates' logits are within that rounding; the bench and
the tests measure how often.
"""

from __future__ import annotations

import codecs
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from .generation import Generation


@dataclass
class BatchItem:
    """One request: its prompt tokens and how to answer it."""

    tokens: list[int]
    sampler: object            # _llama.Sampler
    max_tokens: int
    stop: list[str] = field(default_factory=list)


@dataclass
class _Seq:
    item: BatchItem
    seq: int
    gen: Generation
    pos: int = 0
    last: int = -1
    n: int = 0
    text: str = ""
    done: bool = False
    t0: float = 0.0
    t_first: float | None = None
    t_end: float = 0.0
    utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))


def decode_batch(b, items: Sequence[BatchItem], prefix: int, selection: dict, cancel: threading.Event,
                 reused: int = 0) -> list[Generation]:
    """Answer `items` together; sequence 0 holds the first `prefix` tokens (shared by all items,
    each longer than it) in the KV memory already. Leaves sequences 0..len(items)-1 in memory."""
    t0 = time.perf_counter()
    seqs = [_Seq(it, i, Generation("", "length", len(it.tokens), 0, 0.0, 0.0, dict(selection),
                                   reused_prefix=reused), pos=prefix, t0=t0) for i, it in enumerate(items)]
    for s in seqs[1:]:
        b.memory_seq_copy(0, s.seq)
    _prefill(b, seqs, prefix, cancel)
    while not cancel.is_set():
        live = [s for s in seqs if not s.done]
        if not live:
            break
        b.decode_seqs([s.last for s in live], [s.pos for s in live], [s.seq for s in live], [True] * len(live))
        for row, s in enumerate(live):
            s.pos += 1
            _step(b, s, row)
    for s in seqs:
        _finish(s, cancel)
    return [s.gen for s in seqs]


def _prefill(b, seqs: list[_Seq], prefix: int, cancel: threading.Event) -> None:
    """Every suffix, in chunks of at most n_batch tokens; each sequence samples its first token
    right after the chunk holding its last prompt token (its logits are valid only until then)."""
    rows: list[tuple[int, int, int, bool, _Seq | None]] = []
    for s in seqs:
        suffix = s.item.tokens[prefix:]
        for j, tok in enumerate(suffix):
            last = j == len(suffix) - 1
            rows.append((tok, prefix + j, s.seq, last, s if last else None))
    for i in range(0, len(rows), b.n_batch):
        chunk = rows[i:i + b.n_batch]
        b.decode_seqs([r[0] for r in chunk], [r[1] for r in chunk], [r[2] for r in chunk], [r[3] for r in chunk])
        for row, r in enumerate(chunk):
            s = r[4]
            if s is not None:
                s.pos = len(s.item.tokens)
                if s.item.max_tokens <= 0 or cancel.is_set():
                    s.done = True
                else:
                    _step(b, s, row)


def _step(b, s: _Seq, row: int) -> None:
    """Sample the next token of `s` from batch row `row`; end it on EOG, a stop string or max_tokens."""
    tok = s.item.sampler.sample(b.ctx, b.logits_at(row), row)
    if s.t_first is None:
        s.t_first = time.perf_counter()
        s.gen.ttft_ms = (s.t_first - s.t0) * 1e3
    if b.is_eog(tok):
        s.gen.finish_reason, s.done, s.t_end = "stop", True, time.perf_counter()
        return
    s.n += 1
    s.text += s.utf8.decode(b.piece(tok))
    stop = s.item.stop
    if stop:
        cut = min((i for i in (s.text.find(x) for x in stop) if i >= 0), default=-1)
        if cut >= 0:
            s.text = s.text[:cut]
            s.gen.finish_reason, s.done, s.t_end = "stop", True, time.perf_counter()
            return
    if s.n >= s.item.max_tokens:
        s.done, s.t_end = True, time.perf_counter()
        return
    s.last = tok


def _finish(s: _Seq, cancel: threading.Event) -> None:
    if cancel.is_set() and s.gen.finish_reason == "length" and s.n < s.item.max_tokens:
        s.gen.finish_reason = "cancelled"   # stopped before its answer was complete
    s.gen.text = s.text + s.utf8.decode(b"", final=True)
    s.gen.completion_tokens = s.n
    if s.t_first is not None and s.n > 1:
        s.gen.decode_tps = (s.n - 1) / max((s.t_end or time.perf_counter()) - s.t_first, 1e-9)


def common_prefix_all(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the prefix every sequence shares."""
    if not seqs:
        return 0
    n = min(len(x) for x in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(x[i] != t for x in seqs):
            return i
    return n
