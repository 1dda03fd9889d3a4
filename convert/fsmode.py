"""Give files written through temp files the permissions a plain `open(..., "w")` would.

`tempfile.mkdtemp` (behind the atomic bundle writes) creates folders 0700; a bundle written for
others to load should get 0777/0666 minus the umask instead, like the files from atomic_path.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgeft.files import current_umask


def publish(path: str | os.PathLike) -> None:
    """chmod a file (or a folder and everything in it) to the umask default."""
    p = Path(path)
    mask = current_umask()
    if p.is_dir():
        for sub in p.rglob("*"):
            os.chmod(sub, (0o777 if sub.is_dir() else 0o666) & ~mask)
        os.chmod(p, 0o777 & ~mask)
    elif p.exists():
        os.chmod(p, 0o666 & ~mask)
