"""JSON Schema to a llama.cpp grammar (GBNF): what a grammar can hold of a tool's parameters or a response format's
schema, written so llama-cpp-python's converter holds it, and the check after generation for what it cannot.

The converter (llama_cpp.llama_grammar) leaves out much of JSON Schema: it ignores `minimum`/`maximum`, reads a
`"type": [...]` list as a bare union that drops every other keyword, counts array items only when they have a
schema, refuses unanchored patterns and `(?:`, and copies regex escapes (`\\d`) that GBNF does not have. Each is
rewritten here before the converter sees the schema (schema_for_grammar) or handled as it converts (schema_to_gbnf).
What no grammar holds (`multipleOf`, `format: email`, fractional bounds, `uniqueItems`, `oneOf`'s "exactly one") is
checked on the call the model made (schema_violation) and on the answer a response format asked for (format_violation).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
import sys
from array import array
from typing import Any

_ANNOTATIONS = frozenset({"title", "description", "$comment", "default", "examples", "deprecated", "readOnly",
                          "writeOnly", "$id", "$anchor", "$schema"})
_ANY_TYPE = ["string", "number", "boolean", "object", "array", "null"]
_SUB_ONE = frozenset({"items", "additionalProperties", "additionalItems", "contains", "not", "if", "then", "else",
                      "propertyNames", "unevaluatedItems", "unevaluatedProperties"})
_SUB_LIST = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SUB_MAP = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def schema_for_grammar(schema: Any, *, root: bool = False) -> Any:
    """`schema` as the converter can hold it: each subschema that accepts any value (and is not the arguments
    object itself) spelled out as `"type": [every type]`, which the converter turns into a grammar for any JSON
    value; a type list as one branch per type; an array count with an item schema to count; a pattern anchored
    and in the converter's regex syntax; a small integer range as an enum."""
    if not isinstance(schema, dict):
        return schema
    if not root and set(schema) <= _ANNOTATIONS:
        return {**schema, "type": list(_ANY_TYPE)}
    types = schema.get("type")
    if isinstance(types, list) and set(schema) - _ANNOTATIONS - {"type"}:
        # The converter reads `"type": [...]` as a bare union and drops every other keyword (a nullable
        # 1-to-5 integer took any integer, a nullable object any object): one branch per type keeps them.
        rest = {k: v for k, v in schema.items() if k != "type"}
        return schema_for_grammar({"anyOf": [{**rest, "type": t} for t in types]})
    schema = _without_wide_maximum(_whole_counts(schema))
    if schema.get("type") == "array" and "items" not in schema and "prefixItems" not in schema and (
            "minItems" in schema or "maxItems" in schema):  # the converter counts items only when they have a schema
        schema = {**schema, "items": {"type": list(_ANY_TYPE)}}
    if isinstance(schema.get("pattern"), str):
        schema = {**schema, "pattern": _anchored(schema["pattern"])}
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SUB_ONE:
            out[key] = [schema_for_grammar(v) for v in value] if isinstance(value, list) else schema_for_grammar(value)
        elif key in _SUB_LIST and isinstance(value, list):
            out[key] = [schema_for_grammar(v) for v in value]
        elif key in _SUB_MAP and isinstance(value, dict):
            out[key] = {name: schema_for_grammar(v) for name, v in value.items()}
        else:
            out[key] = value
    return _integer_range(out)


# The converter writes a count's optional copies (maxLength - minLength of them) as that many nested groups: llama.cpp
# refuses more than this many ("exceeds sane defaults": `"maxLength": 2000` was "cannot follow this schema"), and
# ~10,000 overflow its parser's stack (`"maxLength": 20000` killed the process, SIGSEGV). A wider maximum is left
# out of the grammar: max_tokens ends the value first, and a tool call or an answer past it is refused after
# (schema_violation, format_violation).
MAX_GRAMMAR_SPAN = 1000


_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")


