"""Build toxic_lexicon.txt beside this file from train.jsonl (run from the repo root:
python models/data/style/paradetox/build_lexicon.py). The rule is edgeft.task_metrics.build_lexicon:
words the crowd references delete from the toxic sources (in >= 3 training sources, missing from
every reference of >= 75% of them, and used by the references at most 0.1x as often as by the
sources). Only the training split is read; dev is scored with the result."""

import json
from pathlib import Path

from edgeft.task_metrics import build_lexicon

HERE = Path(__file__).resolve().parent
rows = [json.loads(x) for x in open(HERE / "train.jsonl", encoding="utf-8")]
lex = build_lexicon((r["source"], r["targets"]) for r in rows)
(HERE / "toxic_lexicon.txt").write_text(
    "# words that ParaDetox references delete from the toxic sources (train split, 3,000 pairs);\n"
    "# built by build_lexicon.py with edgeft.task_metrics.build_lexicon; one lower-cased word a line\n"
    + "\n".join(lex) + "\n", encoding="utf-8")
print(len(lex), "words")
