"""Evaluation: task metrics (pure Python, hand-checkable) and a runner that scores an adapter and
prompting baselines of the base on the same rows, through the runtime's own prompt path.

Metrics by the task card's output type:
- labels:   accuracy, macro_f1, per_class {label: precision, recall, f1, support}
- entities (json_schema / grammar answers that are lists of {"text", "type"}): exact (text, type)
            matches counted as multisets per example -> precision, recall, micro_f1, per_type
- text:     rouge_l (ROUGE-L F1 on lowercased word tokens, best over the references, LCS here)
Always: invalid_rate (output the card's parser rejects), ttft_ms (mean), decode_tps (mean).
No torch: this runs on the device side.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from .data import Dataset, Example
from .errors import InputError
from .tasks import TaskSpec

MAIN_METRIC = {"labels": "accuracy", "entities": "micro_f1", "text": "rouge_l", "exact": "accuracy"}


# -- metrics ----------------------------------------------------------------------------------

def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def classification(gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str] | None = None) -> dict:
    """Accuracy, macro-F1 over `labels` (default: the gold labels), and per-class P/R/F1.
    An invalid prediction (None) is simply wrong."""
    if len(gold) != len(pred):
        raise ValueError("gold and pred differ in length")
    labels = list(labels) if labels else sorted(set(gold))
    per = {}
    for lab in labels:
        tp = sum(1 for g, p in zip(gold, pred) if g == lab and p == lab)
        fp = sum(1 for g, p in zip(gold, pred) if g != lab and p == lab)
        fn = sum(1 for g, p in zip(gold, pred) if g == lab and p != lab)
        p, r, f = _prf(tp, fp, fn)
        per[lab] = {"precision": p, "recall": r, "f1": f, "support": tp + fn}
    acc = sum(1 for g, p in zip(gold, pred) if g == p) / len(gold) if gold else 0.0
    return {"accuracy": acc, "macro_f1": sum(v["f1"] for v in per.values()) / len(per) if per else 0.0,
            "per_class": per}


def entity_scores(gold: Sequence[Iterable[tuple[str, str]]], pred: Sequence[Iterable[tuple[str, str]] | None]) -> dict:
    """Entity-level precision / recall / micro-F1 on exact (text, type) matches, and per type.
    Matches are counted per example as multisets (two gold "Paris" need two predicted)."""
    tp: Counter = Counter()
    fp: Counter = Counter()
    fn: Counter = Counter()
    for g, p in zip(gold, pred):
        gc, pc = Counter(map(tuple, g)), Counter(map(tuple, p or []))
        for key in gc | pc:
            m = min(gc[key], pc[key])
            tp[key[1]] += m
            fp[key[1]] += pc[key] - m
            fn[key[1]] += gc[key] - m
    types = sorted(set(tp) | set(fp) | set(fn))
    per = {}
    for t in types:
        p, r, f = _prf(tp[t], fp[t], fn[t])
        per[t] = {"precision": p, "recall": r, "f1": f, "support": tp[t] + fn[t]}
    p, r, f = _prf(sum(tp.values()), sum(fp.values()), sum(fn.values()))
    return {"micro_f1": f, "precision": p, "recall": r, "per_type": per}


_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lcs_len(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, two rows)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, refs: str | Sequence[str]) -> float:
    """ROUGE-L F1 (beta = 1) of `pred` against the best-matching reference."""
    refs = [refs] if isinstance(refs, str) else list(refs)
    pw = words(pred)
    best = 0.0
    for ref in refs:
        rw = words(ref)
        lcs = lcs_len(pw, rw)
        if lcs:
            p, r = lcs / len(pw), lcs / len(rw)
            best = max(best, 2 * p * r / (p + r))
    return best


def as_entities(value: Any) -> list[tuple[str, str]] | None:
    """A parsed NER answer -> [(text, type)], or None if it is not a list of {"text", "type"}."""
    if not isinstance(value, list):
        return None
    out = []
    for e in value:
        if not isinstance(e, dict) or not isinstance(e.get("text"), str) or not isinstance(e.get("type"), str):
            return None
        out.append((e["text"], e["type"]))
    return out


# -- running ----------------------------------------------------------------------------------

@dataclass
class Prediction:
    value: Any            # parsed answer, None when the output is invalid
    text: str
    ttft_ms: float
    decode_tps: float
    completion_tokens: int


def metric_kind(task: TaskSpec, dataset: Dataset | None = None) -> str:
    """labels | entities | text | exact: which metrics fit this card (and its gold values)."""
    t = task.output.type
    if t == "labels":
        return "labels"
    if t == "text":
        return "text"
    if dataset is not None and all(isinstance(e.reference, list) and all(isinstance(x, tuple) for x in e.reference)
                                   for e in dataset.examples):
        return "entities"
    return "exact"


def score(kind: str, task: TaskSpec, examples: Sequence[Example], preds: Sequence[Prediction]) -> dict:
    """Task metrics plus invalid_rate, ttft_ms and decode_tps for one configuration."""
    n = len(examples)
    if kind == "labels":
        m = classification([e.reference for e in examples], [p.value for p in preds], task.output.labels)
        invalid = sum(p.value is None for p in preds)
    elif kind == "entities":
        ents = [as_entities(p.value) for p in preds]
        m = entity_scores([e.reference for e in examples], ents)
        invalid = sum(x is None for x in ents)
    elif kind == "text":
        m = {"rouge_l": sum(rouge_l(p.text, e.reference) for e, p in zip(examples, preds)) / n if n else 0.0}
        invalid = sum(not p.text.strip() for p in preds)
    else:
        import json

        def same(e: Example, p: Prediction) -> bool:
            try:
                return p.value is not None and p.value == json.loads(e.output)
            except ValueError:
                return p.value == e.output
        m = {"accuracy": sum(same(e, p) for e, p in zip(examples, preds)) / n if n else 0.0}
        invalid = sum(p.value is None for p in preds)
    ttft = [p.ttft_ms for p in preds if p.ttft_ms > 0]
    tps = [p.decode_tps for p in preds if p.decode_tps > 0]
    m.update({"invalid_rate": invalid / n if n else 0.0,
              "ttft_ms": statistics.fmean(ttft) if ttft else 0.0,
              # None, not 0, when no answer had a second token (one-label tasks): no decode to time
              "decode_tps": statistics.fmean(tps) if tps else None})
    return m


def predict(engine, task: TaskSpec, text: str, *, adapter: str | None, shots: int = 0) -> Prediction:
    """One answer under the card's prompt and output constraint. With an adapter this is exactly
    `Engine.run`; without one (baselines, merged bases) the same prompt, grammar and parser are
    applied to the bare base."""
    if adapter is not None:
        res = engine.run(text, adapter=adapter, shots=shots)
        value = res.value
    else:
        grammar = _grammar_cache.setdefault(id(task), task.output.grammar())
        res = engine.chat(task.messages(text, shots=shots), adapter=None, grammar=grammar,
                          max_tokens=task.max_tokens, temperature=task.temperature, stop=task.stop)
        try:
            value = task.output.parse(res.text)
        except InputError:
            value = None
    if task.output.type == "text" and not res.text.strip():
        value = None
    return Prediction(value, res.text, res.ttft_ms, res.decode_tps, res.completion_tokens)


_grammar_cache: dict[int, str | None] = {}


@dataclass
class Run:
    """One configuration to score: a label, the engine, the adapter (or None) and the shots."""

    name: str
    engine: Any
    adapter: str | None
    shots: int = 0


@dataclass
class Report:
    task: str
    kind: str
    data: str
    n: int
    metrics: dict                                   # the first run (the adapter, when there is one)
    baselines: dict = field(default_factory=dict)   # name -> {"metrics": ...}
    samples: list = field(default_factory=list)     # a few (input, gold, predictions) for eyeballing
    metrics_of: str = "adapter"                     # the name of the run whose scores are `metrics`

    def to_dict(self) -> dict:
        return {"task": self.task, "metric_kind": self.kind, "main_metric": MAIN_METRIC[self.kind], "data": self.data,
                "n": self.n, "metrics_of": self.metrics_of, "metrics": self.metrics, "baselines": self.baselines,
                "samples": self.samples}


def evaluate(task_name: str, task: TaskSpec, dataset: Dataset, runs: Sequence[Run],
             progress: Callable[[str, int, int], None] | None = None) -> Report:
    """Score every run on every example. The first run's metrics are the report's `metrics`,
    the others go under `baselines`. Runs are done one after another (same adapter in a row),
    so the engine reuses the KV cache of the shared system / few-shot prefix."""
    if not runs:
        raise InputError("nothing to evaluate", "give an adapter or a baseline")
    kind = metric_kind(task, dataset)
    exs = dataset.examples
    results: dict[str, list[Prediction]] = {}
    for run in runs:
        preds = []
        for i, ex in enumerate(exs):
            if ex.input is None:
                raise InputError("eval needs rows with an input text (not chat messages)", "use a label, ner, summarize or prompt file")
            preds.append(predict(run.engine, task, ex.input, adapter=run.adapter, shots=run.shots))
            if progress:
                progress(run.name, i + 1, len(exs))
        results[run.name] = preds
    first = runs[0].name
    rep = Report(task_name, kind, str(dataset.path), len(exs), score(kind, task, exs, results[first]), metrics_of=first)
    for run in runs[1:]:
        rep.baselines[run.name] = {"metrics": score(kind, task, exs, results[run.name])}
    for i in range(min(3, len(exs))):
        rep.samples.append({"input": exs[i].input[:300], "gold": exs[i].output,
                            **{r.name: results[r.name][i].text for r in runs}})
    return rep