def _whole_counts(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with a count written as a float (`"maxLength": 20.0`, which JSON Schema takes as the integer 20) as
    an int: the converter multiplied a string by it and refused the schema."""
    whole = {k: int(v) for k in _COUNTS if isinstance(v := schema.get(k), float) and v.is_integer()}
    return {**schema, **whole} if whole else schema


def _without_wide_maximum(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` without a maxLength/maxItems more than MAX_GRAMMAR_SPAN past its minimum."""
    wide = set()
    for high, low in (("maxLength", "minLength"), ("maxItems", "minItems")):
        most, least = _count(schema.get(high)), _count(schema.get(low)) or 0
        if most is not None and most - least > MAX_GRAMMAR_SPAN:
            wide.add(high)
    return {k: v for k, v in schema.items() if k not in wide} if wide else schema


def _count(value: Any) -> int | None:
    """`value` when it is an integer count (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# A regex quantifier: {n}, {n,} or {n,m}, and as Python's re (the check after generation) reads them, {,m} and {,}
_QUANTIFIER = re.compile(r"\{(\d*)(,(\d*))?\}")


def _bounded_quantifier(pattern: str, at: int) -> tuple[str, int] | None:
    """The quantifier at `at` as the grammar holds it and its length, None when there is none: a count past
    MAX_GRAMMAR_REPETITIONS is a ValueError (n copies, as minLength's), a maximum more than MAX_GRAMMAR_SPAN past
    the minimum is left out (`{0,20000}` killed the process, as maxLength's)."""
    match = _QUANTIFIER.match(pattern, at)
    if match is None or (not match[1] and match[2] is None):  # "{}" is the two characters
        return None
    low, high = int(match[1] or 0), match[3]
    if low > MAX_GRAMMAR_REPETITIONS:
        raise ValueError(f"pattern quantifier {match[0]} is more than a grammar holds "
                         f"(at most {MAX_GRAMMAR_REPETITIONS})")
    if match[2] is not None and high and int(high) - low > MAX_GRAMMAR_SPAN:
        return f"{{{low},}}", len(match[0])
    return f"{{{low}{match[2] or ''}}}", len(match[0])  # {,m} written {0,m}, which the converter takes


# What a pattern anchored at one end only may have at its other end, in the grammar: JSON string characters, a few
# (the schema allows any number; a 135M model given them all rambles to max_tokens).
_UNANCHORED_SIDE = '[^"\\\\\\x00-\\x1F]{0,32}'


def _anchored(pattern: str) -> str:
    """`pattern` as the converter takes it: anchored at both ends (it refuses any other), in the regex syntax it
    reads. JSON Schema's patterns match anywhere in the string: one anchored at one end only ("\\.pdf$") gets room
    for other text at the other end; one with no anchor ("[0-9]{5}") is held to its match alone, which the schema
    accepts too (room on both sides made a small model fill them: "}}  # This will return the value12345")."""
    branches = _top_level_branches(pattern)
    if len(branches) > 1:  # "^$|^\\d{5}$": the converter reads an anchor inside as the character "^" or "$"
        return "^(" + "|".join(_anchored(branch)[1:-1] for branch in branches) + ")$"
    start = pattern.startswith("^")
    end = pattern.endswith("$") and not pattern.endswith("\\$")
    core = _converter_syntax(pattern[1 if start else 0: len(pattern) - 1 if end else len(pattern)])
    if not start and not end:
        return f"^({core})$"
    return ("^" if start else "^" + _UNANCHORED_SIDE) + f"({core})" + ("$" if end else _UNANCHORED_SIDE + "$")


def _top_level_branches(pattern: str) -> list[str]:
    """`pattern` split at each `|` outside groups and classes (itself alone when it has none)."""
    branches: list[str] = []
    depth, in_class, class_start, start, i = 0, False, -1, 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]" or i == class_start  # a "]" first in a class is a member
        elif c == "[":
            in_class = True
            class_start = i + 2 if pattern.startswith("[^", i) else i + 1
        elif c in "()":
            depth += 1 if c == "(" else -1
        elif c == "|" and depth == 0:
            branches.append(pattern[start:i])
            start = i + 1
        i += 1
    return [*branches, pattern[start:]]


# Shorthand classes in the regex syntax the converter copies into the grammar as written, where llama.cpp's GBNF
# has no such escape (`^\\d{5}$` made the tool refused): outside a class and inside one.
# A negated one leaves out what a JSON string cannot hold unescaped: a quote, a backslash, control characters.
_SHORTHANDS = {"d": ("[0-9]", "0-9"), "D": ('[^0-9"\\\\\\x00-\\x1F]', None),
               "w": ("[a-zA-Z0-9_]", "a-zA-Z0-9_"), "W": ('[^a-zA-Z0-9_"\\\\\\x00-\\x1F]', None),
               "s": ("[ ]", " "), "S": ('[^ "\\\\\\x00-\\x1F]', None)}


_LONE_BRACKETS = {"{": "\\x7B", "}": "\\x7D", "]": "\\x5D"}


def _converter_syntax(pattern: str) -> str:
    """A pattern's escapes as the grammar can hold them: `\\d`, `\\w`, `\\s` and their negations as classes, an
    escaped punctuation mark (`\\.`, `\\$`) as a class of its hex escape, `(?:` as a plain group (the converter
    refuses `(?`); a character a JSON string holds only escaped (`\\n`, `\\x00`, `"`) as that escape. Other escapes
    (`\\b`, `\\u00e9`) are left as written, for the converter to take or refuse."""
    out: list[str] = []
    in_class = False
    class_start = -1  # where the class's first member is: a "]" there is a member, not the class's end
    class_out = -1  # where the class begins in `out`
    i = 0
    while i < len(pattern):
        c = pattern[i]
        escaped = None if in_class else _escaped_character(pattern, i)
        if escaped is not None and _json_escaped(escaped[0]) is not None:
            out.append(f"({_json_escaped(escaped[0])})")
            i += escaped[1]
            continue
        if c == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            shorthand = _SHORTHANDS.get(nxt, (None, None))[in_class]
            if shorthand is not None:
                out.append(shorthand)
            elif not nxt.isalnum() and nxt.isascii():
                hex_escape = f"\\x{ord(nxt):02X}"
                out.append(hex_escape if in_class else f"[{hex_escape}]")
            else:
                out.append(c + nxt)
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
            class_start = i + 2 if pattern.startswith("[^", i) else i + 1
            class_out = len(out)
        elif c == "]" and in_class and i != class_start:  # "[^\\[]": the "[" before this "]" was escaped
            in_class = False
            opened = class_start - (2 if pattern[class_start - 1] == "^" else 1)
            only_escaped = _only_escaped(pattern[opened:i + 1])
            if only_escaped is not None:
                del out[class_out:]
                out.append(only_escaped)
                i += 1
                continue
            if pattern[class_start - 1] == "^":  # as the negated shorthands: what a JSON string cannot hold raw
                out.append('"\\\\\\x00-\\x1F')
        elif c == "(" and not in_class and pattern.startswith("(?:", i):
            out.append("(")
            i += 3
            continue
        elif c == "{" and not in_class and (quantifier := _bounded_quantifier(pattern, i)) is not None:
            out.append(quantifier[0])
            i += quantifier[1]
            continue
        elif c in _LONE_BRACKETS and (not in_class or (c == "]" and i == class_start)):
            # A bracket that opens or closes nothing ("a{b}", "a{,2}", "x]", "[]a]") is the character, as Python
            # reads it: the converter loops for ever on a lone "}" or "]", holding the request and the thread.
            out.append(_LONE_BRACKETS[c] if in_class else f"[{_LONE_BRACKETS[c]}]")
            i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


# The escapes that name one character, and the character: what a JSON string may hold only escaped is written so.
_NAMED_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a", '"': '"', "\\": "\\"}
_HEX_ESCAPE = re.compile(r"\\(?:x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))")


def _escaped_character(pattern: str, at: int) -> tuple[str, int] | None:
    """The one character the pattern names at `at` (a raw one, `\\n`, `\\x00`, `\\u0000`) and how long it is
    written, None when something else starts there (a class, a group, `\\d`)."""
    if pattern[at] != "\\":
        return (pattern[at], 1) if pattern[at] not in "[](){}|.*+?^$" else None
    if (hex_escape := _HEX_ESCAPE.match(pattern, at)) is not None:
        code = int(next(group for group in hex_escape.groups() if group), 16)
        return (chr(code), len(hex_escape[0])) if code <= 0x10FFFF else None
    named = _NAMED_ESCAPES.get(pattern[at + 1: at + 2])
    return (named, 2) if named is not None else None


def held_only_escaped(character: str) -> bool:
    """Whether a JSON string holds `character` only escaped: a quote, a backslash, a control character, a lone
    surrogate."""
    code = ord(character)
    return code < 0x20 or character in '"\\' or 0xD800 <= code <= 0xDFFF


def _json_escaped(character: str) -> str | None:
    """How a JSON string writes `character`, in the converter's regex syntax, when it cannot hold it raw
    (held_only_escaped); None when it can. Written raw, such a character ended or broke the JSON string, and a NUL,
    which no token writes, left llama.cpp nothing to sample: the process aborted ("Unexpected empty grammar stack")."""
    if not held_only_escaped(character):
        return None
    return "".join(f"[\\x{ord(c):02X}]" if not c.isalnum() else c for c in json.dumps(character)[1:-1])


# What a JSON string holds raw, in ASCII: most classes match one of these
_PRINTABLE_ASCII = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\\\')


def _only_escaped(character_class: str) -> str | None:
    """A class that matches only characters a JSON string holds escaped (`[\\x00]`, `[\\n\\t]`, `[^\\x20-\\U0010FFFF]`), as
    the alternatives of their escapes; None for any other class. As the grammar's class it held no character a
    token writes (a NUL, or none at all once the negated class left out what a JSON string cannot hold raw), and
    llama.cpp, with nothing to sample, aborted the process. A class that matches nothing is a ValueError."""
    try:
        if re.search(character_class, _PRINTABLE_ASCII):  # most classes: no need to look further
            return None
    except re.error:  # not Python's syntax (`[\\p{L}]`): left as written, for the converter to take or refuse
        return None
    every_character = _every_character()
    if re.search(character_class, every_character[0]):
        return None
    escaped = [_json_escaped(c) for c in re.findall(character_class, every_character[1])]
    if not escaped:
        raise ValueError(f"pattern class {character_class} matches no character a JSON string holds")
    return "(" + "|".join(e for e in escaped if e) + ")"


@functools.cache
def _every_character() -> tuple[str, str]:
    """Every character a JSON string holds raw, and every one it holds only escaped. The raw ones are decoded from
    their code points at once: a str per character (chr, findall) took 0.3 s of CPU and 104 MB on the request that
    first needed them."""
    raw = (range(0x20, 0x22), range(0x23, 0x5C), range(0x5D, 0xD800), range(0xE000, 0x110000))  # but " \ surrogates
    escaped = (range(0x20), (0x22, 0x5C), range(0xD800, 0xE000))
    utf_32 = "utf-32-le" if sys.byteorder == "little" else "utf-32-be"
    return array("I", itertools.chain(*raw)).tobytes().decode(utf_32), "".join(map(chr, itertools.chain(*escaped)))


_MAX_ENUMERATED = 128  # integers a bounded range is spelled out as, at most: each alternative costs every sampled token (1..1000 doubled a tool call's latency)


def _integer_range(schema: dict[str, Any]) -> dict[str, Any]:
    """An integer schema with `minimum`/`maximum` (or the exclusive ones) and a range of at most 128 values,
    spelled out as an `enum`: llama-cpp-python's converter ignores the bounds ("TODO: support minimum,
    maximum"), so a `days` of 1 to 7 came back as 10 and 25 from a grammar said to follow the schema."""
    if schema.get("type") != "integer" or "enum" in schema or "const" in schema:
        return schema

    def bound(key: str) -> int | float | None:  # an int as it is: float() moved bounds past 2**53
        value = schema.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    lows = [v for v in (bound("minimum"),) if v is not None]
    lows += [math.floor(v) + 1 for v in (bound("exclusiveMinimum"),) if v is not None]
    highs = [v for v in (bound("maximum"),) if v is not None]
    highs += [math.ceil(v) - 1 for v in (bound("exclusiveMaximum"),) if v is not None]
    if not lows or not highs:
        return schema
    low, high = math.ceil(max(lows)), math.floor(min(highs))
    if high - low + 1 > _MAX_ENUMERATED or high < low:
        return schema
    multiple = schema.get("multipleOf")
    values = [n for n in range(low, high + 1)
              if not (isinstance(multiple, int) and not isinstance(multiple, bool) and multiple > 0 and n % multiple)]
    return {**schema, "enum": values} if values else schema


def hoist_definitions(parameters: dict[str, Any], prefix: str, definitions: dict[str, Any]) -> dict[str, Any]:
    """`parameters` with its `$defs`/`definitions` moved into `definitions` under `prefix`ed names, and its
    `$ref`s rewritten to match: nested under the call's "arguments", a `#/$defs/X` would resolve from the
    wrong root (Pydantic writes one for every nested model)."""
    local = {**(parameters.get("definitions") or {}), **(parameters.get("$defs") or {})}
    if not local:
        return parameters

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            # Only `$ref` strings change: a key named "definitions" may be a *property* (a map's key), and
            # the hoisted `$defs` are dropped from the top level alone, below.
            out = {k: rewrite(v) for k, v in node.items()}
            ref = node.get("$ref")
            if isinstance(ref, str):
                for root in ("#/$defs/", "#/definitions/"):
                    if ref.startswith(root):
                        out["$ref"] = f"#/$defs/{prefix}{ref[len(root):]}"
            return out
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node

    for name, definition in local.items():
        definitions[f"{prefix}{name}"] = rewrite(definition)
    return rewrite({k: v for k, v in parameters.items() if k not in ("$defs", "definitions")})


def schema_to_gbnf(schema: dict[str, Any], prop_order: list[str]) -> str:
    """llama-cpp-python's converter, with integer bounds (`minimum` and the others) kept in the grammar: it ignores
    them ("TODO: support minimum, maximum"), so `minimum: 1` came back as -5 and 0."""
    from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

    class BoundedIntegers(SchemaConverter):  # type: ignore[misc]
        def _format_literal(self, literal: str) -> str:
            return _gbnf_literal(literal)

        def visit(self, schema: Any, name: str) -> str:
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            _check_repetitions(schema)
            if isinstance(schema, dict) and (bounds := _integer_bounds(schema)) is not None:
                return str(self._add_rule(rule_name, f"({_integer_range_rule(*bounds)}) space"))
            if isinstance(schema, dict) and (bounds := _whole_number_bounds(schema)) is not None:
                return str(self._add_rule(rule_name, f"({_number_range_rule(*bounds)}) space"))
            return str(super().visit(schema, name))

    converter = BoundedIntegers(prop_order={name: i for i, name in enumerate(prop_order)}, allow_fetch=False,
                                dotall=False, raw_pattern=False)
    converter.visit(converter.resolve_refs(schema, "stdin"), "")
    return str(converter.format_grammar())


def _gbnf_literal(text: str) -> str:
    """`text` as a GBNF literal. The converter's own escapes `"` and line breaks but not `\\`, and it is handed JSON
    (a `const`, an `enum` value, a property name): llama.cpp read the JSON's escapes as its own, so "\\u0000" became a
    NUL no token can write (the process aborted at sampling), "a\\\\b" the answer "a\\b" (a backspace), an emoji's
    "\\ud83d\\ude00" two surrogates, and a `"` inside a value ended the literal (the schema refused)."""
    escaped = _raw_where_json_allows(text)
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "\\r").replace("\n", "\\n")
    return f'"{escaped}"'


