"""The backend protocol: the one layer that does I/O (httpx's transport, for LLM calls).

A backend takes a ChatRequest that has passed every stage and validation, and returns either a whole
ChatResponse (`complete`) or an iterator of OpenAI `chat.completion.chunk` dicts (`stream`), with async
twins of the same shape. Contract:

- Raise a BackendError subclass (with the HTTP status where there is one) for every failure; never
  return an error as an answer.
- Report usage as the backend measured it; in a stream, a final chunk with `usage` and empty `choices`
  when the backend can report it (otherwise the pipeline counts the completion itself).
- `counter` counts prompts exactly as this backend will bill them; `context_window` is the model's limit.
- A backend is safe to call from several threads; a stream is consumed by one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol, runtime_checkable

from ..request import ChatRequest
from ..response import ChatResponse
from ..tokens import TokenCounter


@runtime_checkable
class Backend(Protocol):
    """What a pipeline calls: `complete`/`stream` and their async twins `acomplete`/`astream`, a `counter`
    that counts prompts as this backend bills them, and its `context_window` (see this module's contract)."""

    name: str  # "llama.cpp", "openai", ...
    model: str  # the model it serves by default
    counter: TokenCounter
    context_window: int

    def complete(self, request: ChatRequest) -> ChatResponse: ...

    def stream(self, request: ChatRequest) -> Iterator[dict[str, Any]]: ...

    async def acomplete(self, request: ChatRequest) -> ChatResponse: ...

    def astream(self, request: ChatRequest) -> AsyncIterator[dict[str, Any]]: ...

    def close(self) -> None: ...
