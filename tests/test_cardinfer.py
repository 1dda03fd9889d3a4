"""Your own task without a card: the card inferred from the rows, a given card checked against
them, every data format read the same way, the trivial lines of a report, and temp files of a
killed writer swept on the next run. No model needed: fast lane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeft.cardinfer import check_card, default_name, infer_output, infer_schema, infer_task
from edgeft.data import Example, load
from edgeft.errors import InputError
from edgeft.evaluate import classification, confusion, majority_label, score, trivial_predictions, Prediction
from edgeft.tasks import OutputSpec, TaskSpec

REPO = Path(__file__).resolve().parent.parent
SYSTEM = "Route the message to a team."


def _chat_rows(pairs, system=SYSTEM):
    rows = []
    for text, answer in pairs:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        rows.append({"messages": msgs})
    return rows


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PAIRS = [(f"message number {i} about {lab}", lab) for i, lab in enumerate(["billing", "travel", "hr", "billing"] * 5)]


def test_chat_rows_become_inputs_with_their_system_prompt(tmp_path):
    ds = load(_write_jsonl(tmp_path / "d.jsonl", _chat_rows(PAIRS[:3])))
    assert ds.format == "chat"
    e = ds.examples[0]
    assert (e.input, e.output, e.system, e.chat, e.messages) == ("message number 0 about billing", "billing", SYSTEM, True, None)


def test_multi_turn_chat_rows_keep_their_history(tmp_path):
    row = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "my card broke"},
                        {"role": "assistant", "content": "billing"}]}
    e = load(_write_jsonl(tmp_path / "d.jsonl", [row])).examples[0]
    assert e.input is None and e.system == SYSTEM and [m["role"] for m in e.messages] == ["user", "assistant", "user"]
    task = TaskSpec(system="card prompt")
    msgs = task.conversation(e.messages)
    assert msgs[0] == {"role": "system", "content": "card prompt"} and msgs[-1]["content"] == "my card broke"


def test_inferred_card_for_labels(tmp_path):
    inf = infer_task(load(_write_jsonl(tmp_path / "d.jsonl", _chat_rows(PAIRS))).examples)
    t = inf.task
    assert t.system == SYSTEM and t.template == "{input}"
    assert t.output.type == "labels" and t.output.labels == ["billing", "hr", "travel"]
    assert t.output.grammar() == 'root ::= "billing" | "hr" | "travel"'
    assert 3 <= len(t.few_shot) <= 4 and len({s["output"] for s in t.few_shot}) == 3   # different labels first
    assert t.temperature == 0.0 and t.max_tokens >= len("billing") + 1   # room to spell a label byte by byte


def test_rows_that_disagree_on_the_system_prompt_are_named(tmp_path):
    rows = _chat_rows(PAIRS[:6]) + _chat_rows(PAIRS[:1], system="another prompt")
    ds = load(_write_jsonl(tmp_path / "d.jsonl", rows))
    with pytest.raises(InputError, match="lines 7 differ"):
        infer_task(ds.examples)


def test_json_answers_give_a_schema_with_required_keys_and_enums():
    vals = [v for i in range(3) for v in ({"intent": "Play", "slots": {"artist": f"band {i}"}}, {"intent": "Book", "slots": {}},
                                          {"intent": "Play", "slots": {"artist": f"singer {i}", "year": 1999}})]
    s = infer_schema(vals)
    assert s["type"] == "object" and s["required"] == ["intent", "slots"] and s["additionalProperties"] is False
    assert s["properties"]["intent"] == {"type": "string", "enum": ["Book", "Play"]}
    slots = s["properties"]["slots"]
    assert "required" not in slots and slots["properties"]["year"] == {"type": "integer"}
    assert slots["properties"]["artist"] == {"type": "string"}          # too many values for an enum
    assert infer_schema([1, 2.5]) == {"type": "number"}
    assert infer_schema(["a", 1]) == {"anyOf": [{"type": "string"}, {"type": "integer"}]}
    out, _, note = infer_output([json.dumps(v) for v in vals])
    assert out.type == "json_schema" and "JSON" in note


def test_free_text_answers_get_room_for_the_longest():
    answers = [f"A polite rewrite number {i}, " + "word " * i for i in range(30)]
    out, max_tokens, _ = infer_output(answers)
    assert out.type == "text" and max_tokens >= len(max(answers, key=len)) / 4


def test_inferred_json_schema_compiles_to_a_grammar():
    vals = [json.dumps({"intent": "Play", "slots": {"artist": "abba"}})] * 4
    out, _, _ = infer_output(vals)
    g = out.grammar()
    assert "root" in g and "intent" in g


def test_a_card_whose_labels_miss_answers_is_refused_before_training():
    exs = [Example(output=lab, input="x", reference=lab) for lab in ("a", "b", "c", "c")]
    task = TaskSpec(output=OutputSpec(type="labels", labels=["a", "b"]))
    with pytest.raises(InputError, match="'c' \\(2\\)"):
        check_card(task, exs)


def test_a_chat_system_prompt_other_than_the_cards_is_a_warning():
    exs = [Example(output="a", input="x", reference="a", system="rows' prompt", chat=True)]
    warnings = check_card(TaskSpec(system="card prompt", output=OutputSpec(type="labels", labels=["a"])), exs)
    assert len(warnings) == 1 and "another system prompt" in warnings[0]
    assert check_card(TaskSpec(system="rows' prompt", output=OutputSpec(type="labels", labels=["a"])), exs) == []


def test_every_format_is_read_on_its_own(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\nmy card broke,billing\n\"a, b\",hr\n")
    pc = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "my card broke", "completion": "billing"}])
    assert [(e.input, e.output) for e in load(csv).examples] == [("my card broke", "billing"), ("a, b", "hr")]
    assert load(csv).format == "label" and load(pc).format == "prompt"


def test_default_names():
    assert default_name(["emotion.jsonl"]) == "emotion"
    assert default_name([str(REPO / "models" / "data" / "routing" / "train.jsonl")]) == "routing"
    assert default_name(["my data!.csv"]) == "my-data"


def test_majority_line_and_confusion():
    gold = ["a", "a", "b", "c", "a"]
    assert majority_label(gold) == "a" and majority_label(["b", "a"]) == "a"     # ties: sorted order
    c = confusion(gold, ["a", None, "b", "a", "a"])
    assert c == {"a": {"(invalid)": 1, "a": 2}, "b": {"b": 1}, "c": {"a": 1}}
    exs = [Example(output=g, input="x", reference=g) for g in gold]
    lines = trivial_predictions("labels", TaskSpec(output=OutputSpec(type="labels", labels=["a", "b", "c"])), exs)
    m = score("labels", TaskSpec(output=OutputSpec(type="labels", labels=["a", "b", "c"])), exs, lines["majority"])
    assert m["accuracy"] == pytest.approx(0.6) and m["accuracy"] == classification(gold, ["a"] * 5)["accuracy"]


def test_copy_line_scores_the_input_as_the_answer():
    exs = [Example(output="the cat sat", input="the cat sat down", reference=["the cat sat"])]
    lines = trivial_predictions("text", TaskSpec(), exs)
    m = score("text", TaskSpec(), exs, lines["copy"])
    assert 0.8 < m["rouge_l"] < 1.0


def test_latency_quantiles_in_scores():
    exs = [Example(output="a", input="x", reference="a")] * 10
    preds = [Prediction("a", "a", 1.0, 0.0, 1, latency_ms=float(i + 1)) for i in range(10)]
    m = score("labels", TaskSpec(output=OutputSpec(type="labels", labels=["a"])), exs, preds)
    assert m["latency_ms_p50"] == pytest.approx(5.5) and m["latency_ms_p90"] == pytest.approx(9.1)


def test_temp_entries_of_a_killed_writer_are_swept_by_the_next_write(tmp_path):
    from edgeft.files import atomic_dir, write_text_atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".card.json.{pid}.abc.partial").write_text("half")
    (tmp_path / f".bundle.{pid}.xyz.partial").mkdir()
    live = tmp_path / f".card.json.{os.getpid()}.live.partial"
    live.write_text("mine, still writing")
    write_text_atomic(tmp_path / "card.json", "{}")
    with atomic_dir(tmp_path / "bundle") as stage:
        (stage / "f").write_text("x")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["bundle", "card.json", live.name])