_LONE_SURROGATE = re.compile("[\\ud800-\\udfff]")


def _raw_where_json_allows(text: str) -> str:
    """The JSON `text` (written ASCII-only, as json.dumps does) with each character a JSON string holds raw written
    raw: escaped, "Zürich" was the literal "Z\\u00fcrich", which the model had to spell out (15 tokens for 9) and an
    app read back as that text. What a JSON string holds only escaped (a control character, a quote, a backslash, a
    lone surrogate) stays escaped."""
    try:
        value = json.loads(text)
    except ValueError:  # not JSON: as it is
        return text
    raw = json.dumps(value, ensure_ascii=False)
    return _LONE_SURROGATE.sub(lambda lone: f"\\u{ord(lone[0]):04x}", raw)


# The converter writes a `minLength`/`minItems` of n as n copies of the item's rule: `"minLength": 100000000` (a
# 200-byte request) took 26 s and 2 GB to build its 500 MB grammar, before llama.cpp parsed it. No answer in a
# context window is that long, so a count past this one is refused instead.
MAX_GRAMMAR_REPETITIONS = 65536


def _check_repetitions(schema: Any) -> None:
    """ValueError naming the count when `schema` asks for more repetitions than a grammar is built with."""
    if not isinstance(schema, dict):
        return
    for key in ("minLength", "minItems"):
        count = schema.get(key)
        if isinstance(count, int) and not isinstance(count, bool) and count > MAX_GRAMMAR_REPETITIONS:
            raise ValueError(f"{key} {count} is more than a grammar holds (at most {MAX_GRAMMAR_REPETITIONS})")


