"""CtxkitCallbackHandler: ledger records for LangChain runs that do not go through ctxkit.

    handler = CtxkitCallbackHandler(Ledger("baseline.jsonl"), counter=TiktokenCounter("gpt-4o-mini"))
    chain.invoke(inputs, config={"callbacks": [handler]})

Each chat-model call becomes one ledger record in the same format the pipeline writes, with nothing
saved (tokens_naive == tokens_sent): run the same workload once with this handler and once through
ctxkit, and `ctxkit report` compares the two files. With a `counter`, prompts are counted exactly as the
pipeline counts them, so the comparison is like for like; the model's reported usage is recorded
beside it (tokens_reported, count_delta). Without a counter the reported usage is used.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import LLMResult

from ctxkit.ledger import Ledger, LedgerRecord, PriceTable
from ctxkit.redaction import redact
from ctxkit.tokens import TokenCounter

from .messages import ai_message_to_openai, countable, to_openai_messages

logger = logging.getLogger("ctxkit")


@dataclasses.dataclass
class _Run:
    started: float
    ts: float
    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    counted: int | None
    count_ms: float
    stream: bool
    conversation_id: str | None


class CtxkitCallbackHandler(BaseCallbackHandler):
    """Writes one ledger record per chat-model call of a plain LangChain run."""

    run_inline = True  # bookkeeping only: no need for a thread in async runs

    def __init__(
        self,
        ledger: Ledger,
        *,
        counter: TokenCounter | None = None,
        prices: PriceTable | None = None,
        namespace: str = "default",
        backend: str = "langchain",
    ) -> None:
        self.ledger = ledger
        self.counter = counter
        self.prices = prices if prices is not None else PriceTable()
        self.namespace = namespace
        self.backend = backend
        self._runs: dict[UUID, _Run] = {}
        self._lock = threading.Lock()  # one handler may watch parallel runs (batch, async)

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        invocation = kwargs.get("invocation_params") or {}
        metadata = metadata or {}
        model = (invocation.get("model_name") or invocation.get("model") or metadata.get("ls_model_name")
                 or (serialized or {}).get("name") or "unknown")
        openai_messages = to_openai_messages(messages[0]) if messages else []
        tools = _tool_schemas(invocation.get("tools") or [])
        counted, count_ms = None, 0.0
        if self.counter is not None:
            t0 = time.perf_counter()
            counted = self.counter.count_prompt(openai_messages, tools)
            count_ms = (time.perf_counter() - t0) * 1000
        thread = metadata.get("thread_id")
        with self._lock:
            self._runs[run_id] = _Run(
                started=time.perf_counter(), ts=time.time(), model=str(model), messages=openai_messages,
                tools=tools, counted=counted, count_ms=count_ms, stream=bool(invocation.get("stream")),
                conversation_id=str(thread) if thread is not None else None,
            )

    def on_llm_new_token(self, token: Any, *, run_id: UUID, **kwargs: Any) -> None:
        # `.stream()` sets no "stream" invocation parameter; a token arriving is how a stream shows.
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                run.stream = True

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        with self._lock:
            run = self._runs.pop(run_id, None)
        if run is None:
            return  # a completion model (on_llm_start), not a chat model: nothing to compare
        message = _first_message(response)
        reported_in, reported_out, cached = _reported_usage(message, response)
        out = reported_out
        if out is None:
            out = self.counter.count_completion(countable(ai_message_to_openai(message))) if self.counter and message else 0
        prompt = run.counted if run.counted is not None else (reported_in or 0)
        if run.counted is None and reported_in is None:
            logger.warning("ctxkit: %s reported no usage and no counter was given; recorded 0 prompt tokens",
                           run.model)
        self.ledger.write(self._record(run, prompt=prompt, out=out, cached=cached, reported=reported_in))

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        with self._lock:
            run = self._runs.pop(run_id, None)
        if run is None:
            return
        record = self._record(run, prompt=run.counted or 0, out=0, cached=0, reported=None)
        record.tokens_sent = 0  # nothing was answered: like the pipeline, count nothing as sent
        record.cost_usd = 0.0
        # redacted as the pipeline redacts it: an HTTP error quotes its URL, and a key in its query string
        record.status, record.error_type, record.error = "error", type(error).__name__, redact(str(error))[:500]
        self.ledger.write(record)

    def _record(self, run: _Run, *, prompt: int, out: int, cached: int, reported: int | None) -> LedgerRecord:
        total_ms = (time.perf_counter() - run.started) * 1000
        price = self.prices.price(run.model)
        cost = price.cost(prompt, min(cached, prompt), out)
        return LedgerRecord(
            id=f"call-{uuid.uuid4().hex[:16]}", ts=run.ts, backend=self.backend, model=run.model,
            namespace=self.namespace, conversation_id=run.conversation_id, stream=run.stream,
            tokens_naive=prompt, tokens_sent=prompt, tokens_out=out, saved_by_stage={},
            tokens_cached=cached, tokens_reported=reported,
            count_delta=reported - run.counted if reported is not None and run.counted is not None else None,
            usage_reported=reported is not None,
            latency_ms={"stages": {}, "backend": round(total_ms, 3), "counting": round(run.count_ms, 3),
                        "total": round(total_ms, 3), "backend_calls": 1},
            cost_usd=cost, cost_naive_usd=cost,
        )


def _tool_schemas(tools: Sequence[Any]) -> list[dict[str, Any]]:
    from langchain_core.utils.function_calling import convert_to_openai_tool

    out = []
    for tool in tools:
        try:
            out.append(convert_to_openai_tool(tool))
        except (ValueError, TypeError):  # a provider's built-in tool has no schema to count
            continue
    return out


def _first_message(response: LLMResult) -> AIMessage | None:
    for generations in response.generations:
        for generation in generations:
            message = getattr(generation, "message", None)
            if isinstance(message, AIMessage):
                return message
    return None


def _reported_usage(message: AIMessage | None, response: LLMResult) -> tuple[int | None, int | None, int]:
    """(prompt, completion, cached) tokens as the model reported them: on the message, or in llm_output."""
    if message is not None and message.usage_metadata:
        usage = message.usage_metadata
        details = usage.get("input_token_details") or {}
        return usage["input_tokens"], usage["output_tokens"], details.get("cache_read") or 0
    token_usage = (response.llm_output or {}).get("token_usage") or {}
    if "prompt_tokens" in token_usage:
        prompt_details: dict[str, Any] = token_usage.get("prompt_tokens_details") or {}
        return (token_usage["prompt_tokens"], token_usage.get("completion_tokens"),
                int(prompt_details.get("cached_tokens") or 0))
    return None, None, 0
