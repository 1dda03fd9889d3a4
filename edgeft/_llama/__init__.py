"""The only package that imports llama_cpp (sampling lives in `sampling.py`).

It wraps the pieces edgeft needs: loading a base (through llama-cpp-python's `Llama`, which knows
this version's parameter structs), tokenizing and chat templates, a lean decode/sample loop on
the C API (no per-token numpy copies), LoRA adapters on the context, and KV memory. llama.cpp's
C names changed twice in 2025-26 (`llama_lora_adapter_*` -> `llama_adapter_lora_*`,
`llama_set_adapter_lora` -> `llama_set_adapters_lora`, `llama_kv_self_*` -> `llama_memory_*`);
each is feature-detected once here.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import sys
import threading
from collections import deque
from typing import Any, Mapping, Sequence

import llama_cpp
import numpy as np

from ..crash import doing
from ..errors import AdapterError, InputError, ModelError
from . import patches
from .patches import (  # noqa: F401  (re-exported: _llama.patch_level, ...)
    attn_rows_fusions, lora_decode_fused, lora_fused_chains, mixed_adapter_batches, patch_level)
from .sampling import Sampler, Sampling  # noqa: F401  (re-exported: _llama.Sampling)

log = logging.getLogger(__name__)

VERSION = getattr(llama_cpp, "__version__", "unknown")


def _first(*names: str):
    for n in names:
        fn = getattr(llama_cpp, n, None)
        if fn is not None:
            return fn
    return None


_adapter_init = _first("llama_adapter_lora_init", "llama_lora_adapter_init")
_adapter_free = _first("llama_adapter_lora_free", "llama_lora_adapter_free")
_set_adapters = _first("llama_set_adapters_lora")
_set_adapter_one = _first("llama_set_adapter_lora", "llama_lora_adapter_set")
_clear_adapters = _first("llama_clear_adapter_lora", "llama_lora_adapter_clear")
_get_memory = _first("llama_get_memory")
_memory_clear = _first("llama_memory_clear")
_memory_seq_rm = _first("llama_memory_seq_rm")
_kv_clear = _first("llama_kv_self_clear", "llama_kv_cache_clear")
_kv_seq_rm = _first("llama_kv_self_seq_rm", "llama_kv_cache_seq_rm")
HAS_SEQ_STATE = all(hasattr(llama_cpp, n) for n in ("llama_state_seq_get_size", "llama_state_seq_get_data",
                                                     "llama_state_seq_set_data"))

# llama_get_logits_ith with the address as a plain int (a fresh prototype, so llama-cpp-python's
# own stays as it is): the generation loop compares it instead of wrapping a pointer per token.
_logits_address = llama_cpp.llama_cpp._lib["llama_get_logits_ith"]
_logits_address.argtypes = [ctypes.c_void_p, ctypes.c_int32]
_logits_address.restype = ctypes.c_void_p

if _adapter_init is None or (_set_adapters is None and _set_adapter_one is None):
    raise ImportError(f"llama-cpp-python {VERSION} has no LoRA adapter API that edgeft knows")


# -- llama.cpp's log -----------------------------------------------------------------------
# Every log line of llama.cpp (debug included) is formatted and handed to one callback; a change
# of the adapter set alone emits ~470 debug lines (the scheduler re-reserve lists each input
# tensor). llama-cpp-python's callback maps the levels of an older ggml (debug shows as info).
# edgeft installs its own: quiet by default, it keeps the last error lines for error messages
# and counts scheduler re-reserves (the bench reports them); EDGEFT_VERBOSE=1 prints llama.cpp's
# info, warnings and errors, EDGEFT_VERBOSE=2 its debug lines too.
_GGML_DEBUG, _GGML_INFO, _GGML_ERROR, _GGML_CONT = 1, 2, 4, 5  # enum ggml_log_level (ggml.h)
_last_errors: deque[str] = deque(maxlen=8)
_verbosity = 0
_last_level = _GGML_INFO
_reserves = 0


_defaults_lock = threading.Lock()


@contextlib.contextmanager
def _context_defaults(**fields):
    """llama-cpp-python's Llama sets no n_seq_max / kv_unified for generation; its context
    params start from llama_context_default_params(), so that is what gets these fields."""
    mod = llama_cpp.llama_cpp
    with _defaults_lock:
        orig = mod.llama_context_default_params

        def patched():
            p = orig()
            for k, v in fields.items():
                setattr(p, k, v)
            return p

        mod.llama_context_default_params = patched
        try:
            yield
        finally:
            mod.llama_context_default_params = orig


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data) -> None:
    global _last_level, _reserves
    if level != _GGML_CONT:
        _last_level = level
    if level == _GGML_INFO and text.startswith(b"sched_reserve: reserving"):
        _reserves += 1
    if _last_level == _GGML_ERROR:
        _last_errors.append(text.decode("utf-8", "replace").strip())
    if _verbosity and (_last_level != _GGML_DEBUG or _verbosity > 1):
        sys.stderr.write(text.decode("utf-8", "replace"))


def set_log_verbosity(level: int) -> None:
    """0: quiet, 1: llama.cpp's info, warnings and errors on stderr, 2: and its debug lines."""
    global _verbosity
    _verbosity = level
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


