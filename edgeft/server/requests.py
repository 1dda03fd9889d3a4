"""Request parsing and limits: an OpenAI request body -> a checked GenRequest, or a 400 ApiError.

Nothing here needs a socket or an engine: every function takes the parsed JSON body (a dict).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..bundles import AdapterBundle
from ..engine import parse_adapter_spec
from ..errors import InputError
from ..grammars import schema_to_gbnf
from .errors import ApiError, _bad, _from_edgeft, _utf8

MAX_STOP = 16               # stop sequences per request
MAX_STOP_CHARS = 256
MAX_MIX = 8                 # adapters mixed in one request


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_int(body: dict, key: str, lo: int, hi: int | None = None, *, what: str = "") -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if not _is_int(v):
        raise _bad(f"'{key}' must be an integer", key)
    if v < lo or (hi is not None and v > hi):
        raise _bad(f"'{key}' must be between {lo} and {hi}{what}" if hi is not None else f"'{key}' must be >= {lo}",
                   key, "integer_out_of_range" if hi is not None else None)
    return v


def _opt_num(body: dict, key: str, lo: float, hi: float) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(f"'{key}' must be a number", key)
    if not lo <= v <= hi:
        raise _bad(f"'{key}' must be between {lo:g} and {hi:g}", key)
    return float(v)


def _opt_bool(body: dict, key: str, default: bool) -> bool:
    v = body.get(key, default)
    if not isinstance(v, bool):
        raise _bad(f"'{key}' must be a boolean", key)
    return v


def _stops(body: dict) -> list[str] | None:
    v = body.get("stop")
    if v is None:
        return None
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise _bad("'stop' must be a non-empty string or a list of them", "stop")
    if len(items) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in items):
        raise _bad(f"at most {MAX_STOP} stop sequences of at most {MAX_STOP_CHARS} characters", "stop")
    return [_utf8(s, "stop") for s in items]


_JSON_OBJECT_GBNF: str | None = None


def _schema_grammar(schema: dict) -> str:
    try:
        return schema_to_gbnf(schema)
    except InputError as e:
        raise _bad(e.message, "response_format") from None


def _response_format(body: dict) -> tuple[bool, str | None]:
    """(overrides the card's constraint?, grammar or None)."""
    global _JSON_OBJECT_GBNF
    rf = body.get("response_format")
    if rf is None:
        return False, None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise _bad("'response_format' must be an object with a 'type'", "response_format")
    kind = rf["type"]
    if kind == "text":
        return True, None
    if kind == "json_object":
        if _JSON_OBJECT_GBNF is None:
            _JSON_OBJECT_GBNF = _schema_grammar({"type": "object"})
        return True, _JSON_OBJECT_GBNF
    if kind == "json_schema":
        js = rf.get("json_schema")
        schema = js.get("schema") if isinstance(js, dict) else None
        if not isinstance(schema, dict):
            raise _bad("'response_format.json_schema.schema' must be a JSON schema object", "response_format")
        return True, _schema_grammar(schema)
    raise _bad(f"unknown response_format type '{kind}'", "response_format")


def _text_content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return _utf8(content, "messages")
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise _bad(f"messages[{i}].content: only text parts are supported", "messages")
            parts.append(p["text"])
        return _utf8("".join(parts), "messages")
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", "messages")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a string 'role'", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}]: unsupported role '{m['role']}'", "messages")
        out.append({"role": role, "content": _text_content(m.get("content"), i)})
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise _bad("'messages' needs at least one non-empty user message", "messages")
    return out


def _prompt(body: dict) -> str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if not isinstance(p, str):
        raise _bad("'prompt' must be a string (one prompt per request)", "prompt")
    if not p:
        raise _bad("'prompt' is empty", "prompt")
    return _utf8(p, "prompt")


