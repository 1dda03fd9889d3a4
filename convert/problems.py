"""Collecting every problem of an adapter before refusing it, so one run shows all of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from edgeft.errors import ConversionError

MAX_SHOWN = 12


@dataclass(frozen=True)
class Problem:
    what: str   # what is wrong, naming the config key or tensor
    fix: str    # what to do instead

    def __str__(self) -> str:
        return f"{self.what} ({self.fix})"


def _dedupe(problems: Iterable[Problem]) -> list[Problem]:
    seen: dict[str, Problem] = {}
    for p in problems:
        seen.setdefault(p.what, p)
    return list(seen.values())


def refuse(subject: str, problems: Iterable[Problem]) -> None:
    """Raise one ConversionError listing all problems (on one line); do nothing if there are none."""
    probs = _dedupe(problems)
    if not probs:
        return
    shown = probs[:MAX_SHOWN]
    more = f"; and {len(probs) - MAX_SHOWN} more" if len(probs) > MAX_SHOWN else ""
    label = "1 problem" if len(probs) == 1 else f"{len(probs)} problems"
    message = f"cannot convert {subject}: {label}: " + "; ".join(str(p) for p in shown) + more
    hint = probs[0].fix if len(probs) == 1 else "fix each problem listed (what to do is in parentheses), then convert again"
    err = ConversionError(message, hint)
    err.problems = probs  # type: ignore[attr-defined]  # for callers and tests
    raise err
