"""Prompt templates: named, versioned prompts with budgeted sections, rendered the same way every time.

A template has sections in a fixed order, from the most stable to the most volatile, so that the prefix a
provider (or llama.cpp) has cached stays byte-identical for as long as possible:

    system -> tools -> instructions -> memory -> conversation history -> documents -> current user message

- `system` and `instructions` become the first (system) message; `memory` (a summary) is a message of its
  own right after it; the conversation follows; the retrieved `documents` go with the newest user message,
  because they change on every call and must not invalidate the history before them.
- Text is rendered by a sandboxed Jinja2 environment (`ImmutableSandboxedEnvironment`): user input only
  ever enters as a variable, never as template source, and templates cannot touch Python objects.
- Rendering is deterministic: no clock, no random ids; JSON (the `tojson` filter and the tool schemas)
  is written with sorted keys; tools are sent in name order.
- Each section has an optional token budget, counted with the backend's own counter. Over budget, the
  documents section drops whole documents from its end (ids of the kept ones are reported), the
  conversation drops its oldest turns (never splitting a tool call from its result), memory is cut at a
  sentence end (and left out when not one sentence fits beside its header), and the app's own system,
  instructions and tools raise a TemplateError: silently cutting those would change what the app asked for.
- The user's own text is never trimmed: pasted code keeps its indentation.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import threading
import zlib
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from ..errors import RequestError
from ..lru import LRUMemo
from ..request import ChatRequest, Message, Tool
from ..response import ChatResponse
from ..sentences import leading_sentences
from ..stage import Stage
from ..tokens import TokenCounter

SECTIONS = ("system", "tools", "instructions", "memory", "conversation", "documents")
TEXT_SECTIONS = ("system", "instructions", "memory", "documents")
METADATA_KEY = "ctxkit.template"  # request.metadata[METADATA_KEY] = {"variables":..., "documents":..., "memory":...}

DEFAULT_DOCUMENTS = (
    "{% for doc in documents %}[{{ doc.id }}] {{ doc.text }}\n{% endfor %}"
)
DEFAULT_TURN = "{% if documents %}Documents:\n{{ documents }}\n{% endif %}{{ content }}"
DEFAULT_MEMORY = "Summary of the earlier conversation:\n{{ memory }}"


class TemplateError(RequestError):
    """A template that cannot be compiled or rendered, or a fixed section over its token budget."""


def _tojson(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(", ", ": "), default=_json_default)


def _json_default(value: Any) -> Any:
    # A set iterates in hash order, which changes from process to process: sorted, it is the same prefix
    # on every worker and every restart.
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=_tojson)
    return str(value)


def _stable(value: Any) -> Any:
    """`value` with every set turned into a sorted list and every dict's keys sorted, for the variables a template
    gets and for what it prints: a set iterates in hash order, salted per process, so `{{ tags }}`,
    `{{ tags | join(", ") }}` or a `for` over it would render other bytes on every worker."""
    if isinstance(value, (set, frozenset)):
        return sorted((_stable(item) for item in value), key=_tojson)
    if isinstance(value, Mapping):
        # Keys in sorted order: `{% for k, v in profile.items() %}` (or `profile | list`) iterates in insertion
        # order, and equal dicts built in another order (another worker, a dict made from a set) rendered
        # other bytes.
        return {key: _stable(value[key]) for key in sorted(value, key=_tojson)}
    if isinstance(value, list):
        return [_stable(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_stable(item) for item in value)
    return value


def sandboxed_environment() -> Any:
    """The Jinja2 sandbox every ctxkit prompt is rendered with (also used by the summarizer's prompts)."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        undefined=StrictUndefined,  # a missing variable is an error, not a silent empty string
        autoescape=False,  # prompts are plain text, not HTML
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["tojson"] = _tojson
    env.finalize = _stable  # `{{ profile }}`: equal dicts (and sets) print the same, whatever order they were built in
    env.filters.pop("random", None)  # a random pick is a different prompt on every call
    env.globals.clear()  # no range/lipsum/dict/cycler: nothing that varies or reaches outside
    return env


@dataclasses.dataclass(frozen=True)
class RenderedPrompt:
    """The messages and tools a template produced, and what each section cost.

    section_tokens: tokens of each section's rendered text (tools: their canonical JSON).
    kept_documents: ids of the documents that fit the documents budget, in the order given.
    dropped_messages: how many of the oldest conversation messages did not fit its budget.
    """

    template: str
    messages: list[Message]
    tools: list[Tool]
    section_tokens: dict[str, int]
    kept_documents: list[str]
    dropped_messages: int

    def to_request(self, **fields: Any) -> ChatRequest:
        metadata = dict(fields.pop("metadata", {}) or {})
        metadata.setdefault("ctxkit.template_id", self.template)
        return ChatRequest(messages=self.messages, tools=self.tools, metadata=metadata, **fields)


class PromptTemplate:
    """One named, versioned prompt. Section sources are Jinja2 text; budgets are tokens per section.

        template = PromptTemplate("support", "2", system="You help {{ shop }}'s customers.",
                                  budgets={"documents": 800, "memory": 200, "conversation": 1500})
        prompt = template.render(counter, variables={"shop": "Bookly"}, conversation=messages,
                                 documents=[{"id": "faq-3", "text": "..."}])
    """

    def __init__(
        self,
        name: str,
        version: str,
        *,
        system: str = "",
        instructions: str = "",
        memory: str = DEFAULT_MEMORY,
        documents: str = DEFAULT_DOCUMENTS,
        turn: str = DEFAULT_TURN,
        memory_role: str = "system",
        budgets: Mapping[str, int] | None = None,
    ) -> None:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise TemplateError(f"template name must be letters, digits, '.', '_' or '-': {name!r}")
        if not isinstance(version, str) or not re.fullmatch(r"[0-9]+(\.[0-9]+)*", version):  # 2 was a TypeError
            raise TemplateError(f"template version must look like '3' or '1.2': {version!r}", name)
        budgets = dict(budgets or {})
        unknown = sorted(set(budgets) - set(SECTIONS))
        if unknown:
            raise TemplateError(f"unknown section(s) in budgets: {unknown}; sections are {list(SECTIONS)}", name)
        for section, budget in budgets.items():
            if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
                raise TemplateError(f"budget of {section!r} must be a positive int, got {budget!r}", name)
        if memory_role not in ("system", "user"):
            raise TemplateError(f"memory_role must be 'system' or 'user', got {memory_role!r}", name)
        self.name = name
        self.version = version
        self.budgets = budgets
        self.memory_role = memory_role
        self.sources = {"system": system, "instructions": instructions, "memory": memory,
                        "documents": documents, "turn": turn}
        self._env = sandboxed_environment()
        self._compiled = {}
        for key, source in self.sources.items():
            try:
                self._compiled[key] = self._env.from_string(source)
            except Exception as exc:  # jinja2.TemplateSyntaxError and friends
                raise TemplateError(f"section {key!r} does not compile: {exc}", self.id) from exc
        from jinja2 import meta

        # A turn that never prints the documents sent none of them while reporting them kept and counted.
        self._turn_has_documents = "documents" in meta.find_undeclared_variables(self._env.parse(turn))

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def version_key(self) -> tuple[int, ...]:
        return tuple(int(part) for part in self.version.split("."))

    # -- rendering ----------------------------------------------------------------------------------
    def _text(self, key: str, /, **variables: Any) -> str:
        return self._rendered(key, **variables).strip()

    def _rendered(self, key: str, /, **variables: Any) -> str:
        # Positional-only `key` and the variables passed as one dict: a template variable named `key` or `self`
        # was a TypeError ("got multiple values for argument") instead of a value.
        try:
            return str(self._compiled[key].render(variables))
        except Exception as exc:  # UndefinedError, SecurityError
            raise TemplateError(f"section {key!r} failed to render: {exc}", self.id) from exc

    def render(
        self,
        counter: TokenCounter,
        *,
        variables: Mapping[str, Any] | None = None,
        conversation: Sequence[Message] = (),
        documents: Sequence[Mapping[str, Any]] = (),
        memory: str | None = None,
        tools: Sequence[Tool] = (),
        earlier_turns: MutableMapping[str, str] | None = None,
        known_sizes: LRUMemo[bytes, int] | None = None,
    ) -> RenderedPrompt:
        """Messages and tools for one call. `conversation` is the chat so far, its last message the newest.

        earlier_turns: for one conversation, each user message's text as the turn section framed it when it was
        the newest (read for the earlier ones, written for the newest). TemplateStage keeps one per conversation:
        a turn with a per-call variable ("asked at {{ time }}") then frames each question once, as it was asked,
        instead of relabelling every earlier one (and un-caching the prompt from the first) on every call.
        known_sizes: message sizes measured on earlier calls with this counter (see _prompt_sizes)."""
        if variables is not None and not isinstance(variables, Mapping):
            raise TemplateError(f"variables must be a dict of name -> value, got {type(variables).__name__}", self.id)
        if memory is not None and not isinstance(memory, str):
            raise TemplateError(f"memory must be a string, got {type(memory).__name__}", self.id)
        if isinstance(documents, (str, bytes, Mapping)) or not isinstance(documents, Sequence):
            raise TemplateError(f"documents must be a list of {{'id', 'text'}} objects, got {type(documents).__name__}",
                                self.id)
        for index, doc in enumerate(documents):
            if not isinstance(doc, Mapping) or "id" not in doc or not isinstance(doc.get("text"), str):
                raise TemplateError(f"documents[{index}] needs an 'id' and a string 'text', got {doc!r:.80}", self.id)
        try:
            variables = _stable(dict(variables or {}))
            documents = [_stable(doc) for doc in documents]
        except RecursionError:  # a value nested thousands deep: the caller's data, not a server fault
            raise TemplateError("variables or documents are nested too deeply", self.id) from None
        if any(not isinstance(name, str) for name in variables):
            raise TemplateError("variable names must be strings", self.id)
        reserved = {"documents", "memory", "content", "self"} & set(variables)  # self: Jinja2's own
        if reserved:
            raise TemplateError(f"variable name(s) reserved by the template: {sorted(reserved)}", self.id)
        tokens: dict[str, int] = {}

        system_text = self._text("system", **variables)
        instructions_text = self._text("instructions", **variables)
        for section, text in (("system", system_text), ("instructions", instructions_text)):
            tokens[section] = counter.count_text(text) if text else 0
            self._fixed_budget(section, tokens[section])

        canonical_tools = sorted((_canonical(tool) for tool in tools), key=lambda t: t["function"]["name"])
        tokens["tools"] = _tools_tokens(canonical_tools, counter) if canonical_tools else 0
        self._fixed_budget("tools", tokens["tools"])

        memory_text = self._memory(memory or "", counter, variables)
        tokens["memory"] = counter.count_text(memory_text) if memory_text else 0

        kept_docs, docs_text = self._documents(documents, counter, variables)
        if docs_text and not self._turn_has_documents:
            raise TemplateError(f"section 'turn' does not use {{{{ documents }}}}: the {len(kept_docs)} document(s) "
                                "given would not be sent", self.id)
        tokens["documents"] = counter.count_text(docs_text) if docs_text else 0

        history = [copy.deepcopy(dict(m)) for m in conversation]
        # Every user message goes through the turn section, not only the newest: a turn template that frames
        # the question ("Customer question: {{ content }}") framed it on one call and sent it bare on the next,
        # which changed the prompt from the previous question on (and un-cached it) on every turn. The older
        # ones go without documents, which stay with the newest question.
        last_user = next((i for i in range(len(history) - 1, -1, -1) if history[i].get("role") == "user"), None)
        for i, message in enumerate(history):
            if message.get("role") == "user":
                framed = self._earlier_turn(message, variables, earlier_turns, newest=i == last_user)
                if i != last_user:
                    history[i] = framed
        dropped = 0
        budget = self.budgets.get("conversation")
        sizes = _prompt_sizes(history, counter, known_sizes) if history else []
        if budget is not None and history:
            dropped = _oldest_to_drop(history, budget, sizes)
            history = history[dropped:]
        tokens["conversation"] = sum(sizes[dropped:])

        # The newest user message, also when the turn goes on with tool calls and their results after it: the
        # documents stay with the question (and the previous call's prompt stays the prefix of this one)
        # instead of arriving as a new user turn after a tool result.
        newest = next((i for i in range(len(history) - 1, -1, -1) if history[i].get("role") == "user"), None)
        with_documents = self._with_documents(history[newest], docs_text, variables) if newest is not None else None
        if newest is not None and with_documents is not None:
            history[newest] = with_documents
        elif docs_text:
            history.append({"role": "user", "content": self._text("turn", documents=docs_text, content="",
                                                                  **variables)})

        messages: list[Message] = []
        system = "\n\n".join(t for t in (system_text, instructions_text) if t)
        if system:
            messages.append({"role": "system", "content": system})
        if memory_text:
            messages.append({"role": self.memory_role, "content": memory_text})
        messages.extend(history)
        return RenderedPrompt(
            template=self.id, messages=messages, tools=canonical_tools, section_tokens=tokens,
            kept_documents=[str(doc["id"]) for doc in kept_docs], dropped_messages=dropped,
        )

    def _earlier_turn(self, message: dict[str, Any], variables: Mapping[str, Any],
                      earlier_turns: MutableMapping[str, str] | None, *, newest: bool) -> dict[str, Any]:
        """A user message framed by the turn section without documents: as it was framed when it was the newest
        (earlier_turns), else with these variables; the newest one's framing is noted for the calls after."""
        text = _question_text(message)
        if earlier_turns is not None and text is not None and not newest and text in earlier_turns:
            return _with_question_text(message, earlier_turns[text])
        framed = self._with_documents(message, "", variables) or message
        framed_text = _question_text(framed)
        if earlier_turns is not None and text is not None and framed_text is not None and (
                newest or text not in earlier_turns):
            earlier_turns[text] = framed_text
        return framed

    def _with_documents(self, message: dict[str, Any], docs_text: str,
                        variables: Mapping[str, Any]) -> dict[str, Any] | None:
        """The user message rendered with the documents as one turn, or None when it has no text to go with.

        With content parts (the OpenAI SDK's list shape) the question is the first text part: the documents
        go there, not after the newest tool result as a new user turn that moves (and un-caches the prompt)
        on every step of a tool loop."""
        text = _question_text(message)
        return None if text is None else _with_question_text(message, self._turn(docs_text, text, variables))

    def _documents(self, documents: Sequence[Mapping[str, Any]], counter: TokenCounter,
                   variables: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], str]:
        """The documents that fit the section's budget, in the order given (a later, shorter one may fit
        where an earlier one did not), and the section's text.

        Rendering and counting the whole section again for each document took 37 s for 2,000 documents:
        a document is first measured alone, and the section is rendered whole only for one that might not
        fit (within a margin for the tokens its seams may add)."""
        budget = self.budgets.get("documents")
        everything = self._text("documents", documents=list(documents), **variables) if documents else ""
        if budget is None or counter.count_text(everything) <= budget:
            return list(documents), everything
        margin = 8
        kept: list[Mapping[str, Any]] = []
        # An estimate: the section's own text (a header) and each kept document rendered alone, less that text.
        base = counter.count_text(self._text("documents", documents=[], **variables))
        used = base
        docs_text = ""
        exact = True  # docs_text is the rendering of `kept`
        too_long = budget + 1  # the size of the smallest document the rendered check found not to fit
        for doc in documents:
            alone = counter.count_text(self._text("documents", documents=[doc], **variables)) - base
            if used + alone + margin <= budget:
                kept.append(doc)
                used += alone
                exact = False
                continue
            if used + alone > budget + margin or alone >= too_long:
                continue  # cannot fit (no larger than one that did not); a later, shorter document may
            candidate = self._text("documents", documents=[*kept, doc], **variables)
            if counter.count_text(candidate) > budget:
                too_long = alone
                continue
            kept.append(doc)
            used, docs_text, exact = counter.count_text(candidate), candidate, True
            too_long = budget + 1
        if not exact:
            docs_text = self._text("documents", documents=kept, **variables) if kept else ""
        while kept and counter.count_text(docs_text) > budget:  # the estimate was short: drop from the end
            kept.pop()
            docs_text = self._text("documents", documents=kept, **variables) if kept else ""
        return kept, docs_text

    def _memory(self, memory: str, counter: TokenCounter, variables: Mapping[str, Any]) -> str:
        """The memory message: the summary's first whole sentences that fit the budget with the section's
        own text around them; none at all when not one sentence fits (a header alone says nothing)."""
        if not memory.strip():
            return ""
        budget = self.budgets.get("memory")
        if budget is None:
            return self._text("memory", memory=memory, **variables)
        room = budget - counter.count_text(self._text("memory", memory="", **variables))
        while room > 0:
            body = leading_sentences(memory, room, counter)
            if not body:
                return ""
            text = self._text("memory", memory=body, **variables)
            over = counter.count_text(text) - budget
            if over <= 0:
                return text
            room -= over  # the header and the body share a token at their seam: try a little less
        return ""

    def _turn(self, documents: str, content: str, variables: Mapping[str, Any]) -> str:
        """The newest user message in the turn section. Whitespace the template puts around it is trimmed,
        the user's own text is not (pasted code keeps its indentation)."""
        marker = "\x00ctxkit-content\x00"
        framed = self._rendered("turn", documents=documents, content=marker, **variables)
        rendered = self._rendered("turn", documents=documents, content=content, **variables)
        # The marker stands for the content only where the template does nothing but print it: one that tests
        # it (`content|length`, `'refund' in content`) takes other branches for the marker.
        if framed.count(marker) == 1 and framed.replace(marker, content) == rendered:
            return framed.strip().replace(marker, content)
        return rendered.strip()  # the template transforms the content: as it says

    def _fixed_budget(self, section: str, used: int) -> None:
        budget = self.budgets.get(section)
        if budget is not None and used > budget:
            raise TemplateError(f"section {section!r} renders to {used} tokens, over its budget of {budget}",
                                self.id)


