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

    def run_many(self, texts: Sequence[str], *, adapter: AdapterSpec = UNSET, shots: int = 0,
                 system: str | None | bool = True, task: "TaskSpec | None" = None,
                 cancel: threading.Event | None = None, **gen: Any) -> list[Generation]:
        """`run` for many inputs under one adapter set, up to `parallel` answers decoded together
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

    def _generate_many(self, prompts: list[str], adapter: AdapterSpec, sampling: _llama.Sampling,
                       max_tokens: int, stop: list[str], cancel: threading.Event) -> list[Generation]:
        toks = [self.tokenize(p) for p in prompts]
        for t in toks:
            if len(t) >= self.n_ctx:
                raise InputError(f"a prompt has {len(t)} tokens; the context holds {self.n_ctx}",
                                 "shorten the input or raise --ctx")
        if self.parallel < 1:   # a single-sequence context: one request at a time
            return [self.complete(p, adapter=adapter, max_tokens=max_tokens, stop=stop, cancel=cancel,
                                  **vars(sampling)) for p in prompts]
        out: list[Answer | None] = [None] * len(toks)
        with self.batch(adapter) as cb:
            i = 0
            while i < len(toks) or cb.answers:
                while i < len(toks) and not cancel.is_set() and cb.fits(toks[i], max_tokens):
                    out[i] = cb.add(toks[i], max_tokens=max_tokens, stop=stop, cancel=cancel, **vars(sampling))
                    i += 1
                if cancel.is_set() and not cb.answers:
                    break
                cb.step()
        failed = next((a.error for a in out if a is not None and a.error is not None), None)
        if failed is not None:
            raise failed
        gens = []
        for t, a in zip(toks, out):
            if a is None:    # cancelled before it started
                a_gen = Generation("", "cancelled", len(t), 0, 0.0, 0.0, dict(cb.selection))
            else:
                a_gen = a.gen
            gens.append(a_gen)
        return gens

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
