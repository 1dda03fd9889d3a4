"""Adapter bundles: a folder with `adapter.gguf` (llama.cpp LoRA) and `adapter.json` (task card).

A bare `.gguf` adapter also works; it gets a card with no task. The card records which base the
adapter belongs to (id and sha256), its rank, alpha and targets, how it was made, and its task.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdapterError, shown
from .files import write_text_atomic
from .tasks import TaskSpec

CARD_FILE = "adapter.json"
GGUF_FILE = "adapter.gguf"
CARD_FORMAT = 1
MAX_CARD_BYTES = 16 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class TaskCard:
    name: str
    description: str = ""
    base: dict = field(default_factory=dict)       # {"id", "sha256", "architecture"}
    adapter: dict = field(default_factory=dict)    # {"file", "rank", "alpha", "targets", "dtype", ...}
    task: TaskSpec | None = None
    metrics: dict = field(default_factory=dict)    # dev-set scores, parity reports
    source: dict = field(default_factory=dict)     # PEFT origin, edgeft version, training data
    reproduce: str = ""                            # the command that rebuilds this bundle
    extra: dict = field(default_factory=dict)      # unknown keys from newer versions, kept as they are

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "task card") -> "TaskCard":
        """A card checked field by field: every problem names its field."""
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not d["name"]:
            raise AdapterError(f"{where}: missing 'name'", "every adapter.json needs a name")
        known = ("name", "description", "base", "adapter", "task", "metrics", "source", "reproduce", "format")
        parts = {}
        for key in ("base", "adapter", "metrics", "source"):
            v = d.get(key) or {}
            if not isinstance(v, dict):
                raise AdapterError(f"{where}: '{key}' must be an object, got {type(v).__name__}")
            parts[key] = dict(v)
        for key in ("description", "reproduce"):
            if not isinstance(d.get(key, ""), str):
                raise AdapterError(f"{where}: '{key}' must be a string")
        sha = parts["base"].get("sha256")
        if sha is not None and not (isinstance(sha, str) and _SHA256.match(sha)):
            raise AdapterError(f"{where}: base.sha256 must be 64 hex digits, got {shown(sha)}",
                               "remove it to skip the base check, or write the base's sha256")
        file = parts["adapter"].get("file", GGUF_FILE)
        if not isinstance(file, str) or not file or len(file) > 255 or "\x00" in file or file != Path(file).name \
                or file in (".", ".."):
            raise AdapterError(f"{where}: adapter.file must be a file name inside the bundle, got {shown(file)}",
                               "a bundle never reaches outside its folder; use \"adapter.gguf\"")
        try:
            task = TaskSpec.from_dict(d["task"]) if d.get("task") else None
        except AdapterError as e:
            raise AdapterError(f"{where}: {e.message}", e.hint) from None
        except (TypeError, ValueError) as e:
            raise AdapterError(f"{where}: bad 'task': {e}") from None
        return cls(name=d["name"], description=d.get("description", ""), base=parts["base"],
                   adapter=parts["adapter"], task=task, metrics=parts["metrics"], source=parts["source"],
                   reproduce=d.get("reproduce", ""), extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": CARD_FORMAT, "name": self.name, "description": self.description,
                             "base": self.base, "adapter": self.adapter}
        if self.task is not None:
            d["task"] = self.task.to_dict()
        for k in ("metrics", "source", "reproduce"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        d.update(self.extra)
        return d

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")


@dataclass
class AdapterBundle:
    """An adapter on disk: its GGUF and its card (bundle folder or bare .gguf)."""

    gguf_path: Path
    card: TaskCard
    folder: Path | None = None

    @property
    def name(self) -> str:
        return self.card.name

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AdapterBundle":
        p = Path(path).expanduser()
        if p.is_dir():
            card_path = p / CARD_FILE
            if not card_path.is_file():
                raise AdapterError(f"{p} is not an adapter bundle (no {CARD_FILE})",
                                   "a bundle holds adapter.gguf and adapter.json; make one with `edgeft convert`")
            try:
                if card_path.stat().st_size > MAX_CARD_BYTES:
                    raise ValueError(f"{card_path.stat().st_size} bytes, more than a card ever needs ({MAX_CARD_BYTES})")
                raw = json.loads(card_path.read_text(encoding="utf-8"))
            except RecursionError:
                raise AdapterError(f"{card_path} is nested too deeply to be a task card", "fix the task card") from None
            except (OSError, ValueError) as e:
                raise AdapterError(f"{card_path} is not valid JSON: {e}", "fix the task card or convert again") from None
            card = TaskCard.from_dict(raw, where=str(card_path))
            gguf_path = p / card.adapter.get("file", GGUF_FILE)
            if not gguf_path.is_file():
                raise AdapterError(f"bundle {p} has no {gguf_path.name}", "convert the adapter again")
            return cls(gguf_path, card, p)
        if p.is_file():
            if p.suffix != ".gguf":
                raise AdapterError(f"{p} is not an adapter (.gguf file or bundle folder)")
            return cls(p, TaskCard(name=p.stem, adapter={"file": p.name}), None)
        raise AdapterError(f"adapter not found: {path}", "run `edgeft adapters list` to see what is available")
