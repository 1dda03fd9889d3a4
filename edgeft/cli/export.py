"""`edgeft export --to vllm|lorax|hf OUT_DIR`: the exact base and the adapters for a multi-LoRA server.

The work is `edgeft.convert.export.export` (workstation side: torch, transformers, peft), imported
inside the command so that `edgeft --help` never loads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import AdapterDir, Base, Threads


def export(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write (created; an earlier export is replaced only with --force).")],
    to: Annotated[str, typer.Option("--to", help="Target: vllm (vllm serve --enable-lora), lorax (LoRAX launcher), hf (transformers + PEFT).")] = "vllm",
    adapters: Annotated[Optional[list[str]], typer.Option("--adapter", "-a", "--adapters", help="Adapter to export (repeatable, or a,b): a name or bundle folder, or all (the default).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Base weights dtype: bf16, f16 or f32 (default: f32 for hf, the exact dequantized weights; bf16 for vllm/lorax).")] = None,
    base: Base = None,
    adapter_dir: AdapterDir = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing export in OUT_DIR.")] = False,
    verify: Annotated[int, typer.Option("--verify", help="Compare transformers + PEFT on the export with edgeft on N prompts per adapter (dev set from the card) and report agreement; 0 = off.", min=0)] = 0,
    threads: Threads = None,
    report: Annotated[Optional[Path], typer.Option("--json", help="Also write the verification report (and what was exported) to this JSON file.")] = None,
) -> None:
    """Export the base (dequantized GGUF weights, sha256 recorded) and adapters (PEFT folders + task cards) for vLLM, LoRAX or Hugging Face."""
    from ..convert.export import export as run_export
    from ..convert.export_files import format_verify
    from ..files import write_text_atomic

    res = run_export(out_dir, to=to, adapters=",".join(adapters) if adapters else "all", dtype=dtype, base=base,
                     adapter_dirs=adapter_dir or [], force=force, verify=verify, threads=threads, status=lambda m: typer.echo(m, err=True))
    info = res.info
    typer.echo(f"{res.folder}: {info.target} export of {info.base_id} ({info.dtype}) with "
               f"{len(res.adapters)} adapter(s), max rank {max(a.rank for a in res.adapters)}, {res.seconds:.0f} s")
    typer.echo(f"  start: {res.folder / 'launch.sh'}   requests: {res.folder / 'client.py'}   details: {res.folder / 'README.md'}")
    if report is not None:
        write_text_atomic(report, json.dumps({"folder": str(res.folder), "target": info.target, "base": info.base_id,
                                              "dtype": info.dtype, "adapters": [a.__dict__ | {"folder": str(res.folder / "adapters" / a.folder.name)}
                                                                                for a in res.adapters],
                                              "verify": info.verify}, indent=2, default=str) + "\n")
    if info.verify is not None:
        typer.echo(format_verify(info.verify))
        if not info.verify["ok"]:
            from ..errors import ConversionError

            rate = info.verify["label_identical_rate"]
            raise ConversionError(f"label answers of the export agree with edgeft's on {rate * 100:.1f}% of the prompts, "
                                  f"below the {info.verify['target'] * 100:.0f}% target (the export was written)",
                                  f"see the differences in {report or res.folder / 'edgeft-export.json'}; "
                                  "--dtype f32 removes bf16 rounding")


def register(app: typer.Typer) -> None:
    app.command(name="export")(export)
