"""LangChainBackend: any LangChain chat model as a ctxkit backend, so ctxkit's stages run in front of it.

    backend = LangChainBackend(ChatOpenAI(model="gpt-4o-mini"))              # counted with tiktoken
    backend = LangChainBackend(ChatAnthropic(...), counter=my_counter)      # anything else: say how to count

The chat model does the I/O; ctxkit needs to know how that model counts tokens, so the pipeline can
measure what each stage saved. For OpenAI models that is tiktoken; for any other model pass `counter=`
(for a GGUF model, `GGUFPrompt.from_gguf(path)`), because a guessed count would make the ledger lie.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.messages.tool import tool_call_chunk

from ctxkit.errors import (
    BackendConnectionError,
    BackendError,
    BackendStatusError,
    BackendTimeoutError,
    ConfigurationError,
)
from ctxkit.request import ChatRequest
from ctxkit.response import ChatResponse, Usage
from ctxkit.settings import whole_number
from ctxkit.tokens import TokenCounter
from ctxkit.tokens.tiktoken_counter import TiktokenCounter, encoding_name_for_model

from .messages import (
    ai_message_to_openai,
    countable,
    finish_reason,
    langchain_messages,
    openai_chunks_from_message_chunk,
    to_langchain_tool_choice,
    usage_from_ai_message,
)

DEFAULT_CONTEXT_WINDOW = 128_000
# A LangChain chat model's own sampling settings, as its fields name them: wrap() and CtxkitMiddleware read
# them off the wrapped model as defaults, and the backend does not send them back to it.
_OWN_SETTINGS = ("temperature", "top_p", "max_tokens", "seed", "stop")


def model_settings(chat_model: Any) -> dict[str, Any]:
    """The sampling settings a LangChain chat model is configured with (those it has and that are set), as a
    request's params hold them (a stop sequence given as a string is one sequence)."""
    out: dict[str, Any] = {}
    for key in _OWN_SETTINGS:
        value = getattr(chat_model, key, None)
        if isinstance(value, (int, float, str, list)) and not isinstance(value, bool) and value != []:
            out[key] = [value] if key == "stop" and isinstance(value, str) else value
    return out


def chat_model_name(chat_model: BaseChatModel) -> str:
    """The model name a LangChain chat model serves (its `model_name`, `model` or `model_id`)."""
    for attribute in ("model_name", "model", "model_id"):
        value = getattr(chat_model, attribute, None)
        if isinstance(value, str) and value:
            return value
    # LangChain's own answer (a CtxkitChatModel names its backend's model there): the class name is no model,
    # and would put every such model under one cache key and one price.
    try:
        value = chat_model._get_ls_params().get("ls_model_name")
    except Exception:  # a model whose tracing hints need call arguments
        value = None
    if isinstance(value, str) and value:
        return value
    return type(chat_model).__name__


def counter_for(chat_model: BaseChatModel, counter: TokenCounter | None) -> TokenCounter:
    """The counter given, or tiktoken's for an OpenAI model; anything else is a configuration error."""
    if counter is not None:
        return counter
    model = chat_model_name(chat_model)
    if encoding_name_for_model(model) is not None:
        return TiktokenCounter(model)
    raise ConfigurationError(
        f"cannot count tokens for {type(chat_model).__name__} model {model!r}: pass counter= "
        "(for a GGUF model, ctxkit.GGUFPrompt.from_gguf(path)) so the ledger's savings are exact"
    )


def translate_error(exc: BaseException, backend: str) -> BackendError:
    """A chat model's exception as ctxkit's BackendError, keeping an HTTP status when it carried one."""
    if isinstance(exc, BackendError):
        return exc
    kind = type(exc).__name__.lower()
    status = getattr(exc, "status_code", None) or getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, TimeoutError) or "timeout" in kind:
        return BackendTimeoutError(str(exc), backend=backend)
    if isinstance(exc, ConnectionError) or "connection" in kind:
        return BackendConnectionError(str(exc), backend=backend)
    if isinstance(status, int):
        return BackendStatusError(str(exc), backend=backend, status=status)
    return BackendError(f"{type(exc).__name__}: {exc}", backend=backend)


def profile_context_window(chat_model: Any) -> int | None:
    """The window the model's LangChain profile gives (`max_input_tokens`: 200,000 for Claude, 128,000 for
    gpt-4o), or None. A model's default max_tokens can be large (ChatAnthropic's 64,000): checked against a
    guessed 128,000 it left room for prompts of only 64,000 tokens."""
    profile = getattr(chat_model, "profile", None)
    window = profile.get("max_input_tokens") if isinstance(profile, Mapping) else None
    return window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None


