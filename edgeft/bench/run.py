"""Latency and memory measurements of the runtime (`edgeft bench`).

`run_bench(...)` measures one base model with a set of adapters and returns one dict (the CLI
writes it as JSON). Everything in it is measured in this run, after warm-up: in this process, or
in a fresh child process for memory (so earlier allocations cannot hide a new one). Units:
milliseconds (`*_ms`), tokens per second (`*_tps`), MB = 10**6 bytes (`*_mb`), GB/s.

What is compared, all in the same process so the ratios are comparable on a noisy machine:

- hot swap (`Engine._apply`: set the adapter set on the live context + invalidate the KV cache)
  against a full reload per switch (a new llama.cpp model + context + adapter, which is what
  llama-cpp-python's high-level `Llama(lora_path=...)` forces), and the swap's effect on the
  next request's time to first token;
- decode speed without adapter, with one, with two mixed, and with a merged GGUF of the same
  adapter (optionally llama.cpp's own `llama-bench` on the same model and threads);
- resident memory of one base + N adapters against N merged models (one model per task).

Random adapters (rank 8 on all 7 linear projections, f32, B != 0) are written for the base when
none are given (`fixtures.py`). The merged model comes from `edgeft.convert.merge`; where that
workstation-side package is not installed, the merged rows are reported as skipped.

`run_bench` runs the phases below in order; each returns its part of the report dict.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError
from .batch import batch_phase
from .cache import prompt_cache_phase
from .concurrency import CLIENTS, concurrency_phase
from .fixtures import merge_adapter, write_random_adapter
from .llama_bench import _llama_bench_pairs, llama_bench_binary, run_llama_bench
from .machine import _loadavg, machine_info, memory_bandwidth_gbs
from .measure import (
    _decode_runs,
    _decode_sweep,
    _evictions,
    _flash_attn_pairs,
    _interleaved_decode,
    _reload_per_switch,
    _request,
    _swap_penalty,
    _swap_tight,
    _ttft_cleared,
)
from .probes import _merged_memory, adapter_memory
from .profiles import PENALTY_PROMPT, Profile, Progress, prompt_set, resolve_profile
from .report import evaluate_targets
from .stats import _med, _ratio, _rounded, dist

log = logging.getLogger(__name__)

_MODES = ("base", "adapter", "two_adapters", "merged")  # decode modes, in report order


def run_bench(base: str | None = None, adapters: Sequence[str] | None = None, *, profile: str = "laptop",
              threads: int | None = None, ctx: int | None = None, gpu_layers: int = 0,
              repeats: int | None = None, quick: bool = False, sweep: bool | None = None,
              llama_bench: str | os.PathLike | None = None, adapter_dirs: Sequence[str] = (),
              progress: Progress | None = None, concurrency: bool = True,
              llama_server: str | os.PathLike | None = None) -> dict:
    """Measure load, swap, TTFT, prefill, decode and memory; returns the result dict.

    adapters: refs (registered names, bundle folders, .gguf paths); none = two generated random
    rank-8 all-linear f32 adapters. quick: fewer repeats and no dtype sweep (under a minute on
    2 cores). sweep: decode ratio per adapter dtype x target set (default: on unless quick).
    concurrency: edgeft's HTTP server under 1/4/8 clients (quick: 1 and 8, one request each);
    llama_server: llama.cpp's server binary, measured under the same loads.
    """
    from ..models import resolve_base

    say = _PhaseClock(progress or (lambda msg: log.info("%s", msg)))
    prof = resolve_profile(profile, threads=threads, ctx=ctx)
    reps = max(1, repeats if repeats is not None else (2 if quick else 5))
    sweep = (not quick) if sweep is None else sweep
    lb_bin = llama_bench_binary(llama_bench) if llama_bench else None

    res: dict[str, Any] = {"edgeft_bench": 1, "quick": quick, "profile": asdict(prof), "repeats": reps}
    res.update(_machine(prof, quick, say))
    bm = resolve_base(base)
    with tempfile.TemporaryDirectory(prefix="edgeft-bench-", ignore_cleanup_errors=True) as tmp:
        run = _Run(prof, reps, quick, gpu_layers, adapter_dirs, Path(bm.path), Path(tmp), say)
        try:
            res.update(_adapters_under_test(run, bm.id, adapters))
            res["base"].update(_load_base(run))
            res.update(_load_adapters(run))
            res.update(_swaps(run))
            res.update(_ttft(run))
            if run.names[1:]:
                a_sel, b_sel, _ = run.selections()
                res["prompt_cache"] = prompt_cache_phase(run.eng, a_sel, b_sel, 3 if run.quick else 3 * run.reps, run.say)
            res["batch"] = batch_phase(run.eng, run.selections()[0], 1 if run.quick else run.reps, run.say)
            if concurrency:
                res["concurrency"] = concurrency_phase(
                    run.base_path, [p for _, p, _ in run.refs], threads=run.prof.threads, ctx=run.prof.n_ctx,
                    requests=1 if run.quick else 3, say=run.say, clients=(1, 8) if run.quick else CLIENTS,
                    llama_server_bin=llama_server)
            merged = _merged_model(run)
            res.update(_decode(run, lb_bin, merged))
            res["merged"] = merged
            res.update(_reload(run, res))
            if sweep:
                res["decode_sweep"] = _decode_sweep(run.eng, run.base_path, run.work, reps, say, gpu_layers=gpu_layers)
            res["evictions"] = _evictions(run.eng, run.refs, run.budget, reps, say) if run.budget else None
            run.close_engines()
            res["rss_mb"] = _memory(run, merged)
            res.update(_decode_bound(res))
            res["llama_bench"] = _llama_bench_pp(run, lb_bin)
        finally:
            run.close_engines()

    say("done")
    res["machine"]["load_avg_end"] = _loadavg()
    res["wall_s"] = time.perf_counter() - say.start
    res["phase_s"] = say.phases
    res["targets"] = evaluate_targets(res)
    return _rounded(res)


class _PhaseClock:
    """Progress messages, and seconds per phase (a phase is the text before a message's first comma)."""

    def __init__(self, emit: Progress):
        self.emit = emit
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}
        self._current = ("", self.start)

    def __call__(self, msg: str) -> None:
        now = time.perf_counter()
        name, since = self._current
        if name:
            self.phases[name] = self.phases.get(name, 0.0) + now - since
        self._current = (msg.split(",")[0], now)
        self.emit(msg)