def _integer_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None] | None:
    """The inclusive (low, high) of a bounded integer schema (None: unbounded on that side); None when it has no
    bounds, or keywords that decide the grammar instead (an `enum`, a `const`)."""
    if schema.get("type") != "integer" or "enum" in schema or "const" in schema:
        return None

    def number(key: str) -> int | float | None:  # an int as it is: float() moved bounds past 2**53 (2**53 + 3 to + 4)
        value = schema.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    lows = [math.ceil(v) for v in (number("minimum"),) if v is not None]
    lows += [math.floor(v) + 1 for v in (number("exclusiveMinimum"),) if v is not None]
    highs = [math.floor(v) for v in (number("maximum"),) if v is not None]
    highs += [math.ceil(v) - 1 for v in (number("exclusiveMaximum"),) if v is not None]
    if not lows and not highs:
        return None
    low, high = (max(lows) if lows else None), (min(highs) if highs else None)
    if low is not None and high is not None and low > high:
        return None  # no integer fits: left to the converter (and to the check after generation)
    return low, high


def _whole_number_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None] | None:
    """The (minimum, maximum) of a `number` schema bounded by whole numbers, inclusively (0 to 1, at least 0); None
    for any other (exclusive or fractional bounds, `multipleOf`: left to the check after generation)."""
    if schema.get("type") != "number" or {"enum", "const", "multipleOf", "exclusiveMinimum", "exclusiveMaximum"} & set(schema):
        return None
    bounds = [schema.get("minimum"), schema.get("maximum")]
    if bounds == [None, None] or not all(
            b is None or (isinstance(b, (int, float)) and not isinstance(b, bool) and float(b).is_integer())
            for b in bounds):
        return None
    low, high = (None if b is None else int(b) for b in bounds)
    return None if low is not None and high is not None and low > high else (low, high)


