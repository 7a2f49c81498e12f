"""Tool calling for local models whose chat template knows nothing of tools.

Such models (SmolLM2 among them) are shown the tools in the system message and asked to answer with
Hermes-style blocks:

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "2+2"}}
    </tool_call>

Earlier calls and their results are written back into the conversation in the same form, so the model
sees a consistent history. A GBNF grammar built from the tools' JSON Schemas keeps the call well formed
(a 135M model will not manage it unaided); the model still chooses whether to call and with what.
The same text goes to a llama.cpp-family server rendering such a template (OpenAIBackend with a GGUFPrompt
counter), with the grammar as its `grammar` field, and its answers are parsed the same way.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)  # each block alone: a broken one spoils no other


def may_call(tools: Any, params: Mapping[str, Any]) -> bool:
    """Whether the answer may be a tool call: tools sent, and not tool_choice "none" (OpenAI then never calls one;
    the model still sees the tools and may write a <tool_call> block, which stays text)."""
    return bool(tools) and params.get("tool_choice") != "none"


def tools_system_text(tools: list[dict[str, Any]]) -> str:
    """The instructions that introduce the tools; deterministic (sorted keys) so prefix caches keep hitting."""
    lines = [
        "# Tools",
        "You may call functions to help with the user's request. Available functions, one JSON object per line:",
    ]
    for tool in tools:
        function = tool["function"]
        lines.append(
            json.dumps(
                {"name": function["name"], "description": function.get("description", ""),
                 "parameters": function.get("parameters", {})},
                sort_keys=True, ensure_ascii=False,
            )
        )
    example = tools[0]["function"]
    example_args = {name: "..." for name in list((example.get("parameters") or {}).get("properties", {}))[:1]}
    lines.append(
        "To call a function, reply with the call alone, for example:\n"
        + format_tool_call(example["name"], example_args)
    )
    return "\n".join(lines)


def messages_for_plain_template(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rewrite tool-format messages into system/user/assistant text any chat template can render."""
    names = {}
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        content = _text(message.get("content"))
        if role == "developer":
            role = "system"
        if role == "assistant" and message.get("tool_calls"):
            blocks = []
            for call in message["tool_calls"]:
                names[call["id"]] = call["function"]["name"]
                try:
                    arguments = json.loads(call["function"]["arguments"] or "{}")
                except json.JSONDecodeError:  # cut off by max_tokens, sent back without the pipeline's repair
                    arguments = call["function"]["arguments"]  # as written (as count_completion counts it)
                blocks.append(format_tool_call(call["function"]["name"], arguments))
            content = "\n".join(([content] if content else []) + blocks)
        elif role == "tool":
            name = names.get(message.get("tool_call_id", ""), message.get("name", "tool"))
            role, content = "user", f'<tool_response name="{name}">\n{content}\n</tool_response>'
        out.append({"role": role, "content": content})
    if tools:
        tool_text = tools_system_text(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{tool_text}"}
        else:
            out.insert(0, {"role": "system", "content": tool_text})
    return out


def format_tool_call(name: str, arguments: Any) -> str:
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split generated text into (content, OpenAI tool_calls). Malformed blocks stay in the content."""
    calls = []
    spans: list[tuple[int, int]] = []  # of the blocks that became calls
    for match in _CALL_BLOCK.finditer(text):
        call = _call(match.group(1))
        if call is not None:
            calls.append(call)
            spans.append(match.span())
    if not calls:
        return (text.strip() or None), []
    rest, last = [], 0
    for start, end in spans:
        rest.append(text[last:start])
        last = end
    rest.append(text[last:])
    return ("".join(rest).strip() or None), calls


def drop_unfinished_call(text: str | None) -> str | None:
    """The content of an answer cut off by max_tokens: a <tool_call> block that never closed is the call grammar's
    markup, not an answer, so it is left out (the text before it stays). finish_reason "length" says the rest."""
    if not text:
        return text
    start = text.rfind(TOOL_CALL_OPEN)
    if start < 0 or TOOL_CALL_CLOSE in text[start:]:
        return text
    body = text[start + len(TOOL_CALL_OPEN):].lstrip()
    if body and not body.startswith("{"):  # "the <tool_call> tag ..." is prose about the markup, not a call
        return text
    return text[:start].strip() or None


class ToolCallTextStream:
    """Turns a streamed answer's <tool_call> text (OpenAI chunk dicts) into a tool_calls delta: text that may
    still become a call is held back, and parsed when the answer ends. Text before a call ("Checking. <tool_call>...")
    is passed on as it comes, and the call still becomes tool_calls, as complete() parses the same answer."""

    def __init__(self) -> None:
        self._text = ""  # the answer so far
        self._emitted = 0  # how much of it was passed on as content

    @property
    def held_back(self) -> str:
        """Generated text not passed on yet (it may still become a call)."""
        return self._text[self._emitted:]

    @property
    def generated(self) -> str:
        """All the text generated so far, passed on or held back."""
        return self._text

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunks to pass on for one chunk received (none while a call may be forming)."""
        if not chunk.get("choices"):
            return [chunk]  # the usage chunk
        choice = chunk["choices"][0]
        delta = dict(choice.get("delta") or {})
        finish = choice.get("finish_reason")
        self._text += delta.pop("content", None) or ""
        if finish is None:
            end = _safe_end(self._text, self._emitted)
            if end > self._emitted and (self._emitted or self._text[:end].strip()):  # no leading blank before a call
                delta["content"] = self._text[self._emitted:end]
                self._emitted = end
            return [_with_delta(chunk, delta, None)] if delta else []  # the role, without the text held
        rest = self._text[self._emitted:]
        self._emitted = len(self._text)
        content, calls = parse_tool_calls(rest)
        if calls:
            delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(calls)]
            finish = "tool_calls"
        else:
            content = drop_unfinished_call(rest) if finish == "length" else rest
        if content:
            delta["content"] = content
        return [_with_delta(chunk, delta, finish)]


