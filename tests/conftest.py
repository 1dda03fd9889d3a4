"""Shared fixtures: the real SmolLM2 base (pulled once per machine into EDGEFT_HOME) and
random adapters written with the `gguf` writer for that base's tensor shapes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def base_path() -> Path:
    from edgeft.models import resolve_base

    return resolve_base("smollm2-135m").path


@pytest.fixture(scope="session")
def engine(base_path):
    from edgeft import Engine

    eng = Engine(str(base_path), n_ctx=1024, n_threads=2)
    yield eng
    eng.close()


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """A fresh EDGEFT_HOME whose models/ links to the real pulled bases (no second download)."""
    from edgeft.paths import bases_dir

    real = bases_dir()
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(real, target_is_directory=True)
    monkeypatch.setenv("EDGEFT_HOME", str(home))
    return home


REAL_BASE_FIXTURES = {"base_path", "engine"}


def pytest_collection_modifyitems(config, items):
    """Every test that loads the real 98 MB base is `slow`, marked or not: `pytest -m "not slow"`
    is the fast lane (tiny models written with numpy/gguf, pure Python), the full run takes all."""
    for item in items:
        if REAL_BASE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
