"""`edgeft train` (LoRA SFT -> PEFT folder -> adapter bundle with dev scores) and `edgeft eval`
(an adapter against prompting baselines of the base). torch is imported inside `train` only."""

from __future__ import annotations

import json
import shlex
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
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"cannot read task card {path}: {type(e).__name__}: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("task"), dict):
        raise InputError(f"task card {path} has no 'task' section")
    d["_spec"] = TaskSpec.from_dict(d["task"])
    return d


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
    data: Annotated[list[str], typer.Option("--data", "-d", help="Training file (repeatable: several sets of one task). Each file's format is detected on its own.")],
    out: Annotated[Optional[str], typer.Option("--output", "-o", "--out", help="Bundle folder to write (default: EDGEFT_HOME/adapters/NAME, found by name at once).")] = None,
    task_card: Annotated[Optional[str], typer.Option("--task-card", help="Task card JSON (system prompt, template, output constraint). Default: inferred from the data (`edgeft card infer`).")] = None,
    base: Base = None,
    eval_data: Annotated[Optional[str], typer.Option("--eval", help="Dev file (any format): picks the best checkpoint and is scored; default: a held-out 20% slice of the data.")] = None,
    fmt: Annotated[Fmt, typer.Option("--format", "-f", help=FORMAT_HELP)] = Fmt.auto,
    name: Annotated[Optional[str], typer.Option("--name", help="Adapter name (default: the card's, else the output folder's, else the data file's).")] = None,
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank.")] = 16,
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha (scale = alpha / rank).")] = 32.0,
    targets: Annotated[str, typer.Option("--targets", help="all-linear or a subset of q,k,v,o,gate,up,down.")] = "all-linear",
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (linear warm-up, cosine decay).")] = 4e-4,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Passes over the data (default: from the data size, about 800 examples seen, 1-10 passes).")] = None,
    batch: Annotated[int, typer.Option("--batch", help="Examples per optimizer step.")] = 8,
    max_len: Annotated[int, typer.Option("--max-len", help="Most tokens per example; long inputs are cut to fit.")] = 256,
    limit: Annotated[Optional[list[int]], typer.Option("--limit", help="Use a seeded random sample of N rows (one value for all files, or one per --data).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling, the held-out slice, shuffling and LoRA init.")] = 0,
    ner_map: Annotated[Optional[str], typer.Option("--ner-map", help="NER type map JSON (flat, or per set like shared/data/ner/coarse_map.json).")] = None,
    eval_limit: Annotated[Optional[int], typer.Option("--eval-limit", help="Score a seeded sample of N dev rows.")] = 200,
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", help="Also score the base's zero-shot and few-shot prompts (the majority / copy line is always there).")] = True,
    outtype: Annotated[str, typer.Option("--outtype", help="Adapter GGUF tensor type: f32 (default, exact), f16 (half the size, decode about as fast with edgeft's patches), bf16, q8_0.")] = "f32",
    register: Annotated[bool, typer.Option("--register", help="Also add the bundle to the registry (EDGEFT_HOME/adapters) when -o points elsewhere.")] = False,
    threads: Threads = None,
    bf16: Annotated[bool, typer.Option("--bf16/--no-bf16", help="bf16 autocast for the matmuls (about 2x faster on AVX512-BF16 CPUs).")] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing bundle at --out (or registered under --name).")] = False,
) -> None:
    """Train a LoRA adapter on your data and package it as a bundle, scored against prompting the base.

    With no --task-card the card is inferred from the data and printed before training."""
    from ..convert import pipeline as P
    from ..convert.train import TrainConfig

    args = {"base": base, "data": data, "eval": eval_data, "task_card": task_card,
            "format": fmt.value if fmt != Fmt.auto else None, "rank": rank, "alpha": alpha, "targets": targets,
            "lr": lr, "epochs": epochs, "batch": batch, "max_len": max_len, "limit": limit, "seed": seed,
            "ner_map": ner_map, "eval_limit": eval_limit if eval_data else None, "outtype": outtype,
            "no_bf16": not bf16, "name": name, "output": out}
    cfg = TrainConfig(rank=rank, alpha=alpha, targets=targets, lr=lr, epochs=epochs, batch=batch, max_len=max_len,
                      seed=seed, threads=threads, bf16=bf16)
    job = P.TrainJob(data=data, out=out, base=base, card=_read_card(task_card) if task_card else None,
                     eval_data=eval_data, format=fmt.value, name=name, config=cfg, limit=limit or (), seed=seed,
                     ner_map=ner_map, eval_limit=eval_limit, outtype=outtype, threads=threads, baselines=baselines,
                     register=register, force=force, reproduce=_reproduce(args))
    say = lambda m: typer.echo(m, err=True)  # noqa: E731
    plan = P.prepare(job, say)
    typer.echo(P.describe_plan(plan), err=True)
    for w in plan.warnings:
        typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
    cb, close = _train_progress()
    try:
        outcome = P.train_adapter(job, plan=plan, progress=cb, status=say, eval_progress=_eval_progress())
    finally:
        close()
    if outcome.report is not None:
        _print_report(outcome.report, plan.dev_source)
    typer.echo(f"wrote {outcome.folder}")
    if outcome.registered:
        typer.echo(f"registered as '{plan.name}' ({outcome.registered})")
    where = plan.name if outcome.registered or outcome.folder.parent == _user_adapters() else str(outcome.folder)
    typer.echo(f'try it: edgeft run --adapter {where} "..."')


