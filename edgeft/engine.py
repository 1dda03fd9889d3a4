"""Engine: one base model loaded once, LoRA adapters hot-swapped on its context.

Swapping is `llama_set_adapters_lora` on the live context, never a reload. The adapter set that
computed the KV cache is remembered; any change of the set (or of a scale) clears the KV cache
and the token prefix it would otherwise reuse, so a prompt sharing a prefix with the previous
one can never see K/V computed under another adapter. Before it is cleared, the prompt's K/V go
to the prompt cache (prompt_cache.py) under the set that computed them, for that set's next
request. `run_many` decodes several answers of one set together (batching.py).

All public methods are serialized by one lock; a streaming generation holds it until the stream
is exhausted or closed, so a swap from another thread waits instead of corrupting it.
"""

from __future__ import annotations

import codecs
import logging
import numbers
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence, overload

from . import _llama
from .adapter_spec import MAX_SCALE, AdapterSpec, parse_adapter_spec  # noqa: F401  (re-exported)
from .adapter_spec import UNSET as _UNSET
from .bundles import AdapterBundle
from .errors import AdapterError, InputError
from .batching import BatchMethods
from .continuous import PREFIX_HOLDERS, _key
from .generation import Generation, Stats, Stream
from .gguf_info import AdapterInfo, BaseInfo, base_info, inspect_adapter
from .models import BaseModel, Progress, resolve_base
from .prompt_cache import MIN_REUSE, AdapterSetKey, PromptCache, common_prefix
from .registry import find
from .tasks import TaskSpec

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)



@dataclass
class LoadedAdapter:
    name: str
    bundle: AdapterBundle
    info: AdapterInfo
    handle: Any
    load_ms: float
    last_used: float = 0.0
    version: tuple = ()   # the file's (path, inode, size, mtime_ns) when loaded: keys the prompt cache

    @property
    def mb(self) -> float:
        return self.info.nbytes / 1e6

    @property
    def task(self) -> TaskSpec | None:
        return self.bundle.card.task


