"""CtxkitMiddleware: ctxkit's stages inside a LangChain v1 agent (`create_agent`) loop.

    agent = create_agent(model, tools=[...], middleware=[CtxkitMiddleware(stages=[...], ledger=ledger)])

On every model call of the loop, the agent's ModelRequest (system message, messages, tools, tool choice,
model settings) becomes a ctxkit ChatRequest and runs through the stages, exactly as in a Pipeline; the
stage chain ends in the agent's own handler, called with `request.override(...)` carrying what the
stages kept. The agent's model does the I/O, so tools stay the agent's BaseTool objects (matched back by
name) and every message a stage left untouched is handed on as the very same LangChain object. One
ledger record is written per model call.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain.agents.middleware.types import ExtendedModelResponse
from langchain_core.messages import AIMessage, BaseMessage, SystemMessage
from langchain_core.utils.function_calling import convert_to_openai_tool

from ctxkit.errors import BackendError, ConfigurationError, CtxkitError
from ctxkit.ledger import Ledger, PriceTable
from ctxkit.pipeline import Pipeline, check_stages_and_ledger
from ctxkit.request import SAMPLING_PARAMS, ChatRequest
from ctxkit.response import ChatResponse, Usage
from ctxkit.settings import whole_number
from ctxkit.stage import Stage
from ctxkit.tokens import TokenCounter

from .backend import chat_model_name, counter_for, model_settings, profile_context_window
from .errors import also_langchains
from .messages import (
    OriginalMessages,
    ai_message_to_openai,
    countable,
    failed_tool_results,
    finish_reason,
    to_ai_message,
    to_langchain_tool_choice,
    to_openai_messages,
    to_openai_tool_choice,
    usage_from_ai_message,
)

UNLIMITED_CONTEXT = sys.maxsize  # without a stated window, the agent's model is the judge of what fits


@dataclasses.dataclass
class _Translated:
    """An agent ModelRequest in ctxkit's terms, with what is needed to map the stages' edits back."""

    chat: ChatRequest
    originals: OriginalMessages  # the agent's own messages, found again by their OpenAI form
    tools_by_name: dict[str, tuple[Any, dict[str, Any]]]  # name -> (the agent's tool object, its schema)
    passthrough_tools: list[Any]  # provider built-in tools: no schema for ctxkit to see


class _HandlerBackend:
    """The end of the stage chain: the agent's model handler, in the shape of a ctxkit Backend."""

    name = "langchain-agent"

    def __init__(self, request: ModelRequest, translated: _Translated, counter: TokenCounter,
                 context_window: int) -> None:
        self.request = request
        self.translated = translated
        self.counter = counter
        self.context_window = context_window
        self.model = chat_model_name(request.model)
        self.handler: Callable[[ModelRequest], Any] | None = None
        self.ahandler: Callable[[ModelRequest], Awaitable[Any]] | None = None
        # responses this backend produced, by id -> (the handler's own result, the message as converted);
        # by id, not identity: a stage's after_model may return an edited copy of the response
        self.produced: dict[str, tuple[Any, dict[str, Any]]] = {}

    def complete(self, chat: ChatRequest) -> ChatResponse:
        assert self.handler is not None
        return self._response(self.handler(self._model_request(chat)), chat)

    async def acomplete(self, chat: ChatRequest) -> ChatResponse:
        assert self.ahandler is not None
        return self._response(await self.ahandler(self._model_request(chat)), chat)

    def stream(self, chat: ChatRequest) -> Iterator[dict[str, Any]]:
        raise ConfigurationError("an agent's model call is never a stream through ctxkit's middleware")

    def astream(self, chat: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        raise ConfigurationError("an agent's model call is never a stream through ctxkit's middleware")

    def close(self) -> None:
        pass

    def _model_request(self, chat: ChatRequest) -> ModelRequest:
        """The agent's request carrying what the stages passed on; the same object if they changed nothing."""
        original = self.translated.chat
        changes: dict[str, Any] = {}
        # By value, not identity: the pipeline hands its stages their own copy of the messages and tools, so a
        # request no stage changed arrives as an equal list, never the same one. Rebuilt, a message the OpenAI
        # form splits (a HumanMessage's tool_result blocks) reached the model as other messages.
        if list(chat.messages) != list(original.messages):
            system, messages = self._messages(chat.messages)
            changes["system_message"] = system
            changes["messages"] = messages
        if list(chat.tools) != list(original.tools):
            changes["tools"] = [self._tool(schema) for schema in chat.tools] + self.translated.passthrough_tools
        if chat.params != original.params:
            settings = {k: v for k, v in self.request.model_settings.items() if k not in SAMPLING_PARAMS}
            # the model's own settings (read off it as defaults) stay the model's: sent again as call arguments,
            # a model that takes none (ChatOllama) fails
            own = model_settings(self.request.model)
            settings.update({k: v for k, v in chat.params.items() if k != "tool_choice" and own.get(k, ...) != v})
            changes["model_settings"] = settings
            if chat.params.get("tool_choice") != original.params.get("tool_choice"):
                changes["tool_choice"] = to_langchain_tool_choice(
                    chat.params.get("tool_choice"), () if self.translated.passthrough_tools else chat.tools)
        return self.request.override(**changes) if changes else self.request

    def _tool(self, schema: dict[str, Any]) -> Any:
        """The agent's own tool object when a stage kept it as it was; the edited schema otherwise (the
        agent binds schema dicts as they are and still runs the call by name with its own tool)."""
        name = schema["function"]["name"]
        known = self.translated.tools_by_name.get(name)
        if known is None:
            from ctxkit.stages.tools import FIND_TOOLS

            if name == FIND_TOOLS:  # ToolRetrievalStage's search tool: the stage answers its calls itself
                return schema
            # e.g. a ToolRetrievalStage's registered catalog: the agent would get a call it has no tool to run
            # (its loop ends on it, or the next model call fails on a tool call without a result)
            raise ConfigurationError(
                f"a stage offered tool {name!r}, which the agent does not have: inside an agent, give the tools "
                "to create_agent(tools=...) and let ToolRetrievalStage select from them (no catalog)")
        return known[0] if known[1] == schema else schema

    def _messages(self, messages: Sequence[dict[str, Any]]) -> tuple[SystemMessage | None, list[BaseMessage]]:
        out = self.translated.originals.restore(messages)
        system = None
        if out and isinstance(out[0], SystemMessage):
            system, out = out[0], out[1:]
        return system, out

    def _response(self, result: Any, chat: ChatRequest) -> ChatResponse:
        model_response = result.model_response if hasattr(result, "model_response") else result
        if isinstance(model_response, AIMessage):
            message = model_response
        else:
            messages = [m for m in getattr(model_response, "result", []) if isinstance(m, AIMessage)]
            if not messages:
                raise BackendError("the agent's model returned no AIMessage", backend=self.name)
            message = messages[-1]
        openai_message = ai_message_to_openai(message)
        usage = usage_from_ai_message(message)
        if usage is None:
            usage = Usage(self.counter.count_prompt(chat.messages, chat.tools),
                          self.counter.count_completion(countable(openai_message)), 0, reported=False)
        metadata = message.response_metadata or {}
        response = ChatResponse(
            message=openai_message,
            finish_reason=finish_reason(message),
            usage=usage, model=metadata.get("model_name") or self.model, backend=self.name,
        )
        self.produced[response.id] = (result, dict(openai_message))
        return response

    def agent_result(self, response: ChatResponse) -> Any:
        """What the middleware returns to the agent: the handler's own result when no stage changed the
        answer; with an edited answer, that result with its AIMessage replaced (the structured response,
        the structured-output tool message and any command are the agent's and stay)."""
        produced = self.produced.get(response.id)
        if produced is None:
            if self.request.response_format is not None:
                raise ConfigurationError(
                    f"stage {response.answered_by!r} answered a call of an agent with a response_format; only the "
                    "agent's own model call yields its structured response: skip calls whose "
                    "metadata has structured_output=True")
            return ModelResponse(result=[to_ai_message(response)])
        result, message = produced
        if message == response.message:
            return result
        return _with_answer(result, to_ai_message(response))


def _with_answer(result: Any, answer: AIMessage) -> Any:
    """The handler's result with its (last) AIMessage replaced by `answer`, keeping that message's name."""
    if isinstance(result, AIMessage):
        return answer.model_copy(update={"name": result.name})
    if isinstance(result, ExtendedModelResponse):
        return dataclasses.replace(result, model_response=_with_answer(result.model_response, answer))
    messages = list(result.result)
    last = max(i for i, m in enumerate(messages) if isinstance(m, AIMessage))
    messages[last] = answer.model_copy(update={"name": messages[last].name})
    return dataclasses.replace(result, result=messages)


class CtxkitMiddleware(AgentMiddleware):
    """Applies ctxkit stages to each model call of a LangChain v1 agent, writing one ledger record per call.

    stages:         the ctxkit stages, in order (the same objects a Pipeline takes).
    counter:        how the agent's model counts tokens; default: tiktoken for OpenAI models, the pipeline's
                    counter for a CtxkitChatModel, otherwise required.
    context_window: the model's limit; requests the stages cannot fit under it fail before the model call.
                    Default: what the model's LangChain profile says (`max_input_tokens`), else no limit.
    namespace:      tenant for stateful stages; conversation_id defaults to the LangGraph thread_id.
    """

    def __init__(
        self,
        stages: Sequence[Stage] = (),
        *,
        ledger: Ledger | None = None,
        prices: PriceTable | None = None,
        counter: TokenCounter | None = None,
        context_window: int | None = None,
        namespace: str = "default",
        conversation_id: str | None = None,
    ) -> None:
        super().__init__()
        # Checked here, once, as Pipeline checks them, rather than on the first model call (a ledger given as a
        # path, a stage class); and a window of 0 meant no limit at all, -1 refused every call.
        check_stages_and_ledger(stages, ledger, prices)
        if context_window is not None:
            context_window = whole_number(context_window, "context_window (None: the model's profile)", minimum=1)
        self.stages = list(stages)
        self.ledger = ledger if ledger is not None else Ledger()
        self.prices = prices if prices is not None else PriceTable()
        self.counter = counter
        self.context_window = context_window
        self.namespace = namespace
        self.conversation_id = conversation_id

    @classmethod
    def from_pipeline(cls, pipeline: Pipeline, **options: Any) -> CtxkitMiddleware:
        """The stages, ledger, prices and counter of an existing pipeline, applied inside an agent."""
        options.setdefault("counter", pipeline.backend.counter)
        options.setdefault("context_window", pipeline.backend.context_window)
        return cls(pipeline.stages, ledger=pipeline.ledger, prices=pipeline.prices, **options)

    @property
    def name(self) -> str:
        return "ctxkit"

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], Any]) -> Any:
        backend, pipeline, chat = self._prepare(request)
        backend.handler = handler
        try:
            result = pipeline.call(chat)
        except CtxkitError as exc:  # as CtxkitChatModel does: LangChain's retry/fallback read its class
            also_langchains(exc)
            raise
        assert isinstance(result, ChatResponse)
        return backend.agent_result(result)

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[Any]]
    ) -> Any:
        backend, pipeline, chat = self._prepare(request)
        backend.ahandler = handler
        try:
            result = await pipeline.acall(chat)
        except CtxkitError as exc:
            also_langchains(exc)
            raise
        assert isinstance(result, ChatResponse)
        return backend.agent_result(result)

    # -- helpers ------------------------------------------------------------------------------------
    def _prepare(self, request: ModelRequest) -> tuple[_HandlerBackend, Pipeline, ChatRequest]:
        inner = getattr(request.model, "pipeline", None)
        if isinstance(inner, Pipeline) and inner.ledger is self.ledger:
            # `from_pipeline(p)` on an agent whose model is CtxkitChatModel(pipeline=p): both wrote a record for
            # the one model call, so `ctxkit report` counted its tokens and cost twice.
            raise ConfigurationError(
                "the agent's model is a CtxkitChatModel writing to this middleware's ledger: every model call "
                "would be recorded twice; give the middleware its own ledger, or use the model without it")
        translated = self._translate(request)
        counter = self._counter(request)
        window = self.context_window or profile_context_window(request.model) or UNLIMITED_CONTEXT
        output_tools = _structured_output_tools(request)
        if output_tools:
            counter = _WithOutputTools(counter, output_tools)
        backend = _HandlerBackend(request, translated, counter, window)
        # A pipeline per call: the stages and ledger are shared, the terminal is this call's handler.
        pipeline = Pipeline(backend, self.stages, ledger=self.ledger, prices=self.prices)
        return backend, pipeline, translated.chat

    def _counter(self, request: ModelRequest) -> TokenCounter:
        if self.counter is not None:
            return self.counter
        inner = getattr(request.model, "pipeline", None)
        if isinstance(inner, Pipeline):  # a CtxkitChatModel: count as its backend does
            return inner.backend.counter
        return counter_for(request.model, None)

    def _translate(self, request: ModelRequest) -> _Translated:
        lc_messages: list[BaseMessage] = list(request.messages)
        if request.system_message is not None:
            lc_messages.insert(0, request.system_message)
        messages = to_openai_messages(lc_messages)
        originals = OriginalMessages(lc_messages, messages)
        tools, by_name, passthrough = [], {}, []
        for tool in request.tools:
            if isinstance(tool, dict) and tool.get("type") not in (None, "function"):
                passthrough.append(tool)  # e.g. a provider's built-in web search
                continue
            schema = convert_to_openai_tool(tool)
            tools.append(schema)
            by_name[schema["function"]["name"]] = (tool, schema)
        # The model's own settings (ChatOpenAI(temperature=0)) under the call's model_settings: without them
        # every call looked sampled to the cache (never cached) and its key missed what the model was set to.
        params = model_settings(request.model)
        params.update({k: v for k, v in request.model_settings.items() if k in SAMPLING_PARAMS and v is not None})
        if request.tool_choice is not None:
            params["tool_choice"] = to_openai_tool_choice(request.tool_choice)
        # An answer from the cache would reach the agent without the structured response its own model
        # call parses: structured-output calls are neither answered from it nor stored in it.
        metadata = {"cache": False, "structured_output": True} if request.response_format is not None else {}
        metadata = failed_tool_results(lc_messages, messages, metadata)
        chat = ChatRequest(
            messages=messages, tools=tools, params=params, model=chat_model_name(request.model),
            namespace=self.namespace, conversation_id=self.conversation_id or _thread_id(), metadata=metadata,
        )
        return _Translated(chat, originals, by_name, passthrough)


