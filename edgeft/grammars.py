"""The one gate for output grammars before llama.cpp sees them, for task cards, the CLI and the
server alike: JSON schemas with bounded repetition, properties and nesting and local `$ref`s
only; GBNF text with bounded size and nesting. llama.cpp parses grammars recursively and
aborts or segfaults on what these limits keep out (FACTS: `maxLength` 1e5 / `maxItems` 1e7
segfault, 1e9 runs for minutes). A grammar whose language is empty passes here; the sampler
refuses it at the first token instead of letting llama.cpp abort (`_llama.Sampler.sample`).
"""

from __future__ import annotations

import re
from typing import Any

from .errors import InputError, shown

# A JSON schema becomes a GBNF grammar that llama.cpp parses recursively: the converter spells
# `maxLength: n` (and `{0,n}` in patterns) as n nested optional groups, and llama.cpp rejects
# ~2000 levels and crashes the process (stack overflow) at ~20000. Hence these limits.
MAX_SCHEMA_REPEAT = 1000          # minLength/maxLength/minItems/maxItems/... and {m,n} in patterns
MAX_SCHEMA_PROPERTIES = 256       # per object: the grammar grows with the square of optional ones
MAX_SCHEMA_DEPTH = 64
MAX_GBNF_DEPTH = 1024             # parenthesis nesting of a grammar
MAX_GBNF_CHARS = 256 * 1024
_REPEAT_KEYS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
                "minContains", "maxContains")
_PATTERN_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
_HINT = "simplify the JSON schema"


def check_schema(node: Any, depth: int = 0) -> None:
    """Only local `#/...` references (llama-cpp-python's converter would fetch https:// ones) and
    bounded repetition, properties and nesting, before the converter sees the schema."""
    if depth > MAX_SCHEMA_DEPTH:
        raise InputError("the JSON schema is nested too deeply", _HINT)
    if isinstance(node, dict):
        ref = node.get("$ref")
        if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
            raise InputError("only local '$ref's ('#/...') are allowed in the JSON schema", _HINT)
        for k in _REPEAT_KEYS:
            v = node.get(k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v < 0:
                raise InputError(f"'{k}' must be a non-negative number in a JSON schema, got {shown(v)}", _HINT)
            if v > MAX_SCHEMA_REPEAT:
                raise InputError(f"'{k}' above {MAX_SCHEMA_REPEAT} is not supported in a JSON schema", _HINT)
        pattern = node.get("pattern")
        if pattern is not None:
            if not isinstance(pattern, str):
                raise InputError("'pattern' must be a string in a JSON schema", _HINT)
            for m in _PATTERN_REPEAT.finditer(pattern):
                if any(g and int(g) > MAX_SCHEMA_REPEAT for g in m.groups()):
                    raise InputError(f"repetition counts above {MAX_SCHEMA_REPEAT} are not supported in a 'pattern'",
                                     _HINT)
        props = node.get("properties")
        if isinstance(props, dict) and len(props) > MAX_SCHEMA_PROPERTIES:
            raise InputError(f"at most {MAX_SCHEMA_PROPERTIES} properties per object in a JSON schema", _HINT)
        for v in node.values():
            check_schema(v, depth + 1)
    elif isinstance(node, list):
        for v in node:
            check_schema(v, depth + 1)


def gbnf_depth(g: str) -> int:
    """Deepest parenthesis nesting in GBNF text (string literals, classes and comments skipped)."""
    depth = deepest = i = 0
    n = len(g)
    while i < n:
        c = g[i]
        if c in "\"[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and g[i] != close:
                i += 2 if g[i] == "\\" else 1
        elif c == "#":
            while i < n and g[i] != "\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return deepest


def check_gbnf(g: Any) -> str:
    """A GBNF grammar's text, refused when it is not text, empty, too large or nested too deeply."""
    if not isinstance(g, str) or not g.strip():
        raise InputError("the grammar must be non-empty GBNF text", "give rules like: root ::= \"yes\" | \"no\"")
    if len(g) > MAX_GBNF_CHARS or gbnf_depth(g) > MAX_GBNF_DEPTH:
        raise InputError(f"the grammar is too large or nests too deeply (at most {MAX_GBNF_CHARS} characters, "
                         f"{MAX_GBNF_DEPTH} levels)", "simplify the grammar")
    if "root" not in g:
        raise InputError("the grammar has no 'root' rule", "start it with: root ::= ...")
    return g


def schema_to_gbnf(schema: Any) -> str:
    """A checked JSON schema -> checked GBNF (llama-cpp-python's converter, via `_llama`)."""
    from . import _llama

    if not isinstance(schema, dict):
        raise InputError("a JSON schema must be an object", _HINT)
    check_schema(schema)
    try:
        g = _llama.json_schema_to_gbnf(schema)
    except RecursionError:
        raise InputError("the JSON schema is too complex (a cyclic or too deep '$ref')", _HINT) from None
    except Exception as e:  # the converter asserts, raises or recurses on what it does not support
        raise InputError(f"unsupported JSON schema: {type(e).__name__}: {str(e)[:200]}", _HINT) from None
    if len(g) > MAX_GBNF_CHARS or gbnf_depth(g) > MAX_GBNF_DEPTH:
        raise InputError("the JSON schema is too complex (its grammar nests too deeply or is too large)", _HINT)
    return g
