"""Write planned LoRA pairs as a llama.cpp adapter GGUF (gguf.GGUFWriter, atomic).

llama.cpp scales each pair by `user_scale * alpha / r` with ONE file-wide alpha and r read from
the tensor. PEFT's per-module scales (rsLoRA's alpha/sqrt(r), alpha_pattern, rank_pattern, the
ranks of joined fused projections) are folded into lora_B so that user scale 1 reproduces PEFT:
`b *= peft_scale / (alpha / r)`. For plain LoRA the factor is exactly 1 and lora_B is written
untouched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edgeft.errors import ConversionError
from edgeft.files import atomic_path

from edgeft.files import publish
from edgeft.gguf_header import read_header
from .names import GGUFPair
from .problems import Problem

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_F16_MAX = 65504.0
_Q = gguf.GGMLQuantizationType


def runtime_scale(alpha: float, rank: int) -> float:
    """What llama.cpp multiplies a pair by at user scale 1."""
    return alpha / rank if alpha else 1.0


@dataclass
class OutTensor:
    name: str
    data: np.ndarray
    raw_dtype: gguf.GGMLQuantizationType | None   # None: float32/float16 by numpy dtype
    ggml_type: str
    shape: tuple[int, ...]                        # logical shape, numpy order


def fold(pairs: list[GGUFPair], alpha: float) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """-> [(base tensor name, a, b with PEFT scales folded in)] for a file-wide alpha."""
    out = []
    for p in pairs:
        factor = p.col_scale / runtime_scale(alpha, p.rank)
        if np.all(factor == 1.0):
            b = p.b
        else:
            b = (p.b.astype(np.float64) * factor[None, :]).astype(np.float32)
        out.append((p.name, p.a, b))
    return out


def encode(name: str, arr: np.ndarray, outtype: str) -> OutTensor:
    """One tensor in the output type. q8_0 needs rows of 32k values; other rows go f16, as llama.cpp's converter does."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if outtype == "f32":
        return OutTensor(name, arr, None, "F32", arr.shape)
    if outtype == "q8_0" and arr.shape[-1] % gguf.GGML_QUANT_SIZES[_Q.Q8_0][0] == 0:
        return OutTensor(name, gguf.quants.quantize(arr, _Q.Q8_0), _Q.Q8_0, "Q8_0", arr.shape)
    if outtype == "bf16":
        return OutTensor(name, gguf.quants.quantize(arr, _Q.BF16), _Q.BF16, "BF16", arr.shape)
    return OutTensor(name, arr.astype(np.float16), None, "F16", arr.shape)


def encode_all(folded: list[tuple[str, np.ndarray, np.ndarray]], outtype: str) -> tuple[list[OutTensor], list[Problem]]:
    """Encode every lora_a/lora_b; f16 overflow is a problem, found before anything is written."""
    if outtype not in OUTTYPES:
        return [], [Problem(f"unknown output type '{outtype}'", f"use one of {', '.join(OUTTYPES)}")]
    tensors: list[OutTensor] = []
    problems: list[Problem] = []
    for name, a, b in folded:
        for suffix, arr in ((".lora_a", a), (".lora_b", b)):
            if outtype in ("f16", "q8_0") and arr.size and float(np.abs(arr).max()) > _F16_MAX:
                problems.append(Problem(f"'{name}{suffix}' has values beyond float16's range ({float(np.abs(arr).max()):.3g})",
                                        "convert with --outtype f32"))
                continue
            tensors.append(encode(name + suffix, arr, outtype))
    return tensors, problems


def write_adapter(path: str | os.PathLike, tensors: list[OutTensor], *, arch: str, alpha: float,
                  name: str | None = None) -> int:
    """Write the adapter GGUF atomically (a temp file renamed into place); returns its size.

    The file is read back (header only, milliseconds) and compared with what was meant before it
    takes its name: metadata, every tensor's name, type and shape, data inside the file.
    """
    target = Path(path)
    with atomic_path(target) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        if name:
            w.add_name(name)
        for t in tensors:
            w.add_tensor(t.name, t.data, raw_dtype=t.raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        _check_written(tmp, tensors, arch, alpha)
        publish(tmp)
    return target.stat().st_size


def _check_written(path: Path, tensors: list[OutTensor], arch: str, alpha: float) -> None:
    h = read_header(path)  # raises on truncation or data beyond the end of the file
    kv = h.kv
    wrong = []
    if (kv.get(gguf.Keys.General.TYPE), kv.get(gguf.Keys.Adapter.TYPE), h.architecture) != (gguf.GGUFType.ADAPTER, "lora", arch):
        wrong.append("metadata")
    if kv.get(gguf.Keys.Adapter.LORA_ALPHA) != np.float32(alpha):
        wrong.append("alpha")
    if list(h.tensors) != [t.name for t in tensors]:
        wrong.append("tensor names")
    for t in tensors:
        info = h.tensors.get(t.name)
        if info is None or info.type.name != t.ggml_type or info.shape != tuple(reversed(t.shape)):
            wrong.append(t.name)
    if wrong:
        raise ConversionError(f"the adapter GGUF read back differs from what was written ({', '.join(wrong[:5])})",
                              "this is a bug in edgeft's converter; please report it")