def _canonical(tool: Tool) -> Tool:
    # A round trip through sorted-key JSON: same schema, same bytes, whatever order the app built it in.
    return json.loads(json.dumps(tool, sort_keys=True))


def _message_tokens(message: Mapping[str, Any], counter: TokenCounter) -> int:
    from ..response import message_text

    return counter.count_text(message_text(dict(message)))


def _tools_tokens(tools: list[Tool], counter: TokenCounter) -> int:
    """Tokens the tools add to the prompt, as the backend writes them (a local model's template: its tool
    instructions and one JSON line per tool), not the size of their JSON alone."""
    head: list[Message] = [{"role": "system", "content": "s"}]
    return max(0, counter.count_prompt(head, tools) - counter.count_prompt(head))


def _question_text(message: Mapping[str, Any]) -> str | None:
    """A user message's question: its text, or its first text part (the OpenAI SDK's list shape)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    for part in content if isinstance(content, list) else ():
        if isinstance(part, Mapping) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            return str(part["text"])
    return None


def _with_question_text(message: dict[str, Any], text: str) -> dict[str, Any]:
    """The message with its question (see _question_text) replaced by `text`."""
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": text}
    parts = list(content) if isinstance(content, list) else []
    for k, part in enumerate(parts):
        if isinstance(part, Mapping) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            parts[k] = {**part, "text": text}
            return {**message, "content": parts}
    return message


def _prompt_sizes(history: list[Message], counter: TokenCounter,
                  known: LRUMemo[bytes, int] | None = None) -> list[int]:
    """Tokens each message takes in the prompt as the backend writes it: its role and markers, and an
    assistant's tool calls and a tool result as the chat template renders them (a local model without native
    tools gets them as <tool_call> and <tool_response> text, longer than the bare JSON). A tool result is
    measured after the call it answers, whose name the template writes into it.

    known: sizes measured on earlier calls (TemplateStage keeps them), keyed by the message and the call it
    answers: each call of a conversation resends its history, and rendering every message again cost 0.3 s
    per call at 2,000 messages."""
    head: list[Message] = [{"role": "system", "content": "s"}]
    calls: dict[Any, Message] = {}
    contexts: list[Message | None] = []
    for message in history:
        answered = calls.get(message.get("tool_call_id")) if message.get("role") == "tool" else None
        contexts.append(answered)
        for call in message.get("tool_calls") or []:
            if isinstance(call, Mapping):
                calls[call.get("id")] = message
    keys = [_digest(_json_bytes([context, message])) for context, message in zip(contexts, history, strict=True)]
    found = known.get(keys) if known is not None else {}
    base: int | None = None
    framing: int | None = None
    measured: dict[bytes, int] = {}
    sizes: list[int] = []
    for key, context_message, message in zip(keys, contexts, history, strict=True):
        size = found.get(key, measured.get(key))
        if size is None:
            if base is None:
                base = counter.count_prompt(head)
            context = head if context_message is None else [*head, context_message]
            try:
                before = base if context_message is None else counter.count_prompt(context)
                size = max(0, counter.count_prompt([*context, message]) - before)
            except Exception:  # a message the chat template cannot render alone: its text and the usual framing
                if framing is None:
                    probe = counter.count_prompt([*head, {"role": "user", "content": "x"}]) - base
                    framing = max(0, probe - counter.count_text("x"))
                size = _message_tokens(message, counter) + framing
            measured[key] = size
        sizes.append(size)
    if known is not None and measured:
        known.put(measured)
    return sizes


def _oldest_to_drop(history: list[Message], budget: int, sizes: list[int]) -> int:
    """How many of the oldest messages to drop so the rest fits `budget`, cutting only where valid, or, when
    nothing fits, as many as a valid cut allows (the newest message always stays, with the tool call its
    result answers).

    Messages go in steps of at least a quarter of the budget, counted from the oldest: the steps depend only
    on the older history, so the cut moves only when a whole further step must go, and the prompt after the
    system message stays byte-identical (a prefix cache keeps hitting) for the calls in between. Dropping
    just enough on every call moved the start of the conversation, and broke the cache, on every turn."""
    from .summarize.turns import valid_cuts  # here, not at the top: summarize uses this module's engine

    valid = valid_cuts(history)
    total = sum(sizes)
    if total <= budget:
        return 0
    step = max(budget // 4, 1)
    last_valid, first_fit, fit_dropped = 0, None, 0
    dropped = step_dropped = 0
    for cut in range(1, len(history)):
        dropped += sizes[cut - 1]
        step_dropped += sizes[cut - 1]
        if not valid[cut]:
            continue
        last_valid = cut
        fits = total - dropped <= budget
        if fits and first_fit is None:
            first_fit, fit_dropped = cut, dropped
        if step_dropped >= step:  # a step closes here
            if fits:
                # ...unless reaching it drops more than a step beyond what had to go (a long message
                # inside the step: the document the question is about), which costs content, not cache
                return cut if first_fit is None or dropped - fit_dropped <= step else first_fit
            step_dropped = 0
    return first_fit if first_fit is not None else last_valid


def _definition(template: PromptTemplate) -> tuple[Any, ...]:
    return template.sources, template.budgets, template.memory_role


class TemplateRegistry:
    """Templates by name and version; `get(name)` is the newest version. One registry per app, no globals."""

    def __init__(self, templates: Sequence[PromptTemplate] = ()) -> None:
        self._lock = threading.Lock()
        self._templates: dict[str, dict[str, PromptTemplate]] = {}
        for template in templates:
            self.register(template)

    def register(self, template: PromptTemplate) -> PromptTemplate:
        with self._lock:
            versions = self._templates.setdefault(template.name, {})
            existing = versions.get(template.version)
            if existing is not None and _definition(existing) != _definition(template):
                # A version is a promise: the same id must always render the same prompt (budgets and the
                # memory role change the prompt as much as the text does).
                raise TemplateError(f"{template.id} is already registered with different text, budgets or "
                                    "memory_role", template.id)
            versions[template.version] = template
        return template

    def get(self, name: str, version: str | None = None) -> PromptTemplate:
        with self._lock:
            versions = self._templates.get(name)
            if not versions:
                raise TemplateError(f"no template named {name!r}")
            if version is None:
                return max(versions.values(), key=lambda t: t.version_key)
            if version not in versions:
                raise TemplateError(f"template {name!r} has no version {version!r}; it has {sorted(versions)}")
            return versions[version]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._templates)


# Conversations whose last rendered prompt a TemplateStage remembers, the least recently called dropped first.
LAST_PROMPTS = 1024
# Message sizes a TemplateStage remembers (a digest and an int each: a few MB at most).
KNOWN_SIZES = 50_000


@dataclasses.dataclass(frozen=True)
class _RenderedPrompt:
    """A call's prompt as the next call of its conversation compares it: a digest per message and one of
    the tool block, and the prompt itself compressed (a few KB), unpacked only when the next prompt's
    prefix differs and the tokens it un-caches are counted."""

    tools_digest: bytes
    digests: bytes  # DIGEST bytes per message, end to end (one object, not one per message)
    packed: bytes

    def __len__(self) -> int:
        return len(self.digests) // DIGEST

    def common_prefix(self, other: _RenderedPrompt) -> int:
        """How many leading messages the two prompts share; none when their tool blocks (which lead) differ."""
        if self.tools_digest != other.tools_digest:
            return 0
        common = 0
        while common < min(len(self), len(other)) and \
                self.digests[common * DIGEST:(common + 1) * DIGEST] == other.digests[common * DIGEST:(common + 1) * DIGEST]:
            common += 1
        return common

    @classmethod
    def of(cls, messages: list[Message], tools: list[Tool]) -> _RenderedPrompt:
        encoded = [_json_bytes(m) for m in messages]
        tools_json = _json_bytes(tools)
        packed = zlib.compress(b"[[" + b",".join(encoded) + b"]," + tools_json + b"]", 1)
        return cls(_digest(tools_json), b"".join(_digest(e) for e in encoded), packed)

    def unpack(self) -> tuple[list[Message], list[Tool]]:
        messages, tools = json.loads(zlib.decompress(self.packed))
        return messages, tools


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode()


DIGEST = 16


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST).digest()


class TemplateStage(Stage):
    """Renders each request through a template: its messages are the conversation, and
    `request.metadata["ctxkit.template"]` may carry `variables`, `documents` and `memory`.

    A request that already starts with a system message loses it to the template's own system and
    instructions (`replace_system=True`, the default; a `system_replaced` ledger event says so); with
    `replace_system=False`, or a template without either, it is kept in front of the template's messages."""

    name = "templates"

    def __init__(self, template: PromptTemplate, counter: TokenCounter, *, replace_system: bool = True) -> None:
        self.template = template
        self.counter = counter
        self.replace_system = replace_system
        # What the previous call of each conversation was rendered to: the documents move to the newest
        # question and a budgeted conversation drops its oldest turns, and both un-cache the prompt after
        # them (a `prefix_invalidated` event, as the other stages that edit earlier content note theirs).
        self._last: LRUMemo[tuple[str, str], _RenderedPrompt] = LRUMemo(LAST_PROMPTS)
        # Each conversation's questions as the turn section framed them when asked (PromptTemplate.render).
        self._earlier_turns: LRUMemo[tuple[str, str], dict[str, str]] = LRUMemo(LAST_PROMPTS)
        self._known_sizes: LRUMemo[bytes, int] = LRUMemo(KNOWN_SIZES)  # messages measured with this counter
        # The template without section budgets: what the app would have sent whole (the naive count). Without
        # budgets the stage saves nothing: what it renders from metadata (documents, memory) is counted in naive.
        sources = template.sources
        self._whole = PromptTemplate(
            template.name, template.version, system=sources["system"], instructions=sources["instructions"],
            memory=sources["memory"], documents=sources["documents"], turn=sources["turn"],
            memory_role=template.memory_role) if template.budgets else template
        self._naive_memo: dict[tuple[Any, ...], tuple[Any, ...]] = {}  # see naive_request
        self._naive_lock = threading.Lock()

    def before_model(self, request: ChatRequest) -> ChatRequest:
        return self._render(request, self.template, earlier_turns=self._turns_of(request, create=True), note=True)

    def naive_request(self, request: ChatRequest) -> ChatRequest:
        """Without the section budgets the app would have sent the whole prompt: every document, the whole
        memory and conversation, and the app's own system message. That is the naive count, so the template's
        saving is what its budgets cut and the system message it replaced."""
        # The pipeline asks for it at every hand-over before this stage (and twice more for the call's naive count
        # and this stage's own): rendered and counted anew each time, a 2,000-message history cost 13 s of counting
        # per call instead of 1.5 s. The same request (its lists and messages untouched) renders the same.
        from ..pipeline import _same, _shape

        key = (id(request.messages), id(request.tools), id(request.metadata), request.namespace, request.conversation_id)
        shape = _shape(request)
        with self._naive_lock:
            memo = self._naive_memo.get(key)
            if memo is not None and memo[0] is request.messages and memo[1] is request.tools \
                    and memo[2] is request.metadata and _same(memo[3], shape):
                return memo[4]
        naive = self._naive(request)
        with self._naive_lock:
            self._naive_memo[key] = (request.messages, request.tools, request.metadata, shape, naive)
            while len(self._naive_memo) > 8:
                self._naive_memo.pop(next(iter(self._naive_memo)))
        return naive

    def _naive(self, request: ChatRequest) -> ChatRequest:
        turns = self._turns_of(request, create=False)
        try:  # a copy: counting must not record how this call's question was framed
            # The app's own system message counts too, replaced or not: it is what the app sent, and replacing
            # it with the template's is a saving (tokens_naive is "all its messages", see docs/ledger.md).
            return self._render(request, self._whole, earlier_turns=dict(turns) if turns is not None else None,
                                note=False)
        except TemplateError:
            return request  # before_model names the fault

    def _turns_of(self, request: ChatRequest, *, create: bool) -> dict[str, str] | None:
        if not request.conversation_id:
            return None
        key = (request.namespace, request.conversation_id)
        turns = self._earlier_turns.get([key]).get(key)
        if turns is None and create:
            turns = {}
            self._earlier_turns.put({key: turns})
        return turns

    def _render(self, request: ChatRequest, template: PromptTemplate, *, earlier_turns: dict[str, str] | None,
                note: bool) -> ChatRequest:
        inputs = request.metadata.get(METADATA_KEY) or {}
        if not isinstance(inputs, Mapping):
            raise TemplateError(f"metadata[{METADATA_KEY!r}] must be a dict", template.id)
        conversation = list(request.messages)
        app_system = conversation.pop(0) if conversation and conversation[0].get("role") == "system" else None
        rendered = template.render(
            self.counter, variables=inputs.get("variables"), conversation=conversation,
            documents=inputs.get("documents") or (), memory=inputs.get("memory"), tools=request.tools,
            earlier_turns=earlier_turns, known_sizes=self._known_sizes,
        )
        # The app's system message goes only when the template brings its own to replace it.
        own_system = bool(template.sources.get("system") or template.sources.get("instructions"))
        keep = app_system is not None and (not note or not self.replace_system or not own_system)
        messages: list[Message] = [app_system, *rendered.messages] if keep and app_system else rendered.messages
        if note and app_system is not None and not keep:
            from ..pipeline import record_event

            record_event(self.name, "system_replaced", template=rendered.template,
                         tokens=self.counter.count_text(str(app_system.get("content") or "")))
        metadata = {**request.metadata, "ctxkit.template_id": rendered.template,
                    "ctxkit.kept_documents": rendered.kept_documents}
        if note and request.conversation_id:
            self._note_invalidated((request.namespace, request.conversation_id), messages, rendered.tools)
        return request.override(messages=messages, tools=rendered.tools, metadata=metadata)

    def wrap_call(self, request: ChatRequest, call_next: Any) -> Any:
        saved = self._saved(request)
        request = self.before_model(request)
        try:
            result = call_next(request)
        except BaseException:
            self._forget(saved)
            raise
        return self.after_model(request, result) if isinstance(result, ChatResponse) else result

    async def awrap_call(self, request: ChatRequest, call_next: Any) -> Any:
        saved = self._saved(request)
        request = await self._run_hook("before_model", request)
        try:
            result = await call_next(request)
        except BaseException:
            self._forget(saved)
            raise
        if not isinstance(result, ChatResponse) or type(self).after_model is Stage.after_model:
            return result
        return await self._run_hook("after_model", request, result)

    def _saved(self, request: ChatRequest) -> tuple[tuple[str, str], _RenderedPrompt | None] | None:
        """The conversation's previous prompt before this call replaces it: a call that fails after this stage
        (a context overflow, a provider error) never reached a prefix cache, and its retry must be compared
        with the prompt that did, not with the one that failed."""
        if not request.conversation_id:
            return None
        key = (request.namespace, request.conversation_id)
        return key, self._last.get([key]).get(key)

    def _forget(self, saved: tuple[tuple[str, str], _RenderedPrompt | None] | None) -> None:
        if saved is not None:
            key, previous = saved
            self._last.put({key: previous})  # type: ignore[dict-item]  # None: no previous prompt

    def _note_invalidated(self, key: tuple[str, str], messages: list[Message], tools: list[Tool]) -> None:
        current = _RenderedPrompt.of(messages, tools)
        previous = self._last.get([key]).get(key)
        self._last.put({key: current})
        if previous is None:
            return
        common = previous.common_prefix(current)
        if common == len(previous):
            return
        before, tools_before = previous.unpack()
        token_ids = getattr(self.counter, "tokens", None)
        if callable(token_ids):
            # The prompt's own token ids (a GGUF model's): what a prefix cache keeps is the tokens the two prompts
            # share, not whole messages. Counting `before[:common]` as a prompt of its own added its generation
            # prompt and missed the shared role markers and the chat template's default system message.
            old, new = token_ids(before, tools_before), token_ids(messages, tools)
            shared = next((k for k, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
            tokens = len(old) - shared
        else:
            tokens = self.counter.count_prompt(before, tools_before)
            if common:
                tokens -= self.counter.count_prompt(before[:common], tools_before)
        if tokens > 0:
            from ..pipeline import record_event

            record_event(self.name, "prefix_invalidated", tokens=tokens, first_message=common)
