"""Learning curves: how the main metric grows with the number of training rows, next to the
base's zero-shot / few-shot prompts and the majority (or copy) line. This is how a user decides
whether 50 rows are enough or 500 are needed.

Subsets are nested (the first k rows of one seeded shuffle), so a bigger point only adds rows.
Every point is trained as `edgeft train` would (same card, same automatic epochs, the best
checkpoint by loss on the same validation rows) and scored on the same dev rows.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from edgeft.errors import InputError
from edgeft.files import atomic_path, write_text_atomic
from edgeft.models import resolve_base

from .pipeline import Plan, TrainJob, prepare

log = logging.getLogger(__name__)

DEFAULT_SIZES = (25, 50, 100, 200, 400)


@dataclass
class CurvePoint:
    rows: int
    metric: float
    metrics: dict
    train_seconds: float
    steps: int
    best_step: int | None


@dataclass
class Curve:
    task: str
    main_metric: str
    dev: str
    n_dev: int
    points: list[CurvePoint] = field(default_factory=list)
    baselines: dict[str, float] = field(default_factory=dict)   # name -> main metric
    skipped: list[int] = field(default_factory=list)             # sizes larger than the data

    def to_dict(self) -> dict:
        return {"task": self.task, "main_metric": self.main_metric, "dev": self.dev, "n_dev": self.n_dev,
                "points": [{"rows": p.rows, self.main_metric: round(p.metric, 4), "train_seconds": round(p.train_seconds, 1),
                            "steps": p.steps, "best_step": p.best_step,
                            "metrics": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in p.metrics.items()
                                        if k not in ("per_class", "per_type")}} for p in self.points],
                "baselines": {k: round(v, 4) for k, v in self.baselines.items()}, "skipped_sizes": self.skipped}


def parse_sizes(spec: str | Sequence[int] | None) -> list[int]:
    if spec is None:
        return list(DEFAULT_SIZES)
    try:
        sizes = sorted({int(x) for x in (spec.split(",") if isinstance(spec, str) else spec) if str(x).strip()})
    except ValueError:
        raise InputError(f"bad --sizes {spec!r}", "give row counts like 25,50,100") from None
    if not sizes or sizes[0] < 4:
        raise InputError("each size must be at least 4 rows", "give row counts like 25,50,100")
    return sizes


def learning_curve(job: TrainJob, sizes: Sequence[int], *, status: Callable[[str], None] | None = None,
                   progress=None) -> tuple[Curve, Plan]:
    """Train one adapter per size on nested subsets and score each (see the module docstring)."""
    from edgeft.engine import Engine
    from edgeft.evaluate import Run, evaluate

    from . import train as T
    from .bundle import convert_adapter

    say = status or (lambda m: log.info("%s", m))
    job = copy.copy(job)
    job.force = True            # the curve writes no bundle at job.out
    plan = prepare(job, say)
    if plan.dev is None:
        raise InputError("a learning curve needs rows to score on", "pass --eval DEV_FILE, or give at least 25 rows")
    order = list(plan.train)
    random.Random(job.seed).shuffle(order)
    usable = [k for k in sizes if k <= len(order)]
    skipped = [k for k in sizes if k > len(order)]
    if skipped:
        say(f"sizes {', '.join(map(str, skipped))} skipped: only {len(order)} training rows")
    if not usable:
        raise InputError(f"every size is larger than the {len(order)} training rows", "give smaller --sizes")
    base = resolve_base(job.base)
    say("loading the base with transformers (once for every point)...")
    model, tok = T.load_base(base.path)
    curve = Curve(plan.name, "", plan.dev_source, len(plan.dev))
    with tempfile.TemporaryDirectory(prefix="edgeft-curve-") as tmp, \
            Engine(str(base.path), n_ctx=2048, n_threads=job.threads) as eng:
        runs = [Run("zero-shot", eng, None, 0)] if job.baselines else []
        if job.baselines and job.shots and plan.task.few_shot:
            runs.append(Run("few-shot", eng, None, job.shots))
        rep = evaluate(plan.name, plan.task, plan.dev, runs or [Run("zero-shot", eng, None, 0)], progress=progress)
        curve.main_metric = rep.main_metric
        curve.baselines = {rep.metrics_of: rep.metrics[rep.main_metric],
                           **{k: v["metrics"][rep.main_metric] for k, v in rep.baselines.items()}}
        for k in usable:
            say(f"-- {k} rows")
            def step_line(p, k=k):
                if p.step == p.total or p.step % max(1, p.total // 4) == 0:
                    say(f"   {k} rows: step {p.step}/{p.total}, loss {p.loss:.4f}, ETA {p.eta_s / 60:.1f} min")
            res = T.train_lora(base.path, plan.task, order[:k], Path(tmp) / f"peft-{k}", job.config, status=say,
                               progress=step_line,
                               model_and_tokenizer=(copy.deepcopy(model), tok), val_examples=plan.validation,
                               base_id=base.id)
            conv = convert_adapter(Path(tmp) / f"peft-{k}", base.id if base.manifest else str(base.path),
                                   name=f"{plan.name}-{k}", out_dir=Path(tmp) / f"bundle-{k}", outtype=job.outtype,
                                   status=lambda m: None)
            name = eng.load_adapter(str(conv.folder))
            r = evaluate(plan.name, plan.task, plan.dev, [Run("adapter", eng, name)], progress=progress, trivial=False)
            eng.unload_adapter(name)
            curve.points.append(CurvePoint(k, r.metrics[r.main_metric], r.metrics, res.seconds, res.steps, res.best_step))
            say(f"   {k} rows: {r.main_metric} {r.metrics[r.main_metric]:.3f} ({res.seconds / 60:.1f} min)")
    return curve, plan


def write_curve(curve: Curve, json_out: str | Path | None = None, png_out: str | Path | None = None) -> None:
    if json_out:
        write_text_atomic(json_out, json.dumps(curve.to_dict(), indent=2) + "\n")
    if png_out:
        plot_curve(curve, png_out)


def plot_curve(curve: Curve, path: str | Path) -> None:
    """The curve on a log-2 row axis, baselines as horizontal lines (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib", "pip install 'edgeft[bench]'") from None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    xs = [p.rows for p in curve.points]
    ys = [p.metric for p in curve.points]
    ax.plot(xs, ys, marker="o", color="#1f77b4", label="adapter")
    for (x, y) in zip(xs, ys):
        ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    styles = {"zero-shot": ("#d62728", "--"), "few-shot": ("#ff7f0e", "-."), "majority": ("#7f7f7f", ":"),
              "copy": ("#7f7f7f", ":")}
    for name, val in curve.baselines.items():
        color, ls = styles.get(name, ("#2ca02c", "--"))
        ax.axhline(val, color=color, linestyle=ls, linewidth=1.2, label=f"base {name}" if name not in ("majority", "copy") else name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("training rows")
    ax.set_ylabel(curve.main_metric)
    ax.set_title(f"{curve.task}: {curve.main_metric} vs training rows (dev n={curve.n_dev})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