@dataclass
class _Run:
    """What the phases share: the settings, the adapters under test and the engines opened."""

    prof: Profile
    reps: int
    quick: bool
    gpu_layers: int
    adapter_dirs: Sequence[str]
    base_path: Path
    work: Path                            # temporary folder: generated adapters, merged models
    say: Progress
    refs: list[tuple[str, Path, bool]] = field(default_factory=list)  # (name, gguf path, generated)
    budget: float | None = None           # adapter memory budget (MB) from the profile
    eng: Any = None                       # the engine under test: the profile's settings and budget
    base_load_ms: list[float] = field(default_factory=list)
    merged_path: Path | None = None       # the first adapter merged into a copy of the base
    merged_eng: Any = None
    lb_pairs: dict | None = None          # llama-bench's decode paired with edgeft's
    opened: list = field(default_factory=list)  # engines to close at the end or if a step fails

    def engine(self, path: Path, **kw: Any):
        """An engine on `path` with the profile's settings, closed at the end."""
        from ..engine import Engine

        e = Engine(str(path), n_ctx=self.prof.n_ctx, n_threads=self.prof.threads, n_batch=self.prof.n_batch,
                   n_gpu_layers=self.gpu_layers, use_mlock=self.prof.use_mlock, **kw)
        self.opened.append(e)
        return e

    def close_engines(self) -> None:
        for e in self.opened:
            with contextlib.suppress(Exception):
                e.close()  # closing twice is a no-op

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.refs]

    def selections(self) -> tuple[dict, dict, dict | None]:
        """(first adapter, second adapter or none, both at 0.5 or None)."""
        n = self.names
        if len(n) > 1:
            return {n[0]: 1.0}, {n[1]: 1.0}, {n[0]: 0.5, n[1]: 0.5}
        return {n[0]: 1.0}, {}, None


