"""A drop-in for the `openai` client: an agent loop switches to ctxkit by changing one line.

    client = pipeline.openai()          # instead of openai.OpenAI()
    completion = client.chat.completions.create(model=..., messages=..., tools=...)

Answers are the `openai` package's own types (ChatCompletion, ChatCompletionChunk). ctxkit's own
request fields ride in `extra_body={"ctxkit": {"namespace": "acme", "conversation_id": "c1"}}`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

from openai.pagination import AsyncPage, SyncPage
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from . import errors as ck
from .openai_errors import also_openais
from .request import ChatRequest, _not_given
from .response import ChatResponse

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .pipeline import Pipeline


class _ChunkFilter:
    """Turns ctxkit's chunk dicts into what the caller asked for: the usage-only chunk only with
    `stream_options={"include_usage": True}`, and then always one, counted when the backend sent none."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.keep_usage = bool((kwargs.get("stream_options") or {}).get("include_usage"))
        self.saw_usage = False

    def admit(self, chunk: dict[str, Any]) -> ChatCompletionChunk | None:
        usage = chunk.get("usage")
        self.saw_usage = self.saw_usage or bool(usage)
        if not (chunk.get("choices") or self.keep_usage):
            return None
        if usage and "ctxkit_reported" in usage:
            chunk = {**chunk, "usage": {k: v for k, v in usage.items() if k != "ctxkit_reported"}}
        return ChatCompletionChunk.model_validate(chunk)

    def closing(self, response: ChatResponse | None) -> ChatCompletionChunk | None:
        if not self.keep_usage or self.saw_usage or response is None:
            return None
        return ChatCompletionChunk.model_validate({
            "id": response.id, "object": "chat.completion.chunk", "created": response.created,
            "model": response.model, "choices": [], "usage": response.to_openai()["usage"],
        })


class _Response:
    """`Stream.response` as openai's (an httpx.Response): what openai's stream helpers close when they end. There
    is no HTTP exchange with the app: no headers, status 200; closing it ends the stream."""

    status_code = 200

    def __init__(self, close: Callable[[], Any]) -> None:
        import httpx

        self.headers = httpx.Headers()
        self._close = close

    def close(self) -> None:
        self._close()

    async def aclose(self) -> None:
        await self._close()


