"""`edgeft train` (LoRA SFT -> PEFT folder -> adapter bundle with dev scores) and `edgeft eval`
(an adapter against prompting baselines of the base). torch is imported inside `train` only."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import InputError
from .common import AdapterDir, Base, Ctx, FlashAttn, Threads


class Fmt(str, Enum):
    auto = "auto"
    chat = "chat"
    prompt = "prompt"
    label = "label"
    ner = "ner"
    summarize = "summarize"


class Baseline(str, Enum):
    none = "none"
    zero_shot = "zero-shot"
    few_shot = "few-shot"
    all = "all"


FORMAT_HELP = ("Data format: chat ({messages}), prompt ({prompt, completion}), label (text,label JSONL/CSV), "
               "ner ({text, entities}), summarize ({source, targets}); auto detects it from the first row.")


def _read_card(path: str) -> dict:
    from ..tasks import TaskSpec

    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read task card {path}: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("task"), dict):
        raise InputError(f"task card {path} has no 'task' section")
    d["_spec"] = TaskSpec.from_dict(d["task"])
    return d


def _limits(limit: list[int] | None, n_files: int) -> list[int | None]:
    if not limit:
        return [None] * n_files
    if len(limit) == 1:
        return limit * n_files
    if len(limit) != n_files:
        raise InputError(f"{len(limit)} --limit values for {n_files} --data files", "give one --limit, or one per --data")
    return list(limit)


def _load_data(paths: list[str], fmt: str, limits: list[int | None], seed: int, ner_map: str | None):
    from ..data import Dataset, load

    sets = [load(p, fmt, limit=n, seed=seed, ner_map=ner_map) for p, n in zip(paths, limits)]
    if len(sets) == 1:
        return sets[0]
    if len({d.format for d in sets}) > 1:
        raise InputError("the --data files have different formats", "train one task at a time")
    return Dataset(sets[0].path, sets[0].format, [e for d in sets for e in d.examples],
                   [f"{d.path.name} {q}" for d in sets for q in d.problems])


def _report_problems(ds) -> None:
    if ds.problems:
        typer.secho(f"skipped {len(ds.problems)} bad row(s): " + "; ".join(ds.problems[:5])
                    + (" ..." if len(ds.problems) > 5 else ""), fg=typer.colors.YELLOW, err=True)


def _train_progress():
    """A rich progress bar (loss, examples/s, ETA) on a terminal; plain lines every 10 steps in logs."""
    import sys

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not sys.stderr.isatty():
        def line(p):
            if p.step == 1 or p.step % 10 == 0 or p.step == p.total:
                typer.echo(f"step {p.step}/{p.total}  loss {p.loss:.4f}  {p.examples_per_s:.2f} ex/s  "
                           f"ETA {p.eta_s / 60:.1f} min", err=True)
        return line, lambda: None
    bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                   TextColumn("{task.fields[eps]} ex/s"), TimeRemainingColumn(), transient=False)
    state: dict = {}

    def cb(p):
        if "id" not in state:
            bar.start()
            state["id"] = bar.add_task("train", total=p.total, loss="-", eps="-")
        bar.update(state["id"], completed=p.step, loss=f"{p.loss:.4f}", eps=f"{p.examples_per_s:.2f}")

    def close():
        if "id" in state:
            bar.stop()
    return cb, close


def _reproduce(args: dict) -> str:
    parts = ["edgeft", "train"]
    for key, val in args.items():
        flag = "--" + key.replace("_", "-")
        if val is None or val is False:
            continue
        if val is True:
            parts.append(flag)
        elif isinstance(val, list):
            for v in val:
                parts += [flag, str(v)]
        else:
            parts += [flag, str(val)]
    return shlex.join(parts)


def train(
    data: Annotated[list[str], typer.Option("--data", "-d", help="Training file (repeatable: several sets of one task).")],
    task_card: Annotated[str, typer.Option("--task-card", help="Task card template JSON (models/tasks/*.json): system prompt, template, output constraint.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output adapter bundle folder (adapter.gguf, adapter.json, peft/).")],
    base: Base = None,
    eval_data: Annotated[Optional[str], typer.Option("--eval", help="Dev file: scored after training; the scores go into the card.")] = None,
    fmt: Annotated[Fmt, typer.Option("--format", "-f", help=FORMAT_HELP)] = Fmt.auto,
    name: Annotated[Optional[str], typer.Option("--name", help="Adapter name (default: the card's name, else the output folder's).")] = None,
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank.")] = 16,
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha (scale = alpha / rank).")] = 32.0,
    targets: Annotated[str, typer.Option("--targets", help="all-linear or a subset of q,k,v,o,gate,up,down.")] = "all-linear",
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (linear warm-up, cosine decay).")] = 4e-4,
    epochs: Annotated[float, typer.Option("--epochs", help="Passes over the data (fractions allowed).")] = 1.0,
    batch: Annotated[int, typer.Option("--batch", help="Examples per optimizer step.")] = 8,
    max_len: Annotated[int, typer.Option("--max-len", help="Most tokens per example; long inputs are cut to fit.")] = 256,
    limit: Annotated[Optional[list[int]], typer.Option("--limit", help="Use a seeded random sample of N rows (one value for all files, or one per --data).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling, shuffling and LoRA init.")] = 0,
    ner_map: Annotated[Optional[str], typer.Option("--ner-map", help="NER type map JSON (flat, or per set like shared/data/ner/coarse_map.json).")] = None,
    eval_limit: Annotated[Optional[int], typer.Option("--eval-limit", help="Score a seeded sample of N dev rows.")] = 200,
    outtype: Annotated[str, typer.Option("--outtype", help="Adapter GGUF tensor type: f32 (default, exact), f16 (half the size, decode about as fast with edgeft's patches), bf16, q8_0.")] = "f32",
    threads: Threads = None,
    bf16: Annotated[bool, typer.Option("--bf16/--no-bf16", help="bf16 autocast for the matmuls (about 2x faster on AVX512-BF16 CPUs).")] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing bundle at --out.")] = False,
) -> None:
    """Train a LoRA adapter (PEFT, on the dequantized base GGUF) and package it as a bundle."""
    from ..bundles import AdapterBundle
    from ..convert import convert_adapter
    from ..convert import train as T
    from ..models import resolve_base

    args = {"base": base, "data": data, "eval": eval_data, "task_card": task_card, "format": fmt.value,
            "rank": rank, "alpha": alpha, "targets": targets, "lr": lr, "epochs": epochs, "batch": batch,
            "max_len": max_len, "limit": limit, "seed": seed, "ner_map": ner_map,
            "eval_limit": eval_limit if eval_data else None, "outtype": outtype, "no_bf16": not bf16, "out": out}
    reproduce = _reproduce(args)
    card = _read_card(task_card)
    task = card.pop("_spec")
    name = name or card.get("name") or Path(out).name
    cfg = T.TrainConfig(rank=rank, alpha=alpha, targets=targets, lr=lr, epochs=epochs, batch=batch, max_len=max_len,
                        seed=seed, threads=threads, bf16=bf16)
    dest = Path(out).expanduser().absolute()
    if dest.exists() and any(dest.iterdir()) and not force:
        raise InputError(f"{dest} already exists", "pass --force to replace it, or choose another -o")
    ds = _load_data(data, fmt.value, _limits(limit, len(data)), seed, ner_map)
    _report_problems(ds)
    dev = None
    if eval_data:
        from ..data import load

        dev = load(eval_data, ds.format, limit=eval_limit, seed=0, ner_map=ner_map)
        _report_problems(dev)
    base_model = resolve_base(base)
    typer.echo(f"training '{name}' on {len(ds)} examples ({ds.format}) from {', '.join(data)}", err=True)

    _sigterm_as_interrupt()
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    keep = False
    try:
        cb, close = _train_progress()
        try:
            res = T.train_lora(base_model.path, task, ds.examples, work / "peft", cfg, progress=cb,
                               status=lambda m: typer.echo(m, err=True),
                               base_id=base_model.id if base_model.manifest else base_model.path.name)
        finally:
            close()
        typer.echo(f"trained {res.steps} steps in {res.seconds / 60:.1f} min (final loss {res.final_loss:.4f})", err=True)
        keep = True   # from here on a failure keeps the trained PEFT folder for `edgeft convert`
        card_in = {k: v for k, v in card.items() if k not in ("base", "adapter", "metrics", "reproduce")}
        card_in["name"] = name
        (work / "card.json").write_text(json.dumps(card_in, ensure_ascii=False))
        conv = convert_adapter(work / "peft", base_model.path if base_model.manifest is None else base_model.id,
                               name=name, out_dir=work / "bundle", outtype=outtype, task_card=work / "card.json",
                               reproduce=reproduce, status=lambda m: typer.echo(m, err=True))
        bundle_dir = work / "bundle"
        shutil.move(str(work / "peft"), str(bundle_dir / "peft"))
        c = conv.card
        c.source["peft_dir"] = "peft"
        c.source["training"] = {**T.describe(res), "data": [str(Path(p)) for p in data], "format": ds.format,
                                "config": {k: v for k, v in cfg.__dict__.items() if k != "threads"}}
        if dev is not None:
            rep = _evaluate_bundle(base_model.path, bundle_dir, name, task, dev, threads)
            c.metrics["dev"] = {"data": eval_data, "n": rep.n, **_rounded(rep.metrics)}
            _print_table(rep)
        c.save(bundle_dir / "adapter.json")
        AdapterBundle.load(bundle_dir)   # the runtime accepts it
        _readable(bundle_dir)
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            os.replace(dest, old)
            os.replace(bundle_dir, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(bundle_dir, dest)
    except BaseException:
        if keep:
            typer.secho(f"packaging failed; the trained PEFT folder is kept in {work}", fg=typer.colors.YELLOW, err=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    typer.echo(f"wrote {dest}")


def _readable(folder: Path) -> None:
    """Temp files are created private (0600 / 0700); a shipped bundle is plain 0644 / 0755."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [folder, *folder.rglob("*")]:
        os.chmod(p, (0o755 if p.is_dir() else 0o644) & ~mask)