def scheduler_reserves() -> int:
    """How many times llama.cpp has (re-)reserved a context's compute scheduler: what a change of
    the adapter set costs on the next decode, unless the build carries edgeft's patch 0001 and
    the new set has the old one's shapes. Patch 0001 counts them (`edgeft_llama_sched_reserves`);
    on a stock build this counts llama.cpp's log lines instead."""
    fn = getattr(llama_cpp.llama_cpp._lib, "edgeft_llama_sched_reserves", None)
    if fn is None:
        return _reserves
    fn.restype, fn.argtypes = ctypes.c_uint64, []
    return int(fn())


def last_llama_error() -> str:
    """llama.cpp's most recent error line (for messages that would otherwise say only 'failed')."""
    return next((e for e in reversed(_last_errors) if e), "")


def _env_verbosity() -> int:
    v = os.environ.get("EDGEFT_VERBOSE", "").strip()
    return 0 if not v else int(v) if v.isdigit() else 1


set_log_verbosity(_env_verbosity())


def system_info() -> str:
    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def prompt_cache_support() -> str:
    """What doctor says about the per-adapter-set prompt cache (it needs llama_state_seq_*)."""
    if HAS_SEQ_STATE:
        return "yes (llama_state_seq_*; 32 MB per engine unless --prompt-cache-mb says otherwise)"
    return "no (this llama-cpp-python lacks llama_state_seq_*; every swap prefills the prompt again)"


def supports_gpu_offload() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


def json_schema_to_gbnf(schema: dict) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf as convert

    return convert(json.dumps(schema))


def api_names() -> dict[str, str]:
    """Which llama.cpp C names this build offers (shown by `edgeft doctor`)."""
    return {
        "adapter_init": getattr(_adapter_init, "__name__", "?"),
        "set_adapters": getattr(_set_adapters or _set_adapter_one, "__name__", "?"),
        "memory": "llama_memory_*" if _memory_clear else "llama_kv_*",
        "patch_level": str(patches.patch_level()),
        "lora_decode": patches.lora_decode_path(),
        "adapter_batches": ("mixed: sequences under different adapter sets share a step (patch 0003)"
                            if patches.mixed_adapter_batches() else "one adapter set per batch"),
        "batch_attention": patches.batch_attention_path(),
    }


