"""Build the `routing` example task from CLINC150 (shared/data/classification/clinc150).

A four-team support router: route a customer's message to banking, credit_cards, travel or work
(CLINC150's domains of those names). Run from the repository root:
    python models/data/routing/build.py ../shared/data/classification/clinc150
Writes train.jsonl (100 chat rows), more.jsonl (300 further chat rows, disjoint: for growing
the data) and test.jsonl (every dev row of those domains, text + label: a separate file that
training never sees). Seeded, so the files are the same on every run.
"""

import json
import random
import sys
from pathlib import Path

TEAMS = ("banking", "credit_cards", "travel", "work")
SYSTEM = ("You route customer messages to the team that handles them: banking, credit_cards, travel or work. "
          "Answer with the team name only.")


def main(src: str) -> None:
    here = Path(__file__).resolve().parent
    rows = [json.loads(x) for x in open(Path(src) / "train.jsonl", encoding="utf-8")]
    pool = [r for r in rows if r["domain"] in TEAMS]
    random.Random(4).shuffle(pool)

    def chat(r):
        return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["text"]},
                             {"role": "assistant", "content": r["domain"]}]}
    for name, part in (("train.jsonl", pool[:100]), ("more.jsonl", pool[100:400])):
        with open(here / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(chat(r), ensure_ascii=False) + "\n" for r in part)
    dev = [json.loads(x) for x in open(Path(src) / "dev.jsonl", encoding="utf-8")]
    with open(here / "test.jsonl", "w", encoding="utf-8") as f:
        for r in dev:
            if r["domain"] in TEAMS:
                f.write(json.dumps({"text": r["text"], "label": r["domain"]}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
