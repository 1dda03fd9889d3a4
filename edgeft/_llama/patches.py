"""What edgeft's llama.cpp patches (cmake/patches) give this build, found by the symbols it
exports (feature detection, not version guessing): the patch level, per-sequence adapter scales
(0003), LoRA fused in decode batches (0004), and the CPU backend's fused-chain counter (0002)."""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import llama_cpp


def patch_level() -> int:
    """Which of edgeft's llama.cpp patches (cmake/patches) this build carries: 0 for a stock
    build, 1 when swapping same-shape adapter sets skips the scheduler re-reserve, 3 when the
    CPU backend also fuses each adapter's LoRA ops for single-token decode (2: an earlier
    version of that fusion, wrong on repacked bases, which edgeft turns off), 4 when adapters
    also take per-sequence scales (patch 0003: mixed adapter sets in one batch), 5 when a
    batch's decode steps also fuse LoRA token by token (patch 0004), 6 when single-token fused
    LoRA also fetches the adapter's rows ahead (patch 0005: same results, faster), 7 when the
    attention of a batch's decode steps also runs over each row's own KV cells only (patch 0006)."""
    fn = getattr(llama_cpp.llama_cpp._lib, "edgeft_llama_patch_level", None)
    if fn is None:
        return 0
    fn.restype, fn.argtypes = ctypes.c_int32, []
    return int(fn())


def mixed_adapter_batches() -> bool:
    """Whether this build decodes sequences under different adapter sets in one batch: patch
    0003 gives each adapter per-sequence scales (`edgeft_llama_set_adapter_seq_scales`)."""
    return seq_scales_fn() is not None


@functools.cache
def _context_switch(name: str) -> Any:
    """A patch's `int32_t name(llama_context *, int32_t on)`, or None when the build lacks it."""
    fn = getattr(llama_cpp.llama_cpp._lib, name, None)
    if fn is not None:
        fn.restype, fn.argtypes = ctypes.c_int32, [ctypes.c_void_p, ctypes.c_int32]
    return fn


def rows_fusion_fn() -> Any:
    """Patch 0004's setting: LoRA products of a batch step token by token."""
    return _context_switch("edgeft_llama_set_lora_rows_fusion")


def attn_rows_fn() -> Any:
    """Patch 0006's setting: a batch step's attention over each row's own KV cells."""
    return _context_switch("edgeft_llama_set_attn_rows_fusion")


@functools.cache
def seq_scales_fn() -> Any:
    fn = getattr(llama_cpp.llama_cpp._lib, "edgeft_llama_set_adapter_seq_scales", None)
    if fn is not None:
        fn.restype = ctypes.c_int32
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int32]
    return fn


def _cpu_fusion_on() -> bool:
    """ggml's switch for all its CPU fusions, edgeft's patched ones included."""
    return os.environ.get("GGML_CPU_DISABLE_FUSION", "").strip() != "1"


def lora_decode_fused() -> bool:
    """Whether decode on the CPU runs each adapter's LoRA ops as one fused op (patch 0002), as
    opposed to four graph nodes per adapted matrix. GGML_CPU_DISABLE_FUSION=1 (ggml's switch
    for all its CPU fusions) turns it off."""
    return patch_level() >= 3 and _cpu_fusion_on()


def lora_decode_path() -> str:
    """How decode runs an adapter's LoRA ops on this build, in words (`edgeft doctor`)."""
    level = patch_level()
    if not lora_decode_fused():
        return "graph ops (this build has an old patch 0002: rerun ./setup.sh)" if level == 2 else "graph ops"
    return ("fused (patch 0002, prefetched: 0005; decode batches: 0004)" if level >= 6 else
            "fused (patch 0002; decode batches: 0004)" if level >= 5 else
            "fused (patch 0002)")


def batch_attention_own_cells() -> bool:
    """Whether a step of several answers runs attention over each row's own KV cells (patch
    0006), summing them in their order in the buffer: a row's result then depends on its cells'
    order, not on where they sit. llama.cpp's ops sum over every cell, in SIMD lanes chosen by
    each cell's index, so moving an answer's cells changes its sums."""
    return patch_level() >= 7 and _cpu_fusion_on()


def batch_attention_path() -> str:
    """How a step of several answers runs attention on this build, in words (`edgeft doctor`)."""
    if batch_attention_own_cells():
        return "each row over its own KV cells (patch 0006)"
    return "every cell of the shared KV buffer, masked"


def _turn_off_broken_fusion() -> None:
    """Patch level 2 fused LoRA chains into mul_mat's kernel even where the base's weights are
    repacked (Q4_0, Q4_K, IQ4_NL on AVX2/NEON) and another kernel computes that product: NaN
    logits. ggml reads GGML_CPU_DISABLE_FUSION once, when its CPU backend starts (the first model
    load), so a build that old still gives right answers, only without the fusion, until
    ./setup.sh rebuilds it."""
    if patch_level() == 2:
        os.environ["GGML_CPU_DISABLE_FUSION"] = "1"


_turn_off_broken_fusion()


@functools.cache
def _ggml_cpu_lib() -> ctypes.CDLL | None:
    """The ggml CPU backend library that libllama runs on, if it is loaded. Wheels may hold
    copies of it under several names (libggml-cpu.so, .so.0, ...); opening another copy would
    load a second instance, so only an already loaded one is taken (RTLD_NOLOAD), by soname
    first."""
    lib_path = getattr(llama_cpp.llama_cpp._lib, "_name", None)
    if not lib_path:
        return None
    folder = os.path.dirname(lib_path)
    try:
        files = sorted((f for f in os.listdir(folder) if "ggml-cpu" in f), key=len, reverse=True)
    except OSError:
        files = []
    candidates = ["libggml-cpu.so.0", "libggml-cpu.0.dylib", *(os.path.join(folder, f) for f in files)]
    mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 1)
    for name in candidates:
        try:
            return ctypes.CDLL(name, mode=mode)
        except OSError:
            continue
    return None


def _cpu_counter(name: str) -> int | None:
    """A counter the patched CPU backend exports (`int64_t name(void)`), None without it."""
    lib = _ggml_cpu_lib()
    fn = getattr(lib, name, None) if lib is not None else None
    if fn is None:
        return None
    fn.restype, fn.argtypes = ctypes.c_int64, []
    return int(fn())


def lora_fused_chains() -> int | None:
    """How many single-token LoRA chains the CPU backend has fused in this process (patch
    0002), or None when the build has no such counter. Tests use it to see the fusion engage."""
    return _cpu_counter("ggml_cpu_lora_fused_chains")


def attn_rows_fusions() -> int | None:
    """How many decode-batch attentions (one per layer and step) the CPU backend has run over
    each row's own KV cells in this process (patch 0006), or None when the build has no such
    counter. Tests use it to see the fusion engage."""
    return _cpu_counter("ggml_cpu_attn_rows_fusions")
