"""Continuous batching: answers under one adapter set decoded together, joining and leaving
between steps, so a server or a bulk job pays for the weights once per step instead of once
per answer.

Sequence 0 holds a prompt prefix (the engine's reusable prompt K/V) and is never an answer. Each
answer decodes in its own sequence 1..n_seq_max-1: it shares the positions it has in common
with sequence 0 (`llama_memory_seq_cp` over that range: cells shared, no K/V computed or copied)
and prefills only the rest. One `step()` is one `llama_decode` carrying the next token of every
decoding answer and the prompt rows of answers that joined (at most n_batch rows); an answer
samples its first token from the step that held its last prompt row. Each answer keeps its own
sampler (grammar), stop strings, max_tokens and cancel event; a finished or cancelled answer
frees its sequence and cells at once, so a waiting request can join at the next step.

With the prompt cache on and patch 0006 (`_llama.patches.batch_attention_own_cells()`: a step's
attention then depends on the order of an answer's cells, not on where they sit, so cells
restored elsewhere give the same sums), the prompts of answers that joined are prefilled apart, in
decodes of their own before the next step (`_prefill_apart`: llama.cpp's ops, no step fusions,
as a single request prefills), and each answer's head (all but its last two prompt tokens) goes
to the prompt cache when it ends. A later answer whose prompt the cache holds beyond what it
shares with its set's prefix restores it into cells of its own and decodes two tokens: a
request seen before skips its prompt, under the set that computed it only.

The single-request path's rules hold here too: only K/V computed by batched decodes are shared
(generated tokens never are), a prompt suffix is never decoded as a lone token, and sequence 0
changes only while no answer depends on it, which keeps the cell reservation exact: an answer
is admitted only when its own prompt part and max_tokens fit beside the others.

Answers under different adapter sets share a batch too when the build carries patch 0003
(`_llama.mixed_adapter_batches()`): a step whose rows belong to two or more sets applies the
union of their adapters, each with per-sequence scales (0 where a sequence does not use it), so
every row gets exactly its own set's product (bit for bit: the same products multiplied by the
same float). Sequence 0 holds the prefix of one set, the batch's home set (`Engine._applied`);
the first answer of another set gives its set a prefix holder of its own (one of
PREFIX_HOLDERS extra sequences, restored from the prompt cache or prefilled), which the set's
later answers share. A holder whose set has no answer left stays until its cells or its
sequence are needed, or the batch ends; its K/V then go to the prompt cache.
A step whose rows all use one set runs that set alone (no per-sequence scales; single-row steps
keep the fused decode).

Exactness: an answer alone in the batch runs the same kernels as `Engine.complete`; steps with
two or more rows use llama.cpp's batched kernels, which round differently, so a greedy answer
can differ from its solo one where two candidates' logits are within that rounding.
"""

from __future__ import annotations

import codecs
import numbers
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from . import _llama
from .adapter_spec import UNSET, AdapterSpec
from .errors import EdgeftError, InputError
from .generation import Generation
from .prompt_cache import MIN_REUSE, common_prefix

if TYPE_CHECKING:
    from .engine import Engine

_SAMPLING = {"temperature", "top_p", "top_k", "min_p", "seed", "grammar"}
PREFIX_HOLDERS = 3     # extra sequences holding the prompt prefix of sets other than the home set


@dataclass
class _Holder:
    """A sequence holding the shared prompt prefix of one adapter set (not the home set)."""

    seq: int
    tokens: list[int]


@dataclass(eq=False)
class Answer:
    """One request in a ContinuousBatch: its prompt, progress and (in `gen`) its result."""

    tokens: list[int]
    max_tokens: int
    stop: list[str]
    seq: int
    gen: Generation
    cancel: threading.Event
    key: tuple = ()                    # its adapter set: ((name, scale), ...) sorted, as Engine._applied
    sampler: object = None             # _llama.Sampler, closed when the answer ends
    todo: int = 0                      # next prompt position to prefill
    pos: int = 0                       # position of the next token to decode
    last: int = -1                     # last sampled token, decoded at the next step
    n: int = 0
    text: str = ""
    emitted: int = 0
    started: bool = False              # first token sampled (or the answer ended before one)
    done: bool = False
    t0: float = 0.0
    t_first: float | None = None
    t_end: float = 0.0
    reserved: int = 0                  # KV cells promised to this answer
    apart: bool = False                # its prompt is prefilled apart from the steps (_prefill_apart)
    save: bool = False                 # it computes prompt K/V that the prompt cache keeps when it ends
    ignore_eos: bool = False
    error: Exception | None = None     # why it ended with finish_reason "error"
    utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    def take(self) -> str:
        """Text generated since the last call that is safe to show: while the answer runs, the
        tail that could still become a stop string is held back."""
        hold = 0 if self.done else max((len(s) for s in self.stop), default=1) - 1
        safe = len(self.text) - hold
        if safe <= self.emitted:
            return ""
        piece = self.text[self.emitted:safe]
        self.emitted = safe
        return piece


