"""Compacted tool schemas are smaller and accept exactly the arguments the originals accept."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from ctxkit.stages.tools import compact_schema, compact_tool
from ctxkit.tokens.tiktoken_counter import TiktokenCounter

FIXTURES = Path(__file__).parent / "fixtures" / "tools"

# Hand-written schemas with everything compaction touches, and the traps it must not fall into.
TRICKY: list[dict[str, Any]] = [
    {"type": "object", "title": "Args", "$comment": "generated", "additionalProperties": True, "required": [],
     "properties": {
         "title": {"type": "string", "title": "Title", "description": "  The   book's\n title.  "},
         "default": {"type": "integer", "minimum": 1, "default": 3, "description": "Copies. Default is 3."},
         "mode": {"type": "string", "enum": ["fast", "safe"], "default": "safe", "description": "How to run."},
         "tags": {"type": "array", "items": {"type": "string", "title": "Tag", "maxLength": 5}, "maxItems": 2},
     }},
    {"type": "object", "additionalProperties": False, "required": ["point"],
     "properties": {"point": {"title": "Point", "type": "object", "required": ["x"], "properties": {
         "x": {"type": "number", "title": "X"}, "y": {"type": "number", "default": 0}}}}},
    {"type": "object", "$defs": {"unit": {"title": "Unit", "type": "string", "enum": ["c", "f"]}},
     "properties": {"unit": {"$ref": "#/$defs/unit"}, "when": {"anyOf": [{"type": "string", "title": "Date"},
                                                                        {"type": "null"}]}}},
    # `additionalProperties: true` is no no-op beside `unevaluatedProperties: false`: it marks every extra
    # key as evaluated, so dropping it made the compacted schema reject {"city": ..., "extra_field": 1}.
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
     "additionalProperties": True, "unevaluatedProperties": False},
    {"type": "object", "properties": {"city": {"type": "string"}}, "allOf": [{"additionalProperties": True}],
     "required": ["city"], "unevaluatedProperties": False},
]


def _catalog_schemas() -> list[dict[str, Any]]:
    catalog = json.loads((FIXTURES / "catalog.json").read_text())
    return [t["function"]["parameters"] for t in catalog]


def _value(schema: Any, depth: int = 0) -> Any:
    """A value the schema accepts (for the schemas tool catalogs use)."""
    if not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        return "c"
    if "enum" in schema:
        return schema["enum"][-1]
    if "anyOf" in schema:
        return _value(schema["anyOf"][0], depth)
    kind = schema.get("type", "string")
    if kind == "object":
        props = schema.get("properties") or {}
        return {k: _value(v, depth + 1) for k, v in props.items()} if depth < 4 else {}
    if kind == "array":
        return [_value(schema.get("items") or {}, depth + 1)]
    return {"string": "abc", "integer": 2, "number": 1.5, "boolean": True, "null": None}.get(kind, "abc")


def examples(schema: dict[str, Any]) -> list[Any]:
    """A valid instance and mutations of it: each property dropped, retyped, nulled, and extra keys."""
    base = _value(schema)
    out: list[Any] = [base, {}, [], "text", None, {"unexpected": 1}]
    if isinstance(base, dict):
        for key in base:
            dropped = dict(base)
            del dropped[key]
            out.append(dropped)
            for wrong in (None, "zz", 7, -1, 0.5, [1, 2, 3], {"a": 1}, True, "toolongvalue"):
                out.append({**base, key: wrong})
            if isinstance(base[key], dict):
                for inner in base[key]:
                    nested = copy.deepcopy(base)
                    nested[key][inner] = "zz"
                    out.append(nested)
                    nested = copy.deepcopy(base)
                    del nested[key][inner]
                    out.append(nested)
        out.append({**base, "extra_field": 1})
    return out


@pytest.mark.parametrize("schema", TRICKY + _catalog_schemas(), ids=itertools.count())
def test_compacted_schema_validates_the_same_examples_as_the_original(schema):
    compacted = compact_schema(schema)
    original_validator = jsonschema.Draft202012Validator(schema)
    compact_validator = jsonschema.Draft202012Validator(compacted)
    verdicts = []
    for example in examples(schema):
        expected = original_validator.is_valid(example)
        assert compact_validator.is_valid(example) == expected, (example, schema, compacted)
        verdicts.append(expected)
    assert True in verdicts and False in verdicts, "the examples must include accepted and rejected ones"


def test_compaction_drops_annotations_but_keeps_constraints_and_property_names():
    compacted = compact_schema(TRICKY[0])
    assert "title" not in compacted and "$comment" not in compacted and "required" not in compacted
    props = compacted["properties"]
    assert set(props) == {"title", "default", "mode", "tags"}  # properties named like keywords survive
    assert props["title"] == {"type": "string", "description": "The book's title."}
    assert "default" not in props["default"] and props["default"]["minimum"] == 1  # stated in the description
    assert props["mode"]["default"] == "safe"  # not stated anywhere else: kept
    assert props["tags"]["items"] == {"type": "string", "maxLength": 5}
    assert TRICKY[0]["properties"]["title"]["title"] == "Title"  # the input is untouched


def test_compaction_sends_fewer_tokens_for_the_fixture_catalog():
    catalog = json.loads((FIXTURES / "catalog.json").read_text())
    tricky_tools = [{"type": "function", "function": {"name": f"t{i}", "description": " a  b ", "parameters": s}}
                    for i, s in enumerate(TRICKY)]
    counter = TiktokenCounter("gpt-4o")
    for tools in (catalog, tricky_tools):
        compacted = [compact_tool(t) for t in tools]
        assert counter._count_tools(compacted) < counter._count_tools(tools)
        assert len(json.dumps(compacted)) < len(json.dumps(tools))


def test_compaction_keeps_what_providers_and_grammars_read_beyond_validation():
    """`properties: {}` dropped made a no-argument tool `{"type": "object"}`: OpenAI refuses an object schema
    without properties, and llama.cpp's grammar then allows any object (SmolLM2 invented arguments in 5 of
    12 calls). `additionalProperties: true` dropped beside `properties` made its grammar refuse extra keys."""
    from ctxkit.stages.tools.compaction import compact_tool

    no_arguments = {"type": "function", "function": {"name": "get_current_time", "description": "Now.",
                                                     "parameters": {"type": "object", "properties": {}}}}
    assert compact_tool(no_arguments)["function"]["parameters"] == {"type": "object", "properties": {}}
    open_ended = {"type": "function", "function": {"name": "log", "description": "Log fields.", "parameters": {
        "type": "object", "properties": {"msg": {"type": "string"}}, "additionalProperties": True}}}
    assert compact_tool(open_ended)["function"]["parameters"]["additionalProperties"] is True


def test_compaction_keeps_a_title_that_is_the_only_description_and_a_conditional_default():
    """Every title went, also "Start date YYYY-MM-DD" on a property without a description; a default went
    whenever its value appeared anywhere after the word "default" ("Default: f for US offices, c elsewhere")."""
    schema = {"type": "object", "properties": {
        "start": {"type": "string", "title": "Start date YYYY-MM-DD"},
        "unit": {"type": "string", "default": "c", "description": "Default: f for US offices, c elsewhere."},
        "size": {"type": "integer", "default": 5, "description": "Page size. Default is 5."},
        "user_name": {"type": "string", "title": "User Name", "description": "Who asks."}}}
    compacted = compact_schema(schema)["properties"]
    assert compacted["start"]["title"] == "Start date YYYY-MM-DD"
    assert compacted["unit"]["default"] == "c"
    assert "default" not in compacted["size"] and "title" not in compacted["user_name"]


def test_a_strict_tool_keeps_its_empty_required_lists():
    """OpenAI's strict mode refuses an object schema without `required`, even an empty one: compaction
    dropped it, and a strict tool that had no required argument got a 400."""
    from ctxkit.stages.tools.compaction import compact_tool

    params = {"type": "object", "properties": {"opts": {"type": "object", "properties": {}, "required": [],
                                                        "additionalProperties": False}},
              "required": [], "additionalProperties": False}
    strict = {"type": "function", "function": {"name": "ping", "strict": True, "parameters": params}}
    compacted = compact_tool(strict)["function"]["parameters"]
    assert compacted["required"] == [] and compacted["properties"]["opts"]["required"] == []
    loose = compact_tool({"type": "function", "function": {"name": "ping", "parameters": params}})
    assert "required" not in loose["function"]["parameters"]


def test_compaction_keeps_a_title_that_says_what_the_description_does_not():
    """A title beside a description went whole, and with it the only place a unit or format was written."""
    from ctxkit.stages.tools.compaction import compact_schema

    compacted = compact_schema({"type": "object", "properties": {
        "amount": {"type": "integer", "title": "Amount in US cents", "description": "How much to charge."},
        "when": {"type": "string", "title": "When", "description": "When to charge."}}})["properties"]
    assert compacted["amount"]["title"] == "Amount in US cents"
    assert "title" not in compacted["when"]
