"""Merge adapter bundles into a base GGUF: W' = W + sum(scale * alpha/r * B @ A).

The adapters are read from their GGUF (already in the base's layout: q/k rows permuted, PEFT
scales folded), so the delta is exactly what llama.cpp adds at run time with the same user
scale. Only adapted tensors change; every other tensor and all metadata are copied byte for byte.

--quant auto (default): adapted tensors of 4/5-bit types become Q8_0, 8-bit and float ones keep
their type (a LoRA delta is smaller than a 4-bit quantization step and would round away).
--quant same: adapted tensors go back to their own type (numpy for the types gguf quantizes;
llama.cpp's quantizer otherwise). Other types re-quantize the whole model (`quantize` module).
The cost of merging is measured against base + hot adapters on the verify prompt set.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import gguf
import numpy as np

from edgeft.errors import ConversionError, InputError
from edgeft.gguf_info import inspect_adapter
from edgeft.models import resolve_base

from .bundle import base_info_from_header
from edgeft.gguf_header import GGUFHeader, read_header, read_tensor
from .gguf_rewrite import Progress, rewrite_gguf
from .lora_gguf import runtime_scale
from .quantize import (LLAMA_TYPES, NUMPY_TYPES, can_quantize, choose_type, encode, file_type_kv, llama_quantize,
                       normalize_type)

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
KEEP_ON_MERGE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0)  # types precise enough to hold a LoRA delta
_FLOAT = (Q.F32, Q.F16, Q.BF16)


@dataclass
class MergeResult:
    path: Path
    bytes: int
    merged: list[str]                       # base tensors that changed
    adapters: dict[str, float]              # adapter name -> scale
    quant: str
    engine: str                             # who quantized the merged tensors: "numpy" or "llama.cpp"
    cost: dict | None = None                # merged vs base + hot adapters (verify.compare)
    seconds: float = 0.0
    types: dict[str, str] = field(default_factory=dict)


def parse_adapters(specs: Sequence[str] | Mapping[str, float]) -> dict[str, float]:
    """["ner=1", "style=0.5"] / "ner,style=0.5" / {"ner": 1.0} -> {ref: scale}: the runtime's
    adapter syntax (edgeft.engine.parse_adapter_spec), with merge's own errors."""
    from edgeft.engine import parse_adapter_spec  # here: importing the engine loads llama.cpp

    try:
        out = parse_adapter_spec(specs)
    except InputError as e:
        raise ConversionError(e.message, e.hint) from None
    if not out:
        raise ConversionError("no adapter to merge", "pass --adapter NAME[=SCALE] (repeatable)")
    return out


