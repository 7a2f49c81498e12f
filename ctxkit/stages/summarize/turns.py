"""Where a conversation may be cut: never between an assistant's tool call and the tool results it awaits.

A cut at index i splits `messages[:i]` (folded or dropped) from `messages[i:]` (kept verbatim). Providers
reject a tool result whose call is gone (and a call whose results are gone), so a cut is valid only when
no tool_call_id has its call on one side and its result on the other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _call_ids(message: Mapping[str, Any]) -> list[str]:
    return [str(call.get("id")) for call in message.get("tool_calls") or [] if call.get("id") is not None]


def valid_cuts(messages: Sequence[Mapping[str, Any]]) -> list[bool]:
    """`valid[i]` for i in 0..len(messages): may the conversation be cut just before message i?"""
    n = len(messages)
    # Each tool result answers the newest call with its tool_call_id before it (as request.call_answered
    # reads it): some providers number calls per response ("call_0" on every step), so an id alone names
    # every step's call, and pairing a result with the id's last call left an earlier call and its late
    # result (a user message between them) unprotected: the cut sent the result without its call.
    newest_call: dict[str, int] = {}
    last_result: dict[int, int] = {}  # the index of a call -> the last index of its results
    for i, message in enumerate(messages):
        if message.get("role") == "tool" and message.get("tool_call_id") is not None:
            start = newest_call.get(str(message["tool_call_id"]))
            if start is not None:
                last_result[start] = i
        for call_id in _call_ids(message):
            newest_call[call_id] = i
    valid = [True] * (n + 1)
    for start, end in last_result.items():
        for i in range(start + 1, end + 1):  # cutting inside (call .. last result] separates them
            valid[i] = False
    for i, message in enumerate(messages):
        if message.get("role") == "tool":
            valid[i] = False  # a tail must never start with an orphaned tool result
    return valid


def turn_starts(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Valid cuts that start a user turn (the natural places to cut), in order."""
    valid = valid_cuts(messages)
    return [i for i, message in enumerate(messages) if valid[i] and message.get("role") == "user"]


def tail_start(messages: Sequence[Mapping[str, Any]], keep_last: int, *, floor: int = 0) -> int:
    """The start of the newest `keep_last` messages, moved earlier until the cut is valid (never below floor)."""
    valid = valid_cuts(messages)
    start = max(floor, len(messages) - keep_last)
    while start > floor and not valid[start]:
        start -= 1
    return start