class ContinuousBatch:
    """Answers under one or (with patch 0003) several adapter sets; made by `Engine.batch()`,
    which holds the engine's lock for its life. `add()` admits a request, `step()` advances all
    of them."""

    def __init__(self, engine: "Engine", selection: dict[str, float], mixed: bool = True):
        if engine._b.n_seq_max < 2:
            raise InputError("this engine decodes one sequence at a time (n_seq_max=1)",
                             "make the Engine with n_seq_max >= 2 to batch answers")
        self._e = engine
        self._b = engine._b
        self.selection = dict(selection)    # the set of an answer added without `adapter`
        self.mixed = bool(mixed) and _llama.mixed_adapter_batches()
        self.answers: list[Answer] = []
        self._free = list(range(engine.parallel, 0, -1))
        self._holder_seqs = list(range(self._b.n_seq_max - 1, engine.parallel, -1)) if self.mixed else []
        self._holders: dict[tuple, _Holder] = {}
        self._reserved = 0
        self._config: tuple = engine._applied   # what the context applies now (see _configure)
        self._seq_scales: dict[str, list[float]] = {}
        # prompts prefilled apart and restored from the prompt cache (see the module's docstring):
        # only where a step's attention does not depend on where an answer's cells sit
        self._apart = engine.prompt_cache.enabled and _llama.patches.batch_attention_own_cells()

    # -- adapter sets -------------------------------------------------------------------------
    def resolve(self, adapter: AdapterSpec = UNSET) -> dict[str, float]:
        """An adapter spec as {name: scale}, loading what is missing (inside the batch: adapters
        that running answers use are never evicted for it)."""
        if adapter is UNSET:
            return dict(self.selection)
        return self._e._resolve(adapter)

    def accepts(self, selection: dict[str, float]) -> bool:
        """Whether an answer under `selection` can join now: its set is the home set, the batch
        is empty (the home set moves to it), or this build mixes sets in one batch."""
        return self.mixed or not self.answers or _key(selection) == self._e._applied

    # -- admission --------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        """Answers that can still join now (free sequences)."""
        return len(self._free)

    def _source(self, key: tuple) -> tuple[int, list[int], int]:
        """(sequence, its tokens, how many of them may be shared) holding `key`'s prompt prefix;
        sequence -1 when none does."""
        e = self._e
        if key == e._applied:
            return 0, e._kv_tokens, e._kv_batched
        h = self._holders.get(key)
        return (h.seq, h.tokens, len(h.tokens)) if h else (-1, [], 0)

    def _shared(self, tokens: Sequence[int], key: tuple) -> int:
        seq, held, usable = self._source(key)
        return max(0, min(common_prefix(held, tokens), usable, len(tokens) - 2)) if seq >= 0 else 0

    def _plan(self, tokens: Sequence[int], max_tokens: int, key: tuple) -> tuple[int, int]:
        """(shared, restored): prompt tokens a new answer under `key` shares with its set's
        prefix holder (cells in common), or restores from the prompt cache into cells of its own
        (a prompt seen before: the cache holds MIN_REUSE or more tokens beyond the shared ones,
        and the cells for the whole prompt are free). One of the two is 0."""
        keep = self._shared(tokens, key)
        e = self._e
        if not self._apart or not self.answers:
            return keep, 0
        n = e.prompt_cache.longest(e._set_key(key), tokens, max(0, len(tokens) - 2))
        if n - keep >= MIN_REUSE and \
                self._held(key) + self._reserved + len(tokens) + self._limit(tokens, max_tokens) <= e.n_ctx:
            return 0, n
        return keep, 0

    def _need(self, tokens: Sequence[int], max_tokens: int, key: tuple) -> int:
        """KV cells an answer under `key` takes beside what it shares: its prompt part and answer."""
        return len(tokens) - self._plan(tokens, max_tokens, key)[0] + self._limit(tokens, max_tokens)

    def _held(self, key: tuple | None = None) -> int:
        """KV cells held by prefix holders (sequence 0 and the other sets'); with `key`, not
        counting the idle holders that an answer under `key` would release."""
        idle = set(self._idle()) - {key} if key is not None else set()
        return len(self._e._kv_tokens) + sum(len(h.tokens) for k, h in self._holders.items() if k not in idle)

    def _idle(self) -> list[tuple]:
        """Holders whose set has no answer in the batch (nothing shares them)."""
        return [k for k in self._holders if all(a.key != k for a in self.answers)]

    def _limit(self, tokens: Sequence[int], max_tokens: int) -> int:
        return max(0, min(int(max_tokens), self._e.n_ctx - len(tokens)))

    def fits(self, tokens: Sequence[int], max_tokens: int, adapter: AdapterSpec = UNSET) -> bool:
        """Whether a request can join now: a free sequence, an adapter set the batch can take
        (`accepts`), and cells for its own prompt part and answer beside what the others hold
        (a lone request always fits: max_tokens is cut to the context, as for a single one)."""
        return self._fits(tokens, max_tokens, self.resolve(adapter) if self.answers else {})

    def _fits(self, tokens: Sequence[int], max_tokens: int, selection: dict[str, float]) -> bool:
        if not self._free or len(tokens) >= self._e.n_ctx:
            return False
        if not self.answers:
            return True
        key = _key(selection)
        return self.accepts(selection) and \
            self._held(key) + self._reserved + self._need(tokens, max_tokens, key) <= self._e.n_ctx

    def add(self, tokens: Sequence[int], *, max_tokens: int = 256, stop: Sequence[str] = (),
            cancel: threading.Event | None = None, ignore_eos: bool = False, adapter: AdapterSpec = UNSET,
            **sampling: Any) -> Answer:
        """Admit a request (check `fits` first); its prompt is prefilled by the next steps.
        `adapter`: its adapter set (the batch's by default; another one needs `accepts`).
        `sampling`: temperature, top_p, top_k, min_p, seed, grammar (checked here); `ignore_eos`
        masks end-of-generation tokens, so the answer runs to max_tokens or a stop string
        (benchmarks)."""
        unknown = set(sampling) - _SAMPLING
        if unknown:
            raise InputError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        values = _llama.Sampling(**sampling)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 0:
            raise InputError(f"max_tokens must be a whole number >= 0, got {max_tokens!r}")
        tokens = list(tokens)
        if not tokens:
            raise InputError("empty prompt", "give some text")
        if len(tokens) >= self._e.n_ctx:
            raise InputError(f"the prompt has {len(tokens)} tokens; the context holds {self._e.n_ctx}",
                             "shorten the input or raise --ctx")
        selection = self.resolve(adapter)
        if not self.accepts(selection):
            raise InputError("this llama.cpp build decodes one adapter set per batch (no patch 0003)",
                             "wait for the batch to end, or rebuild with ./setup.sh")
        if not self._fits(tokens, max_tokens, selection):
            raise InputError("no room in the batch for this request", "wait for an answer to finish")
        t0 = time.perf_counter()
        e, b = self._e, self._b
        key = _key(selection)
        sampler = b.sampler(values)      # a grammar that does not parse fails here, before any work
        try:
            reused = self._place(key, selection, tokens, max_tokens)
        except BaseException:
            sampler.close()
            raise
        limit = self._limit(tokens, max_tokens)
        keep, restore = self._plan(tokens, max_tokens, key)
        seq = self._free.pop()
        todo = restore and self._restore(key, tokens, len(tokens) - 2, seq)
        if todo:
            reused = todo
        else:
            keep = self._shared(tokens, key)
            todo = keep
            if reused is None:
                reused = keep
            if keep:
                b.memory_seq_copy(self._source(key)[0], seq, 0, keep)
        a = Answer(tokens, limit, list(stop or []), seq,
                   Generation("", "length", len(tokens), 0, 0.0, 0.0, dict(selection), reused_prefix=reused),
                   cancel if cancel is not None else threading.Event(), key, sampler, todo=todo, pos=todo, t0=t0,
                   reserved=len(tokens) - keep + limit, ignore_eos=bool(ignore_eos),
                   apart=self._apart, save=self._apart and todo < len(tokens) - 2)
        self._reserved += a.reserved
        self.answers.append(a)
        self._pin()
        return a

    def _place(self, key: tuple, selection: dict[str, float], tokens: list[int], max_tokens: int) -> int | None:
        """Make the prompt prefix that a new answer under `key` will share ready: sequence 0
        (the batch is empty: the home set moves to `key`) or `key`'s holder; returns the prefix
        tokens not computed now, or None when nothing was placed."""
        e = self._e
        if not self.answers:   # nothing depends on sequence 0: give it this set and prompt head
            for k in list(self._holders):
                self._release(k)
            self._configure({e._applied})
            e._apply(selection)
            self._config = e._applied
            return e._place_prefix(tokens[:max(0, len(tokens) - 2)])
        if self._held() > self._held(key):   # idle holders whose cells this answer needs go first
            if self._held() + self._reserved + self._need(tokens, max_tokens, key) > e.n_ctx:
                for k in self._idle():
                    if k != key:
                        self._release(k)
        if key != e._applied and key not in self._holders:
            return self._hold(key, tokens[:len(tokens) - 2])
        return None

    def _restore(self, key: tuple, tokens: list[int], usable: int, seq: int) -> int:
        """Restore the prompt cache's best entry for `tokens` under `key` into `seq` (cells of its
        own), at most `usable` tokens and never all but one; returns the prompt tokens now
        there, 0 when nothing was restored."""
        e, b = self._e, self._b
        if not e.prompt_cache.enabled:
            return 0
        hit = e.prompt_cache.best(e._set_key(key), tokens, max(0, usable), at_least=MIN_REUSE)
        if hit is None:
            return 0
        state, _, n = hit
        if len(tokens) - n == 1:
            n -= 1       # the rest is never one prompt token decoded alone
        if b.state_restore(state, seq=seq) and b.memory_seq_drop(seq, n):
            return n
        b.memory_seq_drop(seq)
        return 0

    def _save_head(self, a: Answer) -> None:
        """Keep an ended answer's prompt head, all but its last two prompt tokens (K/V from the
        prefill apart, never from a step), in the prompt cache for the next request with that
        prompt under that set: that request then decodes two tokens, never one alone."""
        e, b = self._e, self._b
        n = len(a.tokens) - 2
        if not e.prompt_cache.enabled or n < MIN_REUSE or not b.memory_seq_drop(a.seq, n):
            return
        state = b.state_save(e.prompt_cache.budget_bytes, seq=a.seq)
        if state is not None:
            e.prompt_cache.put(e._set_key(a.key), a.tokens[:n], state)

    # -- decoding ---------------------------------------------------------------------------
    def _prefill_apart(self, pending: list[Answer]) -> list[Answer]:
        """The prompts of answers that joined, in decodes of their own with llama.cpp's ops (no
        step fusions), as a single request prefills its prompt: their first tokens come from
        these logits, and their heads (all but the last two prompt tokens) are K/V that the
        prompt cache keeps when the answer ends, for a later request with that prompt."""
        self._configure({a.key for a in self.answers})
        rows = [(a.tokens[j], j, a.seq, j == len(a.tokens) - 1, a if j == len(a.tokens) - 1 else None)
                for a in pending for j in range(a.todo, len(a.tokens))]
        owners = [a for a in pending for _ in range(a.todo, len(a.tokens))]
        touched: list[Answer] = []
        while rows:
            n = min(len(rows), self._b.n_batch)
            if len(rows) - n == 1:
                n -= 1       # never decode one prompt token alone
            part, rows = rows[:n], rows[n:]
            self._b.decode_seqs([r[0] for r in part], [r[1] for r in part], [r[2] for r in part], [r[3] for r in part])
            for r, a in zip(part, owners[:n]):
                a.todo = r[1] + 1          # only K/V a decode has computed count as prefilled
            owners = owners[n:]
            touched += self._advance(part)
        return touched

    def step(self) -> list[Answer]:
        """One llama_decode for every live answer; returns the answers that advanced or ended
        (ended ones have `done` set and have left the batch). Where prompts are prefilled apart
        (the prompt cache on, patch 0006), the prompts of answers that joined go first, in
        decodes of their own (see _prefill_apart), and the step returns after them."""
        touched = [a for a in self.answers if a.cancel.is_set()]
        for a in touched:
            self._end(a, "cancelled")
        pending = [a for a in self.answers if a.apart and a.todo < len(a.tokens)]
        if pending:
            return touched + self._prefill_apart(pending)
        rows: list[tuple[int, int, int, bool, Answer | None]] = []
        for a in self.answers:
            if a.todo >= len(a.tokens):
                rows.append((a.last, a.pos, a.seq, True, a))
        for a in self.answers:
            left = self._b.n_batch - len(rows)
            rest = len(a.tokens) - a.todo
            if rest <= 0 or left <= 0:
                continue
            k = min(rest, left)
            if rest - k == 1 and k > 1:
                k -= 1     # never leave one prompt token to be decoded alone
            for j in range(a.todo, a.todo + k):
                end = j == len(a.tokens) - 1
                rows.append((a.tokens[j], j, a.seq, end, a if end else None))
            a.todo += k
        if not rows:
            return touched
        keys = {a.key for a in self.answers}
        self._configure(keys)
        if len(keys) > 1:
            self._e.stats.mixed_steps += 1
        n = len(self.answers)
        for a in self.answers:
            if n > a.gen.batch_size:
                a.gen.batch_size = n
        self._b.decode_seqs([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
                            step=True)
        return touched + self._advance(rows)

    def _advance(self, rows: list[tuple[int, int, int, bool, Answer | None]]) -> list[Answer]:
        """After a decode of `rows`: each answer whose row it was samples its next token."""
        touched = []
        for row, r in enumerate(rows):
            a = r[4]
            if a is None:
                continue
            a.pos = r[1] + 1
            if a.max_tokens <= 0:
                self._end(a, "length")
            else:
                try:
                    self._sample(a, row)
                except EdgeftError as e:   # this answer's grammar or values: the others go on
                    a.error = e
                    self._end(a, "error")
            touched.append(a)
        return touched

    def _sample(self, a: Answer, row: int) -> None:
        logits = self._b.logits_at(row)
        if a.ignore_eos:
            logits[self._b.eog_tokens()] = -float("inf")
        tok = a.sampler.sample(self._b.ctx, logits, row)
        if a.t_first is None:
            a.t_first = time.perf_counter()
            a.gen.ttft_ms = (a.t_first - a.t0) * 1e3
            a.started = True
        if self._b.is_eog(tok):
            return self._end(a, "stop")
        a.n += 1
        a.text += a.utf8.decode(self._b.piece(tok))
        if a.stop:
            cut = min((i for i in (a.text.find(s) for s in a.stop) if i >= 0), default=-1)
            if cut >= 0:
                a.text = a.text[:cut]
                return self._end(a, "stop")
        if a.n >= a.max_tokens:
            return self._end(a, "length")
        a.last = tok

    def _end(self, a: Answer, reason: str) -> None:
        if a.done:
            return
        a.done, a.started, a.t_end = True, True, time.perf_counter()
        a.gen.finish_reason = reason
        a.text += a.utf8.decode(b"", final=True)
        a.gen.text = a.text
        a.gen.completion_tokens = a.n
        if a.t_first is not None and a.n > 1:
            a.gen.decode_tps = (a.n - 1) / max(a.t_end - a.t_first, 1e-9)
        self.answers.remove(a)
        self._pin()
        self._reserved -= a.reserved
        if a.save and a.todo >= len(a.tokens) - 2:     # its head was prefilled whole
            self._save_head(a)
        self._b.memory_seq_drop(a.seq)
        self._free.append(a.seq)
        if a.sampler is not None:
            a.sampler.close()
            a.sampler = None

    def close(self, reason: str = "cancelled") -> None:
        """End every answer still running (its sequence dropped); sequence 0 keeps its prefix and
        the context applies the home set again."""
        for a in list(self.answers):
            self._end(a, reason)
        for key in list(self._holders):
            self._release(key)
        self._configure({self._e._applied})

    # -- prefix holders of the sets other than the home set ----------------------------------
    def _hold(self, key: tuple, prefix: list[int]) -> int | None:
        """Give `key` a holder sequence with `prefix` (from the prompt cache where it has it,
        prefilled otherwise), so its answers share those K/V; returns the prefix tokens not
        computed now, or None when no holder was made (no free holder sequence, or a prefix too
        short to share: the answer prefills its whole prompt). `fits` counted the holder's cells
        already: an answer that shares all of them needs as many as one that prefills alone."""
        if not self._holder_seqs and self._idle():
            self._release(self._idle()[0])     # the sequence of a holder nothing shares now
        if not self._holder_seqs or len(prefix) < MIN_REUSE:
            return None
        b = self._b
        h = _Holder(self._holder_seqs.pop(), list(prefix))
        self._holders[key] = h
        self._pin()
        try:
            self._configure({a.key for a in self.answers} | {key})
            done = self._restore(key, prefix, len(prefix), h.seq)
            reused = done
            rest = prefix[done:]
            while rest:
                n = min(len(rest), b.n_batch)
                if len(rest) - n == 1:
                    n -= 1       # never decode one prompt token alone
                b.decode_seqs(rest[:n], list(range(done, done + n)), [h.seq] * n, [False] * n)
                done, rest = done + n, rest[n:]
            return reused
        except BaseException:
            self._release(key, save=False)
            raise

    def _release(self, key: tuple, save: bool = True) -> None:
        """Drop `key`'s holder, its prefix kept in the prompt cache. Only for a holder no running
        answer shares: their cells would outlive it uncounted."""
        h = self._holders.pop(key)
        e, b = self._e, self._b
        if save and e.prompt_cache.enabled and len(h.tokens) >= MIN_REUSE:
            state = b.state_save(e.prompt_cache.budget_bytes, seq=h.seq)
            if state is not None:
                e.prompt_cache.put(e._set_key(key), h.tokens, state)
        b.memory_seq_drop(h.seq)
        self._holder_seqs.append(h.seq)
        self._pin()

    def _pin(self) -> None:
        """The adapters of running answers and holders: the engine never evicts them."""
        self._e._busy = {n for k in [a.key for a in self.answers] + list(self._holders) for n, _ in k}

    def _configure(self, keys: set[tuple]) -> None:
        """Make the context apply what the next step's rows need: one adapter set alone (as a
        single request would), or for several sets their union with per-sequence scales."""
        if len(keys) == 1:
            want = next(iter(keys))
            self._clear_seq_scales()
            if self._config != want:
                self._b.set_adapters([self._e._adapters[n].handle for n, _ in want], [s for _, s in want])
                self._config = want
            return
        names = sorted({n for k in keys for n, s in k if s != 0.0})
        union = tuple((n, 1.0) for n in names)
        if self._config != ("mixed", union):
            self._clear_seq_scales()
            self._b.set_adapters([self._e._adapters[n].handle for n in names], [1.0] * len(names))
            self._config = ("mixed", union)
        per_seq = {a.seq: dict(a.key) for a in self.answers}
        per_seq.update((h.seq, dict(k)) for k, h in self._holders.items())
        for n in names:
            scales = [per_seq.get(q, {}).get(n, 0.0) for q in range(self._b.n_seq_max)]
            if self._seq_scales.get(n) != scales:
                self._b.set_adapter_seq_scales(self._e._adapters[n].handle, scales)
                self._seq_scales[n] = scales

    def _clear_seq_scales(self) -> None:
        for n in self._seq_scales:
            if n in self._e._adapters:
                self._b.set_adapter_seq_scales(self._e._adapters[n].handle, [])
        self._seq_scales = {}

    # -- text, usable inside the batch block (the engine's own methods wait for its lock) ----
    def tokenize(self, text: str) -> list[int]:
        return self._b.tokenize(text, add_special=True, parse_special=True)

    def chat_prompt(self, messages: list[dict]) -> str:
        return self._b.apply_chat_template(messages)


def _key(selection: dict[str, float]) -> tuple:
    """An adapter selection as the engine's applied-set key: ((name, scale), ...) sorted."""
    return tuple(sorted(selection.items()))