class Stream:
    """What `create(stream=True)` returns, as `openai.Stream`: iterate it; leave early with `with` or close(),
    which lets go of the backend (llama.cpp's model is held while a stream is open)."""

    def __init__(self, chunks: Generator[ChatCompletionChunk, None, None], close: Callable[[], None]) -> None:
        self._chunks = chunks
        self._close = close
        self.response = _Response(self.close)

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        return self._iterate()

    def _iterate(self) -> Generator[ChatCompletionChunk, None, None]:
        try:
            yield from self._chunks
        finally:  # a loop left with `break` ends the stream, as with ctxkit's own ChatStream
            self.close()

    def __next__(self) -> ChatCompletionChunk:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()
        self._close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncStream:
    """The async twin of Stream (`openai.AsyncStream`): `async with`, or `await stream.close()`."""

    def __init__(self, chunks: AsyncGenerator[ChatCompletionChunk, None],
                 close: Callable[[], Awaitable[None]]) -> None:
        self._chunks = chunks
        self._close = close
        self.response = _Response(self.close)

    def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncGenerator[ChatCompletionChunk, None]:
        try:
            async for chunk in self._chunks:
                yield chunk
        finally:
            await self.close()

    async def __anext__(self) -> ChatCompletionChunk:
        return await self._chunks.__anext__()

    async def close(self) -> None:
        await self._chunks.aclose()
        await self._close()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _parse_inputs(response_format: Any, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    from openai import NOT_GIVEN
    from openai.lib._parsing import type_to_response_format_param, validate_input_tools

    tools = kwargs.get("tools", NOT_GIVEN)
    validate_input_tools(tools)
    if response_format is None:
        return {}, tools
    return {"response_format": type_to_response_format_param(response_format)}, tools


def _parsed(completion: Any, response_format: Any, tools: Any) -> Any:
    from openai import NOT_GIVEN
    from openai.lib._parsing import parse_chat_completion

    wanted: Any = NOT_GIVEN if response_format is None else response_format  # openai's own types vary by version
    return parse_chat_completion(response_format=wanted, input_tools=tools, chat_completion=completion)


class RawResponse:
    """What `with_raw_response.create(...)` returns, as openai's LegacyAPIResponse: `.parse()` gives the
    ChatCompletion (or the stream); there is no HTTP exchange with the app, so `headers` is empty. LiteLLM and
    LangChain's ChatOpenAI (`include_response_headers=True`) call the client this way."""

    status_code = 200

    def __init__(self, parsed: Any) -> None:
        import httpx

        self._parsed = parsed
        self.headers = httpx.Headers()

    def parse(self) -> Any:
        return self._parsed


class _WithRawResponse:
    def __init__(self, completions: Any) -> None:
        self._completions = completions

    def create(self, **kwargs: Any) -> RawResponse:
        return RawResponse(self._completions.create(**kwargs))


class _AsyncWithRawResponse:
    def __init__(self, completions: Any) -> None:
        self._completions = completions

    async def create(self, **kwargs: Any) -> RawResponse:
        return RawResponse(await self._completions.create(**kwargs))


def _event_lines(chunk: ChatCompletionChunk) -> tuple[str, str]:
    """A stream chunk as OpenAI's API sends it: a server-sent event and the blank line that ends it."""
    return f"data: {chunk.model_dump_json(exclude_unset=True)}", ""


_DONE_LINES = ("data: [DONE]", "")


def _body_lines(parsed: Any) -> Iterator[str]:
    """The lines of the body OpenAI's API would have sent: a completion's JSON, or a stream's server-sent events."""
    if not isinstance(parsed, Stream):
        yield parsed.model_dump_json(exclude_unset=True)
        return
    for chunk in parsed:
        yield from _event_lines(chunk)
    yield from _DONE_LINES


class StreamingResponse(RawResponse):
    """What `with client.chat.completions.with_streaming_response.create(...) as response` gives, as openai's
    APIResponse: `.parse()` is what create returns; `iter_lines()` / `iter_bytes()` read the body as OpenAI's API
    sends it (consuming a stream, as openai's do); leaving the `with` block ends a stream."""

    def iter_lines(self) -> Iterator[str]:
        return _body_lines(self._parsed)

    def iter_bytes(self, chunk_size: int | None = None) -> Iterator[bytes]:
        return (f"{line}\n".encode() for line in self.iter_lines())

    def close(self) -> None:
        if isinstance(self._parsed, Stream):
            self._parsed.close()


class AsyncStreamingResponse(RawResponse):
    """The async twin of StreamingResponse (openai's AsyncAPIResponse): `await response.parse()`,
    `async for line in response.iter_lines()`."""

    async def parse(self) -> Any:
        return self._parsed

    async def iter_lines(self) -> AsyncIterator[str]:
        if not isinstance(self._parsed, AsyncStream):
            yield self._parsed.model_dump_json(exclude_unset=True)
            return
        async for chunk in self._parsed:
            for line in _event_lines(chunk):
                yield line
        for line in _DONE_LINES:
            yield line

    async def iter_bytes(self, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        async for line in self.iter_lines():
            yield f"{line}\n".encode()

    async def close(self) -> None:
        if isinstance(self._parsed, AsyncStream):
            await self._parsed.close()


class _StreamingResponseManager:
    """openai's ResponseContextManager: the call runs on entering the `with` block, and leaving it ends a stream."""

    def __init__(self, start: Callable[[], Any]) -> None:
        self._start = start

    def __enter__(self) -> StreamingResponse:
        self._response = StreamingResponse(self._start())
        return self._response

    def __exit__(self, *exc_info: object) -> None:
        self._response.close()


class _AsyncStreamingResponseManager:
    def __init__(self, start: Callable[[], Awaitable[Any]]) -> None:
        self._start = start

    async def __aenter__(self) -> AsyncStreamingResponse:
        self._response = AsyncStreamingResponse(await self._start())
        return self._response

    async def __aexit__(self, *exc_info: object) -> None:
        await self._response.close()


class _WithStreamingResponse:
    def __init__(self, completions: Any) -> None:
        self._completions = completions

    def create(self, **kwargs: Any) -> _StreamingResponseManager:
        return _StreamingResponseManager(lambda: self._completions.create(**kwargs))


class _AsyncWithStreamingResponse:
    def __init__(self, completions: Any) -> None:
        self._completions = completions

    def create(self, **kwargs: Any) -> _AsyncStreamingResponseManager:
        return _AsyncStreamingResponseManager(lambda: self._completions.create(**kwargs))


# What `with_options(...)` takes, as the create() option each one sets for the client's calls.
_CLIENT_OPTIONS = {"timeout": "timeout", "default_headers": "extra_headers", "default_query": "extra_query"}


def _with_defaults(options: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's kwargs over its client's `with_options(...)`: as in openai, the call's own timeout wins, and its
    `extra_headers` / `extra_query` are added to the client's."""
    kwargs = {k: v for k, v in kwargs.items() if not _not_given(v)}
    for key, value in options.items():
        kwargs[key] = {**value, **(kwargs.get(key) or {})} if key != "timeout" else kwargs.get(key, value)
    return kwargs


def _client_options(pipeline: Pipeline, current: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`current` with `with_options(**given)` applied; an option ctxkit cannot honour is a ConfigurationError."""
    given = {k: v for k, v in given.items() if not _not_given(v)}
    # Retries are the backend's (OpenAIBackend(max_retries=...), `ctxkit serve --upstream-retries`): there is no
    # HTTP exchange between the app and ctxkit for the client to retry. openai code sets max_retries everywhere,
    # so it is taken, and another number than the backend's is said in the log, not refused.
    retries = getattr(pipeline.backend, "max_retries", 0)
    if "max_retries" in given and (wanted := given.pop("max_retries")) != retries:
        logger.warning("with_options(max_retries=%s) is not per client in ctxkit: calls retry as the pipeline's "
                       "backend does (max_retries=%s; set it on the backend)", wanted, retries)
    refused = sorted(set(given) - set(_CLIENT_OPTIONS))
    if refused:
        raise ck.ConfigurationError(
            f"with_options() cannot honour {', '.join(refused)}: ctxkit's client takes timeout, default_headers, "
            "default_query and max_retries (retries are the backend's); the API key, base URL and HTTP client "
            "are the pipeline's backend's")
    options = dict(current)
    for name, value in given.items():
        key = _CLIENT_OPTIONS[name]
        if value is None:  # openai's `timeout=None`: no limit of the client's own, so the backend's
            if key == "timeout":  # default_headers=None / default_query=None: unchanged, as in openai
                options.pop(key, None)
        else:
            options[key] = value if key == "timeout" else {**options.get(key, {}), **value}
    return options


class _Completions:
    def __init__(self, pipeline: Pipeline, options: dict[str, Any]) -> None:
        self._pipeline = pipeline
        self._options = options  # the client's with_options(...)

    # Made at each use, not kept: kept, each held these completions, a reference cycle that left a dropped client's
    # pipeline, and its backend's model, loaded until the cyclic garbage collector ran.
    @property
    def with_raw_response(self) -> _WithRawResponse:
        return _WithRawResponse(self)

    @property
    def with_streaming_response(self) -> _WithStreamingResponse:
        return _WithStreamingResponse(self)

    def create(self, **kwargs: Any) -> ChatCompletion | Stream:
        kwargs = _with_defaults(self._options, kwargs)
        try:
            request = ChatRequest.from_openai_kwargs(kwargs)
            result = self._pipeline.call(request)
        except ck.CtxkitError as exc:
            also_openais(exc)
            raise
        if isinstance(result, ChatResponse):
            return ChatCompletion.model_validate(result.to_openai())
        chunks = _ChunkFilter(kwargs)

        def typed() -> Generator[ChatCompletionChunk, None, None]:
            try:
                for chunk in result:
                    if (typed_chunk := chunks.admit(chunk)) is not None:
                        yield typed_chunk
            except ck.CtxkitError as exc:  # a stream that fails half way: openai's error too
                also_openais(exc)
                raise
            if (closing := chunks.closing(result.response)) is not None:
                yield closing

        return Stream(typed(), result.close)

    def parse(self, *, response_format: Any = None, **kwargs: Any) -> Any:
        """`chat.completions.parse` as the `openai` client has it: a Pydantic model as `response_format`
        constrains the answer to its JSON schema, and `.choices[0].message.parsed` holds the instance."""
        if kwargs.get("stream"):
            raise TypeError("parse() does not stream")
        fmt, tools = _parse_inputs(response_format, kwargs)
        return _parsed(self.create(**kwargs, **fmt), response_format, tools)

    def stream(self, *, response_format: Any = None, **kwargs: Any) -> Any:
        """`chat.completions.stream` as the `openai` client has it: `with client.chat.completions.stream(...) as s`,
        its events (`content.delta`, ...) and `s.get_final_completion()`, parsed as `parse` does."""
        from openai import NOT_GIVEN
        from openai.lib.streaming.chat import ChatCompletionStreamManager

        kwargs.pop("stream", None)
        fmt, tools = _parse_inputs(response_format, kwargs)
        # ctxkit's Stream stands in for openai's (the manager reads its chunks and closes its response)
        start: Any = lambda: self.create(**kwargs, **fmt, stream=True)  # noqa: E731
        given: Any = NOT_GIVEN if response_format is None else response_format
        return ChatCompletionStreamManager(start, response_format=given, input_tools=tools)


class _AsyncCompletions:
    def __init__(self, pipeline: Pipeline, options: dict[str, Any]) -> None:
        self._pipeline = pipeline
        self._options = options  # the client's with_options(...)

    # Made at each use, not kept: kept, each held these completions, a reference cycle that left a dropped client's
    # pipeline, and its backend's model, loaded until the cyclic garbage collector ran.
    @property
    def with_raw_response(self) -> _AsyncWithRawResponse:
        return _AsyncWithRawResponse(self)

    @property
    def with_streaming_response(self) -> _AsyncWithStreamingResponse:
        return _AsyncWithStreamingResponse(self)

    async def create(self, **kwargs: Any) -> ChatCompletion | AsyncStream:
        kwargs = _with_defaults(self._options, kwargs)
        try:
            request = ChatRequest.from_openai_kwargs(kwargs)
            result = await self._pipeline.acall(request)
        except ck.CtxkitError as exc:
            also_openais(exc)
            raise
        if isinstance(result, ChatResponse):
            return ChatCompletion.model_validate(result.to_openai())
        chunks = _ChunkFilter(kwargs)

        async def typed() -> AsyncGenerator[ChatCompletionChunk, None]:
            try:
                async for chunk in result:
                    if (typed_chunk := chunks.admit(chunk)) is not None:
                        yield typed_chunk
            except ck.CtxkitError as exc:
                also_openais(exc)
                raise
            if (closing := chunks.closing(result.response)) is not None:
                yield closing

        return AsyncStream(typed(), result.aclose)

    async def parse(self, *, response_format: Any = None, **kwargs: Any) -> Any:
        """The async twin of `chat.completions.parse`."""
        if kwargs.get("stream"):
            raise TypeError("parse() does not stream")
        fmt, tools = _parse_inputs(response_format, kwargs)
        return _parsed(await self.create(**kwargs, **fmt), response_format, tools)

    def stream(self, *, response_format: Any = None, **kwargs: Any) -> Any:
        """The async twin of `chat.completions.stream`: `async with client.chat.completions.stream(...) as s`."""
        from openai import NOT_GIVEN
        from openai.lib.streaming.chat import AsyncChatCompletionStreamManager

        kwargs.pop("stream", None)
        fmt, tools = _parse_inputs(response_format, kwargs)
        start: Any = self.create(**kwargs, **fmt, stream=True)  # ctxkit's AsyncStream stands in for openai's
        given: Any = NOT_GIVEN if response_format is None else response_format
        return AsyncChatCompletionStreamManager(start, response_format=given, input_tools=tools)


class _Models:
    """`client.models.list()` / `.retrieve(id)`: the model the pipeline's backend serves, as `ctxkit serve`'s
    GET /v1/models lists it; another id is a NotFoundError, as OpenAI's 404."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self._created = int(time.time())

    def _served(self) -> Model:
        return Model(id=self._pipeline.backend.model, object="model", created=self._created, owned_by="ctxkit")

    def list(self) -> SyncPage[Model]:
        return SyncPage[Model](data=[self._served()], object="list")

    def retrieve(self, model: str) -> Model:
        served = self._served()
        if model != served.id:
            error = ck.BackendStatusError(f"model {model!r} not found; this pipeline serves {served.id!r}",
                                          backend=self._pipeline.backend.name, status=404)
            also_openais(error)
            raise error
        return served


class _AsyncModelList:
    """What openai's async `models.list()` returns (an AsyncPaginator): `await` it for the page, or `async for`."""

    def __init__(self, page: AsyncPage[Model]) -> None:
        self._page = page

    def __await__(self) -> Generator[Any, None, AsyncPage[Model]]:
        async def page() -> AsyncPage[Model]:
            return self._page

        return page().__await__()

    def __aiter__(self) -> AsyncIterator[Model]:
        return self._page.__aiter__()


class _AsyncModels:
    def __init__(self, pipeline: Pipeline) -> None:
        self._models = _Models(pipeline)

    def list(self) -> _AsyncModelList:
        return _AsyncModelList(AsyncPage[Model](data=self._models.list().data, object="list"))

    async def retrieve(self, model: str) -> Model:
        return self._models.retrieve(model)


class _Chat:
    def __init__(self, completions: Any) -> None:
        self.completions = completions


class _Beta:
    """`client.beta.chat.completions.parse(...)`: where openai's structured outputs were first (and most
    examples still call them); the same completions as `client.chat`."""

    def __init__(self, chat: _Chat) -> None:
        self.chat = chat


class OpenAIClient:
    """`client.chat.completions.create(...)`, through a ctxkit pipeline."""

    def __init__(self, pipeline: Pipeline, options: dict[str, Any] | None = None) -> None:
        self.pipeline = pipeline
        self._options = options or {}
        self.chat = _Chat(_Completions(pipeline, self._options))
        self.beta = _Beta(self.chat)
        self.models = _Models(pipeline)

    def with_options(self, **options: Any) -> OpenAIClient:
        """As openai's: a client on the same pipeline whose calls use `timeout`, `default_headers` and
        `default_query`; an option ctxkit cannot honour (`api_key`, `base_url`, ...) is a ConfigurationError."""
        return OpenAIClient(self.pipeline, _client_options(self.pipeline, self._options, options))

    copy = with_options

    # As openai.OpenAI: `with pipeline.openai() as client:`. The pipeline and its backend are the app's, shared
    # by every client it makes, so closing a client lets go of nothing.
    def close(self) -> None:
        pass

    def __enter__(self) -> OpenAIClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncOpenAIClient:
    """`await client.chat.completions.create(...)`, through a ctxkit pipeline."""

    def __init__(self, pipeline: Pipeline, options: dict[str, Any] | None = None) -> None:
        self.pipeline = pipeline
        self._options = options or {}
        self.chat = _Chat(_AsyncCompletions(pipeline, self._options))
        self.beta = _Beta(self.chat)
        self.models = _AsyncModels(pipeline)

    def with_options(self, **options: Any) -> AsyncOpenAIClient:  # as OpenAIClient.with_options
        return AsyncOpenAIClient(self.pipeline, _client_options(self.pipeline, self._options, options))

    copy = with_options

    async def close(self) -> None:  # as openai.AsyncOpenAI (see OpenAIClient.close)
        pass

    async def __aenter__(self) -> AsyncOpenAIClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
