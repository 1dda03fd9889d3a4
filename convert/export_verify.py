"""Does the export answer as edgeft does? transformers + PEFT loading the exported folders (what
vLLM and LoRAX load) against edgeft's Engine (llama.cpp on the GGUF), greedy, on a bundle's prompts.

Per adapter: the share of identical answers, the share of identical prompt token ids (the
exported tokenizer and chat template against llama.cpp's), and, along each answer, top-1 agreement
and mean KL of the next-token distributions (`verify.compare`, positions from the last prompt
token on). Label tasks are constrained on both sides (llama.cpp's grammar; here greedy over the
tokens that keep the text a prefix of a label), and they carry the target (>= 95% identical);
JSON and text tasks are compared unconstrained on both sides, which measures the models
themselves. Without an adapter, the same logit comparison on the prompts is the noise floor of
llama.cpp's quantized arithmetic against the dequantized weights.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgeft.bundles import AdapterBundle
from edgeft.errors import EdgeftError
from edgeft.tasks import TaskSpec
from .verify import CHAT_PROMPTS, compare

log = logging.getLogger(__name__)

ANSWERS_FILE = "edgeft-answers.jsonl"
LABEL_TARGET = 0.95
FLOOR_PROMPTS = 8
SHOWN_DIFFS = 3


def dev_inputs(bundle: AdapterBundle, n: int) -> tuple[list, str]:
    """Up to n inputs (text, or a chat history) from the dev set named in the card, else the
    card's few-shot inputs and a fixed prompt set."""
    from edgeft.data import load
    from edgeft.paths import shipped_models_dir

    data = ((bundle.card.metrics or {}).get("dev") or {}).get("data")
    if isinstance(data, str) and data:
        roots = [Path(data)] if os.path.isabs(data) else \
            [r / data for r in (shipped_models_dir().parent if shipped_models_dir() else None, bundle.folder) if r]
        for p in roots:
            if p.is_file():
                try:
                    rows = load(p, limit=n, seed=0).examples
                    return [ex.messages if ex.messages is not None else ex.input for ex in rows][:n], str(data)
                except EdgeftError as e:
                    log.warning("%s: %s; using fixed prompts", p, e.message)
    task = bundle.card.task
    shots = [s["input"] for s in (task.few_shot if task else [])]
    return (shots + CHAT_PROMPTS)[:n], "few-shot inputs and fixed prompts"


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a token string uses -> its byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenBytes:
    """The bytes llama.cpp's token_to_piece gives for each token id (byte-level BPE as in GPT-2 /
    SmolLM2, or SentencePiece with byte fallback), so that answers are decoded the way edgeft
    decodes them: one UTF-8 stream with bad bytes replaced (tokenizer.decode renders a run of
    byte tokens with one invalid byte as all replacement characters)."""

    _BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

    def __init__(self, tok):
        dec = repr(getattr(getattr(tok, "backend_tokenizer", None), "decoder", ""))
        self.byte_level = "ByteLevel" in dec
        self.table = _bytes_to_unicode() if self.byte_level else {}
        self.special = set(getattr(tok, "all_special_ids", []) or [])
        self.pieces = [self._piece(t) for t in tok.convert_ids_to_tokens(list(range(len(tok))))]

    def _piece(self, t: str | None) -> bytes:
        if t is None:
            return b""
        m = self._BYTE.match(t)
        if m:
            return bytes([int(m.group(1), 16)])
        if self.byte_level and all(c in self.table for c in t):
            return bytes(self.table[c] for c in t)
        return t.replace("\u2581", " ").encode("utf-8")

    def text(self, ids: list[int]) -> str:
        return b"".join(self.pieces[i] for i in ids if i not in self.special and i < len(self.pieces)).decode(
            "utf-8", "replace")


class _LabelMask:
    """Greedy over the tokens that keep the answer a prefix of a label; EOS once it is one
    (what llama.cpp's grammar `root ::= "a" | "b" | ...` allows)."""

    def __init__(self, tb: TokenBytes, labels: list[str], eos: set[int]):
        self.labels = set(labels)
        self.prefixes = {lab[:i] for lab in labels for i in range(1, len(lab) + 1)}
        self.pieces = [p.decode("utf-8", "replace") if i not in tb.special else "" for i, p in enumerate(tb.pieces)]
        self.eos = eos

    def pick(self, logits: np.ndarray, text: str) -> int | None:
        for i in np.argsort(-logits, kind="stable"):
            i = int(i)
            if i in self.eos:
                if text in self.labels:
                    return i
                continue
            if i < len(self.pieces) and self.pieces[i] and text + self.pieces[i] in self.prefixes:
                return i
        return None


def _greedy(model, tb: TokenBytes, ids: list[int], task: TaskSpec, eos: set[int], mask: _LabelMask | None):
    """(answer ids, answer text, logits at every answer position incl. the one after the prompt)."""
    import torch

    out_ids, logits, text = [], [], ""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    key = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"   # renamed in transformers 5.x
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        for _ in range(task.max_tokens):
            row = out.logits[0, -1].float().numpy()
            logits.append(row)
            nxt = mask.pick(row, text) if mask else int(np.argmax(row))
            if nxt is None or nxt in eos:
                break
            out_ids.append(nxt)
            text = tb.text(out_ids)
            if any(s in text for s in task.stop):
                text = text[: min(text.find(s) for s in task.stop if s in text)]
                break
            kv = getattr(out, "cache", None) if key == "cache" else out.past_key_values
            out = model(input_ids=torch.tensor([[nxt]]), use_cache=True, **{key: kv})
    return out_ids, text, np.stack(logits)


