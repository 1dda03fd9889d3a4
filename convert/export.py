"""Export the exact base and adapter bundles for a multi-LoRA server: vLLM, LoRAX or plain
transformers + PEFT (`edgeft export --to vllm|lorax|hf OUT_DIR`).

The adapters were trained and evaluated on the *dequantized GGUF* (e.g. SmolLM2 Q4_1), not on the
original Hugging Face checkpoint, so the base goes out as those very weights: transformers loads
the GGUF (`gguf_file=`, as `train.load_base` does) and saves a model folder, with the GGUF's
sha256 recorded beside it. Each bundle becomes a PEFT folder (`export_peft`: its source, or
written from its GGUF, checked by a round trip), with its task card; the README, launch script
and client say how the cards map onto requests (`export_files`). `verify=N` measures agreement
with edgeft on N prompts per adapter (`export_verify`).

Everything is written into a hidden temp folder that replaces OUT_DIR only at the end: a failure
never leaves a half-written export. torch / transformers / peft are imported inside functions.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from edgeft import __version__
from edgeft.bundles import AdapterBundle
from edgeft.errors import ConversionError, EdgeftError
from edgeft.files import atomic_dir
from edgeft.gguf_header import read_header
from edgeft.models import BaseModel, resolve_base
from .export_files import CLIENT, RUN_HF, ExportInfo, compare_script, export_manifest, launch_script, readme, vllm_rank
from .export_peft import ExportedAdapter, export_adapter
from .names import BaseLayout
from .problems import Problem

log = logging.getLogger(__name__)

TARGETS = ("vllm", "lorax", "hf")
DTYPES = ("bf16", "f16", "f32")
EXPORT_FILE = "edgeft-export.json"
NEEDS = ("torch", "transformers", "peft")


@dataclass
class ExportResult:
    folder: Path
    info: ExportInfo
    adapters: list[ExportedAdapter]
    seconds: float


def default_dtype(target: str) -> str:
    """f32 for `hf` (the exact dequantized weights, what --verify compares), bf16 for the GPU servers."""
    return "f32" if target == "hf" else "bf16"


def select_bundles(adapters: str | Sequence[str], adapter_dirs: Sequence[str] = ()) -> list[AdapterBundle]:
    """"all" (every adapter found by name), "a,b" or a list of names / bundle folders."""
    from edgeft.registry import available, find

    if isinstance(adapters, str):
        names = list(available(adapter_dirs)) if adapters.strip() == "all" else \
            [x.strip() for x in adapters.split(",") if x.strip()]
    else:
        names = list(adapters)
    if not names:
        raise ConversionError("no adapters to export", "pass --adapters a,b or --adapters all (with bundles in the registry)")
    bundles = [find(n, adapter_dirs) for n in names]
    seen: dict[str, AdapterBundle] = {}
    for b in bundles:
        if b.name in seen:
            raise ConversionError(f"two adapters are named '{b.name}'", "export each name once")
        seen[b.name] = b
    return bundles


def _check(out: Path, target: str, dtype: str, bundles: list[AdapterBundle], base: BaseModel, force: bool) -> list[Problem]:
    """Every reason to refuse, found before anything is loaded or written."""
    problems = []
    if target not in TARGETS:
        problems.append(Problem(f"unknown target '{target}'", f"use one of {', '.join(TARGETS)}"))
    if dtype not in DTYPES:
        problems.append(Problem(f"unknown dtype '{dtype}'", f"use one of {', '.join(DTYPES)}"))
    if out.exists() and not out.is_dir():
        problems.append(Problem(f"{out} is a file", "choose a folder name for the export"))
    elif out.is_dir() and any(out.iterdir()):
        if not (out / EXPORT_FILE).is_file():
            problems.append(Problem(f"{out} exists and is not an edgeft export", "choose a new or empty folder"))
        elif not force:
            problems.append(Problem(f"the export {out} already exists", "pass --force to replace it"))
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        problems.append(Problem(f"export needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed",
                                "pip install 'edgeft[train]'"))
    for b in bundles:
        sha = b.card.base.get("sha256")
        if sha is not None and sha != base.sha256:
            problems.append(Problem(f"adapter '{b.name}' was made for another base (sha256 {sha[:12]}..., "
                                    f"{b.card.base.get('id')}), not {base.id} ({base.sha256[:12]}...)",
                                    "export it with its own base (--base), or leave it out"))
    return problems


def _refuse(out: Path, problems: list[Problem]) -> None:
    if problems:
        msg = "; ".join(str(p) for p in problems[:8])
        raise ConversionError(f"cannot export to {out}: {msg}", problems[0].fix if len(problems) == 1 else
                              "fix each problem listed (what to do is in parentheses)")


def export_base(base: BaseModel, folder: Path, dtype: str, say: Callable[[str], None]) -> tuple[set[str], str | None]:
    """The GGUF's weights, dequantized by transformers, as a Hugging Face folder in `dtype`.
    Returns the model's Linear module names (where LoRA can go) and the chat template file, if any."""
    import torch

    from .train import load_base

    say(f"loading {base.path.name} with transformers (dequantizing; 20-60 s for a 135M model)...")
    try:
        model, tok = load_base(base.path)
    except EdgeftError:
        raise
    except Exception as e:  # transformers raises many kinds for GGUFs it cannot read
        raise ConversionError(f"transformers cannot load {base.path.name}: {type(e).__name__}: {e}",
                              "export needs a base architecture that transformers reads from GGUF") from None
    if not getattr(tok, "chat_template", None):
        tmpl = read_header(base.path).kv.get("tokenizer.chat_template")
        if isinstance(tmpl, str) and tmpl:
            tok.chat_template = tmpl
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    model = model.to({"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype])
    say(f"writing the base ({dtype}) to {folder.name}/ ...")
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    del model
    _portable(folder)
    (folder / EXPORT_FILE).write_text(json.dumps({
        "what": "the GGUF's weights dequantized by transformers: what the adapters were trained and evaluated on",
        "gguf": base.path.name, "sha256": base.sha256, "base_id": base.id, "dtype": dtype,
        "edgeft_version": __version__}, indent=2) + "\n")
    tmpl_file = next((f for f in ("chat_template.jinja",) if (folder / f).is_file()), None)
    return linear, tmpl_file


def _portable(folder: Path) -> None:
    """Make the folder read the same under the transformers 4.x that serving images pin: the 4.x
    names of rope settings and dtype beside 5.x's (a 4.x reader that missed rope_theta would run
    the model with rope base 10000, silently), a tokenizer class both know, and the chat template
    inside tokenizer_config.json too."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("quantization_config", None)   # the GGUF "quantization" was undone on load
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
        extra = {k: v for k, v in rope.items() if k != "rope_theta"}
        cfg.setdefault("rope_scaling", None if extra.get("rope_type", "default") == "default" else extra)
    if "dtype" in cfg:
        cfg.setdefault("torch_dtype", cfg["dtype"])
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tc_path = folder / "tokenizer_config.json"
    with contextlib.suppress(OSError, ValueError):
        tc = json.loads(tc_path.read_text())
        if tc.get("tokenizer_class") == "TokenizersBackend":
            tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        tmpl = folder / "chat_template.jinja"
        if tmpl.is_file() and "chat_template" not in tc:
            tc["chat_template"] = tmpl.read_text()
        tc_path.write_text(json.dumps(tc, indent=2) + "\n")


def export(out_dir: str | os.PathLike, *, to: str, adapters: str | Sequence[str] = "all", dtype: str | None = None,
           base: str | os.PathLike | None = None, adapter_dirs: Sequence[str] = (), force: bool = False,
           verify: int = 0, prompts: dict[str, list[str]] | None = None, threads: int | None = None,
           status: Callable[[str], None] | None = None) -> ExportResult:
    """Write OUT_DIR for `to` (vllm | lorax | hf): the base, the adapters, README, launch script, client."""
    say = status or (lambda m: log.info("%s", m))
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser().absolute()
    dtype = dtype or default_dtype(to)
    bundles = select_bundles(adapters, adapter_dirs)
    base_model = resolve_base(base if base is not None else bundles[0].card.base.get("id"))
    _refuse(out, _check(out, to, dtype, bundles, base_model, force))
    layout, problems = BaseLayout.from_header(read_header(base_model.path))
    _refuse(out, problems)
    base_ref = "/data/base" if to == "lorax" else "base"
    with atomic_dir(out) as stage:
        linear, tmpl = export_base(base_model, stage / "base", dtype, say)
        done = []
        for b in bundles:
            done.append(export_adapter(b, layout, linear, stage / "adapters" / b.name, dtype=dtype, base_ref=base_ref))
            say(f"adapter {b.name}: rank {done[-1].rank}, PEFT from {done[-1].source}, round trip "
                f"{done[-1].round_trip:.1e}")
        info = ExportInfo(to, base_model.id, base_model.sha256, base_model.path.name, dtype,
                          [{"name": a.name, "rank": a.rank, "source": a.source, "card": b.card.to_dict()}
                           for a, b in zip(done, bundles)],
                          tmpl, vllm_rank(max(a.rank for a in done)), notes=_notes(bundles))
        if verify:
            from .export_verify import verify_export

            info.verify = verify_export(stage, base_model.path, bundles, n=verify, prompts=prompts, threads=threads,
                                        status=say)
        _write_files(stage, info)
    for script in ("launch.sh", "compare.sh"):
        with contextlib.suppress(OSError):   # atomic_dir gave every file a plain file's mode
            (out / script).chmod((out / script).stat().st_mode | 0o111)
    return ExportResult(out, info, done, time.perf_counter() - t0)


def _notes(bundles: list[AdapterBundle]) -> list[str]:
    notes = []
    for b in bundles:
        t = b.card.task
        if t is None:
            notes.append(f"`{b.name}` has no task card: requests carry no system prompt or constraint.")
        elif t.template != "{input}":
            notes.append(f"`{b.name}`'s template is not `{{input}}`: edgeft serve applies the card's template to a "
                         "single user message itself, so against edgeft send the raw input (client.py --engine edgeft).")
    return notes


def _write_files(stage: Path, info: ExportInfo) -> None:
    (stage / "README.md").write_text(readme(info))
    (stage / "launch.sh").write_text(launch_script(info))
    (stage / "client.py").write_text(CLIENT)
    (stage / "run_hf.py").write_text(RUN_HF)
    (stage / EXPORT_FILE).write_text(export_manifest(info, {"edgeft_version": __version__}))
    if info.verify and info.target in ("vllm", "lorax"):
        (stage / "compare.sh").write_text(compare_script(info))