def _structured_output_tools(request: ModelRequest) -> list[dict[str, Any]]:
    """The tools the agent binds for its structured response (a ToolStrategy, or an AutoStrategy the model
    answers with a tool): added after this middleware ran, yet sent to the model and billed with the prompt."""
    from langchain.agents.structured_output import (
        AutoStrategy,
        OutputToolBinding,
        ProviderStrategy,
        ToolStrategy,
    )

    strategy: Any = request.response_format
    if strategy is None or isinstance(strategy, ProviderStrategy):
        return []
    if not isinstance(strategy, (AutoStrategy, ToolStrategy)):
        strategy = AutoStrategy(schema=strategy)  # a bare schema, as the agent reads it
    if isinstance(strategy, AutoStrategy):
        try:  # the agent's own choice between the provider's structured output and a tool
            from langchain.agents.factory import _supports_provider_strategy

            if _supports_provider_strategy(request.model, tools=request.tools):
                return []
        except ImportError:
            pass
        strategy = ToolStrategy(strategy.schema)
    return [convert_to_openai_tool(OutputToolBinding.from_schema_spec(spec).tool) for spec in strategy.schema_specs]


class _WithOutputTools:
    """An agent's counter that counts its structured-output tools in every prompt."""

    def __init__(self, counter: TokenCounter, tools: list[dict[str, Any]]) -> None:
        self.counter, self.tools = counter, tools

    def count_text(self, text: str) -> int:
        return self.counter.count_text(text)

    def count_prompt(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()) -> int:
        return self.counter.count_prompt(messages, [*tools, *self.tools])

    def count_completion(self, message: dict[str, Any]) -> int:
        return self.counter.count_completion(message)


def _thread_id() -> str | None:
    """The LangGraph thread the agent runs in, as the ledger's conversation id."""
    try:
        from langgraph.config import get_config

        thread = (get_config().get("configurable") or {}).get("thread_id")
    except (ImportError, RuntimeError):
        return None
    return str(thread) if thread is not None else None
