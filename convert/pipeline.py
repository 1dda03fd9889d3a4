"""Your own task, end to end: data -> card (inferred or given, checked against the data) ->
LoRA training (best checkpoint on validation rows) -> adapter bundle -> scores against
prompting the base and the trivial lines -> registry. `edgeft train` is a thin layer over
`train_adapter`; a desktop app calls the same function.

Nothing half-done carries the output's name: the bundle is built in a hidden folder and renamed
into place. When packaging fails after training, the trained PEFT folder and the card are moved
to a visible `<out>-unfinished` folder with a FINISH.txt holding the one command that completes
the job.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from edgeft.bundles import AdapterBundle, TaskCard
from edgeft.cardinfer import InferredCard, check_card, default_name, infer_task, pick_shots
from edgeft.data import Dataset, Example, load
from edgeft.errors import EdgeftError, InputError
from edgeft.evaluate import card_metrics
from edgeft.files import atomic_dir, partial_prefix, publish, sha256_file, sweep_partials
from edgeft.models import BaseModel, resolve_base
from edgeft.paths import user_adapters_dir
from edgeft.registry import is_valid_name
from edgeft.tasks import TaskSpec

from .train import Progress, TrainConfig, TrainResult

log = logging.getLogger(__name__)

HOLDOUT_MIN_ROWS = 25      # below this nothing is held out (too few rows to spare)
HOLDOUT_FRACTION = 0.2
HOLDOUT_MAX = 200
VALIDATION_ROWS = 64       # rows of the validation slice used for the checkpoint's loss


@dataclass
class TrainJob:
    """What to train: the data, where the bundle goes, and how. `card` is a given card (the dict
    of a task card file) or None to infer one from the data."""

    data: Sequence[str | os.PathLike]
    out: str | os.PathLike | None = None          # None: EDGEFT_HOME/adapters/NAME (registered)
    base: str | os.PathLike | None = None
    card: dict | None = None
    eval_data: str | os.PathLike | None = None
    format: str = "auto"
    name: str | None = None
    config: TrainConfig = field(default_factory=TrainConfig)
    limit: Sequence[int | None] = ()
    seed: int = 0
    ner_map: str | os.PathLike | None = None
    eval_limit: int | None = 200
    outtype: str = "f32"
    threads: int | None = None
    baselines: bool = True
    shots: int = 4
    register: bool = False
    force: bool = False
    reproduce: str = ""


@dataclass
class Plan:
    """What `prepare` decided, before any training: shown to the user first."""

    name: str
    dest: Path
    task: TaskSpec
    card: dict                      # the card written into the bundle (without base/adapter)
    train: list[Example]
    dev: Dataset | None
    dev_source: str                 # "eval file X" | "held-out slice" | "none"
    validation: list[Example]
    formats: dict[str, str]         # file -> format it was read as
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    inferred: bool = False


@dataclass
class TrainOutcome:
    bundle: AdapterBundle
    folder: Path
    result: TrainResult
    report: Any = None              # edgeft.evaluate.Report or None
    registered: Path | None = None


def _load_all(job: TrainJob) -> tuple[Dataset, dict[str, str]]:
    paths = list(job.data)
    if not paths:
        raise InputError("no training data", "pass --data FILE")
    limits = list(job.limit) or [None]
    if len(limits) == 1:
        limits = limits * len(paths)
    if len(limits) != len(paths):
        raise InputError(f"{len(limits)} --limit values for {len(paths)} --data files", "give one --limit, or one per --data")
    sets = [load(p, job.format, limit=n, seed=job.seed, ner_map=job.ner_map) for p, n in zip(paths, limits)]
    formats = {str(d.path): d.format for d in sets}
    if len(sets) == 1:
        return sets[0], formats
    return Dataset(sets[0].path, "+".join(sorted(set(formats.values()))), [e for d in sets for e in d.examples],
                   [f"{d.path.name} {q}" for d in sets for q in d.problems]), formats


def holdout(examples: Sequence[Example], seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): a seeded 20% slice (5..200 rows) when there are at least 25 rows."""
    n = len(examples)
    if n < HOLDOUT_MIN_ROWS:
        return list(examples), []
    k = min(HOLDOUT_MAX, max(5, round(n * HOLDOUT_FRACTION)))
    held = set(random.Random(seed + 7919).sample(range(n), k))
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def _given_card(job: TrainJob, train: list[Example]) -> tuple[TaskSpec, dict, list[str]]:
    card = {k: v for k, v in (job.card or {}).items() if k not in ("base", "adapter", "metrics", "reproduce", "_spec")}
    if not isinstance(card.get("task"), dict):
        raise InputError("the task card has no 'task' section", "see docs/your-own-task.md for the card format")
    task = TaskSpec.from_dict(card["task"])
    warnings = check_card(task, train)
    return task, card, warnings


