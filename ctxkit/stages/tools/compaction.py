"""Schema compaction: the same tool, in fewer tokens, accepting exactly the same arguments.

Only what cannot change validation is removed:
- annotations no validator reads: `$comment`, and a `title` that says nothing new (at the root, restating the
  property name as Pydantic writes it, or beside a description that already has all its words); a title that is
  the value's only description ("Start date YYYY-MM-DD") or says what it does not ("Amount in US cents") stays;
- keywords that state the default behaviour: `required: []`, and `additionalProperties: true` beside no
  `properties` (`properties: {}` stays: OpenAI refuses an object schema without `properties`, and
  llama.cpp's grammar reads `{"type": "object"}` as any object but `properties: {}` as `{}` only; beside
  `properties`, `additionalProperties: true` stays too, since llama.cpp's grammar reads its absence as false);
- a `default` that the description states right after the word ("... Default is 5", "default: 5"), since
  the model reads the description anyway;
- runs of whitespace in descriptions.
Constraints (`type`, `enum`, `required`, `minimum`, `pattern`, `format`, ...) and `examples` are kept.
The walk knows which keywords hold subschemas, so a property that happens to be *named* `title` or
`default` is never touched. tests/test_tools_compaction.py checks equivalence on generated examples.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .text import split_identifier, stem

Tool = dict[str, Any]

_WHITESPACE = re.compile(r"\s+")
# Keywords whose value is one subschema, a list of subschemas, or a map of name -> subschema.
_ONE = frozenset({"items", "additionalProperties", "additionalItems", "contains", "not", "if", "then", "else",
                  "propertyNames", "unevaluatedItems", "unevaluatedProperties"})
_LIST = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_MAP = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def compact_tool(tool: Tool) -> Tool:
    """A compacted copy of an OpenAI tool schema; the input is not modified."""
    function = dict(tool.get("function") or {})
    if isinstance(function.get("description"), str):
        function["description"] = _squeeze(function["description"])
    if isinstance(function.get("parameters"), dict):
        # OpenAI's strict mode refuses an object schema without `required` (even an empty one): kept there.
        function["parameters"] = compact_schema(function["parameters"], keep_empty_required=function.get("strict") is True)
    return {**tool, "function": function}


def compact_schema(schema: Any, *, _unevaluated: bool | None = None, _name: str | None = None,
                   _root: bool = True, keep_empty_required: bool = False) -> Any:
    """A compacted copy of a JSON Schema (draft 2020-12 / 7 keywords)."""
    if _unevaluated is None:
        # `additionalProperties: true` is a no-op only where no `unevaluatedProperties` looks at what was
        # evaluated: it marks every property as evaluated, so dropping it would reject arguments.
        _unevaluated = "unevaluatedProperties" in json.dumps(schema)
    if not isinstance(schema, dict):
        return schema  # `true` / `false` schemas, or something malformed that validation reports
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$comment" and isinstance(value, str):
            continue
        if key == "title" and isinstance(value, str) and _title_is_redundant(schema, value, _name, _root):
            continue
        if key == "additionalProperties" and value is True and not _unevaluated and "properties" not in schema:
            continue
        if key == "required" and value == [] and not keep_empty_required:
            continue
        if key == "description" and isinstance(value, str):
            out[key] = _squeeze(value)
        elif key in _ONE:
            out[key] = ([compact_schema(v, _unevaluated=_unevaluated, _name=_name, _root=False,
                                       keep_empty_required=keep_empty_required) for v in value]
                        if isinstance(value, list)
                        else compact_schema(value, _unevaluated=_unevaluated, _name=_name, _root=False,
                                       keep_empty_required=keep_empty_required))
        elif key in _LIST and isinstance(value, list):
            out[key] = [compact_schema(v, _unevaluated=_unevaluated, _name=_name, _root=False,
                                       keep_empty_required=keep_empty_required) for v in value]
        elif key in _MAP and isinstance(value, dict):
            out[key] = {name: compact_schema(v, _unevaluated=_unevaluated, _name=name, _root=False,
                                         keep_empty_required=keep_empty_required)
                        for name, v in value.items()}
        else:
            out[key] = value  # constraints and data (enum, const, default, examples) unchanged
    if "default" in out and _states_default(out.get("description"), out["default"]):
        del out["default"]
    return out


def _title_is_redundant(schema: dict[str, Any], title: str, name: str | None, root: bool) -> bool:
    """A title tells the model nothing new at the root (the tool has a name and description), beside a
    description, or when it only restates the property's name ("start_date" -> "Start Date", as Pydantic
    writes it). Any other title is the only text that describes the value ("Start date YYYY-MM-DD"): kept."""
    if root:
        return True
    words = [stem(w) for w in split_identifier(title)]
    if name is not None and words == [stem(w) for w in split_identifier(name)]:
        return True
    # Beside a description, only a title whose every word the description (or the name) already says: "Amount
    # in US cents" beside "How much to charge." is the only place the unit is written.
    description = schema.get("description")
    if isinstance(description, str):
        said = {stem(w) for w in split_identifier(description + " " + (name or ""))}
        return all(w in said for w in words)
    return False


def _squeeze(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def _states_default(description: Any, default: Any) -> bool:
    if not isinstance(description, str) or isinstance(default, (dict, list)):
        return False
    lowered = description.lower()
    if "default" not in lowered:
        return False
    shown = {str(default).lower(), repr(default).lower()}
    if isinstance(default, bool):
        shown.add(str(default).lower())
    # The value must be what "default" says, right after it ("Default is 3", "defaults to 'major'", "(default:
    # 10)"), not anywhere later ("Default: f for US users, c elsewhere" states no default of "c").
    return any(re.search(rf"\bdefault(?:s|ed)?\b(?:[\s:=(]*\b(?:is|to|value|of|be|will|set|as)\b)*[\s:=(\"'`]*"
                         rf"{re.escape(s)}(?![\w]|\.\d)", lowered) for s in shown if s.strip())
