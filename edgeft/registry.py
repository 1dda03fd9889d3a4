"""Finding adapter bundles by name: --adapter-dir, EDGEFT_HOME/adapters, then the shipped models/adapters."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Iterable

from .bundles import CARD_FILE, AdapterBundle
from .errors import AdapterError
from .paths import shipped_models_dir, user_adapters_dir

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def search_dirs(extra: Iterable[str | os.PathLike] = ()) -> list[Path]:
    dirs = [Path(d).expanduser() for d in extra]
    dirs.append(user_adapters_dir())
    shipped = shipped_models_dir()
    if shipped is not None:
        dirs.append(shipped / "adapters")
    return dirs


def is_valid_name(name: str) -> bool:
    return bool(NAME_RE.match(name)) and ".." not in name


def available(extra_dirs: Iterable[str | os.PathLike] = ()) -> dict[str, Path]:
    """Bundle name -> folder; the first directory in search order wins."""
    found: dict[str, Path] = {}
    for d in search_dirs(extra_dirs):
        if not d.is_dir():
            continue
        for sub in sorted(d.iterdir()):
            if sub.is_dir() and (sub / CARD_FILE).is_file() and sub.name not in found:
                found[sub.name] = sub
    return found


def looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or os.sep in ref or ref.endswith(".gguf")


def find(ref: str | os.PathLike, extra_dirs: Iterable[str | os.PathLike] = ()) -> AdapterBundle:
    """A registered name or a path -> AdapterBundle."""
    ref_s = str(ref)
    if looks_like_path(ref_s):
        return AdapterBundle.load(ref_s)
    table = available(extra_dirs)
    if ref_s in table:
        return AdapterBundle.load(table[ref_s])
    names = ", ".join(sorted(table)) or "none installed"
    raise AdapterError(f"unknown adapter '{ref_s}'", f"available: {names}; or pass a path to a bundle folder or .gguf")


def find_in_registry(ref: str, roots: Iterable[str | os.PathLike]) -> AdapterBundle:
    """Like find(), for untrusted input (HTTP requests): a bare name, or a relative path that must
    stay inside one of `roots` (no absolute paths, no '..', no symlink escapes)."""
    if not ref or "\x00" in ref or os.path.isabs(ref) or ref.startswith("~"):
        raise AdapterError(f"adapter reference {ref!r} is not allowed", "name a registered adapter or a path inside the registry")
    parts = Path(ref).parts
    if any(p in ("..", "") for p in parts):
        raise AdapterError(f"adapter reference {ref!r} is not allowed", "'..' is not permitted")
    for root in roots:
        root_r = Path(root).expanduser().resolve()
        cand = (root_r / ref).resolve()
        try:
            cand.relative_to(root_r)
        except ValueError:
            continue
        if cand.exists():
            return AdapterBundle.load(cand)
    raise AdapterError(f"unknown adapter '{ref}'", "name a registered adapter")


def remove(name: str) -> Path:
    """Delete a user-installed bundle (shipped ones are read-only)."""
    if not is_valid_name(name):
        raise AdapterError(f"invalid adapter name {name!r}")
    target = user_adapters_dir() / name
    if not (target / CARD_FILE).is_file():
        shipped = shipped_models_dir()
        if shipped is not None and (shipped / "adapters" / name).is_dir():
            raise AdapterError(f"'{name}' is shipped with edgeft and cannot be removed", "it lives in models/adapters")
        raise AdapterError(f"no user adapter named '{name}'", f"user adapters live in {user_adapters_dir()}")
    shutil.rmtree(target)
    return target
