"""The abstractive half of a summary: any ctxkit Backend folds the previous summary and the newly overflowed
turns into a new summary (rolling: it never re-reads turns it has already folded).

The prompt asks for what a later turn most often needs: names, numbers, dates, decisions, preferences and
open tasks. Prompts are rendered by the sandboxed template engine; the turns enter only as variables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ...backends.base import Backend
from ...request import ChatRequest
from ...response import message_text
from ..templates import sandboxed_environment

SYSTEM = (
    "You write the running summary of a conversation for an assistant that will not see the old turns. "
    "Keep every name, number, date, decision, preference and open task. Be brief. Write plain sentences."
)
USER = (
    "{% if previous %}Summary so far:\n{{ previous }}\n\n{% endif %}"
    "New turns:\n{% for turn in turns %}{{ turn.role }}: {{ turn.text }}\n{% endfor %}\n"
    "Write the updated summary."
)


class ModelSummarizer:
    """Rolls a summary forward with a backend (default in the stage: the embedded local model)."""

    def __init__(self, backend: Backend, *, max_tokens: int = 96, temperature: float = 0.0) -> None:
        self.backend = backend
        self.max_tokens = max_tokens
        self.temperature = temperature
        self._user = sandboxed_environment().from_string(USER)

    def _request(self, previous: str, turns: Sequence[Mapping[str, str]]) -> ChatRequest:
        return ChatRequest(
            messages=[{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": self._user.render(previous=previous, turns=list(turns))}],
            params={"max_tokens": self.max_tokens, "temperature": self.temperature, "seed": 0},
        )

    def fold(self, previous: str, messages: Sequence[Mapping[str, Any]]) -> str:
        """The new summary: `previous` plus `messages` (already cleared of quarantined content)."""
        turns = [{"role": str(m.get("role")), "text": message_text(dict(m)).strip()} for m in messages]
        turns = [t for t in turns if t["text"]]
        if not turns:
            return previous
        # Fold in chunks that fit the summarizer's own window: a long history must not overflow it.
        limit = self.backend.context_window - self.max_tokens - 64
        summary = previous
        chunk: list[dict[str, str]] = []
        for turn in turns:
            candidate = chunk + [turn]
            if chunk and self.backend.counter.count_prompt(self._request(summary, candidate).messages) > limit:
                summary = self._call(summary, chunk)
                chunk = [turn]
            else:
                chunk = candidate
        while chunk and self.backend.counter.count_prompt(self._request(summary, chunk).messages) > limit:
            # One turn alone too long for the window: keep its start (the extractive keeper has the rest).
            chunk[-1] = {**chunk[-1], "text": chunk[-1]["text"][: len(chunk[-1]["text"]) // 2]}
        return self._call(summary, chunk) if chunk else summary

    def _call(self, previous: str, turns: Sequence[Mapping[str, str]]) -> str:
        response = self.backend.complete(self._request(previous, turns))
        return (response.content or "").strip() or previous

    async def afold(self, previous: str, messages: Sequence[Mapping[str, Any]]) -> str:
        import asyncio

        return await asyncio.to_thread(self.fold, previous, messages)
