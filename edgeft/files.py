"""File safety shared by the runtime, the trainer and the converter: atomic files and folders
(nothing half-written ever carries the target's name), the modes a plain write would give, and
cached sha256."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
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
    sweep_partials(target.parent, target.name)
    fd, tmp = tempfile.mkstemp(prefix=partial_prefix(target.name), suffix=".partial", dir=target.parent)
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


def publish(path: str | os.PathLike) -> None:
    """chmod a file (or a folder and everything in it) to what a plain `open(..., "w")` /
    `mkdir` would give: mkstemp / mkdtemp make them private (0600 / 0700)."""
    p = Path(path)
    mask = current_umask()
    if p.is_dir():
        for sub in p.rglob("*"):
            os.chmod(sub, (0o777 if sub.is_dir() else 0o666) & ~mask)
        os.chmod(p, 0o777 & ~mask)
    elif p.exists():
        os.chmod(p, 0o666 & ~mask)


def partial_prefix(name: str) -> str:
    """Temp entries are `.NAME.<pid>.<random>.partial`: the pid tells a later run whether the
    writer is still alive."""
    return f".{name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_partials(folder: Path, name: str) -> None:
    """Remove what an interrupted (kill -9) write of `name` left in `folder`: hidden
    `.NAME.<pid>.*.partial` and `.NAME.old-<pid>` entries whose writing process is gone."""
    prefix = f".{name}."
    with contextlib.suppress(OSError):
        for p in folder.iterdir():
            if not p.name.startswith(prefix):
                continue
            rest = p.name[len(prefix):]
            if rest.endswith(".partial"):
                pid_s = rest.split(".", 1)[0]
            elif rest.startswith("old-"):
                pid_s = rest[4:]
            else:
                continue
            if not pid_s.isdigit() or _alive(int(pid_s)):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


@contextlib.contextmanager
def atomic_dir(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temp folder beside `folder`; on success it gets plain modes and is renamed
    over `folder` (an existing one is swapped out and removed only after the rename). On failure
    the temp folder goes, with any parent folders it had to create."""
    folder = Path(folder).absolute()
    created = []
    p = folder.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(folder.parent, folder.name)
    stage = Path(tempfile.mkdtemp(prefix=partial_prefix(folder.name), suffix=".partial", dir=folder.parent))
    try:
        yield stage
        publish(stage)
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
            try:
                os.replace(stage, folder)
            except BaseException:
                os.replace(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, folder)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for d in created:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


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