class Engine(BatchMethods):
    def __init__(self, base: str | os.PathLike | None = None, *, n_ctx: int = 2048,
                 n_threads: int | None = None, n_batch: int = 512, n_gpu_layers: int = 0,
                 use_mmap: bool = True, use_mlock: bool = False, memory_budget_mb: float | None = None,
                 adapter_dirs: Sequence[str | os.PathLike] = (), progress: Progress | None = None,
                 flash_attn: bool = False, verbose: bool | None = None, prompt_cache_mb: float = 32.0,
                 parallel: int = 8):
        if isinstance(prompt_cache_mb, bool) or not isinstance(prompt_cache_mb, numbers.Real) \
                or not 0 <= prompt_cache_mb <= 1e6:
            raise InputError(f"prompt cache budget must be between 0 and 1000000 MB, got {prompt_cache_mb!r}",
                             "pass --prompt-cache-mb 0 to turn the cache off, or a budget in MB such as 32")
        if isinstance(parallel, bool) or not isinstance(parallel, numbers.Integral) or not 0 <= parallel <= 63:
            raise InputError(f"parallel must be a whole number from 0 to 63, got {parallel!r}",
                             "it is how many answers one batch decodes together; 8 is the default, 0 turns batching off")
        if verbose is None:
            verbose = bool(os.environ.get("EDGEFT_VERBOSE"))
        self.base: BaseModel = resolve_base(base, progress=progress)
        self.info: BaseInfo = base_info(self.base.path)
        t0 = time.perf_counter()
        holders = PREFIX_HOLDERS if _llama.mixed_adapter_batches() else 0
        self._parallel = int(parallel)
        self._b = _llama.Backend(str(self.base.path), n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch,
                                 n_gpu_layers=n_gpu_layers, use_mmap=use_mmap, use_mlock=use_mlock,
                                 flash_attn=flash_attn, verbose=verbose,
                                 n_seq_max=int(parallel) + 1 + holders if parallel else 1)
        self.flash_attn = flash_attn
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self.memory_budget_mb = memory_budget_mb
        self.adapter_dirs = list(adapter_dirs)
        self._lock = threading.Lock()
        self._adapters: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._known: dict[str, AdapterBundle] = {}  # every bundle loaded once, by name (for reloads)
        self._inspected: dict[tuple, AdapterInfo] = {}  # (path, inode, size, mtime_ns) -> validated info
        self._selected: dict[str, float] = {}   # what use() asked for
        self._applied: tuple = ()               # ((name, scale), ...) on the context now
        self._applied_key: AdapterSetKey = ()   # the same with each adapter's file version
        self.prompt_cache = PromptCache(float(prompt_cache_mb) if _llama.HAS_SEQ_STATE else 0.0)
        self._kv_tokens: list[int] = []         # tokens whose K/V are in memory, under _applied
        self._kv_batched = 0                    # leading _kv_tokens decoded in multi-token batches
        self._busy: set[str] = set()            # adapters a running batch decodes with: never evicted
        self.stats = Stats()

    # -- properties -----------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self._b.n_ctx

    @property
    def n_threads(self) -> int:
        return self._b.n_threads

    @property
    def n_seq_max(self) -> int:
        """llama.cpp sequences in the context: `parallel` answers, one for the shared prompt prefix,
        and (when the build mixes adapter sets in a batch) PREFIX_HOLDERS for other sets' prefixes."""
        return self._b.n_seq_max

    @property
    def parallel(self) -> int:
        """How many answers a batch (`batch`, `run_many`, the server) decodes together."""
        return self._parallel

    @property
    def adapters(self) -> dict[str, LoadedAdapter]:
        """Resident adapters, least recently used first."""
        return dict(self._adapters)

    @property
    def active(self) -> dict[str, float]:
        return dict(self._selected)

    def resident_mb(self) -> float:
        return sum(a.mb for a in self._adapters.values())

    # -- adapters -------------------------------------------------------------------------
    def load_adapter(self, ref: str | os.PathLike | AdapterBundle, *, name: str | None = None,
                     force: bool = False) -> str:
        """Load a bundle (registered name, folder or .gguf path) and keep it resident; returns its name."""
        with self._lock:
            return self._load(ref, name=name, force=force)

    def _load(self, ref, *, name: str | None = None, force: bool = False, keep: Sequence[str] = ()) -> str:
        if isinstance(ref, str) and ref in self._adapters and name in (None, ref):
            self._touch(ref)
            return ref
        if isinstance(ref, AdapterBundle):
            bundle = ref
        elif isinstance(ref, str) and ref in self._known:  # evicted earlier: reload from where it came
            bundle = self._known[ref]
        else:
            bundle = find(ref, self.adapter_dirs)
        if name is None:
            name = bundle.name
            # two different files with the same name (e.g. a/adapter.gguf, b/adapter.gguf) get distinct names
            k = 2
            while name in self._known and self._known[name].gguf_path.resolve() != bundle.gguf_path.resolve():
                name, k = f"{bundle.name}-{k}", k + 1
        if name in self._adapters:
            if self._adapters[name].bundle.gguf_path.resolve() != bundle.gguf_path.resolve():
                raise AdapterError(f"an adapter named '{name}' is already loaded from another file",
                                   "unload it first, or load this one under another name")
            self._touch(name)
            return name
        card_sha = bundle.card.base.get("sha256")
        if card_sha and card_sha != self.base.sha256 and not force:
            raise AdapterError(
                f"adapter '{name}' was made for base {bundle.card.base.get('id', '?')} "
                f"(sha256 {card_sha[:12]}...), not the loaded {self.base.id} ({self.base.sha256[:12]}...)",
                "load the base it belongs to, or pass --force to load it anyway")
        version = _file_version(bundle.gguf_path)
        info = self._inspect(bundle.gguf_path, version)
        self._make_room(info.nbytes / 1e6, keep=set(keep) | set(self._selected) | {n for n, _ in self._applied} | self._busy)
        t0 = time.perf_counter()
        handle = self._b.adapter_load(str(bundle.gguf_path))
        la = LoadedAdapter(name, bundle, info, handle, (time.perf_counter() - t0) * 1e3, time.monotonic(),
                           version=version)
        self._adapters[name] = la
        self._known[name] = bundle
        return name

    def _inspect(self, path: Path, version: tuple) -> AdapterInfo:
        """inspect_adapter, remembered per file version (`_file_version`): reloading an evicted
        adapter skips the full read and NaN scan (most of a reload's time) unless the file changed."""
        if len(version) == 1:
            return inspect_adapter(path, self.info)  # no stat: raises the clear "not found" error
        info = self._inspected.get(version)
        if info is None:
            info = inspect_adapter(path, self.info)
            self._inspected[version] = info
        return info

    def _make_room(self, need_mb: float, keep: set[str]) -> None:
        budget = self.memory_budget_mb
        if budget is None:
            return
        if need_mb > budget:
            raise AdapterError(f"adapter needs {need_mb:.1f} MB, the memory budget is {budget:.1f} MB",
                               "raise --memory-budget")
        for victim in list(self._adapters):  # least recently used first
            if self.resident_mb() + need_mb <= budget:
                return
            if victim in keep:
                continue
            self._unload(victim)
            self.stats.evictions += 1
            log.info("evicted adapter %s to stay within %.1f MB", victim, budget)
        if self.resident_mb() + need_mb > budget:
            raise AdapterError(f"the adapters in use already take {self.resident_mb():.1f} of {budget:.1f} MB",
                               "raise --memory-budget or use fewer adapters at once")

    def _touch(self, name: str) -> None:
        self._adapters.move_to_end(name)
        self._adapters[name].last_used = time.monotonic()

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self._adapters:
                raise AdapterError(f"adapter '{name}' is not loaded")
            self._selected.pop(name, None)
            self._unload(name)

    def _unload(self, name: str) -> None:
        if any(n == name for n, _ in self._applied):
            self._save_prompt()
            self._b.set_adapters([], [])
            self._applied = ()
            self._invalidate_kv()
        la = self._adapters.pop(name)
        self._b.adapter_free(la.handle)

    def use(self, spec: AdapterSpec) -> dict[str, float]:
        """Select the adapter set for later calls: None, "ner", "ner=0.5,style", {"ner": 1, "style": 0.5}.

        Adapters not yet resident are loaded. The context itself is switched lazily, at the next
        generation, so selecting costs nothing until it is used.
        """
        with self._lock:
            self._selected = self._resolve(spec)
            return dict(self._selected)

    def _resolve(self, spec: AdapterSpec) -> dict[str, float]:
        wanted = parse_adapter_spec(spec)
        out: dict[str, float] = {}
        for ref, scale in wanted.items():
            name = self._load(ref, keep=list(out))
            out[name] = scale
        return out

    def _apply(self, selection: dict[str, float]) -> None:
        target = _key(selection)
        for name in selection:
            self._touch(name)
        if target == self._applied:
            return
        self._save_prompt()
        t0 = time.perf_counter()
        self._b.set_adapters([self._adapters[n].handle for n, _ in target], [s for _, s in target])
        self._applied = target
        self._applied_key = self._set_key(target)
        self._invalidate_kv()
        dt = (time.perf_counter() - t0) * 1e3
        self.stats.swaps += 1
        self.stats.last_swap_ms = dt
        self.stats.swap_ms.append(dt)
        del self.stats.swap_ms[:-1000]

    def _set_key(self, target: tuple) -> AdapterSetKey:
        """The prompt cache's key of an adapter set ((name, scale), ...): each file's version too."""
        return tuple((n, self._adapters[n].version, s) for n, s in target)

    def _save_prompt(self) -> None:
        """Before a swap clears it: keep the K/V of the batched prompt prefix under its adapter set."""
        n = self._kv_batched
        if not self.prompt_cache.enabled or n < MIN_REUSE:
            return
        if n < len(self._kv_tokens) and not self._b.memory_truncate(n):
            return
        state = self._b.state_save(self.prompt_cache.budget_bytes)   # too large for the cache: no copy
        if state is not None:
            self.prompt_cache.put(self._applied_key, self._kv_tokens[:n], state)

    def _restore_prompt(self, tokens: list[int], usable: int, have: int) -> int | None:
        """Restore this adapter set's cached prompt sharing the longest prefix with `tokens` when
        it holds at least MIN_REUSE more tokens than the `have` in memory; returns the tokens now
        in memory, or None when memory was left as it was."""
        hit = self.prompt_cache.best(self._applied_key, tokens, usable, at_least=have + MIN_REUSE)
        if hit is None:
            return None
        state, _, keep = hit
        if not self._b.state_restore(state) or not self._b.memory_truncate(keep):
            self._b.memory_clear()
            return 0
        return keep

    def _invalidate_kv(self) -> None:
        self._b.memory_clear()
        self._kv_tokens = []
        self._kv_batched = 0

    def reset(self) -> None:
        """Forget the KV cache (a new conversation); its prompt prefix stays in the prompt cache."""
        with self._lock:
            self._save_prompt()
            self._invalidate_kv()

    # -- generation -----------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        with self._lock:
            return self._b.tokenize(text, add_special=True, parse_special=special)

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt text the base's chat template makes of `messages`."""
        with self._lock:
            return self._b.apply_chat_template(messages)

    @overload
    def chat(self, messages: list[dict], *, adapter: AdapterSpec = ..., stream: Literal[False] = ...,
             **gen: Any) -> Generation: ...
    @overload
    def chat(self, messages: list[dict], *, adapter: AdapterSpec = ..., stream: Literal[True], **gen: Any) -> Stream: ...

    def chat(self, messages: list[dict], *, adapter: AdapterSpec = _UNSET, stream: bool = False,
             **gen: Any) -> Generation | Stream:
        """Answer a conversation with the base's chat template. stream=True gives a Stream of text pieces."""
        return self.complete(self.chat_prompt(messages), adapter=adapter, stream=stream, **gen)

    @overload
    def complete(self, prompt: str, *, adapter: AdapterSpec = ..., stream: Literal[False] = ...,
                 **gen: Any) -> Generation: ...
    @overload
    def complete(self, prompt: str, *, adapter: AdapterSpec = ..., stream: Literal[True], **gen: Any) -> Stream: ...

    def complete(self, prompt: str, *, adapter: AdapterSpec = _UNSET, stream: bool = False,
                 max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0, seed: int | None = None, stop: Sequence[str] = (),
                 grammar: str | None = None, cancel: threading.Event | None = None) -> Generation | Stream:
        """Continue a raw prompt. Returns a Generation, or a Stream of text pieces if stream=True.

        `cancel` (or `Stream.cancel()`, from any thread) stops the answer before its next token;
        its finish_reason is then "cancelled"."""
        if not isinstance(prompt, str) or not prompt:
            raise InputError("empty prompt", "give some text")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 0:
            raise InputError(f"max_tokens must be a whole number >= 0, got {max_tokens!r}")
        max_tokens = int(max_tokens)
        sampling = _llama.Sampling(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                                   min_p=float(min_p), seed=seed, grammar=grammar)
        sink: list[Generation] = []
        cancel = cancel if cancel is not None else threading.Event()
        it = self._generate(prompt, adapter, sampling, max_tokens, list(stop or []), sink, cancel)
        if stream:
            return Stream(it, sink, cancel=cancel)
        for _ in it:
            pass
        return sink[0]

    @overload
    def run(self, text: str, *, adapter: AdapterSpec = ..., stream: Literal[False] = ..., shots: int = ...,
            system: str | None | bool = ..., task: TaskSpec | None = ..., **gen: Any) -> Generation: ...
    @overload
    def run(self, text: str, *, adapter: AdapterSpec = ..., stream: Literal[True], shots: int = ...,
            system: str | None | bool = ..., task: TaskSpec | None = ..., **gen: Any) -> Stream: ...

    def run(self, text: str, *, adapter: AdapterSpec = _UNSET, stream: bool = False, shots: int = 0,
            system: str | None | bool = True, task: TaskSpec | None = None, **gen: Any) -> Generation | Stream:
        """One task answer: the task card (`task`, else the active adapter's) decides prompt,
        output constraint and defaults. `task` gives a card to a merged model or the bare base.
        The answer's `.value` is the parsed label / JSON / text (None when invalid), for a
        stream once it is exhausted (`stream.result.value`)."""
        if not isinstance(text, str) or not text.strip():
            raise InputError("empty input", "give some text to work on")
        gen = {k: v for k, v in gen.items() if v is not None}
        if task is None:
            task = self.task_for(adapter)
        if task is None:
            return self.chat([{"role": "user", "content": text}], adapter=adapter, stream=stream, **gen)
        opts = {"max_tokens": task.max_tokens, "temperature": task.temperature, "stop": task.stop,
                "grammar": task.output.grammar()}
        opts.update(gen)
        msgs = task.messages(text, system=system, shots=shots)

        def set_value(res: Generation) -> None:
            try:
                res.value = task.output.parse(res.text)
            except InputError:
                res.value = None
        if stream:
            s = self.chat(msgs, adapter=adapter, stream=True, **opts)
            s.on_end(set_value)
            return s
        res = self.chat(msgs, adapter=adapter, **opts)
        set_value(res)
        return res

    def logits(self, tokens: Sequence[int], *, adapter: AdapterSpec = _UNSET) -> "np.ndarray":
        """Next-token logits after every position of `tokens` (n_tokens x n_vocab), from an
        empty KV cache, under the selected (or given) adapter set. For parity checks and scoring."""
        with self._lock:
            selection = self._selected if adapter is _UNSET else self._resolve(adapter)
            if not tokens or len(tokens) > self.n_ctx:
                raise InputError(f"logits need 1..{self.n_ctx} tokens, got {len(tokens)}")
            self._apply(selection)
            try:
                return self._b.logits_for(list(tokens))
            finally:
                self._invalidate_kv()

    def task_for(self, adapter: AdapterSpec = _UNSET) -> TaskSpec | None:
        """The task card of the single adapter in effect (the call's, else the selected one)."""
        with self._lock:
            sel = self._selected if adapter is _UNSET else self._resolve(adapter)
            if len(sel) != 1:
                return None
            return self._adapters[next(iter(sel))].task

    def _generate(self, prompt: str, adapter: AdapterSpec, sampling: _llama.Sampling,
                  max_tokens: int, stop: list[str], sink: list, cancel: threading.Event) -> Iterator[str]:
        self._lock.acquire()
        try:
            selection = self._selected if adapter is _UNSET else self._resolve(adapter)
            tokens = self._b.tokenize(prompt, add_special=True, parse_special=True)
            if len(tokens) >= self.n_ctx:
                raise InputError(f"the prompt has {len(tokens)} tokens; the context holds {self.n_ctx}",
                                 "shorten the input or raise --ctx")
            max_tokens = max(0, min(max_tokens, self.n_ctx - len(tokens)))
            self._apply(selection)
            sampler = self._b.sampler(sampling)
            try:
                yield from self._loop(tokens, sampler, max_tokens, stop, dict(selection), sink, cancel)
            finally:
                sampler.close()
        finally:
            self._lock.release()

    def _loop(self, tokens: list[int], sampler, max_tokens: int, stop: list[str],
              selection: dict[str, float], sink: list, cancel: threading.Event) -> Iterator[str]:
        b = self._b
        t0 = time.perf_counter()
        common = common_prefix(self._kv_tokens, tokens)
        # Reuse only K/V that a fresh decode would compute bit for bit: llama.cpp's batch-of-1
        # kernels round differently from its batched ones, so (a) generated tokens, decoded one
        # at a time, are never reused, and (b) the new suffix is never a single token.
        common = max(0, min(common, self._kv_batched, len(tokens) - 2))
        if common < len(self._kv_tokens) and not b.memory_truncate(common):
            b.memory_clear()
            common = 0
        if self.prompt_cache.enabled and len(tokens) - 2 >= common + MIN_REUSE:
            # the cache restores only K/V a fresh batched decode under this very set computed
            restored = self._restore_prompt(tokens, len(tokens) - 2, common)
            common = common if restored is None else restored
        self._kv_tokens = tokens[:common]
        self._kv_batched = common
        try:
            b.decode(tokens[common:])
        except BaseException:
            self._invalidate_kv()
            raise
        self._kv_tokens = list(tokens)
        self._kv_batched = len(tokens) if len(tokens) - common > 1 else common
        gen = Generation("", "length", len(tokens), 0, 0.0, 0.0, selection, reused_prefix=common)
        self.stats.last = gen
        sink.append(gen)
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        text = ""          # everything generated so far
        emitted = 0        # chars of `text` already yielded
        hold = max((len(s) for s in stop), default=0)
        t_first = None
        n = 0
        try:
            while n < max_tokens:
                if cancel.is_set():
                    gen.finish_reason = "cancelled"
                    break
                tok = b.sample(sampler)
                if t_first is None:
                    t_first = time.perf_counter()
                    gen.ttft_ms = (t_first - t0) * 1e3
                if b.is_eog(tok):
                    gen.finish_reason = "stop"
                    break
                n += 1
                text += utf8.decode(b.piece(tok))
                if stop:
                    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
                    if cut >= 0:
                        text = text[:cut]
                        gen.finish_reason = "stop"
                        break
                safe = len(text) - (hold - 1 if stop else 0)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
                if n >= max_tokens:
                    break
                self._kv_tokens.append(tok)
                try:
                    b.decode_one(tok)
                except BaseException:
                    self._invalidate_kv()
                    raise
            text += utf8.decode(b"", final=True)
            if len(text) > emitted:
                yield text[emitted:]
        finally:
            gen.completion_tokens = n
            if cancel.is_set() and gen.finish_reason == "length" and n < max_tokens:
                gen.finish_reason = "cancelled"   # closed at a yield: the answer was cut short
            gen.text = text
            if t_first is not None and n > 1:
                gen.decode_tps = (n - 1) / max(time.perf_counter() - t_first, 1e-9)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            b = getattr(self, "_b", None)
            if b is None:
                return
            if self._applied:
                b.set_adapters([], [])
                self._applied = ()
            for name in list(self._adapters):
                b.adapter_free(self._adapters.pop(name).handle)
            self.prompt_cache.clear()
            b.close()
            self._b = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if getattr(self, "_b", None) is not None and not self._lock.locked():
                self.close()
        except Exception:
            pass


def _file_version(path: Path) -> tuple:
    """(path, inode, size, mtime_ns): K/V computed under one version never serve another."""
    try:
        st = path.stat()
    except OSError:
        return (str(path),)
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
