"""Summaries of samples: percentiles, medians, ratios that tolerate missing values, and the
rounding applied to the whole report."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


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


def _p10_p90(values: Sequence[float]) -> list[float]:
    return [float(np.percentile(values, 10)), float(np.percentile(values, 90))]
