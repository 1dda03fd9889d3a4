"""Evaluation: task metrics (pure Python, hand-checkable) and a runner that scores an adapter and
prompting baselines of the base on the same rows, through the runtime's own prompt path.

Metrics by the task card's output type:
- labels:   accuracy, macro_f1, per_class {label: precision, recall, f1, support}
- entities (json_schema / grammar answers that are lists of {"text", "type"}): exact (text, type)
            matches counted as multisets per example -> precision, recall, micro_f1, per_type
- text:     rouge_l (ROUGE-L F1 on lowercased word tokens, best over the references, LCS here)
Always: invalid_rate (output the card's parser rejects), ttft_ms (mean), decode_tps (mean),
latency_ms_p50 / latency_ms_p90 (whole answer, per item). A report also carries the trivial lines
that any model must beat (`majority`: always the most frequent gold label; `copy`: the input as
the answer, for text tasks), a confusion matrix for labels, and the process's resident memory.
No torch: this runs on the device side.
"""

from __future__ import annotations

import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from .data import Dataset, Example
from .errors import InputError
from .tasks import TaskSpec

from . import task_metrics

MAIN_METRIC = {"labels": "accuracy", "entities": "micro_f1", "text": "rouge_l", "exact": "accuracy",
               **task_metrics.MAIN_METRIC}   # classification / parsing / style: chosen by the card's task.metric


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


INVALID = "(invalid)"


def confusion(gold: Sequence[str], pred: Sequence[str | None]) -> dict[str, dict[str, int]]:
    """{gold label: {predicted label or "(invalid)": count}}, rows and columns in sorted order."""
    out: dict[str, dict[str, int]] = {}
    for g, p in zip(gold, pred):
        row = out.setdefault(g, {})
        key = INVALID if p is None else p
        row[key] = row.get(key, 0) + 1
    return {g: dict(sorted(out[g].items())) for g in sorted(out)}


def majority_label(gold: Sequence[str]) -> str:
    """The most frequent label (ties: the first in sorted order): the always-majority line."""
    c = Counter(gold)
    return min(c, key=lambda lab: (-c[lab], lab))


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


def efficiency(engine, adapter: str | None = None, *, rss: bool = True) -> dict:
    """Resident memory of this process (rss=False where the process also holds a torch model)
    and the adapter's size, MB."""
    from .bench.machine import rss_mb   # the bench's reading of this process's resident memory

    out: dict[str, Any] = {}
    if rss:
        mb = rss_mb()
        out["rss_mb"] = round(mb, 1) if mb is not None else None
    if adapter is not None and adapter in engine.adapters:
        out["adapter_mb"] = round(engine.adapters[adapter].mb, 2)
    return out


# -- running ----------------------------------------------------------------------------------

@dataclass
class Prediction:
    value: Any            # parsed answer, None when the output is invalid
    text: str
    ttft_ms: float
    decode_tps: float
    completion_tokens: int
    latency_ms: float = 0.0   # the whole answer, prompt to last token


def metric_kind(task: TaskSpec, dataset: Dataset | None = None) -> str:
    """labels | entities | text | exact by the output type (and gold values), or the card's task.metric
    (classification | parsing | style, edgeft/task_metrics.py)."""
    if task.metric_name in task_metrics.KINDS:
        return task.metric_name
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
    if kind in task_metrics.KINDS:
        m, invalid = task_metrics.score_kind(kind, task, examples, [p.value for p in preds], [p.text for p in preds])
    elif kind == "labels":
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
    lat = sorted(p.latency_ms for p in preds if p.latency_ms > 0)
    m.update({"invalid_rate": invalid / n if n else 0.0,
              "ttft_ms": statistics.fmean(ttft) if ttft else 0.0,
              # None, not 0, when no answer had a second token (one-label tasks): no decode to time
              "decode_tps": statistics.fmean(tps) if tps else None,
              "latency_ms_p50": _quantile(lat, 0.5), "latency_ms_p90": _quantile(lat, 0.9)})
    return m


def _quantile(xs: Sequence[float], q: float) -> float | None:
    """Linear-interpolated quantile of sorted values (None for none)."""
    if not xs:
        return None
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def trivial_predictions(kind: str, task: TaskSpec, examples: Sequence[Example]) -> dict[str, list[Prediction]]:
    """The lines any model must beat, without running one: `majority` (labels: always the most
    frequent gold label of these rows) and `copy` (text: the input as the answer)."""
    if kind in ("labels", "classification"):
        lab = majority_label([e.reference for e in examples])
        return {"majority": [Prediction(lab, lab, 0.0, 0.0, 0) for _ in examples]}
    if kind in ("text", "style"):
        return {"copy": [Prediction(e.input or "", e.input or "", 0.0, 0.0, 0) for e in examples]}
    return {}


