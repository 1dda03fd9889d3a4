"""Read what the runtime must know about a GGUF file without handing it to llama.cpp.

llama.cpp aborts the whole process on some malformed inputs; everything here is checked with
the pure-Python `gguf` reader first, so a bad file becomes a clear error instead.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import AdapterError, ModelError, shown
from .gguf_header import read_header

_FLOAT_TYPES = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
# LoRA tensor types llama.cpp's adapter path runs; others (I32, F64, ...) crash it on load
LORA_TYPES = _FLOAT_TYPES | {gguf.GGMLQuantizationType.Q8_0}
MAX_ALPHA = 65536.0   # alpha / rank is the runtime scale; 3.4e38 makes llama.cpp abort (FACTS)


def _check_magic(path: Path, what: str, error: type) -> None:
    if not path.is_file():
        raise error(f"{what} not found: {path}", "check the path")
    if path.stat().st_size < 24:
        raise error(f"{what} {path} is too small to be a GGUF file ({path.stat().st_size} bytes)",
                    "the file is truncated; fetch or convert it again")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise error(f"{what} {path} is not a GGUF file (magic {magic!r})", "pass a .gguf file made by llama.cpp or edgeft")


def _open(path: Path, what: str, error: type) -> gguf.GGUFReader:
    _check_magic(path, what, error)
    # edgeft's own header reader first: bounded, it refuses a damaged header in milliseconds,
    # where gguf.GGUFReader can spin for a minute on one (a STRING key retyped as ARRAY)
    read_header(path, error=error)
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on damage
        raise error(f"{what} {path} is damaged: {type(e).__name__}: {e}",
                    "the file is truncated or corrupt; fetch or convert it again") from None


def field_value(reader: gguf.GGUFReader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:
        return None


def _check_bounds(reader: gguf.GGUFReader, path: Path, what: str, error: type) -> None:
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise error(f"{what} {path}: tensor '{t.name}' lies beyond the end of the file",
                        "the file is truncated; fetch or convert it again")


@dataclass(frozen=True)
class BaseInfo:
    path: Path
    architecture: str
    tensors: dict  # name -> ggml shape (ne order: ne0 = input features)
    name: str
    n_ctx_train: int | None


@functools.lru_cache(maxsize=8)
def _base_info_cached(path: str, size: int, mtime_ns: int) -> BaseInfo:
    p = Path(path)
    _check_magic(p, "base model", ModelError)
    h = read_header(p, error=ModelError)  # milliseconds; gguf.GGUFReader takes seconds on a tokenizer
    arch = h.architecture
    gtype = h.kv.get(gguf.Keys.General.TYPE)
    if gtype == "adapter":
        raise ModelError(f"{p} is a LoRA adapter, not a base model", "pass it with --adapter, and a base with --base")
    if not arch or not isinstance(arch, str):
        raise ModelError(f"base model {p} has no general.architecture", "the file is not a llama.cpp model")
    tensors = {name: tuple(int(x) for x in t.shape) for name, t in h.tensors.items()}
    n_ctx = h.arch_value("context_length")
    name = h.kv.get(gguf.Keys.General.NAME)
    return BaseInfo(p, arch, tensors, str(name) if isinstance(name, str) and name else p.stem,
                    int(n_ctx) if isinstance(n_ctx, int) else None)


def base_info(path: str | os.PathLike) -> BaseInfo:
    p = Path(path).resolve()
    if not p.is_file():
        raise ModelError(f"base model not found: {p}", "check the path, or run `edgeft pull`")
    st = p.stat()
    return _base_info_cached(str(p), st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class AdapterInfo:
    path: Path
    architecture: str
    alpha: float | None
    pairs: dict  # base tensor name -> (rank, dtype name)
    nbytes: int  # tensor data bytes: what llama.cpp allocates for it

    @property
    def ranks(self) -> set[int]:
        return {r for r, _ in self.pairs.values()}


def _finite(t) -> bool:
    data = t.data
    if t.tensor_type in _FLOAT_TYPES:
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            arr = (np.asarray(data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.asarray(data)
        return bool(np.isfinite(arr).all())
    try:
        arr = gguf.quants.dequantize(np.asarray(data), t.tensor_type)
    except Exception:
        return True  # a type gguf cannot dequantize: llama.cpp checks it on load
    return bool(np.isfinite(arr).all())


def inspect_adapter(path: str | os.PathLike, base: BaseInfo | None = None) -> AdapterInfo:
    """Validate a LoRA adapter GGUF (against `base` when given); all problems in one error."""
    p = Path(path)
    r = _open(p, "adapter", AdapterError)
    problems: list[str] = []
    gtype = field_value(r, gguf.Keys.General.TYPE)
    atype = field_value(r, gguf.Keys.Adapter.TYPE)
    arch = field_value(r, gguf.Keys.General.ARCHITECTURE)
    if gtype != gguf.GGUFType.ADAPTER or atype != "lora":
        kind = "a base model" if gtype in (None, "model") and atype is None else f"general.type={gtype!r}, adapter.type={atype!r}"
        raise AdapterError(f"{p} is not a LoRA adapter ({kind})", "convert a PEFT adapter with `edgeft convert`")
    _check_bounds(r, p, "adapter", AdapterError)
    alpha = field_value(r, gguf.Keys.Adapter.LORA_ALPHA)
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or not 0 <= alpha <= MAX_ALPHA):
        raise AdapterError(f"adapter {p.name}: adapter.lora.alpha must be a number from 0 to {MAX_ALPHA:g}, got {shown(alpha)}",
                           "the file is damaged or was written by a broken converter; convert it again")
    if not isinstance(arch, str) or not arch:
        raise AdapterError(f"adapter {p.name} has no general.architecture", "convert it again with `edgeft convert`")
    if base is not None and arch != base.architecture:
        raise AdapterError(f"adapter {p.name} is for architecture '{arch}', the base is '{base.architecture}'",
                           "use an adapter trained for this base, or load the matching base")
    a_t, b_t = {}, {}
    for t in r.tensors:
        if t.name.endswith(".lora_a"):
            a_t[t.name[:-7]] = t
        elif t.name.endswith(".lora_b"):
            b_t[t.name[:-7]] = t
        elif t.name.endswith("_norm.weight"):
            continue
        else:
            problems.append(f"tensor '{t.name}' is neither .lora_a nor .lora_b")
    pairs: dict[str, tuple[int, str]] = {}
    for name in sorted(set(a_t) | set(b_t)):
        rank = _check_pair(name, a_t.get(name), b_t.get(name), base, problems)
        if rank is not None:
            pairs[name] = (rank, a_t[name].tensor_type.name)
    if not pairs and not problems:
        problems.append("it holds no lora_a/lora_b tensor pairs")
    if problems:
        listed = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise AdapterError(f"adapter {p.name} is invalid: {listed}",
                           "this adapter was made for another base, or the file is damaged; convert it again")
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    return AdapterInfo(p, str(arch), float(alpha) if alpha is not None else None, pairs, nbytes)


def _check_pair(name: str, a, b, base: BaseInfo | None, problems: list[str]) -> int | None:
    """The rank of one lora_a / lora_b pair, or None with the reasons added to `problems`."""
    if a is None or b is None:
        problems.append(f"'{name}' has {'lora_b' if a is None else 'lora_a'} without its "
                        f"{'lora_a' if a is None else 'lora_b'}")
        return None
    bad_type = [t for t in (a, b) if t.tensor_type not in LORA_TYPES]
    if bad_type:
        problems.extend(f"'{t.name}' is stored as {getattr(t.tensor_type, 'name', t.tensor_type)}; LoRA tensors must be "
                        "F32, F16, BF16 or Q8_0" for t in bad_type)
        return None
    ash, bsh = tuple(int(x) for x in a.shape), tuple(int(x) for x in b.shape)
    if len(ash) != 2 or len(bsh) != 2:
        problems.append(f"'{name}': lora tensors must be 2-D (a {ash}, b {bsh})")
        return None
    is_embd = name.endswith("token_embd.weight")
    rank = ash[0] if is_embd else ash[1]
    if base is not None:
        bt = base.tensors.get(name)
        if bt is None:
            problems.append(f"'{name}' does not exist in the base model")
            return None
        if is_embd:
            ok = bt[0] == bsh[1] and bt[1] == ash[1] and ash[0] == bsh[0]
        else:
            ok = bt[0] == ash[0] and bt[1] == bsh[1] and ash[1] == bsh[0]
        if not ok:
            problems.append(f"'{name}': lora_a {ash} / lora_b {bsh} do not fit the base tensor {bt}")
            return None
        if is_embd and "output.weight" not in base.tensors:
            # llama.cpp reuses token_embd as the output matrix of a tied-embedding base and
            # would apply the embedding LoRA there too: a shape assertion that kills the process
            problems.append(f"'{name}': embedding LoRA on a base with tied embeddings (no output.weight), "
                            "which llama.cpp cannot run; train without embed_tokens in target_modules")
            return None
    elif not is_embd and ash[1] != bsh[0]:
        problems.append(f"'{name}': rank of lora_a ({ash[1]}) != rank of lora_b ({bsh[0]})")
        return None
    non_finite = [t.name for t in (a, b) if not _finite(t)]
    problems.extend(f"'{n}' contains NaN or Inf" for n in non_finite)
    return None if non_finite else rank
