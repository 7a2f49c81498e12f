"""Cache keys: what a cached answer must share with a request (its scope) and what identifies it exactly.

- scope: namespace, model, every sampling parameter, the system prompt and the tool set offered. A hit
  never crosses a scope, in either layer.
- exact key: the scope plus the whole conversation, normalized (whitespace collapsed, dict key order,
  tool-call ids dropped because the model invents them afresh on every run).
- query text: the last user message with self-corrections repaired, the text the semantic layer embeds.
- context text: the conversation before that message. "cancel it" means nothing alone, so the semantic
  layer compares contexts too (see stage.py), never only the last message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from ...request import ChatRequest, Message
from .disfluency import repair

KEY_VERSION = "ctxkit-cache-v4"  # bump when the normalization changes, so old entries stop matching
_CONTEXT_MESSAGES = 6  # the earlier turns a follow-up can refer to; older ones rarely change its meaning
_CONTEXT_CHARS = 2000


@dataclasses.dataclass(frozen=True)
class RequestKey:
    """Everything the cache layers need to know about one request."""

    scope: str
    exact: str
    query: str  # repaired last user message ("" when the last message is not from the user)
    context: str  # earlier turns as text ("" for a single-turn request)
    raw: str = ""  # the last user message as written (the guards read its self-corrections)
    facts: str = ""  # every earlier user message (keys.facts_text), for follow-ups
    tool_facts: str = ""  # every earlier tool result, with the call it answers
    layout: str = ""  # the last user message with its line breaks and indentation (keys.normalize_layout)
    history: str = ""  # the hash of every earlier turn, normalized (what a context left unread must match)
    context_cut: bool = False  # the context text leaves out earlier turns, or the start of one
    context_code: str = ""  # the code (line breaks and indentation) in earlier assistant and tool messages


_POLITE_HEAD = re.compile(r"^(?:(?:please|pls|kindly|hey|hi|hello|ok|okay|so)\b[\s,!.]*)+", re.I)
# Courtesy words that end a text: r"(?:[\s,]*\b(?:please|pls|thanks|thank you|thx)\b)+[\s.!?]*$" read backwards
# from the end (tests/test_adversarial_linear_time.py checks they agree). Searched forwards, that regex ran from
# every comma, space and courtesy word of a long run to the end and back (a 20 KB message of ", , ," or "please
# please" took seconds, on every request's cache key); matched from the end, it is one pass.
_POLITE_TAIL_REVERSED = re.compile(r"[\s.!?]*(?:\b(?:esaelp|slp|sknaht|uoy knaht|xht)\b[\s,]*)+", re.I)


def _polite_tail(text: str) -> int | None:
    """Where the courtesy words that end `text` start (None: it ends without one)."""
    match = _POLITE_TAIL_REVERSED.match(text[::-1])
    return len(text) - match.end() if match else None


def normalize_text(text: str) -> str:
    # NFC: "café" typed with a precomposed é and with e + U+0301 (macOS file names, some keyboards) is
    # one question, and one word for the guards
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()


def normalize_layout(text: str) -> str:
    """Whitespace normalized without losing what it means. Prose: every run of whitespace is one space.
    Text with code (a ``` fence or an indented line): runs of spaces inside a line collapse and trailing
    spaces go, but line breaks and each line's indentation stay (pasted Python, YAML, Makefiles:
    `print(x)` inside or after a loop is another program)."""
    text = unicodedata.normalize("NFC", text)
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")]
    if not any(line.lstrip().startswith("```") or (line[:1] in (" ", "\t") and line.strip()) for line in lines):
        return normalize_text(text)  # prose: where its lines break does not change the question
    out = []
    for line in lines:
        indent = line[: len(line) - len(line.lstrip())]
        out.append(indent + re.sub(r"[ \t]+", " ", line[len(indent):]))
    return "\n".join(out)


def code_lines(text: str) -> list[tuple[int, str]]:
    """The code of a message (lines inside ``` fences, and indented lines), as (indentation, words)."""
    out: list[tuple[int, str]] = []
    fenced = False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        indent = len(line) - len(line.lstrip())
        if line.strip() and (fenced or indent):
            out.append((indent, " ".join(line.split())))
    return out


_COURTESY_FORMS = {"please": "please", "pls": "please", "thanks": "thanks", "thank you": "thanks", "thx": "thanks"}


def courtesy_tail(text: str) -> tuple[str, bool] | None:
    """The courtesy words `strip_politeness` takes off the end of `text` (canonical: "thx" is "thanks"),
    and whether a comma or a sentence end sets them off ("What is X? Thanks", "What is X, please?").
    Not set off ("How do you spell thanks?", "Translate to French: thank you"), they may be what is asked
    about. None when the text ends without one."""
    start = _polite_tail(text)
    if start is None or not text[:start].strip():
        return None
    tail = text[start:]
    set_off = "," in tail or text[:start].rstrip().endswith((".", "!", "?", ";"))
    words = re.findall(r"thank you|[a-z]+", tail.lower())
    return " ".join(sorted({_COURTESY_FORMS[w] for w in words if w in _COURTESY_FORMS})), set_off


def strip_politeness(text: str) -> str:
    """'Please cancel it.' asks what 'cancel it' asks: courtesy words do not change the answer."""
    rest = _POLITE_HEAD.sub("", text)
    start = _polite_tail(rest)
    stripped = (rest if start is None else rest[:start]).strip()
    return stripped or text


def content_text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping):
                parts.append(str(part.get("text", "")) if part.get("type", "text") == "text" else json.dumps(part, sort_keys=True))
            else:
                parts.append(str(part))
        return " ".join(parts)
    return json.dumps(content, sort_keys=True, default=str)


