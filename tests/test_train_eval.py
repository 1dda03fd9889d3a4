"""`edgeft eval` end to end (real base, a random adapter carrying a real task card) and the shipped
sentiment adapter answering with exactly one label."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import exit_ok as _exit_ok, write_bundle

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "adapters"

pytestmark = pytest.mark.slow


def _card(name: str) -> dict:
    return json.loads((REPO / "models" / "tasks" / f"{name}.json").read_text())["task"]


@pytest.mark.parametrize("name,data,keys", [
    ("sentiment", "sentiment/twitter_financial_news/dev.jsonl", {"accuracy", "macro_f1", "per_class"}),
    ("ner", "ner/wikigold/dev.jsonl", {"micro_f1", "precision", "recall", "per_type"}),
])
def test_eval_json_has_the_metric_names(tmp_path, base_path, name, data, keys):
    from edgeft.cli import main

    bundle = write_bundle(tmp_path / "ad" / f"rand-{name}", base_path, name=f"rand-{name}", task=_card(name), b_std=0.001)
    out = tmp_path / "report.json"
    with _exit_ok():
        main(["eval", "--adapter", str(bundle), "--data", str(REPO / "models" / "data" / data), "--limit", "3",
              "--baseline", "zero-shot", "--threads", "2", "--ctx", "1024", "--json", str(out)])
    d = json.loads(out.read_text())
    assert d["task"] == f"rand-{name}" and d["n"] == 3 and d["metrics_of"] == "adapter"
    common = {"invalid_rate", "ttft_ms", "decode_tps"}
    assert keys | common <= set(d["metrics"])
    assert keys | common <= set(d["baselines"]["zero-shot"]["metrics"])
    assert 0.0 <= d["metrics"]["invalid_rate"] <= 1.0


def test_eval_needs_something_to_score(tmp_path):
    from edgeft.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--task-card", str(REPO / "models" / "tasks" / "sentiment.json"),
              "--data", str(REPO / "models" / "data" / "sentiment" / "twitter_financial_news" / "dev.jsonl")])
    assert e.value.code == 1


@pytest.mark.skipif(not (SHIPPED / "sentiment" / "adapter.gguf").is_file(), reason="sentiment bundle not built yet")
def test_run_shipped_sentiment_prints_one_label():
    res = subprocess.run([sys.executable, "-m", "edgeft", "run", "--adapter", "sentiment", "--threads", "2",
                          "Shares of Acme jumped 12% after record quarterly profit"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() in ("negative", "neutral", "positive")
    assert len(res.stdout.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["sentiment", "ner", "summarize", "style", "classification", "parsing"])
def test_shipped_bundle_cards(name):
    folder = SHIPPED / name
    if not (folder / "adapter.gguf").is_file():
        pytest.skip(f"{name} bundle not built yet")
    from edgeft.bundles import AdapterBundle

    b = AdapterBundle.load(folder)
    assert b.card.task is not None and b.card.reproduce.startswith("edgeft train")
    assert b.card.metrics.get("dev", {}).get("n", 0) > 0
    assert (folder / "peft" / "adapter_config.json").is_file()
    assert (folder / "adapter.gguf").stat().st_size < 26e6


def test_cli_with_train_and_eval_never_imports_torch():
    code = ("import sys; from edgeft.cli import app, main; import edgeft.cli.train, edgeft.evaluate, edgeft.data; "
            "assert not any(m.split('.')[0] in ('torch', 'transformers', 'peft') for m in sys.modules), 'heavy import'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = subprocess.run([sys.executable, "-m", "edgeft", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--task-card" in out.stdout
