"""Bases from the Hugging Face Hub: `edgeft pull hf:OWNER/REPO/FILE.gguf[@REVISION]`.

The download itself is huggingface_hub's (`hf_hub_download`): its cache (HF_HOME / HF_HUB_CACHE),
its progress bar, its resume of a transfer cut mid-way (Range requests), HF_ENDPOINT and
HF_HUB_OFFLINE. edgeft adds what a bundle needs to pin a base: the file's sha256, checked
against the manifest's when it has one, else against the Hub's own LFS ETag (the sha256 of an LFS
file), and recorded in a local manifest (`models.record_pull`) so that later runs verify it.

huggingface_hub is imported only here, and only when a pull needs the network or the cache.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from .errors import ModelError
from .files import sha256_file

log = logging.getLogger(__name__)

PREFIX = "hf:"
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REF_RE = re.compile(rf"^{PREFIX}(?P<repo>{_PART}/{_PART})/(?P<file>[^@]+?\.gguf)(?:@(?P<rev>[A-Za-z0-9._/-]{{1,128}}))?$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_HINT_REF = "write it as hf:OWNER/REPO/FILE.gguf, optionally @REVISION (branch, tag or commit)"


class HfRef(NamedTuple):
    """A GGUF file on the Hugging Face Hub, as `hf:OWNER/REPO/FILE.gguf[@REVISION]` names it."""

    repo: str
    file: str
    revision: str | None = None

    @property
    def id(self) -> str:
        """The name a pulled file is known by (`edgeft pull --list`, `--base`)."""
        return f"{PREFIX}{self.repo}/{self.file}" + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class Pulled:
    path: Path           # inside the Hugging Face cache (a snapshot link to the blob)
    sha256: str
    size: int
    commit: str | None   # the repository commit the file came from
    checked: str | None  # what the sha256 was checked against: "manifest", "hub-etag" or None


def is_ref(name: object) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def parse_ref(ref: str) -> HfRef:
    """"hf:OWNER/REPO/path/in/repo.gguf[@REV]" -> HfRef; anything else is one clear error."""
    m = _REF_RE.match(ref.strip()) if isinstance(ref, str) else None
    if m is None:
        raise ModelError(f"'{ref}' is not a Hugging Face GGUF reference", _HINT_REF)
    file = m["file"]
    parts = file.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\\" in file or "\x00" in file:
        raise ModelError(f"'{ref}': the file path inside the repository is not valid", _HINT_REF)
    return HfRef(m["repo"], file, m["rev"])


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise ModelError("pulling from the Hugging Face Hub needs the huggingface_hub package",
                         "pip install 'edgeft[hub]' (or pip install huggingface_hub)") from None
    return huggingface_hub


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "")).strip().upper() in (
        "1", "ON", "YES", "TRUE")


def _endpoint() -> str | None:
    """HF_ENDPOINT read now, not when huggingface_hub was imported (so a mirror set later counts)."""
    return (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None


def _cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    return None   # huggingface_hub's default (~/.cache/huggingface/hub)


def _is_network(e: BaseException) -> bool:
    """Connection refused, DNS, timeouts, a cut transfer: from httpx/requests/urllib3 or the OS."""
    mod = type(e).__module__.split(".")[0]
    return mod in ("httpx", "httpx2", "httpcore", "requests", "urllib3") or isinstance(e, (ConnectionError, TimeoutError))


def _explain(e: BaseException, ref: HfRef, where: str) -> ModelError:
    """huggingface_hub's exceptions -> one line with a hint (the common cases by class name, so
    that versions that moved or renamed a class still get a message)."""
    names = {c.__name__ for c in type(e).__mro__}
    at = f"{ref.repo} ({where})"
    if "GatedRepoError" in names:
        return ModelError(f"{at} is gated: its licence must be accepted on the Hub first",
                          "accept it on the model's page, then set HF_TOKEN to a token of that account")
    if "RepositoryNotFoundError" in names:
        return ModelError(f"repository {at} does not exist or is private",
                          "check OWNER/REPO; for a private repository set HF_TOKEN")
    if "RevisionNotFoundError" in names:
        return ModelError(f"{at} has no revision '{ref.revision}'", "name an existing branch, tag or commit")
    if "EntryNotFoundError" in names and "LocalEntryNotFoundError" not in names:
        return ModelError(f"{at} has no file '{ref.file}'", "check the file name on the repository's Files page")
    if "OfflineModeIsEnabled" in names or "LocalEntryNotFoundError" in names:
        return ModelError(f"{ref.id} is not in the Hugging Face cache and the Hub cannot be used ({type(e).__name__})",
                          "unset HF_HUB_OFFLINE and check the network, or pull it once while online")
    if "HfHubHTTPError" in names:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        return ModelError(f"{at} answered HTTP {status}", "try again later; with HF_ENDPOINT set, check that it is a Hub mirror")
    if _is_network(e) or isinstance(e, OSError):
        return ModelError(f"cannot download {ref.id} from {where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                          "check the network (or HF_ENDPOINT); a file already pulled works offline with HF_HUB_OFFLINE=1")
    return ModelError(f"cannot download {ref.id}: {type(e).__name__}: {e}", "run the pull again; EDGEFT_DEBUG=1 shows more")


def _commit_of(path: str) -> str | None:
    """The commit folder a cached file sits in (…/snapshots/<commit>/<file>)."""
    parts = Path(path).parts
    for i, p in enumerate(parts[:-1]):
        if p == "snapshots" and i + 1 < len(parts) and _COMMIT_RE.match(parts[i + 1]):
            return parts[i + 1]
    return None


def _from_cache(hub, ref: HfRef, cache_dir: str | None) -> str | None:
    with contextlib.suppress(Exception):
        return hub.hf_hub_download(ref.repo, ref.file, revision=ref.revision, cache_dir=cache_dir, local_files_only=True)
    return None


def _fetch(hub, ref: HfRef, cache_dir: str | None, force: bool) -> tuple[str, str | None]:
    """(cached path, Hub ETag or None): metadata first (it fails fast, without retries, so no
    network is one line within seconds), then huggingface_hub's download, which keeps the cache's
    refs (a later offline pull finds the file by branch name)."""
    endpoint = _endpoint()
    where = endpoint or "huggingface.co"
    if _offline():
        path = _from_cache(hub, ref, cache_dir)
        if path is None:
            raise ModelError(f"{ref.id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set",
                             "unset HF_HUB_OFFLINE to download it")
        return path, None
    url = hub.hf_hub_url(ref.repo, ref.file, revision=ref.revision, endpoint=endpoint)
    fast = {"retry_on_errors": False} if "retry_on_errors" in inspect.signature(hub.get_hf_file_metadata).parameters else {}
    try:
        meta = hub.get_hf_file_metadata(url, **fast)
    except Exception as e:  # noqa: BLE001  (classified below; unknown kinds still become one line)
        if _is_network(e) and not force and (path := _from_cache(hub, ref, cache_dir)) is not None:
            log.warning("cannot reach %s (%s); using the copy in the Hugging Face cache", where, type(e).__name__)
            return path, None
        raise _explain(e, ref, where) from e
    try:
        path = hub.hf_hub_download(ref.repo, ref.file, revision=ref.revision, endpoint=endpoint,
                                   cache_dir=cache_dir, force_download=force)
    except Exception as e:  # noqa: BLE001
        raise _explain(e, ref, where) from e
    return path, meta.etag


def _forget(path: str) -> None:
    """Drop a cached file that failed its checksum (snapshot link and blob), so the next pull fetches it anew."""
    p = Path(path)
    with contextlib.suppress(OSError):
        blob = p.resolve()
        p.unlink()
        if blob != p:
            blob.unlink()


def download(ref: HfRef | str, *, expected_sha256: str | None = None, force: bool = False,
             progress: Callable[[int], None] | None = None) -> Pulled:
    """Fetch a GGUF through huggingface_hub and check its sha256 (against `expected_sha256`, else
    the Hub's LFS ETag when it is one). A mismatch removes the cached copy and raises."""
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    if expected_sha256 is not None and not _SHA256_RE.match(expected_sha256):
        raise ModelError(f"expected sha256 {expected_sha256!r} is not 64 lower-case hex digits", "copy it exactly")
    hub = _hub()
    path, etag = _fetch(hub, ref, _cache_dir(), force)
    digest = sha256_file(path, progress)
    want, checked = expected_sha256, "manifest" if expected_sha256 else None
    if want is None and etag and _SHA256_RE.match(etag):
        want, checked = etag, "hub-etag"
    if want is not None and digest != want:
        _forget(path)
        source = "the manifest" if checked == "manifest" else "the Hub's ETag"
        raise ModelError(f"{ref.id}: sha256 mismatch ({digest[:12]}... != {want[:12]}... from {source})",
                         "the download is corrupt or the file changed on the Hub; run `edgeft pull` again, "
                         "or fix the sha256 you pinned")
    return Pulled(Path(path), digest, Path(path).stat().st_size, _commit_of(path), checked)
