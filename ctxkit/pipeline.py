"""Pipeline: request -> stages -> backend, with the ledger beside.

    pipeline = Pipeline(LlamaCppBackend(), stages=[...], ledger=Ledger("calls.jsonl"))
    response = pipeline.call(ChatRequest(messages=[{"role": "user", "content": "Hi"}]))

The stage list is the whole story of a call: the first stage sees the request as the app made it, each
passes its (possibly edited) request to the next through `call_next`, the last hands it to the backend.
The pipeline itself counts tokens at every hand-over with the backend's own counter, so each stage's
saving in the ledger is measured, not declared.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ._aio import tracked_to_thread
from .backends.base import Backend
from .errors import (
    BackendConnectionError,
    BackendStatusError,
    ConfigurationError,
    ContextOverflowError,
    RequestError,
)
from .ledger import Ledger, LedgerRecord, PriceTable
from .lru import LRUMemo
from .quarantine_marks import checking_answers, fingerprint
from .redaction import redact
from .request import ChatRequest
from .response import AsyncChatStream, ChatResponse, ChatStream, Usage, message_text, response_as_chunks
from .stage import AsyncResult, Result, Stage, run_wrap_call, writes_awrap_call_only
from .validation import check_tool_choice_offered, replace_malformed_arguments, validate_request

S = TypeVar("S", ChatStream, AsyncChatStream)
_current_call: contextvars.ContextVar[_CallTrace | None] = contextvars.ContextVar("ctxkit_call", default=None)
# For the stage running now: `request` as the stages after it would make it naive (a catalog registered with a
# later ToolRetrievalStage supplied). A cache keys on this: the tools the answer was chosen among are part of it.
_naive_after: contextvars.ContextVar[Callable[[ChatRequest], ChatRequest] | None] = contextvars.ContextVar(
    "ctxkit_naive_after", default=None)


def naive_after(request: ChatRequest) -> ChatRequest:
    """`request` with what the stages after the current one supply (a registered tool catalog): unchanged
    outside a pipeline."""
    later = _naive_after.get()
    return later(request) if later is not None else request


def record_event(stage: str, kind: str, **data: Any) -> None:
    """Let a stage note something in the current call's ledger record (a recovery, a quarantine)."""
    event_recorder()(stage, kind, **data)


@dataclasses.dataclass(frozen=True)
class SentPrompt:
    """The prompt a call's backend got, as the last stage passed it on: what a prefix cache holds of it."""

    tokens: int  # counted with the backend's counter, as the ledger's tokens_sent
    tools: tuple[dict[str, Any], ...]  # one copy per distinct tool set, shared by the prompts that sent it
    prints: tuple[str, ...]  # each message's fingerprint: where the stages' view of it still holds
    naive: int = 0  # the call's tokens_naive: what a prefix cache would hold of the prompt the app made
    # (index, tokens) of each message the stages made (not one of the app's: a rendered documents message, a
    # cleared or cut result): a stage's prefix claim counts a message inserted before its edit as kept.
    added: tuple[tuple[int, int], ...] = ()


REMEMBERED_PROMPTS = 1024  # per pipeline: the last calls whose prompt it remembers (as tool retrieval does)
# An app (or the proxy) that sends its whole catalog on every call decodes new dicts each time: kept per
# prompt, 1,024 copies of a large catalog held gigabytes. The remembered prompts share one copy per tool set.
REMEMBERED_TOOL_SETS = 64


def previous_prompt_sent() -> SentPrompt | None:
    """What this pipeline's backend got for the previous call of the current request's conversation: the call
    whose messages, as the app sent them, were this request's before its newest assistant message. None outside
    a pipeline, on a conversation's first call, or when another process (a replica, before a restart) sent it.

    Stages see the history as the app sends it, or as the stages before them changed it; the previous prompt
    a prefix cache holds is what the stages after them made of it (results cleared, documents rendered)."""
    trace = _current_call.get()
    if trace is None or trace.previous_key is None:
        return None
    return trace.pipeline._sent_prompts.get([trace.previous_key]).get(trace.previous_key)


