"""Sampling for edgeft's decode loop: the values checked before llama.cpp sees them, and a
sampler that checks the grammar on the picked token only (part of the `_llama` package, the one
place that talks to llama_cpp)."""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import llama_cpp
import numpy as np

from ..errors import InputError, shown


@dataclass
class Sampling:
    """Sampling values, checked before llama.cpp sees them: a NaN / Inf / huge temperature with a
    grammar aborts the process inside llama.cpp ("Unexpected empty grammar stack")."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        for name, lo, hi in (("temperature", 0.0, 100.0), ("top_p", 0.0, 1.0), ("min_p", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise InputError(f"{name} must be a number from {lo:g} to {hi:g}, got {shown(v)}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k <= 1_000_000:
            raise InputError(f"top_k must be a whole number from 0 to 1000000, got {shown(self.top_k)}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InputError(f"seed must be a whole number, got {shown(self.seed)}")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise InputError("the output grammar is empty or not text")


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)


class Sampler:
    """Sampling as llama.cpp's own `common_sampler` does it: the plain chain (top-k/top-p/min-p,
    temperature, dist or greedy) picks a token; the grammar only checks that one token, and only
    when it is rejected is the grammar applied to the whole vocabulary and the pick redone.
    Same result as grammar-first for greedy decoding, without masking 49k candidates per token.
    """

    def __init__(self, vocab, s: Sampling, n_vocab: int):
        self.grammar = None
        self.ptr = self._chain(s)
        # greedy without a grammar: llama.cpp's greedy sampler takes the first maximum, as argmax
        # does, but first copies all 49k logits into a candidate array (0.17 ms a token here)
        self._greedy = s.temperature <= 0 and not s.grammar
        self._n_vocab = n_vocab
        if s.grammar:
            self.grammar = llama_cpp.llama_sampler_init_grammar(vocab, s.grammar.encode("utf-8"), b"root")
            if not self.grammar:
                self.close()
                raise InputError("the output grammar does not parse", "check the task card's grammar or JSON schema")
            self._one = np.zeros(1, dtype=_TOKEN_DATA)
            self._all = np.zeros(n_vocab, dtype=_TOKEN_DATA)
            self._all["id"] = np.arange(n_vocab, dtype=np.int32)

    @staticmethod
    def _chain(s: Sampling):
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        chain = llama_cpp.llama_sampler_chain_init(params)
        add = lambda smpl: llama_cpp.llama_sampler_chain_add(chain, smpl)  # noqa: E731
        if s.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(int(s.top_k)))
        if 0 < s.top_p < 1:
            add(llama_cpp.llama_sampler_init_top_p(float(s.top_p), 1))
        if s.min_p > 0:
            add(llama_cpp.llama_sampler_init_min_p(float(s.min_p), 1))
        add(llama_cpp.llama_sampler_init_temp(float(s.temperature)))
        seed = llama_cpp.LLAMA_DEFAULT_SEED if s.seed is None else int(s.seed) & 0xFFFFFFFF
        add(llama_cpp.llama_sampler_init_dist(seed))
        return chain

    @staticmethod
    def _array(buf: np.ndarray) -> llama_cpp.llama_token_data_array:
        return llama_cpp.llama_token_data_array(
            data=buf.ctypes.data_as(llama_cpp.llama_token_data_p), size=len(buf), selected=-1, sorted=False)

    def sample(self, ctx, logits: np.ndarray, row: int = -1) -> int:
        """The next token from `logits` (row `row` of the last decode, a view of llama.cpp's buffer)."""
        if self._greedy:
            return int(np.argmax(logits))
        if self.grammar is None:
            return int(llama_cpp.llama_sampler_sample(self.ptr, ctx, row))
        self._all["logit"] = logits
        self._all["p"] = 0.0
        arr = self._array(self._all)
        llama_cpp.llama_sampler_apply(self.ptr, ctypes.byref(arr))
        tok = int(self._all["id"][arr.selected])
        self._one["id"], self._one["logit"], self._one["p"] = tok, logits[tok], 0.0
        one = self._array(self._one)
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(one))
        if not np.isfinite(self._one["logit"][0]):   # the grammar rejects it: mask everything, pick again
            self._all["id"] = np.arange(self._n_vocab, dtype=np.int32)
            self._all["logit"] = logits
            self._all["p"] = 0.0
            arr = self._array(self._all)
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(arr))
            if not np.isfinite(self._all["logit"]).any():
                # accepting any token now would abort the process inside llama.cpp
                self._all["id"] = np.arange(self._n_vocab, dtype=np.int32)
                raise InputError("no token fits the output constraint here: the grammar allows nothing more, "
                                 "or the model produced NaN logits",
                                 "check the task card's grammar / JSON schema, or the adapter's scale")
            llama_cpp.llama_sampler_apply(self.ptr, ctypes.byref(arr))
            tok = int(self._all["id"][arr.selected])
        self._all["id"] = np.arange(self._n_vocab, dtype=np.int32)  # samplers may reorder the buffer
        llama_cpp.llama_sampler_accept(self.grammar, tok)
        llama_cpp.llama_sampler_accept(self.ptr, tok)
        return tok

    def close(self) -> None:
        for attr in ("ptr", "grammar"):
            h = getattr(self, attr, None)
            if h:
                llama_cpp.llama_sampler_free(h)
                setattr(self, attr, None)

    def __del__(self) -> None:
        self.close()