# -- phases, in run_bench's order -------------------------------------------------------------

def _machine(prof: Profile, quick: bool, say: Progress) -> dict:
    say("machine")
    machine = machine_info(prof.threads)  # before the bandwidth test: it records the load average
    bw = memory_bandwidth_gbs(repeats=3 if quick else 7)
    return {"machine": machine, "bandwidth": bw, "bandwidth_gbs": bw["best_gbs"]}


def _adapters_under_test(run: _Run, base_id: str, adapters: Sequence[str] | None) -> dict:
    """The adapters given, or two random rank-8 all-linear f32 ones; sets the profile's budget."""
    from ..gguf_info import inspect_adapter
    from ..registry import find

    if adapters:
        for ref in adapters:
            bundle = find(ref, run.adapter_dirs)
            run.refs.append((bundle.name, Path(bundle.gguf_path), False))
        if len(set(run.names)) != len(run.refs):
            raise InputError("the same adapter is listed twice", "give distinct adapters")
    else:
        run.say("writing two random adapters (rank 8; f32; all 7 projections)")
        for i, n in enumerate(("rand-a", "rand-b"), 1):
            run.refs.append((n, write_random_adapter(run.work / f"{n}.gguf", run.base_path, rank=8, seed=i), True))
    infos = [inspect_adapter(p) for _, p, _ in run.refs]
    if run.prof.adapter_slots:
        run.budget = run.prof.adapter_slots * max(i.nbytes for i in infos) / 1e6
    return {
        "base": {"id": base_id, "path": str(run.base_path), "file_mb": run.base_path.stat().st_size / 1e6},
        "adapters": [{"name": n, "path": str(p), "generated": gen, "file_mb": p.stat().st_size / 1e6,
                      "tensor_mb": inf.nbytes / 1e6, "ranks": sorted(inf.ranks), "pairs": len(inf.pairs),
                      "dtypes": sorted({d for _, d in inf.pairs.values()})}
                     for (n, p, gen), inf in zip(run.refs, infos)]}


def _load_base(run: _Run) -> dict:
    """Base load times (page cache warm: the first load warms it and is not counted); the last
    engine stays open as the engine under test."""
    n_loads = 2 if run.quick else 4
    eng = None
    for i in range(n_loads + 1):
        run.say(f"base load, {i}/{n_loads}")
        if eng is not None:
            eng.close()
        # the cache off: the phases below measure a cleared KV memory (the cache has its own phase)
        eng = run.engine(run.base_path, memory_budget_mb=run.budget, adapter_dirs=run.adapter_dirs,
                         prompt_cache_mb=0)
        if i:
            run.base_load_ms.append(eng.load_ms)
    run.eng = eng
    info = {"model_size_mb": eng._b.model_size_bytes() / 1e6, "n_ctx": eng.n_ctx, "threads": eng.n_threads}
    _request(eng, PENALTY_PROMPT, {}, max_tokens=4)
    return info


def _load_adapters(run: _Run) -> dict:
    """Adapter loads from disk: llama.cpp's load, with edgeft's checks, and a file's first load."""
    run.say("adapter loads")
    eng, reps = run.eng, run.reps
    ad_ll, ad_total, ad_first = [], [], []
    for name, path, _ in run.refs:
        for i in range(reps + 2):
            t0 = time.perf_counter()
            eng.load_adapter(str(path), name=name)
            total = (time.perf_counter() - t0) * 1e3
            if i:
                ad_ll.append(eng.adapters[name].load_ms)
                ad_total.append(total)
            else:  # a file this engine has not seen: edgeft's full validation runs
                ad_first.append(total)
            if i < reps + 1:
                eng.unload_adapter(name)
    return {"load_ms": {"base": _med(run.base_load_ms), "base_dist": dist(run.base_load_ms),
                        "adapter": dist(ad_ll), "adapter_with_validation": dist(ad_total),
                        "adapter_first_load": dist(ad_first)}}