def _safe_end(text: str, start: int) -> int:
    """How far text[start:] may be passed on: up to a <tool_call> opening, or a tail that may still become one."""
    found = text.find(TOOL_CALL_OPEN, start)
    if found >= 0:
        return found
    for k in range(min(len(TOOL_CALL_OPEN) - 1, len(text) - start), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-k:]):
            return len(text) - k
    return len(text)


def _with_delta(chunk: dict[str, Any], delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {**chunk, "choices": [{**chunk["choices"][0], "delta": delta, "finish_reason": finish}]}


def _call(block: str) -> dict[str, Any] | None:
    """One `<tool_call>` block's JSON as an OpenAI tool call, or None when it is not a well-formed call."""
    try:
        payload = json.loads(block.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return None
    arguments = payload.get("arguments", payload.get("parameters", {}))
    if isinstance(arguments, str):  # arguments written as a JSON string, as OpenAI's own wire format does
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:16]}",
        "type": "function",
        "function": {"name": payload["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def tool_call_grammar(tools: list[dict[str, Any]], tool_choice: Any, text_grammar: str | None = None) -> str | None:
    """GBNF for the answer: free text or a well-formed call ("auto"), a call ("required"), or one named call.

    text_grammar: GBNF (with its own `root`) that an "auto" answer which is not a call must match instead of free
    text: the JSON a `response_format` asks for (OpenAI answers such a request with a call or with that JSON).
    Returns None when the answer is unconstrained (no tools, or tool_choice "none").
    """
    if not tools or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        wanted = (tool_choice.get("function") or {}).get("name")
        tools = [t for t in tools if t["function"]["name"] == wanted]
        if not tools:  # validation refuses this; an empty grammar would crash llama.cpp outright
            raise ValueError(f"tool_choice names no offered tool: {wanted!r}")
    definitions: dict[str, Any] = {}
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": _hoisted(_any_values(t["function"].get("parameters") or {"type": "object"}, root=True),
                                      f"t{i}_", definitions),
            },
            "required": ["name", "arguments"],
        }
        for i, t in enumerate(tools)
    ]
    schema: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    if definitions:
        schema = {**schema, "$defs": definitions}
    call_rules = _schema_to_gbnf(schema, prop_order=["name", "arguments"])
    call_rules = re.sub(r"^root ::=", "call-json ::=", call_rules, flags=re.MULTILINE)
    # llama-cpp-python's converter lets strings hold raw newlines and control characters, which a small
    # model uses to wander off inside an argument; JSON forbids them.
    call_rules = re.sub(r"^char ::= .*$", lambda _: _JSON_CHAR, call_rules, flags=re.MULTILINE)
    call_rules = call_rules.replace('char* "\\""', 'char{0,512} "\\""')  # and cannot talk forever inside one
    call = f'"{TOOL_CALL_OPEN}\\n" call-json "\\n{TOOL_CALL_CLOSE}"'
    if tool_choice in (None, "auto") and text_grammar:
        root = f"root ::= {call} | text-root\n{prefixed_rules(text_grammar, 'text-')}\n"
    elif tool_choice in (None, "auto"):
        root = f"root ::= {call} | free-text\nfree-text ::= [^<] [^\\x00]*\n"
    else:
        root = f"root ::= {call}\n"
    return root + call_rules


