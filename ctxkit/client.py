"""A drop-in for the `openai` client: an agent loop switches to ctxkit by changing one line.

    client = pipeline.openai()          # instead of openai.OpenAI()
    completion = client.chat.completions.create(model=..., messages=..., tools=...)

Answers are the `openai` package's own types (ChatCompletion, ChatCompletionChunk). ctxkit's own
request fields ride in `extra_body={"ctxkit": {"namespace": "acme", "conversation_id": "c1"}}`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from openai.types.chat import ChatCompletion, ChatCompletionChunk

from .request import ChatRequest
from .response import ChatResponse

if TYPE_CHECKING:
    from .pipeline import Pipeline


def _wants_usage_chunk(kwargs: dict[str, Any]) -> bool:
    return bool((kwargs.get("stream_options") or {}).get("include_usage"))


def _public_chunk(chunk: dict[str, Any]) -> dict[str, Any]:
    usage = chunk.get("usage")
    if usage and "ctxkit_reported" in usage:
        chunk = {**chunk, "usage": {k: v for k, v in usage.items() if k != "ctxkit_reported"}}
    return chunk


def _usage_chunk(response: ChatResponse) -> dict[str, Any]:
    """The closing usage chunk, for backends that stream none (llama.cpp's server): counted by ctxkit."""
    return {"id": response.id, "object": "chat.completion.chunk", "created": response.created,
            "model": response.model, "choices": [], "usage": response.to_openai()["usage"]}


class _Completions:
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def create(self, **kwargs: Any) -> ChatCompletion | Iterator[ChatCompletionChunk]:
        request = ChatRequest.from_openai_kwargs(kwargs)
        result = self._pipeline.call(request)
        if isinstance(result, ChatResponse):
            return ChatCompletion.model_validate(result.to_openai())
        keep_usage = _wants_usage_chunk(kwargs)

        def chunks() -> Iterator[ChatCompletionChunk]:
            saw_usage = False
            for chunk in result:
                saw_usage = saw_usage or bool(chunk.get("usage"))
                if chunk.get("choices") or keep_usage:
                    yield ChatCompletionChunk.model_validate(_public_chunk(chunk))
            if keep_usage and not saw_usage and result.response is not None:
                yield ChatCompletionChunk.model_validate(_usage_chunk(result.response))

        return chunks()


class _AsyncCompletions:
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def create(self, **kwargs: Any) -> ChatCompletion | AsyncIterator[ChatCompletionChunk]:
        request = ChatRequest.from_openai_kwargs(kwargs)
        result = await self._pipeline.acall(request)
        if isinstance(result, ChatResponse):
            return ChatCompletion.model_validate(result.to_openai())
        keep_usage = _wants_usage_chunk(kwargs)

        async def chunks() -> AsyncIterator[ChatCompletionChunk]:
            saw_usage = False
            async for chunk in result:
                saw_usage = saw_usage or bool(chunk.get("usage"))
                if chunk.get("choices") or keep_usage:
                    yield ChatCompletionChunk.model_validate(_public_chunk(chunk))
            if keep_usage and not saw_usage and result.response is not None:
                yield ChatCompletionChunk.model_validate(_usage_chunk(result.response))

        return chunks()


class _Chat:
    def __init__(self, completions: Any) -> None:
        self.completions = completions


class OpenAIClient:
    """`client.chat.completions.create(...)`, through a ctxkit pipeline."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.chat = _Chat(_Completions(pipeline))


class AsyncOpenAIClient:
    """`await client.chat.completions.create(...)`, through a ctxkit pipeline."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.chat = _Chat(_AsyncCompletions(pipeline))
