"""Tool calling for local models whose chat template knows nothing of tools.

Such models (SmolLM2 among them) are shown the tools in the system message and asked to answer with
Hermes-style blocks:

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "2+2"}}
    </tool_call>

Earlier calls and their results are written back into the conversation in the same form, so the model
sees a consistent history. A GBNF grammar built from the tools' JSON Schemas (schema_grammar.py) keeps the call
well formed (a 135M model will not manage it unaided); the model still chooses whether to call and with what.
The same text goes to a llama.cpp-family server rendering such a template (OpenAIBackend with a GGUFPrompt
counter), with the grammar as its `grammar` field, and its answers are parsed the same way.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

from .schema_grammar import hoist_definitions, schema_for_grammar, schema_to_gbnf

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
                "arguments": hoist_definitions(schema_for_grammar(t["function"].get("parameters") or {"type": "object"}, root=True),
                                      f"t{i}_", definitions),
            },
            "required": ["name", "arguments"],
        }
        for i, t in enumerate(tools)
    ]
    schema: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    if definitions:
        schema = {**schema, "$defs": definitions}
    call_rules = schema_to_gbnf(schema, prop_order=["name", "arguments"])
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

    @property
    def received(self) -> str:
        """All the text received, a stop's own and what came after it in its chunk included: what the server
        generated (and bills), though the answer ends at the stop."""
        return self._seen

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
