"""Prefix-cache bookkeeping: which part of a request the previous call of the conversation already sent
(a provider's or llama.cpp's prefix cache may still hold it), and the ledger note a stage writes when its
edit un-caches part of it (`prefix_invalidated`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..pipeline import SentPrompt, message_tokens, previous_prompt_sent, record_event
from ..quarantine_marks import fingerprint
from ..tokens import TokenCounter


def default_counter() -> TokenCounter:
    """Stages count with the backend's counter when given one; otherwise tiktoken's o200k as an estimate."""
    from ..tokens.tiktoken_counter import TiktokenCounter

    return TiktokenCounter("gpt-4o")


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


def invalidated_tokens(counter: TokenCounter, messages: Sequence[Mapping[str, Any]], first_edit: int) -> int:
    """Tokens of the previous call's prompt from message `first_edit` on: what an edit there un-caches.

    The previous prompt is what the backend got (`previous_prompt_sent`: later stages' edits of it after
    `first_edit`, a cleared result, a rendered documents message, included), less the messages before
    `first_edit`. Unknown to this process, or changed before `first_edit` by a later stage (a summary), it is
    `messages` before the newest assistant message, as the stage sees them.
    With the model's own token ids (a GGUF model), the kept part is the previous prompt cut where message
    `first_edit`'s content begins, so its role header, the chat template's default system message and the
    tool block count as kept, as a prefix cache keeps them. Otherwise (tiktoken), the count of the messages
    before it. A message's text alone missed its framing and an assistant's tool calls (content None:
    counted as 4 tokens, whatever its arguments).
    """
    end = previous_prompt_end(messages)
    if first_edit >= end:
        return 0
    previous = [dict(m) for m in messages[:end]]
    sent = previous_prompt_sent()
    delta = None
    kept_prints = tuple(fingerprint(m) for m in previous[:first_edit])
    if sent is not None and sent.prints[:first_edit] != kept_prints:
        delta = _kept_delta(sent, previous[:first_edit], kept_prints, counter)
        if delta is None:
            sent = None
    tools = sent.tools if sent is not None else []
    token_ids = getattr(counter, "tokens", None)
    if callable(token_ids):
        blank = {k: v for k, v in previous[first_edit].items() if k != "tool_calls"}
        old, cut = token_ids(previous, tools), token_ids([*previous[:first_edit], {**blank, "content": ""}], tools)
        total, kept = len(old), shared_prefix(old, cut)
    else:
        total, kept = counter.count_prompt(previous, tools), counter.count_prompt(previous[:first_edit], tools)
    return max(0, (sent.tokens - (delta or 0) if sent is not None else total) - kept)


def _kept_delta(sent: SentPrompt, kept: Sequence[Mapping[str, Any]], prints: Sequence[str],
                counter: TokenCounter) -> int | None:
    """How many more tokens the prompt the backend got holds before the edit than `kept` (the previous prompt's
    messages before it, as the stage sees them): a documents message a later stage rendered before the turn's
    question (an agent loop's later edits come after it), results it cleared or cut then (less than the app's
    text). `prints`: kept's fingerprints. None when the sent prompt does not begin with `kept` so changed (a later
    stage rewrote it)."""
    added = dict(sent.added)
    delta, j, k = 0, 0, 0
    while k < len(kept):
        if j >= len(sent.prints):
            return None
        if sent.prints[j] == prints[k]:
            k += 1
        elif j in added:
            if j + 1 < len(sent.prints) and sent.prints[j + 1] == prints[k]:
                delta += added[j]  # inserted before kept[k]
            else:  # kept[k] as the stage sent it then (cleared, cut)
                delta += added[j] - message_tokens(counter, kept[k])
                k += 1
        else:
            return None
        j += 1
    return delta


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids two prompts share: what a prefix cache keeps of one for the other."""
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def record_prefix_invalidated(
    stage: str, counter: TokenCounter, messages: Sequence[Mapping[str, Any]], first_new_edit: int | None
) -> int:
    """Note in the ledger how many tokens of the previous prompt an edit at `first_new_edit` un-caches.

    Edits at or after the end of the previous prompt cost nothing: the cache never held those tokens.
    """
    if first_new_edit is None:
        return 0
    tokens = invalidated_tokens(counter, messages, first_new_edit)
    if tokens > 0:
        record_event(stage, "prefix_invalidated", tokens=tokens, first_message=first_new_edit)
    return tokens
