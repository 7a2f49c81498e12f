"""ctxkit for LangChain: a chat model, an agent middleware and a callback handler.

- `CtxkitChatModel`: a chat model that runs every call through a ctxkit pipeline (over a ctxkit backend,
  or over any LangChain chat model via `CtxkitChatModel.wrap(model)` / `LangChainBackend`).
- `CtxkitMiddleware`: LangChain v1 agent middleware applying ctxkit's stages inside `create_agent` loops
  (needs the `langchain` package; imported lazily so langchain-core alone suffices for the rest).
- `CtxkitCallbackHandler`: ledger records for plain LangChain runs, to compare with and without ctxkit.
"""

from __future__ import annotations

from typing import Any

from .backend import LangChainBackend
from .callbacks import CtxkitCallbackHandler
from .chat_model import CtxkitChatModel
from .messages import from_openai_messages, to_ai_message, to_openai_messages, to_openai_tools

__all__ = [
    "CtxkitCallbackHandler", "CtxkitChatModel", "CtxkitMiddleware", "LangChainBackend",
    "from_openai_messages", "to_ai_message", "to_openai_messages", "to_openai_tools",
]


def __getattr__(name: str) -> Any:
    if name == "CtxkitMiddleware":  # needs `langchain` (v1), not only langchain-core
        from .middleware import CtxkitMiddleware

        return CtxkitMiddleware
    raise AttributeError(name)