def _swaps(run: _Run) -> dict:
    """Swap in a tight loop, then in traffic with the next request's penalty."""
    a_sel, b_sel, _ = run.selections()
    run.say("swap (set adapters + KV invalidation)")
    tight = _swap_tight(run.eng, a_sel, b_sel, 200 if run.quick else 1000)
    run.say("swap penalty on the next request")
    pairs = (6 if run.quick else 12) * run.reps  # 60 pairs: ~70 ms requests, +-10 ms
    pen = _swap_penalty(run.eng, a_sel, b_sel, PENALTY_PROMPT, pairs)
    return {"swap_pair": [list(a_sel), list(b_sel) or ["none"]],
            "swap_ms": dict(pen["swap_ms_in_traffic"], tight=dist(tight)),
            "swap_ttft_penalty_ms": dict(pen["penalty_ms"], detail=pen)}


def _ttft(run: _Run) -> dict:
    """TTFT and prefill from a cleared KV cache, per prompt, without and with the first adapter."""
    eng = run.eng
    a_sel = run.selections()[0]
    prompts = [(label, eng.chat_prompt(msgs)) for label, msgs in prompt_set()]
    if run.quick:
        prompts = [p for p in prompts if p[0] == "task"]
    samples: dict[tuple[str, str], list] = {}
    for r in range(run.reps):
        run.say(f"TTFT / prefill, round {r + 1}/{run.reps}")
        for mode, sel in (("base", {}), ("adapter", a_sel)):
            for label, text in prompts:
                g = _ttft_cleared(eng, text, sel).gen
                samples.setdefault((label, mode), []).append((g.ttft_ms, g.prompt_tokens))
    by_prompt = []
    for label, _ in prompts:
        row: dict[str, Any] = {"prompt": label, "tokens": samples[(label, "base")][0][1]}
        for mode in ("base", "adapter"):
            t = _med([x for x, _ in samples[(label, mode)]])
            row[f"ttft_ms_{mode}"] = t
            row[f"prefill_tps_{mode}"] = row["tokens"] / (t / 1e3) if t else None
        by_prompt.append(row)
    std = next(r for r in by_prompt if r["prompt"] == "task")
    long = next((r for r in by_prompt if r["prompt"] == "long"), std)
    return {"ttft_ms": {"base": std["ttft_ms_base"], "adapter": std["ttft_ms_adapter"],
                        "prompt": "task", "prompt_tokens": std["tokens"], "by_prompt": by_prompt},
            "prefill_tps": {"base": long["prefill_tps_base"], "adapter": long["prefill_tps_adapter"],
                            "prompt": long["prompt"], "prompt_tokens": long["tokens"]}}


def _merged_model(run: _Run) -> dict:
    """The first adapter merged into a copy of the base, loaded in its own engine; the report's
    `merged` section (its `reason` says why there is none, e.g. edgeft.convert not installed)."""
    run.say("merging the first adapter into a copy of the base")
    name, path, _ = run.refs[0]
    info: dict[str, Any] = {"reason": None}
    try:
        t0 = time.perf_counter()
        merged = merge_adapter(run.base_path, path, run.work / "merged.gguf")
        info.update(tool="edgeft.convert.merge.merge_adapter", build_s=time.perf_counter() - t0,
                    file_mb=merged.stat().st_size / 1e6, adapter=name)
        eng = run.engine(merged)
        _request(eng, PENALTY_PROMPT, {}, max_tokens=4)
    except ImportError as e:  # the workstation side is an optional extra: skip these rows
        log.warning("merged GGUF skipped: edgeft.convert is not importable (%s)", e)
        info["reason"] = f"skipped: edgeft.convert.merge is not importable ({type(e).__name__}: {e})"
        return info
    except Exception as e:  # report, do not abort the whole benchmark
        log.warning("merged GGUF unavailable: %s", e)
        info["reason"] = f"{type(e).__name__}: {e}"
        return info
    run.merged_path, run.merged_eng = merged, eng
    return info


