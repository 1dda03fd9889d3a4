"""Where edgeft keeps things: EDGEFT_HOME for pulled bases and user adapters, the repo's models/."""

from __future__ import annotations

import os
from pathlib import Path


def edgeft_home() -> Path:
    """EDGEFT_HOME, else $XDG_CACHE_HOME/edgeft, else ~/.cache/edgeft."""
    env = os.environ.get("EDGEFT_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "edgeft"


def bases_dir() -> Path:
    return edgeft_home() / "models"


def user_adapters_dir() -> Path:
    return edgeft_home() / "adapters"


def shipped_models_dir() -> Path | None:
    """The repo's `models/` (manifests and shipped adapter bundles), or EDGEFT_MODELS_DIR."""
    env = os.environ.get("EDGEFT_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    candidate = Path(__file__).resolve().parent.parent / "models"
    return candidate if candidate.is_dir() else None