_FRACTION = '("." [0-9]{1,15})?'  # no exponent: 1e9 would leave the bounds unchecked


def _number_range_rule(low: int | None, high: int | None) -> str:
    """GBNF for the numbers from `low` to `high` (whole numbers; None: unbounded): an integral part below the upper
    bound takes any fraction, the bound itself none. Signs are split as in _integer_range_rule."""
    parts = []
    if high is None or high >= 0:
        start = max(low or 0, 0)
        below = _integer_range_rule(start, None if high is None else high - 1)
        if below:
            parts.append(f"({below}) {_FRACTION}")
        if high is not None:
            parts.append(f'"{high}"')
    if low is None or low < 0:
        least = 0 if high is None else max(-high, 0)  # magnitudes of the negative side: least to -low
        below = _integer_range_rule(least, None if low is None else -low - 1)
        alternatives = [f"({below}) {_FRACTION}"] if below else []
        if low is not None:
            alternatives.append(f'"{-low}"')
        parts.append(f'"-" ({" | ".join(alternatives)})')
    return " | ".join(parts)


_MAX_DIGITS = 16  # as the converter's own integers: no more digits than these


def _integer_range_rule(low: int | None, high: int | None) -> str:
    """GBNF alternatives for the integers from `low` to `high` (None: as far as 16 digits go, or as the other
    bound's digits: `minimum: 10**17` alone was an empty rule, and the model wrote `{"ts": }`), no leading zeros."""
    top = 10 ** max([_MAX_DIGITS, *(len(str(abs(b))) for b in (low, high) if b is not None)]) - 1
    parts = []
    if low is None or low < 0:  # the negative ones, as "-" and their magnitude
        lo_mag, hi_mag = 1 if high is None or high >= 0 else -high, top if low is None else -low
        if lo_mag <= hi_mag:
            parts.append(f'"-" ({_natural_range(lo_mag, hi_mag)})')
    if high is None or high >= 0:
        lo, hi = max(low or 0, 0), top if high is None else high
        if lo <= hi:
            parts.append(_natural_range(lo, hi))
    return " | ".join(parts)


