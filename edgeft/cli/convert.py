"""`edgeft convert` (PEFT folder -> adapter bundle), `edgeft merge`, `edgeft quantize`.

The work lives in `edgeft.convert` (workstation side); everything is imported inside the
commands, so `edgeft --help` never loads numpy's heavy users, let alone torch.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import AdapterDir, Base, Threads

OutType = Annotated[str, typer.Option("--outtype", help="Adapter tensor type: f32 (default, exact), f16 (half the size, decode about as fast with edgeft's llama.cpp patches), bf16 or q8_0.")]
Overwrite = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]


def convert(
    peft_dir: Annotated[Path, typer.Argument(help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors).")],
    base: Base = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Bundle name (default: the task card's name, else the folder's).")] = None,
    task_card: Annotated[Optional[Path], typer.Option("--task-card", help="JSON file with a 'task' section (and optionally name, description, metrics) merged into adapter.json.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Training data of the adapter (any format): infers the task card from it when --task-card is not given.")] = None,
    outtype: OutType = "f32",
    out_dir: Annotated[Optional[Path], typer.Option("--output", "-o", help="Bundle folder to write (default: EDGEFT_HOME/adapters/NAME, where the runtime finds it by name).")] = None,
    force: Overwrite = False,
    verify: Annotated[bool, typer.Option("--verify", help="Compare PEFT (transformers) with llama.cpp on a fixed prompt set and store the report in the card (needs the train extra; ~1 min).")] = False,
    threads: Threads = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Convert a PEFT LoRA adapter into an adapter bundle for a base GGUF (no torch needed)."""
    from ..convert.bundle import convert_adapter

    status = (lambda m: None) if as_json else (lambda m: typer.echo(m, err=True))
    with _card_for(task_card, data, status) as card_path:
        res = convert_adapter(peft_dir, base, name=name, out_dir=out_dir, outtype=outtype, task_card=card_path,
                              force=force, verify=verify, verify_threads=threads, status=status)
    card = res.card
    task = card.task
    if task is None or task.output.type == "text":
        typer.secho("warning: the bundle has " + ("no task card" if task is None else "no output constraint (free text)")
                    + ": answers are unconstrained; pass --task-card, or --data to infer one from the training rows",
                    fg=typer.colors.YELLOW, err=True)
    if as_json:
        typer.echo(json.dumps({"folder": str(res.folder), "name": card.name, "base": card.base, "adapter": card.adapter,
                               "seconds": round(res.seconds, 3), "parity": res.parity}, indent=2))
        if res.parity is not None and not res.parity["ok"]:
            raise typer.Exit(1)
        return
    a = card.adapter
    typer.echo(f"{card.name}: {res.folder}")
    typer.echo(f"  base {card.base['id']} ({card.base['architecture']}), {res.n_pairs} tensors, rank "
               f"{a.get('ranks', a['rank'])}, alpha {a['alpha']:g}, {a['dtype']}, {res.nbytes / 1e6:.1f} MB, "
               f"{res.seconds:.2f} s")
    if res.parity is not None:
        from ..convert.verify import format_report

        typer.echo(format_report(res.parity))
    if res.parity is not None and not res.parity["ok"]:
        from ..errors import ConversionError

        p = res.parity.get("exact", res.parity)
        a, f = p["adapter"], p["floor"]
        where = " on the dequantized base" if "exact" in res.parity else ""
        raise ConversionError(f"parity check failed{where}: top-1 agreement {a['top1'] * 100:.2f}% (mean KL "
                              f"{a['kl_mean']:.2e}) against {f['top1'] * 100:.2f}% ({f['kl_mean']:.2e}) without the "
                              f"adapter; the bundle was written to {res.folder}",
                              "check that --base is the model the adapter was trained on; the report is in adapter.json")
    typer.echo(f'  try it: edgeft run --adapter {card.name if out_dir is None else res.folder} "..."')


@contextlib.contextmanager
def _card_for(task_card: Path | None, data: Path | None, say):
    """The card file to use: the given one, or one inferred from --data in a temp file."""
    if task_card is not None or data is None:
        yield task_card
        return
    from ..cardinfer import infer_task
    from ..data import load

    ds = load(data, "auto")
    inf = infer_task(ds.examples)
    for note in inf.notes:
        say(f"card from {data.name}: {note}")
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "card.json"
        p.write_text(json.dumps({"task": inf.task.to_dict()}, ensure_ascii=False))
        yield p