_GBNF_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\n]*|[a-zA-Z][a-zA-Z0-9-]*')


def prefixed_rules(grammar: str, prefix: str) -> str:
    """`grammar` with every rule name (definitions and references; not literals, classes or comments)
    prefixed, so that it can sit beside another grammar's rules without a name clash."""

    def rename(match: re.Match[str]) -> str:
        token = match.group(0)
        return token if token[0] in '"[#' else prefix + token

    return _GBNF_TOKEN.sub(rename, grammar)


def _text(content: Any) -> str:
    if isinstance(content, list):
        # a refusal part (an assistant's earlier refusal, replayed) carries its text under "refusal"
        return "".join(str(part.get("refusal" if part.get("type") == "refusal" else "text") or "")
                       for part in content if isinstance(part, dict))
    return content or ""


# A subschema with only these keywords accepts any JSON value (Pydantic's `Any` is {"title": "Value"}, MCP servers
# write {"description": ...}). llama-cpp-python's converter refuses such a schema ("Unrecognized schema"), and
# reads {} as an *object*: spelled out as every type, it accepts what the schema accepts.
_ANNOTATIONS = frozenset({"title", "description", "$comment", "default", "examples", "deprecated", "readOnly",
                          "writeOnly", "$id", "$anchor", "$schema"})
_ANY_TYPE = ["string", "number", "boolean", "object", "array", "null"]
_SUB_ONE = frozenset({"items", "additionalProperties", "additionalItems", "contains", "not", "if", "then", "else",
                      "propertyNames", "unevaluatedItems", "unevaluatedProperties"})
_SUB_LIST = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SUB_MAP = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def _any_values(schema: Any, *, root: bool = False) -> Any:
    """`schema` with each subschema that accepts any value (and is not the arguments object itself) spelled
    out as `"type": [every type]`, which the converter turns into a grammar for any JSON value."""
    if not isinstance(schema, dict):
        return schema
    if not root and set(schema) <= _ANNOTATIONS:
        return {**schema, "type": list(_ANY_TYPE)}
    types = schema.get("type")
    if isinstance(types, list) and set(schema) - _ANNOTATIONS - {"type"}:
        # The converter reads `"type": [...]` as a bare union and drops every other keyword (a nullable
        # 1-to-5 integer took any integer, a nullable object any object): one branch per type keeps them.
        rest = {k: v for k, v in schema.items() if k != "type"}
        return _any_values({"anyOf": [{**rest, "type": t} for t in types]})
    if schema.get("type") == "array" and "items" not in schema and "prefixItems" not in schema and (
            "minItems" in schema or "maxItems" in schema):  # the converter counts items only when they have a schema
        schema = {**schema, "items": {"type": list(_ANY_TYPE)}}
    if isinstance(schema.get("pattern"), str):
        schema = {**schema, "pattern": _anchored(schema["pattern"])}
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SUB_ONE:
            out[key] = [_any_values(v) for v in value] if isinstance(value, list) else _any_values(value)
        elif key in _SUB_LIST and isinstance(value, list):
            out[key] = [_any_values(v) for v in value]
        elif key in _SUB_MAP and isinstance(value, dict):
            out[key] = {name: _any_values(v) for name, v in value.items()}
        else:
            out[key] = value
    return _integer_range(out)


