"""Broken promises: a tool result that does not validate against the tool's output schema."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema

from .finding import Finding, parse_json, shorten


def find_schema_violation(text: str, schema: Mapping[str, Any]) -> Finding | None:
    """A tool result that does not match the output schema the tool promises."""
    data = parse_json(text)
    if schema.get("type") == "string" and not isinstance(data, str):
        data = text  # "2024" from a tool that promises a string is that string, not a number
    elif data is None and text.strip() != "null":  # `null` is JSON: a lookup that found nothing
        if schema.get("type") is None:
            data = text
        else:
            return Finding("schema", f"output is not JSON but the tool promises {schema.get('type')}")
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is None:
        return None
    path = "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in error.absolute_path)
    return Finding("schema", f"output does not match the tool's output schema at {path or '(root)'}",
                   shorten(error.message))
