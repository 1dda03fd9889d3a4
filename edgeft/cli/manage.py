"""`edgeft pull`, `edgeft doctor`, `edgeft adapters list|show|rm`."""

from __future__ import annotations

import json
import os
from typing import Annotated, Optional

import typer

from ..errors import EdgeftError
from .common import AdapterDir, progress_printer

adapters_app = typer.Typer(help="List, inspect, register and remove adapter bundles.", no_args_is_help=True)


def pull(
    model: Annotated[Optional[str], typer.Argument(help="Base model id (default: the default base), or hf:OWNER/REPO/FILE.gguf[@REVISION] for any GGUF on the Hugging Face Hub.")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the known base models (shipped manifests and Hub files pulled before).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Fetch again even if present and verified (for hf: files, accept a file that changed on the Hub).")] = False,
    sha256: Annotated[Optional[str], typer.Option("--sha256", help="For hf: files: the sha256 the file must have (e.g. from a bundle's card).")] = None,
) -> None:
    """Download a base model (a manifest in models/bases, or a GGUF on the Hugging Face Hub) and verify its sha256.

    Hub files go through huggingface_hub: its cache, progress bar and resume; HF_ENDPOINT, HF_TOKEN and
    HF_HUB_OFFLINE apply. Their sha256 is recorded in a local manifest (EDGEFT_HOME/bases) so bundles can pin it.
    """
    from ..hub import is_ref
    from ..models import default_base_id, manifests, pull_base, pull_hf

    if list_:
        _list_bases(manifests())
        return
    model = model or default_base_id()
    cb, close = progress_printer()
    try:
        if is_ref(model) or sha256 is not None:
            m = pull_hf(model, sha256=sha256, progress=cb, force=force)
            path, digest, checked = m.path, m.sha256, m.extra.get("sha256_checked_against")
        else:
            path = pull_base(model, progress=cb, force=force)
            m = manifests()[model]
            digest, checked = m.sha256, m.extra.get("sha256_checked_against", "manifest")
    finally:
        close()
    against = {"manifest": "verified against the manifest", "hub-etag": "verified against the Hub's LFS ETag"}
    typer.echo(f"{m.id}: {path}")
    typer.echo(f"  sha256 {digest} ({against.get(checked or '', 'recorded on first pull: no published checksum to verify it against')})")


def _list_bases(table) -> None:
    from ..models import arch_status, is_verified

    for m in table.values():
        if is_verified(m):
            state = "ok"
        elif m.sha256 is None:
            state = "not pulled (sha256 recorded on first pull)"
        else:
            state = "not pulled"
        size = f"{m.size / 1e6:7.1f} MB" if m.size else "      ? MB"
        typer.echo(f"{m.id:16} {size}  {m.architecture:8} {m.license[:12]:12} {state}  {m.name}")
    archs = sorted({m.architecture for m in table.values()})
    typer.echo("adapters per architecture: " + "; ".join(f"{a}: {arch_status(a)}" for a in archs))


def doctor(adapter_dir: AdapterDir = None) -> None:
    """Versions, llama.cpp build features, GPU offload, EDGEFT_HOME, bases and adapters with their state."""
    from .. import __version__, _llama
    from ..gguf_info import base_info, inspect_adapter
    from ..models import ARCH_STATUS, arch_status, is_verified, manifests
    from ..paths import edgeft_home
    from ..registry import available
    from ..bundles import AdapterBundle

    ok = True
    typer.echo(f"edgeft            {__version__}")
    typer.echo(f"llama-cpp-python  {_llama.VERSION}  (API: {', '.join(f'{k}={v}' for k, v in _llama.api_names().items())})")
    typer.echo(f"llama.cpp build   {_llama.system_info()}")
    typer.echo(f"GPU offload       {'yes' if _llama.supports_gpu_offload() else 'no (CPU build)'}")
    typer.echo(f"prompt cache      {_llama.prompt_cache_support()}")
    typer.echo(f"EDGEFT_HOME       {edgeft_home()}")
    typer.echo("bases:")
    infos = {}
    for m in manifests().values():
        good = is_verified(m)
        if good:
            infos[m.id] = base_info(m.path)
        typer.echo(f"  {'ok ' if good else '-- '} {m.id:16} {m.path if good else 'not pulled: edgeft pull ' + m.id}"
                   f"  [{m.architecture}: {arch_status(m.architecture, short=True)}]")
    typer.echo("architectures (what the adapter path - convert, train, export - was checked on):")
    for arch in ARCH_STATUS:
        typer.echo(f"  {arch:8} {arch_status(arch)}")
    typer.echo(f"  {'other':8} {arch_status(None)}")
    typer.echo("adapters:")
    for name, folder in available(adapter_dir or []).items():
        try:
            b = AdapterBundle.load(folder)
            base_id = b.card.base.get("id")
            info = inspect_adapter(b.gguf_path, infos.get(base_id))
            ranks = ",".join(str(r) for r in sorted(info.ranks))
            typer.echo(f"  ok  {name:16} base {base_id or '?'}, rank {ranks}, {len(info.pairs)} tensors, {info.nbytes / 1e6:.1f} MB  {folder}")
        except EdgeftError as e:
            ok = False
            typer.echo(f"  BAD {name:16} {e.message}")
    if not ok:
        raise typer.Exit(1)


@adapters_app.command("list")
def adapters_list(adapter_dir: AdapterDir = None,
                  as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Adapters found by name, in search order."""
    from ..bundles import AdapterBundle
    from ..registry import available

    rows = []
    for name, folder in available(adapter_dir or []).items():
        try:
            card = AdapterBundle.load(folder).card
            rows.append({"name": name, "path": str(folder), "base": card.base.get("id"),
                         "rank": card.adapter.get("rank"), "description": card.description})
        except EdgeftError as e:
            rows.append({"name": name, "path": str(folder), "error": e.message})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no adapters found")
    for r in rows:
        detail = r.get("error") or f"base {r['base']}, rank {r['rank']}: {r['description']}"
        typer.echo(f"{r['name']:16} {detail}  [{r['path']}]")


@adapters_app.command("show")
def adapters_show(name: str, adapter_dir: AdapterDir = None) -> None:
    """Print an adapter's task card and tensor summary."""
    from ..gguf_info import inspect_adapter
    from ..registry import find

    b = find(name, adapter_dir or [])
    info = inspect_adapter(b.gguf_path)
    d = b.card.to_dict()
    d["_file"] = {"path": str(b.gguf_path), "bytes": os.path.getsize(b.gguf_path), "tensor_pairs": len(info.pairs),
                  "ranks": sorted(info.ranks), "alpha": info.alpha, "architecture": info.architecture}
    typer.echo(json.dumps(d, indent=2, ensure_ascii=False))


@adapters_app.command("add")
def adapters_add(
    path: Annotated[str, typer.Argument(help="Bundle folder (adapter.json + adapter.gguf), e.g. from `edgeft train -o`.")],
    name: Annotated[Optional[str], typer.Option("--name", help="Register under this name (default: the card's).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an adapter registered under the same name.")] = False,
) -> None:
    """Copy a bundle into the registry (EDGEFT_HOME/adapters), checked against its base, so it is found by name."""
    from ..registry import add

    b = add(path, name=name, force=force)
    typer.echo(f"registered '{b.name}' ({b.folder}); try: edgeft run --adapter {b.name} \"...\"")


@adapters_app.command("rm")
def adapters_rm(name: str) -> None:
    """Remove a user-installed adapter bundle from EDGEFT_HOME/adapters."""
    from ..registry import remove

    typer.echo(f"removed {remove(name)}")


def register(app: typer.Typer) -> None:
    app.command(name="pull")(pull)
    app.command(name="doctor")(doctor)
    app.add_typer(adapters_app, name="adapters")
