"""Device profiles (how the runtime is configured for a class of device) and the fixed prompts."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable

from ..errors import InputError

Progress = Callable[[str], None]  # the bench reports each step to it

# Prompts: fixed, so runs on different machines measure the same work.
_PARAGRAPH = (
    "The committee met on Tuesday to review the quarterly results. Revenue grew by eight percent "
    "compared with the same period last year, driven mostly by the new subscription plans, while "
    "operating costs stayed flat. The board asked the finance team to prepare a forecast for the "
    "next two quarters and to explain the drop in hardware sales in the northern region. "
)
_TASK_TEXT = ("Shares of Acme Corp jumped 12% on Monday after the company reported record quarterly "
              "profits and raised its full-year guidance, sending the whole sector higher.")
PENALTY_PROMPT = "Question: what is the capital of France? Answer:"
DECODE_PROMPT = "Count from one to two hundred: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def prompt_set() -> list[tuple[str, list[dict]]]:
    """(label, chat messages): a short question, a task-sized request, a long document."""
    return [
        ("short", [{"role": "user", "content": "What is the capital of France?"}]),
        ("task", [{"role": "system", "content": "Classify the sentiment of the text as positive, negative or neutral. "
                                                "Answer with one word."},
                  {"role": "user", "content": _TASK_TEXT}]),
        ("long", [{"role": "user", "content": "Summarize this report in one sentence.\n\n" + _PARAGRAPH * 3}]),
    ]


# -- profiles -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    """How the runtime is configured for a class of device."""

    name: str
    threads: int | None = None           # None: all cores
    n_ctx: int = 2048
    n_batch: int = 512
    use_mlock: bool = False
    adapter_slots: float | None = None   # adapter memory budget, in multiples of the largest adapter
    ram_budget_mb: float | None = None   # process RAM the one-model-per-task alternative may use
    note: str = ""


PROFILES: dict[str, Profile] = {
    "laptop": Profile("laptop", threads=None, n_ctx=2048, n_batch=512, use_mlock=False,
                      note="all cores, ctx 2048, batch 512, no adapter budget"),
    "phone": Profile("phone", threads=2, n_ctx=1024, n_batch=128, use_mlock=False, adapter_slots=2.5,
                     ram_budget_mb=1024.0,
                     note="2 threads, ctx 1024, batch 128, mlock off, adapter budget = room for two "
                          "adapters (forces LRU evictions), 1 GB RAM for one-model-per-task"),
}


def resolve_profile(name: str = "laptop", *, threads: int | None = None, ctx: int | None = None) -> Profile:
    """A named profile with command-line overrides; an unknown name is a custom laptop-like profile."""
    prof = PROFILES.get(name)
    if prof is None:
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise InputError(f"bad profile name {name!r}", f"use one of {', '.join(PROFILES)} or a plain word")
        prof = replace(PROFILES["laptop"], name=name, note="custom (laptop defaults + flags)")
    if threads is not None:
        if threads < 1:
            raise InputError("--threads must be >= 1")
        prof = replace(prof, threads=threads)
    if ctx is not None:
        if ctx < 256:
            raise InputError("--ctx must be >= 256 for the benchmark prompts")
        prof = replace(prof, n_ctx=ctx, n_batch=min(prof.n_batch, ctx))
    return replace(prof, threads=prof.threads or (os.cpu_count() or 1))
