"""What comes back from a call: a whole ChatResponse, or a ChatStream of OpenAI chunk dicts.

A stream assembles the whole response as its chunks pass by; when the last chunk has gone out it runs
its `on_complete` callbacks (the ledger record, a cache store), and on failure its `on_error` callbacks,
so nothing half-streamed is ever recorded as a success.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from typing import Any, TypeVar

from .errors import BackendError


@dataclasses.dataclass(frozen=True)
class Usage:
    """Token usage of one backend call.

    cached_tokens: prompt tokens the backend served from its prefix cache (the provider's
    `prompt_tokens_details.cached_tokens`, or the prefix llama.cpp kept in its KV cache).
    reported:      True when the backend reported these numbers; False when ctxkit counted them.
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reported: bool = True

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass
class ChatResponse:
    """One assistant answer in the OpenAI chat format, plus where it came from."""

    message: dict[str, Any]
    finish_reason: str
    usage: Usage
    model: str
    backend: str
    id: str = dataclasses.field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    answered_by: str | None = None  # a stage that answered without calling the backend (a cache)
    logprobs: dict[str, Any] | None = None  # the choice's logprobs, when the backend returned them
    # All backend calls this call paid for, when a stage made more than one (a tool-retrieval recovery);
    # `usage` is the last one's, whose answer this is. None with one backend call.
    call_usage: Usage | None = None

    @property
    def content(self) -> str | None:
        return self.message.get("content")

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return list(self.message.get("tool_calls") or [])

    def to_openai(self) -> dict[str, Any]:
        """The `chat.completion` object an OpenAI client expects. Its `usage` is what the call cost: every
        backend call it made (`call_usage`), as a client billing from it must see."""
        paid = self.call_usage or self.usage
        usage: dict[str, Any] = {
            "prompt_tokens": paid.prompt_tokens,
            "completion_tokens": paid.completion_tokens,
            "total_tokens": paid.total_tokens,
            "prompt_tokens_details": {"cached_tokens": paid.cached_tokens},
        }
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "message": self.message, "finish_reason": self.finish_reason,
                 "logprobs": self.logprobs}
            ],
            "usage": usage,
        }


