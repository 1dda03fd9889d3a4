"""Training / evaluation data: read a file into `Example`s (prompt side, answer text, gold value).

One reader for every format so that `edgeft train` and `edgeft eval` see the same rows. Formats:

- `chat`      JSONL `{"messages": [..., {"role": "assistant", "content": ANSWER}]}`
- `prompt`    JSONL `{"prompt": ..., "completion": ...}` (also `input` / `output`)
- `label`     JSONL or CSV with `text` and `label`
- `ner`       JSONL `{"text", "entities": [{"text", "type"}, ...]}` (shared/data NER sets); types are
              mapped to PER/ORG/LOC/MISC and the answer is the JSON list the `ner` card asks for
- `summarize` JSONL `{"source", "targets": [...]}` (scitldr); the answer is the first target, all
              targets are references for ROUGE-L

Bad rows are collected with their line numbers (`Dataset.problems`) instead of stopping at the
first; a file with no usable row is an error. No torch here: the runtime side uses it for eval.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError

log = logging.getLogger(__name__)

FORMATS = ("auto", "chat", "prompt", "label", "ner", "summarize")

# Union of shared/data/ner/coarse_map.json's per-set maps: any source type -> PER/ORG/LOC/MISC.
COARSE_TYPES = ("PER", "ORG", "LOC", "MISC")
DEFAULT_NER_MAP = {
    "PER": "PER", "ORG": "ORG", "LOC": "LOC", "MISC": "MISC",
    "person": "PER", "location": "LOC", "corporation": "ORG", "group": "ORG",
    "product": "MISC", "creative-work": "MISC",
}


@dataclass
class Example:
    """One row: `input` goes through TaskSpec.messages (or `messages`, a multi-turn history
    without its system message, goes through TaskSpec.conversation), `output` is the answer text
    to train on, `reference` the gold value for metrics. `system` is the row's own system prompt
    (chat rows), which card inference reads and the card's prompt replaces."""

    output: str
    input: str | None = None
    messages: list[dict] | None = None
    reference: Any = None
    line: int = 0
    system: str | None = None
    chat: bool = False


@dataclass
class Dataset:
    path: Path
    format: str
    examples: list[Example]
    problems: list[str] = field(default_factory=list)   # "line N: why", rows skipped

    def __len__(self) -> int:
        return len(self.examples)


def entities_json(entities: list[dict]) -> str:
    """The canonical answer text for NER: a JSON list of {"text", "type"} in reading order."""
    return json.dumps([{"text": e["text"], "type": e["type"]} for e in entities], ensure_ascii=False)


def load_ner_map(path: str | os.PathLike | None, data_path: str | os.PathLike | None = None) -> dict[str, str]:
    """A flat {type: coarse} map; a per-set file (like coarse_map.json) is indexed by the name of a
    folder in `data_path` (e.g. .../wnut17/train.jsonl -> "wnut17")."""
    if path is None:
        return dict(DEFAULT_NER_MAP)
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read NER type map {path}: {e}") from None
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    if all(isinstance(v, str) for v in d.values()):
        return d
    parts = Path(data_path).resolve().parts if data_path else ()
    for part in reversed(parts):
        if isinstance(d.get(part), dict):
            return dict(d[part])
    raise InputError(f"NER type map {path} has no entry for {data_path}",
                     f"it maps the sets {', '.join(k for k, v in d.items() if isinstance(v, dict))}")