def _user_adapters() -> Path:
    from ..paths import user_adapters_dir

    return user_adapters_dir()


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


def _print_report(rep, scored_on: str | None = None) -> None:
    """The scores table (adapter, prompting baselines, trivial line), the margin, the confusion
    matrix for labels and the efficiency line."""
    from rich.console import Console
    from rich.table import Table

    cols = {"labels": ["accuracy", "macro_f1"], "entities": ["micro_f1", "precision", "recall"],
            "text": ["rouge_l"], "exact": ["accuracy"],
            "classification": ["accuracy", "macro_f1", "in_scope_accuracy", "oos_recall", "oos_precision"],
            "parsing": ["intent_accuracy", "slot_f1", "slot_precision", "slot_recall", "exact_match"],
            "style": ["joint", "chrf", "style_accuracy"]}[rep.kind]
    con = Console(stderr=False)
    t = Table(title=f"{rep.task}: {scored_on or rep.data} (read as {rep.data_format}, n={rep.n}, main metric {rep.main_metric})")
    t.add_column("run")
    for c in cols + ["invalid_rate", "latency p50 ms", "p90 ms", "decode tok/s"]:
        t.add_column(c, justify="right")
    rows = [(rep.metrics_of, rep.metrics)] + [(k, v["metrics"]) for k, v in rep.baselines.items()]

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)
    for label, m in rows:
        t.add_row(label, *[f"{m[c]:.3f}" for c in cols + ["invalid_rate"]], num(m.get("latency_ms_p50"), ".0f"),
                  num(m.get("latency_ms_p90"), ".0f"), num(m.get("decode_tps"), ".1f"))
    con.print(t)
    best = rep.best_baseline()
    if best is not None and rep.metrics_of == "adapter":
        gain = (rep.metrics[rep.main_metric] - best[1]) * 100
        con.print(f"adapter vs the best baseline ({best[0]}): {gain:+.1f} points of {rep.main_metric}")
    conf = rep.confusion.get(rep.metrics_of)
    if conf and len(conf) <= 12:
        labels = sorted({p for row in conf.values() for p in row} | set(conf))
        ct = Table(title=f"confusion ({rep.metrics_of}): rows gold, columns predicted")
        ct.add_column("gold")
        for lab in labels:
            ct.add_column(lab[:14], justify="right")
        for g, row in conf.items():
            ct.add_row(g, *[str(row.get(lab, 0) or "") for lab in labels])
        con.print(ct)
    if rep.efficiency:
        e = rep.efficiency
        con.print("memory: " + ", ".join(f"{k} {v}" for k, v in e.items() if v is not None))


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
    update_card: Annotated[bool, typer.Option("--update-card", help="Write the adapter's scores (with the data file's sha256 and n) into its bundle's card.")] = False,
) -> None:
    """Score an adapter on a dev file, with prompting baselines of the base and the majority / copy line."""
    from ..data import load
    from ..engine import Engine
    from ..evaluate import Run, efficiency, evaluate
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
    if update_card and (bundle is None or bundle.folder is None):
        raise InputError("--update-card needs an adapter bundle folder to write to", "pass --adapter NAME or a bundle folder")
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
        rep.efficiency = efficiency(eng, runs[0].adapter)
    finally:
        for e in engines:
            e.close()
    _print_report(rep)   # without an adapter, the first baseline's scores are the report's `metrics`
    if update_card:
        from ..evaluate import card_metrics
        from ..files import sha256_file

        card = bundle.card
        card.metrics["dev"] = card_metrics(rep, data, sha256_file(data))
        card.save(bundle.folder / "adapter.json")
        typer.echo(f"wrote the scores into {bundle.folder / 'adapter.json'}", err=True)
    if json_out:
        d = rep.to_dict()
        write_text_atomic(json_out, json.dumps(_rounded(d), indent=2, ensure_ascii=False) + "\n")
        typer.echo(f"wrote {json_out}", err=True)


