"""Give files written through temp files the permissions a plain `open(..., "w")` would.

`tempfile.mkstemp` (behind edgeft.files.atomic_path) creates files 0600 and folders 0700; a
bundle or model written for others to load should get 0666/0777 minus the umask instead.
"""

from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def publish(path: str | os.PathLike) -> None:
    """chmod a file (or a folder and everything in it) to the umask default."""
    p = Path(path)
    mask = _umask()
    if p.is_dir():
        for sub in p.rglob("*"):
            os.chmod(sub, (0o777 if sub.is_dir() else 0o666) & ~mask)
        os.chmod(p, 0o777 & ~mask)
    elif p.exists():
        os.chmod(p, 0o666 & ~mask)