def _sigterm_as_interrupt() -> None:
    """`kill` cleans up like Ctrl-C does: the temp folder goes, the old bundle stays."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        def handler(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, handler)


def _evaluate_bundle(base_path, bundle_dir: Path, name: str, task, dev, threads):
    from ..engine import Engine
    from ..evaluate import Run, evaluate

    with Engine(str(base_path), n_ctx=2048, n_threads=threads) as eng:
        eng.load_adapter(str(bundle_dir), name=name)
        return evaluate(name, task, dev, [Run("adapter", eng, name)], progress=_eval_progress())


def _rounded(m):
    if isinstance(m, dict):
        return {k: _rounded(v) for k, v in m.items()}
    return round(m, 4) if isinstance(m, float) else m


def _eval_progress():
    state = {"t": 0.0}

    def cb(run: str, i: int, n: int) -> None:
        now = time.monotonic()
        if i == n or now - state["t"] > 5:
            state["t"] = now
            typer.echo(f"  eval {run}: {i}/{n}", err=True)
    return cb


def _print_table(rep) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..evaluate import MAIN_METRIC

    cols = {"labels": ["accuracy", "macro_f1"], "entities": ["micro_f1", "precision", "recall"],
            "text": ["rouge_l"], "exact": ["accuracy"]}[rep.kind]
    t = Table(title=f"{rep.task}: {rep.data} (n={rep.n}, main metric {MAIN_METRIC[rep.kind]})")
    t.add_column("run")
    for c in cols + ["invalid_rate", "ttft_ms", "decode_tps"]:
        t.add_column(c, justify="right")
    rows = [(rep.metrics_of, rep.metrics)] + [(k, v["metrics"]) for k, v in rep.baselines.items()]
    for label, m in rows:
        t.add_row(label, *[f"{m[c]:.3f}" for c in cols + ["invalid_rate"]], f"{m['ttft_ms']:.0f}",
                  "-" if m["decode_tps"] is None else f"{m['decode_tps']:.1f}")
    Console(stderr=False).print(t)


def evaluate_cmd(
    data: Annotated[str, typer.Option("--data", "-d", help="Dev file (same formats as train).")],
    adapter: Annotated[Optional[str], typer.Option("--adapter", "-a", help="Adapter bundle (name or folder) to score; its task card decides prompt, constraint and metrics.")] = None,
    task_card: Annotated[Optional[str], typer.Option("--task-card", help="Task card for base-only runs (default: the adapter's).")] = None,
    baseline: Annotated[Optional[list[Baseline]], typer.Option("--baseline", help="Also score the base with the card's prompt: zero-shot, few-shot, all (repeatable).")] = None,
    shots: Annotated[int, typer.Option("--shots", help="Examples from the card's few_shot list in the few-shot baseline.")] = 4,
    merged: Annotated[Optional[str], typer.Option("--merged", help="Also score a merged GGUF (base + adapter baked in) with the same prompt.")] = None,
    fmt: Annotated[Fmt, typer.Option("--format", "-f", help=FORMAT_HELP)] = Fmt.auto,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Score a seeded random sample of N rows.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the --limit sample.")] = 0,
    ner_map: Annotated[Optional[str], typer.Option("--ner-map", help="NER type map JSON.")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the report as JSON to PATH.")] = None,
    base: Base = None,
    ctx: Ctx = 2048,
    threads: Threads = None,
    adapter_dir: AdapterDir = None,
    flash_attn: FlashAttn = False,
) -> None:
    """Score an adapter on a dev file, with prompting baselines of the base in the same run."""
    from ..data import load
    from ..engine import Engine
    from ..evaluate import Run, evaluate
    from ..files import write_text_atomic
    from ..registry import find

    wanted = {b.value for b in (baseline or [])}
    if "all" in wanted:
        wanted = {"zero-shot", "few-shot"}
    wanted.discard("none")
    bundle = find(adapter, adapter_dir or []) if adapter else None
    if task_card:
        card = _read_card(task_card)
        task, task_name = card.pop("_spec"), card.get("name") or Path(task_card).stem
    elif bundle is not None and bundle.card.task is not None:
        task, task_name = bundle.card.task, bundle.name
    else:
        raise InputError("no task card: the adapter has none and --task-card was not given",
                         "pass --task-card models/tasks/NAME.json")
    if bundle is None and not wanted and not merged:
        raise InputError("nothing to evaluate", "pass --adapter, --baseline or --merged")
    if "few-shot" in wanted and not task.few_shot:
        raise InputError("the task card has no few_shot examples for the few-shot baseline")
    ds = load(data, fmt.value, limit=limit, seed=seed, ner_map=ner_map)
    _report_problems(ds)
    eng = Engine(base, n_ctx=ctx, n_threads=threads, adapter_dirs=adapter_dir or [], flash_attn=flash_attn)
    engines = [eng]
    try:
        runs = []
        if bundle is not None:
            runs.append(Run("adapter", eng, eng.load_adapter(bundle)))
        if "zero-shot" in wanted:
            runs.append(Run("zero-shot", eng, None, 0))
        if "few-shot" in wanted:
            runs.append(Run("few-shot", eng, None, shots))
        if merged:
            m_eng = Engine(merged, n_ctx=ctx, n_threads=threads, flash_attn=flash_attn)
            engines.append(m_eng)
            runs.append(Run("merged", m_eng, None, 0))
        rep = evaluate(task_name, task, ds, runs, progress=_eval_progress())
    finally:
        for e in engines:
            e.close()
    _print_table(rep)   # without an adapter, the first baseline's scores are the report's `metrics`
    if json_out:
        d = rep.to_dict()
        write_text_atomic(json_out, json.dumps(_rounded(d), indent=2, ensure_ascii=False) + "\n")
        typer.echo(f"wrote {json_out}", err=True)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("eval")(evaluate_cmd)