class LangChainBackend:
    """The ctxkit Backend protocol over a LangChain chat model (sync, async and streaming)."""

    def __init__(
        self,
        chat_model: BaseChatModel,
        *,
        counter: TokenCounter | None = None,
        context_window: int | None = None,
        name: str | None = None,
    ) -> None:
        """context_window: the model's limit in tokens; the pipeline refuses requests that do not fit.
        Default: the model's own LangChain profile says it (`max_input_tokens`), else 128,000."""
        if context_window is not None:  # 0 fell back to the profile's or 128,000 without a word
            context_window = whole_number(context_window, "context_window (None: the model's profile)", minimum=1)
        self.chat_model = chat_model
        self.model = chat_model_name(chat_model)
        self.counter = counter_for(chat_model, counter)
        self.context_window = context_window or profile_context_window(chat_model) or DEFAULT_CONTEXT_WINDOW
        self.name = name or f"langchain:{type(chat_model).__name__}"

    def __repr__(self) -> str:
        return f"LangChainBackend({type(self.chat_model).__name__}, model={self.model!r})"

    # -- sync ---------------------------------------------------------------------------------------
    def complete(self, request: ChatRequest) -> ChatResponse:
        model, kwargs = self._prepared(request)
        try:
            message = model.invoke(langchain_messages(request), **kwargs)
        except Exception as exc:
            raise translate_error(exc, self.name) from exc
        return self._response(message, request)

    def stream(self, request: ChatRequest) -> Iterator[dict[str, Any]]:
        model, kwargs = self._prepared(request)
        state = _StreamState(request.model or self.model)
        try:
            for chunk in model.stream(langchain_messages(request), **kwargs):
                yield from state.convert(chunk)
        except Exception as exc:
            raise translate_error(exc, self.name) from exc
        yield from state.finish()

    # -- async twins --------------------------------------------------------------------------------
    async def acomplete(self, request: ChatRequest) -> ChatResponse:
        model, kwargs = self._prepared(request)
        try:
            message = await model.ainvoke(langchain_messages(request), **kwargs)
        except Exception as exc:
            raise translate_error(exc, self.name) from exc
        return self._response(message, request)

    async def astream(self, request: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        model, kwargs = self._prepared(request)
        state = _StreamState(request.model or self.model)
        try:
            async for chunk in model.astream(langchain_messages(request), **kwargs):
                for out in state.convert(chunk):
                    yield out
        except Exception as exc:
            raise translate_error(exc, self.name) from exc
        for out in state.finish():
            yield out

    def close(self) -> None:
        pass  # the chat model belongs to the caller

    # -- helpers ------------------------------------------------------------------------------------
    def _prepared(self, request: ChatRequest) -> tuple[Any, dict[str, Any]]:
        """The model with the request's tools bound, and the sampling parameters and HTTP options as call kwargs."""
        params = dict(request.params)
        # A setting the wrapped model already has (wrap() copied it as a default, for the cache and the ledger)
        # is not sent again: many models refuse their own setting as a call argument (ChatOllama: `stop` "found
        # in both the input and default params", `temperature` passed on to its client, which takes none).
        own = model_settings(self.chat_model)
        for key in [k for k in params if k in own and params[k] == own[k]]:
            del params[key]
        tool_choice = params.pop("tool_choice", None)
        parallel = params.pop("parallel_tool_calls", None)
        model: Any = self.chat_model
        if request.tools:
            bind_kwargs: dict[str, Any] = {}
            if tool_choice is not None:
                bind_kwargs["tool_choice"] = to_langchain_tool_choice(tool_choice, request.tools)
            if parallel is not None:
                bind_kwargs["parallel_tool_calls"] = parallel
            model = self.chat_model.bind_tools(list(request.tools), **bind_kwargs)
        # The caller's per-call HTTP options reach the wrapped model as ChatOpenAI takes them (only when set:
        # a model without such options must not get them).
        params.update(request.transport_options())
        return model, params

    def _response(self, message: Any, request: ChatRequest) -> ChatResponse:
        if not isinstance(message, AIMessage):
            raise BackendError(f"the chat model returned {type(message).__name__}, not an AIMessage", backend=self.name)
        openai_message = ai_message_to_openai(message)
        usage = usage_from_ai_message(message)
        if usage is None:  # the model reported nothing: count, and say so in the ledger
            usage = Usage(self.counter.count_prompt(request.messages, request.tools),
                          self.counter.count_completion(countable(openai_message)), 0, reported=False)
        metadata = message.response_metadata or {}
        response = ChatResponse(
            message=openai_message, finish_reason=finish_reason(message), usage=usage,
            model=metadata.get("model_name") or request.model or self.model, backend=self.name,
            logprobs=metadata.get("logprobs") if isinstance(metadata.get("logprobs"), dict) else None,
        )
        if message.id:
            response.id = message.id
        return response


def _as_chunk(message: AIMessage) -> AIMessageChunk:
    """A whole AIMessage as the one AIMessageChunk it would have streamed, its tool calls indexed in order."""
    calls = [tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i)
             for i, c in enumerate(message.tool_calls)]
    calls += [tool_call_chunk(name=c.get("name"), args=c.get("args"), id=c.get("id"), index=len(calls) + i)
              for i, c in enumerate(message.invalid_tool_calls)]
    return AIMessageChunk(content=message.content, tool_call_chunks=calls, usage_metadata=message.usage_metadata,
                          response_metadata=message.response_metadata, id=message.id)


