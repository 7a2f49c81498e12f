"""CtxkitChatModel: a LangChain chat model that sends every call through a ctxkit pipeline.

    model = CtxkitChatModel(pipeline=Pipeline(LlamaCppBackend(), stages=[...], ledger=Ledger("calls.jsonl")))
    model = CtxkitChatModel.wrap(ChatOpenAI(model="gpt-4o-mini"), stages=[...])   # any LangChain model
    chain = prompt | model | StrOutputParser()                                     # unchanged chains
    agent_model = model.bind_tools([search, calculator])

It is a full BaseChatModel: invoke/ainvoke, stream/astream (tool calls arrive as tool-call chunks),
batch, bind_tools and with_structured_output work as with any other chat model, and every call leaves
one record in the pipeline's ledger.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import ConfigDict, Field

from ctxkit.errors import CtxkitError, RequestError
from ctxkit.ledger import Ledger, PriceTable
from ctxkit.pipeline import Pipeline
from ctxkit.request import SAMPLING_PARAMS, TRANSPORT_OPTIONS, ChatRequest
from ctxkit.response import ChatResponse
from ctxkit.stage import Stage
from ctxkit.tokens import TokenCounter

from .backend import LangChainBackend, model_settings
from .errors import also_langchains
from .messages import (
    ORIGINALS_KEY,
    OriginalMessages,
    failed_tool_results,
    to_ai_message,
    to_message_chunk,
    to_openai_messages,
    to_openai_tool_choice,
    to_openai_tools,
    usage_metadata,
)

# Call kwargs that name ctxkit's own request fields rather than sampling parameters. The request's metadata
# is `ctxkit_metadata=` per call: LangChain's invoke/ainvoke/batch take a `metadata` of their own (the run's
# tracing metadata), so a `metadata=` call kwarg failed there with a TypeError (it reached only stream()).
_REQUEST_FIELDS = ("namespace", "conversation_id", "metadata", "ctxkit_metadata")


class CtxkitChatModel(BaseChatModel):
    """A LangChain chat model whose calls run through `pipeline` (its stages, backend and ledger).

    namespace / conversation_id: set on every request (override per call: `model.invoke(x, namespace=...)`).
    model_name: the model asked of the backend (None: the backend's own).
    temperature, max_tokens, stop, seed: default sampling parameters; call kwargs override them.
    timeout: seconds a call may take at the backend (BackendTimeoutError past it); call kwargs override it,
    and `extra_headers=` / `extra_query=` go to an HTTP backend's request, as with ChatOpenAI.
    """

    # extra="forbid": a ChatOpenAI-style setting this model lacks (top_p=, model_kwargs=) is an error, not dropped
    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True, extra="forbid")

    pipeline: Pipeline
    model_name: str | None = Field(default=None, alias="model")
    namespace: str = "default"
    conversation_id: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    stop: list[str] | str | None = None  # a string is one sequence, as ChatOpenAI takes it
    seed: int | None = None
    timeout: float | None = None  # seconds a call may take at the backend; per call: invoke(x, timeout=...)

    @classmethod
    def wrap(
        cls,
        chat_model: BaseChatModel,
        *,
        stages: Sequence[Stage] = (),
        ledger: Ledger | None = None,
        prices: PriceTable | None = None,
        counter: TokenCounter | None = None,
        context_window: int | None = None,
        **fields: Any,
    ) -> CtxkitChatModel:
        """Put ctxkit's `stages` in front of any LangChain chat model.

        counter: how that model counts tokens; tiktoken is used for OpenAI models, anything else needs one.
        context_window: the model's limit; default: what its LangChain profile says, else 128,000.
        """
        backend = LangChainBackend(chat_model, counter=counter, context_window=context_window)
        # The wrapped model's own settings are this model's defaults: the cache and the ledger see them.
        for key, value in model_settings(chat_model).items():
            if key in cls.model_fields:  # top_p is no setting of this model: the wrapped one applies its own
                fields.setdefault(key, value)
        return cls(pipeline=Pipeline(backend, stages, ledger=ledger, prices=prices), **fields)

    @property
    def _llm_type(self) -> str:
        return "ctxkit"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        # LangChain's own cache (set_llm_cache) keys answers by these: the settings that change an answer, and
        # the tenant, belong in them (as ChatOpenAI's hold its sampling settings).
        return {
            "model_name": self.model_name or self.pipeline.backend.model,
            "backend": self.pipeline.backend.name,
            "stages": [stage.name for stage in self.pipeline.stages],
            "namespace": self.namespace,
            **{key: getattr(self, key) for key in ("temperature", "max_tokens", "stop", "seed")
               if getattr(self, key) is not None},
        }

    def _resolve_model_profile(self) -> Any:
        # LangChain reads the window from the profile (SummarizationMiddleware's fractional triggers, agents):
        # the backend's own limit, over what a wrapped model's profile says of itself.
        backend = self.pipeline.backend
        profile: dict[str, Any] = {}
        if isinstance(backend, LangChainBackend) and isinstance(backend.chat_model.profile, dict):
            profile.update({k: v for k, v in backend.chat_model.profile.items() if k == "max_output_tokens"})
        window = getattr(backend, "context_window", None)
        if isinstance(window, int) and window > 0:
            profile["max_input_tokens"] = window
        return profile or None

    def _counter(self) -> Any:
        # The counter of the model this one asks for (`model=`): an OpenAI backend counts gpt-4 asked of a
        # gpt-4o backend with gpt-4's encoding, as the pipeline and the ledger do.
        backend = self.pipeline.backend
        counter_for = getattr(backend, "counter_for", None)
        return counter_for(self.model_name) if counter_for is not None else backend.counter

    def get_num_tokens(self, text: str) -> int:
        """Tokens in `text` as the backend counts them (LangChain's default is GPT-2's tokenizer)."""
        return self._counter().count_text(text)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """The prompt's tokens as the backend bills them (what `trim_messages(token_counter=model)` reads)."""
        return self._counter().count_prompt(to_openai_messages(messages), to_openai_tools(tools or ()))

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "ctxkit"
        params["ls_model_name"] = self.model_name or self.pipeline.backend.model
        return params

    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: Any = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer `tools` (BaseTool, functions, pydantic models or OpenAI schemas) on every call; `strict`
        as in LangChain's `convert_to_openai_tool`."""
        unknown = sorted(k for k in kwargs if k not in SAMPLING_PARAMS and k not in _REQUEST_FIELDS
                         and k not in TRANSPORT_OPTIONS and not k.startswith("ls_"))
        if unknown:  # refused here, where the mistake is, rather than on the first call
            raise RequestError(f"unsupported argument(s): {', '.join(unknown)}", "CtxkitChatModel.bind_tools")
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=to_openai_tools(tools, strict=strict), **kwargs)

    def with_structured_output(
        self,
        schema: Any,
        *,
        include_raw: bool = False,
        method: str = "function_calling",
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """As ChatOpenAI's: method "function_calling" (a forced tool call), "json_schema" (response_format
        json_schema: the local model is held to the schema by grammar) or "json_mode" (any JSON object)."""
        if method not in ("function_calling", "json_schema", "json_mode"):
            raise ValueError(f"Unrecognized method argument {method!r}: expected 'function_calling', "
                             "'json_schema' or 'json_mode'")
        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
        from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
        from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
        from langchain_core.utils.pydantic import is_basemodel_subclass

        is_model = isinstance(schema, type) and is_basemodel_subclass(schema)
        parser: Runnable[Any, Any]
        if method == "function_calling":
            if schema is None:
                raise ValueError("method='function_calling' needs a schema")
            # LangChain's base implementation drops `strict`: the tool went without it (ChatOpenAI sends it)
            llm: Runnable[Any, Any] = self.bind_tools(
                [schema], tool_choice="any", strict=strict,
                ls_structured_output_format={"kwargs": {"method": method, "strict": strict}, "schema": schema})
            parser = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_model else
                      JsonOutputKeyToolsParser(key_name=convert_to_openai_tool(schema)["function"]["name"],
                                               first_tool_only=True))
            return _with_raw(llm, parser, include_raw)
        if method == "json_mode":
            response_format: dict[str, Any] = {"type": "json_object"}
        else:
            if schema is None:
                raise ValueError("method='json_schema' needs a schema")
            json_schema = convert_to_json_schema(schema)
            spec: dict[str, Any] = {"name": json_schema.get("title") or "response", "schema": json_schema}
            if strict is not None:
                spec["strict"] = strict
            response_format = {"type": "json_schema", "json_schema": spec}
        llm = self.bind(response_format=response_format,
                        ls_structured_output_format={"kwargs": {"method": method, "strict": strict}, "schema": schema})
        parser = PydanticOutputParser(pydantic_object=schema) if is_model else JsonOutputParser()
        return _with_raw(llm, parser, include_raw)

    # -- request building ---------------------------------------------------------------------------
    def _request(self, messages: list[BaseMessage], stop: list[str] | None, stream: bool,
                 kwargs: dict[str, Any]) -> ChatRequest:
        kwargs = dict(kwargs)
        kwargs.pop("stream", None)  # LangChain's own switch between invoke and stream, already decided
        params: dict[str, Any] = {}
        for key in ("temperature", "max_tokens", "seed"):
            if getattr(self, key) is not None:
                params[key] = getattr(self, key)
        stops = stop or self.stop
        if stops:  # a single sequence as a string (as OpenAI takes it), not one stop per character
            params["stop"] = [stops] if isinstance(stops, str) else list(stops)
        tools = kwargs.pop("tools", None) or ()
        if kwargs.get("tool_choice") is not None:
            kwargs["tool_choice"] = to_openai_tool_choice(kwargs["tool_choice"])
        # a field given as None is left unset (an app's optional conversation id), not an unknown argument
        fields = {key: value for key in _REQUEST_FIELDS if (value := kwargs.pop(key, None)) is not None}
        if "ctxkit_metadata" in fields:
            fields["metadata"] = {**(fields.get("metadata") or {}), **fields.pop("ctxkit_metadata")}
        # The openai client's per-call options, as ChatOpenAI takes them: `invoke(x, timeout=5, extra_headers=...)`.
        transport = {key: kwargs.pop(key) for key in TRANSPORT_OPTIONS if key in kwargs}
        transport = {key: value for key, value in transport.items() if value is not None}
        if "timeout" not in transport and self.timeout is not None:
            transport["timeout"] = self.timeout
        unknown = []
        for key, value in kwargs.items():
            if key in SAMPLING_PARAMS:
                if value is not None:
                    params[key] = value
            elif not key.startswith("ls_"):  # ls_*: LangSmith tracing hints, not for the model
                unknown.append(key)
        if unknown:
            raise RequestError(f"unsupported argument(s): {', '.join(sorted(unknown))}", "CtxkitChatModel")
        openai_messages = to_openai_messages(messages)
        metadata = failed_tool_results(messages, openai_messages, dict(fields.get("metadata") or {}))
        if isinstance(self.pipeline.backend, LangChainBackend):
            # A wrapped LangChain model gets the caller's own message objects where no stage changed them.
            metadata[ORIGINALS_KEY] = OriginalMessages(messages, openai_messages)
        return ChatRequest(
            messages=openai_messages,
            tools=to_openai_tools(tools),
            params=params,
            model=self.model_name,
            stream=stream,
            namespace=fields.get("namespace", self.namespace),
            conversation_id=fields.get("conversation_id", self.conversation_id),
            metadata=metadata,
            **transport,
        )

    @staticmethod
    def _result(response: ChatResponse) -> ChatResult:
        message = to_ai_message(response)
        return ChatResult(
            generations=[ChatGeneration(message=message, generation_info={"finish_reason": response.finish_reason})],
            llm_output={"model_name": response.model, "token_usage": _token_usage(message)},
        )

    # -- the four entry points LangChain calls ------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        try:
            result = self.pipeline.call(self._request(messages, stop, False, kwargs))
        except CtxkitError as exc:
            also_langchains(exc)
            raise
        assert isinstance(result, ChatResponse)
        return self._result(result)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        try:
            result = await self.pipeline.acall(self._request(messages, stop, False, kwargs))
        except CtxkitError as exc:
            also_langchains(exc)
            raise
        assert isinstance(result, ChatResponse)
        return self._result(result)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        try:
            yield from self._chunks(self.pipeline.call(self._request(messages, stop, True, kwargs)), run_manager)
        except CtxkitError as exc:
            also_langchains(exc)
            raise

    @staticmethod
    def _chunks(stream: Any, run_manager: CallbackManagerForLLMRun | None) -> Iterator[ChatGenerationChunk]:
        assert not isinstance(stream, ChatResponse)
        saw_usage = False
        for chunk in stream:
            message = to_message_chunk(chunk, from_cache=stream.answered_by is not None)
            if message is None:
                continue
            saw_usage = saw_usage or message.usage_metadata is not None
            generation = ChatGenerationChunk(message=message)
            if run_manager is not None and message.content:
                run_manager.on_llm_new_token(message.text, chunk=generation)
            yield generation
        closing = _closing_usage(stream, saw_usage)
        if closing is not None:
            yield closing

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        try:
            stream = await self.pipeline.acall(self._request(messages, stop, True, kwargs))
            assert not isinstance(stream, ChatResponse)
            saw_usage = False
            async for chunk in stream:
                message = to_message_chunk(chunk, from_cache=stream.answered_by is not None)
                if message is None:
                    continue
                saw_usage = saw_usage or message.usage_metadata is not None
                generation = ChatGenerationChunk(message=message)
                if run_manager is not None and message.content:
                    await run_manager.on_llm_new_token(message.text, chunk=generation)
                yield generation
            closing = _closing_usage(stream, saw_usage)
            if closing is not None:
                yield closing
        except CtxkitError as exc:
            also_langchains(exc)
            raise


