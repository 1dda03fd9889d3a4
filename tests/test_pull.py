"""`edgeft pull hf:OWNER/REPO/FILE.gguf`: the real huggingface_hub download code against a local
HTTP server in the Hub's URL layout (`/{repo}/resolve/{revision}/{file}`, HEAD metadata with
X-Repo-Commit / ETag / Content-Length, Range requests), on loopback only.

What must hold: a pull records the file's sha256 (checked against the Hub's LFS ETag) in a local
manifest that later runs verify; a transfer cut halfway resumes with a Range request; a missing
file, a wrong checksum and no network are each one clear error, and leave nothing recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("huggingface_hub")

from edgeft.errors import ModelError  # noqa: E402
from edgeft.hub import parse_ref  # noqa: E402
from edgeft.models import is_verified, manifests, pull_base, pull_hf, resolve_base  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REF = "hf:acme/tiny-GGUF/tiny.gguf"


def tiny_gguf(path: Path, rows: int = 256) -> bytes:
    """A small but real GGUF (llama architecture, one tensor of rows x 256 f32) that the header reader accepts."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.random.default_rng(rows).standard_normal((rows, 256), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


class FakeHub:
    """The part of the Hub's HTTP API that hf_hub_download uses, with knobs for failures."""

    def __init__(self, files: dict[tuple[str, str], bytes]):
        self.files = files
        self.requests: list[tuple[str, str, str | None]] = []
        self.cut_next_get = False        # send half of the body, then drop the connection
        self.etag: dict[str, str] = {}   # file -> ETag to announce instead of its sha256
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
                parts = urllib.parse.unquote(self.path.split("?")[0]).lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "RepoNotFound")
                repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                if not any(r == repo for r, _ in hub.files):
                    return self._error(404, "RepoNotFound")
                data = hub.files.get((repo, name))
                if data is None:
                    return self._error(404, "EntryNotFound")
                start = 0
                rng = self.headers.get("Range")
                if body and rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hub.etag.get(name) or hashlib.sha256(data).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                if hub.cut_next_get and not start:
                    hub.cut_next_get = False
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def _error(self, code: int, kind: str):
                self.send_response(code)
                self.send_header("X-Error-Code", kind)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def gets(self) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Loopback Hub + private HF cache, EDGEFT_HOME and manifest folder."""
    data = tiny_gguf(tmp_path / "tiny.gguf")
    hub = FakeHub({("acme/tiny-GGUF", "tiny.gguf"): data, ("acme/tiny-GGUF", "sub/other.gguf"): data})
    models = tmp_path / "models"
    (models / "bases").mkdir(parents=True)
    for k, v in {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "EDGEFT_HOME": str(tmp_path / "home"),
                 "EDGEFT_MODELS_DIR": str(models), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE", "EDGEFT_BASE"):
        monkeypatch.delenv(k, raising=False)
    yield hub, data, tmp_path
    hub.close()


def _ship(tmp_path: Path, mid: str, **over) -> None:
    m = {"id": mid, "file": "tiny.gguf", "size": None, "sha256": None, "license": "MIT", "architecture": "llama",
         "source": {"type": "hf", "repo": "acme/tiny-GGUF", "file": "tiny.gguf"}, **over}
    (tmp_path / "models" / "bases" / f"{mid}.json").write_text(json.dumps(m))


def _cli(*args: str, timeout: int = 90) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "EDGEFT_DEBUG"}
    return subprocess.run([sys.executable, "-m", "edgeft", *args], capture_output=True, text=True, env=e,
                          timeout=timeout, cwd=REPO)


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert lines and lines[0].startswith("error: ") and len(lines) <= 2, r.stderr
    assert all(ln.startswith(("error: ", "hint: ")) for ln in lines) and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def _records(tmp_path: Path) -> list[Path]:
    d = tmp_path / "home" / "bases"
    return sorted(d.glob("*.json")) if d.is_dir() else []


def test_pull_records_sha256_and_later_runs_verify_it(env):
    hub, data, tmp = env
    m = pull_hf(REF)
    sha = hashlib.sha256(data).hexdigest()
    assert m.sha256 == sha and m.size == len(data) and m.architecture == "llama"
    assert m.path.read_bytes() == data
    # it lies in the Hugging Face cache layout, under HF_HOME, at the commit the Hub named
    assert str(m.path).startswith(str(tmp / "hf" / "hub")) and f"snapshots/{COMMIT}/tiny.gguf" in str(m.path)
    assert m.extra["sha256_checked_against"] == "hub-etag" and m.source["revision"] == COMMIT
    assert [r[0] for r in hub.requests][-1] == "GET"
    rec = json.loads(_records(tmp)[0].read_text())
    assert rec["id"] == REF and rec["sha256"] == sha and rec["path"] == str(m.path)
    # later runs find it by name, verified, without touching the network
    n = len(hub.requests)
    assert is_verified(manifests()[REF])
    assert resolve_base(REF, pull=False).path == m.path and resolve_base(REF).sha256 == sha
    assert len(hub.requests) == n
    # a file changed behind edgeft's back is not verified any more
    blob = m.path.resolve()
    blob.chmod(0o644)
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert not is_verified(manifests()[REF])


def test_cli_pull_then_list(env):
    hub, data, tmp = env
    r = _cli("pull", "hf:acme/tiny-GGUF/sub/other.gguf")
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(data).hexdigest() in r.stdout and "verified against the Hub's LFS ETag" in r.stdout
    r = _cli("pull", "--list")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("hf:acme/tiny-GGUF/sub/other.gguf"))
    assert " ok " in line and "llama" in line


def test_transfer_cut_halfway_resumes_with_a_range_request(env):
    """huggingface_hub writes the body in 10 MiB chunks and resumes after the last whole one, so the
    file must be larger than a chunk for the resume to show: 24 MB, cut after 12 MB."""
    hub, _, tmp = env
    big = tiny_gguf(tmp / "big.gguf", rows=24 * 1024)
    hub.files[("acme/tiny-GGUF", "big.gguf")] = big
    hub.cut_next_get = True
    m = pull_hf("hf:acme/tiny-GGUF/big.gguf")
    assert m.path.read_bytes() == big and m.sha256 == hashlib.sha256(big).hexdigest()
    gets = hub.gets()
    assert len(gets) == 2 and gets[0][2] is None
    start = int(gets[1][2].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= len(big) // 2            # only what was missing was fetched again


def test_missing_file_and_repo_are_one_line_errors(env):
    hub, _, tmp = env
    with pytest.raises(ModelError, match="has no file 'nope.gguf'"):
        pull_hf("hf:acme/tiny-GGUF/nope.gguf")
    with pytest.raises(ModelError, match="does not exist or is private"):
        pull_hf("hf:nobody/missing/x.gguf")
    r = _cli("pull", "hf:acme/tiny-GGUF/nope.gguf")
    _one_line_error(r, "has no file 'nope.gguf'", "hint: ")
    assert _records(tmp) == []


@pytest.mark.parametrize("bad", ["hf:foo", "hf:acme/tiny-GGUF/x.bin", "hf:acme/tiny-GGUF/../x.gguf",
                                 "hf:a/b/c.gguf@", "hf:-a/b/c.gguf"])
def test_malformed_references(bad):
    with pytest.raises(ModelError, match="not"):
        parse_ref(bad)


def test_wrong_checksum_refuses_and_leaves_nothing(env):
    hub, data, tmp = env
    # 1. a sha256 pinned by the user (a bundle's card)
    with pytest.raises(ModelError, match="sha256 mismatch .* from the manifest"):
        pull_hf(REF, sha256="0" * 64)
    blobs = tmp / "hf" / "hub" / "models--acme--tiny-GGUF" / "blobs"
    assert not any(blobs.iterdir()) and _records(tmp) == []   # the bad copy is gone from the cache too
    # 2. a shipped manifest's sha256
    _ship(tmp, "tiny", sha256="1" * 64)
    with pytest.raises(ModelError, match="sha256 mismatch"):
        pull_base("tiny")
    assert _records(tmp) == [] and not is_verified(manifests()["tiny"])
    # 3. the bytes differ from what the Hub says they are (a corrupt transfer)
    hub.etag["tiny.gguf"] = "2" * 64
    r = _cli("pull", REF)
    _one_line_error(r, "sha256 mismatch", "the Hub's ETag")
    assert _records(tmp) == []


def test_manifest_without_sha256_records_it_on_first_pull(env):
    _, data, tmp = env
    _ship(tmp, "tiny")
    assert not is_verified(manifests()["tiny"])
    path = resolve_base("tiny").path            # pulls, checks against the Hub's ETag, records
    m = manifests()["tiny"]
    assert path.read_bytes() == data and m.sha256 == hashlib.sha256(data).hexdigest() and is_verified(m)
    assert m.license == "MIT" and m.source["revision"] == COMMIT


def test_no_network_and_offline_are_one_line_errors(env, monkeypatch):
    hub, data, tmp = env
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()                                   # nothing listens there: connection refused
    monkeypatch.setenv("HF_ENDPOINT", dead)
    t0 = time.monotonic()
    with pytest.raises(ModelError, match="cannot download") as e:
        pull_hf(REF)
    assert time.monotonic() - t0 < 20 and "HF_HUB_OFFLINE" in (e.value.hint or "")
    _one_line_error(_cli("pull", REF), "cannot download", "check the network")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        pull_hf(REF)
    assert _records(tmp) == []
    # once pulled, the file is found offline (and with the network down) without any request
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    first = pull_hf(REF)
    n = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pull_hf(REF, force=True).path == first.path
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", dead)
    assert pull_hf(REF).sha256 == first.sha256 and len(hub.requests) == n


def test_shipped_manifests_name_hub_files():
    """Every shipped manifest loads; Hub ones name a repository and a GGUF in it; ids are unique."""
    from edgeft.models import ARCH_STATUS, _manifest

    files = sorted((REPO / "models" / "bases").glob("*.json"))
    ids = set()
    hf = 0
    for f in files:
        m = _manifest(json.loads(f.read_text()), f)
        assert m.id not in ids and f.stem == m.id
        ids.add(m.id)
        if m.source["type"] == "hf":
            hf += 1
            assert m.source["file"].endswith(".gguf") and m.source["repo"].count("/") == 1 and m.file == m.source["file"]
            parse_ref(f"hf:{m.source['repo']}/{m.source['file']}")
    assert hf >= 7 and {"smollm2-360m", "smollm2-1.7b", "qwen2.5-0.5b", "qwen2.5-1.5b", "llama3.2-1b", "gemma3-1b",
                        "phi3.5-mini"} <= ids
    assert "llama" in ARCH_STATUS and ARCH_STATUS["llama"][0].startswith("verified")