def _canonical_arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return normalize_text(arguments)
    return arguments


def normalize_message(message: Mapping[str, Any], positions: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The parts of a message that change the answer, in a canonical form. `positions` maps the conversation's
    tool-call ids to their position: a tool result keeps which call it answers, without the random id."""
    out: dict[str, Any] = {"role": message.get("role"),
                           "content": normalize_layout(content_text(message.get("content")))}
    if message.get("name"):
        out["name"] = message["name"]
    if message.get("tool_call_id") is not None:
        out["answers"] = (positions or {}).get(message["tool_call_id"], message["tool_call_id"])
    calls = message.get("tool_calls") or []
    if calls:
        out["tool_calls"] = [
            {"name": (c.get("function") or {}).get("name"),
             "arguments": _canonical_arguments((c.get("function") or {}).get("arguments"))}
            for c in calls
        ]
    return out


def _digest(value: Any) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
    return hashlib.sha256(f"{KEY_VERSION}|{blob}".encode()).hexdigest()


def _is_system(message: Mapping[str, Any]) -> bool:
    return message.get("role") in ("system", "developer")


def _canonical_numbers(value: Any) -> Any:
    """Numbers by value, not by spelling: temperature=0 and temperature=0.0 (or 1 and 1.0) are one setting,
    though json.dumps writes them differently. Booleans stay booleans."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) > 2**53:
        # past 2**53 a float rounds: seed=10**18+1 and 10**18+2 (two samples) read as one setting, and
        # past float's range (max_tokens=10**400) float() raises. The integer itself is exact.
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Mapping):
        return {k: _canonical_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical_numbers(v) for v in value]
    return value


def scope_of(request: ChatRequest, default_model: str | None = None) -> str:
    """The hash of what a hit must share with the request that stored the answer."""
    tools = sorted((json.loads(json.dumps(t, sort_keys=True, default=str)) for t in request.tools),
                   key=lambda t: json.dumps(t, sort_keys=True))
    scope = {
        "namespace": request.namespace,
        "model": request.model or default_model or "",
        "params": _canonical_numbers(dict(request.params)),
        "system": [normalize_message(m) for m in request.messages if _is_system(m)],
        "tools": tools,
    }
    if request.model and default_model and request.model != default_model:
        # The local model serves its GGUF whatever name is asked for ("gpt-4o-mini" in a drop-in app): the name
        # alone let a pipeline on another model answer from the stored answers of the one before.
        scope["backend_model"] = default_model
    names = sorted({str(m["name"]) for m in request.messages if m.get("role") == "user" and m.get("name")})
    if names:  # OpenAI's participant names: "What is my name?" asked by alice is not asked by bob
        scope["user_names"] = names
    documents = request.metadata.get("documents")
    if documents:  # retrieved documents a later stage renders: an answer from other documents is no hit
        scope["documents"] = documents
    template_inputs = request.metadata.get("ctxkit.template")
    if template_inputs:  # a TemplateStage after the cache renders these (variables, memory, documents)
        scope["template"] = template_inputs
    return _digest(scope)


