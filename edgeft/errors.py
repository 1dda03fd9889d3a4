"""Errors users see: one line saying what went wrong and a hint saying how to fix it.

The CLI prints `error: <message>` and `hint: <hint>` for these and exits 1; anything else is a bug
and shows a traceback only with EDGEFT_DEBUG=1.
"""

from __future__ import annotations


class EdgeftError(Exception):
    """Base class for expected, user-facing failures."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ModelError(EdgeftError):
    """A base model is missing, corrupt, or cannot be loaded."""


class AdapterError(EdgeftError):
    """An adapter bundle is missing, malformed, or does not fit the loaded base."""


class InputError(EdgeftError):
    """A request is empty, malformed, or does not fit the context window."""


class ConversionError(EdgeftError):
    """A PEFT adapter cannot be converted, merged or quantized."""


def shown(value: object, limit: int = 60) -> str:
    """A user's value for an error line: its repr cut to `limit` characters; a value too deep
    or too odd to repr is named by its type."""
    try:
        r = repr(value)
    except (RecursionError, ValueError):
        return f"<{type(value).__name__}>"
    return r if len(r) <= limit else r[: limit - 3] + "..."
