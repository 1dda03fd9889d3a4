"""edgeft: one quantized base model in memory, many LoRA task adapters hot-swapped on it.

    from edgeft import Engine
    with Engine() as eng:                      # default base, pulled on first use
        eng.use("sentiment")
        print(eng.run("Shares of Acme jumped 12%").value)

The device-side runtime imports llama-cpp-python, gguf and numpy only (never torch).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Engine", "AsyncEngine", "Generation", "Stream", "AdapterBundle", "TaskCard", "TaskSpec", "OutputSpec",
           "EdgeftError", "ModelError", "AdapterError", "InputError", "ConversionError", "__version__"]

from .errors import AdapterError, ConversionError, EdgeftError, InputError, ModelError


def __getattr__(name: str):
    # Engine pulls in llama_cpp (a shared library): load it only when asked for.
    if name in ("Engine", "Generation", "Stream"):
        from . import engine

        return getattr(engine, name)
    if name == "AsyncEngine":
        from .aio import AsyncEngine

        return AsyncEngine
    if name in ("AdapterBundle", "TaskCard"):
        from . import bundles

        return getattr(bundles, name)
    if name in ("TaskSpec", "OutputSpec"):
        from . import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module 'edgeft' has no attribute {name!r}")
