"""What a generation hands back: the finished answer (`Generation`), the stream of its pieces
(`Stream`), and the engine's running counters (`Stats`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

@dataclass
class Generation:
    text: str
    finish_reason: str            # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    decode_tps: float
    adapters: dict[str, float]
    reused_prefix: int = 0        # prompt tokens whose K/V were reused
    batch_size: int = 1           # most answers decoded together while this one ran (continuous batching)
    value: Any = None             # parsed answer for task cards (label, JSON, text)


class Stream:
    """Text pieces of a streamed generation; `.result` is its Generation once it has ended
    (for a task answer, with `.value` parsed by the card once the stream is exhausted).

    The engine stays locked while the stream is open: exhaust it, `cancel()` it or `close()` it
    (a `with` block does) so other callers can go on. `cancel()` and `close()` may be called
    from any thread, also while another thread iterates: the answer stops before its next
    token, with finish_reason "cancelled".
    """

    def __init__(self, it: Iterator[str], sink: list, on_end: "Callable[[Generation], None] | None" = None,
                 cancel: threading.Event | None = None):
        self._it = it
        self._sink = sink
        self._on_end = on_end
        self._cancel = cancel if cancel is not None else threading.Event()

    def on_end(self, callback: "Callable[[Generation], None]") -> None:
        """Call `callback(result)` once, when the stream is exhausted (e.g. to parse the value)."""
        self._on_end = callback

    def cancel(self) -> None:
        """Stop the answer before its next token (thread-safe; the iterating thread then ends)."""
        self._cancel.set()

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._it)
        except StopIteration:
            if self._on_end is not None and self._sink:
                on_end, self._on_end = self._on_end, None
                on_end(self._sink[0])
            raise

    def close(self) -> None:
        """Cancel, and release the engine now when no other thread is iterating (else that
        thread releases it at its next token)."""
        self._cancel.set()
        try:
            self._it.close()
        except ValueError:   # "generator already executing": another thread is inside next()
            pass

    @property
    def result(self) -> "Generation | None":
        """The Generation (text so far, counts, timings); None until the prompt has been read."""
        return self._sink[0] if self._sink else None

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Stats:
    swaps: int = 0
    last_swap_ms: float = 0.0
    evictions: int = 0
    mixed_steps: int = 0         # batch steps whose answers used two or more adapter sets
    last: Generation | None = None
    swap_ms: list[float] = field(default_factory=list)
