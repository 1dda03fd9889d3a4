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
import numbers
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from . import _llama
from .adapter_spec import UNSET, AdapterSpec
from .errors import InputError
from .generation import Generation
from .prompt_cache import MIN_REUSE, common_prefix

if TYPE_CHECKING:
    from .tasks import TaskSpec

_SAMPLING = {"temperature", "top_p", "top_k", "min_p", "seed", "grammar"}


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


class BatchMethods:
    """Engine's bulk methods (Engine inherits them): they use its lock, adapter set and KV state."""

    def run_many(self, texts: Sequence[str], *, adapter: AdapterSpec = UNSET, shots: int = 0,
                 system: str | None | bool = True, task: "TaskSpec | None" = None,
                 cancel: threading.Event | None = None, **gen: Any) -> list[Generation]:
        """`run` for many inputs under one adapter set, up to n_seq_max answers decoded together
        per llama_decode (edgeft/batching.py): for bulk jobs. Answers come back in input order."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise InputError("empty input in the batch", "every input needs some text")
        gen = {k: v for k, v in gen.items() if v is not None}
        if task is None:
            task = self.task_for(adapter)
        opts = dict(gen)
        if task is not None:
            opts = {"max_tokens": task.max_tokens, "temperature": task.temperature, "stop": task.stop,
                    "grammar": task.output.grammar(), **gen}
            prompts = [self.chat_prompt(task.messages(t, system=system, shots=shots)) for t in texts]
        else:
            prompts = [self.chat_prompt([{"role": "user", "content": t}]) for t in texts]
        results = self.complete_many(prompts, adapter=adapter, cancel=cancel, **opts)
        if task is not None:
            for r in results:
                try:
                    r.value = task.output.parse(r.text)
                except InputError:
                    r.value = None
        return results

    def complete_many(self, prompts: Sequence[str], *, adapter: AdapterSpec = UNSET, max_tokens: int = 256,
                      stop: Sequence[str] = (), cancel: threading.Event | None = None, **sampling: Any) -> list[Generation]:
        """`complete` for many raw prompts under one adapter set, decoded together (see run_many).
        `sampling`: temperature, top_p, top_k, min_p, seed, grammar (one value for all)."""
        prompts = list(prompts)
        for p in prompts:
            if not isinstance(p, str) or not p:
                raise InputError("empty prompt in the batch", "every prompt needs some text")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 0:
            raise InputError(f"max_tokens must be a whole number >= 0, got {max_tokens!r}")
        unknown = set(sampling) - _SAMPLING
        if unknown:
            raise InputError(f"unknown option(s) for a batch: {', '.join(sorted(unknown))}")
        if not prompts:
            return []
        return self._generate_many(prompts, adapter, _llama.Sampling(**sampling), int(max_tokens), list(stop or []),
                                   cancel if cancel is not None else threading.Event())

    def _generate_many(self, prompts: list[str], adapter: AdapterSpec, sampling: _llama.Sampling,
                       max_tokens: int, stop: list[str], cancel: threading.Event) -> list[Generation]:
        with self._lock:
            selection = self._selected if adapter is UNSET else self._resolve(adapter)
            toks = [self._b.tokenize(p, add_special=True, parse_special=True) for p in prompts]
            for t in toks:
                if len(t) >= self.n_ctx:
                    raise InputError(f"a prompt has {len(t)} tokens; the context holds {self.n_ctx}",
                                     "shorten the input or raise --ctx")
            self._apply(selection)
            out: list[Generation] = []
            for group in group_requests(toks, max_tokens, self._b.n_seq_max, self.n_ctx):
                items = [BatchItem(toks[i], self._b.sampler(sampling), max(0, min(max_tokens, self.n_ctx - len(toks[i]))), stop)
                         for i in group]
                try:
                    if len(items) == 1:   # alone: the exact single-request path
                        sink: list[Generation] = []
                        for _ in self._loop(items[0].tokens, items[0].sampler, items[0].max_tokens, stop,
                                            dict(selection), sink, cancel):
                            pass
                        out.extend(sink)
                        continue
                    p = common_prefix_all([it.tokens for it in items])
                    p = min(p, min(len(it.tokens) for it in items) - 2)
                    reused = self._place_prefix(items[0].tokens[:p] if p >= MIN_REUSE else [])
                    p = len(self._kv_tokens)
                    out.extend(decode_batch(self._b, items, p, selection, cancel, reused))
                    for i in range(1, len(items)):
                        self._b.memory_seq_drop(i)
                    if not self._b.memory_seq_drop(0, p):
                        self._invalidate_kv()
                except BaseException:
                    self._invalidate_kv()
                    raise
                finally:
                    for it in items:
                        it.sampler.close()
            return out

    def _place_prefix(self, prefix: list[int]) -> int:
        """Put `prefix` (K/V from a batched decode) in sequence 0 and nothing else in memory:
        reused from memory, restored from the prompt cache, or prefilled; returns the tokens
        that were not computed again."""
        keep = min(common_prefix(self._kv_tokens, prefix), self._kv_batched)
        if len(prefix) - keep == 1:
            keep -= 1                     # never decode a single token: batch-of-1 kernels round otherwise
        if keep <= 0 or not self._b.memory_truncate(keep):
            self._b.memory_clear()
            keep = 0
        if prefix and self.prompt_cache.enabled and len(prefix) >= keep + MIN_REUSE:
            restored = self._restore_prompt(prefix, len(prefix), keep)
            if restored is not None:
                keep = restored
                if len(prefix) - keep == 1 and not self._b.memory_truncate(keep - 1):
                    self._b.memory_clear()
                    keep = 0
                elif len(prefix) - keep == 1:
                    keep -= 1
        self._kv_tokens, self._kv_batched = prefix[:keep], keep
        if len(prefix) > keep:
            self._b.decode(prefix[keep:])
        self._kv_tokens, self._kv_batched = list(prefix), len(prefix)
        return keep


def group_requests(toks: list[list[int]], max_tokens: int, n_seq: int, n_ctx: int) -> Iterator[list[int]]:
    """Consecutive requests, at most n_seq at a time, whose prompts and answers fit the context
    together (counted without the shared prefix, so always enough room)."""
    group: list[int] = []
    cells = 0
    for i, t in enumerate(toks):
        need = len(t) + max(0, min(max_tokens, n_ctx - len(t)))
        if group and (len(group) >= n_seq or cells + need > n_ctx):
            yield group
            group, cells = [], 0
        group.append(i)
        cells += need
    if group:
        yield group