# What a pattern anchored at one end only may have at its other end, in the grammar: JSON string characters, a few
# (the schema allows any number; a 135M model given them all rambles to max_tokens).
_UNANCHORED_SIDE = '[^"\\\\\\x00-\\x1F]{0,32}'


def _anchored(pattern: str) -> str:
    """`pattern` as the converter takes it: anchored at both ends (it refuses any other), in the regex syntax it
    reads. JSON Schema's patterns match anywhere in the string: one anchored at one end only ("\\.pdf$") gets room
    for other text at the other end; one with no anchor ("[0-9]{5}") is held to its match alone, which the schema
    accepts too (room on both sides made a small model fill them: "}}  # This will return the value12345")."""
    start = pattern.startswith("^")
    end = pattern.endswith("$") and not pattern.endswith("\\$")
    core = _converter_syntax(pattern[1 if start else 0: len(pattern) - 1 if end else len(pattern)])
    if not start and not end:
        return f"^({core})$"
    return ("^" if start else "^" + _UNANCHORED_SIDE) + f"({core})" + ("$" if end else _UNANCHORED_SIDE + "$")


# Shorthand classes in the regex syntax the converter copies into the grammar as written, where llama.cpp's GBNF
# has no such escape (`^\\d{5}$` made the tool refused): outside a class and inside one.
# A negated one leaves out what a JSON string cannot hold unescaped: a quote, a backslash, control characters.
_SHORTHANDS = {"d": ("[0-9]", "0-9"), "D": ('[^0-9"\\\\\\x00-\\x1F]', None),
               "w": ("[a-zA-Z0-9_]", "a-zA-Z0-9_"), "W": ('[^a-zA-Z0-9_"\\\\\\x00-\\x1F]', None),
               "s": ("[ ]", " "), "S": ('[^ "\\\\\\x00-\\x1F]', None)}


def _converter_syntax(pattern: str) -> str:
    """A pattern's escapes as the grammar can hold them: `\\d`, `\\w`, `\\s` and their negations as classes, an
    escaped punctuation mark (`\\.`, `\\$`) as a class of its hex escape, `(?:` as a plain group (the converter
    refuses `(?`). Other escapes (`\\b`, `\\u00e9`, `\\n`) are left as written, for the converter to take or refuse."""
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        c = pattern[i]
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
        elif c == "]" and in_class and not pattern[i - 1:i] == "[" and not pattern[i - 2:i] == "[^":
            in_class = False
        elif c == "(" and not in_class and pattern.startswith("(?:", i):
            out.append("(")
            i += 3
            continue
        out.append(c)
        i += 1
    return "".join(out)


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


def _hoisted(parameters: dict[str, Any], prefix: str, definitions: dict[str, Any]) -> dict[str, Any]:
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


def call_spans(text: str) -> list[tuple[int, int]]:
    """Where `text` holds <tool_call> blocks (to their close, or to the end of an unclosed one, or a trailing
    start of one still being written)."""
    spans, pos = [], 0
    while True:
        start = text.find(TOOL_CALL_OPEN, pos)
        if start < 0:
            break
        close = text.find(TOOL_CALL_CLOSE, start)
        end = len(text) if close < 0 else close + len(TOOL_CALL_CLOSE)
        spans.append((start, end))
        pos = end
    for k in range(min(len(TOOL_CALL_OPEN) - 1, len(text) - pos), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-k:]):
            spans.append((len(text) - k, len(text)))
            break
    return spans