def _prompt_keys(request: ChatRequest) -> tuple[str, str | None]:
    """Names for the request's messages as the app sent them, and for those before its newest assistant message
    (the previous call's, in a chat or agent loop): hashed once, before a stage edits the messages in place."""
    messages = request.messages
    end = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "assistant"), 0)
    digest, previous = hashlib.sha256(request.namespace.encode()), None
    for i, message in enumerate(messages):
        if i == end and end:
            previous = digest.hexdigest()
        digest.update(fingerprint(message).encode())
    return digest.hexdigest(), previous


EventRecorder = Callable[..., None]  # record_event's signature: (stage, kind, **data)


def event_recorder() -> EventRecorder:
    """`record_event` bound to the current call, for a note taken after the call has returned (when a stream
    it returned ends): by then the call is no longer current, but its record is not written yet."""
    trace = _current_call.get()

    def record(stage: str, kind: str, **data: Any) -> None:
        if trace is not None:
            trace.events.append({"stage": stage, "kind": kind, **data})

    return record


@dataclasses.dataclass
class _StageTally:
    saved: int = 0
    self_ms: float = 0.0


class _CallTrace:
    """Bookkeeping for one call: token counts at each hand-over and time spent where."""

    def __init__(self, pipeline: Pipeline, request: ChatRequest) -> None:
        self.pipeline = pipeline
        self.id = f"call-{uuid.uuid4().hex[:16]}"
        self.started = time.perf_counter()
        self.ts = time.time()
        self.request = request
        self.tallies = {stage.name: _StageTally() for stage in pipeline.stages}
        self.sent = 0
        self.last_sent = 0  # the prompt of the backend call whose usage the response reports
        self.backend_calls = 0
        self.answers: list[Usage] = []  # usage of each whole answer the backend gave (all were paid for)
        self.streamed = False  # the last backend call was a stream: its usage is the final response's
        self.unsent = False  # the last backend call was refused or never received (see _UNSENT): not paid
        self.backend_ms = 0.0
        self.count_ms = 0.0
        self.answered_by: str | None = None
        self.events: list[dict[str, Any]] = []
        self._counts: dict[tuple[int, int, str | None, str], tuple[int, Any, Any, tuple[Any, ...]]] = {}
        self.naive = self.count(pipeline._naive_from(0, request))
        self.prompt_key, self.previous_key = _prompt_keys(request)  # see previous_prompt_sent

    def count(self, request: ChatRequest) -> int:
        # Memoized on the message and tool lists' identity: a stage that passes them on untouched costs nothing.
        # A stage that edited the same lists in place (appended a message, replaced a content) changed their
        # shape: counted again, or the ledger would show what an earlier stage saw, not what was sent.
        # The forced tool is part of the key: a llama.cpp server is shown that tool's parameters rewritten.
        key = (id(request.messages), id(request.tools), request.model, repr(request.params.get("tool_choice")))
        shape = _shape(request)
        hit = self._counts.get(key)
        if hit is not None and hit[1] is request.messages and hit[2] is request.tools and _same(hit[3], shape):
            return hit[0]
        t0 = time.perf_counter()
        tokens = _counter(self.pipeline.backend, request).count_prompt(request.messages,
                                                                       _tools_shown(self.pipeline.backend, request))
        self.count_ms += (time.perf_counter() - t0) * 1000
        self._counts[key] = (tokens, request.messages, request.tools, shape)
        return tokens

    def record(self, response: ChatResponse | None, error: BaseException | None = None) -> LedgerRecord:
        backend = self.pipeline.backend
        saved = {name: tally.saved for name, tally in self.tallies.items()}
        model = (response.model if response else None) or _answering_model(backend, self.request)
        answered = response is not None and self.answered_by is not None
        # Every backend call of this call was paid for, not only the one whose answer the caller got: a
        # stage that called again (a tool recovery), or failed after the backend had answered.
        paid = list(self.answers)
        if self.streamed and response is not None and not self.unsent:
            paid.append(response.usage)
        last = paid[-1] if paid else None
        final_out = response.usage.completion_tokens if response else 0
        out = sum(u.completion_tokens for u in paid)
        cached = sum(u.cached_tokens for u in paid)
        price = self.pipeline.prices.price(model)
        # The backend's own count only: a usage it did not report is ctxkit's count, and checks nothing.
        reported = last.prompt_tokens if last is not None and last.reported else None
        sent = self.sent - self.last_sent if self.unsent else self.sent
        total_ms = (time.perf_counter() - self.started) * 1000
        summarizer_usd = self._price_summarizer_calls(price)
        stage_ms = {name: round(t.self_ms, 3) for name, t in self.tallies.items()}
        return LedgerRecord(
            id=self.id, ts=self.ts, backend=backend.name, model=model, namespace=self.request.namespace,
            conversation_id=self.request.conversation_id, stream=self.request.stream,
            tokens_naive=self.naive, tokens_sent=sent,
            tokens_out=out, out_saved=final_out if answered else 0,
            saved_by_stage=saved, tokens_cached=cached,
            tokens_reported=reported, count_delta=None if reported is None else reported - self.last_sent,
            # A stage's answer (a cache hit) reached no backend: nothing reported usage for this call.
            usage_reported=bool(last is not None and last.reported),
            answered_by=self.answered_by,
            latency_ms={"stages": stage_ms, "backend": round(self.backend_ms, 3),
                        "counting": round(self.count_ms, 3), "total": round(total_ms, 3),
                        "backend_calls": self.backend_calls},
            cost_usd=price.cost(sent, min(cached, sent), out) + summarizer_usd,
            cost_naive_usd=price.cost(self.naive, 0 if answered else self._naive_cached(last), final_out),
            status="ok" if error is None else "error",
            error_type=type(error).__name__ if error else None,
            error=_error_text(error) if error else None,
            events=self.events,
        )

    def _naive_cached(self, last: Usage | None) -> int:
        """Prompt tokens the backend's prefix cache would have served the call without ctxkit. A backend that
        served this call from its cache would have served the previous call's prompt, as the app made it, to
        the app's prompt of this call (which begins with it): pricing the whole history that ctxkit's edits
        kept out of the cache as uncached input overstated the cost without ctxkit (by 46% in a 4-turn chat)."""
        cached = last.cached_tokens if last is not None else 0
        if cached and self.previous_key is not None:
            previous = self.pipeline._sent_prompts.get([self.previous_key]).get(self.previous_key)
            if previous is not None and previous.naive:
                cached = max(cached, previous.naive)
        return min(cached, self.naive)

    def _price_summarizer_calls(self, call_price: Any) -> float:
        """What the summarizing model's own calls cost (each event gets its cost_usd): they were made for
        this call, so they are part of its cost, though not of the tokens it sent; and retried attempts that
        timed out (`backend_retry` events with may_be_billed), at the call's own price."""
        total = 0.0
        for event in self.events:
            if event.get("kind") == "backend_retry" and event.get("may_be_billed"):
                # An attempt that timed out and was retried: its prompt was received, maybe processed and billed.
                # At the price of the model that was asked (a summarizing model retries inside this call too).
                price = self.pipeline.prices.price(event["model"]) if isinstance(event.get("model"), str) else call_price
                event["cost_usd"] = price.cost(int(event.get("prompt_tokens") or 0), 0, 0)
                total += event["cost_usd"]
            if event.get("kind") != "summarizer_call":
                continue
            price = self.pipeline.prices.price(str(event.get("model") or ""))
            event["cost_usd"] = price.cost(int(event.get("prompt_tokens") or 0), int(event.get("cached_tokens") or 0),
                                           int(event.get("completion_tokens") or 0))
            total += event["cost_usd"]
        return total


