"""Token counting: exact for the backend in use (tiktoken for OpenAI models, the GGUF's own tokenizer
and chat template for llama.cpp)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class TokenCounter(Protocol):
    """Counts tokens the way one backend will bill them."""

    def count_text(self, text: str) -> int:
        """Tokens in a bare string."""
        ...

    def count_prompt(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()) -> int:
        """Prompt tokens of a whole request: messages, chat-template overhead and tool schemas."""
        ...

    def count_completion(self, message: dict[str, Any]) -> int:
        """Tokens of a generated assistant message (content and tool calls)."""
        ...


__all__ = ["TokenCounter"]
