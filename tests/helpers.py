"""Test helpers: random LoRA adapters (edgeft.bench's writer) and bundles around them."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from edgeft.bench.fixtures import ALL7, write_random_adapter as write_adapter  # noqa: F401  (tests import both from here)


def write_bundle(folder: Path, base_path: Path, *, name: str, task: dict | None = None,
                 base_sha: str | None = None, **kw) -> Path:
    from edgeft.files import cached_sha256

    folder.mkdir(parents=True, exist_ok=True)
    write_adapter(folder / "adapter.gguf", base_path, **kw)
    card = {"format": 1, "name": name, "description": f"random test adapter {name}",
            "base": {"id": "smollm2-135m", "sha256": base_sha or cached_sha256(base_path), "architecture": "llama"},
            "adapter": {"file": "adapter.gguf", "rank": kw.get("rank", 8)}}
    if task:
        card["task"] = task
    (folder / "adapter.json").write_text(json.dumps(card))
    return folder


@contextlib.contextmanager
def exit_ok():
    """The CLI's main() returns on success and raises SystemExit(0/None) from typer in some paths."""
    try:
        yield
    except SystemExit as e:
        assert e.code in (0, None), f"exit code {e.code}"