def predict(engine, task: TaskSpec, text: str | Example, *, adapter: str | None, shots: int = 0) -> Prediction:
    """One answer under the card's prompt and output constraint: the card's prompt for an input
    text (exactly `Engine.run`), or the card's system prompt before a multi-turn chat row. With
    adapter=None (baselines, merged bases) the same prompt, grammar and parser go to the bare base."""
    ex = text if isinstance(text, Example) else Example(output="", input=text)
    if ex.input is not None:
        msgs = task.messages(ex.input, shots=shots)
    elif ex.messages:
        msgs = task.conversation(ex.messages, shots=shots)
    else:
        raise InputError(f"line {ex.line}: a row with neither an input text nor chat messages")
    grammar = task.output.grammar()   # converted once per card (OutputSpec keeps it)
    t0 = time.perf_counter()
    res = engine.chat(msgs, adapter=adapter, grammar=grammar, max_tokens=task.max_tokens,
                      temperature=task.temperature, stop=task.stop)
    latency = (time.perf_counter() - t0) * 1e3
    try:
        value = task.output.parse(res.text)
    except InputError:
        value = None
    if task.output.type == "text" and not res.text.strip():
        value = None
    return Prediction(value, res.text, res.ttft_ms, res.decode_tps, res.completion_tokens, latency)




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
    data_format: str = ""                           # the format the data file was read as
    confusion: dict = field(default_factory=dict)   # labels: run name -> {gold: {pred: count}}
    efficiency: dict = field(default_factory=dict)  # rss_mb, adapter_mb (filled by the caller that knows)

    @property
    def main_metric(self) -> str:
        return MAIN_METRIC[self.kind]

    def best_baseline(self, trivial: bool = True) -> tuple[str, float] | None:
        """(name, main metric) of the strongest baseline (the trivial lines included by default)."""
        key = self.main_metric
        cands = [(k, v["metrics"][key]) for k, v in self.baselines.items()
                 if trivial or k not in ("majority", "copy")]
        return max(cands, key=lambda kv: kv[1]) if cands else None

    def to_dict(self) -> dict:
        d = {"task": self.task, "metric_kind": self.kind, "main_metric": MAIN_METRIC[self.kind], "data": self.data,
             "data_format": self.data_format, "n": self.n, "metrics_of": self.metrics_of, "metrics": self.metrics,
             "baselines": self.baselines, "samples": self.samples}
        if self.confusion:
            d["confusion"] = self.confusion
        if self.efficiency:
            d["efficiency"] = self.efficiency
        best = self.best_baseline()
        if best is not None and self.metrics_of == "adapter":
            d["margin_over_best_baseline"] = {"baseline": best[0], "points": round((self.metrics[self.main_metric] - best[1]) * 100, 2)}
        return d


def evaluate(task_name: str, task: TaskSpec, dataset: Dataset, runs: Sequence[Run],
             progress: Callable[[str, int, int], None] | None = None, *, trivial: bool = True) -> Report:
    """Score every run on every example. The first run's metrics are the report's `metrics`,
    the others (and the trivial lines, unless trivial=False) go under `baselines`. Runs are done
    one after another (same adapter in a row), so the engine reuses the KV cache of the shared
    system / few-shot prefix."""
    if not runs:
        raise InputError("nothing to evaluate", "give an adapter or a baseline")
    kind = metric_kind(task, dataset)
    exs = dataset.examples
    results: dict[str, list[Prediction]] = {}
    for run in runs:
        preds = []
        for i, ex in enumerate(exs):
            preds.append(predict(run.engine, task, ex, adapter=run.adapter, shots=run.shots))
            if progress:
                progress(run.name, i + 1, len(exs))
        results[run.name] = preds
    names = [r.name for r in runs]
    if trivial:
        for name, preds in trivial_predictions(kind, task, exs).items():
            results[name] = preds
            names.append(name)
    first = names[0]
    rep = Report(task_name, kind, str(dataset.path), len(exs), score(kind, task, exs, results[first]), metrics_of=first,
                 data_format=dataset.format)
    for name in names[1:]:
        rep.baselines[name] = {"metrics": score(kind, task, exs, results[name])}
    if kind == "labels":
        rep.confusion = {name: confusion([e.reference for e in exs], [p.value for p in results[name]]) for name in names}
    for i in range(min(3, len(exs))):
        shown = exs[i].input if exs[i].input is not None else (exs[i].messages or [{}])[-1].get("content", "")
        rep.samples.append({"input": shown[:300], "gold": exs[i].output, **{n: results[n][i].text for n in names}})
    return rep


def card_metrics(report: Report, data: str, sha256: str | None) -> dict:
    """What goes into a card's `metrics`: the run's scores (without the per-class tables), its n,
    the data file and its sha256, and the main metric of each baseline (trivial lines included)."""
    m = {k: v for k, v in report.metrics.items() if k not in ("per_class", "per_type")}
    out = {"data": data, "format": report.data_format, "n": report.n, **_rounded(m),
           "baselines": {k: round(v["metrics"][report.main_metric], 4) for k, v in report.baselines.items()}}
    if sha256:
        out["sha256"] = sha256
    return out


def _rounded(m: Any) -> Any:
    if isinstance(m, dict):
        return {k: _rounded(v) for k, v in m.items()}
    return round(m, 4) if isinstance(m, float) else m
