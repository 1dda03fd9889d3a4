"""Test helpers: random LoRA adapters (edgeft.bench's writer, for any base: the real SmolLM2 or the
tiny one from tiny_gguf.py) and bundles around them."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from edgeft.bench.fixtures import ALL7, write_random_adapter as write_adapter  # noqa: F401  (tests import both from here)


def base_id(base_path: Path) -> str:
    """The id `Engine(base_path)` reports: the manifest's id for a pulled base, else the file's stem."""
    from edgeft.models import manifests

    by_file = {m.file: m.id for m in manifests().values()}
    return by_file.get(Path(base_path).name, Path(base_path).stem)


def write_bundle(folder: Path, base_path: Path, *, name: str, task: dict | None = None,
                 base_sha: str | None = None, **kw) -> Path:
    from edgeft.files import cached_sha256

    folder.mkdir(parents=True, exist_ok=True)
    write_adapter(folder / "adapter.gguf", base_path, **kw)
    card = {"format": 1, "name": name, "description": f"random test adapter {name}",
            "base": {"id": base_id(base_path), "sha256": base_sha or cached_sha256(base_path), "architecture": "llama"},
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
