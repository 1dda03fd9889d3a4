"""PEFT-vs-llama.cpp parity: does the converted adapter compute what PEFT computes?

Both sides get the same token ids (llama.cpp's tokenizer) and every position's next-token
distribution is compared: top-1 agreement and mean KL(PEFT || llama.cpp). The same numbers
without the adapter (transformers on the dequantized base vs llama.cpp on the quantized one)
are the noise floor: a correct conversion sits at the floor, a wrong one (missing q/k
permutation, wrong scale) falls clearly below it.

Needs torch, transformers and peft (the `train` extra); imported here only.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgeft.errors import EdgeftError, ModelError

log = logging.getLogger(__name__)

# A fixed, varied prompt set (about 1000 positions on SmolLM2): chat turns (what task adapters
# see) and plain text. Top-1 agreement is counted per position, and near-ties flip under
# quantization noise, so fewer positions would make the comparison with the floor too noisy.
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Classify the sentiment of this review: The battery died after two days and support never answered.",
    "Extract the people and organisations: Tim Cook met Angela Merkel at the Apple offices in Berlin.",
    "Summarize in one sentence: The city council voted on Tuesday to extend the bike lane network by 40 km "
    "over the next three years, funded by a new parking levy.",
    "Write a haiku about autumn rain.",
    "Translate to German: Where is the train station?",
    "Explain photosynthesis to a ten-year-old.",
    "List three uses of copper.",
    "Who wrote Pride and Prejudice?",
    "Give me a recipe for pancakes.",
    "What is 17 times 23?",
    "Describe the water cycle.",
    "Write a short poem about the sea.",
    "How do vaccines work?",
    "What is the tallest mountain in Africa?",
    "Suggest a name for a black cat.",
    "Convert 100 Fahrenheit to Celsius.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
    "What are the benefits of exercise?",
    "Tell me a fun fact about octopuses.",
    "How does a bicycle stay upright?",
]
TEXT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog. Then it",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 1969, Neil Armstrong became the first person to",
    "Ingredients: 200 g flour, 2 eggs, 300 ml milk. Method:",
    "The history of the Roman Empire spans more than a thousand years, from the founding of the city to",
    "Machine learning is a field of study in artificial intelligence concerned with",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "import numpy as np\n\ndef softmax(x):\n",
    "The mitochondria is the powerhouse of the cell because",
    "To install the package, run the following command:",
]
MAX_TOKENS_PER_PROMPT = 256
# "at most 1 point below the floor": the acceptance rule for a conversion
TOP1_MARGIN = 0.01
EXACT_KL = 1e-4                 # allowed mean KL on the dequantized base, beyond 10x its floor
EXACT_MAX_BYTES = 4 << 30       # largest f16 copy of a base made for the exact check


def engine_logits(eng, tokens: Sequence[int]) -> np.ndarray:
    """All-position logits of `tokens` under the engine's selected adapter set, from an empty KV."""
    return np.asarray(eng.logits(list(tokens)))