def stop_at(text: str, stops: list[str]) -> int | None:
    """Where the answer ends: the first of `stops` in `text` outside any <tool_call> block; None if none is."""
    if not stops:
        return None
    spans = call_spans(text)
    best: int | None = None
    for s in stops:
        pos = text.find(s)
        while pos >= 0 and any(a < pos + len(s) and pos < b for a, b in spans):
            pos = text.find(s, pos + 1)
        if pos >= 0 and (best is None or pos < best):
            best = pos
    return best


def stop_safe_end(text: str, stops: list[str]) -> int:
    """How far `text` may be passed on: not into a tail that may still become one of `stops`, or the start of a
    <tool_call> (a stop inside it would not count, and then might once it turns out to be none)."""
    end = len(text)
    for k in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-k:]):
            end = len(text) - k
            break
    if end < len(text):  # a stop that ends inside that held-back start ("a <" in "a <"): it counts if no call follows
        for s in stops:
            pos = text.find(s, max(0, end - len(s) + 1))
            if 0 <= pos < end:
                end = pos
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                end = min(end, len(text) - k)
                break
    return end


class CallStops:
    """The caller's stop sequences applied to a streamed answer outside its <tool_call> blocks, for a server that
    was not given them (it would cut a call at a stop inside it): text that may still become a stop is held back,
    and the answer ends at the first stop found."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.done = False
        self._seen = ""
        self._passed = 0

    def feed(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        if not data.get("choices"):
            return [data]  # a usage chunk
        choice = data["choices"][0]
        delta = dict(choice.get("delta") or {})
        finish = choice.get("finish_reason")
        self._seen += delta.pop("content", None) or ""
        cut = stop_at(self._seen, self.stops)
        if cut is not None:
            end, finish, self.done = max(cut, self._passed), "stop", True
        elif finish is None:
            end = max(self._passed, stop_safe_end(self._seen, self.stops))
        else:
            end = len(self._seen)
        if end > self._passed:
            delta["content"] = self._seen[self._passed:end]
            self._passed = end
        return [{**data, "choices": [{**choice, "delta": delta, "finish_reason": finish}]}]


def _schema_to_gbnf(schema: dict[str, Any], prop_order: list[str]) -> str:
    """llama-cpp-python's converter, with integer bounds (`minimum` and the others) kept in the grammar: it ignores
    them ("TODO: support minimum, maximum"), so `minimum: 1` came back as -5 and 0."""
    from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

    class BoundedIntegers(SchemaConverter):  # type: ignore[misc]
        def visit(self, schema: Any, name: str) -> str:
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            if isinstance(schema, dict) and (bounds := _integer_bounds(schema)) is not None:
                return str(self._add_rule(rule_name, f"({_integer_range_rule(*bounds)}) space"))
            if isinstance(schema, dict) and (bounds := _whole_number_bounds(schema)) is not None:
                return str(self._add_rule(rule_name, f"({_number_range_rule(*bounds)}) space"))
            return str(super().visit(schema, name))

    converter = BoundedIntegers(prop_order={name: i for i, name in enumerate(prop_order)}, allow_fetch=False,
                                dotall=False, raw_pattern=False)
    converter.visit(converter.resolve_refs(schema, "stdin"), "")
    return str(converter.format_grammar())


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
    import jsonschema

    function = call["function"]
    schema = next((t["function"].get("parameters") for t in tools if t["function"]["name"] == function["name"]), None)
    if not isinstance(schema, dict):
        return None
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
        error = jsonschema.exceptions.best_match(validator.iter_errors(json.loads(function["arguments"])))
    except (jsonschema.SchemaError, jsonschema.exceptions.RefResolutionError):  # validation refuses these first
        return None
    if error is None:
        return None
    where = "".join(f"[{p!r}]" for p in error.absolute_path)
    return f"arguments{where}", error.message