def check_stages_and_ledger(stages: Sequence[Stage], ledger: Ledger | None, prices: PriceTable | None) -> None:
    """What a Pipeline is built with, and LangChain's CtxkitMiddleware (which builds one per call from them)."""
    if stages is None or isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence):
        raise ConfigurationError(f"stages must be a list of Stage instances, got {type(stages).__name__}")
    for i, stage in enumerate(stages):
        if not isinstance(stage, Stage):
            what = f"the class {stage.__name__} (instantiate it)" if isinstance(stage, type) else type(stage).__name__
            raise ConfigurationError(f"stages[{i}] must be a Stage instance, got {what}")
    names = [stage.name for stage in stages]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigurationError(f"stage names must be unique in a pipeline: {duplicates}")
    if ledger is not None and not callable(getattr(ledger, "write", None)):
        hint = f": pass Ledger({ledger!r})" if isinstance(ledger, (str, os.PathLike)) else ""
        raise ConfigurationError(f"ledger must be a Ledger, got {type(ledger).__name__}{hint}")
    if prices is not None and not callable(getattr(prices, "price", None)):
        hint = f": pass PriceTable.from_file({prices!r})" if isinstance(prices, (str, os.PathLike)) else ""
        raise ConfigurationError(f"prices must be a PriceTable, got {type(prices).__name__}{hint}")


