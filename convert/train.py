"""LoRA SFT with PEFT on the dequantized base GGUF: the adapter learns against the very weights
llama.cpp runs, with prompts built exactly as the runtime builds them.

Prompt = the task card's `TaskSpec.messages(input)` rendered by the base's chat template with
`add_generation_prompt=True`; the answer tokens plus `<|im_end|>` follow, and only those carry
loss. The lm_head is applied to the answer positions only (most of the sequence is prompt), which
saves a large share of the compute on CPU.

The PEFT folder is written into a hidden temp folder and renamed at the end, so an interrupted run
leaves nothing half-written. torch / transformers / peft are imported here and nowhere on the
device side.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..data import Example
from ..errors import InputError
from ..files import partial_prefix
from ..tasks import TaskSpec

log = logging.getLogger(__name__)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHORT = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def parse_targets(spec: str) -> list[str]:
    """"all-linear" or "q,k,v,o,gate,up,down" (short or full module names) -> PEFT target modules."""
    if spec.strip() in ("all-linear", "all"):
        return list(ALL_LINEAR)
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name = SHORT.get(part, part)
        if name not in ALL_LINEAR:
            raise InputError(f"unknown LoRA target '{part}'", "use all-linear or a subset of q,k,v,o,gate,up,down")
        out.append(name)
    if not out:
        raise InputError("no LoRA targets given", "use all-linear or q,k,v,o,...")
    return out


@dataclass
class TrainConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: str = "all-linear"
    dropout: float = 0.0
    lr: float = 4e-4
    epochs: float | None = None   # None: chosen from the data size (auto_epochs)
    batch: int = 8
    max_len: int = 256
    warmup: float = 0.05          # fraction of steps
    weight_decay: float = 0.0
    seed: int = 0
    threads: int | None = None
    bf16: bool = True             # bf16 autocast: about 2x faster matmuls on AVX512-BF16 CPUs; LoRA weights stay f32
    checks: int = 8               # validation-loss checks over the run (with validation rows); the best is kept

    def __post_init__(self) -> None:
        bad_epochs = self.epochs is not None and not (0 < self.epochs <= 1000)
        if self.rank < 1 or self.batch < 1 or self.max_len < 16 or bad_epochs or not (0 < self.lr < 1):
            raise InputError("rank, batch, epochs and lr must be positive (lr below 1) and max-len >= 16")
        parse_targets(self.targets)


AUTO_EXAMPLES = 800   # examples seen in a run with automatic epochs (with the data size's repeats)
AUTO_MAX_EPOCHS = 10


def auto_epochs(n_rows: int) -> float:
    """Passes over the data when none are given: about 800 examples seen (100 steps of 8), at
    most 10 passes over tiny sets and at least one over big ones. On 2 CPU cores that is a few
    minutes for short rows; the best checkpoint on the validation rows is kept, so the passes
    that over-fit a small set cost time, not quality."""
    return float(min(AUTO_MAX_EPOCHS, max(1.0, AUTO_EXAMPLES / max(1, n_rows))))


@dataclass
class Progress:
    step: int
    total: int
    loss: float
    examples_per_s: float
    eta_s: float


@dataclass
class TrainResult:
    peft_dir: Path
    steps: int
    examples: int            # examples seen (with repeats across epochs)
    used: int                # distinct training examples that fitted max-len
    dropped: int             # examples that could not fit max-len
    seconds: float
    load_seconds: float
    final_loss: float
    losses: list[float] = field(default_factory=list)
    epochs: float = 1.0
    val_losses: list[list[float]] = field(default_factory=list)   # [step, validation loss]
    best_step: int | None = None      # the step whose weights were saved (None: the last, no validation)


# -- base and tokenizer ---------------------------------------------------------------------

def load_base(base_path: str | os.PathLike):
    """(model, tokenizer) from the GGUF, dequantized to float32 by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(base_path)
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    # the GGUF "quantization" is undone on load; these would make save_pretrained refuse
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    with contextlib.suppress(AttributeError):
        model.hf_quantizer = None
    return model, tok


def load_tokenizer(base_path: str | os.PathLike):
    from transformers import AutoTokenizer

    p = Path(base_path)
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def end_token(tok) -> str:
    return tok.eos_token or "<|im_end|>"


