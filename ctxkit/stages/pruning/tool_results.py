"""ToolResultClearingStage: old tool results are replaced by a short placeholder that says what was there
and how to get it again (Anthropic's context editing, `clear_tool_uses`).

What is sent:
- The newest `keep_last` tool results stay verbatim; older ones become
  `[tool result cleared: get_weather({"city": "Oslo"}) returned 812 tokens; call it again with these
  arguments if you need it]`. The tool message itself stays, with its `tool_call_id`, so no assistant tool
  call is ever left without its answer (providers reject that with HTTP 400).
- Clearing moves in steps of at least `clear_at_least` tokens, counted from the oldest result. The
  boundary depends only on the older part of the history, so from one call to the next the same results
  are cleared the same way and the prompt prefix stays byte-identical: a provider's prompt cache or
  llama.cpp's KV cache keeps hitting until the next whole step is worth breaking it for.
- Tools named in `exclude_tools` are never cleared (a tool whose answer the model must keep seeing).

The stage keeps no state between calls: it recomputes the same boundary from the history each time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ...quarantine_marks import PLACEHOLDER_PREFIX as QUARANTINE_PLACEHOLDER_PREFIX
from ...quarantine_marks import carry
from ...request import ChatRequest, call_answered
from ...response import message_text
from ...settings import name_list, whole_number
from ...stage import Stage
from ...tokens import TokenCounter
from ..prefix import default_counter, previous_prompt_end, record_prefix_invalidated

PLACEHOLDER_PREFIX = "[tool result cleared:"


def placeholder(name: str, arguments: str, tokens: int) -> str:
    """The text that replaces a cleared result: what was there and how to get it again."""
    try:
        args = json.dumps(json.loads(arguments or "{}"), sort_keys=True, ensure_ascii=False)
    except json.JSONDecodeError:
        args = arguments
    # The arguments are kept whole, however long: cut, they are no longer a call the model can repeat (a SQL
    # query, a URL). The stage clears a result only when its placeholder, arguments and all, is shorter.
    return (
        f"{PLACEHOLDER_PREFIX} {name}({args}) returned {tokens} tokens; "
        "call it again with these arguments if you need it]"
    )


class ToolResultClearingStage(Stage):
    """Replace tool results older than the newest `keep_last` with placeholders, in steps of at least
    `clear_at_least` tokens saved. Results the model has not read yet (after its newest message) are
    never cleared, however many parallel calls made them."""

    name = "tool_result_clearing"

    def __init__(
        self,
        keep_last: int = 3,
        clear_at_least: int = 1024,
        *,
        exclude_tools: Iterable[str] = (),
        counter: TokenCounter | None = None,
    ) -> None:
        self.keep_last = whole_number(keep_last, "keep_last")
        self.clear_at_least = whole_number(clear_at_least, "clear_at_least")
        self.exclude_tools = frozenset(name_list(exclude_tools, "exclude_tools"))
        self.counter = counter if counter is not None else default_counter()

    def before_model(self, request: ChatRequest) -> ChatRequest:
        messages = list(request.messages)
        cleared = self._cleared(messages)
        if not cleared:
            return request
        # Which of these edits did the previous call not make yet? Only those can break its cached prefix.
        before = self._cleared(messages[: previous_prompt_end(messages)])
        new_edits = [i for i in cleared if i not in before]
        record_prefix_invalidated(self.name, self.counter, messages, min(new_edits) if new_edits else None)
        out = list(messages)
        for index, text in cleared.items():
            out[index] = {**messages[index], "content": text}
        # A cleared result that was quarantined stays quarantined (kept out of summaries and caches).
        return carry(request.override(messages=out), [(messages[i], out[i]) for i in cleared])

    def _cleared(self, messages: Sequence[Mapping[str, Any]]) -> dict[int, str]:
        """{message index: placeholder} for the tool results this history clears."""
        candidates: list[tuple[int, int, str]] = []  # (index, tokens saved, placeholder)
        # Results after the newest assistant message answer its calls and have not been read yet: a turn
        # of many parallel calls must not lose some of them before the model sees them (it would call
        # again, and lose them again).
        seen = previous_prompt_end(messages)
        results = [i for i, m in enumerate(messages) if m.get("role") == "tool"]
        for index in (i for i in results[: max(len(results) - self.keep_last, 0)] if i < seen):
            message = messages[index]
            text = message_text(dict(message))
            if text.startswith((PLACEHOLDER_PREFIX, QUARANTINE_PLACEHOLDER_PREFIX)):
                # The app already sends it cleared, or the quarantine withheld it saying why: a call known
                # to fail is not one to "call again".
                continue
            name, arguments = call_answered(messages, index) or (message.get("name") or "tool", "{}")
            if name in self.exclude_tools:
                continue
            tokens = self.counter.count_text(text)
            short = placeholder(name, arguments, tokens)
            saved = tokens - self.counter.count_text(short)
            if saved > 0:
                candidates.append((index, saved, short))
        # Greedy steps from the oldest: a step closes once it saves clear_at_least; an open step is not cut.
        cleared: dict[int, str] = {}
        step: dict[int, str] = {}
        step_saved = 0
        for index, saved, short in candidates:
            step[index] = short
            step_saved += saved
            if step_saved >= max(self.clear_at_least, 1):
                cleared.update(step)
                step, step_saved = {}, 0
        return cleared


__all__ = ["PLACEHOLDER_PREFIX", "ToolResultClearingStage", "placeholder"]