def prompt_tokens(eng, prompts: Sequence[str] | None = None) -> list[list[int]]:
    """Token ids for the prompt set, through the base's chat template where it has one."""
    out = []
    if prompts is None:
        for p in CHAT_PROMPTS:
            try:
                text = eng.chat_prompt([{"role": "user", "content": p}])
            except EdgeftError:
                text = p  # a base without a chat template
            out.append(eng.tokenize(text))
        out.extend(eng.tokenize(p) for p in TEXT_PROMPTS)
    else:
        out = [eng.tokenize(p) for p in prompts]
    return [t[:MAX_TOKENS_PER_PROMPT] for t in out if len(t) > 1]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare(ref: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> dict:
    """Top-1 agreement and mean KL(ref || test) over all positions of all prompts."""
    agree, kls, maxdiff, n = 0, [], 0.0, 0
    for r, t in zip(ref, test):
        r = np.asarray(r)[:, : min(np.shape(r)[1], np.shape(t)[1])]
        t = np.asarray(t)[:, : r.shape[1]]
        agree += int((r.argmax(-1) == t.argmax(-1)).sum())
        lr, lt = _log_softmax(r), _log_softmax(t)
        kls.append((np.exp(lr) * (lr - lt)).sum(-1))
        maxdiff = max(maxdiff, float(np.abs(r.astype(np.float64) - t).max()))
        n += r.shape[0]
    kl = np.concatenate(kls) if kls else np.zeros(0)
    return {"top1": round(agree / max(n, 1), 5), "kl_mean": float(f"{kl.mean():.3g}") if n else 0.0,
            "kl_max": float(f"{kl.max():.3g}") if n else 0.0, "max_abs_logit_diff": float(f"{maxdiff:.3g}"),
            "positions": n}


def load_hf_base(base_path: str | os.PathLike):
    """The base GGUF dequantized to float32 by transformers (what the adapter was trained against)."""
    import torch
    from transformers import AutoModelForCausalLM

    p = Path(base_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unsupported GGUFs
        raise ModelError(f"transformers cannot load {p.name}: {type(e).__name__}: {e}",
                         "verify needs a base architecture that transformers can read from GGUF") from None
    model.eval()
    return model


def hf_logits(model, tokens: list[list[int]]) -> list[np.ndarray]:
    import torch

    out = []
    with torch.inference_mode():
        for t in tokens:
            ids = torch.tensor([t], dtype=torch.long)
            out.append(model(input_ids=ids).logits[0].float().numpy())
    return out


def _cpp_logits(base_path, bundle, toks_or_prompts, n_threads: int, prompts=None):
    """(token ids, logits without adapter, logits with the bundle) from llama.cpp."""
    from edgeft.engine import Engine

    with Engine(str(base_path), n_ctx=1024, n_threads=n_threads) as eng:
        toks = toks_or_prompts if toks_or_prompts is not None else prompt_tokens(eng, prompts)
        eng.use(None)
        plain = [engine_logits(eng, t) for t in toks]
        eng.use(eng.load_adapter(str(bundle), force=True))
        lora = [engine_logits(eng, t) for t in toks]
    return toks, plain, lora


def _is_quantized(base_path) -> tuple[bool, int]:
    """Whether the base has quantized tensors, and the size of an f16 copy of it."""
    from edgeft.gguf_header import read_header

    h = read_header(base_path)
    floats = {"F32", "F16", "BF16"}
    quantized = any(t.type.name not in floats for t in h.tensors.values() if len(t.shape) >= 2)
    f16_bytes = sum(t.n_elements * (2 if len(t.shape) >= 2 else 4) for t in h.tensors.values())
    return quantized, f16_bytes


def parity_report(peft_dir: str | os.PathLike, base_path: str | os.PathLike, bundle: str | os.PathLike, *,
                  prompts: Sequence[str] | None = None, n_threads: int | None = None, hf_model=None,
                  exact: bool | None = None, status: Callable[[str], None] | None = None) -> dict:
    """Compare PEFT (transformers) and llama.cpp (base + converted bundle) on the prompt set.

    On a quantized base, llama.cpp's quantized arithmetic adds noise of its own, and with an
    adapter attached that noise flips more near-ties; so the conversion is also checked on an f16
    copy of the dequantized base (`exact`; by default when the copy stays under EXACT_MAX_BYTES),
    where PEFT and llama.cpp must agree to rounding. `ok` is decided there when it ran, else by
    the quantized base's agreement against its no-adapter floor.

    `hf_model`: an already loaded transformers base model (tests pass a tiny one); by default
    the base GGUF is loaded through transformers.
    """
    import torch  # noqa: F401  (fail early with ImportError if the extra is missing)
    from peft import PeftModel

    say = status or (lambda m: log.info("%s", m))
    t0 = time.perf_counter()
    threads = n_threads or min(2, os.cpu_count() or 1)
    toks, cpp_base, cpp_lora = _cpp_logits(base_path, bundle, None, threads, prompts)
    say(f"llama.cpp: {len(toks)} prompts, {sum(map(len, toks))} positions")
    quantized, f16_bytes = _is_quantized(base_path)
    if exact is None:
        exact = quantized and f16_bytes <= EXACT_MAX_BYTES and \
            shutil.disk_usage(tempfile.gettempdir()).free > 1.5 * f16_bytes
    exact_logits = None
    if exact and quantized:
        from .quantize import quantize_model

        say(f"dequantizing the base to f16 for the exact check ({f16_bytes / 1e6:.0f} MB, temporary)...")
        with tempfile.TemporaryDirectory(prefix="edgeft-verify-") as tmp:
            f16 = quantize_model(base_path, Path(tmp) / "base-f16.gguf", "f16").path
            exact_logits = _cpp_logits(f16, bundle, toks, threads)[1:]
    if hf_model is None:
        say("loading the base with transformers...")
        hf_model = load_hf_base(base_path)
    peft_model = PeftModel.from_pretrained(hf_model, str(peft_dir))
    peft_model.eval()
    try:
        lora_ref = hf_logits(peft_model, toks)
        with peft_model.disable_adapter():
            base_ref = hf_logits(peft_model, toks)
    finally:
        peft_model.unload()  # give the caller its base model back without LoRA layers
    report: dict = {
        "prompts": len(toks),
        "adapter": compare(lora_ref, cpp_lora),       # PEFT vs llama.cpp + converted adapter
        "floor": compare(base_ref, cpp_base),         # transformers vs llama.cpp, no adapter
        "adapter_effect": compare(base_ref, lora_ref),  # how much the adapter changes PEFT's output
    }
    report["within_floor"] = report["adapter"]["top1"] >= report["floor"]["top1"] - TOP1_MARGIN
    if exact_logits is not None:
        ex = {"adapter": compare(lora_ref, exact_logits[1]), "floor": compare(base_ref, exact_logits[0])}
        ex["ok"] = (ex["adapter"]["top1"] >= ex["floor"]["top1"] - TOP1_MARGIN
                    and ex["adapter"]["kl_mean"] <= 10 * ex["floor"]["kl_mean"] + EXACT_KL)
        report["exact"] = ex
        report["ok"] = ex["ok"]
    else:
        report["ok"] = report["within_floor"]
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def format_report(r: dict) -> str:
    a, f, e = r["adapter"], r["floor"], r["adapter_effect"]

    def row(label: str, c: dict) -> str:
        return f"  {label:<42} top-1 {c['top1'] * 100:6.2f}%   mean KL {c['kl_mean']:.2e}"

    lines = [f"parity on {r['prompts']} prompts ({a['positions']} positions), PEFT vs llama.cpp:",
             row("with adapter", a), row("without adapter (noise floor)", f)]
    if "exact" in r:
        lines += [row("with adapter, base dequantized to f16", r["exact"]["adapter"]),
                  row("without adapter, base dequantized to f16", r["exact"]["floor"])]
    lines.append(row("adapter effect (PEFT on vs off)", e))
    if "exact" in r:
        verdict = ("OK: on the dequantized base PEFT and llama.cpp agree to rounding" if r["ok"] else
                   "MISMATCH: on the dequantized base llama.cpp does not reproduce PEFT")
        if r["ok"] and not r["within_floor"]:
            verdict += (f"; on the quantized base agreement is more than {TOP1_MARGIN * 100:.0f} point below the "
                        "floor: llama.cpp's quantized arithmetic flips more near-ties with an adapter attached")
    else:
        verdict = (f"OK: agreement is within {TOP1_MARGIN * 100:.0f} point of the floor" if r["ok"] else
                   f"MISMATCH: agreement is more than {TOP1_MARGIN * 100:.0f} point below the floor")
    lines.append("  " + verdict)
    return "\n".join(lines)
