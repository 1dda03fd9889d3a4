"""The classification / parsing / style metrics (edgeft/task_metrics.py) on hand-made cases, the
task card's `metric` field, and the hook into edgeft.evaluate.score. No model."""

import json
from pathlib import Path

import pytest

from edgeft import task_metrics as TM
from edgeft.data import Example
from edgeft.errors import AdapterError
from edgeft.evaluate import MAIN_METRIC, Prediction, metric_kind, score, trivial_predictions
from edgeft.tasks import TaskSpec

ROOT = Path(__file__).resolve().parent.parent


# -- classification ---------------------------------------------------------------------------

def test_intent_classification_all_right():
    m = TM.intent_classification(["alarm", "oos", "weather"], ["alarm", "oos", "weather"])
    assert m["accuracy"] == m["macro_f1"] == m["in_scope_accuracy"] == 1.0
    assert m["oos_recall"] == m["oos_precision"] == 1.0


def test_an_oos_miss_lowers_oos_recall_not_in_scope_accuracy():
    gold = ["alarm", "weather", "oos", "oos"]
    m = TM.intent_classification(gold, ["alarm", "weather", "oos", "timer"])
    assert m["oos_recall"] == 0.5
    assert m["oos_precision"] == 1.0
    assert m["in_scope_accuracy"] == 1.0
    assert m["accuracy"] == 0.75


def test_oos_answer_to_in_scope_query_lowers_precision_and_in_scope_accuracy():
    m = TM.intent_classification(["alarm", "weather", "oos"], ["oos", "weather", "oos"])
    assert m["oos_recall"] == 1.0
    assert m["oos_precision"] == 0.5
    assert m["in_scope_accuracy"] == 0.5


def test_invalid_prediction_is_wrong_and_macro_f1_over_seen_labels():
    m = TM.intent_classification(["a", "b"], ["a", None])
    assert m["accuracy"] == 0.5
    assert set(m["per_class"]) == {"a", "b"}          # not the 151 labels of a card
    assert m["macro_f1"] == pytest.approx(0.5)       # a: 1.0, b: 0.0
    assert m["oos_recall"] == 0.0 and m["oos_precision"] == 0.0   # no oos anywhere


# -- parsing ----------------------------------------------------------------------------------

GOLD = {"intent": "PlayMusic", "slots": {"track": "Say A Word", "artist": "La India"}}


def test_parse_perfect_regardless_of_slot_order():
    pred = {"intent": "PlayMusic", "slots": {"artist": "La India", "track": "Say A Word"}}
    m = TM.parse_scores([GOLD], [pred])
    assert m == {"intent_accuracy": 1.0, "slot_precision": 1.0, "slot_recall": 1.0, "slot_f1": 1.0,
                 "exact_match": 1.0, "invalid_rate": 0.0}


def test_a_wrong_slot_value_lowers_slot_f1_and_exact_match():
    pred = {"intent": "PlayMusic", "slots": {"track": "Say A", "artist": "La India"}}
    m = TM.parse_scores([GOLD], [pred])
    assert m["slot_precision"] == 0.5 and m["slot_recall"] == 0.5 and m["slot_f1"] == 0.5
    assert m["exact_match"] == 0.0
    assert m["intent_accuracy"] == 1.0


def test_wrong_slot_name_and_wrong_intent():
    m = TM.parse_scores([GOLD], [{"intent": "AddToPlaylist", "slots": {"track": "Say A Word", "playlist": "La India"}}])
    assert m["intent_accuracy"] == 0.0 and m["exact_match"] == 0.0
    assert m["slot_f1"] == 0.5


def test_parse_invalid_scores_nothing_and_counts():
    m = TM.parse_scores([json.dumps(GOLD), GOLD], ["not json", {"intent": "PlayMusic"}])
    assert m["invalid_rate"] == 1.0
    assert m["slot_recall"] == 0.0 and m["intent_accuracy"] == 0.0 and m["exact_match"] == 0.0


def test_parse_list_values_are_pairs():
    gold = {"intent": "BookRestaurant", "slots": {"city": ["Paris", "Lyon"]}}
    m = TM.parse_scores([gold], [{"intent": "BookRestaurant", "slots": {"city": "Paris"}}])
    assert m["slot_precision"] == 1.0 and m["slot_recall"] == 0.5


# -- chrF -------------------------------------------------------------------------------------

def test_chrf_identical_is_100_and_disjoint_is_0():
    assert TM.sentence_chrf("you are wrong", ["you are wrong"]) == pytest.approx(100.0)
    assert TM.sentence_chrf("abc", ["xyz"]) == 0.0
    assert TM.corpus_chrf(["a b c", "hello"], [["abc"], ["hello"]]) == pytest.approx(100.0)   # whitespace ignored


def test_chrf_by_hand():
    # hyp "ab", ref "abc": 1-grams P 2/2 R 2/3; 2-grams P 1/1 R 1/2; orders 3-6 are absent in the hyp
    p, r = 1.0, (2 / 3 + 1 / 2) / 2
    want = 100 * 5 * p * r / (4 * p + r)
    assert TM.sentence_chrf("ab", ["abc"]) == pytest.approx(want)


def test_chrf_takes_the_best_reference_and_sums_statistics():
    assert TM.sentence_chrf("you are wrong", ["xyz", "you are wrong"]) == pytest.approx(100.0)
    c = TM.corpus_chrf(["abcdef", "ab"], [["abcdef"], ["xy"]])
    assert c > 90.0            # one F over summed statistics (the long sentence dominates), not the mean 50


# -- style ------------------------------------------------------------------------------------

