"""The prompt cache phase: TTFT of task requests when the adapter changes between requests,
with the per-adapter-set prompt cache off and on, against the same adapter repeated.

Requests look like task-card requests: one fixed system prompt (the task's prefix) and a short,
different user input each time. "same" runs them all under the first adapter; "alternating"
switches between the first and second adapter on every request, so every request follows a swap.
The four configurations are interleaved per round, so drift and other load hit them alike.
"""

from __future__ import annotations

from typing import Any

from ..prompt_cache import PromptCache
from .stats import _med, _ratio, dist

SYSTEM = ("You sort customer messages for a small online shop. Read the message and answer with one "
          "label: billing, delivery, returns, product question or other. Answer with the label only.")
INPUTS = [
    "My parcel has not arrived yet and it has been two weeks.",
    "Can I send back the shoes if they do not fit?",
    "I was charged twice for the same order.",
    "Does this kettle work with 110 volts?",
    "Where is my order? The tracking page shows nothing.",
    "How do I get a refund for the broken lamp?",
    "Your website keeps logging me out.",
    "Is the blue jacket also available in size M?",
]
CACHE_MB = 32.0


def prompt_cache_phase(eng: Any, a_sel: dict, b_sel: dict, rounds: int, say) -> dict:
    """{config: TTFT distribution and mean reused prompt tokens}, plus the two ratios the targets use.

    The engine's own cache is swapped out for the phase and put back after it."""
    saved = eng.prompt_cache
    ttft: dict[str, list[float]] = {}
    reused: dict[str, list[int]] = {}
    prompt_tokens = None
    try:
        for r in range(rounds):
            say(f"prompt cache, round {r + 1}/{rounds}")
            for cache_mb in (0.0, CACHE_MB):
                for mode in ("same", "alternating"):
                    eng.prompt_cache = PromptCache(cache_mb)
                    key = f"{mode}_cache_{'on' if cache_mb else 'off'}"
                    for i, text in enumerate(INPUTS):
                        sel = b_sel if mode == "alternating" and i % 2 else a_sel
                        g = eng.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                                     adapter=sel, max_tokens=1, temperature=0.0)
                        prompt_tokens = g.prompt_tokens
                        if i >= 2:   # the first request of each set fills the cache (or the KV)
                            ttft.setdefault(key, []).append(g.ttft_ms)
                            reused.setdefault(key, []).append(g.reused_prefix)
    finally:
        eng.prompt_cache = saved
        eng.reset()
    out: dict[str, Any] = {"system_prompt_chars": len(SYSTEM), "prompt_tokens": prompt_tokens,
                           "rounds": rounds, "cache_mb": CACHE_MB}
    for key in ttft:
        out[key] = {"ttft_ms": dist(ttft[key]), "reused_tokens_mean": sum(reused[key]) / len(reused[key])}
    p50 = {k: _med(v) for k, v in ttft.items()}
    out["alternating_over_same_cache_on"] = _ratio(p50.get("alternating_cache_on"), p50.get("same_cache_on"))
    out["cache_off_over_on_alternating"] = _ratio(p50.get("alternating_cache_off"), p50.get("alternating_cache_on"))
    return out
