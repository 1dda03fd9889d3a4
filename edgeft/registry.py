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


def add(path: str | os.PathLike, *, name: str | None = None, force: bool = False) -> AdapterBundle:
    """Copy a bundle folder into the registry (EDGEFT_HOME/adapters/NAME), so that `run`, `chat`,
    `serve` and the Python API find it by name. The bundle is checked first: its card, its GGUF
    (structure, and shapes against its base when that base is pulled). A new `name` is written
    into the copy's card. The copy is atomic; an existing NAME is replaced only with force."""
    from .files import atomic_dir
    from .gguf_info import base_info, inspect_adapter
    from .models import manifests, is_verified

    src = Path(path).expanduser()
    if not src.is_dir():
        raise AdapterError(f"{src} is not a bundle folder", "give the folder that holds adapter.json and adapter.gguf")
    bundle = AdapterBundle.load(src)
    name = name or bundle.name
    if not is_valid_name(name):
        raise AdapterError(f"'{name}' is not a valid adapter name", "use letters, digits, '.', '_' or '-' (max 64)")
    m = manifests().get(str(bundle.card.base.get("id")))
    base = base_info(m.path) if m is not None and is_verified(m) else None
    if base is not None and bundle.card.base.get("sha256") not in (None, m.sha256):
        raise AdapterError(f"bundle {src} names base {m.id} but another file of it (sha256 differs)",
                           "convert or train it again against the pulled base")
    inspect_adapter(bundle.gguf_path, base)
    target = user_adapters_dir() / name
    if target.resolve() == src.resolve():
        return bundle
    if target.exists() and not force:
        raise AdapterError(f"an adapter named '{name}' is already registered ({target})",
                           "pass --force to replace it, or --name to register under another name")
    shipped = shipped_models_dir()
    if shipped is not None and (shipped / "adapters" / name).is_dir():
        raise AdapterError(f"'{name}' is the name of an adapter shipped with edgeft", "register it under another --name")
    with atomic_dir(target) as stage:
        for item in src.iterdir():
            if item.name.startswith("."):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, stage / item.name)
        if name != bundle.name:
            card = bundle.card
            card.name = name
            card.save(stage / CARD_FILE)
    return AdapterBundle.load(target)


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