def _with_raw(llm: Runnable[Any, Any], parser: Runnable[Any, Any], include_raw: bool) -> Runnable[Any, Any]:
    """`llm | parser`, or with include_raw the raw message beside the parsed one (None and the error if it failed)."""
    if not include_raw:
        return llm | parser
    from operator import itemgetter

    from langchain_core.runnables import RunnableMap, RunnablePassthrough

    parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
    fallback = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")


def _closing_usage(stream: Any, saw_usage: bool) -> ChatGenerationChunk | None:
    """The usage the pipeline counted for a stream whose backend streamed none (a wrapped model that reports
    no usage when streaming, an OpenAI-compatible server that ignores include_usage), as ctxkit's OpenAI client
    and `ctxkit serve` close such a stream: without it, invoke() had usage_metadata and stream() had none."""
    response = getattr(stream, "response", None)
    if response is None:
        return None
    # Where invoke() says which backend answered and whether a stage (the cache) did: a stream said neither.
    metadata: dict[str, Any] = {"ctxkit_backend": response.backend, "ctxkit_answered_by": response.answered_by}
    if saw_usage:
        return ChatGenerationChunk(message=AIMessageChunk(content="", response_metadata=metadata, id=response.id))
    usage = usage_metadata(response.call_usage or response.usage, from_cache=response.answered_by is not None)
    return ChatGenerationChunk(message=AIMessageChunk(  # named as a usage chunk is: usage callbacks key by model
        content="", usage_metadata=usage, response_metadata={"model_name": response.model, **metadata},
        id=response.id))


def _token_usage(message: AIMessage) -> dict[str, Any]:
    """The message's usage in OpenAI's `usage` form (llm_output's token_usage, read by older callbacks)."""
    usage: dict[str, Any] = dict(message.usage_metadata or {})
    return {"prompt_tokens": usage.get("input_tokens", 0), "completion_tokens": usage.get("output_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0),
            "prompt_tokens_details": {"cached_tokens": (usage.get("input_token_details") or {}).get("cache_read", 0)}}