def curve(
    data: Annotated[list[str], typer.Option("--data", "-d", help="Training file(s); subsets are drawn from all their rows.")],
    sizes: Annotated[Optional[str], typer.Option("--sizes", help="Training-set sizes (nested seeded subsets).")] = "25,50,100,200,400",
    eval_data: Annotated[Optional[str], typer.Option("--eval", help="Dev file every point is scored on (default: a held-out 20% slice).")] = None,
    task_card: Annotated[Optional[str], typer.Option("--task-card", help="Task card JSON (default: inferred from the data).")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the curve as JSON to PATH.")] = None,
    plot_out: Annotated[Optional[str], typer.Option("--plot", help="Write a PNG of the curve to PATH (needs matplotlib).")] = None,
    base: Base = None,
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank.")] = 16,
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha.")] = 32.0,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 4e-4,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Passes over each subset (default: from its size).")] = None,
    max_len: Annotated[int, typer.Option("--max-len", help="Most tokens per example.")] = 256,
    eval_limit: Annotated[Optional[int], typer.Option("--eval-limit", help="Score a seeded sample of N dev rows.")] = 200,
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", help="Score the base's zero-shot and few-shot prompts once.")] = True,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the subsets, the held-out slice and training.")] = 0,
    ner_map: Annotated[Optional[str], typer.Option("--ner-map", help="NER type map JSON.")] = None,
    threads: Threads = None,
) -> None:
    """Learning curve: train on 25 / 50 / 100 / ... rows and score each against the base's prompts."""
    from rich.console import Console
    from rich.table import Table

    from ..convert.curve import learning_curve, parse_sizes, write_curve
    from ..convert.pipeline import TrainJob
    from ..convert.train import TrainConfig

    if plot_out:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError("--plot needs matplotlib", "pip install 'edgeft[bench]'") from None
    cfg = TrainConfig(rank=rank, alpha=alpha, lr=lr, epochs=epochs, max_len=max_len, seed=seed, threads=threads)
    job = TrainJob(data=data, base=base, card=_read_card(task_card) if task_card else None, eval_data=eval_data,
                   config=cfg, seed=seed, ner_map=ner_map, eval_limit=eval_limit, threads=threads, baselines=baselines)
    say = lambda m: typer.echo(m, err=True)  # noqa: E731
    res, plan = learning_curve(job, parse_sizes(sizes), status=say, progress=_eval_progress())
    t = Table(title=f"{res.task}: {res.main_metric} on {res.dev} (n={res.n_dev})")
    for c in ("training rows", res.main_metric, "train min", "steps"):
        t.add_column(c, justify="right")
    for p in res.points:
        t.add_row(str(p.rows), f"{p.metric:.3f}", f"{p.train_seconds / 60:.1f}", str(p.steps))
    for name, val in res.baselines.items():
        t.add_row(f"base {name}" if name not in ("majority", "copy") else name, f"{val:.3f}", "", "")
    Console().print(t)
    write_curve(res, json_out, plot_out)
    for path in (json_out, plot_out):
        if path:
            typer.echo(f"wrote {path}", err=True)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("eval")(evaluate_cmd)
    app.command("curve")(curve)
