"""The own-task walk on the real base: chat JSONL, prompt/completion JSONL and text+label CSV each
train with no card (a few steps), land in the registry under their name and answer with a
label; scores reach the card; a failed packaging keeps the trained work; streams and merged
models get their parsed value and card."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import exit_ok, write_bundle

pytest.importorskip("torch")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parent.parent
ROUTING = REPO / "models" / "data" / "routing"
TEAMS = ["banking", "credit_cards", "travel", "work"]

pytestmark = pytest.mark.slow


def _rows(n: int) -> list[tuple[str, str]]:
    rows = [json.loads(x) for x in (ROUTING / "train.jsonl").read_text().splitlines()][:n]
    return [(r["messages"][1]["content"], r["messages"][2]["content"]) for r in rows]


def _write(fmt: str, folder: Path, n: int = 30) -> Path:
    pairs = _rows(n)
    if fmt == "chat":
        return Path(ROUTING / "train.jsonl")
    if fmt == "prompt":
        p = folder / "tickets.jsonl"
        p.write_text("".join(json.dumps({"prompt": t, "completion": lab}) + "\n" for t, lab in pairs))
        return p
    import csv

    p = folder / "tickets.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(pairs)
    return p


@pytest.mark.parametrize("fmt", ["chat", "prompt", "label"])
def test_walk_from_data_alone_to_a_registered_constrained_adapter(tmp_path, isolated_home, base_path, fmt):
    from edgeft.bundles import AdapterBundle
    from edgeft.cli import main
    from edgeft.registry import find

    data = _write(fmt, tmp_path)
    name = f"route-{fmt}"
    out = ["-o", str(tmp_path / "bundles" / name), "--register"] if fmt == "label" else []   # else: straight in
    with exit_ok():
        main(["train", "--data", str(data), "--limit", "30", "--name", name, "--epochs", "0.27", "--batch", "4",
              "--rank", "4", "--max-len", "96", "--no-baselines", "--threads", "2", "--base", str(base_path), *out])
    b = find(name)                                   # registered: found by name, no --adapter-dir
    assert b.folder == isolated_home / "adapters" / name
    if out:
        assert AdapterBundle.load(tmp_path / "bundles" / name).card.to_dict() == b.card.to_dict()
    t = b.card.task
    assert t.output.type == "labels" and set(t.output.labels) <= set(TEAMS) and len(t.output.labels) >= 3
    if fmt == "chat":
        assert t.system and t.system.startswith("You route customer messages")
    else:
        assert t.system is None
    assert b.card.source["training"]["card"] == "inferred"
    dev = b.card.metrics["dev"]
    assert dev["n"] == 6 and "majority" in dev["baselines"] and 0.0 <= dev["accuracy"] <= 1.0
    assert b.card.source["training"]["steps"] == 2
    res = subprocess.run([sys.executable, "-m", "edgeft", "run", "--adapter", name, "--threads", "2", "--json",
                          "i need to book a flight to boston"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["value"] in t.output.labels and out["text"] == out["value"]
    assert AdapterBundle.load(b.folder).name == name
    leftovers = [p.name for p in (isolated_home / "adapters").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_a_card_that_contradicts_the_data_stops_before_training(tmp_path, isolated_home, base_path):
    from edgeft.cli import main

    card = tmp_path / "card.json"
    card.write_text(json.dumps({"name": "r", "task": {"template": "{input}",
                                                      "output": {"type": "labels", "labels": ["banking", "travel"]}}}))
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(ROUTING / "train.jsonl"), "--task-card", str(card), "--base", str(base_path)])
    assert e.value.code == 1
    assert not (isolated_home / "adapters").exists() or not any((isolated_home / "adapters").iterdir())


def test_packaging_failure_keeps_the_trained_adapter_with_the_command_that_finishes(tmp_path, base_path, monkeypatch):
    from edgeft.convert import pipeline as P
    from edgeft.convert.train import TrainConfig
    from edgeft.errors import EdgeftError

    def broken(*a, **k):   # fault injection: the evaluation after training fails
        raise EdgeftError("disk full while scoring")
    monkeypatch.setattr(P, "evaluate_bundle", broken)
    out = tmp_path / "ad" / "routing"
    job = P.TrainJob(data=[str(ROUTING / "train.jsonl")], out=out, base=str(base_path), limit=[30],
                     config=TrainConfig(rank=4, batch=4, epochs=0.14, max_len=96), threads=2)
    with pytest.raises(EdgeftError) as e:
        P.train_adapter(job)
    kept = tmp_path / "ad" / "routing-unfinished"
    assert "kept in" in e.value.message and str(kept) in e.value.message and "edgeft convert" in e.value.hint
    assert (kept / "peft" / "adapter_model.safetensors").is_file() and (kept / "card.json").is_file()
    assert not out.exists() and sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["routing-unfinished"]
    cmd = (kept / "FINISH.txt").read_text().split()
    assert cmd[:3] == ["edgeft", "convert", str(kept / "peft")]
    from edgeft.cli import main

    with exit_ok():                                   # the command really finishes the job
        main(cmd[1:])
    from edgeft.bundles import AdapterBundle

    assert AdapterBundle.load(out).card.task.output.labels == TEAMS

    # the same PEFT folder converted with no card: named after its parent, card from --data
    import shutil

    peft = tmp_path / "tickets" / "peft"
    shutil.copytree(kept / "peft", peft)
    with exit_ok():
        main(["convert", str(peft), "--base", str(base_path), "--data", str(ROUTING / "train.jsonl"),
              "-o", str(tmp_path / "conv")])
    b = AdapterBundle.load(tmp_path / "conv")
    assert b.name == "tickets" and b.card.task.output.labels == TEAMS
    res = subprocess.run([sys.executable, "-m", "edgeft", "convert", str(peft), "--base", str(base_path),
                          "-o", str(tmp_path / "bare")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "warning: the bundle has no task card" in res.stderr


def _labels_task() -> dict:
    return {"system": "Route the message.", "template": "{input}", "output": {"type": "labels", "labels": TEAMS},
            "generation": {"max_tokens": 16}}


def test_stream_carries_the_parsed_value(tmp_path, engine, base_path):
    b = write_bundle(tmp_path / "route", base_path, name="route-stream", task=_labels_task(), b_std=0.001)
    name = engine.load_adapter(str(b))
    whole = engine.run("my card was declined", adapter=name)
    s = engine.run("my card was declined", adapter=name, stream=True)
    text = "".join(s)
    assert text == whole.text and s.result.value == whole.value and whole.value in TEAMS


def test_a_task_card_for_the_bare_base_or_a_merged_model(engine, tmp_path):
    from edgeft.cli.run import read_task

    card = tmp_path / "card.json"
    card.write_text(json.dumps({"task": _labels_task()}))
    task = read_task(str(card))
    res = engine.run("book me a hotel in rome", adapter=None, task=task)
    assert res.value in TEAMS and res.text == res.value
    res = subprocess.run([sys.executable, "-m", "edgeft", "run", "--task-card", str(card), "--threads", "2",
                          "book me a hotel in rome"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() in TEAMS


def test_eval_update_card_and_adapters_add(tmp_path, isolated_home, base_path):
    from edgeft.bundles import AdapterBundle
    from edgeft.cli import main
    from edgeft.files import sha256_file

    b = write_bundle(tmp_path / "src" / "route", base_path, name="route", task=_labels_task(), b_std=0.001)
    test = ROUTING / "test.jsonl"
    out = tmp_path / "rep.json"
    with exit_ok():
        main(["eval", "--adapter", str(b), "--data", str(test), "--limit", "6", "--threads", "2", "--ctx", "1024",
              "--update-card", "--json", str(out)])
    rep = json.loads(out.read_text())
    assert rep["data_format"] == "label" and "majority" in rep["baselines"] and "confusion" in rep
    assert rep["efficiency"]["adapter_mb"] > 0 and rep["metrics"]["latency_ms_p50"] > 0
    dev = AdapterBundle.load(b).card.metrics["dev"]
    assert dev["n"] == 6 and dev["sha256"] == sha256_file(test) and dev["accuracy"] == rep["metrics"]["accuracy"]
    with exit_ok():
        main(["adapters", "add", str(b), "--name", "router"])
    reg = isolated_home / "adapters" / "router"
    assert AdapterBundle.load(reg).name == "router" and AdapterBundle.load(b).name == "route"
    with pytest.raises(SystemExit) as e:                 # the name is taken
        main(["adapters", "add", str(b), "--name", "router"])
    assert e.value.code == 1


def test_curve_writes_its_table_json_and_png(tmp_path, base_path):
    from edgeft.cli import main

    js, png = tmp_path / "curve.json", tmp_path / "curve.png"
    with exit_ok():
        main(["curve", "--data", str(ROUTING / "train.jsonl"), "--eval", str(ROUTING / "test.jsonl"),
              "--eval-limit", "6", "--sizes", "8,16", "--epochs", "0.5", "--max-len", "96", "--rank", "4",
              "--threads", "2", "--base", str(base_path), "--json", str(js), "--plot", str(png)])
    d = json.loads(js.read_text())
    assert [p["rows"] for p in d["points"]] == [8, 16] and d["main_metric"] == "accuracy" and d["n_dev"] == 6
    assert {"zero-shot", "few-shot", "majority"} <= set(d["baselines"])
    assert all(0.0 <= p["accuracy"] <= 1.0 and p["steps"] >= 1 for p in d["points"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