def prepare(job: TrainJob, status: Callable[[str], None] | None = None) -> Plan:
    """Read the data, settle the card and the dev rows, check everything that can be checked
    without a model. Every mismatch between card and data is reported here, before training."""
    say = status or (lambda m: log.info("%s", m))
    from .lora_gguf import OUTTYPES

    if job.outtype not in OUTTYPES:   # checked now, not after minutes of training
        raise InputError(f"unknown adapter type '{job.outtype}'", f"use one of {', '.join(OUTTYPES)}")
    ds, formats = _load_all(job)
    for q in ds.problems[:5]:
        say(f"skipped: {q}")
    if len(ds.problems) > 5:
        say(f"skipped {len(ds.problems) - 5} more bad row(s)")
    dev: Dataset | None = None
    if job.eval_data:
        dev = load(job.eval_data, "auto", limit=job.eval_limit, seed=0, ner_map=job.ner_map)
        formats[str(dev.path)] = dev.format
        train, dev_source = list(ds.examples), f"eval file {dev.path.name}"
    else:
        train, held = holdout(ds.examples, job.seed)
        if held:
            dev = Dataset(ds.path, ds.format, held[: job.eval_limit] if job.eval_limit else held)
            dev_source = f"held-out slice: {len(held)} of {len(ds)} rows (seed {job.seed}), not trained on"
        else:
            dev_source = "none"
    notes, warnings = [], []
    if job.card is not None:
        task, card, warnings = _given_card(job, ds.examples)
        inferred = False
    else:
        inf: InferredCard = infer_task(ds.examples, seed=job.seed)
        inf.task.few_shot = pick_shots(train, inf.task.output, seed=job.seed)  # never a dev row
        task, notes, inferred = inf.task, inf.notes, True
        card = {"description": _describe_task(task, job.data), "task": task.to_dict()}
    if dev is not None:
        dev_warn = _dev_against_card(task, dev)
        warnings += dev_warn
    name = job.name or card.get("name") or (Path(job.out).name if job.out else default_name(job.data))
    if not is_valid_name(name):
        raise InputError(f"'{name}' is not a valid adapter name", "pass --name with letters, digits, '.', '_' or '-' (max 64)")
    card = {**card, "name": name, "task": task.to_dict()}
    dest = Path(job.out).expanduser().absolute() if job.out else user_adapters_dir() / name
    if dest.exists() and not dest.is_dir():
        raise InputError(f"{dest} is a file", "choose another -o folder")
    if dest.is_dir() and any(dest.iterdir()) and not job.force:
        raise InputError(f"{dest} already exists", "pass --force to replace it, or choose another -o / --name")
    if job.shots and job.baselines and not task.few_shot:
        notes.append("few-shot baseline: skipped (the card has no few_shot examples)")
    validation = (dev.examples if dev is not None else [])[:VALIDATION_ROWS]
    return Plan(name, dest, task, card, train, dev, dev_source, validation, formats, notes, warnings, inferred)


def _describe_task(task: TaskSpec, data: Sequence[str | os.PathLike]) -> str:
    files = ", ".join(Path(p).name for p in data)
    out = task.output
    if out.type == "labels":
        labels = out.labels or []
        shown = ", ".join(labels[:6]) + (", ..." if len(labels) > 6 else "")
        return f"one of {len(labels)} labels ({shown}); card inferred from {files}"
    if out.type == "json_schema":
        return f"JSON answers, schema inferred from {files}"
    return f"free-text answers; card inferred from {files}"


def _dev_against_card(task: TaskSpec, dev: Dataset) -> list[str]:
    if task.output.type != "labels":
        return []
    allowed = set(task.output.labels or [])
    odd = [e for e in dev.examples if str(e.reference) not in allowed]
    if odd:
        unknown = sorted({str(e.reference) for e in odd})
        return [f"{len(odd)} dev row(s) have labels the card lacks ({', '.join(unknown[:8])}"
                f"{' ...' if len(unknown) > 8 else ''}): no answer can match them; add training rows with those labels"]
    return []


def describe_plan(plan: Plan) -> str:
    """The plan in a few lines (printed before training starts)."""
    lines = [f"adapter '{plan.name}' -> {plan.dest}"]
    lines += [f"  data: {Path(p).name} read as {f}" for p, f in plan.formats.items()]
    lines.append(f"  training rows: {len(plan.train)}; scored on: {plan.dev_source}")
    lines.append("  task card: " + ("inferred from the data" if plan.inferred else "given"))
    lines += [f"    {n}" for n in plan.notes]
    card_json = json.dumps({"task": plan.task.to_dict()}, ensure_ascii=False, indent=2)
    lines.append("  card:\n" + "\n".join("    " + ln for ln in card_json.splitlines()))
    return "\n".join(lines)