class Pipeline:
    """An ordered list of stages in front of one backend, and the ledger every call is written to."""

    def __init__(
        self,
        backend: Backend,
        stages: Sequence[Stage] = (),
        *,
        ledger: Ledger | None = None,
        prices: PriceTable | None = None,
    ) -> None:
        if not all(hasattr(backend, attr) for attr in ("complete", "counter", "context_window")):
            raise ConfigurationError(
                f"backend must be a Backend (LlamaCppBackend, OpenAIBackend, ...), got {type(backend).__name__}")
        check_stages_and_ledger(stages, ledger, prices)
        self.backend = backend
        self.stages = list(stages)
        self.ledger = ledger if ledger is not None else Ledger()
        self.prices = prices if prices is not None else PriceTable()
        self._sent_prompts: LRUMemo[str, SentPrompt] = LRUMemo(REMEMBERED_PROMPTS)  # see previous_prompt_sent
        self._tool_sets: LRUMemo[str, tuple[dict[str, Any], ...]] = LRUMemo(REMEMBERED_TOOL_SETS)
        self._last_tools: tuple[Any, str] = ((), "")  # the last tool list hashed, and its hash: an agent loop resends one list

    # -- the public calls ---------------------------------------------------------------------------
    def call(self, request: ChatRequest) -> Result:
        """Run one call. Returns a ChatResponse, or a ChatStream when `request.stream` is set."""
        trace = self._start(request)
        token = _current_call.set(trace)
        try:
            with checking_answers(None):  # a call inside another call's stage must not take its answer check
                result = self._dispatch(trace, 0, trace.request)
        except BaseException as exc:
            self.ledger.write(trace.record(None, exc))
            raise
        finally:
            _current_call.reset(token)
        return self._settle(trace, result)

    async def acall(self, request: ChatRequest) -> AsyncResult:
        """The async twin of `call`. Validation and token counting run in a worker thread: counting a large
        prompt takes seconds, and on the event loop it would stall every other call it serves (a proxy's tenants)."""
        trace = await tracked_to_thread(self._start, request)
        token = _current_call.set(trace)
        try:
            with checking_answers(None):
                result = await self._adispatch(trace, 0, trace.request, trace.naive)
        except BaseException as exc:
            self.ledger.write(trace.record(None, exc))
            raise
        finally:
            _current_call.reset(token)
        return self._settle(trace, result)

    def chat(self, messages: list[dict[str, Any]], **fields: Any) -> Result:
        """Shorthand: `pipeline.chat(messages, tools=..., params={"max_tokens": 64})`."""
        return self.call(ChatRequest(messages=messages, **fields))

    def openai(self) -> Any:
        """A drop-in for `openai.OpenAI()`: `.chat.completions.create(...)` through this pipeline."""
        from .client import OpenAIClient

        return OpenAIClient(self)

    def async_openai(self) -> Any:
        """A drop-in for `openai.AsyncOpenAI()`."""
        from .client import AsyncOpenAIClient

        return AsyncOpenAIClient(self)

    def _start(self, request: ChatRequest) -> _CallTrace:
        """The trace of a call whose request is validated, with broken past tool-call arguments made
        sendable (noted in the ledger, since the model no longer sees what it wrote)."""
        validate_request(request)
        request, replaced = replace_malformed_arguments(request)
        # The stages get their own list and message dicts: a stage that edits them in place (append, insert,
        # message["content"] = ...) must not change the app's history, which it resends on the next call.
        request = request.override(messages=[_own_message(m) for m in request.messages],
                                   tools=[_own_tool(t) for t in request.tools])
        trace = _CallTrace(self, request)
        if replaced:
            trace.events.append({"stage": "pipeline", "kind": "tool_arguments_replaced", "fields": replaced})
        return trace

    # -- the chain ----------------------------------------------------------------------------------
    def _naive_from(self, index: int, request: ChatRequest) -> ChatRequest:
        """`request` as the app would have sent it to stage `index`: every later stage's `naive_request` applied."""
        for stage in self.stages[index:]:
            request = stage.naive_request(request)
        return request

    def _dispatch(self, trace: _CallTrace, index: int, request: ChatRequest) -> Result:
        if index == len(self.stages):
            return self._send(trace, request)
        stage = self.stages[index]
        if writes_awrap_call_only(stage):
            raise ConfigurationError(
                f"stage {stage.name!r} writes only awrap_call, which a sync call (call(), openai()) cannot run; "
                "write wrap_call too, or call the pipeline with acall() or async_openai()")
        tally = trace.tallies[stage.name]
        # tokens(in) as the app would have sent it: with what this stage *and every later one* supplies
        # (a catalog registered with a later ToolRetrievalStage), so the stages' savings add up to
        # tokens_naive - tokens_sent even when this stage answers by itself (a cache hit).
        tally.saved += trace.count(self._naive_from(index, request))
        called_next = False
        inner_ms = 0.0

        def call_next(next_request: ChatRequest) -> Result:
            nonlocal called_next, inner_ms
            _check_passed_on(stage, next_request)
            called_next = True
            tally.saved -= trace.count(self._naive_from(index + 1, next_request))
            t0 = time.perf_counter()
            try:
                return self._dispatch(trace, index + 1, next_request)
            finally:
                inner_ms += (time.perf_counter() - t0) * 1000

        t0 = time.perf_counter()
        token = _naive_after.set(lambda r: self._naive_from(index + 1, r))
        try:
            result = stage.wrap_call(request, call_next)
        finally:
            _naive_after.reset(token)
            tally.self_ms += (time.perf_counter() - t0) * 1000 - inner_ms
        if not called_next:
            trace.answered_by = stage.name
        return _stage_result(stage, request, result, ChatStream)

    async def _adispatch(self, trace: _CallTrace, index: int, request: ChatRequest, tokens_in: int) -> AsyncResult:
        """`tokens_in`: `request` counted as the app would have sent it to this stage (see _dispatch), by the
        hand-over that brought it here. Added before any await: a call cancelled while this stage's tokens(in)
        was counted in a thread lost it, and its savings no longer added up."""
        if index == len(self.stages):
            return await self._asend(trace, request)
        stage = self.stages[index]
        tally = trace.tallies[stage.name]
        # tokens(in) as the app would have sent it: with what this stage *and every later one* supplies
        # (a catalog registered with a later ToolRetrievalStage), so the stages' savings add up to
        # tokens_naive - tokens_sent even when this stage answers by itself (a cache hit).
        tally.saved += tokens_in
        called_next = False
        inner_ms = 0.0

        async def call_next(next_request: ChatRequest) -> AsyncResult:
            nonlocal called_next, inner_ms
            _check_passed_on(stage, next_request)
            called_next = True
            # what the next stage gets, counted once: this stage's tokens(out) and the next one's tokens(in)
            tokens_out = await tracked_to_thread(lambda: trace.count(self._naive_from(index + 1, next_request)))
            tally.saved -= tokens_out
            t0 = time.perf_counter()
            try:
                return await self._adispatch(trace, index + 1, next_request, tokens_out)
            finally:
                inner_ms += (time.perf_counter() - t0) * 1000

        t0 = time.perf_counter()
        token = _naive_after.set(lambda r: self._naive_from(index + 1, r))
        try:
            result = await run_wrap_call(stage, request, call_next)
        finally:
            _naive_after.reset(token)
            tally.self_ms += (time.perf_counter() - t0) * 1000 - inner_ms
        if not called_next:
            trace.answered_by = stage.name
        return _stage_result(stage, request, result, AsyncChatStream)

    def _prepare(self, trace: _CallTrace, request: ChatRequest) -> int:
        tokens, sent = self._check_and_count(trace, request)
        self._commit_sent(trace, tokens, sent)
        return tokens

    def _check_and_count(self, trace: _CallTrace, request: ChatRequest) -> tuple[int, SentPrompt]:
        """The prompt checked and counted, and what it will leave for the conversation's next call: the slow
        part, which an async call runs in a worker thread. It changes nothing of the call's own accounting."""
        if request is not trace.request:
            validate_request(request)  # a stage must not hand the backend something malformed
        check_tool_choice_offered(request)  # a call forced to a tool not sent cannot be answered
        tokens = trace.count(request)
        needed = tokens + max(request.max_tokens or 0, 1)  # room for at least one answer token
        window = _context_window(self.backend, request)
        if needed > window:
            raise ContextOverflowError(tokens, request.max_tokens or 0, window)
        # What the next call of this conversation finds before its newest assistant message (the last backend
        # call of this one, a stage's re-run included): the stages' prefix accounting counts against it.
        prints = tuple(fingerprint(m) for m in request.messages)
        own = {fingerprint(m) for m in trace.request.messages} if request is not trace.request else set(prints)
        counter = _counter(self.backend, request)
        added = tuple((i, message_tokens(counter, m)) for i, m in enumerate(request.messages) if prints[i] not in own)
        return tokens, SentPrompt(tokens, self._shared_tools(request.tools), prints, trace.naive, added)

    def _commit_sent(self, trace: _CallTrace, tokens: int, sent: SentPrompt) -> None:
        """The prompt goes to the backend now. Apart from the checking and counting: an async call cancelled
        while its thread counted was recorded as sent (and charged) by a thread that went on after the record,
        and left a prompt its backend never got for the conversation's next call to count against."""
        trace.sent += tokens
        trace.last_sent = tokens
        trace.backend_calls += 1
        self._sent_prompts.put({trace.prompt_key: sent})

    def _shared_tools(self, tools: Any) -> tuple[dict[str, Any], ...]:
        """The remembered copy of this tool set (see REMEMBERED_TOOL_SETS), keyed by its content."""
        if not tools:
            return ()
        last, key = self._last_tools
        if tools is not last:  # hashed once per list object, not per call of a loop that resends it
            key = hashlib.sha256(json.dumps(tools, sort_keys=True, default=str).encode()).hexdigest()
            self._last_tools = (tools, key)
        shared = self._tool_sets.get([key]).get(key)
        if shared is None:
            shared = tuple(tools)
            self._tool_sets.put({key: shared})
        return shared

    def _send(self, trace: _CallTrace, request: ChatRequest) -> Result:
        tokens = self._prepare(trace, request)
        trace.unsent = False
        t0 = time.perf_counter()
        if not request.stream:
            try:
                response = self.backend.complete(request)
            except BaseException as exc:
                trace.unsent = _unsent(exc)
                _count_generated(trace, exc, tokens)
                raise
            finally:
                trace.backend_ms += (time.perf_counter() - t0) * 1000
            trace.answers.append(response.usage)
            return response
        trace.streamed = True
        return self._timed_stream(ChatStream(self.backend.stream(request), **self._stream_args(request)),
                                  trace, tokens, t0)

    async def _asend(self, trace: _CallTrace, request: ChatRequest) -> AsyncResult:
        tokens, sent = await tracked_to_thread(self._check_and_count, trace, request)
        self._commit_sent(trace, tokens, sent)
        trace.unsent = False
        t0 = time.perf_counter()
        if not request.stream:
            try:
                response = await self.backend.acomplete(request)
            except BaseException as exc:
                trace.unsent = _unsent(exc)
                _count_generated(trace, exc, tokens)
                raise
            finally:
                trace.backend_ms += (time.perf_counter() - t0) * 1000
            trace.answers.append(response.usage)
            return response
        trace.streamed = True
        return self._timed_stream(AsyncChatStream(self.backend.astream(request), **self._stream_args(request)),
                                  trace, tokens, t0)

    def _stream_args(self, request: ChatRequest) -> dict[str, Any]:
        return {"backend": self.backend.name, "model": _answering_model(self.backend, request),
                "count_completion": _counter(self.backend, request).count_completion}

    @staticmethod
    def _timed_stream(stream: S, trace: _CallTrace, prompt_tokens: int, t0: float) -> S:
        """The backend's time for a stream runs until its last chunk (or its failure)."""
        stream.set_prompt_tokens(prompt_tokens)
        stream.on_complete(lambda _: _add_backend_ms(trace, t0))
        stream.on_error(lambda _: _add_backend_ms(trace, t0))
        return stream

    def _settle(self, trace: _CallTrace, result: Any) -> Any:
        """Write the record now for a whole answer, or when a stream ends (an error record if it fails)."""
        if isinstance(result, ChatResponse):
            result.answered_by = trace.answered_by
            if len(trace.answers) > 1:
                result.call_usage = Usage(sum(u.prompt_tokens for u in trace.answers),
                                          sum(u.completion_tokens for u in trace.answers),
                                          sum(u.cached_tokens for u in trace.answers),
                                          reported=all(u.reported for u in trace.answers))
            self.ledger.write(trace.record(result))
        else:
            result.answered_by = trace.answered_by
            result.on_complete(lambda response: self.ledger.write(trace.record(response)))
            # A failed or abandoned stream is recorded with what it generated: those tokens were paid for.
            result.on_error(lambda exc: self._record_failed_stream(trace, result, exc))
        return result

    def _record_failed_stream(self, trace: _CallTrace, stream: ChatStream | AsyncChatStream, exc: BaseException) -> None:
        trace.unsent = not stream.received_any and _unsent(exc)
        partial = stream.partial()
        generated = getattr(exc, "completion_tokens", None)
        if isinstance(generated, int) and generated > partial.usage.completion_tokens:
            # the model made a token or more past the last one handed out before the timeout stopped it
            partial.usage = dataclasses.replace(partial.usage, completion_tokens=generated)
        self.ledger.write(trace.record(partial, exc))


