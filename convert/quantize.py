"""Quantize a base model GGUF: which tensor gets which type, and who computes it.

The types the `gguf` package quantizes itself (bit-exact with ggml's reference code): f32, f16,
bf16, q8_0, q4_0, q4_1, q5_0, q5_1 are done here in numpy, tensor by tensor with progress.
K-quants (q4_k_m, q5_k_m, q6_k, ...) and i-quants need llama.cpp's own quantizer
(`llama_model_quantize`, reached through `edgeft._llama.quantize_model`).

Type choice follows llama.cpp for these types: 1-D tensors and norms stay f32; the output
projection (token_embd when the embeddings are tied) gets q8_0 in place of llama.cpp's q6_k,
which numpy cannot produce; everything else gets the requested type. A tensor already of the
target type is copied, never re-quantized.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edgeft.errors import ConversionError

from edgeft.files import publish
from edgeft.gguf_header import GGUFHeader, read_header, read_tensor
from .gguf_rewrite import Progress, rewrite_gguf

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType

# Types numpy (the gguf package) quantizes: name -> (tensor type, file type)
NUMPY_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, FT.ALL_F32), "f16": (Q.F16, FT.MOSTLY_F16), "bf16": (Q.BF16, FT.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, FT.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, FT.MOSTLY_Q4_0), "q4_1": (Q.Q4_1, FT.MOSTLY_Q4_1),
    "q5_0": (Q.Q5_0, FT.MOSTLY_Q5_0), "q5_1": (Q.Q5_1, FT.MOSTLY_Q5_1),
}
# Types only llama.cpp's quantizer makes: name -> file type
LLAMA_TYPES: dict[str, gguf.LlamaFileType] = {
    "q2_k": FT.MOSTLY_Q2_K, "q3_k_s": FT.MOSTLY_Q3_K_S, "q3_k_m": FT.MOSTLY_Q3_K_M, "q3_k_l": FT.MOSTLY_Q3_K_L,
    "q4_k_s": FT.MOSTLY_Q4_K_S, "q4_k_m": FT.MOSTLY_Q4_K_M, "q5_k_s": FT.MOSTLY_Q5_K_S,
    "q5_k_m": FT.MOSTLY_Q5_K_M, "q6_k": FT.MOSTLY_Q6_K, "iq4_nl": FT.MOSTLY_IQ4_NL, "iq4_xs": FT.MOSTLY_IQ4_XS,
}
ALL_TYPES = tuple(NUMPY_TYPES) + tuple(LLAMA_TYPES)
_FLOAT = (Q.F32, Q.F16, Q.BF16)


def normalize_type(name: str) -> str:
    n = name.strip().lower().replace("-", "_")
    if n not in NUMPY_TYPES and n not in LLAMA_TYPES:
        raise ConversionError(f"unknown quantization type '{name}'", f"use one of {', '.join(ALL_TYPES)}")
    return n


def can_quantize(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether the gguf package can produce this tensor type."""
    return qtype in {t for t, _ in NUMPY_TYPES.values()}


def output_tensor_name(h: GGUFHeader) -> str:
    return "output.weight" if "output.weight" in h.tensors else "token_embd.weight"


