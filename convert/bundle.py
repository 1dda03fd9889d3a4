"""PEFT folder -> adapter bundle (adapter.gguf + adapter.json) that the runtime finds by name.

All checks (the adapter, the base, the output folder, the task card, f16 range, the --verify
extra) run before anything is written, and every problem is reported in one error. The bundle
is built in a hidden temp folder beside the target and renamed into place at the end, so a
failed or interrupted conversion leaves nothing behind; an existing bundle is replaced only
with force=True (and only if it is a bundle).
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgeft import __version__
from edgeft.bundles import CARD_FILE, GGUF_FILE, TaskCard
from edgeft.cardinfer import GENERIC_STEMS
from edgeft.errors import EdgeftError
from edgeft.models import BaseModel, resolve_base
from edgeft.paths import user_adapters_dir
from edgeft.registry import is_valid_name
from edgeft.tasks import TaskSpec

from edgeft.files import atomic_dir
from edgeft.gguf_header import GGUFHeader, read_header
from .lora_gguf import OUTTYPES, encode_all, fold, runtime_scale, write_adapter
from .names import BaseLayout, check_saved_weights, plan
from .peft import PeftAdapter, load_peft
from .problems import Problem, refuse

log = logging.getLogger(__name__)

VERIFY_MODULES = ("torch", "transformers", "peft")


@dataclass
class ConvertResult:
    folder: Path
    gguf_path: Path
    card: TaskCard
    n_pairs: int
    nbytes: int
    seconds: float                       # conversion wall time (without --verify)
    parity: dict | None = None
    timings: dict = field(default_factory=dict)


def base_info_from_header(h: GGUFHeader):
    """The runtime's BaseInfo, built from the fast header reader (gguf_info.base_info takes seconds)."""
    from edgeft.gguf_info import BaseInfo

    n_ctx = h.arch_value("context_length")
    return BaseInfo(h.path.resolve(), str(h.architecture), {t.name: t.shape for t in h.tensors.values()},
                    str(h.kv.get("general.name") or h.path.stem), int(n_ctx) if n_ctx is not None else None)


def _load_task_card(path: Path, problems: list[Problem]) -> dict | None:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        problems.append(Problem(f"cannot read task card {path}: {e.strerror or e}", "check the --task-card path"))
        return None
    except (ValueError, RecursionError) as e:
        problems.append(Problem(f"task card {path} is not valid JSON: {type(e).__name__}: {e}", "fix the JSON"))
        return None
    if not isinstance(d, dict) or not isinstance(d.get("task"), dict):
        problems.append(Problem(f"task card {path} has no 'task' section",
                                'give at least {"task": {"system": ..., "template": "...{input}...", "output": {...}}}'))
        return None
    try:
        TaskSpec.from_dict(d["task"])
    except EdgeftError as e:
        problems.append(Problem(f"task card {path}: {e.message}", e.hint or "fix the task section"))
        return None
    except (TypeError, ValueError) as e:
        problems.append(Problem(f"task card {path}: bad 'task': {e}", "fix the task section"))
        return None
    return d


def _check_target(folder: Path, force: bool, problems: list[Problem]) -> None:
    if folder.exists() and not folder.is_dir():
        problems.append(Problem(f"the output {folder} is a file", "choose another -o folder"))
    elif folder.is_dir() and any(folder.iterdir()):
        if not (folder / CARD_FILE).is_file():
            problems.append(Problem(f"the output folder {folder} exists and is not an adapter bundle",
                                    "choose an empty or new -o folder; edgeft only replaces bundles"))
        elif not force:
            problems.append(Problem(f"the bundle {folder} already exists", "pass --force to replace it, or choose another --name / -o"))


def _missing_verify_modules() -> list[str]:
    return [m for m in VERIFY_MODULES if importlib.util.find_spec(m) is None]