def merge(
    adapter: Annotated[list[str], typer.Option("--adapter", "-a", help="Adapter NAME[=SCALE] to merge (registered name, bundle folder or .gguf). Repeat to merge several.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Merged model .gguf to write.")],
    base: Base = None,
    quant: Annotated[str, typer.Option("--quant", "-q", help="auto: adapted tensors of 4/5-bit types become q8_0 (a LoRA delta rounds away at 4 bits), the rest is copied; same: adapted tensors keep their type (smallest, loses most of the adapter on a 4-bit base); or a type for the whole model: f16, q8_0, q4_1, q4_k_m, ...")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output; merge adapters made for another base sha256.")] = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Measure the merged model against base + hot adapters.")] = True,
    adapter_dir: AdapterDir = None,
    threads: Threads = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Merge adapters into the base model and write a standalone GGUF."""
    from ..convert.merge import merge_adapters

    bar, close = _byte_progress("merging", quiet=as_json)
    try:
        res = merge_adapters(base, adapter, out, quant=quant, force=force, adapter_dirs=adapter_dir or [],
                             report=report, threads=threads, progress=bar)
    finally:
        close()
    if as_json:
        typer.echo(json.dumps({"path": str(res.path), "bytes": res.bytes, "adapters": res.adapters, "quant": res.quant,
                               "merged_tensors": len(res.merged), "types": res.types, "engine": res.engine,
                               "cost": res.cost, "seconds": round(res.seconds, 2)}, indent=2))
        return
    kinds = sorted(set(res.types.values()))
    typer.echo(f"{res.path}: {res.bytes / 1e6:.1f} MB, {len(res.merged)} tensors merged "
               f"({', '.join(f'{k}={v:g}' for k, v in res.adapters.items())}) as {'/'.join(kinds)}, {res.seconds:.1f} s")
    if res.cost:
        c, e = res.cost["merged_vs_hot"], res.cost["adapter_effect"]
        typer.echo(f"  merged vs base + hot adapters: top-1 {c['top1'] * 100:.2f}%  mean KL {c['kl_mean']:.2e} "
                   f"({c['positions']} positions)")
        typer.echo(f"  (the adapters themselves move top-1 by {100 - e['top1'] * 100:.2f} points, mean KL {e['kl_mean']:.2e})")
        kept = res.cost.get("adapter_kept")
        if kept is not None:
            typer.echo(f"  the merged model reproduces {kept * 100:.0f}% of the adapters' top-1 changes")
            if kept < 0.5:
                typer.echo(f"warning: re-quantizing to {'/'.join(sorted(set(res.types.values())))} rounded most of the "
                           "adapters' change away (it is smaller than the quantization step); merge with --quant q8_0 "
                           "or f16, or keep the adapter hot", err=True)


def quantize(
    src: Annotated[Path, typer.Argument(help="Base model .gguf (f32/f16/bf16 gives the best quality).")],
    qtype: Annotated[str, typer.Option("--type", "-q", help="q8_0, q4_0, q4_1, q5_0, q5_1, f16, bf16, f32 (numpy); q4_k_m, q5_k_m, q6_k, ... (llama.cpp).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Quantized .gguf to write.")],
    force: Overwrite = False,
    threads: Threads = None,
) -> None:
    """Quantize a base model GGUF (metadata and tokenizer are kept as they are)."""
    from ..convert.quantize import quantize_model

    bar, close = _byte_progress("quantizing")
    try:
        res = quantize_model(src, out, qtype, progress=bar, threads=threads, force=force)
    finally:
        close()
    mix = ", ".join(f"{k}: {v}" for k, v in sorted(res.types.items()))
    typer.echo(f"{res.path}: {res.bytes / 1e6:.1f} MB ({res.engine}; tensors {mix})")


def _byte_progress(label: str, quiet: bool = False):
    """A rich progress bar over bytes written: (callback(done, total, name), close)."""
    if quiet:
        return None, lambda: None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(f"{label} " + "{task.fields[tensor]:<28}"), BarColumn(), DownloadColumn(),
                   TimeRemainingColumn(), transient=True)
    task: list[int] = []

    def cb(done: int, total: int, name: str) -> None:
        if not task:
            bar.start()
            task.append(bar.add_task(label, total=total, tensor=""))
        bar.update(task[0], completed=done, tensor=name[:28])

    def close() -> None:
        if task:
            bar.stop()

    return cb, close


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
    app.command("merge")(merge)
    app.command("quantize")(quantize)
