"""Which tools one call gets: the query from the conversation's recent intent, top-k by fused score with
one pick per task first, pinned and already-used tools always in, everything in catalog order.

The query is not only the last message. The last user message counts most, split into its sentences
so that "convert 5000 EUR to USD. Then find the tallest mountains near Tokyo." asks for two tools;
earlier user messages count less with every turn back, so "and in Paris?" still finds the weather tool.

The output is in catalog order, not score order: when the selection does not change between calls, the
tool block of the prompt is byte-identical, and a provider's or llama.cpp's prefix cache keeps hitting.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...errors import ConfigurationError
from ...response import message_text
from .index import Tool, ToolIndex

_SENTENCE_END = re.compile(r"(?<=[.?!;])\s+|\n+")
MAX_PARTS = 12  # a pasted document must not cost a dozen embeddings per call
MAX_CHARS = 2000


@dataclasses.dataclass(frozen=True)
class QueryPart:
    """One piece of text the selector searches with, and how much its matches count."""

    text: str
    weight: float


@dataclasses.dataclass(frozen=True)
class Selection:
    """What one call is sent.

    tools:     the schemas, in catalog order.
    retrieved: names chosen by retrieval, best first (pinned and used tools not included).
    pinned:    pinned names present in the catalog.
    used:      names the conversation already called that are in the catalog.
    """

    tools: tuple[Tool, ...]
    retrieved: tuple[str, ...]
    pinned: tuple[str, ...]
    used: tuple[str, ...]
    query: tuple[QueryPart, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t["function"]["name"] for t in self.tools)


def conversation_query(
    messages: Sequence[dict[str, Any]], *, turns: int = 3, decay: float = 0.5, whole_weight: float = 0.9
) -> list[QueryPart]:
    """The query parts for a conversation: the last user message (whole, and each sentence when it has
    several), then up to `turns - 1` earlier user messages, each `decay` times the weight of the next."""
    user_texts = [_clip(message_text(m)) for m in messages if m.get("role") == "user"]
    user_texts = [t for t in user_texts if t.strip()]
    if not user_texts:
        # A conversation that starts from a system prompt alone: search with what there is.
        text = _clip(" ".join(message_text(m) for m in messages[-2:]))
        return [QueryPart(text, 1.0)] if text.strip() else []
    last = user_texts[-1].strip()
    sentences = [s.strip() for s in _SENTENCE_END.split(last) if s.strip()]
    parts = [QueryPart(last, whole_weight if len(sentences) > 1 else 1.0)]
    if len(sentences) > 1:
        parts += [QueryPart(s, 1.0) for s in sentences[: MAX_PARTS - 1]]
    weight = 1.0
    for text in reversed(user_texts[-turns:-1]):
        weight *= decay
        parts.append(QueryPart(text.strip(), weight * whole_weight))
    return parts


def used_tool_names(messages: Sequence[dict[str, Any]]) -> list[str]:
    """Tools the conversation has already called, first use first."""
    names: dict[str, None] = {}
    for message in messages:
        if message.get("role") == "assistant":
            for call in message.get("tool_calls") or []:
                name = (call.get("function") or {}).get("name")
                if isinstance(name, str):
                    names[name] = None
    return list(names)


class ToolSelector:
    """Selects up to `top_k` tools by retrieval, plus pinned and already-used ones, from one ToolIndex."""

    def __init__(self, index: ToolIndex, *, top_k: int = 5, pinned: Sequence[str] = (),
                 keep_used: bool = True, turns: int = 3) -> None:
        if top_k < 0:
            raise ConfigurationError(f"top_k must be 0 or more, got {top_k}")
        self.index = index
        self.top_k = top_k
        self.pinned = tuple(pinned)
        self.keep_used = keep_used
        self.turns = turns

    def select(self, messages: Sequence[dict[str, Any]], *, top_k: int | None = None,
               extra: Sequence[str] = ()) -> Selection:
        """The tools for a call with these messages; `extra` names are sent too (a recovery's additions)."""
        k = self.top_k if top_k is None else top_k
        pinned = tuple(n for n in self.pinned if n in self.index)
        used = tuple(n for n in used_tool_names(messages) if n in self.index) if self.keep_used else ()
        forced = list(dict.fromkeys([*pinned, *used, *(n for n in extra if n in self.index)]))
        query = conversation_query(messages, turns=self.turns)
        retrieved = self.rank(query, k, exclude=forced)
        chosen = set(forced) | set(retrieved)
        ordered = sorted(chosen, key=self.index.position)
        return Selection(tuple(self.index.tool(n) for n in ordered), tuple(retrieved), pinned, used, tuple(query))

    def rank(self, query: Sequence[QueryPart], k: int, *, exclude: Sequence[str] = ()) -> list[str]:
        """Greedy top-k over the query parts: each pick is the tool with the best weighted score for any
        part; the part it answered then counts less (FusionConfig.coverage_decay), so every task of a
        multi-task request gets its best tool before any task gets its second."""
        if k == 0 or not query:
            return []
        candidates, scores = self.index.score([p.text for p in query])
        if candidates.size == 0:
            return []
        weights = np.array([p.weight for p in query], dtype=np.float32)
        available = np.ones(candidates.size, dtype=bool)
        best_per_part = scores.max(axis=1)
        decay = self.index.fusion.coverage_decay
        excluded = {self.index.position(n) for n in exclude if n in self.index}
        for j, position in enumerate(candidates):
            if int(position) in excluded:
                available[j] = False
                # A tool that is sent anyway already answers the parts it is best for.
                weights[scores[:, j] >= best_per_part] *= decay
        picks: list[str] = []
        while len(picks) < k and available.any():
            combined = (scores * weights[:, None]).max(axis=0)
            combined[~available] = -np.inf
            j = int(np.argmax(combined))
            available[j] = False
            picks.append(self.index.name_at(int(candidates[j])))
            weights[scores[:, j] >= best_per_part] *= decay
        return picks


def _clip(text: str) -> str:
    return text[-MAX_CHARS:] if len(text) > MAX_CHARS else text