def train_adapter(job: TrainJob, *, plan: Plan | None = None, progress: Callable[[Progress], None] | None = None,
                  status: Callable[[str], None] | None = None,
                  eval_progress: Callable[[str, int, int], None] | None = None,
                  model_and_tokenizer=None) -> TrainOutcome:
    """Run the whole path for `job` (see the module docstring); returns the published bundle."""
    from . import train as T
    from .bundle import convert_adapter

    say = status or (lambda m: log.info("%s", m))
    plan = plan or prepare(job, say)
    base_model: BaseModel = resolve_base(job.base)
    base_ref = base_model.id if base_model.manifest is not None else str(base_model.path)
    _sigterm_as_interrupt()
    dest = plan.dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(dest.parent, dest.name)
    work = Path(tempfile.mkdtemp(prefix=partial_prefix(dest.name), suffix=".partial", dir=dest.parent))
    trained = False
    try:
        res = T.train_lora(base_model.path, plan.task, plan.train, work / "peft", job.config, progress=progress,
                           status=say, base_id=base_model.id if base_model.manifest else base_model.path.name,
                           val_examples=plan.validation, model_and_tokenizer=model_and_tokenizer)
        trained = True
        say(f"trained {res.steps} steps ({res.epochs:g} epochs) in {res.seconds / 60:.1f} min "
            f"(final loss {res.final_loss:.4f})")
        (work / "card.json").write_text(json.dumps(plan.card, ensure_ascii=False, indent=2) + "\n")
        with atomic_dir(dest) as stage:
            conv = convert_adapter(work / "peft", base_ref, name=plan.name, out_dir=stage / "bundle", outtype=job.outtype,
                                   task_card=work / "card.json", reproduce=job.reproduce, force=True, status=say)
            bundle_dir = stage / "bundle"
            shutil.copytree(work / "peft", bundle_dir / "peft")
            card: TaskCard = conv.card
            card.source["peft_dir"] = "peft"
            cfg = {k: v for k, v in job.config.__dict__.items() if k != "threads"}
            card.source["training"] = {**T.describe(res), "data": [str(Path(p)) for p in job.data],
                                       "formats": plan.formats, "card": "inferred" if plan.inferred else "given",
                                       "scored_on": plan.dev_source, "config": {**cfg, "epochs": res.epochs}}
            report = None
            if plan.dev is not None:
                report = evaluate_bundle(base_model.path, bundle_dir, plan.name, plan.task, plan.dev, job.threads,
                                         baselines=job.baselines, shots=job.shots, progress=eval_progress)
                sha = sha256_file(job.eval_data) if job.eval_data else None
                card.metrics["dev"] = card_metrics(report, str(job.eval_data or "held-out slice"), sha)
            card.save(bundle_dir / "adapter.json")
            AdapterBundle.load(bundle_dir)   # the runtime accepts it
            for item in bundle_dir.iterdir():
                os.replace(item, stage / item.name)
            bundle_dir.rmdir()
    except BaseException as e:
        if trained and (work / "peft").is_dir() and not isinstance(e, KeyboardInterrupt):
            kept = _keep_unfinished(work, dest, base_ref, job)
            shutil.rmtree(work, ignore_errors=True)
            msg = e.message if isinstance(e, EdgeftError) else f"{type(e).__name__}: {e}"
            raise EdgeftError(f"packaging failed after training ({msg}); the trained adapter is kept in {kept}",
                              f"finish with: {(kept / 'FINISH.txt').read_text().strip()}") from e
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    registered = None
    if job.register and dest.parent != user_adapters_dir():
        from edgeft.registry import add

        registered = add(dest, name=plan.name, force=job.force).folder
    return TrainOutcome(AdapterBundle.load(dest), dest, res, report, registered)


def _keep_unfinished(work: Path, dest: Path, base_ref: str, job: TrainJob) -> Path:
    """Move the trained PEFT folder and card to a visible folder beside the output, with the one
    command that finishes the job in FINISH.txt."""
    kept = dest.parent / f"{dest.name}-unfinished"
    k = 2
    while kept.exists():
        kept, k = dest.parent / f"{dest.name}-unfinished-{k}", k + 1
    kept.mkdir()
    os.replace(work / "peft", kept / "peft")
    if (work / "card.json").is_file():
        os.replace(work / "card.json", kept / "card.json")
    cmd = ["edgeft", "convert", str(kept / "peft"), "--base", base_ref, "--outtype", job.outtype, "-o", str(dest)]
    if (kept / "card.json").is_file():
        cmd += ["--task-card", str(kept / "card.json")]
    (kept / "FINISH.txt").write_text(shlex.join(cmd) + "\n")
    publish(kept)
    return kept


def _sigterm_as_interrupt() -> None:
    """`kill` cleans up like Ctrl-C does: the temp folder goes, the old bundle stays."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        def handler(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, handler)


def evaluate_bundle(base_path, bundle_dir: Path, name: str, task: TaskSpec, dev: Dataset, threads: int | None, *,
                    baselines: bool = True, shots: int = 4, progress=None):
    """Score a bundle on `dev` with the base's zero-shot / few-shot prompts and the trivial lines."""
    from edgeft.engine import Engine
    from edgeft.evaluate import Run, evaluate, efficiency

    with Engine(str(base_path), n_ctx=2048, n_threads=threads) as eng:
        name = eng.load_adapter(str(bundle_dir), name=name)
        runs = [Run("adapter", eng, name)]
        if baselines:
            runs.append(Run("zero-shot", eng, None, 0))
            if shots and task.few_shot:
                runs.append(Run("few-shot", eng, None, shots))
        rep = evaluate(name, task, dev, runs, progress=progress)
        rep.efficiency = efficiency(eng, name, rss=False)   # this process also held the torch model
        return rep
