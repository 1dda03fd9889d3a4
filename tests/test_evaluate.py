"""Metrics on examples small enough to check by hand."""

from __future__ import annotations

import pytest

from edgeft.data import Dataset, Example
from edgeft.evaluate import (Prediction, as_entities, classification, entity_scores, lcs_len, metric_kind,
                             rouge_l, score, words)
from edgeft.tasks import OutputSpec, TaskSpec


def test_classification_by_hand():
    gold = ["pos", "pos", "neg", "neu", "neu", "neu"]
    pred = ["pos", "neg", "neg", "neu", "pos", None]
    m = classification(gold, pred, ["neg", "neu", "pos"])
    assert m["accuracy"] == pytest.approx(3 / 6)
    # pos: tp1 fp1 fn1 -> P .5 R .5 F .5 ; neg: tp1 fp1 fn0 -> P .5 R 1 F 2/3 ; neu: tp1 fp0 fn2 -> P 1 R 1/3 F .5
    assert m["per_class"]["pos"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["neg"]["f1"] == pytest.approx(2 / 3)
    assert m["per_class"]["neu"] == pytest.approx({"precision": 1.0, "recall": 1 / 3, "f1": 0.5, "support": 3})
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)


def test_classification_label_never_predicted_scores_zero():
    m = classification(["a", "b"], ["a", "a"], ["a", "b"])
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"]["a"]["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_entity_scores_exact_text_and_type_with_duplicates():
    gold = [[("Paris", "LOC"), ("Paris", "LOC"), ("Bill Gates", "PER")], [("Acme", "ORG")], []]
    pred = [[("Paris", "LOC"), ("Gates", "PER")], [("Acme", "LOC")], [("Zed", "MISC")]]
    m = entity_scores(gold, pred)
    # tp: Paris/LOC x1 ; fp: Gates/PER, Acme/LOC, Zed/MISC ; fn: Paris/LOC, Bill Gates/PER, Acme/ORG
    assert m["precision"] == pytest.approx(1 / 4)
    assert m["recall"] == pytest.approx(1 / 4)
    assert m["micro_f1"] == pytest.approx(1 / 4)
    assert m["per_type"]["LOC"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_type"]["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_type"]["MISC"]["support"] == 0


def test_entity_invalid_prediction_counts_as_empty():
    m = entity_scores([[("A", "PER")], [("B", "ORG")]], [[("A", "PER")], None])
    assert (m["precision"], m["recall"]) == pytest.approx((1.0, 0.5))
    assert m["micro_f1"] == pytest.approx(2 / 3)


def test_as_entities():
    assert as_entities([{"text": "A", "type": "PER"}]) == [("A", "PER")]
    assert as_entities([]) == []
    assert as_entities({"text": "A"}) is None
    assert as_entities([{"text": "A"}]) is None


def test_lcs_and_rouge_l_by_hand():
    assert words("The cat, the HAT!") == ["the", "cat", "the", "hat"]
    assert lcs_len("a b c d e".split(), "a c e x".split()) == 3
    assert lcs_len([], ["a"]) == 0
    # pred 4 words, ref 5 words, LCS "the cat on mat" = 4: P 1, R .8, F = 2*.8/1.8
    assert rouge_l("the cat on mat", "The cat sat on mat.") == pytest.approx(2 * 0.8 / 1.8)
    assert rouge_l("nothing shared", "the cat") == 0.0
    assert rouge_l("", "the cat") == 0.0
    # best reference wins
    assert rouge_l("a b", ["x y", "a b"]) == pytest.approx(1.0)


def test_score_adds_invalid_rate_and_timings():
    task = TaskSpec(output=OutputSpec(type="labels", labels=["negative", "positive"]))
    exs = [Example(output="positive", input="x", reference="positive"),
           Example(output="negative", input="y", reference="negative")]
    preds = [Prediction("positive", "positive", 10.0, 0.0, 1), Prediction(None, "???", 30.0, 50.0, 3)]
    m = score("labels", task, exs, preds)
    assert m["accuracy"] == 0.5 and m["invalid_rate"] == 0.5
    assert m["ttft_ms"] == pytest.approx(20.0) and m["decode_tps"] == pytest.approx(50.0)
    one_token = [Prediction("positive", "positive", 10.0, 0.0, 1), Prediction("negative", "negative", 12.0, 0.0, 1)]
    assert score("labels", task, exs, one_token)["decode_tps"] is None  # nothing decoded after the first token


def test_metric_kind_follows_card_and_gold():
    ner = TaskSpec(output=OutputSpec(type="json_schema", schema={"type": "array"}))
    ds = Dataset(path=None, format="ner", examples=[Example(output="[]", input="x", reference=[("A", "PER")])])
    assert metric_kind(ner, ds) == "entities"
    assert metric_kind(TaskSpec(), None) == "text"
    assert metric_kind(TaskSpec(output=OutputSpec(type="labels", labels=["a"])), None) == "labels"
