"""File helpers shared by the runtime and the converter: atomic writes and cached sha256."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .paths import edgeft_home

_CHUNK = 1 << 20


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `target`; rename it over `target` only if the block succeeds.

    An exception (or Ctrl-C) inside the block removes the temp file: no partial file ever
    carries the target's name. The result gets the mode a plain `open(target, "w")` would give
    (mkstemp's 0600 would hide a shared model or bundle from other users).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def current_umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def _sha_cache_path() -> Path:
    return edgeft_home() / "sha256-cache.json"


def _cache_key(p: Path) -> str:
    st = p.stat()
    return f"{p}|{st.st_size}|{st.st_mtime_ns}"


def _update_cache(p: Path, key: str, digest: str) -> None:
    cache_file = _sha_cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{p}|")}
    cache[key] = digest
    with contextlib.suppress(OSError):
        write_text_atomic(cache_file, json.dumps(cache, indent=0))


def cached_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered by (real path, size, mtime) so a 100 MB base is hashed once."""
    p = Path(path).resolve()
    key = _cache_key(p)
    try:
        cached = json.loads(_sha_cache_path().read_text()).get(key)
    except (OSError, ValueError):
        cached = None
    if cached:
        return cached
    digest = sha256_file(p)
    _update_cache(p, key, digest)
    return digest


def remember_sha256(path: str | os.PathLike, digest: str) -> None:
    """Record a digest just verified elsewhere (e.g. while pulling) so it is not recomputed."""
    p = Path(path).resolve()
    _update_cache(p, _cache_key(p), digest)