class _StreamState:
    """Turns a LangChain chunk stream into OpenAI chunks, keeping its usage for one final usage chunk."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.model = model
        self.created = int(time.time())
        self.usage: dict[str, int] | None = None
        self.started = False
        self.saw_tool_call = False
        self.saw_finish = False
        self.next_index = 0  # the OpenAI index the next tool call without one gets

    def convert(self, chunk: Any) -> list[dict[str, Any]]:
        if isinstance(chunk, AIMessage) and not isinstance(chunk, AIMessageChunk):
            # A model that does not stream (disable_streaming=True, no _stream): LangChain's stream() yields
            # its whole AIMessage; as a chunk (tool calls become tool-call chunks), not dropped.
            chunk = _as_chunk(chunk)
        if not isinstance(chunk, AIMessageChunk):
            return []
        chunk = self._indexed(chunk)
        out = []
        if not self.started:
            self.started = True
            out.append({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                          "finish_reason": None}]})
        converted = openai_chunks_from_message_chunk(chunk, chunk_id=self.id, model=self.model, created=self.created)
        for item in converted:
            choice = item["choices"][0]
            self.saw_tool_call = self.saw_tool_call or bool(choice["delta"].get("tool_calls"))
            self.saw_finish = self.saw_finish or bool(choice["finish_reason"])
        out += converted
        if chunk.usage_metadata:  # LangChain splits usage over chunks; it adds up
            u = chunk.usage_metadata
            cached = (u.get("input_token_details") or {}).get("cache_read") or 0
            total = self.usage or {"prompt_tokens": 0, "completion_tokens": 0, "cached": 0}
            self.usage = {"prompt_tokens": total["prompt_tokens"] + u["input_tokens"],
                          "completion_tokens": total["completion_tokens"] + u["output_tokens"],
                          "cached": total["cached"] + cached}
        return out

    def _indexed(self, chunk: AIMessageChunk) -> AIMessageChunk:
        """`chunk` with an index on every tool-call chunk. A model that streams whole tool calls (ChatOllama:
        `AIMessageChunk(tool_calls=[...])`) leaves their index None; as index 0 each, the calls of one answer
        were glued into one (names and arguments concatenated) by whoever assembles the stream by index."""
        calls = []
        for call in chunk.tool_call_chunks:
            index = call.get("index")
            if index is None:
                call = {**call, "index": self.next_index}  # type: ignore[assignment]
                index = self.next_index
            self.next_index = max(self.next_index, index + 1)
            calls.append(call)
        if calls == list(chunk.tool_call_chunks):
            return chunk
        return chunk.model_copy(update={"tool_call_chunks": calls})

    def finish(self) -> list[dict[str, Any]]:
        out = []
        if not self.saw_finish:  # many chat models never say why they stopped
            out.append({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                        "choices": [{"index": 0, "delta": {},
                                     "finish_reason": "tool_calls" if self.saw_tool_call else "stop"}]})
        if self.usage is None:
            return out  # no reported usage: the pipeline counts the completion itself
        u = self.usage
        return out + [{"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [], "usage": {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                                          "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
                                          "prompt_tokens_details": {"cached_tokens": u["cached"]}}}]
