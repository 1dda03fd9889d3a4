"""Engine's batch methods: `batch()` opens a ContinuousBatch (edgeft/continuous.py) under one
adapter set; `run_many` / `complete_many` answer a bulk job (classify a CSV, `edgeft run
--jsonl`) through it, a new request joining as soon as an answer ends, so the engine pays for
the weights once per step instead of once per answer."""

from __future__ import annotations

import contextlib
import numbers
import threading
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from . import _llama
from .adapter_spec import UNSET, AdapterSpec
from .continuous import _SAMPLING, Answer, ContinuousBatch
from .errors import InputError
from .generation import Generation
from .prompt_cache import MIN_REUSE, common_prefix

if TYPE_CHECKING:
    from .tasks import TaskSpec




class BatchMethods:
    """Engine's bulk methods (Engine inherits them): they use its lock, adapter set and KV state."""

    def run_many(self, texts: Sequence[str], *, adapter: AdapterSpec = UNSET,
                 adapters: Sequence[AdapterSpec] | None = None, shots: int = 0,
                 system: str | None | bool = True, task: "TaskSpec | None" = None,
                 cancel: threading.Event | None = None, **gen: Any) -> list[Generation]:
        """`run` for many inputs, up to `parallel` answers decoded together per llama_decode
        (edgeft/batching.py): for bulk jobs. Every input under `adapter`, or each under its own
        (`adapters`, one spec per input, each with its task card: one batch serves them all on a
        build with patch 0003). Answers come back in input order."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise InputError("empty input in the batch", "every input needs some text")
        gen = {k: v for k, v in gen.items() if v is not None}
        if adapters is not None:
            specs = list(adapters)
            if len(specs) != len(texts) or adapter is not UNSET or task is not None:
                raise InputError("adapters= takes one adapter spec per input (and no adapter= or task=)")
        else:
            specs = [adapter] * len(texts)
        tasks: dict[str, "TaskSpec | None"] = {}
        items = []
        for t, spec in zip(texts, specs):
            k = repr(spec)
            if k not in tasks:
                tasks[k] = task if task is not None else self.task_for(spec)
            card = tasks[k]
            if card is not None:
                opts = {"max_tokens": card.max_tokens, "temperature": card.temperature, "stop": card.stop,
                        "grammar": card.output.grammar(), **gen}
                prompt = self.chat_prompt(card.messages(t, system=system, shots=shots))
            else:
                opts, prompt = dict(gen), self.chat_prompt([{"role": "user", "content": t}])
            items.append((prompt, spec, opts))
        results = self._answer_all(items, cancel)
        for r, t, spec in zip(results, texts, specs):
            card = tasks[repr(spec)]
            if card is not None:
                try:
                    r.value = card.output.parse(r.text)
                except InputError:
                    r.value = None
        return results

    def complete_many(self, prompts: Sequence[str], *, adapter: AdapterSpec = UNSET, max_tokens: int = 256,
                      stop: Sequence[str] = (), cancel: threading.Event | None = None, **sampling: Any) -> list[Generation]:
        """`complete` for many raw prompts under one adapter set, decoded together (see run_many).
        `sampling`: temperature, top_p, top_k, min_p, seed, grammar (one value for all)."""
        opts = {"max_tokens": max_tokens, "stop": stop, **sampling}
        return self._answer_all([(p, adapter, opts) for p in prompts], cancel)

    @contextlib.contextmanager
    def batch(self, adapter: AdapterSpec = UNSET, *, mixed: bool = True) -> Iterator[ContinuousBatch]:
        """A ContinuousBatch, holding the engine's lock until the block ends: `add()` requests as
        they come (while `fits()`), each under `adapter` or its own (`add(adapter=...)`: answers
        under different adapter sets share steps when the build has patch 0003 and `mixed`),
        `step()` until `answers` is empty. Answers still running at the end are cancelled; an
        error clears the KV memory."""
        with self._lock:
            selection = self._selected if adapter is UNSET else self._resolve(adapter)
            self._apply(selection)
            cb = ContinuousBatch(self, selection, mixed=mixed)
            try:
                yield cb
            except BaseException:
                cb.close()
                self._invalidate_kv()
                raise
            cb.close()

    def _answer_all(self, items: list[tuple[str, AdapterSpec, dict]], cancel: threading.Event | None) -> list[Generation]:
        """(prompt, adapter spec, options) -> Generation each, in order, through one batch."""
        for p, _, opts in items:
            if not isinstance(p, str) or not p:
                raise InputError("empty prompt in the batch", "every prompt needs some text")
            mt = opts.get("max_tokens", 256)
            if isinstance(mt, bool) or not isinstance(mt, numbers.Integral) or mt < 0:
                raise InputError(f"max_tokens must be a whole number >= 0, got {mt!r}")
            unknown = set(opts) - _SAMPLING - {"max_tokens", "stop"}
            if unknown:
                raise InputError(f"unknown option(s) for a batch: {', '.join(sorted(unknown))}")
        if not items:
            return []
        cancel = cancel if cancel is not None else threading.Event()
        plans = [(self.tokenize(p), spec, int(o.get("max_tokens", 256)), list(o.get("stop") or []),
                  _llama.Sampling(**{k: v for k, v in o.items() if k in _SAMPLING})) for p, spec, o in items]
        for toks, *_ in plans:
            if len(toks) >= self.n_ctx:
                raise InputError(f"a prompt has {len(toks)} tokens; the context holds {self.n_ctx}",
                                 "shorten the input or raise --ctx")
        if self.parallel < 1:   # a single-sequence context: one request at a time
            return [self.complete(p, adapter=spec, max_tokens=mt, stop=stop, cancel=cancel, **vars(smp))
                    for (p, _, _), (_, spec, mt, stop, smp) in zip(items, plans)]
        out: list[Answer | None] = [None] * len(plans)
        with self.batch(plans[0][1]) as cb:
            i, sel = 0, None
            while i < len(plans) or cb.answers:
                while i < len(plans) and not cancel.is_set():
                    toks, spec, mt, stop, smp = plans[i]
                    sel = cb.resolve(spec) if sel is None else sel   # once per input, not per step
                    if not cb.fits(toks, mt, sel):
                        break
                    out[i] = cb.add(toks, max_tokens=mt, stop=stop, cancel=cancel, adapter=sel, **vars(smp))
                    i, sel = i + 1, None
                if cancel.is_set() and not cb.answers:
                    break
                cb.step()
        failed = next((a.error for a in out if a is not None and a.error is not None), None)
        if failed is not None:
            raise failed
        return [a.gen if a is not None else   # cancelled before it started
                Generation("", "cancelled", len(toks), 0, 0.0, 0.0, {}) for a, (toks, *_) in zip(out, plans)]

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
