"""Measurements in a fresh Python process (`_child`): resident memory with a clean heap (one
base + N adapters, or N merged models side by side), and decode ratios under an environment
that llama.cpp reads once at start-up (`_interleaved_probe`, e.g. ggml's CPU fusions off).

The probes (`_memory_probe`, `_interleaved_probe`) run in the child; the other functions run
in the bench's process and start it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from .machine import rss_mb
from .profiles import PENALTY_PROMPT, Profile


def _child(spec: dict, probe: str = "_memory_probe", env: dict[str, str] | None = None) -> dict:
    """Run `probe(spec)` (a function of this module) in a fresh Python process: clean heap and
    RSS, or environment that llama.cpp reads once at start-up (`env`)."""
    code = ("import json, sys; from edgeft.bench import probes; "
            f"json.dump(probes.{probe}(json.loads(sys.argv[1])), sys.stdout)")
    child_env = dict(os.environ)
    child_env.pop("EDGEFT_VERBOSE", None)
    child_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          timeout=600, env=child_env)
    if proc.returncode != 0:
        raise RuntimeError(f"{probe} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def _interleaved_probe(spec: dict) -> dict:
    """In a fresh process: `_interleaved_decode` of each adapter against the bare base, for a
    process whose environment differs (e.g. ggml's CPU fusions off)."""
    from .. import _llama
    from ..engine import Engine
    from .measure import _interleaved_decode  # measure runs its probes through _child

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
    from ..engine import Engine

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


def adapter_memory(common: dict, base_path: Path, adapter_paths: list[Path], counts: list[int]) -> dict:
    """RSS of one base + N resident adapters (cycling through `adapter_paths`), in a fresh process."""
    mem = _child(dict(common, mode="adapters", base=str(base_path), counts=counts,
                      adapters=[str(p) for p in adapter_paths]))
    files_mb = [adapter_paths[(k - 1) % len(adapter_paths)].stat().st_size / 1e6 for k in range(1, max(counts) + 1)]
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
    return {"process": mem["process_mb"], "base": mem["base_mb"], "with_adapters": with_ad,
            "per_adapter_over_file": round(slope, 4),
            "first_adapter_extra_mb": round(lo["added_mb"] - slope * lo["files_mb"], 2)}


def _merged_memory(merged_path: Path, work: Path, common: dict, counts: list[int], prof: Profile,
                   process_mb: float, quick: bool) -> dict:
    """RSS with N merged models loaded side by side (distinct files, as N tasks would be)."""
    per_model_guess = merged_path.stat().st_size / 1e6 * 1.5
    measure = []
    for n in counts:
        if quick and n > 1:
            break
        if prof.ram_budget_mb and process_mb + n * per_model_guess > prof.ram_budget_mb:
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
