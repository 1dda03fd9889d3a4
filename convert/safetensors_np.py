"""Read a .safetensors file into numpy arrays, bf16 included, without torch.

The format is an 8-byte little-endian header length, a JSON header
`{name: {dtype, shape, data_offsets: [begin, end]}}` and the raw little-endian data. numpy has
no bfloat16: bf16 is widened to float32 exactly (the 16 bits are the top half of a float32).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from edgeft.errors import ConversionError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_MAX_HEADER = 100 << 20


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str], dict]:
    """-> (arrays as float32 for float dtypes, source dtype per name, __metadata__).

    Unknown dtypes (fp8, ...) raise a ConversionError naming the tensors.
    """
    p = Path(path)
    data = p.read_bytes()
    if len(data) < 8:
        raise ConversionError(f"{p} is not a safetensors file (too short)", "save the adapter again")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > min(_MAX_HEADER, len(data) - 8):
        raise ConversionError(f"{p} is not a safetensors file (bad header length)", "save the adapter again")
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, RecursionError) as e:
        raise ConversionError(f"{p}: the safetensors header is not valid JSON: {type(e).__name__}: {e}",
                              "save the adapter again") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{p}: the safetensors header is not a JSON object", "save the adapter again")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        meta = {}
    spans: list[tuple[int, int, str]] = []
    base = 8 + n
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    bad: list[str] = []
    for name, info in header.items():
        try:
            dt, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in [*shape, begin, end]):
                raise TypeError("shape and data_offsets must be non-negative integers")
            if not isinstance(dt, str) or len(shape) > 8:
                raise TypeError("bad dtype or too many dimensions")
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{p}: malformed header entry for '{name}'", "save the adapter again") from None
        spans.append((begin, end, name))
        np_dt = _DTYPES.get(dt)
        if np_dt is None:
            bad.append(f"{name} ({dt})")
            continue
        count = int(np.prod(shape)) if shape else 1
        if end - begin != count * np.dtype(np_dt).itemsize or begin < 0 or base + end > len(data):
            raise ConversionError(f"{p}: tensor '{name}' has a wrong size or lies beyond the end of the file",
                                  "the file is truncated or damaged; save the adapter again")
        arr = np.frombuffer(data, dtype=np_dt, count=count, offset=base + begin).reshape(shape)
        if dt == "BF16":
            arr = bf16_to_f32(arr)
        elif arr.dtype.kind == "f" and arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        arrays[name] = arr
        dtypes[name] = dt.lower()
    if bad:
        raise ConversionError(f"{p}: unsupported tensor dtype(s): {', '.join(bad[:5])}",
                              "save the adapter in float32, float16 or bfloat16")
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ConversionError(f"{p}: tensors '{n0}' and '{n1}' overlap in the file",
                                  "the file is damaged; save the adapter again")
    return arrays, dtypes, meta


_NAMES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
          np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
          np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None,
                      bf16: set[str] = frozenset()) -> None:
    """Write arrays as .safetensors; names in `bf16` are stored as bfloat16 (rounded to nearest even)."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, off = [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if name in bf16:
            bits = arr.astype(np.float32).view(np.uint32)
            blob = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()
            dt = "BF16"
        else:
            blob, dt = arr.tobytes(), _NAMES[arr.dtype]
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
