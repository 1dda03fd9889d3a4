"""Task metrics selected by a card's `task.metric` (pure Python, hand-checkable, no model):

- classification (intent routing with an out-of-scope label, CLINC150): accuracy, macro_f1 (over
  the labels seen in gold or predictions), in_scope_accuracy (accuracy over rows whose gold is not
  `oos`), oos_recall, oos_precision, per_class.
- parsing (utterance -> {"intent", "slots": {name: value or [values]}}, SNIPS): intent_accuracy,
  slot_precision / slot_recall / slot_f1 over (slot name, value) pairs with exact strings, counted
  as multisets per row (a list value gives one pair per item); exact_match (intent and the whole
  slots object equal); an answer that is not such an object is invalid and scores nothing.
- style (detoxification, ParaDetox): chrf (corpus chrF, char n-grams 1..6, beta 2, whitespace
  removed, case kept; per sentence the best-scoring reference's statistics, as sacrebleu's CHRF
  with its defaults), style_accuracy (share of outputs that contain no word of a toxic lexicon),
  joint (mean over sentences of style accuracy x sentence chrF / 100, the ParaDetox paper's J
  with the lexicon standing in for its classifier).

The toxic lexicon is learned from the training pairs (`build_lexicon`): a word is toxic when the
references delete it from the sources, i.e. it occurs in at least `min_count` sources and is
missing from every reference of at least `min_rate` of them, and the references as a whole use it
at most `max_ref_ratio` times as often as the sources do. The shipped one is
`models/data/style/paradetox/toxic_lexicon.txt` (built by `build_lexicon.py` beside it); a card
names it, or carries its own word list, in `"metric": {"kind": "style", "lexicon": ...}`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import InputError

OOS = "oos"
MAIN_METRIC = {"classification": "accuracy", "parsing": "slot_f1", "style": "joint"}
KINDS = tuple(MAIN_METRIC)
CHAR_ORDER = 6
BETA = 2.0
DEFAULT_LEXICON = "data/style/paradetox/toxic_lexicon.txt"   # under the shipped models/ folder


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


# -- classification ---------------------------------------------------------------------------

def intent_classification(gold: Sequence[str], pred: Sequence[str | None], oos: str = OOS) -> dict:
    """Accuracy, macro-F1, in-scope accuracy and out-of-scope recall / precision. An invalid
    prediction (None) is wrong, and is neither an oos answer nor an in-scope one."""
    from .evaluate import classification   # evaluate imports this module: here, not at the top

    labels = sorted(set(gold) | {p for p in pred if p is not None})
    m = classification(gold, pred, labels)   # macro-F1 over labels seen in gold or predictions
    inscope = [(g, p) for g, p in zip(gold, pred) if g != oos]
    o = m["per_class"].get(oos, {"precision": 0.0, "recall": 0.0})
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "in_scope_accuracy": sum(g == p for g, p in inscope) / len(inscope) if inscope else 0.0,
            "oos_recall": o["recall"], "oos_precision": o["precision"], "per_class": m["per_class"]}


# -- parsing ----------------------------------------------------------------------------------

def as_parse(value: Any) -> dict | None:
    """{"intent": str, "slots": {str: str | [str]}} or None when `value` is not of that shape."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict) or not isinstance(value.get("intent"), str) or not isinstance(value.get("slots"), dict):
        return None
    for v in value["slots"].values():
        if not (isinstance(v, str) or isinstance(v, list) and all(isinstance(x, str) for x in v)):
            return None
    return value


def slot_pairs(slots: dict) -> Counter:
    """The (name, value) pairs of a slots object as a multiset; a list value gives one per item."""
    c: Counter = Counter()
    for k, v in slots.items():
        for x in (v if isinstance(v, list) else [v]):
            c[(k, x)] += 1
    return c


def parse_scores(gold: Sequence[Any], pred: Sequence[Any]) -> dict:
    """Intent accuracy, slot P/R/F1 (exact name and value) and exact match of the whole object;
    gold and pred are parse objects (or JSON strings); an invalid prediction scores nothing."""
    if len(gold) != len(pred):
        raise ValueError("gold and pred differ in length")
    tp = fp = fn = 0
    intent_ok = exact = invalid = 0
    for g, p in zip(gold, pred):
        g = as_parse(g)
        if g is None:
            raise ValueError(f"gold answer is not an intent/slots object: {g!r}")
        p = as_parse(p)
        gc = slot_pairs(g["slots"])
        if p is None:
            invalid += 1
            fn += sum(gc.values())
            continue
        pc = slot_pairs(p["slots"])
        m = sum((gc & pc).values())
        tp, fp, fn = tp + m, fp + sum(pc.values()) - m, fn + sum(gc.values()) - m
        intent_ok += p["intent"] == g["intent"]
        exact += p["intent"] == g["intent"] and gc == pc
    n = len(gold)
    sp, sr, sf = _prf(tp, fp, fn)
    return {"intent_accuracy": intent_ok / n if n else 0.0, "slot_precision": sp, "slot_recall": sr, "slot_f1": sf,
            "exact_match": exact / n if n else 0.0, "invalid_rate": invalid / n if n else 0.0}


# -- chrF -------------------------------------------------------------------------------------

def _char_ngrams(text: str, n: int) -> Counter:
    s = "".join(text.split())
    return Counter(s[i:i + n] for i in range(len(s) - n + 1))


def chrf_stats(hyp: str, ref: str, order: int = CHAR_ORDER) -> list[int]:
    """[hyp n-grams, ref n-grams, matches] for n = 1..order, flattened (sacrebleu's layout)."""
    out: list[int] = []
    for n in range(1, order + 1):
        h, r = _char_ngrams(hyp, n), _char_ngrams(ref, n)
        out += [sum(h.values()), sum(r.values()), sum((h & r).values())]
    return out