def convert_adapter(peft_dir: str | os.PathLike, base: str | os.PathLike | None = None, *,
                    name: str | None = None, out_dir: str | os.PathLike | None = None, outtype: str = "f32",
                    task_card: str | os.PathLike | None = None, force: bool = False, verify: bool = False,
                    verify_threads: int | None = None, status: Callable[[str], None] | None = None,
                    reproduce: str | None = None) -> ConvertResult:
    """Convert a PEFT LoRA folder into an adapter bundle for `base` (manifest id or .gguf path)."""
    say = status or (lambda msg: log.info("%s", msg))
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    base_model: BaseModel = resolve_base(base)
    header = read_header(base_model.path)
    layout, problems = BaseLayout.from_header(header)
    timings["base"] = time.perf_counter() - t0
    adapter: PeftAdapter = load_peft(peft_dir)
    timings["read"] = time.perf_counter() - t0 - timings["base"]
    problems += adapter.problems
    pairs = []
    if layout is not None and adapter.modules:
        pairs, more = plan(adapter, layout)
        problems += more + check_saved_weights(adapter, header)
    problems += _check_layers(adapter, header)
    card_in = _load_task_card(Path(task_card), problems) if task_card else None
    name = name or (card_in or {}).get("name") or default_bundle_name(adapter.path)
    if not is_valid_name(name):
        problems.append(Problem(f"'{name}' is not a valid adapter name", "pass --name with letters, digits, '.', '_' or '-' (max 64)"))
    folder = Path(out_dir).expanduser() if out_dir else user_adapters_dir() / name
    _check_target(folder, force, problems)
    if verify and (missing := _missing_verify_modules()):
        problems.append(Problem(f"--verify needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed",
                                "pip install 'edgeft[train]', or convert without --verify"))
    alpha = adapter.lora_alpha
    tensors = []
    if pairs:
        tensors, more = encode_all(fold(pairs, alpha), outtype)
        problems += more
    elif outtype not in OUTTYPES:
        problems.append(Problem(f"unknown output type '{outtype}'", f"use one of {', '.join(OUTTYPES)}"))
    refuse(str(adapter.path), problems)
    timings["plan"] = time.perf_counter() - t0 - timings["base"] - timings["read"]

    assert layout is not None
    with atomic_dir(folder) as stage:
        gguf_path = stage / GGUF_FILE
        nbytes = write_adapter(gguf_path, tensors, arch=layout.arch.name, alpha=alpha, name=name)
        card = _make_card(name, adapter, base_model, layout.arch.name, pairs, alpha, outtype, nbytes, card_in,
                          reproduce or _reproduce(adapter, base_model, name, outtype, task_card))
        card.save(stage / CARD_FILE)
        seconds = time.perf_counter() - t0
        timings["write"] = seconds - sum(timings.values())
        say(f"converted {len(pairs)} tensor pairs ({nbytes / 1e6:.1f} MB, {outtype}) in {seconds:.2f} s")
        parity = None
        if verify:
            from .verify import parity_report

            say("verifying against PEFT (loads the base with transformers; about 20-60 s)...")
            parity = parity_report(adapter.path, base_model.path, stage, n_threads=verify_threads, status=say)
            card.metrics["parity"] = parity
            card.save(stage / CARD_FILE)
    return ConvertResult(folder, folder / GGUF_FILE, card, len(pairs), nbytes, seconds, parity, timings)


def _check_layers(adapter: PeftAdapter, header: GGUFHeader) -> list[Problem]:
    """`layers_to_transform` must name layers the base has (PEFT would have failed on this base)."""
    ltt = adapter.config.get("layers_to_transform")
    n = header.arch_value("block_count")
    if ltt is None or not isinstance(n, int):
        return []
    wanted = [ltt] if isinstance(ltt, int) else ltt if isinstance(ltt, list) else []
    beyond = sorted(x for x in wanted if isinstance(x, int) and x >= n)
    if beyond:
        return [Problem(f"layers_to_transform names layer(s) {beyond} but the base has {n} blocks (0-{n - 1})",
                        "the adapter was trained for a deeper model; convert it against that base")]
    return []


def default_bundle_name(peft_dir: Path) -> str:
    """The PEFT folder's name, or its parent's when the folder's own name says nothing about the
    task (peft/, adapter/, lora/, checkpoint-500/, final/ ...)."""
    p = Path(peft_dir).resolve()
    own = p.name
    if own.lower() in GENERIC_STEMS or own.lower().startswith(("checkpoint", "adapter", "lora")) and p.parent.name:
        own = p.parent.name
    clean = "".join(c if c.isalnum() or c in "._-" else "-" for c in own).strip(".-_")
    return clean[:64] or "adapter"


def _make_card(name: str, adapter: PeftAdapter, base: BaseModel, arch: str, pairs, alpha: float, outtype: str,
               nbytes: int, card_in: dict | None, reproduce: str) -> TaskCard:
    ranks = adapter.ranks
    folded = any(float(v) != runtime_scale(alpha, p.rank) for p in pairs for v in set(p.col_scale.tolist()))
    adapter_info = {
        "file": GGUF_FILE, "rank": max(ranks), "alpha": alpha,
        "targets": adapter.targets, "dtype": outtype, "tensors": len(pairs), "bytes": nbytes,
        "scale": {"use_rslora": adapter.use_rslora, "folded_into_lora_b": folded},
    }
    if len(ranks) > 1:
        adapter_info["ranks"] = ranks
    for key in ("rank_pattern", "alpha_pattern"):
        if adapter.config.get(key):
            adapter_info["scale"][key] = adapter.config[key]
    source = {"peft_dir": str(adapter.path.resolve()), "base_model_name_or_path": adapter.base_model,
              "peft_type": adapter.config.get("peft_type", "LORA"), "source_dtype": sorted(adapter.dtypes),
              "edgeft_version": __version__,
              "converted_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()}
    for key in ("peft_version", "revision", "task_type"):
        if adapter.config.get(key):
            source[key] = adapter.config[key]
    d = dict(card_in or {})
    d.update({"name": name, "base": {"id": base.id, "sha256": base.sha256, "architecture": arch},
              "adapter": adapter_info, "source": {**(d.get("source") or {}), **source}, "reproduce": reproduce})
    d.setdefault("description", "")
    return TaskCard.from_dict(d)


def _reproduce(adapter: PeftAdapter, base: BaseModel, name: str, outtype: str, task_card) -> str:
    cmd = f"edgeft convert {adapter.path} --base {base.id if base.manifest else base.path} --name {name} --outtype {outtype}"
    return cmd + (f" --task-card {task_card}" if task_card else "")
