"""A JSON schema as llama-cpp-python's server turns it into a grammar: a response format's, a forced tool's parameters.

The server's converter writes a `const`, an `enum` value and a property name as their JSON text inside a GBNF
literal without escaping that text's backslashes, and llama.cpp reads the JSON's escapes as its own: "\\u0000"
became a NUL no token writes (the server aborted, SIGABRT "Unexpected empty grammar stack"), a `"` inside a value
or a property name ended the literal early (SIGSEGV), "a\\\\b" came back as "a" and a backspace, a line break raw
(not JSON), an emoji as two surrogates (an empty string). One request killed the server for every tenant.
ctxkit cannot patch the server: a string value it would write wrong is sent as the `pattern` that accepts that
string alone (schema_for_grammar writes a pattern's characters as their JSON escapes), and what has no such rewrite
(a property name, an object or array value holding such a string) is refused before it is sent.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import RequestError
from .schema_grammar import _ANNOTATIONS, _SUB_LIST, _SUB_MAP, _SUB_ONE, held_only_escaped, schema_for_grammar

_REGEX_SPECIAL = frozenset("^$.|?*+()[]{}")


def schema_for_server_grammar(schema: Any, where: str) -> Any:
    """`schema` as llama-cpp-python's server converter writes it correctly: its odd string values as patterns,
    then rewritten as LlamaCppBackend rewrites it (schema_for_grammar: sent as written, a `"maxLength": 2000` made
    GBNF the server could not parse, and sampling without it killed the server). RequestError naming `where` (the
    schema's place in the request) for what the server cannot follow."""
    rewritten = _literals_as_patterns(schema, where)
    try:
        return schema_for_grammar(rewritten, root=True)
    except ValueError as exc:  # a pattern's count, or a class, no grammar holds
        raise RequestError(f"the model's server cannot follow this schema: {exc}", where) from exc


def _literals_as_patterns(schema: Any, where: str) -> Any:
    """`schema` with each `const`/`enum` string the converter would write wrong as a pattern, at every depth."""
    if isinstance(schema, list):  # an old draft's tuple of `items`
        return [_literals_as_patterns(item, f"{where}[{i}]") for i, item in enumerate(schema)]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SUB_ONE:
            out[key] = _literals_as_patterns(value, f"{where}.{key}")
        elif key in _SUB_LIST and isinstance(value, list):
            out[key] = [_literals_as_patterns(v, f"{where}.{key}[{i}]") for i, v in enumerate(value)]
        elif key in _SUB_MAP and isinstance(value, dict):
            for name in value if key == "properties" else ():
                if _misread(name):
                    raise _unfollowable(f"the property name {json.dumps(name)}", f"{where}.properties")
            out[key] = {name: _literals_as_patterns(v, f"{where}.{key}.{name}") for name, v in value.items()}
        else:
            out[key] = value
    annotations = {k: v for k, v in out.items() if k in _ANNOTATIONS}
    if "const" in out and _misread_within(out["const"], f"{where}.const"):
        return {**annotations, **_only_strings([out["const"]])}  # the value decides alone: other keywords go
    values = out.get("enum")
    if isinstance(values, list) and any(_misread_within(v, f"{where}.enum[{i}]") for i, v in enumerate(values)):
        strings = [v for v in values if isinstance(v, str)]
        others = [v for v in values if not isinstance(v, str)]
        branches = [_only_strings(strings)] + ([{"enum": others}] if others else [])
        return {**annotations, **(branches[0] if len(branches) == 1 else {"anyOf": branches})}
    return out


def _misread_within(value: Any, where: str) -> bool:
    """Whether `value` is a string the converter writes wrong; RequestError when an object or array holds one (no
    pattern stands for it)."""
    if isinstance(value, str):
        return _misread(value)
    if _holds_misread(value):
        raise _unfollowable(f"the value {json.dumps(value)[:80]}", where)
    return False


def _holds_misread(value: Any) -> bool:
    if isinstance(value, str):
        return _misread(value)
    if isinstance(value, dict):
        return any(_misread(k) or _holds_misread(v) for k, v in value.items())
    return isinstance(value, list) and any(_holds_misread(v) for v in value)


def _misread(text: str) -> bool:
    """Whether the converter writes `text` wrong: it has a character whose JSON escape (a quote, a backslash, a
    control character, one past U+FFFF as two surrogates) llama.cpp reads as its own escape."""
    return any(held_only_escaped(c) or ord(c) > 0xFFFF for c in text)


def _only_strings(strings: list[str]) -> dict[str, Any]:
    """A schema that accepts exactly `strings`: one pattern, each character a JSON string holds only escaped
    written as a `\\uXXXX` (which schema_for_grammar writes as its JSON escape)."""
    alternatives = "|".join("".join(_pattern_character(c) for c in text) for text in strings)
    return {"type": "string", "pattern": f"^({alternatives})$"}


def _pattern_character(c: str) -> str:
    if held_only_escaped(c):
        return f"\\u{ord(c):04X}"
    return "\\" + c if c in _REGEX_SPECIAL else c


def _unfollowable(what: str, where: str) -> RequestError:
    return RequestError(f"{what} holds a quote, a backslash, a control character or a character past U+FFFF, which "
                        "llama-cpp-python's server writes wrong in its grammar (it killed the server): the model's "
                        "server cannot follow this schema", where)
