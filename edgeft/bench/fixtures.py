"""Adapters and models the bench measures when the user gives none: random LoRA adapters written
with numpy + gguf for any base, and a merged model (one adapter folded into a copy of the base).

`write_random_adapter` and `merge_adapter` are public so tests and other tools can use them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import InputError

ALL7 = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
TARGET_SETS = {
    "all7": ALL7,
    "attn4": ("attn_q", "attn_k", "attn_v", "attn_output"),
    "attn_qv": ("attn_q", "attn_v"),
    "ffn3": ("ffn_gate", "ffn_up", "ffn_down"),
}
ADAPTER_DTYPES = ("f32", "f16", "q8_0")


def write_random_adapter(path: str | os.PathLike, base_path: str | os.PathLike, *, rank: int = 8,
                         targets: Iterable[str] = ALL7, seed: int = 0, b_std: float = 0.02,
                         alpha: float | None = None, dtype: Any = np.float32, arch: str | None = None,
                         blocks: range | None = None, mutate: Callable[[dict], None] | None = None) -> Path:
    """Write a rank-`rank` LoRA adapter GGUF with random A and B (B != 0, so it changes the output)
    for the base's tensor shapes.

    dtype: np.float32 / "f32", np.float16 / "f16", or "q8_0" (lora_a in Q8_0; lora_b, whose rows
    hold only `rank` values, in f16, as llama.cpp's converter falls back for rows that are not a
    multiple of 32). `mutate(tensors)` may edit the {name: array} dict before writing (tests).
    """
    import gguf

    from ..files import atomic_path
    from ..gguf_info import base_info

    kind = {"f32": "f32", "float32": "f32", "f16": "f16", "float16": "f16", "q8_0": "q8_0"}.get(
        dtype if isinstance(dtype, str) else np.dtype(dtype).name)
    if kind is None:
        raise InputError(f"unsupported adapter dtype {dtype!r}", "use f32, f16 or q8_0")
    info = base_info(base_path)
    targets = tuple(targets)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for name, shape in info.tensors.items():
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight" or parts[2] not in targets:
            continue
        if blocks is not None and int(parts[1]) not in blocks:
            continue
        n_in, n_out = shape
        tensors[name + ".lora_a"] = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)  # PEFT [r, in]
        tensors[name + ".lora_b"] = (rng.standard_normal((n_out, rank)) * b_std).astype(np.float32)         # PEFT [out, r]
    if not tensors:
        raise InputError(f"none of the targets {', '.join(targets)} exist in {base_path}")
    if mutate:
        mutate(tensors)
    out = Path(path)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch or info.architecture)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha if alpha is not None else rank))
        for k, v in tensors.items():
            if kind == "f32" or v.dtype != np.float32:
                w.add_tensor(k, v)
            elif kind == "f16" or v.shape[-1] % 32:
                w.add_tensor(k, v.astype(np.float16))
            else:
                q = gguf.quants.quantize(v, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(k, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def _float(t) -> np.ndarray:
    """A GGUFReader tensor as float32 in numpy order (rows = ggml ne[1]): how tests read back what
    these fixtures and the merge wrote."""
    import gguf

    tt = t.tensor_type
    if tt == gguf.GGMLQuantizationType.F32:
        return np.asarray(t.data, dtype=np.float32)
    if tt == gguf.GGMLQuantizationType.F16:
        return np.asarray(t.data).astype(np.float32)
    return gguf.quants.dequantize(np.asarray(t.data), tt).astype(np.float32, copy=False)


def merge_adapter(base_path: str | os.PathLike, adapter_path: str | os.PathLike, out_path: str | os.PathLike,
                  *, scale: float = 1.0, quant: str = "auto") -> Path:
    """Write base + scale * alpha/r * B @ A as a plain model GGUF (a "merged" model for one task).

    `edgeft.convert.merge` does the work; ImportError where the workstation side is not
    installed (the bench then reports its merged-model rows as skipped). quant "auto" (merge's
    default): adapted tensors of 4/5-bit types become Q8_0, as `edgeft merge` ships them (in
    their own 4-bit type most of a LoRA delta rounds away), so the merged model is what a user
    would deploy, a little larger than the base; quant "same" keeps the base's types and size.
    """
    # The bench's one seam into the workstation side (edgeft.convert, an optional extra).
    from ..convert.merge import merge_adapter as convert_merge

    return convert_merge(base_path, adapter_path, out_path, scale=scale, quant=quant)