def _decode(run: _Run, lb_bin: Path | None, merged: dict) -> dict:
    """Decode tok/s per mode in interleaved rounds; llama-bench's decode paired with edgeft's
    right after, on the same warm engine; token-by-token ratios; flash attention on / off.
    Adds to `merged` how far the merged model's greedy text agrees with the adapter's."""
    n_dec = 32 if run.quick else 64
    a_sel, _, ab_sel = run.selections()
    modes: dict[str, tuple[Any, dict]] = {"base": (run.eng, {}), "adapter": (run.eng, a_sel)}
    if ab_sel:
        modes["two_adapters"] = (run.eng, ab_sel)
    if run.merged_eng is not None:
        modes["merged"] = (run.merged_eng, {})
    dec = _decode_runs(modes, run.reps if run.quick else 2 * run.reps, n_dec, run.say)  # 10 rounds (2 quick)
    if lb_bin is not None:
        run.lb_pairs = _llama_bench_pairs(lb_bin, run.eng, run.base_path, threads=run.prof.threads,
                                          gpu_layers=run.gpu_layers, tokens=n_dec,
                                          rounds=3 if run.quick else 20, say=run.say)
    res = {"decode_ratio_interleaved": _interleaved(run, modes), "flash_attn": _flash_attn(run, n_dec)}
    res.update(_decode_summary(dec, n_dec))
    if run.merged_eng is not None:
        at, mt = dec["adapter"]["text"] or "", dec["merged"]["text"] or ""
        agree = next((i for i, (x, y) in enumerate(zip(at, mt)) if x != y), min(len(at), len(mt)))
        merged.update(greedy_agree_chars=agree, greedy_chars=len(at))
    return res


def _interleaved(run: _Run, modes: dict[str, tuple[Any, dict]]) -> dict:
    """Each mode against the bare base on a second context, token by token (the headline ratio)."""
    run.say("decode, token by token against a second context of the base")
    try:
        plain = run.engine(run.base_path)
        inter = _interleaved_decode(plain, {m: v for m, v in modes.items() if m != "base"}, 64 if run.quick else 256)
        plain.close()
    except Exception as e:  # a second context may not fit (e.g. all layers on a small GPU);
        # the decode target then reads decode_ratio
        log.warning("token-by-token decode unavailable: %s", e)
        return {"reason": f"{type(e).__name__}: {e}"}
    return dict({m: inter[m]["ratio"] if m in inter else None for m in _MODES[1:]},
                detail=inter,
                note="llama.cpp decode alone, each mode against the bare base on a second context, alternating "
                     "token by token; median of per-token ratios (the headline decode ratio: drift cannot "
                     "separate the two sides)")


def _flash_attn(run: _Run, n_dec: int) -> dict:
    run.say("flash attention on / off")
    name, path, _ = run.refs[0]
    try:
        return _flash_attn_pairs(run.eng, run.base_path, (name, path), gpu_layers=run.gpu_layers,
                                 use_mlock=run.prof.use_mlock, tokens=n_dec, rounds=1 if run.quick else 8,
                                 say=run.say)
    except Exception as e:  # a third engine may not fit (e.g. all layers on a small GPU): report, go on
        log.warning("flash attention comparison unavailable: %s", e)
        return {"reason": f"{type(e).__name__}: {e}"}


def _decode_summary(dec: dict, n_dec: int) -> dict:
    """Medians and ratios of the interleaved decode rounds (`_decode_runs`)."""
    decode_tps = {m: _med(dec[m]["tps"]) if m in dec else None for m in _MODES}
    raw = {m: {"wall_tps": _med(dec[m]["raw_wall"]), "cpu_tps": _med(dec[m]["raw_cpu"]),
               "best_wall_tps": max(dec[m]["raw_wall"])} if m in dec else None
           for m in _MODES}
    return {
        "decode_tps": dict(decode_tps, max_tokens=n_dec, tokens={m: d["tokens"] for m, d in dec.items()},
                           samples={m: d["tps"] for m, d in dec.items()}),
        "decode_raw": dict(raw, note="llama.cpp decode alone (no sampling): wall tok/s and tok/s "
                                     "per CPU-second of the process (all threads)"),
        # per-round ratios (the modes of one round run back to back), then their median: slow
        # drifts of the machine's load cancel out
        "decode_ratio": {m: _med([x / y for x, y in zip(dec[m]["tps"], dec["base"]["tps"]) if y])
                         if m in dec else None for m in _MODES[1:]},
        "decode_ratio_cpu": {m: _ratio((raw[m] or {}).get("cpu_tps"), raw["base"]["cpu_tps"]) for m in _MODES[1:]},
        # other load only ever slows a run down: the best round is the least disturbed one
        "decode_ratio_best": {m: _ratio(max(dec[m]["tps"]), max(dec["base"]["tps"])) if m in dec else None
                              for m in _MODES[1:]},
    }