def _shape(request: ChatRequest) -> tuple[Any, ...]:
    """Each message, its content and tool calls, and each tool: what an in-place edit replaces. The objects
    themselves, not their ids: held here, a replaced one cannot be freed and its id reused by the new one."""
    parts: list[Any] = []
    for tool in request.tools:  # a description shortened in place: tool["function"]["description"] = ...
        function = tool.get("function") if isinstance(tool, dict) else None
        parts += (tool, function, *((function.get("description"), function.get("parameters"))
                                    if isinstance(function, dict) else ()))
    for m in request.messages:
        content, calls = m.get("content"), m.get("tool_calls")
        parts += (m, content, calls)
        if isinstance(content, list):  # content parts: {"type": "text", "text": ...} edited in place
            for part in content:
                parts += (part, part.get("text")) if isinstance(part, dict) else (part,)
        if isinstance(calls, list):
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                parts += (call, function, function.get("arguments") if isinstance(function, dict) else None)
    return tuple(parts)


def _own_message(m: Any) -> Any:
    """A copy of a message down to what a stage may edit in place: its content parts and tool calls."""
    if not isinstance(m, dict):
        return m
    m = dict(m)
    if isinstance(m.get("content"), list):
        m["content"] = [dict(part) if isinstance(part, dict) else part for part in m["content"]]
    if isinstance(m.get("tool_calls"), list):
        m["tool_calls"] = [dict(call, function=dict(call["function"])) if isinstance(call, dict)
                           and isinstance(call.get("function"), dict) else call for call in m["tool_calls"]]
    return m