@dataclass
class GenRequest:
    kind: str                         # "chat" | "completion"
    model: str
    adapters: dict[str, float]        # name -> scale
    bundles: dict[str, AdapterBundle]  # registry bundles for names not yet resident
    messages: list[dict] = field(default_factory=list)
    prompt: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    format_set: bool = False
    grammar: str | None = None
    use_card: bool = True
    include_usage: bool = False
    ignore_eos: bool = False          # extension (as llama-server, vLLM): answer up to max_tokens

    @property
    def key(self) -> tuple:
        return tuple(sorted(self.adapters.items()))



def _wanted_adapters(model: Any, mix: Any, base_id: str) -> dict[str, float]:
    """`model` (+ the `adapters` extension) -> {name: scale}; the names are not looked up here."""
    if not isinstance(model, str) or not model.strip():
        raise _bad("'model' must be a non-empty string", "model")
    m = model.strip()
    wanted: dict[str, float] = {}
    if m != base_id:
        base_part, sep, name = m.rpartition(":")
        if sep and base_part != base_id:
            raise ApiError(404, f"model '{m}' does not exist: this server runs base '{base_id}'",
                           param="model", code="model_not_found")
        if name and name != base_id:
            wanted[name] = 1.0
    if mix is not None:
        if isinstance(mix, dict):
            for k, v in mix.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > 16:
                    raise _bad(f"adapter scale for '{k}' must be a finite number", "adapters")
        elif not (isinstance(mix, str) or (isinstance(mix, list) and all(isinstance(x, str) for x in mix))):
            raise _bad("'adapters' must be an object {name: scale}, a list of names or a string", "adapters")
        try:
            extra = parse_adapter_spec(mix)
        except InputError as e:
            raise _from_edgeft(e, "adapters") from None
        for k, v in extra.items():
            if not math.isfinite(v):
                raise _bad(f"adapter scale for '{k}' must be a finite number", "adapters")
        wanted.update(extra)
    if len(wanted) > MAX_MIX:
        raise _bad(f"at most {MAX_MIX} adapters per request", "adapters")
    return wanted


def _gen_request(body: dict, kind: str, adapters: dict[str, float], bundles: dict[str, AdapterBundle],
                 max_tokens_limit: int) -> GenRequest:
    """The rest of a chat or completion body, once `model`/`adapters` are resolved. The
    `response_format` is not read here: converting a schema can take a moment (see
    `_response_format`)."""
    req = GenRequest(kind=kind, model=body["model"], adapters=adapters, bundles=bundles)
    if kind == "chat":
        req.messages = _messages(body)
    else:
        req.prompt = _prompt(body)
        bo = body.get("best_of")
        for k, unsupported in (("echo", bool(body.get("echo"))), ("suffix", bool(body.get("suffix"))),
                               ("best_of", bo is not None and bo != 1)):
            if unsupported:
                raise _bad(f"'{k}' is not supported by edgeft serve", k)
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs"):
        raise _bad("logprobs are not supported by edgeft serve", "logprobs")
    mt = _opt_int(body, "max_completion_tokens", 1, max_tokens_limit, what=" (the server's --max-tokens-limit)")
    if mt is None:
        mt = _opt_int(body, "max_tokens", 1, max_tokens_limit, what=" (the server's --max-tokens-limit)")
    req.max_tokens = mt
    req.temperature = _opt_num(body, "temperature", 0.0, 2.0)
    top_p = _opt_num(body, "top_p", 0.0, 1.0)
    req.top_p = 1.0 if top_p is None else top_p
    req.top_k = _opt_int(body, "top_k", 0, 1 << 20) or 0
    min_p = _opt_num(body, "min_p", 0.0, 1.0)
    req.min_p = min_p or 0.0
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _bad("'seed' must be an integer", "seed")
    req.seed = seed
    req.stop = _stops(body)
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad("only n=1 is supported", "n")
    if body.get("tools"):
        raise _bad("tools are not supported by edgeft serve", "tools")
    req.use_card = _opt_bool(body, "use_task_card", True)
    req.ignore_eos = _opt_bool(body, "ignore_eos", False)
    _opt_bool(body, "stream", False)
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise _bad("'stream_options' must be an object", "stream_options")
        req.include_usage = bool(so.get("include_usage"))
    return req
