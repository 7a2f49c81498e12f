"""Turns the quarantine test set (tests/fixtures/quarantine/items.jsonl) into requests, and scores a stage on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ctxkit import ChatRequest
from ctxkit.quarantine_marks import is_quarantined
from ctxkit.stages.quarantine import DOCUMENTS_KEY, QuarantineStage

ITEMS = Path(__file__).parent / "fixtures" / "quarantine" / "items.jsonl"


def load_items() -> list[dict[str, Any]]:
    return [json.loads(line) for line in ITEMS.read_text(encoding="utf-8").splitlines() if line.strip()]


def request_for(item: dict[str, Any]) -> tuple[ChatRequest, dict[str, Any] | None]:
    """A request carrying the item, and the message that holds it (None for a document)."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Please help me with this."}]
    tools: list[dict[str, Any]] = []
    if item["kind"] == "document":
        request = ChatRequest(messages=messages, metadata={"documents": [{"id": item["id"], "text": item["content"]}]})
        return request, None
    if item["kind"] == "tool":
        call = {"id": "call_1", "type": "function",
                "function": {"name": item["tool"], "arguments": json.dumps(item["arguments"])}}
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        target = {"role": "tool", "tool_call_id": "call_1", "content": item["content"]}
        messages.append(target)
        function: dict[str, Any] = {"name": item["tool"], "parameters": {"type": "object", "properties": {}}}
        if item.get("output_schema"):
            function["x-output-schema"] = item["output_schema"]
        tools.append({"type": "function", "function": function})
        return ChatRequest(messages=messages, tools=tools), target
    # an assistant answer resting on the tool results of its turn
    for k, (name, result) in enumerate(item["tool_results"]):
        call = {"id": f"call_{k}", "type": "function", "function": {"name": name, "arguments": "{}"}}
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": f"call_{k}", "content": result})
    target = {"role": "assistant", "content": item["content"]}
    messages.append(target)
    messages.append({"role": "user", "content": "Thanks. What next?"})
    return ChatRequest(messages=messages), target


def flagged(stage: QuarantineStage, item: dict[str, Any]) -> bool:
    request, target = request_for(item)
    out = stage.before_model(request)
    if target is None:
        return item["id"] in out.metadata.get(DOCUMENTS_KEY, {})
    return is_quarantined(out, target)


def confusion(stage: QuarantineStage, items: list[dict[str, Any]]) -> dict[str, Any]:
    """True/false positives and negatives, with the ids of the mistakes."""
    counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0, "missed": [], "false_alarms": []}
    for item in items:
        bad = item["label"] != "clean"
        hit = flagged(stage, item)
        if bad and hit:
            counts["tp"] += 1
        elif bad:
            counts["fn"] += 1
            counts["missed"].append(item["id"])
        elif hit:
            counts["fp"] += 1
            counts["false_alarms"].append(item["id"])
        else:
            counts["tn"] += 1
    return counts