def _natural_range(low: int, high: int) -> str:
    """The decimal numbers from `low` to `high` (0 <= low <= high), split by length into digit-wise ranges."""
    alternatives = []
    for length in range(len(str(low)), len(str(high)) + 1):
        a, b = max(low, 0 if length == 1 else 10 ** (length - 1)), min(high, 10**length - 1)
        alternatives.append(_same_length_range(str(a), str(b)))
    return " | ".join(alternatives)


def _same_length_range(a: str, b: str) -> str:
    """Strings of digits from `a` to `b`, both as long."""
    if not a:
        return '""'
    rest = len(a) - 1
    if a == b:
        return f'"{a}"'
    if a[1:] == "0" * rest and b[1:] == "9" * rest:  # every tail: one class, then any digits
        return f"[{a[0]}-{b[0]}]" + (f" [0-9]{{{rest}}}" if rest else "")
    if a[0] == b[0]:
        return f'"{a[0]}" ({_same_length_range(a[1:], b[1:])})'
    parts = [f'"{a[0]}" ({_same_length_range(a[1:], "9" * rest)})']
    if int(a[0]) + 1 <= int(b[0]) - 1:
        parts.append(f"[{int(a[0]) + 1}-{int(b[0]) - 1}] [0-9]{{{rest}}}")
    parts.append(f'"{b[0]}" ({_same_length_range("0" * rest, b[1:])})')
    return " | ".join(parts)


