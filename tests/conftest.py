"""Shared fixtures: a tiny random llama base written with numpy + gguf (`tiny_base`,
`tiny_engine`: every test that needs *a* model, the fast lane) and the real SmolLM2 base
(`base_path`, `engine`: pulled once per machine into EDGEFT_HOME, for the tests where real
language matters). Random adapters for either come from helpers.write_adapter."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_CTX = 4096


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


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """The tiny base (tests/tiny_gguf.py), written once per session; its id is the file's stem."""
    from tiny_gguf import write_tiny_base

    return write_tiny_base(tmp_path_factory.mktemp("tiny-base") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def tiny_engine(tiny_base):
    """An Engine on the tiny base. One thread: its matrices are so small that a second thread
    costs more in synchronisation than it saves (about 10x slower decode on 2 busy cores)."""
    from edgeft import Engine

    eng = Engine(str(tiny_base), n_ctx=TINY_CTX, n_threads=1)
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
    is the fast lane (the tiny base, pure Python), the full run takes all."""
    for item in items:
        if REAL_BASE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# ggml and llama.cpp read these once per process (GGML_CPU_DISABLE_FUSION when the CPU backend
# starts) and every child process inherits them: a test that leaves one changed silently turns a
# fast path off for the rest of the run
_PROCESS_WIDE = ("GGML_CPU_DISABLE_FUSION", "LLAMA_CPP_LIB_PATH", "EDGEFT_HOME", "EDGEFT_DEBUG")


@pytest.fixture(autouse=True)
def _environment_left_as_found():
    before = {k: os.environ.get(k) for k in _PROCESS_WIDE}
    yield
    after = {k: os.environ.get(k) for k in _PROCESS_WIDE}
    assert after == before, f"the test changed process-wide environment variables: {before} -> {after}"
