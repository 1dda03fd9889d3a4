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
none are given; `write_random_adapter` and `merge_adapter` are public so tests and other tools
can use them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np

from .errors import ConversionError, InputError

log = logging.getLogger(__name__)

ALL7 = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
TARGET_SETS = {
    "all7": ALL7,
    "attn4": ("attn_q", "attn_k", "attn_v", "attn_output"),
    "attn_qv": ("attn_q", "attn_v"),
    "ffn3": ("ffn_gate", "ffn_up", "ffn_down"),
}
ADAPTER_DTYPES = ("f32", "f16", "q8_0")

Progress = Callable[[str], None]

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


# -- test/benchmark artifacts ---------------------------------------------------------------

def write_random_adapter(path: str | os.PathLike, base_path: str | os.PathLike, *, rank: int = 8,
                         targets: Iterable[str] = ALL7, seed: int = 0, b_std: float = 0.02,
                         alpha: float | None = None, dtype: Any = np.float32, arch: str | None = None,
                         blocks: range | None = None, mutate: Callable[[dict], None] | None = None) -> Path:
    """Write a rank-`rank` LoRA adapter GGUF with random A and B (B != 0, so it changes the output)
    for the base's tensor shapes.

    dtype: np.float32 / "f32", np.float16 / "f16", or "q8_0" (lora_a in Q8_0; lora_b, whose rows
    hold only `rank` values, in f16, as llama.cpp's converter falls back for rows that are not a
    multiple of 32). `mutate(tensors)` may edit the {name: array} dict before writing (tests).
    """
    import gguf

    from .files import atomic_path
    from .gguf_info import base_info

    kind = {"f32": "f32", "float32": "f32", "f16": "f16", "float16": "f16", "q8_0": "q8_0"}.get(
        dtype if isinstance(dtype, str) else np.dtype(dtype).name)
    if kind is None:
        raise InputError(f"unsupported adapter dtype {dtype!r}", "use f32, f16 or q8_0")
    info = base_info(base_path)
    targets = tuple(targets)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for name, shape in info.tensors.items():
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight" or parts[2] not in targets:
            continue
        if blocks is not None and int(parts[1]) not in blocks:
            continue
        n_in, n_out = shape
        tensors[name + ".lora_a"] = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)  # PEFT [r, in]
        tensors[name + ".lora_b"] = (rng.standard_normal((n_out, rank)) * b_std).astype(np.float32)         # PEFT [out, r]
    if not tensors:
        raise InputError(f"none of the targets {', '.join(targets)} exist in {base_path}")
    if mutate:
        mutate(tensors)
    out = Path(path)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch or info.architecture)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha if alpha is not None else rank))
        for k, v in tensors.items():
            if kind == "f32" or v.dtype != np.float32:
                w.add_tensor(k, v)
            elif kind == "f16" or v.shape[-1] % 32:
                w.add_tensor(k, v.astype(np.float16))
            else:
                q = gguf.quants.quantize(v, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(k, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def _float(t) -> np.ndarray:
    """A GGUFReader tensor as float32 in numpy order (rows = ggml ne[1])."""
    import gguf

    tt = t.tensor_type
    if tt == gguf.GGMLQuantizationType.F32:
        return np.asarray(t.data, dtype=np.float32)
    if tt == gguf.GGMLQuantizationType.F16:
        return np.asarray(t.data).astype(np.float32)
    return gguf.quants.dequantize(np.asarray(t.data), tt).astype(np.float32, copy=False)


def merge_adapter(base_path: str | os.PathLike, adapter_path: str | os.PathLike, out_path: str | os.PathLike,
                  *, scale: float = 1.0) -> Path:
    """Write base + scale * alpha/r * B @ A as a plain model GGUF (a "merged" model for one task).

    Each adapted tensor is dequantized, updated in float32 and requantized to its own type when
    `gguf` can quantize that type (Q4_0/Q4_1/Q5_x/Q8_0, F16, F32, BF16), else written as F16;
    every other tensor and all metadata are copied byte for byte. So the merged file has the
    base's size and layout, which keeps decode-speed comparisons fair.
    """
    import gguf

    from .files import atomic_path

    base_r = gguf.GGUFReader(str(base_path), "r")
    ad_r = gguf.GGUFReader(str(adapter_path), "r")
    alpha_f = ad_r.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    alpha = float(alpha_f.contents()) if alpha_f is not None else 0.0
    pairs: dict[str, dict[str, Any]] = {}
    for t in ad_r.tensors:
        for suffix in (".lora_a", ".lora_b"):
            if t.name.endswith(suffix):
                pairs.setdefault(t.name[: -len(suffix)], {})[suffix[-1]] = t
    base_names = {t.name for t in base_r.tensors}
    missing = [n for n in pairs if n not in base_names or len(pairs[n]) != 2]
    if missing:
        raise ConversionError(f"adapter {adapter_path} does not fit base {base_path}: {', '.join(missing[:4])}")
    arch = base_r.fields[gguf.Keys.General.ARCHITECTURE].contents()
    out = Path(out_path)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        for field in base_r.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        datas = []
        for t in base_r.tensors:
            data, ttype = t.data, t.tensor_type
            if t.name in pairs:
                a, b = _float(pairs[t.name]["a"]), _float(pairs[t.name]["b"])   # [r, in], [out, r]
                rank = b.shape[1]
                s = scale * (alpha / rank if alpha else 1.0)
                wf = _float(t) + s * (b @ a)
                if not np.isfinite(wf).all():
                    raise ConversionError(f"merging {t.name} produced NaN/Inf", "check the adapter's scale")
                try:
                    data = gguf.quants.quantize(wf, ttype)
                except (NotImplementedError, gguf.quants.QuantError):
                    ttype, data = gguf.GGMLQuantizationType.F16, wf.astype(np.float16)
            w.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, ttype)
            datas.append(data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for data in datas:
            w.write_tensor_data(data)
        w.close()
    return out


def _make_merged(base_path: Path, adapter_path: Path, out: Path) -> tuple[Path, str]:
    """The merge tool when it is there (edgeft.convert.merge), else merge_adapter(); (path, which)."""
    try:
        from .convert import merge as tool  # type: ignore[attr-defined]
    except Exception:  # not part of this build (workstation side), or broken: ours is equivalent
        tool = None
    fn = getattr(tool, "merge_adapter", None) if tool is not None else None
    if callable(fn):
        try:
            res = fn(str(base_path), str(adapter_path), str(out))
            if out.is_file():
                return out, "edgeft.convert.merge.merge_adapter"
            log.warning("edgeft.convert.merge.merge_adapter returned %r without writing %s", res, out)
        except Exception as e:  # an API we do not know yet: fall back, but say so
            log.warning("edgeft.convert.merge.merge_adapter failed (%s: %s); using edgeft.bench.merge_adapter",
                        type(e).__name__, e)
    return merge_adapter(base_path, adapter_path, out), "edgeft.bench.merge_adapter"


# -- machine --------------------------------------------------------------------------------

def rss_mb() -> float | None:
    """Resident set size of this process, MB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # type: ignore[import-not-found]

        return psutil.Process().memory_info().rss / 1e6
    except Exception:
        return None


def memory_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> dict:
    """Single-thread copy bandwidth (numpy copy of an `mb` MiB array; bytes read + written)."""
    n = mb * (1 << 20) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault both in
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    moved = 2 * src.nbytes
    return {"median_gbs": moved / float(np.median(times)) / 1e9, "best_gbs": moved / min(times) / 1e9,
            "array_mib": mb, "method": "numpy copyto, 1 thread, read + write bytes"}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    with contextlib.suppress(Exception):
        if sys.platform == "darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict:
    from . import _llama

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    total_mb = None
    with contextlib.suppress(OSError, ValueError):
        total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e6
    return {
        "cpu": _cpu_model(),
        "arch": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "threads_used": threads,
        "ram_mb": total_mb,
        "llama_cpp_python": _llama.VERSION,
        "llama_cpp_features": _llama.system_info(),
        "llama_cpp_patch_level": _llama.patch_level(),  # cmake/patches: 1 = same-shape swaps skip the re-reserve
        "lora_decode_fused": _llama.lora_decode_fused(),  # patch 0002 active: one op per LoRA chain in CPU decode
        "gpu_offload": _llama.supports_gpu_offload(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "load_avg_start": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# -- statistics -----------------------------------------------------------------------------

def dist(values: Sequence[float]) -> dict:
    """p50/p90/p99/min/mean/n of a sample (linear interpolation)."""
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        return {"p50": None, "p90": None, "p99": None, "min": None, "mean": None, "n": 0}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "min": float(a.min()),
            "mean": float(a.mean()), "n": int(a.size)}


def _med(values: Sequence[float]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.median(v)) if v else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _rounded(obj: Any) -> Any:
    """Floats to 4 significant digits (at least 1 decimal); NaN/Inf -> None."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return None
        if obj == 0:
            return 0.0
        mag = math.floor(math.log10(abs(obj)))
        return round(obj, max(1, 3 - mag))
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


# -- pieces of the benchmark ----------------------------------------------------------------

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
    if eng._applied != tuple(sorted(sel.items())):
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
    from . import _llama

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
    from . import _llama

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


def _child(spec: dict, probe: str = "_memory_probe", env: dict[str, str] | None = None) -> dict:
    """Run `probe(spec)` (a function of this module) in a fresh Python process: clean heap and
    RSS, or environment that llama.cpp reads once at start-up (`env`)."""
    code = ("import json, sys; from edgeft import bench; "
            f"json.dump(bench.{probe}(json.loads(sys.argv[1])), sys.stdout)")
    child_env = dict(os.environ)
    child_env.pop("EDGEFT_VERBOSE", None)
    child_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          timeout=600, env=child_env)
    if proc.returncode != 0:
        raise RuntimeError(f"{probe} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def _p10_p90(values: Sequence[float]) -> list[float]:
    return [float(np.percentile(values, 10)), float(np.percentile(values, 90))]


def _interleaved_probe(spec: dict) -> dict:
    """In a fresh process: `_interleaved_decode` of each adapter against the bare base, for a
    process whose environment differs (e.g. ggml's CPU fusions off)."""
    from . import _llama
    from .engine import Engine

    kw = dict(n_ctx=spec["n_ctx"], n_threads=spec["threads"])
    with Engine(spec["base"], **kw) as eng, Engine(spec["base"], **kw) as plain:
        for name, path in spec["adapters"].items():
            eng.load_adapter(path, name=name)
        got = _interleaved_decode(plain, {name: (eng, {name: 1.0}) for name in spec["adapters"]}, spec["tokens"])
    return {"lora_decode_fused": _llama.lora_decode_fused(),
            "ratio": {k: v["ratio"] for k, v in got.items()},
            "ratio_p10_p90": {k: v["ratio_p10_p90"] for k, v in got.items()}}


def _memory_probe(spec: dict) -> dict:
    """In a fresh process: RSS of one base + N resident adapters ("adapters"), or of N models
    loaded side by side, one per task ("models"). Every model answers one short request first,
    so its weights are paged in."""
    from .engine import Engine

    kw = dict(n_ctx=spec["n_ctx"], n_threads=spec["threads"], n_batch=spec["n_batch"],
              n_gpu_layers=spec["gpu_layers"], use_mlock=spec["use_mlock"])
    counts = sorted(set(spec["counts"]))
    out: dict[str, Any] = {"process_mb": rss_mb(), "points": []}
    if spec["mode"] == "adapters":
        eng = Engine(spec["base"], **kw)
        eng.complete(PENALTY_PROMPT, max_tokens=2)
        out["base_mb"] = rss_mb()
        paths = spec["adapters"]
        for k in range(1, counts[-1] + 1):
            eng.load_adapter(paths[(k - 1) % len(paths)], name=f"probe-{k}")
            if k in counts:
                out["points"].append({"n": k, "mb": rss_mb(), "adapter_mb": eng.resident_mb()})
        eng.close()
    else:
        engines = []
        for k, path in enumerate(spec["models"], 1):
            eng = Engine(path, **kw)
            eng.complete(PENALTY_PROMPT, max_tokens=2)
            engines.append(eng)
            if k in counts:
                out["points"].append({"n": k, "mb": rss_mb()})
        for eng in engines:
            eng.close()
    return out


LLAMA_BENCH_CTX = 256  # llama-bench's context for -p 0 -n 64: n_prompt + n_gen, padded to 256 cells


def _llama_bench_pairs(lb_bin: Path, eng, model: Path, *, threads: int, gpu_layers: int, tokens: int,
                       rounds: int, say: Progress) -> dict:
    """llama-bench's decode (tg) and edgeft's, back to back, `rounds` times (the order flips every
    round), so both see the same load: the ratio is the median of the rounds' ratios.

    edgeft runs twice per round: with llama-bench's context size (the like-for-like comparison,
    which isolates what edgeft's Python layer costs) and with the profile's (`eng`). Without
    flash attention llama.cpp's CPU backend keeps V transposed over the whole context, so decode
    at the same positions is slower in a larger context."""
    from .engine import Engine

    same = Engine(str(model), n_ctx=LLAMA_BENCH_CTX, n_threads=threads, n_gpu_layers=gpu_layers)
    engines = {"same_ctx": same, "profile_ctx": eng}
    lb: list[float] = []
    ours: dict[str, list[float]] = {k: [] for k in engines}
    raw: dict[str, list[float]] = {k: [] for k in engines}
    try:
        def edgeft_round() -> None:
            for k, e in engines.items():
                w, _ = _raw_decode(e, {}, tokens)
                e.complete(DECODE_PROMPT, adapter={}, max_tokens=1)  # prompt in KV, as in any request
                ours[k].append(e.complete(DECODE_PROMPT, adapter={}, max_tokens=tokens).decode_tps)
                raw[k].append(w)

        same.complete(DECODE_PROMPT, adapter={}, max_tokens=4)  # warm-up
        for r in range(rounds):
            say(f"llama-bench vs edgeft decode, round {r + 1}/{rounds}")
            if r % 2:
                edgeft_round()
            lb.append(run_llama_bench(lb_bin, model, threads=threads, gpu_layers=gpu_layers,
                                      repeats=1, n_gen=tokens, n_prompt=0)["tg_tps"])
            if not r % 2:
                edgeft_round()
    finally:
        same.close()

    def ratios(xs: list[float]) -> list[float]:
        return [e / t for e, t in zip(xs, lb) if t]

    def med(xs: list[float]) -> float | None:
        return _med(xs) if xs else None

    same_ratio = ratios(ours["same_ctx"])
    return {"tg_tps": _med(lb), "tg_samples": lb, "tg_tokens": tokens, "n_ctx_same": LLAMA_BENCH_CTX,
            "edgeft_tps_samples": ours["same_ctx"],
            "edgeft_over_llama_bench": med(same_ratio),
            "edgeft_over_llama_bench_p10_p90": _p10_p90(same_ratio) if same_ratio else None,
            "edgeft_raw_over_llama_bench": med(ratios(raw["same_ctx"])),
            "profile_ctx": {"edgeft_tps_samples": ours["profile_ctx"],
                            "edgeft_over_llama_bench": med(ratios(ours["profile_ctx"])),
                            "edgeft_raw_over_llama_bench": med(ratios(raw["profile_ctx"]))},
            "note": f"tg: {rounds} rounds of one llama-bench run (-n {tokens} -r 1, after its own warm-up) "
                    "and edgeft's greedy generation of as many tokens, back to back, order alternating; "
                    f"edgeft with llama-bench's context ({LLAMA_BENCH_CTX}) and, under profile_ctx, the "
                    "profile's; ratios: median over rounds (edgeft_raw: llama.cpp decode alone through "
                    "edgeft); pp: -p 64 -r 3 afterwards"}


def _flash_attn_pairs(eng, base_path: Path, adapter: tuple[str, Path], *, gpu_layers: int, use_mlock: bool,
                      tokens: int, rounds: int, say: Progress) -> dict:
    """edgeft's decode with llama.cpp's flash attention against without, at the profile's context:
    `eng` (off) and a second engine with it on, the same request back to back (order flipping
    every round), with no adapter and with `adapter`. Also: whether greedy text stays the same
    (ggml's CPU flash attention sums softmax @ V in f16, the plain path in f32)."""
    from .engine import Engine

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


def run_llama_bench(binary: str | os.PathLike, model: str | os.PathLike, *, threads: int, gpu_layers: int = 0,
                    repeats: int = 5, n_gen: int = 128, n_prompt: int = 64) -> dict:
    """llama.cpp's own `llama-bench` on the same model and threads: tg (decode) and pp tok/s.

    Flash attention off, as edgeft's context runs it; everything else at llama-bench's defaults."""
    exe = Path(binary).expanduser()
    if not exe.is_file() or not os.access(exe, os.X_OK):
        raise InputError(f"llama-bench not found or not executable: {exe}",
                         "build it from llama.cpp (cmake --build build --target llama-bench)")
    cmd = [str(exe), "-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
           "-r", str(repeats), "-ngl", str(gpu_layers), "-fa", "0", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise InputError(f"llama-bench failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}",
                         "an AMX/AVX-512 build dies with exit 132 on CPUs/VMs without them; build with GGML_NATIVE=OFF")
    rows = json.loads(proc.stdout[proc.stdout.index("["):])
    res: dict[str, Any] = {"cmd": " ".join(cmd), "tg_tps": None, "pp_tps": None}
    for row in rows:
        if row.get("n_gen", 0) > 0 and row.get("n_prompt", 0) == 0:
            res["tg_tps"], res["tg_std"] = float(row["avg_ts"]), float(row.get("stddev_ts", 0.0))
        elif row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0:
            res["pp_tps"], res["pp_std"] = float(row["avg_ts"]), float(row.get("stddev_ts", 0.0))
        res.setdefault("build", row.get("build_commit"))
    return res


# -- the benchmark --------------------------------------------------------------------------

def run_bench(base: str | None = None, adapters: Sequence[str] | None = None, *, profile: str = "laptop",
              threads: int | None = None, ctx: int | None = None, gpu_layers: int = 0,
              repeats: int | None = None, quick: bool = False, sweep: bool | None = None,
              llama_bench: str | os.PathLike | None = None, adapter_dirs: Sequence[str] = (),
              progress: Progress | None = None) -> dict:
    """Measure load, swap, TTFT, prefill, decode and memory; returns the result dict.

    adapters: refs (registered names, bundle folders, .gguf paths); none = two generated random
    rank-8 all-linear f32 adapters. quick: fewer repeats and no dtype sweep (under a minute on
    2 cores). sweep: decode ratio per adapter dtype x target set (default: on unless quick).
    """
    from .engine import Engine
    from .gguf_info import inspect_adapter
    from .models import resolve_base
    from .registry import find

    emit = progress or (lambda msg: log.info("%s", msg))
    t_start = time.perf_counter()
    phases: dict[str, float] = {}
    current = ["", t_start]

    def say(msg: str) -> None:  # progress, and seconds per phase (the text before the first comma)
        now = time.perf_counter()
        if current[0]:
            phases[current[0]] = phases.get(current[0], 0.0) + now - current[1]
        current[:] = [msg.split(",")[0], now]
        emit(msg)

    prof = resolve_profile(profile, threads=threads, ctx=ctx)
    reps = max(1, repeats if repeats is not None else (2 if quick else 5))
    sweep = (not quick) if sweep is None else sweep

    res: dict[str, Any] = {"edgeft_bench": 1, "quick": quick, "profile": asdict(prof), "repeats": reps}
    say("machine")
    res["machine"] = machine_info(prof.threads)
    bw = memory_bandwidth_gbs(repeats=3 if quick else 7)
    res["bandwidth"] = bw
    res["bandwidth_gbs"] = bw["best_gbs"]

    bm = resolve_base(base)
    base_path = Path(bm.path)
    tmp = tempfile.TemporaryDirectory(prefix="edgeft-bench-")
    work = Path(tmp.name)
    opened: list = []  # engines to close if a step fails
    try:
        # -- adapters under test ------------------------------------------------------------
        refs: list[tuple[str, Path, bool]] = []  # (name, gguf path, generated)
        if adapters:
            for ref in adapters:
                bundle = find(ref, adapter_dirs)
                refs.append((bundle.name, Path(bundle.gguf_path), False))
            if len({n for n, _, _ in refs}) != len(refs):
                raise InputError("the same adapter is listed twice", "give distinct adapters")
        else:
            say("writing two random adapters (rank 8; f32; all 7 projections)")
            for i, n in enumerate(("rand-a", "rand-b"), 1):
                refs.append((n, write_random_adapter(work / f"{n}.gguf", base_path, rank=8, seed=i), True))
        infos = [inspect_adapter(p) for _, p, _ in refs]
        res["base"] = {"id": bm.id, "path": str(base_path), "file_mb": base_path.stat().st_size / 1e6}
        res["adapters"] = [
            {"name": n, "path": str(p), "generated": gen, "file_mb": p.stat().st_size / 1e6,
             "tensor_mb": inf.nbytes / 1e6, "ranks": sorted(inf.ranks), "pairs": len(inf.pairs),
             "dtypes": sorted({d for _, d in inf.pairs.values()})}
            for (n, p, gen), inf in zip(refs, infos)]
        budget = None
        if prof.adapter_slots:
            budget = prof.adapter_slots * max(i.nbytes for i in infos) / 1e6

        # -- base load (page cache warm: the first load warms it and is not counted) ---------
        n_loads = 2 if quick else 4
        load_ms = []
        eng = None
        for i in range(n_loads + 1):
            say(f"base load, {i}/{n_loads}")
            if eng is not None:
                eng.close()
            eng = Engine(str(base_path), n_ctx=prof.n_ctx, n_threads=prof.threads, n_batch=prof.n_batch,
                         n_gpu_layers=gpu_layers, use_mlock=prof.use_mlock, memory_budget_mb=budget,
                         adapter_dirs=adapter_dirs)
            opened.append(eng)
            if i:
                load_ms.append(eng.load_ms)
        res["base"]["model_size_mb"] = eng._b.model_size_bytes() / 1e6
        res["base"]["n_ctx"], res["base"]["threads"] = eng.n_ctx, eng.n_threads
        _request(eng, PENALTY_PROMPT, {}, max_tokens=4)

        # -- adapter load from disk -----------------------------------------------------------
        say("adapter loads")
        ad_ll, ad_total, ad_first = [], [], []
        names = []
        for name, path, _ in refs:
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
            names.append(name)
        res["load_ms"] = {"base": _med(load_ms), "base_dist": dist(load_ms),
                          "adapter": dist(ad_ll), "adapter_with_validation": dist(ad_total),
                          "adapter_first_load": dist(ad_first)}

        a_sel = {names[0]: 1.0}
        b_sel = {names[1]: 1.0} if len(names) > 1 else {}
        ab_sel = {names[0]: 0.5, names[1]: 0.5} if len(names) > 1 else None
        res["swap_pair"] = [list(a_sel), list(b_sel) or ["none"]]

        # -- swap: tight loop, then in traffic with the next request's penalty ---------------
        say("swap (set adapters + KV invalidation)")
        tight = _swap_tight(eng, a_sel, b_sel, 200 if quick else 1000)
        say("swap penalty on the next request")
        pen = _swap_penalty(eng, a_sel, b_sel, PENALTY_PROMPT, (6 if quick else 12) * reps)  # 60 pairs: ~70 ms requests, +-10 ms
        res["swap_ms"] = dict(pen["swap_ms_in_traffic"], tight=dist(tight))
        res["swap_ttft_penalty_ms"] = dict(pen["penalty_ms"], detail=pen)

        # -- TTFT and prefill from a cleared KV cache ----------------------------------------
        prompts = [(label, eng.chat_prompt(msgs)) for label, msgs in prompt_set()]
        if quick:
            prompts = [p for p in prompts if p[0] == "task"]
        by_prompt = []
        samples: dict[tuple[str, str], list] = {}
        for r in range(reps):
            say(f"TTFT / prefill, round {r + 1}/{reps}")
            for mode, sel in (("base", {}), ("adapter", a_sel)):
                for label, text in prompts:
                    g = _ttft_cleared(eng, text, sel).gen
                    samples.setdefault((label, mode), []).append((g.ttft_ms, g.prompt_tokens))
        for label, _ in prompts:
            row: dict[str, Any] = {"prompt": label, "tokens": samples[(label, "base")][0][1]}
            for mode in ("base", "adapter"):
                t = _med([x for x, _ in samples[(label, mode)]])
                row[f"ttft_ms_{mode}"] = t
                row[f"prefill_tps_{mode}"] = row["tokens"] / (t / 1e3) if t else None
            by_prompt.append(row)
        std = next(r for r in by_prompt if r["prompt"] == "task")
        long = next((r for r in by_prompt if r["prompt"] == "long"), std)
        res["ttft_ms"] = {"base": std["ttft_ms_base"], "adapter": std["ttft_ms_adapter"],
                          "prompt": "task", "prompt_tokens": std["tokens"], "by_prompt": by_prompt}
        res["prefill_tps"] = {"base": long["prefill_tps_base"], "adapter": long["prefill_tps_adapter"],
                              "prompt": long["prompt"], "prompt_tokens": long["tokens"]}

        # -- merged GGUF of the first adapter ------------------------------------------------
        say("merging the first adapter into a copy of the base")
        merged_path, merged_eng, merged_info = None, None, {"reason": None}
        try:
            t0 = time.perf_counter()
            merged_path, tool = _make_merged(base_path, refs[0][1], work / "merged.gguf")
            merged_info.update(tool=tool, build_s=time.perf_counter() - t0, file_mb=merged_path.stat().st_size / 1e6,
                               adapter=names[0])
            merged_eng = Engine(str(merged_path), n_ctx=prof.n_ctx, n_threads=prof.threads, n_batch=prof.n_batch,
                                n_gpu_layers=gpu_layers, use_mlock=prof.use_mlock)
            opened.append(merged_eng)
            _request(merged_eng, PENALTY_PROMPT, {}, max_tokens=4)
        except Exception as e:  # report, do not abort the whole benchmark
            log.warning("merged GGUF unavailable: %s", e)
            merged_info["reason"] = f"{type(e).__name__}: {e}"
            merged_path = merged_eng = None

        # -- decode tok/s per mode -------------------------------------------------------------
        n_dec = 32 if quick else 64
        modes: dict[str, tuple[Any, dict]] = {"base": (eng, {}), "adapter": (eng, a_sel)}
        if ab_sel:
            modes["two_adapters"] = (eng, ab_sel)
        if merged_eng is not None:
            modes["merged"] = (merged_eng, {})
        lb_bin = None
        if llama_bench:
            lb_bin = Path(llama_bench).expanduser()
            if not lb_bin.is_file() or not os.access(lb_bin, os.X_OK):
                raise InputError(f"llama-bench not found or not executable: {lb_bin}",
                                 "build it from llama.cpp (cmake --build build --target llama-bench)")
        dec = _decode_runs(modes, reps if quick else 2 * reps, n_dec, say)  # 10 rounds (2 quick)
        lb_pairs = None
        if lb_bin is not None:  # right after edgeft's own decode rounds, on the same engine
            lb_pairs = _llama_bench_pairs(lb_bin, eng, base_path, threads=prof.threads, gpu_layers=gpu_layers,
                                          tokens=n_dec, rounds=3 if quick else 20, say=say)
        say("decode, token by token against a second context of the base")
        try:
            plain = Engine(str(base_path), n_ctx=prof.n_ctx, n_threads=prof.threads, n_batch=prof.n_batch,
                           n_gpu_layers=gpu_layers, use_mlock=prof.use_mlock)
            opened.append(plain)
            inter = _interleaved_decode(plain, {m: v for m, v in modes.items() if m != "base"}, 64 if quick else 256)
            plain.close()
            res["decode_ratio_interleaved"] = dict(
                {m: inter[m]["ratio"] if m in inter else None for m in ("adapter", "two_adapters", "merged")},
                detail=inter,
                note="llama.cpp decode alone, each mode against the bare base on a second context, alternating "
                     "token by token; median of per-token ratios (the headline decode ratio: drift cannot "
                     "separate the two sides)")
        except Exception as e:  # a second context may not fit (e.g. all layers on a small GPU);
            # the decode target then reads decode_ratio
            log.warning("token-by-token decode unavailable: %s", e)
            res["decode_ratio_interleaved"] = {"reason": f"{type(e).__name__}: {e}"}
        say("flash attention on / off")
        try:
            res["flash_attn"] = _flash_attn_pairs(eng, base_path, (names[0], refs[0][1]), gpu_layers=gpu_layers,
                                                  use_mlock=prof.use_mlock, tokens=n_dec, rounds=1 if quick else 8,
                                                  say=say)
        except Exception as e:  # a third engine may not fit (e.g. all layers on a small GPU): report, go on
            log.warning("flash attention comparison unavailable: %s", e)
            res["flash_attn"] = {"reason": f"{type(e).__name__}: {e}"}
        all_modes = ("base", "adapter", "two_adapters", "merged")
        decode_tps = {m: _med(dec[m]["tps"]) if m in dec else None for m in all_modes}
        raw = {m: {"wall_tps": _med(dec[m]["raw_wall"]), "cpu_tps": _med(dec[m]["raw_cpu"]),
                   "best_wall_tps": max(dec[m]["raw_wall"])} if m in dec else None
               for m in all_modes}
        res["decode_tps"] = dict(decode_tps, max_tokens=n_dec,
                                 tokens={m: d["tokens"] for m, d in dec.items()},
                                 samples={m: d["tps"] for m, d in dec.items()})
        res["decode_raw"] = dict(raw, note="llama.cpp decode alone (no sampling): wall tok/s and tok/s "
                                           "per CPU-second of the process (all threads)")
        # per-round ratios (the modes of one round run back to back), then their median: slow
        # drifts of the machine's load cancel out
        res["decode_ratio"] = {m: _med([x / y for x, y in zip(dec[m]["tps"], dec["base"]["tps"]) if y])
                               if m in dec else None for m in all_modes[1:]}
        res["decode_ratio_cpu"] = {m: _ratio((raw[m] or {}).get("cpu_tps"), raw["base"]["cpu_tps"])
                                   for m in all_modes[1:]}
        # other load only ever slows a run down: the best round is the least disturbed one
        res["decode_ratio_best"] = {m: _ratio(max(dec[m]["tps"]), max(dec["base"]["tps"])) if m in dec else None
                                    for m in all_modes[1:]}
        if merged_eng is not None:
            at, mt = dec["adapter"]["text"] or "", dec["merged"]["text"] or ""
            agree = next((i for i, (x, y) in enumerate(zip(at, mt)) if x != y), min(len(at), len(mt)))
            merged_info.update(greedy_agree_chars=agree, greedy_chars=len(at))
        res["merged"] = merged_info

        # -- reload per switch (the alternative) ---------------------------------------------
        say("reload per switch (new model + adapter each time)")
        paths = [p for _, p, _ in refs[:2]]
        rl = _reload_per_switch(base_path, prof, gpu_layers, paths, PENALTY_PROMPT, max(3, reps), use_mmap=False)
        rl_mmap = _reload_per_switch(base_path, prof, gpu_layers, paths, PENALTY_PROMPT, max(2, reps // 2), use_mmap=True)
        res["reload_ms"] = dict(rl["switch_ms"], first_request_ms=rl["first_request_ms"], use_mmap=False,
                                mmap=dict(rl_mmap["switch_ms"], first_request_ms=rl_mmap["first_request_ms"]))
        noswap = pen["request_ms_noswap"]["p50"]
        hot_cost = pen["penalty_ms"]["p50"]
        cold_cost = rl["switch_ms"]["p50"] + rl["first_request_ms"]["p50"] - noswap
        res["switch_ratio"] = {
            "reload_over_swap": _ratio(rl["switch_ms"]["p50"], res["swap_ms"]["p50"]),
            "reload_mmap_over_swap": _ratio(rl_mmap["switch_ms"]["p50"], res["swap_ms"]["p50"]),
            "effective": _ratio(cold_cost, max(hot_cost, res["swap_ms"]["p50"])),
            "note": "effective = (reload + first-request slowdown) / (swap + next-request slowdown)",
        }

        # -- decode cost per adapter dtype and target set --------------------------------------
        if sweep:
            res["decode_sweep"] = _decode_sweep(eng, base_path, work, reps, say, gpu_layers=gpu_layers)

        # -- evictions under the profile's adapter budget ---------------------------------------
        res["evictions"] = _evictions(eng, refs, budget, reps, say) if budget else None

        if merged_eng is not None:
            merged_eng.close()
        eng.close()

        # -- memory, in fresh processes ---------------------------------------------------------
        say("memory: base + resident adapters")
        common = dict(n_ctx=prof.n_ctx, threads=prof.threads, n_batch=prof.n_batch, gpu_layers=gpu_layers,
                      use_mlock=prof.use_mlock)
        counts = [1, 2, 4, 8]
        mem = _child(dict(common, mode="adapters", base=str(base_path), counts=counts,
                          adapters=[str(p) for _, p, _ in refs]))
        files_mb = [refs[(k - 1) % len(refs)][1].stat().st_size / 1e6 for k in range(1, 9)]
        with_ad = []
        for pt in mem["points"]:
            added = pt["mb"] - mem["base_mb"]
            fsum = sum(files_mb[: pt["n"]])
            with_ad.append({"n": pt["n"], "mb": pt["mb"], "added_mb": added, "files_mb": fsum,
                            "added_over_file": added / fsum})
        # What each resident adapter adds is the slope from the first to the last point; the first
        # adapter also pays a one-time cost (the validation code's first use: Python heap, ~2.5 MB),
        # reported on its own instead of being charged to every adapter.
        lo, hi = with_ad[0], with_ad[-1]
        slope = (hi["added_mb"] - lo["added_mb"]) / (hi["files_mb"] - lo["files_mb"]) if hi is not lo else lo["added_over_file"]
        rss = {"process": mem["process_mb"], "base": mem["base_mb"], "with_adapters": with_ad,
               "per_adapter_over_file": round(slope, 4),
               "first_adapter_extra_mb": round(lo["added_mb"] - slope * lo["files_mb"], 2)}
        if merged_path is not None:
            say("memory: one merged model per task")
            detail = _merged_memory(merged_path, work, common, counts, prof, mem, quick)
            rss["merged_models"] = detail.pop("points")
            rss["merged_detail"] = detail
        else:
            rss["merged_models"] = None
            rss["merged_detail"] = {"reason": merged_info["reason"]}
        res["rss_mb"] = rss

        # -- bandwidth bound -------------------------------------------------------------------
        model_b = res["base"]["model_size_mb"] * 1e6
        ad_b = infos[0].nbytes
        bound = {"base": bw["best_gbs"] * 1e9 / model_b, "adapter": bw["best_gbs"] * 1e9 / (model_b + ad_b)}
        res["decode_bound_tps"] = bound["base"]
        res["decode_bound"] = dict(bound, bytes_per_token_mb={"base": model_b / 1e6, "adapter": (model_b + ad_b) / 1e6},
                                   fraction={"base": _ratio(decode_tps["base"], bound["base"]),
                                             "adapter": _ratio(decode_tps["adapter"], bound["adapter"])})

        # -- llama.cpp's own tool --------------------------------------------------------------
        if lb_bin is not None:
            say("llama-bench prefill")
            lb = run_llama_bench(lb_bin, base_path, threads=prof.threads, gpu_layers=gpu_layers,
                                 repeats=3, n_gen=0, n_prompt=64)
            lb.update(lb_pairs)
            res["llama_bench"] = lb
        else:
            res["llama_bench"] = None
    finally:
        for e in opened:
            with contextlib.suppress(Exception):
                e.close()  # closing twice is a no-op
        with contextlib.suppress(Exception):
            tmp.cleanup()

    say("done")
    res["machine"]["load_avg_end"] = _loadavg()
    res["wall_s"] = time.perf_counter() - t_start
    res["phase_s"] = phases
    res["targets"] = evaluate_targets(res)
    return _rounded(res)


def _decode_sweep(eng, base_path: Path, work: Path, reps: int, say: Progress, gpu_layers: int = 0) -> dict:
    """llama.cpp decode speed with one rank-8 adapter relative to none, per adapter dtype x
    target set, token by token against a second context of the bare base
    (`_interleaved_decode`); and the all-linear rows again with ggml's fusions off, in a child."""
    from . import _llama
    from .engine import Engine

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


def _merged_memory(merged_path: Path, work: Path, common: dict, counts: list[int], prof: Profile,
                   mem: dict, quick: bool) -> dict:
    """RSS with N merged models loaded side by side (distinct files, as N tasks would be)."""
    per_model_guess = merged_path.stat().st_size / 1e6 * 1.5
    measure = []
    for n in counts:
        if quick and n > 1:
            break
        if prof.ram_budget_mb and mem["process_mb"] + n * per_model_guess > prof.ram_budget_mb:
            break
        measure.append(n)
    measure = measure or [1]
    models = [str(merged_path)]
    for k in range(2, measure[-1] + 1):
        dst = work / f"merged-{k}.gguf"
        shutil.copyfile(merged_path, dst)
        models.append(str(dst))
    probe = _child(dict(common, mode="models", models=models, counts=measure))
    pts = [{"n": p["n"], "mb": p["mb"], "estimated": False} for p in probe["points"]]
    per_model = (pts[-1]["mb"] - probe["process_mb"]) / pts[-1]["n"]
    for n in counts:
        if n > pts[-1]["n"]:
            pts.append({"n": n, "mb": probe["process_mb"] + n * per_model, "estimated": True})
    for k in range(2, measure[-1] + 1):
        with contextlib.suppress(OSError):
            (work / f"merged-{k}.gguf").unlink()
    return {"points": pts, "per_model_mb": per_model, "process_mb": probe["process_mb"],
            "file_mb": merged_path.stat().st_size / 1e6,
            "note": ("estimated points = measured process + n x measured per-model RSS"
                     + (" (quick run)" if quick else " (beyond the profile's RAM budget)")) if len(pts) > len(measure)
                    else "all points measured"}


# -- targets --------------------------------------------------------------------------------

def evaluate_targets(res: dict) -> list[dict]:
    """The runtime's targets, each with the measured value and whether it is met (None: not measured)."""
    def g(*keys):
        cur: Any = res
        for k in keys:
            if not isinstance(cur, dict) or cur.get(k) is None:
                return None
            cur = cur[k]
        return cur

    lb = g("llama_bench", "edgeft_over_llama_bench")
    rows = [
        ("swap p50 (set adapters + KV invalidation)", g("swap_ms", "p50"), "<=", 1.0, "ms"),
        ("next-request TTFT penalty p50", g("swap_ttft_penalty_ms", "p50"), "<=", 5.0, "ms"),
        ("reload-per-switch / swap", g("switch_ratio", "reload_over_swap"), ">=", 100.0, "x"),
        ("RSS added per resident adapter / file size", g("rss_mb", "per_adapter_over_file"), "<=", 1.1, "x"),
        ("decode with 1 adapter / without", g("decode_ratio_interleaved", "adapter") or g("decode_ratio", "adapter"),
         ">=", 0.90, "x"),
        ("edgeft decode / llama-bench tg", lb, ">=", 0.95, "x"),
    ]
    out = []
    for name, value, op, limit, unit in rows:
        met = None if value is None else (value <= limit if op == "<=" else value >= limit)
        out.append({"target": name, "value": value, "op": op, "limit": limit, "unit": unit, "met": met})
    return out


# -- plot -----------------------------------------------------------------------------------

def plot(res: dict, path: str | os.PathLike) -> Path:
    """A PNG with switch cost vs reload, memory vs number of tasks, and decode tok/s per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib", "pip install 'edgeft[bench]'") from None

    sweep = res.get("decode_sweep")
    fig, grid = plt.subplots(2, 2, figsize=(13, 9.5))
    axes = grid.ravel()
    load = res["machine"].get("load_avg_start")
    title = (f"edgeft bench: {res['base']['id']}, profile {res['profile']['name']}, "
             f"{res['machine']['threads_used']} thread(s), {res['machine']['cpu']}"
             + (f", load average {load[0]:.1f} at start" if load else ""))
    fig.suptitle(title, fontsize=10)

    ax = axes[0]
    labels = ["hot swap\n(set + KV)", "hot swap\n+ next-request\npenalty", "reload\n(mmap)", "reload\n(lora_path,\nno mmap)"]
    vals = [res["swap_ms"]["p50"], max(res["swap_ttft_penalty_ms"]["p50"] or 0, 0) + res["swap_ms"]["p50"],
            res["reload_ms"]["mmap"]["p50"], res["reload_ms"]["p50"]]
    bars = ax.bar(labels, vals, color=["#2a9d8f", "#8ab17d", "#e9c46a", "#e76f51"])
    ax.set_yscale("log")
    ax.set_ylabel("ms per switch (p50, log)")
    ax.set_title("switch cost")
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.3g} ms", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)

    ax = axes[1]
    rss = res["rss_mb"]
    xs = [0] + [p["n"] for p in rss["with_adapters"]]
    ax.plot(xs, [rss["base"]] + [p["mb"] for p in rss["with_adapters"]], "o-", color="#2a9d8f",
            label="1 base + N adapters")
    mm = rss.get("merged_models")
    if mm:
        meas = [p for p in mm if not p["estimated"]]
        est = [p for p in mm if p["estimated"]]
        ax.plot([p["n"] for p in meas], [p["mb"] for p in meas], "s-", color="#e76f51", label="N merged models")
        if est:
            ax.plot([meas[-1]["n"]] + [p["n"] for p in est], [meas[-1]["mb"]] + [p["mb"] for p in est], "s--",
                    color="#e76f51", alpha=0.6, label="N merged models (estimated)")
    ax.set_xlabel("tasks (N)")
    ax.set_ylabel("process RSS, MB")
    ax.set_title("memory vs number of tasks")
    ax.legend(fontsize=8)

    ax = axes[2]
    d = res["decode_tps"]
    modes = [("base", "no adapter"), ("adapter", "1 adapter"), ("two_adapters", "2 mixed"), ("merged", "merged GGUF")]
    names = [lbl for m, lbl in modes if d.get(m)]
    vals = [d[m] for m, _ in modes if d.get(m)]
    colors = ["#264653"] + ["#2a9d8f"] * (len(vals) - 1)
    lb = res.get("llama_bench")
    if lb and lb.get("tg_tps"):
        names.append(f"llama-bench\ntg{lb.get('tg_tokens', '')}")
        vals.append(lb["tg_tps"])
        colors.append("#e9c46a")
    bars = ax.bar(names, vals, color=colors)
    ax.axhline(res["decode_bound_tps"], ls="--", color="grey")
    ax.text(-0.4, res["decode_bound_tps"], f"bandwidth bound {res['decode_bound_tps']:.0f}", va="bottom", fontsize=8)
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("decode tok/s (greedy, median)")
    ax.set_title("decode speed per mode")
    ax.tick_params(axis="x", labelsize=8)

    if not sweep:
        axes[3].axis("off")
    else:
        ax = axes[3]
        tsets = list(TARGET_SETS)
        key = "ratio"
        width = 0.8 / len(ADAPTER_DTYPES)
        for j, dt in enumerate(ADAPTER_DTYPES):
            ys = [next((r[key] for r in sweep["rows"] if r["dtype"] == dt and r["targets"] == t), 0) or 0
                  for t in tsets]
            ax.bar(np.arange(len(tsets)) + (j - 1) * width, ys, width, label=dt)
        ax.axhline(0.9, ls="--", color="grey")
        ax.set_xticks(np.arange(len(tsets)), tsets)
        ax.set_ylim(0.5, 1.05)
        ax.set_ylabel("decode tok/s with / without adapter")
        ax.set_title("rank-8 adapter cost by dtype and targets")
        ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