def prompt_messages(task: TaskSpec, ex: Example) -> list[dict]:
    """The chat messages the runtime would send for this example (Engine.run -> task.messages):
    the card's system prompt, never a row's own (check_card warns when they differ)."""
    if ex.messages is not None:
        return task.conversation(ex.messages)
    return task.messages(ex.input or "")


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    """Token ids of the rendered prompt, as llama.cpp tokenizes it (special tokens parsed)."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def encode(tok, task: TaskSpec, ex: Example, max_len: int) -> tuple[list[int], int] | None:
    """(ids, n_prompt) for one example; a too-long input is cut (by words) to fit max_len, and an
    example whose answer alone does not fit is dropped (None)."""
    answer = list(tok(ex.output, add_special_tokens=False)["input_ids"]) + [tok.convert_tokens_to_ids(end_token(tok))]
    if len(answer) >= max_len - 8:
        return None
    cur = ex
    for _ in range(6):
        p = prompt_ids(tok, prompt_messages(task, cur))
        if len(p) + len(answer) <= max_len:
            return p + answer, len(p)
        if cur.input is None:
            return None
        words = cur.input.split()
        keep = int(len(words) * (max_len - len(answer)) / (len(p) + 1) * 0.95) - 4
        if keep < 8:
            return None
        cur = Example(output=ex.output, input=" ".join(words[:keep]), reference=ex.reference, line=ex.line)
    return None


def _batches(lengths: list[int], batch: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar length (less padding): shuffle, sort within windows of 16 batches."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    out = []
    win = batch * 16
    for i in range(0, len(idx), win):
        chunk = sorted(idx[i:i + win], key=lambda j: lengths[j])
        out += [chunk[k:k + batch] for k in range(0, len(chunk), batch)]
    rng.shuffle(out)
    return out


# -- training -------------------------------------------------------------------------------

def train_lora(base_path: str | os.PathLike, task: TaskSpec, examples: Sequence[Example], out_dir: str | os.PathLike,
               cfg: TrainConfig, *, progress: Callable[[Progress], None] | None = None,
               status: Callable[[str], None] | None = None, model_and_tokenizer=None,
               base_id: str | None = None, val_examples: Sequence[Example] = ()) -> TrainResult:
    """Train a LoRA on `examples` and write the PEFT folder to `out_dir` (atomically).

    With `val_examples`, the answer-token loss on them is measured `cfg.checks` times during the
    run and the weights of the best check are the ones saved."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # everything is local: never wait on a hub lookup
    import torch

    say = status or (lambda m: log.info("%s", m))
    out = Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} already exists and is not empty", "choose another output folder or remove it")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_load = time.perf_counter()
    if model_and_tokenizer is None:
        say("loading the base with transformers (dequantizing the GGUF)...")
        model, tok = load_base(base_path)
    else:
        model, tok = model_and_tokenizer
    load_s = time.perf_counter() - t_load
    encoded, dropped = _encode_all(tok, task, examples, cfg.max_len)
    if not encoded:
        raise InputError(f"no training example fits --max-len {cfg.max_len}", "raise --max-len")
    if dropped:
        say(f"dropped {dropped} example(s) whose answer does not fit --max-len {cfg.max_len}")
    val, _ = _encode_all(tok, task, val_examples, cfg.max_len)
    run = _Run(model, tok, cfg, encoded, val)
    run.loop(progress)
    if run.restore_best() not in (None, run.total):
        say(f"kept the weights of step {run.best_step} (validation loss {run.best[0]:.4f}; "
            f"{run.val_losses[-1][1]:.4f} at the end)")
    _save(run, out, base_id, dropped)
    return TrainResult(out, run.total, run.seen, len(encoded), dropped, run.seconds, load_s, float(run.ema or 0.0),
                       run.losses, run.epochs, run.val_losses, run.best_step)


def _encode_all(tok, task: TaskSpec, examples: Sequence[Example], max_len: int) -> tuple[list, int]:
    """(encoded rows, rows dropped because their answer does not fit max_len)."""
    encoded = [encode(tok, task, ex, max_len) for ex in examples]
    return [e for e in encoded if e is not None], sum(e is None for e in encoded)