class _Acc:
    """Top-1 and KL over many prompts, weighted by positions."""

    def __init__(self):
        self.n = self.agree = 0
        self.kl = 0.0

    def add(self, ref: np.ndarray, test: np.ndarray) -> None:
        c = compare([ref], [test])
        self.n += c["positions"]
        self.agree += round(c["top1"] * c["positions"])
        self.kl += c["kl_mean"] * c["positions"]

    def result(self) -> dict:
        return {"top1": round(self.agree / max(self.n, 1), 5), "kl_mean": float(f"{self.kl / max(self.n, 1):.3g}"),
                "positions": self.n}


def _eos_ids(model, tok) -> set[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    g = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(g) if isinstance(g, (list, tuple)) else ({g} if g is not None else set())
    return ids


def _verify_adapter(eng, model, tok, bundle: AdapterBundle, inputs: list) -> dict:
    task = bundle.card.task or TaskSpec()
    labels = task.output.type == "labels"
    eos = _eos_ids(model, tok)
    tb = TokenBytes(tok)
    mask = _LabelMask(tb, task.output.labels or [], eos) if labels else None
    grammar = task.output.grammar() if labels else None
    acc, same, same_ids, diffs, answers = _Acc(), 0, 0, [], []
    for x in inputs:
        msgs = task.conversation(x) if isinstance(x, list) else task.messages(x)
        e_ids = eng.tokenize(eng.chat_prompt(msgs))
        h_ids = list(tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"])
        same_ids += e_ids == h_ids
        e_ans = eng.chat(msgs, adapter=bundle.name, max_tokens=task.max_tokens, temperature=0.0, stop=task.stop,
                         grammar=grammar).text.strip()
        h_out, h_ans, h_logits = _greedy(model, tb, h_ids, task, eos, mask)
        h_ans = h_ans.strip()
        # what edgeft serves for the request (the card's constraint on): what a server should match
        served = e_ans if labels or not isinstance(x, str) else eng.run(x, adapter=bundle.name).text.strip()
        answers.append({"adapter": bundle.name, "input": x, "edgeft": served})
        if e_ans == h_ans:
            same += 1
        elif len(diffs) < SHOWN_DIFFS:
            diffs.append({"input": (x if isinstance(x, str) else x[-1]["content"])[:120], "edgeft": e_ans[:200],
                          "transformers": h_ans[:200]})
        toks = (h_ids + h_out)[: eng.n_ctx]
        e_logits = eng.logits(toks, adapter=bundle.name)[len(h_ids) - 1:]
        k = min(len(e_logits), len(h_logits))
        acc.add(h_logits[:k], e_logits[:k])
    n = max(len(inputs), 1)
    return {"kind": task.output.type, "n": len(inputs), "identical": same, "identical_rate": round(same / n, 4),
            "prompt_tokens_identical_rate": round(same_ids / n, 4), **acc.result(), "differences": diffs,
            "answers": answers}


def _floor(eng, model, tok, inputs: list) -> dict:
    """Base without adapter: transformers on the dequantized weights vs llama.cpp on the GGUF."""
    import torch

    acc = _Acc()
    with model.disable_adapter(), torch.inference_mode():
        for x in inputs[:FLOOR_PROMPTS]:
            msgs = TaskSpec().conversation(x) if isinstance(x, list) else [{"role": "user", "content": x}]
            ids = list(tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"])[: eng.n_ctx]
            ref = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
            acc.add(ref, eng.logits(ids, adapter=None))
    return {"prompts": min(len(inputs), FLOOR_PROMPTS), **acc.result()}


def verify_export(folder: str | os.PathLike, base_gguf: str | os.PathLike, bundles: Sequence[AdapterBundle], *,
                  n: int = 50, prompts: dict[str, list] | None = None, threads: int | None = None,
                  status: Callable[[str], None] | None = None, target: float = LABEL_TARGET) -> dict:
    """Load the export with transformers + PEFT and compare its greedy answers with edgeft's."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeft.engine import Engine

    say = status or (lambda m: log.info("%s", m))
    t0 = time.perf_counter()
    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(str(folder / "base"))
    model = AutoModelForCausalLM.from_pretrained(str(folder / "base"), dtype=torch.float32).eval()
    names = [b.name for b in bundles]
    model = PeftModel.from_pretrained(model, str(folder / "adapters" / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folder / "adapters" / name), adapter_name=name)
    model.eval()
    report: dict = {"gguf": Path(base_gguf).name, "target": target, "adapters": {}}
    with Engine(str(base_gguf), n_ctx=2048, n_threads=threads or min(2, os.cpu_count() or 1)) as eng:
        floor_inputs = None
        for b in bundles:
            eng.load_adapter(b.folder or b.gguf_path, name=b.name, force=True)
            inputs, where = ((prompts or {}).get(b.name), "given") if (prompts or {}).get(b.name) else dev_inputs(b, n)
            floor_inputs = floor_inputs or inputs
            say(f"verify {b.name}: {len(inputs)} prompts ({where})...")
            model.set_adapter(b.name)
            report["adapters"][b.name] = {**_verify_adapter(eng, model, tok, b, list(inputs)[:n]), "prompts": where}
        report["base"] = _floor(eng, model, tok, floor_inputs or CHAT_PROMPTS)
    # edgeft's own answers beside the export: `client.py --compare edgeft-answers.jsonl` checks a
    # running vLLM / LoRAX against them (on a GPU machine, where those engines run)
    rows = [row for a in report["adapters"].values() for row in a.pop("answers")]
    (folder / ANSWERS_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    report["answers_file"] = ANSWERS_FILE
    lab = [a for a in report["adapters"].values() if a["kind"] == "labels"]
    report["label_identical_rate"] = round(sum(a["identical"] for a in lab) / sum(a["n"] for a in lab), 4) if lab else None
    report["ok"] = all(a["identical_rate"] >= target for a in lab)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report
