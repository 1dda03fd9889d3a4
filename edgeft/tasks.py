"""Task cards: what an adapter is for and how to talk to it.

The card (`adapter.json` in a bundle) carries the system prompt, the user-message template,
generation defaults and an output constraint (labels, JSON schema or GBNF grammar) that the
runtime enforces with a llama.cpp grammar. Training and evaluation build prompts through the
same `TaskSpec.messages`, so an adapter sees at run time exactly what it saw in training.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import AdapterError, InputError, shown

OUTPUT_TYPES = ("text", "labels", "json_schema", "grammar")
METRICS = ("classification", "parsing", "style")   # task "metric" values (edgeft/task_metrics.py)


MAX_LABELS = 1000
MAX_TOKENS = 32768


def _obj(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise AdapterError(f"task card: {where} must be an object, got {type(v).__name__}")
    return v


def _num(d: dict, key: str, default: Any, lo: float, hi: float, whole: bool = False) -> Any:
    v = d.get(key, default)
    ok = isinstance(v, int) if whole else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not math.isfinite(v) or not lo <= v <= hi:
        kind = "a whole number" if whole else "a number"
        raise AdapterError(f"task card: generation.{key} must be {kind} from {lo:g} to {hi:g}, got {shown(v)}")
    return int(v) if whole else float(v)


def _gbnf_literal(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


@dataclass
class OutputSpec:
    type: str = "text"
    labels: list[str] | None = None
    schema: dict | None = None
    gbnf: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or self.type not in OUTPUT_TYPES:
            raise AdapterError(f"task card: unknown output type {shown(self.type)}", f"use one of {', '.join(OUTPUT_TYPES)}")
        if self.labels is not None:
            if not isinstance(self.labels, list) or not all(isinstance(x, str) and x.strip() for x in self.labels):
                raise AdapterError("task card: output.labels must be a list of non-empty strings")
            if len(self.labels) > MAX_LABELS or any(len(x) > 200 for x in self.labels):
                raise AdapterError(f"task card: at most {MAX_LABELS} labels of at most 200 characters")
        if self.type == "labels" and not self.labels:
            raise AdapterError("task card: output type 'labels' needs a non-empty 'labels' list")
        if self.type == "json_schema" and not isinstance(self.schema, dict):
            raise AdapterError("task card: output type 'json_schema' needs a 'schema' object")
        if self.type == "grammar" and (not isinstance(self.gbnf, str) or not self.gbnf.strip()):
            raise AdapterError("task card: output type 'grammar' needs a 'gbnf' string")

    def grammar(self) -> str | None:
        """GBNF text for llama.cpp's grammar sampler, or None for free text. Converting a JSON
        schema takes milliseconds and every `Engine.run` asks, so the text is kept per spec
        (keyed by its content, so an edited spec converts again)."""
        try:
            key = (self.type, tuple(self.labels or ()), json.dumps(self.schema, sort_keys=True) if self.schema else None,
                   self.gbnf)
        except (RecursionError, TypeError, ValueError):   # a schema no converter takes: refused below
            key = None
        cached = self.__dict__.get("_grammar")
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        if self.type == "labels":
            g: str | None = "root ::= " + " | ".join(_gbnf_literal(lab) for lab in self.labels or [])
        elif self.type == "json_schema":
            from .grammars import schema_to_gbnf   # checked: limits, local $refs only

            g = schema_to_gbnf(self.schema or {})
        elif self.type == "grammar":
            from .grammars import check_gbnf

            g = check_gbnf(self.gbnf)
        else:
            g = None
        self.__dict__["_grammar"] = (key, g)   # not a dataclass field: asdict / eq never see it
        return g

    def parse(self, text: str) -> Any:
        """The answer as a value: a label, a parsed JSON value, or the text. Raises InputError if invalid."""
        t = text.strip()
        if self.type == "labels":
            if t not in (self.labels or []):
                raise InputError(f"output {t!r} is not one of the labels {self.labels}")
            return t
        if self.type == "json_schema":
            try:
                return json.loads(t)
            except ValueError as e:
                raise InputError(f"output is not valid JSON: {e}") from None
        return t

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class TaskSpec:
    system: str | None = None
    template: str = "{input}"
    output: OutputSpec = field(default_factory=OutputSpec)
    max_tokens: int = 256
    temperature: float = 0.0
    stop: list[str] = field(default_factory=list)
    few_shot: list[dict] = field(default_factory=list)  # [{"input": ..., "output": ...}] for prompting baselines
    # which task metrics `edgeft eval` reports (None: chosen from the output type, as before):
    # "classification" | "parsing" | "style", or {"kind": ..., ...options} (style: {"lexicon": [...]})
    metric: str | dict | None = None

    @property
    def metric_name(self) -> str | None:
        """The metric kind the card asks for (the string, or the dict's "kind")."""
        return self.metric.get("kind") if isinstance(self.metric, dict) else self.metric

    @classmethod
    def from_dict(cls, d: Any) -> "TaskSpec":
        """A card's `task` section, checked field by field (the field is named in the error)."""
        d = dict(_obj(d, "task"))
        out = _obj(d.pop("output", None) or {}, "task.output")
        unknown = set(out) - {"type", "labels", "schema", "gbnf"}
        if unknown:
            raise AdapterError(f"task card: unknown key(s) in task.output: {', '.join(sorted(map(str, unknown)))}",
                               "use type, labels, schema or gbnf")
        gen = _obj(d.pop("generation", None) or {}, "task.generation")
        known = {k: d[k] for k in ("system", "template", "few_shot", "metric") if k in d}
        if known.get("system") is not None and not isinstance(known["system"], str):
            raise AdapterError("task card: task.system must be a string")
        if "template" in known and (not isinstance(known["template"], str) or "{input}" not in known["template"]):
            raise AdapterError("task card: 'template' must be a string that contains {input}")
        shots = known.get("few_shot", [])
        if not isinstance(shots, list) or not all(isinstance(x, dict) and isinstance(x.get("input"), str)
                                                  and isinstance(x.get("output"), str) for x in shots):
            raise AdapterError('task card: task.few_shot must be a list of {"input": str, "output": str}')
        spec = cls(output=OutputSpec(**out), **known)
        m = spec.metric_name
        if spec.metric is not None and (not isinstance(m, str) or m not in METRICS):
            raise AdapterError(f"task card: unknown metric {shown(spec.metric)}", f"use one of {', '.join(METRICS)}")
        spec.max_tokens = _num(gen, "max_tokens", spec.max_tokens, 1, MAX_TOKENS, whole=True)
        spec.temperature = _num(gen, "temperature", spec.temperature, 0.0, 100.0)
        stop = gen.get("stop", spec.stop)
        if stop is None:
            stop = []
        if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop) or len(stop) > 16:
            raise AdapterError("task card: task.generation.stop must be a list of at most 16 non-empty strings")
        spec.stop = list(stop)
        return spec

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"system": self.system, "template": self.template, "output": self.output.to_dict(),
                             "generation": {"max_tokens": self.max_tokens, "temperature": self.temperature,
                                            "stop": self.stop}}
        if self.few_shot:
            d["few_shot"] = self.few_shot
        if self.metric is not None:
            d["metric"] = self.metric
        return d

    def user_message(self, text: str) -> str:
        return self.template.replace("{input}", text)

    def messages(self, text: str, *, system: str | None | bool = True, shots: int = 0) -> list[dict]:
        """Chat messages for one input; `system=False` drops the system prompt, a str replaces it."""
        if not isinstance(text, str) or not text.strip():
            raise InputError("empty input", "give some text to work on")
        return self.conversation([{"role": "user", "content": self.user_message(text)}], system=system, shots=shots)

    def conversation(self, history: list[dict], *, system: str | None | bool = True, shots: int = 0) -> list[dict]:
        """The card's system prompt and few-shot turns, then `history` (user/assistant turns, the
        last one a user turn) as it is: how a multi-turn chat row is prompted."""
        sys_prompt = self.system if system is True else (system or None)
        msgs: list[dict] = [{"role": "system", "content": sys_prompt}] if sys_prompt else []
        for ex in self.few_shot[:shots]:
            msgs.append({"role": "user", "content": self.user_message(ex["input"])})
            msgs.append({"role": "assistant", "content": ex["output"]})
        msgs.extend(dict(m) for m in history)
        return msgs
