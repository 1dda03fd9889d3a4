"""Task cards: what an adapter is for and how to talk to it.

The card (`adapter.json` in a bundle) carries the system prompt, the user-message template,
generation defaults and an output constraint (labels, JSON schema or GBNF grammar) that the
runtime enforces with a llama.cpp grammar. Training and evaluation build prompts through the
same `TaskSpec.messages`, so an adapter sees at run time exactly what it saw in training.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import AdapterError, InputError

OUTPUT_TYPES = ("text", "labels", "json_schema", "grammar")


def _gbnf_literal(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


@dataclass
class OutputSpec:
    type: str = "text"
    labels: list[str] | None = None
    schema: dict | None = None
    gbnf: str | None = None

    def __post_init__(self) -> None:
        if self.type not in OUTPUT_TYPES:
            raise AdapterError(f"task card: unknown output type '{self.type}'", f"use one of {', '.join(OUTPUT_TYPES)}")
        if self.type == "labels" and not self.labels:
            raise AdapterError("task card: output type 'labels' needs a non-empty 'labels' list")
        if self.type == "json_schema" and not isinstance(self.schema, dict):
            raise AdapterError("task card: output type 'json_schema' needs a 'schema' object")
        if self.type == "grammar" and not self.gbnf:
            raise AdapterError("task card: output type 'grammar' needs a 'gbnf' string")

    def grammar(self) -> str | None:
        """GBNF text for llama.cpp's grammar sampler, or None for free text."""
        if self.type == "labels":
            return "root ::= " + " | ".join(_gbnf_literal(lab) for lab in self.labels or [])
        if self.type == "json_schema":
            from . import _llama  # the one module that imports llama_cpp

            return _llama.json_schema_to_gbnf(self.schema or {})
        if self.type == "grammar":
            return self.gbnf
        return None

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

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSpec":
        d = dict(d)
        out = d.pop("output", None) or {}
        gen = d.pop("generation", None) or {}
        known = {k: d[k] for k in ("system", "template", "few_shot") if k in d}
        spec = cls(output=OutputSpec(**out), **known)
        spec.max_tokens = int(gen.get("max_tokens", spec.max_tokens))
        spec.temperature = float(gen.get("temperature", spec.temperature))
        spec.stop = list(gen.get("stop", spec.stop))
        if "{input}" not in spec.template:
            raise AdapterError("task card: 'template' must contain {input}")
        return spec

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"system": self.system, "template": self.template, "output": self.output.to_dict(),
                             "generation": {"max_tokens": self.max_tokens, "temperature": self.temperature,
                                            "stop": self.stop}}
        if self.few_shot:
            d["few_shot"] = self.few_shot
        return d

    def user_message(self, text: str) -> str:
        return self.template.replace("{input}", text)

    def messages(self, text: str, *, system: str | None | bool = True, shots: int = 0) -> list[dict]:
        """Chat messages for one input; `system=False` drops the system prompt, a str replaces it."""
        if not text or not text.strip():
            raise InputError("empty input", "give some text to work on")
        sys_prompt = self.system if system is True else (system or None)
        msgs: list[dict] = [{"role": "system", "content": sys_prompt}] if sys_prompt else []
        for ex in self.few_shot[:shots]:
            msgs.append({"role": "user", "content": self.user_message(ex["input"])})
            msgs.append({"role": "assistant", "content": ex["output"]})
        msgs.append({"role": "user", "content": self.user_message(text)})
        return msgs