class _Assembler:
    """Folds OpenAI `chat.completion.chunk` dicts back into one assistant message."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason = "stop"
        self.finished = False  # whether a chunk said why the answer ended (a stream cut off never does)
        self.chunks = 0
        self.usage: Usage | None = None
        self.id: str | None = None
        self.model: str | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        self.id = self.id or chunk.get("id")
        self.model = self.model or chunk.get("model")
        u = chunk.get("usage")
        if u and all(isinstance(u.get(name), int) for name in ("prompt_tokens", "completion_tokens")):
            # (a usage chunk with a count missing or null is no usage: the completion gets counted)
            details = u.get("prompt_tokens_details") or {}
            self.usage = Usage(
                u["prompt_tokens"], u["completion_tokens"], details.get("cached_tokens") or 0,
                reported=u.get("ctxkit_reported", True),
            )
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.content.append(delta["content"])
            for call in delta.get("tool_calls") or []:
                slot = self.tool_calls.setdefault(
                    call.get("index", 0), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
                )
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                name = function.get("name") or ""
                if name != slot["function"]["name"]:  # llama.cpp's server repeats the whole name in every delta
                    slot["function"]["name"] += name
                slot["function"]["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
                self.finished = True

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None}
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return message


_Relay = TypeVar("_Relay", bound="_StreamBase")


class _StreamBase:
    def __init__(self, *, backend: str, model: str, count_completion: Callable[[dict[str, Any]], int] | None) -> None:
        self.backend = backend
        self.model = model
        self.response: ChatResponse | None = None  # set once the stream has ended normally
        self.answered_by: str | None = None
        self._assembler = _Assembler()
        self._count_completion = count_completion
        self._on_complete: list[Callable[[ChatResponse], None]] = []
        self._on_error: list[Callable[[BaseException], None]] = []
        self._prompt_tokens_if_unreported = 0
        self._failed = False

    def on_complete(self, callback: Callable[[ChatResponse], None]) -> None:
        """Run `callback(response)` once the last chunk has been consumed."""
        self._on_complete.append(callback)

    def on_error(self, callback: Callable[[BaseException], None]) -> None:
        """Run `callback(exc)` if the stream fails or is abandoned before its end."""
        self._on_error.append(callback)

    @property
    def finished(self) -> bool:
        """Whether a chunk gave the answer's finish_reason: a stream that ended without one (an upstream
        that closed the connection half way, cleanly) was cut off, though it raised nothing."""
        return self._assembler.finished

    @property
    def received_any(self) -> bool:
        """Whether any chunk arrived: a stream that failed before its first one was never answered."""
        return self._assembler.chunks > 0

    def set_prompt_tokens(self, tokens: int) -> None:
        """The counted prompt size, used when the backend reports no usage for streams."""
        self._prompt_tokens_if_unreported = tokens

    @classmethod
    def relaying(cls: type[_Relay], stream: _StreamBase, chunks: Any) -> _Relay:
        """A stream of `chunks`, drawn from `stream`, that counts and records them as `stream` would: for a
        stage that looks at a streamed answer as it passes (chunks go on as they come)."""
        relay = cls(chunks, backend=stream.backend, model=stream.model,  # type: ignore[call-arg, misc]
                    count_completion=stream._count_completion)  # (both subclasses take their chunks first)
        relay.set_prompt_tokens(stream._prompt_tokens_if_unreported)
        return relay

    def _finish(self) -> None:
        if self.response is not None or self._failed:
            return  # iterated again, collect() after a full iteration, or closed meanwhile: the call ended once
        self.response = self.partial()
        try:
            for callback in self._on_complete:
                try:
                    callback(self.response)
                except BaseException as exc:
                    # A callback that fails (a stage's store that is down) fails the call, as it would a whole
                    # answer's: the error callbacks still run, so the ledger records it (with its tokens).
                    self._failed = True
                    _run_all(self._on_error, exc)
                    raise
        finally:
            self._let_go_of_callbacks()

    def _let_go_of_callbacks(self) -> None:
        """The call ended and none runs again. They hold this stream (the pipeline's records its partial answer):
        kept, every streamed call was a reference cycle, and its pipeline and backend (a loaded model) stayed
        alive after the app dropped them, until the cyclic garbage collector ran."""
        self._on_complete, self._on_error = [], []

    def _collected(self) -> ChatResponse:
        """The whole answer collect() returns, or why there is none: collect() on a stream closed (or failed)
        before its end was a bare AssertionError."""
        if self.response is None:
            raise BackendError("this stream was closed or failed before its end: there is no whole answer to "
                               "collect (stream.partial() is what had arrived)", backend=self.backend)
        return self.response

    def partial(self) -> ChatResponse:
        """What has arrived so far, as a response (the whole one once the stream has ended): a stream
        abandoned half way was still generated, and billed, that far."""
        if self.response is not None:
            return self.response
        message = self._assembler.message()
        usage = self._assembler.usage
        if usage is None:
            try:
                completion = self._count_completion(message) if self._count_completion else 0
            except Exception:  # noqa: BLE001 - a counter gone (its backend closed): the record is still written
                completion = 0
            usage = Usage(self._prompt_tokens_if_unreported, completion, 0, reported=False)
        return ChatResponse(
            message=message,
            finish_reason=self._assembler.finish_reason,
            usage=usage,
            model=self._assembler.model or self.model,
            backend=self.backend,
            id=self._assembler.id or f"chatcmpl-{uuid.uuid4().hex[:24]}",
            answered_by=self.answered_by,
        )

    def __del__(self) -> None:
        # A stream dropped without being read (a client gone before its first chunk) still ends its call
        # once: recorded as abandoned, never as no call at all.
        try:
            if self.response is None and not self._failed:
                self._fail(GeneratorExit("the stream was dropped before its end"))
        except Exception:  # noqa: S110 - a finalizer must not raise (the interpreter may be shutting down)
            pass

    def _fail(self, exc: BaseException) -> None:
        if self.response is not None or self._failed:
            return  # the call ended once: a close() after the end, or after a failure, changes nothing
        if isinstance(exc, GeneratorExit) and self._assembler.finished:
            # Left after the chunk that gave the finish_reason (a loop that stops there): the answer is
            # whole, only the usage chunk was still to come. That is a finished call, not an abandoned one.
            self._finish()
            return
        self._failed = True
        try:
            _run_all(self._on_error, exc)
        finally:
            self._let_go_of_callbacks()


def _run_all(callbacks: list[Callable[[BaseException], None]], exc: BaseException) -> None:
    """Run every error callback, even after one fails: the pipeline's, which writes the ledger record,
    comes after the stages'. The first failure is raised once all have run."""
    failure: BaseException | None = None
    for callback in callbacks:
        try:
            callback(exc)
        except BaseException as error:
            failure = failure or error
    if failure is not None:
        raise failure


class ChatStream(_StreamBase):
    """A synchronous stream of `chat.completion.chunk` dicts. Iterate it once.

    While it is open the backend holds what the answer needs: llama.cpp's model, which every other call
    then waits for, or an HTTP connection. A loop left with `break` ends it (the loop drops its iterator);
    an iterator kept elsewhere keeps it open, so use the stream as a context manager or call close()."""

    def __init__(self, chunks: Iterator[dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._chunks = chunks
        # Weakly held: a loop left with `break` drops its iterator, which then ends the stream at once.
        self._iteration: weakref.ref[Generator[dict[str, Any], None, None]] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iteration = self._iterate()
        self._iteration = weakref.ref(iteration)
        return iteration

    def _iterate(self) -> Generator[dict[str, Any], None, None]:
        try:
            for chunk in self._chunks:
                self._assembler.add(chunk)
                yield chunk
        except BaseException as exc:  # GeneratorExit too: an abandoned stream is not a success
            self._fail(exc)
            raise
        finally:
            self._close_chunks()
        self._finish()

    def close(self) -> None:
        """End the stream now; the backend lets go of the model or connection. Not ended yet: recorded
        as abandoned."""
        iteration = self._iteration() if self._iteration is not None else None
        if iteration is not None:
            iteration.close()
        self._close_chunks()
        self._fail(GeneratorExit("the stream was closed before its end"))

    def _close_chunks(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def collect(self) -> ChatResponse:
        """Consume the stream and return the assembled response."""
        for _ in self:
            pass
        return self._collected()


class AsyncChatStream(_StreamBase):
    """The async twin of ChatStream."""

    def __init__(self, chunks: AsyncIterator[dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._chunks = chunks
        self._iteration: weakref.ref[AsyncGenerator[dict[str, Any], None]] | None = None

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        iteration = self._iterate()
        self._iteration = weakref.ref(iteration)
        return iteration

    async def _iterate(self) -> AsyncGenerator[dict[str, Any], None]:
        try:
            async for chunk in self._chunks:
                if self._failed:  # aclose() from another task while this one waited for the chunk
                    break
                self._assembler.add(chunk)
                yield chunk
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            await self._close_chunks()
        if not self._failed:
            self._finish()

    async def aclose(self) -> None:
        """End the stream now (ChatStream.close)."""
        iteration = self._iteration() if self._iteration is not None else None
        # An iteration already closing (the event loop's finalizer of a loop left with `break` got there
        # first) finishes its own close; a second aclose() meanwhile raises "already running".
        if iteration is not None and not getattr(iteration, "ag_running", False):
            await iteration.aclose()
        await self._close_chunks()
        self._fail(GeneratorExit("the stream was closed before its end"))

    async def _close_chunks(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None and not getattr(self._chunks, "ag_running", False):
            await aclose()

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def collect(self) -> ChatResponse:
        async for _ in self:
            pass
        return self._collected()


def response_as_chunks(response: ChatResponse) -> list[dict[str, Any]]:
    """Replay a whole response as stream chunks (a stage that answers a streaming call by itself)."""
    base = {"id": response.id, "object": "chat.completion.chunk", "created": response.created, "model": response.model}
    delta: dict[str, Any] = {"role": "assistant", "content": response.content}
    if response.tool_calls:
        delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(response.tool_calls)]
    return [
        {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": response.finish_reason}]},
        {**base, "choices": [], "usage": response.to_openai()["usage"]},
    ]


def message_text(message: dict[str, Any]) -> str:
    """The text of a message as a token counter sees it (content parts and tool calls included)."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    text = content or ""
    for call in message.get("tool_calls") or []:
        text += json.dumps(call.get("function", {}))
    return text
