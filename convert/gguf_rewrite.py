"""Rewrite a GGUF with some tensors replaced: everything else is copied byte for byte.

Merging and quantizing change a few tensors (or their types) and must keep the rest (tokenizer,
chat template, every other tensor) exactly as it was. Metadata entries are copied verbatim from
the source file; only keys given in `kv_set` are re-encoded. Tensor data is streamed (one tensor
in memory at a time) into a temp file renamed into place at the end.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from edgeft.files import atomic_path

from edgeft.files import publish
from edgeft.gguf_header import GGUFHeader, tensor_bytes

_VT = gguf.GGUFValueType
_FMT = {_VT.UINT8: "B", _VT.INT8: "b", _VT.UINT16: "H", _VT.INT16: "h", _VT.UINT32: "I", _VT.INT32: "i",
        _VT.FLOAT32: "f", _VT.BOOL: "?", _VT.UINT64: "Q", _VT.INT64: "q", _VT.FLOAT64: "d"}

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, tensor name)


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def encode_kv(key: str, vtype: gguf.GGUFValueType, value: Any) -> bytes:
    """One metadata entry (scalars and strings only)."""
    out = _str(key) + struct.pack("<I", int(vtype))
    if vtype == _VT.STRING:
        return out + _str(str(value))
    return out + struct.pack("<" + _FMT[vtype], value)


def nbytes_for(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, tsize = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * tsize


def rewrite_gguf(src: GGUFHeader, dst: str | os.PathLike, *, types: dict[str, gguf.GGMLQuantizationType],
                 produce: Callable[[str], np.ndarray], kv_set: dict[str, tuple] | None = None,
                 progress: Progress | None = None) -> int:
    """Copy `src` to `dst`; tensors named in `types` get that type and the bytes `produce(name)` returns.

    `kv_set`: {key: (GGUFValueType, value)} to add or replace. Returns the size of the new file.
    """
    kv_set = dict(kv_set or {})
    align = src.alignment
    infos = []
    off = 0
    for t in src.tensors.values():
        qt = types.get(t.name, t.type)
        n = nbytes_for(t.shape, qt) if t.name in types else t.n_bytes
        infos.append((t, qt, off, n))
        off += (n + align - 1) // align * align
    total = sum(n for *_, n in infos)
    target = Path(dst)
    with atomic_path(target) as tmp, open(tmp, "wb") as f, open(src.path, "rb") as fin:
        keys = list(src.kv_spans)
        new_keys = [k for k in kv_set if k not in src.kv_spans]
        f.write(b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(keys) + len(new_keys)))
        for k in keys:
            if k in kv_set:
                f.write(encode_kv(k, *kv_set[k]))
            else:
                a, b = src.kv_spans[k]
                fin.seek(a)
                f.write(fin.read(b - a))
        for k in new_keys:
            f.write(encode_kv(k, *kv_set[k]))
        for t, qt, o, _ in infos:
            f.write(_str(t.name) + struct.pack("<I", len(t.shape)))
            f.write(struct.pack(f"<{len(t.shape)}Q", *t.shape))
            f.write(struct.pack("<IQ", int(qt), o))
        f.write(b"\0" * (-f.tell() % align))
        done = 0
        for t, qt, o, n in infos:
            if t.name in types:
                data = np.ascontiguousarray(produce(t.name))
                if data.nbytes != n:
                    raise ValueError(f"{t.name}: produced {data.nbytes} bytes, {qt.name} {t.shape} needs {n}")
                f.write(memoryview(data).cast("B"))
            else:
                raw = tensor_bytes(src, t.name)
                for i in range(0, n, 64 << 20):
                    f.write(raw[i:i + (64 << 20)].tobytes())
            f.write(b"\0" * (-n % align))
            done += n
            if progress:
                progress(done, total, t.name)
        f.flush()
        publish(tmp)
    return target.stat().st_size