def quantize_model(src: str, dst: str, ftype: int, *, nthread: int = 0, allow_requantize: bool = True,
                   pure: bool = False) -> None:
    """llama.cpp's own quantizer (`llama_model_quantize`): k-quants, i-quants and its per-tensor
    type mixtures, which the `gguf` package cannot produce. `ftype` is a `gguf.LlamaFileType`."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = int(nthread)
    params.allow_requantize = bool(allow_requantize)
    params.pure = bool(pure)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ModelError(f"llama.cpp could not quantize {os.path.basename(src)} (code {rc})",
                         "check that the input is a complete base model; run with EDGEFT_VERBOSE=1 to see why")


class Backend:
    """One loaded base model and its context."""

    def __init__(self, model_path: str, *, n_ctx: int = 2048, n_threads: int | None = None,
                 n_batch: int = 512, n_gpu_layers: int = 0, use_mmap: bool = True,
                 use_mlock: bool = False, flash_attn: bool = False, verbose: bool = False,
                 n_seq_max: int = 1):
        threads = n_threads or max(1, (os.cpu_count() or 2))
        if verbose and not _verbosity:
            set_log_verbosity(1)
        _last_errors.clear()
        doing(f"loading the base model {model_path}")
        try:
            with _context_defaults(n_seq_max=n_seq_max, kv_unified=True) if n_seq_max > 1 else contextlib.nullcontext():
                self.llm = llama_cpp.Llama(
                    model_path=str(model_path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                    n_threads=threads, n_threads_batch=threads, n_gpu_layers=n_gpu_layers,
                    use_mmap=use_mmap, use_mlock=use_mlock, flash_attn=flash_attn, verbose=verbose,
                )
        except (ValueError, RuntimeError, OSError) as e:
            why = last_llama_error()
            raise ModelError(f"llama.cpp could not load {model_path}: {why or e}",
                             "the file is damaged or its architecture is not supported by this llama.cpp build") from None
        self.model = self.llm._model.model
        self.ctx = self.llm._ctx.ctx
        self.vocab = self.llm._model.vocab
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ctx))
        self.n_seq_max = int(llama_cpp.llama_n_seq_max(self.ctx))
        self._batch = None   # a reusable llama_batch for multi-sequence decodes, made on first use
        self._step_fused = False   # patches 0004 and 0006's settings on the context (see _step_fusions)
        self.n_batch = n_batch
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_threads = threads
        self.metadata: dict[str, str] = dict(self.llm.metadata or {})
        self._one = (llama_cpp.llama_token * 1)()
        self._one_batch = llama_cpp.llama_batch_get_one(self._one, 1)  # passed by value; points at _one
        self._row_address = None
        self._row: np.ndarray | None = None
        self._piece = ctypes.create_string_buffer(256)
        self._formatter = None

    # -- tokens and text ---------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special))

    def piece(self, token: int, special: bool = False) -> bytes:
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            return buf.raw[:n]
        return self._piece.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    @functools.cached_property
    def _eog(self) -> np.ndarray:
        return np.array([t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)], dtype=np.int64)

    def eog_tokens(self) -> np.ndarray:
        """Every end-of-generation token id (computed once)."""
        return self._eog

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages with the model's own Jinja chat template (as transformers does)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            raise InputError("no messages", "send a list of at least one message")
        messages = [dict(m) if isinstance(m, Mapping) else m for m in messages]
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InputError("each message needs a string 'role' and a string 'content'")
        tmpl = self.chat_template
        if not tmpl:
            raise ModelError("this base model has no chat template", "use `complete` with a raw prompt instead")
        if self._formatter is None or self._formatter.add_generation_prompt != add_generation_prompt:
            bos, eos = self.llm._model.token_bos(), self.llm._model.token_eos()
            self._formatter = Jinja2ChatFormatter(
                template=tmpl,
                eos_token=self.llm._model.token_get_text(eos) if eos != -1 else "",
                bos_token=self.llm._model.token_get_text(bos) if bos != -1 else "",
                add_generation_prompt=add_generation_prompt,
            )
        try:
            return self._formatter(messages=messages).prompt
        except Exception as e:  # jinja raises its own error types for bad message lists
            raise InputError(f"the chat template rejected these messages: {e}",
                             "check the roles and order of the messages") from None

    # -- evaluation ---------------------------------------------------------------------
    def decode(self, tokens: Sequence[int]) -> None:
        """Append tokens to sequence 0 (positions follow what the KV memory holds)."""
        self._step_fusions(False)
        doing("generating an answer (the adapters in use, the grammar or the sampling values may be at fault)")
        n = len(tokens)
        for i in range(0, n, self.n_batch):
            chunk = tokens[i:i + self.n_batch]
            arr = (llama_cpp.llama_token * len(chunk))(*chunk)
            rc = llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                raise InputError(f"llama_decode failed (code {rc})", "the prompt may not fit the context; use a larger --ctx")

    def decode_one(self, token: int) -> None:
        self._one[0] = token
        rc = llama_cpp.llama_decode(self.ctx, self._one_batch)
        if rc != 0:
            raise InputError(f"llama_decode failed (code {rc})", "the context is full; use a larger --ctx")

    def decode_seqs(self, tokens: Sequence[int], pos: Sequence[int], seqs: Sequence[int],
                    want: Sequence[bool], *, step: bool = False) -> None:
        """One llama_decode of tokens for several sequences (at most n_batch): token i goes to
        sequence seqs[i] at position pos[i]; rows with want[i] keep logits (`logits_at(i)`).
        `step`: a decode step of a batch, whose K/V no later request reuses: LoRA products are
        then computed token by token as in single-token decoding (patch 0004), faster and equal
        to a lone token's; never for a prompt whose K/V may be reused."""
        self._step_fusions(step)
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise ValueError(f"decode_seqs takes 1..{self.n_batch} tokens, got {n}")
        if self._batch is None:
            self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        batch = self._batch
        for i in range(n):
            batch.token[i] = tokens[i]
            batch.pos[i] = pos[i]
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seqs[i]
            batch.logits[i] = 1 if want[i] else 0
        batch.n_tokens = n
        doing("generating answers in a batch (the adapters in use, the grammars or the sampling values may be at fault)")
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            raise InputError(f"llama_decode failed (code {rc})", "the batch does not fit the context; use a larger --ctx")

    def logits_at(self, i: int) -> np.ndarray:
        """Logits of row i of the last decode (a view, valid until the next decode)."""
        address = _logits_address(self.ctx, i)
        if not address:
            raise RuntimeError(f"llama.cpp returned no logits for batch row {i}")
        return np.frombuffer((ctypes.c_float * self.n_vocab).from_address(address), dtype=np.float32)

    def sampler(self, s: Sampling) -> Sampler:
        return Sampler(self.vocab, s, self.n_vocab)

    def sample(self, sampler: Sampler) -> int:
        return sampler.sample(self.ctx, self._logits_row())

    def last_logits(self) -> np.ndarray:
        return self._logits_row().copy()

    def _logits_row(self) -> np.ndarray:
        """The last decoded token's logits: a view of llama.cpp's buffer, valid until the next decode.

        The view is rebuilt only when llama.cpp moves its buffer: building one per token cost
        ~80 us here (caches are cold after a decode), ~1% of a decode step."""
        address = _logits_address(self.ctx, -1)
        if address != self._row_address:
            if not address:
                raise RuntimeError("llama.cpp returned no logits for the last token")
            self._row = np.frombuffer((ctypes.c_float * self.n_vocab).from_address(address), dtype=np.float32)
            self._row_address = address
        return self._row

    def logits_for(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits after each token of `tokens`, from an empty KV memory: shape (len, n_vocab)."""
        self._step_fusions(False)
        self.memory_clear()
        out = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        for i in range(0, len(tokens), self.n_batch):
            chunk = list(tokens[i:i + self.n_batch])
            batch = llama_cpp.llama_batch_init(len(chunk), 0, 1)
            try:
                for j, t in enumerate(chunk):
                    batch.token[j] = t
                    batch.pos[j] = i + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = 1
                batch.n_tokens = len(chunk)
                rc = llama_cpp.llama_decode(self.ctx, batch)
                if rc != 0:
                    raise InputError(f"llama_decode failed (code {rc})", "use a larger --ctx")
                for j in range(len(chunk)):
                    ptr = llama_cpp.llama_get_logits_ith(self.ctx, j)
                    out[i + j] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
            finally:
                llama_cpp.llama_batch_free(batch)
        self.memory_clear()
        return out

    # -- KV memory ----------------------------------------------------------------------
    def memory_clear(self) -> None:
        if _memory_clear is not None and _get_memory is not None:
            _memory_clear(_get_memory(self.ctx), False)  # mark cells free; zeroing 40+ MB costs ms
        else:
            _kv_clear(self.ctx)

    def memory_seq_copy(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Let sequence dst share sequence src's cells at positions [p0, p1) (all by default):
        no K/V is computed or copied."""
        llama_cpp.llama_memory_seq_cp(_get_memory(self.ctx), src, dst, p0, p1)

    def memory_seq_drop(self, seq: int, keep: int = 0) -> bool:
        """Drop positions >= keep from sequence seq."""
        return bool(_memory_seq_rm(_get_memory(self.ctx), seq, keep, -1))

    def memory_truncate(self, keep: int) -> bool:
        """Drop positions >= keep from sequence 0; False if the memory cannot do that."""
        if _memory_seq_rm is not None and _get_memory is not None:
            return bool(_memory_seq_rm(_get_memory(self.ctx), 0, keep, -1))
        return bool(_kv_seq_rm(self.ctx, 0, keep, -1))

    def state_save(self, limit: int | None = None, seq: int = 0) -> bytearray | None:
        """A sequence's KV state (cells, positions, K and V) as bytes: llama_state_seq_get_data;
        None, without copying, when it is larger than `limit` bytes."""
        n = int(llama_cpp.llama_state_seq_get_size(self.ctx, seq))
        if limit is not None and n > limit:
            return None
        buf = bytearray(n)
        if n:
            got = int(llama_cpp.llama_state_seq_get_data(self.ctx, (ctypes.c_uint8 * n).from_buffer(buf), n, seq))
            del buf[got:]
        return buf

    def state_restore(self, state: bytearray, seq: int = 0) -> bool:
        """Put a saved state in a sequence: sequence 0 replaces the whole memory (cleared first);
        another sequence (empty) is restored beside the others. False if llama.cpp refuses it
        (the memory then cleared, or for another sequence that sequence dropped)."""
        if seq == 0:
            self.memory_clear()
        n = len(state)
        if not n:
            return False
        ok = int(llama_cpp.llama_state_seq_set_data(self.ctx, (ctypes.c_uint8 * n).from_buffer(state), n, seq)) > 0
        if not ok:
            if seq == 0:
                self.memory_clear()
            else:
                self.memory_seq_drop(seq)
        return ok

    # -- adapters -----------------------------------------------------------------------
    def adapter_load(self, path: str) -> Any:
        _last_errors.clear()
        doing(f"loading the adapter {path}")
        handle = _adapter_init(self.model, str(path).encode("utf-8"))
        if not handle:
            why = last_llama_error()
            raise AdapterError(f"llama.cpp refused the adapter {path}" + (f": {why}" if why else ""),
                               "it does not fit this base model; run with EDGEFT_VERBOSE=1 to see llama.cpp's log")
        return handle

    def adapter_free(self, handle: Any) -> None:
        if handle and _adapter_free is not None:
            _adapter_free(handle)

    def set_adapters(self, handles: Sequence[Any], scales: Sequence[float]) -> None:
        """Replace the context's whole adapter set (empty detaches all)."""
        n = len(handles)
        if _set_adapters is not None:
            if n == 0:
                _set_adapters(self.ctx, None, 0, None)
                return
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*handles)
            sc = (ctypes.c_float * n)(*scales)
            _set_adapters(self.ctx, arr, n, sc)
            return
        _clear_adapters(self.ctx)
        for h, s in zip(handles, scales):
            _set_adapter_one(self.ctx, h, float(s))

    def _step_fusions(self, on: bool) -> None:
        """Whether the next decodes are a batch's steps, whose K/V no later request reuses: LoRA
        products token by token (patch 0004) and, in steps of several sequences, attention over
        each row's own KV cells (patch 0006)."""
        if on == self._step_fused:
            return
        for fn in (patches.rows_fusion_fn(), patches.attn_rows_fn()):
            if fn is not None:
                fn(self.ctx, int(on))
        self._step_fused = on

    def set_adapter_seq_scales(self, handle: Any, scales: Sequence[float]) -> None:
        """Per-sequence scales for an adapter of the current set (patch 0003): sequence i's rows
        use scales[i] (0: the adapter is off there); an empty list goes back to the set's scale."""
        fn = patches.seq_scales_fn()
        if fn is None:
            raise RuntimeError("this llama.cpp build has no per-sequence adapter scales (patch 0003)")
        n = len(scales)
        arr = (ctypes.c_float * max(n, 1))(*scales)
        if fn(self.ctx, handle, arr, n) != 0:
            raise ValueError(f"llama.cpp refused per-sequence scales {list(scales)!r} for an adapter")

    # -- lifetime -----------------------------------------------------------------------
    def model_size_bytes(self) -> int:
        return int(llama_cpp.llama_model_size(self.model))

    def close(self) -> None:
        batch, self._batch = getattr(self, "_batch", None), None
        if batch is not None:
            llama_cpp.llama_batch_free(batch)
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()
