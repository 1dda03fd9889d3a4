"""Build models/data/parsing/snips/{train,dev}.jsonl and models/tasks/parsing.json's schema from
../shared/data/parsing/snips (run from the repo root: python models/data/parsing/snips/build.py).

Why the answers are rewritten: llama.cpp's JSON-schema grammar emits an object's optional
properties only in schema order. The upstream answers list slots in order of appearance, which
varies (`city` before or after `state`), so an answer in that order can be unreachable under the
grammar. Here every answer lists its slots in one fixed order per intent (the slots sorted by
their mean relative position in the training texts), the same order the card's schema declares.
The slot values and the intent are unchanged; `entities` (char spans) is dropped to keep the
copy small. Scoring compares objects, so slot order never changes a score.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/parsing/snips")
DST = Path(__file__).resolve().parent


def slot_order(rows: list[dict]) -> dict[str, list[str]]:
    pos: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        n = max(1, len(r["text"]))
        for e in r["entities"]:
            pos[r["output"]["intent"]][e["type"]].append(e["start"] / n)
    return {it: sorted(d, key=lambda s: (sum(d[s]) / len(d[s]), s)) for it, d in sorted(pos.items())}


def reorder(r: dict, order: dict[str, list[str]]) -> dict:
    out = r["output"]
    rank = {s: i for i, s in enumerate(order[out["intent"]])}
    slots = dict(sorted(out["slots"].items(), key=lambda kv: rank.get(kv[0], len(rank))))
    new = {"intent": out["intent"], "slots": slots}
    return {"id": r["id"], "text": r["text"], "output": new,
            "messages": [{"role": "user", "content": r["text"]},
                         {"role": "assistant", "content": json.dumps(new, ensure_ascii=False)}]}


def schema(order: dict[str, list[str]]) -> dict:
    value = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 3}]}
    alts = []
    for intent, slots in order.items():
        alts.append({"type": "object", "properties": {
            "intent": {"const": intent},
            "slots": {"type": "object", "properties": {s: value for s in slots}, "additionalProperties": False}},
            "required": ["intent", "slots"], "additionalProperties": False})
    return {"anyOf": alts}


def main() -> None:
    train = [json.loads(x) for x in open(SRC / "train.jsonl", encoding="utf-8")]
    order = slot_order(train)
    for split in ("train", "dev"):
        rows = [json.loads(x) for x in open(SRC / f"{split}.jsonl", encoding="utf-8")]
        with open(DST / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(reorder(r, order), ensure_ascii=False) + "\n")
    (DST / "schema.json").write_text(json.dumps(schema(order), indent=1) + "\n")
    print(json.dumps(order))


if __name__ == "__main__":
    main()
