"""A task card inferred from the training rows, and a check of a given card against them.

A person with 50-100 rows of their own should not have to write a card: the rows already carry
the system prompt (chat JSONL) and their answers show what the output looks like. The rules:

- system prompt: the rows' system message; rows that disagree are named in the error.
- output: answers drawn from a small closed set -> `labels` (constrained by a grammar); answers
  that all parse as JSON objects/arrays -> a `json_schema` inferred from them (types, required
  keys, enums for small closed string sets); otherwise free text, `max_tokens` from the longest
  answer.
- few-shot examples for the prompting baselines come from the training rows only.

No torch and no model here: `edgeft card infer` runs in a blink on the device side.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .data import Example
from .errors import InputError
from .tasks import OutputSpec, TaskSpec

LABEL_MAX_CHARS = 48      # a label is a short single-line answer
LABEL_MAX_COUNT = 200     # more distinct answers than this is not a closed set
ENUM_MAX_VALUES = 24      # a JSON string field with at most this many values (each seen >= 3x) is an enum
SHOTS = 4
GENERIC_STEMS = {"train", "data", "dataset", "training", "rows", "examples", "all", "peft", "adapter", "lora",
                 "final", "output", "out", "model"}


@dataclass
class InferredCard:
    """The inferred task and what was decided, in words, for the user to read before training."""

    task: TaskSpec
    notes: list[str] = field(default_factory=list)

    def card(self, name: str, description: str = "") -> dict:
        return {"name": name, "description": description, "task": self.task.to_dict()}


def default_name(paths: Sequence[str | os.PathLike]) -> str:
    """A name from the first data file: its stem, or its folder's name when the stem is generic
    (train.jsonl in emotion/ -> "emotion")."""
    p = Path(paths[0])
    stem = p.stem
    if stem.lower() in GENERIC_STEMS and p.resolve().parent.name:
        stem = p.resolve().parent.name
    clean = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip(".-_") or "adapter"
    return clean[:64]


# -- system prompt ------------------------------------------------------------------------

def _lines(rows: Sequence[Example], limit: int = 6) -> str:
    ls = [str(e.line) for e in rows[:limit]]
    return ", ".join(ls) + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def row_system(examples: Sequence[Example]) -> str | None:
    """The one system prompt all rows share (None when no row has one); an error names the rows
    that differ from the most common prompt."""
    counts = Counter(e.system for e in examples)
    common, _ = counts.most_common(1)[0]
    odd = [e for e in examples if e.system != common]
    if odd:
        shown = repr(common[:60]) + ("..." if common and len(common) > 60 else "") if common else "none"
        raise InputError(f"the rows disagree on the system prompt: lines {_lines(odd)} differ from the most "
                         f"common one ({shown}, {counts[common]} rows)",
                         "give every row the same system message, or pass --task-card with the prompt to use")
    return common


# -- output ----------------------------------------------------------------------------------

def _json_container(text: str) -> Any:
    try:
        v = json.loads(text)
    except ValueError:
        return None
    return v if isinstance(v, (dict, list)) else None


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def infer_schema(values: Sequence[Any], depth: int = 0) -> dict:
    """A JSON schema that every value in `values` satisfies: types merged (integer into number),
    object keys present in every value are required, properties keep the order in which keys
    first appear (llama.cpp's grammar emits them in that order), small closed string sets become
    enums."""
    if depth > 16:
        return {}
    groups: dict[str, list] = {}
    for v in values:
        groups.setdefault(_json_type(v), []).append(v)
    if "integer" in groups and "number" in groups:
        groups["number"] += groups.pop("integer")
    if len(groups) > 1:
        return {"anyOf": [infer_schema(vs, depth + 1) for vs in groups.values()]}
    (kind, vs), = groups.items()
    if kind == "object":
        keys: dict[str, list] = {}
        for v in vs:
            for k, x in v.items():
                keys.setdefault(k, []).append(x)
        props = {k: infer_schema(xs, depth + 1) for k, xs in keys.items()}
        required = [k for k, xs in keys.items() if len(xs) == len(vs)]
        out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
        if required:
            out["required"] = required
        return out
    if kind == "array":
        items = [x for v in vs for x in v]
        return {"type": "array", "items": infer_schema(items, depth + 1)} if items else {"type": "array"}
    if kind == "string":
        distinct = sorted(set(vs))
        if len(distinct) <= ENUM_MAX_VALUES and len(vs) >= 3 * len(distinct):
            return {"type": "string", "enum": distinct}
        return {"type": "string"}
    return {"type": kind}


def _is_label_set(answers: Sequence[str]) -> bool:
    distinct = set(answers)
    return (1 < len(distinct) <= min(LABEL_MAX_COUNT, max(2, len(answers) // 2))
            and all(len(a) <= LABEL_MAX_CHARS and "\n" not in a for a in distinct))


def max_tokens_for(answers: Sequence[str]) -> int:
    """Room for the longest answer: about 3 characters a token for English (a generous guess, no
    tokenizer needed), plus a quarter and a margin, between 32 and 1024."""
    longest = max((len(a) for a in answers), default=0)
    return int(min(1024, max(32, math.ceil(longest / 3 * 1.25) + 16)))


def infer_output(answers: Sequence[str]) -> tuple[OutputSpec, int, str]:
    """(output spec, max_tokens, a note saying why)."""
    answers = [a.strip() for a in answers]
    parsed = [_json_container(a) for a in answers]
    if answers and all(p is not None for p in parsed):
        schema = infer_schema(parsed)
        longest = max(len(a.encode("utf-8")) for a in answers)   # JSON under a grammar: tokens can be short
        return (OutputSpec(type="json_schema", schema=schema), int(min(2048, max(64, longest // 2 + 32))),
                f"output: JSON (all {len(answers)} answers parse), schema inferred from them")
    if _is_label_set(answers):
        counts = Counter(answers)
        labels = sorted(counts)
        shown = ", ".join(f"{lab} ({counts[lab]})" for lab in labels[:12]) + (" ..." if len(labels) > 12 else "")
        # a weak model under the grammar may spell a label byte by byte: room for that, and the
        # answer stops at the label's end anyway
        longest = max(len(lab.encode("utf-8")) for lab in labels)
        return (OutputSpec(type="labels", labels=labels), longest + 4,
                f"output: one of {len(labels)} labels, constrained: {shown}")
    mt = max_tokens_for(answers)
    return OutputSpec(type="text"), mt, f"output: free text (answers differ), max_tokens {mt} from the longest answer"


# -- few-shot ---------------------------------------------------------------------------------

def pick_shots(examples: Sequence[Example], output: OutputSpec, k: int = SHOTS, seed: int = 0) -> list[dict]:
    """Up to k short training rows for the few-shot baseline; for labels, different labels first."""
    usable = [e for e in examples if e.input and len(e.input) <= 400 and len(e.output) <= 600]
    if not usable:
        return []
    rng = random.Random(seed)
    pool = sorted(usable, key=lambda e: len(e.input or ""))[: max(k, len(usable) * 2 // 3)]
    rng.shuffle(pool)
    chosen: list[Example] = []
    if output.type == "labels":
        seen: set[str] = set()
        for e in pool:
            if e.output.strip() not in seen and len(chosen) < k:
                seen.add(e.output.strip())
                chosen.append(e)
    for e in pool:
        if len(chosen) >= k:
            break
        if e not in chosen:
            chosen.append(e)
    return [{"input": e.input, "output": e.output.strip()} for e in chosen]


# -- the card ---------------------------------------------------------------------------------

def infer_task(examples: Sequence[Example], *, seed: int = 0) -> InferredCard:
    """The task card the rows imply (see the module docstring)."""
    if not examples:
        raise InputError("no rows to infer a task card from")
    notes = []
    system = row_system(examples)
    notes.append("system prompt: " + (f"from the rows ({len(system)} chars)" if system else "none (the rows have none)"))
    output, max_tokens, why = infer_output([e.output for e in examples])
    notes.append(why)
    task = TaskSpec(system=system, template="{input}", output=output, max_tokens=max_tokens, temperature=0.0)
    task.few_shot = pick_shots(examples, output, seed=seed)
    notes.append(f"few-shot baseline: {len(task.few_shot)} examples from the training rows")
    return InferredCard(task, notes)


def check_card(task: TaskSpec, examples: Sequence[Example]) -> list[str]:
    """Raise on a card the rows contradict (answers outside its labels, answers that are not
    JSON for a JSON card); return warnings for what training can work around."""
    warnings = []
    answers = [e.output.strip() for e in examples]
    if task.output.type == "labels":
        allowed = set(task.output.labels or [])
        missing = Counter(a for a in answers if a not in allowed)
        if missing:
            shown = ", ".join(f"{a!r} ({n})" for a, n in missing.most_common(8))
            raise InputError(f"the card's labels do not cover {sum(missing.values())} answers in the data: {shown}",
                             "add them to the card's output.labels, fix the rows, or drop --task-card to infer the card")
    elif task.output.type == "json_schema":
        bad = [e for e, a in zip(examples, answers) if not _is_json(a)]
        if bad:
            raise InputError(f"the card asks for JSON but the answers on lines {_lines(bad)} are not JSON",
                             "fix those rows, or use a card with a text or labels output")
    chat = [e for e in examples if e.chat]
    odd = [e for e in chat if (e.system or None) != (task.system or None)]
    if odd:
        warnings.append(f"{len(odd)} chat row(s) (lines {_lines(odd)}) carry another system prompt than the card; "
                        "training uses the card's, which is what the runtime sends")
    if chat and task.template != "{input}":
        warnings.append("the chat rows hold whole user messages but the card's template wraps inputs "
                        f"({task.template!r}); at run time inputs are wrapped, in training they are not: "
                        "set the card's template to {input}")
    return warnings


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False