def _reload(run: _Run, res: dict) -> dict:
    """Reload per switch (new model + adapter each time), the alternative to a hot swap."""
    run.say("reload per switch (new model + adapter each time)")
    paths = [p for _, p, _ in run.refs[:2]]
    rl = _reload_per_switch(run.base_path, run.prof, run.gpu_layers, paths, PENALTY_PROMPT, max(3, run.reps),
                            use_mmap=False)
    rl_mmap = _reload_per_switch(run.base_path, run.prof, run.gpu_layers, paths, PENALTY_PROMPT,
                                 max(2, run.reps // 2), use_mmap=True)
    pen, swap = res["swap_ttft_penalty_ms"]["detail"], res["swap_ms"]["p50"]
    noswap = pen["request_ms_noswap"]["p50"]
    hot_cost = pen["penalty_ms"]["p50"]
    cold_cost = rl["switch_ms"]["p50"] + rl["first_request_ms"]["p50"] - noswap
    return {
        "reload_ms": dict(rl["switch_ms"], first_request_ms=rl["first_request_ms"], use_mmap=False,
                          mmap=dict(rl_mmap["switch_ms"], first_request_ms=rl_mmap["first_request_ms"])),
        "switch_ratio": {
            "reload_over_swap": _ratio(rl["switch_ms"]["p50"], swap),
            "reload_mmap_over_swap": _ratio(rl_mmap["switch_ms"]["p50"], swap),
            "effective": _ratio(cold_cost, max(hot_cost, swap)),
            "note": "effective = (reload + first-request slowdown) / (swap + next-request slowdown)",
        }}


def _memory(run: _Run, merged: dict) -> dict:
    """RSS in fresh processes: one base + N adapters, against N merged models."""
    run.say("memory: base + resident adapters")
    prof = run.prof
    common = dict(n_ctx=prof.n_ctx, threads=prof.threads, n_batch=prof.n_batch, gpu_layers=run.gpu_layers,
                  use_mlock=prof.use_mlock)
    counts = [1, 2, 4, 8]
    rss = adapter_memory(common, run.base_path, [p for _, p, _ in run.refs], counts)
    if run.merged_path is not None:
        run.say("memory: one merged model per task")
        detail = _merged_memory(run.merged_path, run.work, common, counts, prof, rss["process"], run.quick)
        rss["merged_models"] = detail.pop("points")
        rss["merged_detail"] = detail
    else:
        rss["merged_models"] = None
        rss["merged_detail"] = {"reason": merged["reason"]}
    return rss


def _decode_bound(res: dict) -> dict:
    """Decode tok/s if every token read the weights once at the measured memory bandwidth."""
    bw = res["bandwidth"]["best_gbs"] * 1e9
    model_b = res["base"]["model_size_mb"] * 1e6
    ad_b = res["adapters"][0]["tensor_mb"] * 1e6
    bound = {"base": bw / model_b, "adapter": bw / (model_b + ad_b)}
    tps = res["decode_tps"]
    return {"decode_bound_tps": bound["base"],
            "decode_bound": dict(bound, bytes_per_token_mb={"base": model_b / 1e6, "adapter": (model_b + ad_b) / 1e6},
                                 fraction={"base": _ratio(tps["base"], bound["base"]),
                                           "adapter": _ratio(tps["adapter"], bound["adapter"])})}


def _llama_bench_pp(run: _Run, lb_bin: Path | None) -> dict | None:
    """llama.cpp's own prefill (pp) on the same model and threads, with the decode pairs."""
    if lb_bin is None:
        return None
    run.say("llama-bench prefill")
    lb = run_llama_bench(lb_bin, run.base_path, threads=run.prof.threads, gpu_layers=run.gpu_layers,
                         repeats=3, n_gen=0, n_prompt=64)
    lb.update(run.lb_pairs or {})
    return lb