def chrf_from_stats(stats: Sequence[int], beta: float = BETA) -> float:
    """chrF (0-100) from summed statistics: precision and recall averaged over the n-gram orders
    that occur in both hypothesis and reference, then F-beta (sacrebleu's CHRF, eps_smoothing off)."""
    order = len(stats) // 3
    prec = rec = 0.0
    eff = 0
    for i in range(order):
        nh, nr, nm = stats[3 * i: 3 * i + 3]
        if nh > 0 and nr > 0:
            prec += nm / nh
            rec += nm / nr
            eff += 1
    if not eff:
        return 0.0
    prec, rec = prec / eff, rec / eff
    f = beta * beta
    return 100.0 * (1 + f) * prec * rec / (f * prec + rec) if prec + rec else 0.0


def best_stats(hyp: str, refs: Sequence[str]) -> list[int]:
    """The statistics against the reference with the highest sentence chrF (the first on ties)."""
    if isinstance(refs, str):
        refs = [refs]
    best, best_f = None, -1.0
    for r in refs:
        st = chrf_stats(hyp, r)
        f = chrf_from_stats(st)
        if f > best_f:
            best, best_f = st, f
    return best if best is not None else [0] * (3 * CHAR_ORDER)


def sentence_chrf(hyp: str, refs: Sequence[str] | str) -> float:
    return chrf_from_stats(best_stats(hyp, refs))


def corpus_chrf(hyps: Sequence[str], refss: Sequence[Sequence[str] | str]) -> float:
    """Corpus chrF: each sentence's best-reference statistics summed, then one F score."""
    total = [0] * (3 * CHAR_ORDER)
    for h, rs in zip(hyps, refss):
        total = [a + b for a, b in zip(total, best_stats(h, rs))]
    return chrf_from_stats(total)


# -- style: toxic lexicon, style accuracy, joint ----------------------------------------------

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def build_lexicon(pairs: Iterable[tuple[str, Sequence[str]]], *, min_count: int = 3, min_rate: float = 0.75,
                  max_ref_ratio: float = 0.1) -> list[str]:
    """Words the references delete: in >= min_count sources, absent from all references of at
    least min_rate of those sources, and used by the references at most max_ref_ratio times as
    often as by the sources. Sorted."""
    n_src: Counter = Counter()
    n_del: Counter = Counter()
    src_tokens: Counter = Counter()
    ref_tokens: Counter = Counter()
    for src, refs in pairs:
        if isinstance(refs, str):
            refs = [refs]
        s = words(src)
        src_tokens.update(s)
        rw: set[str] = set()
        for r in refs:
            w = words(r)
            rw.update(w)
            ref_tokens.update(w)
        for w in set(s):
            n_src[w] += 1
            n_del[w] += w not in rw
    return sorted(w for w, n in n_src.items()
                  if n >= min_count and n_del[w] / n >= min_rate and ref_tokens[w] <= max_ref_ratio * src_tokens[w])


def is_clean(text: str, lexicon: set[str] | frozenset[str]) -> bool:
    return not any(w in lexicon for w in words(text))


def style_scores(hyps: Sequence[str], refss: Sequence[Sequence[str] | str], lexicon: Iterable[str]) -> dict:
    """chrf (corpus), style_accuracy (share of outputs with no lexicon word), joint (mean of
    style accuracy x sentence chrF / 100)."""
    lex = frozenset(lexicon)
    n = len(hyps)
    sta = [1.0 if is_clean(h, lex) else 0.0 for h in hyps]
    sent = [sentence_chrf(h, rs) for h, rs in zip(hyps, refss)]
    return {"chrf": corpus_chrf(hyps, refss), "style_accuracy": sum(sta) / n if n else 0.0,
            "joint": sum(a * c / 100.0 for a, c in zip(sta, sent)) / n if n else 0.0}


def read_lexicon(path: str | Path) -> list[str]:
    """One word a line; blank lines and lines starting with # are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read the toxic lexicon {path}: {e}") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def lexicon_of(task) -> list[str]:
    """The card's lexicon: a word list in `metric.lexicon`, a file named there (relative to the
    working folder or the shipped models/ folder), or the shipped default."""
    spec = task.metric.get("lexicon") if isinstance(task.metric, dict) else None
    if isinstance(spec, list):
        return [str(w).lower() for w in spec]
    from .paths import shipped_models_dir

    name = spec or DEFAULT_LEXICON
    cands = [Path(name)]
    models = shipped_models_dir()
    if models is not None:
        cands.append(models / name)
    for c in cands:
        if c.is_file():
            return read_lexicon(c)
    raise InputError(f"toxic lexicon not found: {name}",
                     "give the word list in the card's task.metric.lexicon, or a path to a file of words")


# -- the hook for edgeft.evaluate.score ---------------------------------------------------------

def score_kind(kind: str, task, examples: Sequence, values: Sequence[Any], texts: Sequence[str]) -> tuple[dict, int]:
    """(metrics, invalid count) for one of KINDS; `examples` carry `reference` (and `input`)."""
    if kind == "classification":
        m = intent_classification([str(e.reference) for e in examples], list(values))
        return m, sum(v is None for v in values)
    if kind == "parsing":
        m = parse_scores([e.reference for e in examples], list(values))
        return m, round(m["invalid_rate"] * len(examples))
    if kind == "style":
        refs = [e.reference if isinstance(e.reference, list) else [str(e.reference)] for e in examples]
        m = style_scores([t.strip() for t in texts], refs, lexicon_of(task))
        return m, sum(not t.strip() for t in texts)
    raise ValueError(f"unknown metric kind {kind!r}")
