"""ctxkit: context-engineering middleware between an application and any LLM backend.

    from ctxkit import Pipeline, Ledger, LlamaCppBackend

    pipeline = Pipeline(LlamaCppBackend(), stages=[...], ledger=Ledger("calls.jsonl"))
    client = pipeline.openai()  # a drop-in for openai.OpenAI()
"""

from .backends import Backend, GGUFPrompt, LlamaCppBackend, OpenAIBackend, default_model_path
from .errors import (
    BackendConnectionError,
    BackendContextOverflowError,
    BackendError,
    BackendStatusError,
    BackendTimeoutError,
    CacheStoreUnavailable,
    ConfigurationError,
    ContextOverflowError,
    CtxkitError,
    InvalidMessageError,
    InvalidToolError,
    LedgerError,
    MalformedLedgerLine,
    QuarantineStoreUnavailable,
    RequestError,
    ResponseFormatError,
    ToolCallSchemaError,
    UnknownToolError,
)
from .ledger import Ledger, LedgerRecord, Price, PriceTable, read_ledger
from .pipeline import Pipeline, record_event
from .request import ChatRequest
from .response import AsyncChatStream, ChatResponse, ChatStream, Usage
from .stage import Stage
from .tokens import TokenCounter
from .tokens.tiktoken_counter import TiktokenCounter

__version__ = "0.1.0"

__all__ = [
    "AsyncChatStream", "Backend", "BackendConnectionError", "BackendError", "BackendStatusError",
    "BackendTimeoutError", "CacheStoreUnavailable", "ChatRequest", "ChatResponse", "ChatStream", "ConfigurationError",
    "BackendContextOverflowError", "ContextOverflowError", "CtxkitError", "GGUFPrompt", "InvalidMessageError", "InvalidToolError", "Ledger",
    "LedgerError", "LedgerRecord", "MalformedLedgerLine", "QuarantineStoreUnavailable", "LlamaCppBackend", "OpenAIBackend", "Pipeline", "Price", "PriceTable",
    "RequestError", "ResponseFormatError", "Stage", "TiktokenCounter", "TokenCounter", "ToolCallSchemaError", "UnknownToolError", "Usage", "default_model_path", "read_ledger",
    "record_event",
]
