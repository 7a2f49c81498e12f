"""`ctxkit demo`: a short agent loop with real tools, run through a pipeline on the embedded model.

The tools are small and local (a calculator and a lookup in a folder of notes); the model decides
whether to call them, and whatever it answers is printed as it is: a 135M model is weak, and the point
here is the ledger, which shows what every call cost and what each stage saved.
"""

from __future__ import annotations

import ast
import datetime
import json
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .ledger import LedgerRecord

SYSTEM = "You are a helpful assistant. Use the tools when they help, then answer briefly."

NOTES = {
    "launch.txt": "The Orion launch is scheduled for 3 December 2026 at 09:30 UTC from pad 39A.",
    "budget.txt": "Q4 budget: 120000 EUR for compute, 45000 EUR for staff travel.",
    "team.txt": "Project lead: Amara Okafor. Backend: Lin Wei. Evaluation: Tomas Berg.",
}

TURNS = [
    "What is 1234 * 56? Use the calculator.",
    "Read the file launch.txt and tell me the launch date.",
    "How many days are there from 2026-11-26 to 2026-12-03?",
    "Who is the project lead? Look in team.txt.",
]

def _tool(tool_name: str, description: str, **properties: str) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": tool_name, "description": description,
        "parameters": {"type": "object", "properties": {k: {"type": "string", "description": v}
                                                        for k, v in properties.items()},
                       "required": list(properties)}}}


# A small agent's toolbox: real, local tools. The tool-retrieval stage sends only those a turn needs.
TOOLS = [
    _tool("calculator", "Evaluate an arithmetic expression such as '2 * (3 + 4)'.", expression="the expression"),
    _tool("read_note", "Read a text file from the notes folder by its file name.", name="file name, e.g. team.txt"),
    _tool("list_notes", "List the file names in the notes folder."),
    _tool("search_notes", "Find the notes that mention a word or phrase.", query="word or phrase to look for"),
    _tool("days_between", "Count the days between two dates given as YYYY-MM-DD.",
          start="first date, YYYY-MM-DD", end="second date, YYYY-MM-DD"),
    _tool("convert_units", "Convert a value between units: km/mi, kg/lb, C/F.",
          value="the number", from_unit="km, mi, kg, lb, C or F", to_unit="km, mi, kg, lb, C or F"),
    _tool("word_count", "Count the words in a text.", text="the text"),
    _tool("weekday", "Tell the weekday of a date given as YYYY-MM-DD.", date="YYYY-MM-DD"),
]

_CONVERSIONS: dict[tuple[str, str], Callable[[float], float]] = {
    ("km", "mi"): lambda v: v * 0.621371, ("mi", "km"): lambda v: v / 0.621371,
    ("kg", "lb"): lambda v: v * 2.20462, ("lb", "kg"): lambda v: v / 2.20462,
    ("c", "f"): lambda v: v * 9 / 5 + 32, ("f", "c"): lambda v: (v - 32) * 5 / 9,
}

_OPS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow, ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos,
}


def calculate(expression: str) -> float:
    """Arithmetic only: the expression is parsed, never executed."""

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")

    return walk(ast.parse(expression, mode="eval").body)


class NoteTools:
    """The demo's tools over a real folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def run(self, name: str, arguments: dict[str, Any]) -> str:
        try:
            if name == "calculator":
                return str(calculate(str(arguments.get("expression", ""))))
            if name == "list_notes":
                return ", ".join(sorted(p.name for p in self.folder.iterdir()))
            if name == "search_notes":
                query = str(arguments.get("query", "")).lower()
                found = [p.name for p in sorted(self.folder.iterdir()) if query and query in p.read_text().lower()]
                return ", ".join(found) or "no note mentions that"
            if name == "days_between":
                start = datetime.date.fromisoformat(str(arguments.get("start", "")))
                end = datetime.date.fromisoformat(str(arguments.get("end", "")))
                return str((end - start).days)
            if name == "weekday":
                return datetime.date.fromisoformat(str(arguments.get("date", ""))).strftime("%A")
            if name == "convert_units":
                key = (str(arguments.get("from_unit", "")).lower(), str(arguments.get("to_unit", "")).lower())
                if key not in _CONVERSIONS:
                    return f"error: cannot convert {key[0]!r} to {key[1]!r}"
                return f"{_CONVERSIONS[key](float(arguments.get('value', 'nan'))):.2f}"
            if name == "word_count":
                return str(len(str(arguments.get("text", "")).split()))
            if name == "read_note":
                path = (self.folder / str(arguments.get("name", ""))).resolve()
                if path.parent != self.folder.resolve() or not path.is_file():
                    return f"error: no note named {arguments.get('name')!r}"
                return path.read_text()
            return f"error: unknown tool {name!r}"
        except (ValueError, SyntaxError, ZeroDivisionError, OverflowError) as exc:
            return f"error: {exc}"


def run_agent(client: Any, tools: NoteTools, turns: list[str], *, max_steps: int = 2,
              conversation_id: str = "demo", on_step: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """A plain hand-written agent loop over an OpenAI-style client; returns the conversation.

    Policy: the first step of each turn requires a tool call (every demo question needs one, and a 135M
    model rarely chooses a tool by itself); the next step answers from the tool's result.
    """
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        on_step(f"\nuser: {turn}")
        for step in range(max_steps):
            completion = client.chat.completions.create(
                model="smollm2", messages=messages, tools=TOOLS, max_tokens=128 if step == 0 else 64, temperature=0,
                tool_choice="required" if step == 0 else "none",
                extra_body={"ctxkit": {"conversation_id": conversation_id}},
            )
            message = completion.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            if not message.tool_calls:
                on_step(f"assistant: {_shown(message.content, completion.choices[0].finish_reason)}")
                break
            for call in message.tool_calls:
                try:
                    arguments = json.loads(call.function.arguments or "{}")
                except json.JSONDecodeError:
                    arguments = {}
                result = tools.run(call.function.name, arguments)
                on_step(f"  tool {call.function.name}({json.dumps(arguments)}) -> {result[:80]}")
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return messages


def _shown(content: str | None, finish_reason: str | None) -> str:
    """The answer as printed: a reply cut off inside a tool call has no text, and "None" told the reader nothing."""
    if content:
        return content
    if finish_reason == "length":
        return "(no answer: the reply reached max_tokens before it finished; an unfinished tool call is dropped)"
    return f"(no answer; finish_reason {finish_reason})"


def ledger_line(record: LedgerRecord) -> str:
    saved = ", ".join(f"{k}={v}" for k, v in record.saved_by_stage.items() if v) or "-"
    return (
        f"  [ledger] {record.id} naive={record.tokens_naive} sent={record.tokens_sent} out={record.tokens_out} "
        f"cached={record.tokens_cached} reported={record.tokens_reported} saved: {saved} "
        f"backend={record.latency_ms.get('backend', 0):.0f}ms"
    )


def make_notes_folder(folder: Path) -> Path:
    """Writes the demo's notes into `folder` (which must exist) and returns it."""
    for name, text in NOTES.items():
        (folder / name).write_text(text)
    return folder