def _own_tool(tool: Any) -> Any:
    """A copy of a tool schema down to its function (its description and parameters, which a stage edits)."""
    if not isinstance(tool, dict):
        return tool
    return dict(tool, function=dict(tool["function"])) if isinstance(tool.get("function"), dict) else dict(tool)


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _check_passed_on(stage: Stage, request: Any) -> None:
    """A stage passes a ChatRequest on (a before_model that forgot its `return` passes None)."""
    if not isinstance(request, ChatRequest):
        raise ConfigurationError(f"stage {stage.name!r} passed {type(request).__name__} to call_next, not a "
                                 "ChatRequest (does its before_model return the request?)")


def _stage_result(stage: Stage, request: ChatRequest, result: Any, stream_type: type[S]) -> Any:
    """What a stage returned, checked: a ChatResponse or a stream (an after_model that forgot its `return`
    gives None, which must fail the call as the stage's error, recorded with what the backend did). A stage
    that answers a streaming call by itself with a whole ChatResponse (its own cache) is replayed as a stream,
    as the caller of a streaming call iterates what it gets."""
    if isinstance(result, ChatResponse):
        if not request.stream:
            return result
        chunks = response_as_chunks(result)
        replay: Any = iter(chunks) if stream_type is ChatStream else _replay(chunks)
        return stream_type(replay, backend=result.backend, model=result.model, count_completion=None)
    if isinstance(result, (ChatStream, AsyncChatStream)):
        return result
    raise ConfigurationError(f"stage {stage.name!r} returned {type(result).__name__}, not a ChatResponse or a "
                             "stream (does its after_model or wrap_call return the response?)")


