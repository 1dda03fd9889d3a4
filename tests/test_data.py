"""Data readers: every format, bad rows reported with their line numbers, empty files refused."""

from __future__ import annotations

import json

import pytest

from edgeft.data import entities_json, load, load_many
from edgeft.errors import InputError


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_label_jsonl_bad_rows_have_line_numbers(tmp_path):
    f = _jsonl(tmp_path / "s.jsonl", [
        {"text": "Shares jump", "label": "positive"},
        "{not json",
        {"text": "", "label": "neutral"},
        {"text": "Stocks fall", "label": "negative"},
        "[1, 2]",
    ])
    ds = load(f, "label")
    assert [e.output for e in ds.examples] == ["positive", "negative"]
    assert [e.line for e in ds.examples] == [1, 4]
    assert ds.examples[0].input == "Shares jump" and ds.examples[0].reference == "positive"
    assert [p.split(":")[0] for p in ds.problems] == ["line 2", "line 3", "line 5"]
    assert "not valid JSON" in ds.problems[0] and "'text'" in ds.problems[1]


def test_blank_lines_are_not_rows(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text('\n{"text": "a", "label": "x"}\n\n')
    ds = load(f)
    assert ds.format == "label" and len(ds) == 1 and ds.examples[0].line == 2 and not ds.problems


def test_empty_file_is_an_error(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    with pytest.raises(InputError, match="no usable rows.*empty"):
        load(f)


def test_file_with_only_bad_rows_is_an_error_naming_lines(tmp_path):
    f = _jsonl(tmp_path / "bad.jsonl", [{"text": "x"}, "oops"])
    with pytest.raises(InputError, match="line 1.*line 2"):
        load(f, "label")


def test_csv_labels(tmp_path):
    f = tmp_path / "s.csv"
    f.write_text('text,label\n"Profit, up 10%",positive\n,neutral\nFlat day,neutral\n')
    ds = load(f)
    assert [(e.input, e.output) for e in ds.examples] == [("Profit, up 10%", "positive"), ("Flat day", "neutral")]
    assert ds.problems == ["line 3: 'text' must be a non-empty string"]


def test_chat_and_prompt_formats(tmp_path):
    chat = _jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
    ])
    ds = load(chat)
    assert ds.format == "chat" and ds.examples[0].input == "hi" and ds.examples[0].chat   # one turn: the input
    assert ds.examples[0].output == "hello" and ds.problems[0].startswith("line 2:")
    pc = _jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "completion": "4"}, {"input": "3+3?", "output": "6"}])
    ds = load(pc)
    assert ds.format == "prompt" and [(e.input, e.output) for e in ds.examples] == [("2+2?", "4"), ("3+3?", "6")]


def test_ner_types_are_mapped_per_set(tmp_path):
    cmap = tmp_path / "coarse_map.json"
    cmap.write_text(json.dumps({"_comment": "x", "wnut17": {"person": "PER", "corporation": "ORG"},
                                "wikigold": {"PER": "PER"}}))
    d = tmp_path / "wnut17"
    d.mkdir()
    f = _jsonl(d / "dev.jsonl", [
        {"text": "Bill Gates founded Microsoft", "entities": [
            {"start": 0, "end": 2, "type": "person", "text": "Bill Gates"},
            {"start": 3, "end": 4, "type": "corporation", "text": "Microsoft"}]},
        {"text": "nothing here", "entities": []},
        {"text": "a b", "entities": [{"type": "weird", "text": "a"}]},
    ])
    ds = load(f, ner_map=cmap)
    assert ds.format == "ner"
    assert ds.examples[0].reference == [("Bill Gates", "PER"), ("Microsoft", "ORG")]
    assert json.loads(ds.examples[0].output) == [{"text": "Bill Gates", "type": "PER"}, {"text": "Microsoft", "type": "ORG"}]
    assert ds.examples[1].output == "[]"
    assert ds.problems == ["line 3: entity type 'weird' is not in the type map"]


def test_entities_json_keeps_unicode_and_order():
    assert entities_json([{"text": "Zürich", "type": "LOC", "start": 0}]) == '[{"text": "Zürich", "type": "LOC"}]'


def test_summarize_uses_first_target_and_keeps_all_as_references(tmp_path):
    f = _jsonl(tmp_path / "s.jsonl", [{"id": "a", "title": "t", "source": "Long abstract.", "targets": ["One.", "Two."]},
                                     {"source": "x", "targets": []}])
    ds = load(f)
    assert ds.format == "summarize" and ds.examples[0].output == "One." and ds.examples[0].reference == ["One.", "Two."]
    assert ds.problems == ["line 2: 'targets' must be a non-empty list of strings"]


def test_limit_is_a_seeded_sample_not_the_head(tmp_path):
    rows = [{"text": f"t{i}", "label": "negative" if i < 50 else "positive"} for i in range(100)]
    f = _jsonl(tmp_path / "sorted.jsonl", rows)
    a, b = load(f, limit=20, seed=1), load(f, limit=20, seed=1)
    assert [e.input for e in a.examples] == [e.input for e in b.examples]
    assert len(a) == 20 and {e.output for e in a.examples} == {"negative", "positive"}
    assert [e.line for e in a.examples] == sorted(e.line for e in a.examples)
    assert [e.input for e in load(f, limit=20, seed=2).examples] != [e.input for e in a.examples]


def test_load_many_concatenates_and_refuses_mixed_formats(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": "p"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": "y", "label": "n"}])
    assert [e.output for e in load_many([a, b]).examples] == ["p", "n"]
    c = _jsonl(tmp_path / "c.jsonl", [{"source": "y", "targets": ["z"]}])
    with pytest.raises(InputError, match="different formats"):
        load_many([a, c])


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="unknown data format"):
        load(tmp_path / "x.jsonl", "xml")
    with pytest.raises(InputError, match="not found"):
        load(tmp_path / "missing.jsonl")