def last_user_index(messages: Sequence[Message]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    return None


def _call_text(call: Mapping[str, Any]) -> str:
    function = call.get("function") or {}
    return f"{function.get('name')}({normalize_text(str(function.get('arguments', '')))})"


def call_labels(messages: Sequence[Message]) -> dict[str, str]:
    """{tool_call_id: "name(arguments)"} for the conversation's tool calls, first call first."""
    labels: dict[str, str] = {}
    for m in messages:
        for call in m.get("tool_calls") or []:
            if call.get("id") is not None:
                labels.setdefault(call["id"], _call_text(call))
    return labels


def _answered(m: Message, labels: Mapping[str, str]) -> str:
    """A tool result's "[the call it answers] " ("30C" means nothing alone); "" for other messages."""
    call_id = m.get("tool_call_id")
    return f"[{labels.get(call_id, '')}] " if call_id is not None else ""


def facts_text(messages: Sequence[Message], role: str, labels: Mapping[str, str]) -> str:
    """What the user ("user") or the tools ("tool") said in the whole conversation before the last message
    (not the assistant's wording, which varies): a follow-up's answer depends on every one of these facts,
    also on those older than the context window ("my order 5521" ten turns up)."""
    roles = ("tool", "function") if role == "tool" else (role,)
    # The user's messages keep pasted code's line breaks and indentation (normalize_layout), as the
    # question itself does: code is compared line by line.
    normal = normalize_text if role == "tool" else normalize_layout
    return "\n".join(f"{_answered(m, labels)}{normal(content_text(m.get('content')))}"
                     for m in messages if m.get("role") in roles)


def context_code(messages: Sequence[Message]) -> str:
    """The code in earlier assistant and tool messages (``` fences, indented lines), line by line with its
    indentation: the context text and tool facts collapse whitespace, yet `print('done')` inside or after a
    loop, or a YAML item under one key or another, is another program or document ("what does it print?").
    The user's own messages keep theirs in the facts (facts_text)."""
    return json.dumps([code_lines(normalize_layout(content_text(m.get("content"))))
                       for m in messages if m.get("role") in ("assistant", "tool", "function")])


def context_text(messages: Sequence[Message], labels: Mapping[str, str]) -> str:
    """The turns before the last message, as 'role: text' lines (tool results and calls included)."""
    return _whole_context(messages, labels)[-_CONTEXT_CHARS:]


def _whole_context(messages: Sequence[Message], labels: Mapping[str, str]) -> str:
    lines = []
    for m in messages[-_CONTEXT_MESSAGES:]:
        text = _answered(m, labels) + normalize_text(content_text(m.get("content")))
        for call in m.get("tool_calls") or []:
            text += f" [{_call_text(call)}]"
        lines.append(f"{m.get('role')}: {text.strip()}")
    return "\n".join(lines)


def request_key(request: ChatRequest, default_model: str | None = None) -> RequestKey:
    scope = scope_of(request, default_model)
    turns = [m for m in request.messages if not _is_system(m)]
    labels = call_labels(turns)
    positions = {call_id: i for i, call_id in enumerate(labels)}
    exact = _digest({"scope": scope, "messages": [normalize_message(m, positions) for m in turns]})
    last = turns[-1] if turns else None
    if last is None or last.get("role") != "user":
        return RequestKey(scope=scope, exact=exact, query="", context="")
    raw = normalize_text(content_text(last.get("content")))
    query = strip_politeness(normalize_text(repair(raw)))
    earlier = turns[:-1]
    return RequestKey(scope=scope, exact=exact, query=query, context=context_text(earlier, labels), raw=raw,
                      facts=facts_text(earlier, "user", labels), tool_facts=facts_text(earlier, "tool", labels),
                      layout=normalize_layout(content_text(last.get("content"))),
                      history=_digest([normalize_message(m, positions) for m in earlier]),
                      context_cut=len(earlier) > _CONTEXT_MESSAGES
                      or len(_whole_context(earlier, labels)) > _CONTEXT_CHARS,
                      context_code=context_code(earlier))