def schema_violation(call: dict[str, Any], tools: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(where, what) when `call`'s arguments break its tool's `parameters` schema, else None. The grammar cannot
    hold every keyword (number bounds that are not integers, `multipleOf`, `uniqueItems`, `format: email`, ...):
    this check after generation is what keeps such a call from reaching the app as if it were valid."""
    function = call["function"]
    schema = next((t["function"].get("parameters") for t in tools if t["function"]["name"] == function["name"]), None)
    return _violation(json.loads(function["arguments"]), schema, "arguments")


def format_violation(content: str, response_format: Any) -> tuple[str, str] | None:
    """(where, what) when an answer breaks a `json_schema` response format, else None: the same check as a tool
    call's, for what the grammar leaves out (as above, and a maxLength/maxItems too wide for it)."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    schema = (response_format.get("json_schema") or {}).get("schema") or {"type": "object"}
    try:
        answer = json.loads(content)
    except ValueError as exc:  # the grammar makes JSON; only an answer it did not hold (a stop sequence) is not
        return "content", f"not JSON: {exc}"
    return _violation(answer, schema, "content")


def _violation(instance: Any, schema: Any, root: str) -> tuple[str, str] | None:
    import jsonschema

    if not isinstance(schema, dict):
        return None
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
        error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    except (jsonschema.SchemaError, jsonschema.exceptions.RefResolutionError):  # validation refuses these first
        return None
    if error is None:
        return None
    where = "".join(f"[{p!r}]" for p in error.absolute_path)
    return f"{root}{where}", error.message
