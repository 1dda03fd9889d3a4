"""Adapter selections as users write them ("ner", "ner=0.5,style", {"ner": 1.0}, ["ner=1", "style"])
-> {reference: scale}, with every scale checked before it reaches llama.cpp."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence, Union

from .errors import InputError

AdapterSpec = Union[None, str, Mapping[str, float], Sequence[str]]
MAX_SCALE = 16.0   # |scale| of one adapter; far beyond any useful mix, and far from Inf in llama.cpp


def _scale(ref: str, v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise InputError(f"adapter scale for '{ref}' is not a number: {v!r}") from None
    if isinstance(v, bool) or not math.isfinite(x) or abs(x) > MAX_SCALE:
        raise InputError(f"adapter scale for '{ref}' must be a finite number from -{MAX_SCALE:g} to {MAX_SCALE:g}, got {v!r}")
    return x


def parse_adapter_spec(spec: AdapterSpec) -> dict[str, float]:
    """None / "none" / "ner" / "ner=0.5,style=1" / ["ner=1", "style"] / {"ner": 1.0} -> {ref: scale}."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return {str(k): _scale(str(k), v) for k, v in spec.items()}
    items: list[str] = []
    for part in ([spec] if isinstance(spec, str) else list(spec)):
        items.extend(p.strip() for p in str(part).split(",") if p.strip())
    out = {}
    for item in items:
        if item.lower() == "none":
            continue
        ref, sep, scale = item.rpartition("=") if "=" in item else (item, "", "1")
        try:
            float(scale)
        except ValueError:
            raise InputError(f"bad adapter scale in '{item}'", "write NAME or NAME=SCALE, e.g. ner=0.5") from None
        out[ref.strip()] = _scale(ref.strip(), scale)
    return out


UNSET: Any = object()   # "adapter= not given": the selected set (None means the bare base)
