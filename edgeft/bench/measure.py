"""Measurement primitives: one timed request, llama.cpp's decode alone, hot swaps and the next
request's penalty, decode rounds interleaved across modes (and token by token against a second
context of the base), a full reload per switch, flash attention on / off, the decode cost per
adapter dtype x target set, and LRU evictions under an adapter budget.

Each works on engines the caller opened and returns raw samples or their summaries; the bench
(`run.py`) decides what to run and how the results are named in the report.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

from ..continuous import _key
from .fixtures import ADAPTER_DTYPES, TARGET_SETS, write_random_adapter
from .probes import _child
from .profiles import DECODE_PROMPT, PENALTY_PROMPT, Profile, Progress
from .stats import _med, _p10_p90, dist


class Req(NamedTuple):
    wall_ms: float   # from the call to its return
    cpu_ms: float    # CPU time of this process meanwhile (all threads): robust to other load
    gen: Any         # the Generation


def _request(eng, prompt: str, sel: dict, max_tokens: int = 1) -> Req:
    """One greedy completion, timed."""
    t0, c0 = time.perf_counter(), time.process_time()
    g = eng.complete(prompt, adapter=sel, max_tokens=max_tokens, temperature=0.0)
    return Req((time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3, g)


def _raw_decode(eng, sel: dict, n: int) -> tuple[float, float | None]:
    """llama.cpp's decode alone (no sampling, no Python loop): `n` single-token decodes after a
    short prompt, under `sel`; (wall tok/s, CPU tok/s). CPU time counts every thread of the
    process, so with one thread it measures the work and ignores time lost to other processes."""
    with eng._lock:
        eng._apply(sel)
        b = eng._b
        try:
            b.memory_clear()
            toks = b.tokenize(DECODE_PROMPT)
            b.decode(toks)
            b.decode_one(toks[-1])  # the first single-token graph is built outside the timing
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                b.decode_one(toks[-1])
            w, c = time.perf_counter() - w0, time.process_time() - c0
        finally:
            eng._invalidate_kv()
    return n / w, (n / c if c > 0 else None)


def _ttft_cleared(eng, prompt: str, sel: dict):
    """TTFT of `prompt` under `sel` from an empty KV cache, with no swap in the measured request:
    the set is applied (and llama.cpp's graph reserved) by a short request first if needed."""
    if eng._applied != _key(sel):
        _request(eng, PENALTY_PROMPT, sel)
    eng.reset()
    return _request(eng, prompt, sel)


def _swap_tight(eng, a: dict, b: dict, n: int) -> list[float]:
    """`_apply` (set adapters + KV invalidation) back to back, under the engine lock."""
    out = []
    with eng._lock:
        for i in range(n + 10):
            sel = a if i % 2 else b
            t0 = time.perf_counter()
            eng._apply(sel)
            dt = (time.perf_counter() - t0) * 1e3
            if i >= 10:
                out.append(dt)
    return out


def _swap_penalty(eng, a: dict, b: dict, prompt: str, pairs: int) -> dict:
    """The same prompt from a cleared KV cache, three ways, interleaved `pairs` times:

    - no swap, graph reused: the previous request was this prompt under the same set (llama.cpp
      reuses its compute graph): the best case, and the baseline of the headline penalty;
    - no swap, graph rebuilt: the previous request was another prompt under the same set (what
      any new prompt costs anyway);
    - right after switching to the other set (the next decode rebuilds the graph; a stock
      llama.cpp also re-reserves its scheduler, which edgeft's patch skips for same-shape sets).
    """
    from .. import _llama

    _request(eng, prompt, a)
    _request(eng, prompt, b)
    _request(eng, prompt, a)
    cur, other = a, b
    v: dict[str, list[float]] = {}
    tokens = None
    reserves0 = _llama.scheduler_reserves()
    for _ in range(pairs):
        eng.reset()
        r0 = _request(eng, prompt, cur)
        _request(eng, DECODE_PROMPT, cur)
        eng.reset()
        r0b = _request(eng, prompt, cur)
        swaps_before = eng.stats.swaps
        r1 = _request(eng, prompt, other)
        if eng.stats.swaps != swaps_before + 1 or r1.gen.reused_prefix:
            raise RuntimeError("benchmark bug: the swap request did not swap, or reused the KV prefix")
        tokens = r0.gen.prompt_tokens
        for k, x in (("noswap", r0.wall_ms), ("noswap_rebuilt", r0b.wall_ms), ("swap", r1.wall_ms),
                     ("set", eng.stats.last_swap_ms), ("penalty", r1.wall_ms - r0.wall_ms),
                     ("penalty_rebuilt", r1.wall_ms - r0b.wall_ms),
                     ("penalty_ttft", r1.gen.ttft_ms - r0.gen.ttft_ms),
                     ("penalty_cpu", r1.cpu_ms - r0.cpu_ms), ("penalty_rebuilt_cpu", r1.cpu_ms - r0b.cpu_ms)):
            v.setdefault(k, []).append(x)
        cur, other = other, cur
    return {"prompt_tokens": tokens, "pairs": pairs,
            # llama.cpp scheduler re-reserves per swap: 1 on a stock build, 0 with edgeft's patch
            # when the two sets have the same shapes (cmake/patches)
            "scheduler_reserves_per_swap": round((_llama.scheduler_reserves() - reserves0) / max(pairs, 1), 2),
            "request_ms_noswap": dist(v["noswap"]), "request_ms_noswap_graph_rebuilt": dist(v["noswap_rebuilt"]),
            "request_ms_after_swap": dist(v["swap"]),
            "penalty_ms": dist(v["penalty"]), "penalty_vs_graph_rebuilt_ms": dist(v["penalty_rebuilt"]),
            "penalty_engine_ttft_ms": dist(v["penalty_ttft"]),
            "penalty_cpu_ms": dist(v["penalty_cpu"]), "penalty_vs_graph_rebuilt_cpu_ms": dist(v["penalty_rebuilt_cpu"]),
            "swap_ms_in_traffic": dist(v["set"])}


def _decode_runs(modes: dict[str, tuple[Any, dict]], repeats: int, n_tokens: int, progress: Progress) -> dict:
    """Interleave the modes `repeats` times (so drift hits all alike), in reverse order every
    other round (so no mode always comes first). Each round measures edgeft's own generation
    loop (greedy, sampling and detokenizing included: the tok/s a user sees) and llama.cpp's
    decode alone (wall and CPU tok/s)."""
    out: dict[str, dict] = {k: {"tps": [], "tokens": [], "raw_wall": [], "raw_cpu": [], "text": None} for k in modes}
    for eng, sel in modes.values():  # warm-up: graph reserve, page cache
        eng.complete(DECODE_PROMPT, adapter=sel, max_tokens=4)
    for r in range(repeats):
        progress(f"decode tok/s, round {r + 1}/{repeats}")
        order = list(modes.items())
        for mode, (eng, sel) in order[::-1] if r % 2 else order:
            wall, cpu = _raw_decode(eng, sel, max(16, n_tokens // 2))
            eng.complete(DECODE_PROMPT, adapter=sel, max_tokens=1)  # prompt in KV, as in any request
            g = eng.complete(DECODE_PROMPT, adapter=sel, max_tokens=n_tokens)
            d = out[mode]
            d["tps"].append(g.decode_tps)
            d["tokens"].append(g.completion_tokens)
            d["raw_wall"].append(wall)
            d["raw_cpu"].append(cpu)
            if d["text"] is None:
                d["text"] = g.text
    return out


def _interleaved_decode(ref, modes: dict[str, tuple[Any, dict]], n: int) -> dict:
    """llama.cpp decode of each mode against the bare base on `ref` (a second context on the same
    base file), alternating token by token, the order flipping every token. Both sides of a
    ratio then see the same machine load within ~20 ms, where whole rounds of 64 tokens move by
    +-10% on a noisy host: this is the precise estimate of what an adapter costs per token.
    Returns per mode: median of the per-token time ratios (ref / mode = mode tok/s over base),
    its p10-p90, and each side's median tok/s."""
    out: dict[str, dict] = {}
    for mode, (eng, sel) in modes.items():
        with eng._lock, ref._lock:
            eng._apply(eng._resolve(sel))  # reloads an adapter an LRU budget evicted
            ref._apply({})
            a, b = eng._b, ref._b
            toks = a.tokenize(DECODE_PROMPT)
            try:
                for x in (a, b):  # prompt in KV; the first single-token graph is built untimed
                    x.memory_clear()
                    x.decode(toks)
                    x.decode_one(toks[-1])
                ta: list[float] = []
                tb: list[float] = []
                for i in range(n):
                    for x, acc in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
                        t0 = time.perf_counter()
                        x.decode_one(toks[-1])
                        acc.append(time.perf_counter() - t0)
            finally:
                eng._invalidate_kv()
                ref._invalidate_kv()
        ratios = [tb_i / ta_i for ta_i, tb_i in zip(ta, tb) if ta_i > 0]
        out[mode] = {"ratio": _med(ratios), "ratio_p10_p90": _p10_p90(ratios),
                     "tps": 1.0 / _med(ta), "base_tps": 1.0 / _med(tb), "tokens": n}
    return out


def _reload_per_switch(base_path: Path, prof: Profile, gpu_layers: int, adapter_paths: list[Path],
                       prompt: str, repeats: int, use_mmap: bool) -> dict:
    """Switch tasks the way llama-cpp-python's high-level API allows: free the model and build a
    new one with the other adapter (`Llama(model_path, lora_path=...)`, which turns mmap off).
    Measured: free + load + adapter init + attach; then the first request on the new model."""
    from .. import _llama

    def build(path):
        b = _llama.Backend(str(base_path), n_ctx=prof.n_ctx, n_threads=prof.threads, n_batch=prof.n_batch,
                           n_gpu_layers=gpu_layers, use_mmap=use_mmap, use_mlock=prof.use_mlock)
        h = b.adapter_load(str(path))
        b.set_adapters([h], [1.0])
        return b, h

    def first_request(b):
        t0 = time.perf_counter()
        toks = b.tokenize(prompt)
        b.decode(toks)
        s = b.sampler(_llama.Sampling()) if hasattr(b, "sampler") else _llama.Sampler(b.vocab, _llama.Sampling())
        try:
            b.sample(s)
        finally:
            s.close()
        return (time.perf_counter() - t0) * 1e3

    def free(b, h):
        b.set_adapters([], [])
        b.adapter_free(h)
        b.close()

    cur = build(adapter_paths[0])
    first_request(cur[0])
    switch, first = [], []
    try:
        for i in range(repeats + 1):
            nxt_path = adapter_paths[(i + 1) % len(adapter_paths)]
            t0 = time.perf_counter()
            free(*cur)
            cur = None
            cur = build(nxt_path)
            dt = (time.perf_counter() - t0) * 1e3
            fr = first_request(cur[0])
            if i:  # the first switch warms the allocator and page cache
                switch.append(dt)
                first.append(fr)
    finally:
        if cur is not None:
            free(*cur)
    return {"switch_ms": dist(switch), "first_request_ms": dist(first), "use_mmap": use_mmap}


def _flash_attn_pairs(eng, base_path: Path, adapter: tuple[str, Path], *, gpu_layers: int, use_mlock: bool,
                      tokens: int, rounds: int, say: Progress) -> dict:
    """edgeft's decode with llama.cpp's flash attention against without, at the profile's context:
    `eng` (off) and a second engine with it on, the same request back to back (order flipping
    every round), with no adapter and with `adapter`. Also: whether greedy text stays the same
    (ggml's CPU flash attention sums softmax @ V in f16, the plain path in f32)."""
    from ..engine import Engine

    name, path = adapter
    on = Engine(str(base_path), n_ctx=eng.n_ctx, n_threads=eng.n_threads, n_batch=eng._b.n_batch,
                n_gpu_layers=gpu_layers, use_mlock=use_mlock, flash_attn=True)
    sels = {"base": {}, "adapter": {name: 1.0}}
    tps: dict[str, dict[str, list[float]]] = {m: {k: [] for k in sels} for m in ("off", "on")}
    text: dict[str, dict[str, str]] = {"off": {}, "on": {}}
    try:
        on.load_adapter(str(path), name=name)
        for e in (eng, on):  # warm-up: graph reserve per adapter set
            for sel in sels.values():
                e.complete(DECODE_PROMPT, adapter=sel, max_tokens=4)
        for r in range(rounds):
            say(f"flash attention on / off, round {r + 1}/{rounds}")
            order = [("off", eng), ("on", on)]
            for k, sel in sels.items():
                for mode, e in order[::-1] if r % 2 else order:
                    e.complete(DECODE_PROMPT, adapter=sel, max_tokens=1)  # prompt in KV, as in any request
                    g = e.complete(DECODE_PROMPT, adapter=sel, max_tokens=tokens)
                    tps[mode][k].append(g.decode_tps)
                    text[mode].setdefault(k, g.text)
    finally:
        on.close()
    return {"n_ctx": eng.n_ctx, "tokens": tokens, "rounds": rounds, "adapter": name,
            "decode_tps": {m: {k: _med(v) for k, v in d.items()} for m, d in tps.items()},
            "on_over_off": {k: _med([a / b for a, b in zip(tps["on"][k], tps["off"][k]) if b]) for k in sels},
            "same_greedy_text": {k: text["on"][k] == text["off"][k] for k in sels},
            "note": "edgeft's generation loop, greedy; on_over_off = median of per-round ratios. Off is "
                    "edgeft's default: ggml's CPU kernel accumulates softmax @ V in f16 (docs/benchmarks.md)"}


def _decode_sweep(eng, base_path: Path, work: Path, reps: int, say: Progress, gpu_layers: int = 0) -> dict:
    """llama.cpp decode speed with one rank-8 adapter relative to none, per adapter dtype x
    target set, token by token against a second context of the bare base
    (`_interleaved_decode`); and the all-linear rows again with ggml's fusions off, in a child."""
    from .. import _llama
    from ..engine import Engine

    variants = []
    for dt in ADAPTER_DTYPES:
        for tname, targets in TARGET_SETS.items():
            name = f"sweep-{dt}-{tname}"
            p = write_random_adapter(work / f"{name}.gguf", base_path, rank=8, targets=targets, seed=7, dtype=dt)
            variants.append((name, dt, tname, p))
    n_dec = max(160, 32 * reps)
    mb = {}
    saved_budget, eng.memory_budget_mb = eng.memory_budget_mb, None  # all variants resident at once
    plain = Engine(str(base_path), n_ctx=eng.n_ctx, n_threads=eng.n_threads, n_batch=eng._b.n_batch,
                   n_gpu_layers=gpu_layers)  # placed like `eng`, or the ratio compares devices
    try:
        for name, _, _, p in variants:
            eng.load_adapter(str(p), name=name)
            mb[name] = eng.adapters[name].mb
        got: dict[str, dict] = {}
        for i, (name, dt, tname, _) in enumerate(variants):
            say(f"decode sweep, {i + 1}/{len(variants)}: {dt} {tname}")
            got.update(_interleaved_decode(plain, {name: (eng, {name: 1.0})}, n_dec))
    finally:
        plain.close()
        for name in mb:
            eng.unload_adapter(name)
        eng.memory_budget_mb = saved_budget
    unfused = None
    if _llama.lora_decode_fused():
        # the same all-linear rows with llama.cpp's plain graph (4 ops per adapted matrix), in a
        # child process: ggml reads GGML_CPU_DISABLE_FUSION once, at start-up
        say("decode sweep, unfused (child process)")
        spec = {"base": str(base_path), "n_ctx": eng.n_ctx, "threads": eng.n_threads, "tokens": n_dec,
                "adapters": {name: str(p) for name, _, tname, p in variants if tname == "all7"}}
        child = _child(spec, "_interleaved_probe", env={"GGML_CPU_DISABLE_FUSION": "1"})
        unfused = [{"dtype": dt, "targets": tname, "ratio": child["ratio"][name],
                    "ratio_p10_p90": child["ratio_p10_p90"][name]}
                   for name, dt, tname, _ in variants if name in child["ratio"]]
    rows = [{"dtype": dt, "targets": tname, "rank": 8, "adapter_mb": mb[name], "ratio": got[name]["ratio"],
             "ratio_p10_p90": got[name]["ratio_p10_p90"], "tps": got[name]["tps"], "base_tps": got[name]["base_tps"]}
            for name, dt, tname, _ in variants]
    return {"base_wall_tps": _med([r["base_tps"] for r in rows]), "tokens": n_dec, "rows": rows,
            "lora_decode_fused": _llama.lora_decode_fused(), "unfused_rows": unfused,
            "note": "llama.cpp decode alone, one rank-8 adapter; ratio = tok/s with it / without, median of "
                    "per-token ratios against a second context of the bare base, alternating token by token; "
                    "q8_0 = lora_a in Q8_0, lora_b in F16 (its rows hold only r values); unfused_rows: the "
                    "same in a child process with GGML_CPU_DISABLE_FUSION=1 (llama.cpp's 4 graph ops per "
                    "adapted matrix instead of edgeft's fused op, cmake/patches 0002)"}


def _evictions(eng, refs, budget: float, reps: int, say: Progress) -> dict:
    """Cycle through 4 adapters under a budget that holds about two: every request evicts the
    least recently used adapter and loads the one it needs again. The cost of an eviction is
    paid when the evicted adapter is used again: `load_adapter` (validation + llama.cpp load)."""
    say("evictions under the adapter budget")
    names = [f"evict-{i}" for i in range(4)]
    paths = [refs[i % len(refs)][1] for i in range(4)]
    for n in list(eng.adapters):
        eng.unload_adapter(n)
    ev0 = eng.stats.evictions
    load_wall, load_ll, evicting_ms, resident_ms = [], [], [], []
    rounds = 3 * max(2, reps)
    for i in range(rounds * 4):
        k = i % 4
        t0 = time.perf_counter()
        eng.load_adapter(str(paths[k]), name=names[k])  # evicts the LRU one when over budget
        dt = (time.perf_counter() - t0) * 1e3
        if i >= 4:  # the first lap only fills the budget
            load_wall.append(dt)
            load_ll.append(eng.adapters[names[k]].load_ms)
            evicting_ms.append(_request(eng, PENALTY_PROMPT, {names[k]: 1.0}).wall_ms)
        else:
            _request(eng, PENALTY_PROMPT, {names[k]: 1.0})
    # for reference: the same requests alternating between two adapters that stay resident
    resident = [n for n in names if n in eng.adapters][-2:]
    for i in range(rounds * 2):
        resident_ms.append(_request(eng, PENALTY_PROMPT, {resident[i % len(resident)]: 1.0}).wall_ms)
    return {"budget_mb": budget, "adapters_cycled": 4, "requests": rounds * 4,
            "evictions": eng.stats.evictions - ev0,
            "cost_ms": dist(load_wall), "reload_ms": dist(load_ll),
            "request_ms_with_reload": dist(evicting_ms), "request_ms_resident": dist(resident_ms),
            "note": "cost_ms = load_adapter wall time when a used adapter had been evicted "
                    "(validation + llama.cpp load); reload_ms = the llama.cpp load alone"}