def choose_type(h: GGUFHeader, name: str, target: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The type one tensor gets when the model is quantized to `target` (see the module doc)."""
    t = h.tensors[name]
    if len(t.shape) < 2 or not name.endswith(".weight") or "norm" in name:
        return t.type
    if target not in _FLOAT and target != Q.Q8_0 and name == output_tensor_name(h):
        target = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[target][0]
    if t.shape[0] % block:
        return Q.F16 if t.type not in _FLOAT else t.type  # rows that do not split into blocks
    return target


def encode(arr: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """float32 [rows, cols] -> the raw bytes of `qtype` (numpy)."""
    if qtype == Q.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)


@dataclass
class QuantizeResult:
    path: Path
    bytes: int
    types: dict[str, int]   # tensor type name -> count
    engine: str             # "numpy" or "llama.cpp"


def quantize_model(src: str | os.PathLike, dst: str | os.PathLike, qtype: str, *, progress: Progress | None = None,
                   threads: int | None = None, force: bool = False) -> QuantizeResult:
    """Quantize a base GGUF to `qtype`; metadata and untouched tensors are copied as they are."""
    qtype = normalize_type(qtype)
    h = read_header(src)
    if h.kv.get("general.type") == "adapter":
        raise ConversionError(f"{Path(src).name} is a LoRA adapter, not a base model",
                              "adapters are written in their dtype by `edgeft convert --outtype f16|q8_0`")
    dst = Path(dst)
    _check_output(Path(src), dst, force)
    if qtype in LLAMA_TYPES:
        llama_quantize(Path(src), dst, LLAMA_TYPES[qtype], threads=threads, allow_requantize=True)
        return _result(dst, "llama.cpp")
    target, ftype = NUMPY_TYPES[qtype]
    types = {}
    for name, t in h.tensors.items():
        new = choose_type(h, name, target)
        if new != t.type:
            types[name] = new
    for name, new in types.items():
        if h.tensors[name].type not in _FLOAT and not _can_dequantize(h.tensors[name].type):
            raise ConversionError(f"tensor '{name}' is {h.tensors[name].type.name}, which the gguf package cannot read",
                                  "quantize from an f16/f32 model")
    requant = sorted({h.tensors[n].type.name for n in types if h.tensors[n].type not in _FLOAT and types[n] not in _FLOAT})
    if requant:
        log.warning("re-quantizing %s tensors: quality is better when quantizing from an f16/f32 model", "/".join(requant))
    rewrite_gguf(h, dst, types=types, produce=lambda n: encode(read_tensor(h, n), types[n]),
                 kv_set=file_type_kv(ftype), progress=progress)
    return _result(dst, "numpy")


def file_type_kv(ftype: gguf.LlamaFileType) -> dict:
    """general.file_type and general.quantization_version, as llama.cpp's quantizer writes them."""
    return {gguf.Keys.General.FILE_TYPE: (gguf.GGUFValueType.UINT32, int(ftype)),
            gguf.Keys.General.QUANTIZATION_VERSION: (gguf.GGUFValueType.UINT32, gguf.GGML_QUANT_VERSION)}


def _can_dequantize(qt: gguf.GGMLQuantizationType) -> bool:
    try:
        gguf.quants.dequantize(np.zeros(gguf.GGML_QUANT_SIZES[qt][1], dtype=np.uint8), qt)
        return True
    except NotImplementedError:
        return False


def _check_output(src: Path, dst: Path, force: bool) -> None:
    if dst.exists() and dst.resolve() == src.resolve():
        raise ConversionError("the output would overwrite the input", "choose another -o path")
    if dst.is_dir():
        raise ConversionError(f"the output {dst} is a folder", "give a file path ending in .gguf")
    if dst.exists() and not force:
        raise ConversionError(f"{dst} already exists", "pass --force to replace it")


def _result(path: Path, engine: str) -> QuantizeResult:
    h = read_header(path)
    counts: dict[str, int] = {}
    for t in h.tensors.values():
        counts[t.type.name] = counts.get(t.type.name, 0) + 1
    return QuantizeResult(path, path.stat().st_size, counts, engine)


def llama_quantize(src: Path, dst: Path, ftype: gguf.LlamaFileType, *, threads: int | None = None,
                   allow_requantize: bool = True) -> None:
    """llama.cpp's quantizer (K-quants, i-quants and its per-tensor type mixtures), written atomically."""
    from edgeft import _llama
    from edgeft.files import atomic_path

    with atomic_path(dst) as tmp:
        _llama.quantize_model(str(src), str(tmp), int(ftype), nthread=threads or 0, allow_requantize=allow_requantize)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise ConversionError(f"llama.cpp's quantizer failed for {src.name}", "run with EDGEFT_VERBOSE=1 to see why")
        publish(tmp)