def adapter_deltas(base_h: GGUFHeader, base_sha: str, adapters: dict[str, float], *, force: bool = False,
                   adapter_dirs: Sequence[str | os.PathLike] = ()) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Sum of scale * alpha/r * B @ A per base tensor (numpy order [rows, cols]); names of the bundles."""
    from edgeft.registry import find

    binfo = base_info_from_header(base_h)
    tied = "output.weight" not in base_h.tensors
    deltas: dict[str, np.ndarray] = {}
    names: dict[str, float] = {}
    for ref, scale in adapters.items():
        bundle = find(ref, adapter_dirs)
        sha = bundle.card.base.get("sha256")
        if sha and sha != base_sha and not force:
            raise ConversionError(f"adapter '{bundle.name}' was made for base {bundle.card.base.get('id', '?')} "
                                  f"(sha256 {sha[:12]}...), not this one ({base_sha[:12]}...)",
                                  "merge it into the base it was converted for, or pass --force if the weights are the same")
        info = inspect_adapter(bundle.gguf_path, binfo)  # architecture and shapes must fit
        ah = read_header(bundle.gguf_path)
        alpha = float(info.alpha or 0.0)
        for name in info.pairs:
            if name == "token_embd.weight" and tied:
                raise ConversionError(f"adapter '{bundle.name}' adapts token_embd, and this base ties its output layer "
                                      "to the embeddings", "llama.cpp cannot run it either; retrain without embed_tokens")
            try:
                a = read_tensor(ah, name + ".lora_a")
                b = read_tensor(ah, name + ".lora_b")
            except ConversionError as e:
                raise ConversionError(f"adapter '{bundle.name}': {e.message}",
                                      "convert the adapter again with --outtype f32, f16 or q8_0") from None
            rank = b.shape[1]
            s = scale * runtime_scale(alpha, rank)
            d = (a.astype(np.float64) @ b.T.astype(np.float64)) if name == "token_embd.weight" else \
                (b.astype(np.float64) @ a.astype(np.float64))
            d = (d * s).astype(np.float32)
            deltas[name] = deltas[name] + d if name in deltas else d
        names[bundle.name] = scale
    return deltas, names


def merge_adapters(base: str | os.PathLike | None, adapters: Sequence[str] | Mapping[str, float],
                   out: str | os.PathLike, *, quant: str = "auto", force: bool = False,
                   adapter_dirs: Sequence[str | os.PathLike] = (), report: bool = True,
                   threads: int | None = None, progress: Progress | None = None) -> MergeResult:
    """Merge adapters into `base` and write `out` (atomically); optionally measure the cost."""
    t0 = time.perf_counter()
    quant = quant.strip().lower()
    if quant not in ("same", "auto"):
        quant = normalize_type(quant)
    spec = parse_adapters(adapters)
    bm = resolve_base(base)
    out = Path(out)
    if out.exists() and out.resolve() == bm.path.resolve():
        raise ConversionError("the output would overwrite the base model", "choose another -o path")
    if out.is_dir():
        raise ConversionError(f"the output {out} is a folder", "give a file path ending in .gguf")
    if out.exists() and not force:
        raise ConversionError(f"{out} already exists", "pass --force to replace it")
    h = read_header(bm.path)
    deltas, names = adapter_deltas(h, bm.sha256, spec, force=force, adapter_dirs=adapter_dirs)

    def merged(name: str) -> np.ndarray:
        return read_tensor(h, name) + deltas[name]

    engine = "numpy"
    if quant == "auto":
        # A LoRA delta is smaller than a 4/5-bit quantization step: put back into such a type, most
        # of it rounds away (the shipped sentiment adapter merged into Q4_1 keeps 13% of its effect,
        # dev accuracy 0.355 instead of 0.885). Adapted tensors of such types become Q8_0 (91%,
        # 0.880); 8-bit and float tensors keep their type; every other tensor is copied.
        types = {n: h.tensors[n].type if h.tensors[n].type in KEEP_ON_MERGE
                 else Q.Q8_0 if h.tensors[n].shape[0] % 32 == 0 else Q.F16 for n in deltas}
        rewrite_gguf(h, out, types=types, produce=lambda n: encode(merged(n), types[n]), progress=progress)
    elif quant == "same":
        types = {n: h.tensors[n].type for n in deltas}
        hard = sorted({t.name for t in types.values() if not can_quantize(t)})
        if not hard:
            rewrite_gguf(h, out, types=types, produce=lambda n: encode(merged(n), types[n]), progress=progress)
        else:  # k-/i-quants: merged tensors in f32, then llama.cpp re-applies the base's own type mixture
            ftype = h.kv.get(gguf.Keys.General.FILE_TYPE)
            if ftype is None:
                raise ConversionError(f"the base's {'/'.join(hard)} tensors need llama.cpp's quantizer and the base "
                                      "does not record its file type", "pass --quant q4_k_m (or another type)")
            _via_llama(h, out, deltas, merged, gguf.LlamaFileType(int(ftype)), threads, progress)
            engine = "llama.cpp"
    elif quant in NUMPY_TYPES:
        target, ftype = NUMPY_TYPES[quant]
        types = {}
        for n, t in h.tensors.items():
            new = choose_type(h, n, target)
            if new != t.type or n in deltas:
                types[n] = new
        rewrite_gguf(h, out, types=types,
                     produce=lambda n: encode(merged(n) if n in deltas else read_tensor(h, n), types[n]),
                     kv_set=file_type_kv(ftype), progress=progress)
    else:
        _via_llama(h, out, deltas, merged, LLAMA_TYPES[quant], threads, progress)
        engine = "llama.cpp"
    res_h = read_header(out)
    kinds: dict[str, str] = {n: res_h.tensors[n].type.name for n in deltas}
    result = MergeResult(out, out.stat().st_size, sorted(deltas), names, quant, engine,
                         seconds=time.perf_counter() - t0, types=kinds)
    if report:
        result.cost = merge_cost(bm.path, out, spec, adapter_dirs=adapter_dirs, threads=threads)
    result.seconds = time.perf_counter() - t0
    return result


def _via_llama(h: GGUFHeader, out: Path, deltas, merged, ftype: gguf.LlamaFileType, threads, progress) -> None:
    with tempfile.TemporaryDirectory(prefix=".edgeft-merge-", dir=out.parent if out.parent.exists() else None) as tmp:
        inter = Path(tmp) / "merged-f32.gguf"
        rewrite_gguf(h, inter, types={n: Q.F32 for n in deltas}, produce=merged, progress=progress)
        llama_quantize(inter, out, ftype, threads=threads, allow_requantize=True)


def merge_cost(base_path: str | os.PathLike, merged_path: str | os.PathLike, adapters: dict[str, float], *,
               adapter_dirs: Sequence[str | os.PathLike] = (), threads: int | None = None) -> dict:
    """Top-1 agreement and KL of the merged model vs the base with the adapters hot, on the prompt set."""
    from edgeft.engine import Engine

    from .verify import compare, engine_logits, prompt_tokens

    n_threads = threads or min(2, os.cpu_count() or 1)
    with Engine(str(base_path), n_ctx=1024, n_threads=n_threads, adapter_dirs=adapter_dirs) as eng:
        toks = prompt_tokens(eng)
        eng.use(None)
        plain = [engine_logits(eng, t) for t in toks]
        for ref in adapters:  # refs as the user gave them: names, folders or .gguf paths
            eng.load_adapter(ref, force=True)
        eng.use(dict(adapters))
        hot = [engine_logits(eng, t) for t in toks]
    with Engine(str(merged_path), n_ctx=1024, n_threads=n_threads) as eng:
        eng.use(None)
        cold = [engine_logits(eng, t) for t in toks]
    res = {"prompts": len(toks), "merged_vs_hot": compare(hot, cold), "adapter_effect": compare(plain, hot)}
    res["adapter_kept"] = adapter_kept(res["merged_vs_hot"]["top1"], res["adapter_effect"]["top1"])
    return res


def adapter_kept(merged_vs_hot_top1: float, base_vs_hot_top1: float) -> float | None:
    """Share of the adapter's top-1 changes the merged model reproduces: 1 when it agrees with
    base + hot adapters everywhere, 0 when it agrees no more often than the bare base does.
    Re-quantizing to a 4-bit type rounds most of a LoRA delta away (it is smaller than the
    quantization step), which this makes visible."""
    moved = 1.0 - base_vs_hot_top1
    if moved <= 0:
        return None
    return round(max(0.0, (merged_vs_hot_top1 - base_vs_hot_top1) / moved), 4)


def merge_adapter(base_path: str | os.PathLike, adapter_path: str | os.PathLike, out: str | os.PathLike, *,
                  scale: float = 1.0, quant: str = "auto") -> Path:
    """One adapter (bundle folder or .gguf) merged into a base file, no cost report; returns `out`.

    The simple form the runtime's benchmark calls; `merge_adapters` is the full one.
    """
    res = merge_adapters(str(base_path), {str(adapter_path): scale}, out, quant=quant, force=True, report=False)
    return res.path