async def _replay(chunks: list[dict[str, Any]]) -> Any:
    for chunk in chunks:
        yield chunk


# Failures of a backend call before any answer that mean the backend refused the request or never received
# it: an HTTP error status, a connection that could not be made, a request the backend itself rejected, a
# stream closed before it began. Providers bill none of them. (A timeout or a cancellation may have been
# processed and billed.) Only the backend's own failures count: a stage's error after an answer does not.
_UNSENT = (BackendStatusError, BackendConnectionError, RequestError, GeneratorExit)


def _unsent(exc: BaseException) -> bool:
    """The backend never received the call (see _UNSENT), or says so itself (a local model whose lock-wait timed out)."""
    return isinstance(exc, _UNSENT) or bool(getattr(exc, "never_sent", False))


def _answering_model(backend: Backend, request: ChatRequest) -> str:
    """The model that answers `request`, for a call that failed before the backend said: a backend that
    serves one model (llama.cpp) answers with it whatever name the app asked for, and is priced as it."""
    if getattr(backend, "serves_one_model", False):
        return backend.model
    return request.model or backend.model


def message_tokens(counter: Any, message: Any) -> int:
    """One message's tokens in a prompt, its role's framing included: counted after an empty system message, or,
    where the model's chat template refuses that (Gemma 2's takes no system message; Llama 2's and Mistral's want
    user and assistant to alternate), its text. Accounting only: never a reason to fail the call."""
    blank = {"role": "system", "content": ""}
    try:
        return int(counter.count_prompt([blank, dict(message)]) - counter.count_prompt([blank]))
    except Exception:  # the template's raise_exception (a ValueError or a jinja2 TemplateError)
        return int(counter.count_text(message_text(dict(message))))