class _Run:
    """One training run: the PEFT model, the step plan and schedule, the loss, and the best
    weights by validation loss."""

    def __init__(self, model, tok, cfg: TrainConfig, encoded: list, val: list):
        import torch
        from peft import LoraConfig, get_peft_model

        self.torch, self.cfg, self.encoded, self.val = torch, cfg, encoded, val
        lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                          target_modules=parse_targets(cfg.targets), task_type="CAUSAL_LM")
        torch.manual_seed(cfg.seed)
        self.pm = get_peft_model(model, lcfg)
        self.pm.train()
        self.inner = self.pm.get_base_model()          # LlamaForCausalLM with LoRA layers injected
        self.params = [p for p in self.pm.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.epochs = cfg.epochs if cfg.epochs is not None else auto_epochs(len(encoded))
        rng = random.Random(cfg.seed)
        lengths = [len(ids) for ids, _ in encoded]
        plan: list[list[int]] = []
        for _ in range(math.ceil(self.epochs)):
            plan += _batches(lengths, cfg.batch, rng)
        self.total = max(1, int(round(len(encoded) * self.epochs / cfg.batch)))
        self.plan = plan[:self.total]
        self.warm = max(1, int(self.total * cfg.warmup))
        self.check_every = max(1, math.ceil(self.total / max(1, cfg.checks))) if val else 0
        self.losses: list[float] = []
        self.val_losses: list[list[float]] = []
        self.best: tuple[float, int, dict] | None = None
        self.best_step: int | None = None
        self.ema: float | None = None
        self.seen = 0
        self.seconds = 0.0

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10% of the peak."""
        lr = self.cfg.lr
        if step < self.warm:
            return lr * (step + 1) / self.warm
        t = (step - self.warm) / max(1, self.total - self.warm)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    def forward_loss(self, rows):
        """(summed cross-entropy over the answer tokens of `rows`, their count); the lm_head runs on
        the answer positions only (most of a sequence is prompt)."""
        torch = self.torch
        T = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), T), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        sel_b, sel_t, tgt = [], [], []
        for b, (seq, n_prompt) in enumerate(rows):
            ids[b, :len(seq)] = torch.tensor(seq)
            mask[b, :len(seq)] = 1
            for t in range(n_prompt - 1, len(seq) - 1):   # position t predicts token t+1 (an answer token)
                sel_b.append(b)
                sel_t.append(t)
                tgt.append(seq[t + 1])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
            hidden = self.inner.model(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = self.inner.lm_head(hidden[torch.tensor(sel_b), torch.tensor(sel_t)])
        return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(tgt), reduction="sum"), len(tgt)

    def val_loss(self) -> float:
        self.pm.eval()
        total, count = 0.0, 0
        with self.torch.no_grad():
            for i in range(0, len(self.val), self.cfg.batch):
                loss_sum, n = self.forward_loss(self.val[i:i + self.cfg.batch])
                total += float(loss_sum)
                count += n
        self.pm.train()
        return total / max(1, count)

    def step(self, step: int, batch_idx: list[int]) -> None:
        rows = [self.encoded[j] for j in batch_idx]
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(step)
        loss_sum, n_tgt = self.forward_loss(rows)
        loss = loss_sum / n_tgt
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise InputError(f"the loss became {lv} at step {step + 1}", "lower --lr")
        self.losses.append(lv)
        self.ema = lv if self.ema is None else 0.9 * self.ema + 0.1 * lv
        self.seen += len(rows)

    def check(self, step: int) -> None:
        vl = self.val_loss()
        self.val_losses.append([step, round(vl, 4)])
        if self.best is None or vl < self.best[0]:
            self.best = (vl, step, {k: p.detach().clone() for k, p in self.pm.named_parameters() if p.requires_grad})

    def loop(self, progress: Callable[[Progress], None] | None) -> None:
        t0 = time.perf_counter()
        for step, batch_idx in enumerate(self.plan):
            self.step(step, batch_idx)
            if self.check_every and ((step + 1) % self.check_every == 0 or step + 1 == self.total):
                self.check(step + 1)
            el = time.perf_counter() - t0
            if progress:
                progress(Progress(step + 1, self.total, self.ema or 0.0, self.seen / el,
                                  el / (step + 1) * (self.total - step - 1)))
        self.seconds = time.perf_counter() - t0

    def restore_best(self) -> int | None:
        """Put the best checked weights back; returns their step (None without validation)."""
        if self.best is None:
            return None
        self.best_step = self.best[1]
        with self.torch.no_grad():
            for k, p in self.pm.named_parameters():
                if k in self.best[2]:
                    p.copy_(self.best[2][k])
        return self.best_step


def _save(run: _Run, out: Path, base_id: str | None, dropped: int) -> None:
    """The PEFT folder and training.json, written beside `out` and renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=partial_prefix(out.name), suffix=".partial", dir=out.parent))
    try:
        if base_id:   # not this machine's cache path: the manifest id (or file name) of the base
            run.pm.peft_config["default"].base_model_name_or_path = base_id
        run.pm.save_pretrained(str(stage))
        meta = {"config": {**asdict(run.cfg), "epochs": run.epochs}, "steps": run.total, "examples": run.seen,
                "used": len(run.encoded), "dropped": dropped, "seconds": round(run.seconds, 1),
                "final_loss": run.ema, "loss_curve": _curve(run.losses),
                "validation": {"rows": len(run.val), "losses": run.val_losses, "best_step": run.best_step}}
        (stage / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _curve(losses: list[float], points: int = 20) -> list[list[float]]:
    """[step, mean loss] at up to `points` places: a compact learning curve for the record."""
    if not losses:
        return []
    k = max(1, len(losses) // points)
    return [[i + k, round(sum(losses[i:i + k]) / len(losses[i:i + k]), 4)] for i in range(0, len(losses), k)]


def lora_b_nonzero(peft_dir: str | os.PathLike) -> bool:
    """True when some lora_B tensor in the saved adapter is non-zero (the adapter learned something)."""
    from safetensors.numpy import load_file

    t = load_file(str(Path(peft_dir) / "adapter_model.safetensors"))
    return any(k.endswith("lora_B.weight") and bool((v != 0).any()) for k, v in t.items())


def describe(result: TrainResult) -> dict[str, Any]:
    d = {"steps": result.steps, "epochs": round(result.epochs, 3), "examples_seen": result.examples,
         "train_examples": result.used, "dropped": result.dropped, "train_seconds": round(result.seconds, 1),
         "final_loss": round(result.final_loss, 4)}
    if result.val_losses:
        d["validation_losses"] = result.val_losses
        d["best_step"] = result.best_step
    return d
