"""The batch phase: a bulk job of task requests under one adapter, answered one by one
(`Engine.chat`) and together (`Engine.run_many`, up to `parallel` answers per llama_decode).

Both runs use the same greedy requests in the same process, interleaved per round; the phase
reports generated tokens per second for each, their ratio, and how many batched answers are
identical to the one-by-one ones (batched decode steps use llama.cpp's batched kernels, which
round differently from single-token decoding).
"""

from __future__ import annotations

import time
from typing import Any

from .cache import INPUTS, SYSTEM
from .stats import _med, _ratio

ANSWER_TOKENS = 32


def batch_phase(eng: Any, sel: dict, rounds: int, say) -> dict:
    texts = INPUTS * 2
    msgs = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}] for t in texts]
    tps: dict[str, list[float]] = {"one_by_one": [], "batched": []}
    same = total = 0
    for r in range(rounds):
        say(f"batched decoding, round {r + 1}/{rounds}")
        order = ("one_by_one", "batched") if r % 2 == 0 else ("batched", "one_by_one")
        got: dict[str, list[str]] = {}
        for mode in order:
            t0 = time.perf_counter()
            if mode == "batched":
                gens = eng.complete_many([eng.chat_prompt(m) for m in msgs], adapter=sel,
                                         max_tokens=ANSWER_TOKENS, temperature=0.0)
            else:
                gens = [eng.chat(m, adapter=sel, max_tokens=ANSWER_TOKENS, temperature=0.0) for m in msgs]
            dt = time.perf_counter() - t0
            tps[mode].append(sum(g.completion_tokens for g in gens) / dt)
            got[mode] = [g.text for g in gens]
        same += sum(a == b for a, b in zip(got["one_by_one"], got["batched"]))
        total += len(texts)
    one, many = _med(tps["one_by_one"]), _med(tps["batched"])
    return {"requests": len(texts), "answer_tokens": ANSWER_TOKENS, "parallel": eng.parallel, "rounds": rounds,
            "tps_one_by_one": one, "tps_batched": many, "batched_over_one_by_one": _ratio(many, one),
            "identical_answers": same / total if total else None}

