"""Training: prompts token-identical to the runtime's, a tiny LoRA run that learns (non-zero lora_B),
determinism for a seed, and nothing half-written when a run fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from edgeft.data import Example, load  # noqa: E402
from edgeft.errors import InputError  # noqa: E402
from edgeft.tasks import TaskSpec  # noqa: E402
from helpers import exit_ok as _exit_ok  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CARDS = REPO / "models" / "tasks"

pytestmark = pytest.mark.slow


def _task(name: str) -> TaskSpec:
    return TaskSpec.from_dict(json.loads((CARDS / f"{name}.json").read_text())["task"])


@pytest.fixture(scope="module")
def tokenizer(base_path):
    from edgeft.convert.train import load_tokenizer

    return load_tokenizer(base_path)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A 2-layer random Llama with the base's vocabulary: trains in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("name,text", [
    ("sentiment", "Shares of Acme jumped 12% after record quarterly profit"),
    ("ner", "Angela Merkel visited Zürich with Siemens executives ."),
    ("summarize", "We propose a method. It works well on benchmarks — by 3%."),
])
def test_training_prompt_tokens_equal_the_runtime_prompt(tokenizer, engine, name, text):
    from edgeft.convert.train import encode, prompt_ids

    task = _task(name)
    msgs = task.messages(text)
    runtime = engine.tokenize(engine.chat_prompt(msgs))
    assert prompt_ids(tokenizer, msgs) == runtime
    ids, n_prompt = encode(tokenizer, task, Example(output="positive", input=text), 512)
    assert ids[:n_prompt] == runtime
    assert ids[-1] == engine.tokenize("<|im_end|>")[-1]      # the answer ends with the EOS llama.cpp stops on


def test_long_input_is_cut_to_fit_and_hopeless_rows_are_dropped(tokenizer):
    from edgeft.convert.train import encode

    task = _task("summarize")
    long = " ".join(["word"] * 600)
    ids, n_prompt = encode(tokenizer, task, Example(output="A short summary.", input=long), 128)
    assert len(ids) <= 128 and n_prompt < len(ids)
    assert encode(tokenizer, task, Example(output=" ".join(["x"] * 200), input="y"), 64) is None


def _examples():
    return [Example(output=lab, input=f"headline number {i} about shares", reference=lab)
            for i, lab in enumerate(["positive", "negative", "neutral", "positive"] * 2)]


def _run(tmp_path, tiny, tokenizer, out: str, **kw):
    import copy

    from edgeft.convert.train import TrainConfig, train_lora

    cfg = TrainConfig(rank=4, alpha=8, batch=2, epochs=1, max_len=96, lr=1e-2, seed=kw.pop("seed", 0), **kw)
    steps = []
    res = train_lora("unused.gguf", _task("sentiment"), _examples(), tmp_path / out, cfg,
                     progress=steps.append, model_and_tokenizer=(copy.deepcopy(tiny), tokenizer))
    return res, steps


def test_tiny_training_writes_a_peft_folder_that_learned(tmp_path, tiny, tokenizer):
    from edgeft.convert.train import lora_b_nonzero

    res, steps = _run(tmp_path, tiny, tokenizer, "peft")
    assert res.steps == 4 and [p.step for p in steps] == [1, 2, 3, 4] and steps[-1].eta_s == 0
    assert all(p.examples_per_s > 0 for p in steps)
    out = tmp_path / "peft"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert lora_b_nonzero(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert json.loads((out / "training.json").read_text())["steps"] == 4
    assert not list(tmp_path.glob("*.partial"))


def test_same_seed_same_weights(tmp_path, tiny, tokenizer):
    from safetensors.numpy import load_file

    _run(tmp_path, tiny, tokenizer, "a", bf16=False)
    _run(tmp_path, tiny, tokenizer, "b", bf16=False)
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_failed_run_leaves_nothing(tmp_path, tiny, tokenizer):
    with pytest.raises(InputError, match="max-len"):
        from edgeft.convert.train import TrainConfig, train_lora

        train_lora("unused.gguf", _task("sentiment"), [Example(output=" ".join(["x"] * 300), input="y")],
                   tmp_path / "out", TrainConfig(max_len=32), model_and_tokenizer=(tiny, tokenizer))
    assert list(tmp_path.iterdir()) == []


def test_targets_parsing():
    from edgeft.convert.train import parse_targets

    assert parse_targets("q,v") == ["q_proj", "v_proj"]
    assert len(parse_targets("all-linear")) == 7
    with pytest.raises(InputError):
        parse_targets("q,zz")


def test_shipped_data_files_read_cleanly():
    for rel, fmt in [("sentiment/twitter_financial_news/dev.jsonl", "label"), ("ner/wikigold/dev.jsonl", "ner"),
                     ("summarize/scitldr_a/dev.jsonl", "summarize")]:
        ds = load(REPO / "models" / "data" / rel, limit=5, ner_map=REPO / "models" / "data" / "ner" / "coarse_map.json")
        assert ds.format == fmt and len(ds) == 5 and not ds.problems


def test_train_cli_end_to_end_on_the_real_base(tmp_path, base_path):
    """Real base, 1 step, converted by edgeft.convert, scored by llama.cpp: a complete bundle."""
    import os
    import stat

    from edgeft.bundles import AdapterBundle
    from edgeft.cli import main
    from edgeft.convert.train import lora_b_nonzero

    data = REPO / "models" / "data" / "sentiment" / "twitter_financial_news"
    out = tmp_path / "adapters" / "sent"
    with _exit_ok():
        main(["train", "--base", str(base_path), "--data", str(data / "train.jsonl"), "--eval", str(data / "dev.jsonl"),
              "--eval-limit", "2", "--task-card", str(CARDS / "sentiment.json"), "--limit", "4", "--batch", "4", "--epochs", "1",
              "--max-len", "96", "--rank", "4", "--lr", "1e-2", "--threads", "2", "-o", str(out)])
    b = AdapterBundle.load(out)
    assert b.name == "sentiment" and b.card.task.output.labels == ["negative", "neutral", "positive"]
    assert b.card.reproduce.startswith("edgeft train ") and "--limit 4" in b.card.reproduce
    assert b.card.metrics["dev"]["n"] == 2 and "accuracy" in b.card.metrics["dev"]
    assert b.card.source["training"]["steps"] == 1 and b.card.adapter["dtype"] == "f32"
    assert lora_b_nonzero(out / "peft")
    assert stat.S_IMODE(os.stat(out / "adapter.gguf").st_mode) & 0o044 == 0o044
    assert sorted(p.name for p in out.parent.iterdir()) == ["sent"]      # no temp folders left


def test_validation_rows_pick_the_checkpoint_with_the_lowest_loss(tmp_path, tiny, tokenizer):
    import copy

    from edgeft.convert.train import TrainConfig, train_lora

    cfg = TrainConfig(rank=4, alpha=8, batch=2, epochs=4, max_len=96, lr=3e-2, checks=4, bf16=False)
    val = [Example(output="neutral", input="headline about a merger", reference="neutral")] * 2
    res = train_lora("unused.gguf", _task("sentiment"), _examples(), tmp_path / "p", cfg,
                     model_and_tokenizer=(copy.deepcopy(tiny), tokenizer), val_examples=val)
    assert [s for s, _ in res.val_losses] == [4, 8, 12, 16] and res.epochs == 4
    best = min(res.val_losses, key=lambda sv: sv[1])
    assert res.best_step == best[0]
    meta = json.loads((tmp_path / "p" / "training.json").read_text())
    assert meta["validation"]["best_step"] == res.best_step and meta["validation"]["rows"] == 2


def test_epochs_follow_the_data_size():
    from edgeft.convert.train import auto_epochs

    assert auto_epochs(40) == 10 and auto_epochs(100) == 8 and auto_epochs(400) == 2 and auto_epochs(5000) == 1
