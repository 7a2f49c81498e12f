"""Prefix-cache bookkeeping: which part of a request the previous call of the conversation already sent
(a provider's or llama.cpp's prefix cache may still hold it), and the ledger note a stage writes when its
edit un-caches part of it (`prefix_invalidated`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..pipeline import record_event
from ..response import message_text
from ..tokens import TokenCounter


def default_counter() -> TokenCounter:
    """Stages count with the backend's counter when given one; otherwise tiktoken's o200k as an estimate."""
    from ..tokens.tiktoken_counter import TiktokenCounter

    return TiktokenCounter("gpt-4o")


def message_tokens(counter: TokenCounter, message: Mapping[str, Any]) -> int:
    return counter.count_text(message_text(dict(message))) + 4  # role and framing, as chat templates add


def previous_prompt_end(messages: Sequence[Mapping[str, Any]]) -> int:
    """Where the previous call's prompt ended: the index of the newest assistant message.

    In a chat or agent loop the app resends the history and appends the model's last answer and what
    followed it; everything before that answer was the previous call's prompt, which a provider's or
    llama.cpp's prefix cache may still hold.
    """
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return i
    return 0


def record_prefix_invalidated(
    stage: str, counter: TokenCounter, messages: Sequence[Mapping[str, Any]], first_new_edit: int | None
) -> int:
    """Note in the ledger how many tokens of the previous prompt an edit at `first_new_edit` un-caches.

    Edits at or after the end of the previous prompt cost nothing: the cache never held those tokens.
    """
    if first_new_edit is None:
        return 0
    end = previous_prompt_end(messages)
    tokens = sum(message_tokens(counter, m) for m in messages[first_new_edit:end])
    if tokens > 0:
        record_event(stage, "prefix_invalidated", tokens=tokens, first_message=first_new_edit)
    return tokens
