"""A fast GGUF header reader: metadata scalars and tensor infos, without parsing big arrays.

`gguf.GGUFReader` builds a Python object for every element of every array, which takes 2.2 s
on SmolLM2's 49k-token tokenizer; the runtime and the converter need only the architecture, a
few head counts and the tensor table, so they walk the header here in a few milliseconds (large
arrays are skipped, not decoded). Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edgeft.errors import ConversionError, EdgeftError

_VT = gguf.GGUFValueType
_SCALAR = {_VT.UINT8: "<B", _VT.INT8: "<b", _VT.UINT16: "<H", _VT.INT16: "<h", _VT.UINT32: "<I",
           _VT.INT32: "<i", _VT.FLOAT32: "<f", _VT.BOOL: "<?", _VT.UINT64: "<Q", _VT.INT64: "<q",
           _VT.FLOAT64: "<d"}
_SIZE = {k: struct.calcsize(v) for k, v in _SCALAR.items()}
_U64 = struct.Struct("<Q")
SMALL_ARRAY = 1024  # arrays up to this many elements are decoded; longer ones are skipped


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]          # ggml order: shape[0] (ne0) is the row length / input features
    type: gguf.GGMLQuantizationType
    offset: int                     # absolute file offset of the data
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    kv: dict[str, Any]              # scalars and small arrays; big arrays map to SkippedArray
    kv_types: dict[str, tuple]      # key -> (value type, array item type or None)
    kv_span: tuple[int, int]        # byte range of the key/value section
    kv_spans: dict[str, tuple[int, int]]  # key -> byte range of its entry (copied verbatim by rewrites)
    tensors: dict[str, TensorInfo]  # in file order
    alignment: int
    data_start: int

    @property
    def architecture(self) -> str | None:
        return self.kv.get(gguf.Keys.General.ARCHITECTURE)

    def arch_value(self, key: str, default=None):
        """`{arch}.<key>` (e.g. `attention.head_count`)."""
        return self.kv.get(f"{self.architecture}.{key}", default)


@dataclass(frozen=True)
class SkippedArray:
    item_type: gguf.GGUFValueType
    count: int


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int):
        end = self.pos + n
        if end > len(self.buf):
            raise ConversionError(f"{self.path} is truncated (GGUF header runs past the end of the file)",
                                  "fetch or convert the file again")
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def scalar(self, vt):
        fmt = _SCALAR[vt]
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += _SIZE[vt]
        return v

    def u32(self) -> int:
        return self.scalar(_VT.UINT32)

    def u64(self) -> int:
        return self.scalar(_VT.UINT64)

    def string(self) -> str:
        n = self.u64()
        return bytes(self.take(n)).decode("utf-8", "replace")


def _value(c: _Cursor, vt: int):
    vt = _VT(vt)
    if vt == _VT.STRING:
        return c.string(), (vt, None)
    if vt == _VT.ARRAY:
        it = _VT(c.u32())
        n = c.u64()
        if n > (len(c.buf) - c.pos) // max(1, 8 if it == _VT.STRING else _SIZE.get(it, 1)):
            raise ConversionError(f"{c.path}: a GGUF array claims {n} items, more than the file holds",
                                  "the file is damaged; fetch or convert it again")
        if it == _VT.STRING:
            if n <= SMALL_ARRAY:
                return [c.string() for _ in range(n)], (vt, it)
            unpack, buf, pos = _U64.unpack_from, c.buf, c.pos  # the hot loop: ~100k tokenizer strings
            for _ in range(n):
                pos += 8 + unpack(buf, pos)[0]
            c.pos = pos
            return SkippedArray(it, n), (vt, it)
        if it == _VT.ARRAY:
            raise ConversionError(f"{c.path}: nested GGUF arrays are not supported")
        size = _SIZE[it] * n
        if n <= SMALL_ARRAY:
            vals = list(struct.unpack_from("<" + _SCALAR[it][1] * n, c.buf, c.pos))
            c.pos += size
            return vals, (vt, it)
        c.pos += size
        return SkippedArray(it, n), (vt, it)
    return c.scalar(vt), (vt, None)


def read_header(path: str | os.PathLike, error: type[EdgeftError] = ConversionError) -> GGUFHeader:
    """Parse the header of a GGUF file; any problem becomes an `error` naming the file."""
    try:
        return _read_header(Path(path))
    except ConversionError as e:
        if error is ConversionError:
            raise
        raise error(e.message, e.hint) from None


def _read_header(p: Path) -> GGUFHeader:
    if not p.is_file():
        raise ConversionError(f"GGUF file not found: {p}", "check the path")
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ConversionError(f"{p} is too small to be a GGUF file", "the file is truncated")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                return _parse(mm, p, size)
            except (struct.error, ValueError, UnicodeDecodeError, OverflowError, KeyError, TypeError,
                    ZeroDivisionError, IndexError, MemoryError) as e:
                raise ConversionError(f"{p} is not a valid GGUF file ({type(e).__name__}: {e})",
                                      "the file is damaged; fetch it again") from None


def _parse(mm, p: Path, size: int) -> GGUFHeader:
    c = _Cursor(mm, p)
    magic = bytes(c.take(4))
    if magic != b"GGUF":
        raise ConversionError(f"{p} is not a GGUF file (magic {magic!r})", "pass a .gguf file")
    version = c.u32()
    if version < 2:
        raise ConversionError(f"{p}: GGUF version {version} is too old", "convert the model again with a current llama.cpp")
    n_tensors, n_kv = c.u64(), c.u64()
    if n_kv > (size - c.pos) // 12 or n_tensors > (size - c.pos) // 24:   # each entry takes at least that
        raise ConversionError(f"{p}: the GGUF header claims {n_kv} keys and {n_tensors} tensors, more than the file holds",
                              "the file is damaged; fetch or convert it again")
    kv: dict[str, Any] = {}
    kv_types: dict[str, tuple] = {}
    kv_start = c.pos
    kv_spans: dict[str, tuple[int, int]] = {}
    for _ in range(n_kv):
        start = c.pos
        key = c.string()
        val, types = _value(c, c.u32())
        kv[key] = val
        kv_types[key] = types
        kv_spans[key] = (start, c.pos)
    kv_end = c.pos
    alignment = kv.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or not 1 <= alignment <= 1 << 16 \
            or alignment & (alignment - 1):
        raise ConversionError(f"{p}: general.alignment {alignment!r} is not a power of two", "the file is damaged")
    raw = []
    for _ in range(n_tensors):
        name = c.string()
        nd = c.u32()
        if not 1 <= nd <= 4:   # GGML_MAX_DIMS
            raise ConversionError(f"{p}: tensor '{name}' claims {nd} dimensions", "the file is damaged")
        shape = tuple(c.u64() for _ in range(nd))
        ttype = gguf.GGMLQuantizationType(c.u32())
        off = c.u64()
        raw.append((name, shape, ttype, off))
    data_start = (c.pos + alignment - 1) // alignment * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, ttype, off in raw:
        block, tsize = gguf.GGML_QUANT_SIZES[ttype]
        n = 1
        for d in shape:
            n *= d
        nbytes = n // block * tsize
        start = data_start + off
        if start + nbytes > size:
            raise ConversionError(f"{p}: tensor '{name}' lies beyond the end of the file",
                                  "the file is truncated; fetch or convert it again")
        tensors[name] = TensorInfo(name, shape, ttype, start, nbytes)
    return GGUFHeader(p, version, kv, kv_types, (kv_start, kv_end), kv_spans, tensors, alignment, data_start)


def tensor_bytes(h: GGUFHeader, name: str) -> np.ndarray:
    """The raw data of one tensor (uint8, memory-mapped: nothing is read until used)."""
    t = h.tensors[name]
    return np.memmap(h.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.n_bytes,))


def read_tensor(h: GGUFHeader, name: str) -> np.ndarray:
    """One tensor dequantized to float32, numpy order (shape reversed from ggml's ne)."""
    t = h.tensors[name]
    raw = tensor_bytes(h, name)
    shape = tuple(reversed(t.shape))
    if t.type == gguf.GGMLQuantizationType.F32:
        return np.array(raw.view(np.float32).reshape(shape))
    if t.type == gguf.GGMLQuantizationType.F16:
        return raw.view(np.float16).reshape(shape).astype(np.float32)
    block, tsize = gguf.GGML_QUANT_SIZES[t.type]
    rows = raw.reshape(-1, t.shape[0] // block * tsize)
    try:
        out = gguf.quants.dequantize(rows, t.type)
    except NotImplementedError:
        raise ConversionError(f"{h.path.name}: tensor '{name}' is {t.type.name}, which the gguf package cannot dequantize",
                              "use a base quantized with a type gguf can read (q4_0, q4_1, q5_x, q8_0, k-quants, f16)") from None
    return np.asarray(out, dtype=np.float32).reshape(shape)