def _rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed row or None, error) for every non-blank line / CSV record."""
    if path.suffix.lower() in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            if not reader.fieldnames:
                return
            for row in reader:
                yield reader.line_num, row, None
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line), None
            except ValueError as e:
                yield i, None, f"not valid JSON ({e.msg})"


def detect_format(row: dict) -> str | None:
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row or "input" in row and "output" in row:
        return "prompt"
    if "entities" in row and ("text" in row or "tokens" in row):
        return "ner"
    if "source" in row and "targets" in row:
        return "summarize"
    if "text" in row and "label" in row:
        return "label"
    return None


def _str(row: dict, key: str) -> str:
    v = row.get(key)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"'{key}' must be a non-empty string")
    return v


def _chat(row: dict, _m) -> Example:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise ValueError("'messages' must be a list with a prompt and an assistant answer")
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError("each message needs a string 'role' and 'content'")
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        raise ValueError("the last message must be a non-empty assistant answer")
    prompt = [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]
    system = prompt.pop(0)["content"] if prompt and prompt[0]["role"] == "system" else None
    if not prompt or prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
        raise ValueError("the answer must follow a non-empty user message")
    if any(m["role"] not in ("user", "assistant") for m in prompt):
        raise ValueError("after the first system message only 'user' and 'assistant' roles may follow")
    answer = msgs[-1]["content"].strip()
    if len(prompt) == 1:   # one question, one answer: the user message is the task's input
        return Example(output=answer, input=prompt[0]["content"], reference=answer, system=system, chat=True)
    return Example(output=answer, messages=prompt, reference=answer, system=system, chat=True)


def _prompt(row: dict, _m) -> Example:
    if "prompt" in row:
        inp, out = _str(row, "prompt"), _str(row, "completion")
    else:
        inp, out = _str(row, "input"), _str(row, "output")
    return Example(output=out, input=inp, reference=out)


def _label(row: dict, _m) -> Example:
    text, label = _str(row, "text"), _str(row, "label").strip()
    return Example(output=label, input=text, reference=label)


def _ner(row: dict, type_map: dict[str, str]) -> Example:
    text = row.get("text")
    if not isinstance(text, str) and isinstance(row.get("tokens"), list):
        text = " ".join(map(str, row["tokens"]))
    if not isinstance(text, str) or not text.strip():
        raise ValueError("'text' must be a non-empty string")
    ents = row.get("entities")
    if not isinstance(ents, list):
        raise ValueError("'entities' must be a list")
    out = []
    for e in ents:
        if not isinstance(e, dict) or not isinstance(e.get("text"), str) or not isinstance(e.get("type"), str):
            raise ValueError("each entity needs a string 'text' and 'type'")
        coarse = type_map.get(e["type"], type_map.get("*"))
        if coarse is None:
            raise ValueError(f"entity type '{e['type']}' is not in the type map")
        out.append({"text": e["text"], "type": coarse})
    return Example(output=entities_json(out), input=text, reference=[(e["text"], e["type"]) for e in out])


def _summarize(row: dict, _m) -> Example:
    src = _str(row, "source")
    targets = row.get("targets")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        raise ValueError("'targets' must be a non-empty list of strings")
    return Example(output=targets[0].strip(), input=src, reference=[t.strip() for t in targets])


_READERS = {"chat": _chat, "prompt": _prompt, "label": _label, "ner": _ner, "summarize": _summarize}


def load(path: str | os.PathLike, format: str = "auto", *, limit: int | None = None, seed: int = 0,
         ner_map: str | os.PathLike | dict | None = None) -> Dataset:
    """Read a data file; rows that do not fit the format are skipped and listed in `problems`.

    `limit` keeps a seeded random sample of that many rows (in file order), not the first rows:
    the shared sets are sorted by label, so a head would be one class."""
    p = Path(path).expanduser()
    if format not in FORMATS:
        raise InputError(f"unknown data format '{format}'", f"use one of {', '.join(FORMATS)}")
    if not p.is_file():
        raise InputError(f"data file not found: {p}")
    type_map: dict | None = ner_map if isinstance(ner_map, dict) else None
    fmt = None if format == "auto" else format
    examples: list[Example] = []
    problems: list[str] = []
    for line, row, err in _rows(p):
        if err is None and not isinstance(row, dict):
            err = "not a JSON object"
        if err is None and fmt is None:
            fmt = detect_format(row)
            if fmt is None:
                err = "cannot tell the format from its keys (pass --format)"
        if err is None:
            if fmt == "ner" and type_map is None:   # only NER rows need (and may fail on) the type map
                type_map = load_ner_map(ner_map, p)
            try:
                ex = _READERS[fmt](row, type_map)
                ex.line = line
                examples.append(ex)
                continue
            except ValueError as e:
                err = str(e)
        problems.append(f"line {line}: {err}")
    if problems:
        log.warning("%s: skipped %d bad row(s): %s%s", p, len(problems), "; ".join(problems[:5]),
                    " ..." if len(problems) > 5 else "")
    if not examples:
        detail = "; ".join(problems[:5]) if problems else "the file is empty"
        raise InputError(f"{p} has no usable rows ({detail})",
                         f"expected format '{fmt or format}': see `edgeft train --help` for the formats")
    if limit is not None and 0 <= limit < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
        examples = [examples[i] for i in keep]
    return Dataset(p, fmt or format, examples, problems)


def load_many(paths: list[str | os.PathLike], format: str = "auto", *, limit: int | None = None, seed: int = 0,
              ner_map: str | os.PathLike | None = None) -> Dataset:
    """Several files as one dataset (e.g. three NER sets, each with its own type map); `limit` is per file."""
    sets = [load(p, format, limit=limit, seed=seed, ner_map=ner_map) for p in paths]
    if len(sets) == 1:
        return sets[0]
    fmts = {d.format for d in sets}
    if len(fmts) > 1:
        raise InputError(f"the data files have different formats: {', '.join(sorted(fmts))}", "train one task at a time")
    return Dataset(sets[0].path, fmts.pop(), [e for d in sets for e in d.examples],
                   [f"{d.path.name} {q}" for d in sets for q in d.problems])