PAIRS = [
    ("you are a stupid idiot", ["you are wrong"]),
    ("this stupid game is broken", ["this game is broken"]),
    ("what an idiot , he is late", ["he is late"]),
    ("stupid rules , idiot mods", ["bad rules , strict mods"]),
    ("the stupid bus is late again", ["the bus is late again"]),
    ("shut up you idiot", ["please stop talking"]),
    ("the game is fun", ["the game is fun"]),
]


def test_build_lexicon_learns_deleted_words_only():
    lex = TM.build_lexicon(PAIRS)
    assert "stupid" in lex and "idiot" in lex
    assert "is" not in lex and "the" not in lex and "late" not in lex
    assert "shut" not in lex        # in one source only (min_count 3)


def test_a_copier_scores_style_accuracy_low_and_a_detoxifier_high():
    lex = TM.build_lexicon(PAIRS)
    srcs = ["you stupid fool , read it", "idiot drivers everywhere", "nice weather today"]
    refs = [["please read it"], ["bad drivers everywhere"], ["nice weather today"]]
    copy = TM.style_scores(srcs, refs, lex)
    good = TM.style_scores(["please read it", "bad drivers everywhere", "nice weather today"], refs, lex)
    assert copy["style_accuracy"] == pytest.approx(1 / 3)
    assert good["style_accuracy"] == 1.0
    assert good["chrf"] == pytest.approx(100.0) and good["joint"] == pytest.approx(1.0)
    assert copy["joint"] < 0.5 < good["joint"]


def test_joint_is_mean_of_style_times_sentence_chrf():
    lex = ["idiot"]
    hyps, refs = ["he is late", "idiot he is late"], [["he is late"], ["he is late"]]
    m = TM.style_scores(hyps, refs, lex)
    assert m["style_accuracy"] == 0.5
    assert m["joint"] == pytest.approx((1.0 * 1.0 + 0.0) / 2)


def test_shipped_lexicon_copy_vs_references():
    lex = TM.read_lexicon(ROOT / "models/data/style/paradetox/toxic_lexicon.txt")
    rows = [json.loads(x) for x in open(ROOT / "models/data/style/paradetox/dev.jsonl", encoding="utf-8")]
    copy = TM.style_scores([r["source"] for r in rows], [r["targets"] for r in rows], lex)
    assert copy["style_accuracy"] < 0.3 and copy["joint"] < 0.15 and 70 < copy["chrf"] < 80   # chrF ~76 as the issue says
    ref_sta = sum(TM.is_clean(r["target"], frozenset(lex)) for r in rows) / len(rows)
    assert ref_sta > 0.95
    card = json.loads((ROOT / "models/tasks/style.json").read_text())
    assert card["task"]["metric"]["lexicon"] == lex


# -- the card field and the evaluate hook ------------------------------------------------------

@pytest.mark.parametrize("metric", ["classification", "parsing", "style", {"kind": "style", "lexicon": ["idiot"]}])
def test_card_metric_round_trips(metric):
    d = {"system": "s", "template": "{input}", "output": {"type": "text"}, "metric": metric}
    t = TaskSpec.from_dict(d)
    assert t.metric == metric
    again = TaskSpec.from_dict(json.loads(json.dumps(t.to_dict())))
    assert again.metric == metric and again.metric_name == (metric if isinstance(metric, str) else "style")


def test_old_cards_have_no_metric_and_unknown_is_refused():
    t = TaskSpec.from_dict({"output": {"type": "labels", "labels": ["a", "b"]}})
    assert t.metric is None and "metric" not in t.to_dict()
    assert metric_kind(t) == "labels"
    with pytest.raises(AdapterError):
        TaskSpec.from_dict({"metric": "bleu"})


@pytest.mark.parametrize("name", ["classification", "parsing", "style"])
def test_shipped_cards_load(name):
    t = TaskSpec.from_dict(json.loads((ROOT / f"models/tasks/{name}.json").read_text())["task"])
    assert t.metric_name == name and metric_kind(t) == name
    assert MAIN_METRIC[name] in ("accuracy", "slot_f1", "joint")


def _pred(value, text=None):
    return Prediction(value, text if text is not None else str(value), 0.0, 0.0, 0)


def test_score_hook_classification_with_majority_line():
    t = TaskSpec.from_dict({"output": {"type": "labels", "labels": ["alarm", "oos"]}, "metric": "classification"})
    exs = [Example(output=g, input="q", reference=g) for g in ("alarm", "alarm", "oos")]
    m = score("classification", t, exs, [_pred("alarm"), _pred("alarm"), _pred("alarm")])
    assert m["accuracy"] == pytest.approx(2 / 3) and m["oos_recall"] == 0.0 and m["in_scope_accuracy"] == 1.0
    assert set(trivial_predictions("classification", t, exs)) == {"majority"}


def test_score_hook_parsing_and_style():
    tp = TaskSpec.from_dict({"output": {"type": "json_schema", "schema": {"type": "object"}}, "metric": "parsing"})
    ans = json.dumps(GOLD)
    exs = [Example(output=ans, input="play Say A Word by La India", reference=ans)]
    m = score("parsing", tp, exs, [_pred(None, "{")])
    assert m["invalid_rate"] == 1.0 and m["slot_f1"] == 0.0
    ts = TaskSpec.from_dict({"output": {"type": "text"}, "metric": {"kind": "style", "lexicon": ["idiot"]}})
    exs = [Example(output="he is late", input="idiot he is late", reference=["he is late"])]
    copy = trivial_predictions("style", ts, exs)["copy"]
    m = score("style", ts, exs, copy)
    assert m["style_accuracy"] == 0.0 and m["joint"] == 0.0 and m["chrf"] > 50
