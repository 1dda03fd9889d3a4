"""Fatal signals inside llama.cpp as one clear line.

Validation cannot be complete: llama.cpp may still die on a signal. The CLI installs a handler
that turns that into `error: llama.cpp crashed (...) while <what>` and a hint, with exit code 1,
instead of a bare "Segmentation fault". What is being done is a breadcrumb that `_llama` sets at
each call into llama.cpp that takes user files or values.
"""

from __future__ import annotations

import ctypes
import os

_doing = ["working"]
_SIGNALS = {"SIGSEGV": "a segmentation fault", "SIGABRT": "an abort", "SIGBUS": "a bus error",
            "SIGFPE": "an arithmetic fault", "SIGILL": "an illegal instruction"}
_crash_handlers: list = []


def doing(what: str) -> None:
    """Record what the next llama.cpp calls are about (shown if llama.cpp crashes)."""
    _doing[0] = what


def install_crash_reporter() -> bool:
    """On a fatal signal inside llama.cpp, print `error: llama.cpp crashed ... while <breadcrumb>`
    and a hint, and exit with code 1. For single-threaded commands (run, chat, eval): the handler
    re-enters Python on the crashing thread, which ctypes released the GIL on."""
    import signal

    if _crash_handlers or os.environ.get("EDGEFT_DEBUG"):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    handler_t = ctypes.CFUNCTYPE(None, ctypes.c_int)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, handler_t]

    def on_signal(signum: int) -> None:
        name = next((n for n in _SIGNALS if getattr(signal, n, None) == signum), f"signal {signum}")
        hint = ("llama.cpp was built for another CPU: rebuild it with ./setup.sh --preset cpu" if name == "SIGILL"
                else "the file may be damaged or unsupported: check it with `edgeft doctor` or convert it again; "
                     "EDGEFT_VERBOSE=1 shows llama.cpp's log")
        msg = f"error: llama.cpp crashed ({_SIGNALS.get(name, name)}) while {_doing[0]}\nhint: {hint}\n"
        try:
            os.write(2, msg.encode("utf-8", "replace"))
        finally:
            os._exit(1)

    h = handler_t(on_signal)
    for name in _SIGNALS:
        num = getattr(signal, name, None)
        if num is not None:
            libc.signal(int(num), h)
    _crash_handlers.append(h)   # keep the callback alive
    return True
