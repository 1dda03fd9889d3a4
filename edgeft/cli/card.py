"""`edgeft card infer`: the task card that `edgeft train` would infer from the data, for editing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

card_app = typer.Typer(help="Task cards: infer one from your data.", no_args_is_help=True)


@card_app.command("infer")
def infer(
    data: Annotated[list[str], typer.Argument(help="Training file(s), any supported format.")],
    name: Annotated[Optional[str], typer.Option("--name", help="Card name (default: from the data file).")] = None,
    ner_map: Annotated[Optional[str], typer.Option("--ner-map", help="NER type map JSON.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for picking the few-shot examples.")] = 0,
    out: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the card to PATH instead of stdout.")] = None,
) -> None:
    """Print the task card inferred from the data (system prompt, output constraint, few-shot rows)."""
    from ..cardinfer import default_name, infer_task
    from ..data import Dataset, load
    from ..files import write_text_atomic

    sets = [load(p, "auto", ner_map=ner_map) for p in data]
    ds = Dataset(sets[0].path, sets[0].format, [e for d in sets for e in d.examples])
    inf = infer_task(ds.examples, seed=seed)
    for d in sets:
        typer.echo(f"{d.path.name}: {len(d)} rows read as {d.format}" + (f", {len(d.problems)} skipped" if d.problems else ""), err=True)
    for note in inf.notes:
        typer.echo(note, err=True)
    if not name:
        name = default_name(data)
    text = json.dumps(inf.card(name), indent=2, ensure_ascii=False) + "\n"
    if out:
        write_text_atomic(Path(out), text)
        typer.echo(f"wrote {out}", err=True)
    else:
        typer.echo(text, nl=False)


def register(app: typer.Typer) -> None:
    app.add_typer(card_app, name="card")