def _tools_shown(backend: Backend, request: ChatRequest) -> Sequence[dict[str, Any]]:
    """The tools as the model is shown them: a backend may send some rewritten (OpenAIBackend.tools_shown)."""
    tools_shown = getattr(backend, "tools_shown", None)
    return tools_shown(request) if tools_shown is not None else request.tools


def _counter(backend: Backend, request: ChatRequest) -> Any:
    """The counter for the model `request` asks for (an OpenAI backend asked for another OpenAI model)."""
    counter_for = getattr(backend, "counter_for", None)
    return counter_for(request.model) if counter_for is not None else backend.counter


def _context_window(backend: Backend, request: ChatRequest) -> int:
    window_for = getattr(backend, "context_window_for", None)
    return window_for(request.model) if window_for is not None else backend.context_window


def _add_backend_ms(trace: _CallTrace, t0: float) -> None:
    trace.backend_ms += (time.perf_counter() - t0) * 1000


def _count_generated(trace: _CallTrace, exc: BaseException, prompt_tokens: int) -> None:
    """A whole answer the backend stopped part way (a local model past the call's timeout) was generated that
    far: its tokens are an answer's usage, as a stream's are when it fails."""
    generated = getattr(exc, "completion_tokens", None)
    if isinstance(generated, int) and generated > 0:
        trace.answers.append(Usage(prompt_tokens, generated, 0, reported=False))


def _error_text(error: BaseException) -> str:
    if isinstance(error, asyncio.CancelledError):
        # A caller that went away (a proxy's client hanging up mid-stream): anyio's text is a task's repr
        # with memory addresses and the server's file paths, which tells the ledger's reader nothing.
        return "cancelled: the caller went away before the answer ended"
    if isinstance(error, GeneratorExit) and not str(error):  # Python's own, on a generator closed early
        return "the stream was closed before its end"
    return _redact(str(error))


def _redact(text: str) -> str:
    """Error texts can quote request headers; never let an API key reach the ledger or the logs."""
    return redact(text)[:500]