"""CtxkitMiddleware inside a real LangChain v1 `create_agent` loop on the embedded model: the stages' edits
reach the model, tools still run, one ledger record per model call with the right arithmetic."""

from __future__ import annotations

import asyncio

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool

from adapters.langchain import CtxkitChatModel, CtxkitMiddleware
from ctxkit import ConfigurationError, Ledger, Pipeline, Stage


@tool
def get_weather(city: str) -> str:
    """Look up the current weather for a city: temperature and conditions, from the national weather service."""
    return f"Sunny, 21 C in {city}"


@tool
def add(a: int, b: int) -> int:
    """Add two integers and return their exact sum, for any arithmetic question the user asks."""
    return a + b


TOOLS = {"get_weather": get_weather, "add": add}


class ShortenToolDescriptions(Stage):
    """A test stage with a measurable effect on tools: descriptions cut to 20 characters."""

    def before_model(self, request):
        return request.override(tools=[
            {**t, "function": {**t["function"], "description": t["function"].get("description", "")[:20]}}
            for t in request.tools
        ])


class CallAToolFirst(AgentMiddleware):
    """Makes the loop deterministic for a 135M model: the first call must use a tool, the next answers
    in a few words with no tools offered."""

    def _adjust(self, request):
        if any(isinstance(m, ToolMessage) for m in request.messages):
            return request.override(tools=[], model_settings={"max_tokens": 6})
        return request.override(tool_choice="any", model_settings={"max_tokens": 40})

    def wrap_model_call(self, request, handler):
        return handler(self._adjust(request))

    async def awrap_model_call(self, request, handler):
        return await handler(self._adjust(request))


@pytest.fixture
def agent_parts(llama_backend):
    model_ledger, agent_ledger = Ledger(), Ledger()
    model = CtxkitChatModel(pipeline=Pipeline(llama_backend, ledger=model_ledger), temperature=0, seed=1)
    ctxkit = CtxkitMiddleware([ShortenToolDescriptions()], ledger=agent_ledger, namespace="agents")
    agent = create_agent(model, tools=list(TOOLS.values()), system_prompt="You are a helpful assistant.",
                         middleware=[CallAToolFirst(), ctxkit])
    return agent, agent_ledger, model_ledger


def _check_loop(messages, agent_ledger, model_ledger, thread_id):
    human, call, result, answer = messages  # one tool round, then the answer
    assert isinstance(human, HumanMessage) and isinstance(answer, AIMessage)
    [tool_call] = call.tool_calls
    assert tool_call["name"] in TOOLS, f"called a tool that was never offered: {tool_call}"
    assert set(tool_call["args"]) == set(TOOLS[tool_call["name"]].args)
    assert isinstance(result, ToolMessage) and result.tool_call_id == tool_call["id"]
    assert result.content == str(TOOLS[tool_call["name"]].invoke(tool_call["args"]))  # the real tool ran

    first, second = agent_ledger.records
    assert all(r.backend == "langchain-agent" and r.namespace == "agents" for r in (first, second))
    assert first.conversation_id == thread_id
    for record in (first, second):
        assert record.tokens_naive - record.tokens_sent == sum(record.saved_by_stage.values())
    assert first.saved_by_stage["shorten_tool_descriptions"] > 0  # the tool descriptions were cut
    assert second.saved_by_stage["shorten_tool_descriptions"] == 0  # no tools offered: nothing to cut
    # What the middleware sent is exactly what the model's own pipeline received: the edit reached the model.
    assert [r.tokens_naive for r in model_ledger.records] == [first.tokens_sent, second.tokens_sent]
    assert first.tokens_out == model_ledger.records[0].tokens_out


def test_the_middleware_applies_stages_inside_a_create_agent_loop(agent_parts):
    agent, agent_ledger, model_ledger = agent_parts
    out = agent.invoke({"messages": [{"role": "user", "content": "What is the weather in Paris?"}]},
                       {"configurable": {"thread_id": "thread-7"}})
    _check_loop(out["messages"], agent_ledger, model_ledger, "thread-7")


def test_the_middleware_works_in_async_agent_runs(llama_backend):
    # One model call (tools offered, none to be called), to keep the async run short on a 135M model.
    class AnswerDirectly(AgentMiddleware):
        async def awrap_model_call(self, request, handler):
            return await handler(request.override(tool_choice="none", model_settings={"max_tokens": 4}))

    model_ledger, agent_ledger = Ledger(), Ledger()
    model = CtxkitChatModel(pipeline=Pipeline(llama_backend, ledger=model_ledger), temperature=0, seed=1)
    agent = create_agent(model, tools=list(TOOLS.values()), middleware=[
        AnswerDirectly(), CtxkitMiddleware([ShortenToolDescriptions()], ledger=agent_ledger)])
    out = asyncio.run(agent.ainvoke({"messages": [{"role": "user", "content": "Hello!"}]}))
    assert isinstance(out["messages"][-1], AIMessage) and not out["messages"][-1].tool_calls
    [record] = agent_ledger.records
    assert record.saved_by_stage["shorten_tool_descriptions"] > 0
    assert record.tokens_naive - record.tokens_sent == record.saved_by_stage["shorten_tool_descriptions"]
    assert [r.tokens_naive for r in model_ledger.records] == [record.tokens_sent]


def test_duplicate_stage_names_are_refused_up_front():
    with pytest.raises(ConfigurationError, match="unique"):
        CtxkitMiddleware([ShortenToolDescriptions(), ShortenToolDescriptions()])


@pytest.mark.parametrize("stages, options, named", [
    # each was taken here and failed the agent's first model call, or (a window of 0) meant no limit at all
    ([ShortenToolDescriptions], {}, r"stages\[0\] must be a Stage instance, got the class ShortenToolDescriptions"),
    ([], {"ledger": "calls.jsonl"}, r"ledger must be a Ledger, got str: pass Ledger\('calls.jsonl'\)"),
    ([], {"prices": "prices.json"}, "prices must be a PriceTable"),
    ([], {"context_window": 0}, "context_window .*got 0"),
    ([], {"context_window": -1}, "context_window .*got -1"),
    ([], {"context_window": "4096"}, "context_window .*got '4096'"),
    ([], {"context_window": True}, "context_window .*got True"),
])
def test_wrong_parts_and_settings_are_refused_up_front(stages, options, named):
    with pytest.raises(ConfigurationError, match=named):
        CtxkitMiddleware(stages, **options)


def test_a_structured_output_agent_keeps_its_structured_response_when_a_stage_edits_the_answer(llama_backend):
    """The agent parses structured output inside its model handler; an answer a stage edited used to come
    back without it (and without the agent's name), so the agent looped on an unanswered tool call."""
    import dataclasses

    from langchain.agents.structured_output import ToolStrategy
    from pydantic import BaseModel

    class Weather(BaseModel):
        city: str

    seen = []

    class StampAnswer(Stage):
        def before_model(self, request):
            seen.append(dict(request.metadata))
            return request

        def after_model(self, request, response):
            return dataclasses.replace(response, message={**response.message, "content": "[checked]"})

    class UseATool(AgentMiddleware):
        def wrap_model_call(self, request, handler):
            return handler(request.override(tool_choice="any", model_settings={"max_tokens": 40}))

    inner = Ledger()  # what the model was really sent: the agent binds the Weather tool after the middleware
    model = CtxkitChatModel(pipeline=Pipeline(llama_backend, ledger=inner), temperature=0, seed=1)
    ledger = Ledger()
    agent = create_agent(model, tools=[], response_format=ToolStrategy(Weather), name="forecaster",
                         middleware=[UseATool(), CtxkitMiddleware([StampAnswer()], ledger=ledger)])
    out = agent.invoke({"messages": [HumanMessage("What is the weather in Paris?")]})
    assert isinstance(out["structured_response"], Weather)
    human, answer, returned = out["messages"]
    assert answer.content == "[checked]" and answer.name == "forecaster"
    assert isinstance(returned, ToolMessage) and returned.tool_call_id == answer.tool_calls[0]["id"]
    assert seen == [{"cache": False, "structured_output": True}], "a cached answer has no structured response"
    assert [r.status for r in ledger.records] == ["ok"]
    assert ledger.records[0].tokens_sent == inner.records[0].tokens_sent, "the structured-output tool is counted"


def test_a_stage_answering_a_structured_output_call_is_a_clear_error(llama_backend):
    from langchain.agents.structured_output import ToolStrategy
    from pydantic import BaseModel

    from ctxkit import ChatResponse, ConfigurationError, Usage

    class Weather(BaseModel):
        city: str

    class AnswersItself(Stage):
        def wrap_call(self, request, call_next):
            return ChatResponse(message={"role": "assistant", "content": "sunny"}, finish_reason="stop",
                                usage=Usage(0, 0), model="m", backend="stage")

    model = CtxkitChatModel(pipeline=Pipeline(llama_backend, ledger=Ledger()), temperature=0)
    agent = create_agent(model, tools=[], response_format=ToolStrategy(Weather),
                         middleware=[CtxkitMiddleware([AnswersItself()])])
    with pytest.raises(ConfigurationError, match="answers_itself.*response_format"):
        agent.invoke({"messages": [HumanMessage("Weather in Paris?")]})


def test_a_provider_strategy_agent_with_tools_gets_its_json_from_the_local_model(llama_backend):
    """response_format was constrained only when no tools were offered: with the agent's tools bound the
    model answered free text, and ProviderStrategy failed with StructuredOutputValidationError."""
    from langchain.agents.structured_output import ProviderStrategy
    from pydantic import BaseModel

    class Weather(BaseModel):
        city: str

    model = CtxkitChatModel(pipeline=Pipeline(llama_backend, ledger=Ledger()), temperature=0, seed=1, max_tokens=40)
    ledger = Ledger()
    agent = create_agent(model, tools=list(TOOLS.values()), response_format=ProviderStrategy(Weather),
                         middleware=[CtxkitMiddleware([], ledger=ledger)])
    out = agent.invoke({"messages": [HumanMessage("What is the weather in Paris?")]}, {"recursion_limit": 8})
    assert isinstance(out["structured_response"], Weather)
    assert all(r.status == "ok" for r in ledger.records)


def test_a_stage_offering_a_tool_the_agent_cannot_run_is_a_clear_error(llama_backend):
    """A ToolRetrievalStage catalog inside an agent with no tools: the model called a catalog tool the agent
    could not run, and the loop died on the next call ('got no tool result') or ended on the unrun call."""
    from langchain.agents.structured_output import ToolStrategy
    from pydantic import BaseModel

    from ctxkit import ConfigurationError

    class Weather(BaseModel):
        city: str

    class OffersACatalogTool(Stage):
        def before_model(self, request):
            return request.override(tools=[{"type": "function", "function": {
                "name": "lookup", "description": "Look something up.",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}])

    model = CtxkitChatModel(pipeline=Pipeline(llama_backend, ledger=Ledger()), temperature=0, max_tokens=30)
    ledger = Ledger()
    agent = create_agent(model, tools=[], response_format=ToolStrategy(Weather),
                         middleware=[CtxkitMiddleware([OffersACatalogTool()], ledger=ledger)])
    with pytest.raises(ConfigurationError, match="'lookup', which the agent does not have"):
        agent.invoke({"messages": [HumanMessage("What is the weather in Paris?")]})
    assert [r.status for r in ledger.records] == ["error"]


def test_an_overflow_in_the_middleware_is_langchains_own_and_not_retried(llama_backend):
    """The middleware raised ctxkit's classes only: LangChain's ModelRetryMiddleware retried an overflow that
    can never fit, three times (CtxkitChatModel already gave its errors LangChain's classes too)."""
    from langchain.agents.middleware import ModelRetryMiddleware
    from langchain_core import exceptions as lc

    model = CtxkitChatModel(pipeline=Pipeline(llama_backend), temperature=0, max_tokens=5, seed=1)
    ledger = Ledger()
    agent = create_agent(model, middleware=[ModelRetryMiddleware(max_retries=2, initial_delay=0.1),
                                            CtxkitMiddleware(ledger=ledger, context_window=20)])
    with pytest.raises(lc.ContextOverflowError):
        agent.invoke({"messages": [{"role": "user", "content": "Tell me a long story about a dragon and a knight."}]})
    assert [r.error_type for r in ledger.records] == ["ContextOverflowError"], "one attempt, not three"


def test_a_call_no_stage_changed_reaches_the_model_as_the_agents_own_request(llama_backend):
    """The pipeline hands its stages their own copy of the messages and tools, so the middleware's identity
    check always saw a change: every call was rebuilt from the OpenAI form, and a HumanMessage holding
    Anthropic tool_result blocks reached the model as a ToolMessage and a HumanMessage."""
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.outputs import ChatGeneration, ChatResult

    class Recorder(BaseChatModel):
        @property
        def _llm_type(self):
            return "recorder"

        def bind_tools(self, tools, **kwargs):
            return self

        def _generate(self, messages, stop=None, run_manager=None, **kwargs):
            usage = {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}
            return ChatResult(generations=[ChatGeneration(message=AIMessage("ok", usage_metadata=usage))])

    seen = {}

    class Before(AgentMiddleware):
        def wrap_model_call(self, request, handler):
            seen["agent"] = request
            return handler(request)

    class After(AgentMiddleware):
        def wrap_model_call(self, request, handler):
            seen["model"] = request
            return handler(request)

    turn = AIMessage(content=[{"type": "thinking", "thinking": "need weather", "signature": "sig=="},
                              {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
                     tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "toolu_1"}])
    history = [HumanMessage("Weather in Paris?"), turn,
               HumanMessage(content=[{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                                     {"type": "text", "text": "And tomorrow?"}])]
    middleware = CtxkitMiddleware([], ledger=Ledger(), counter=llama_backend.counter)
    agent = create_agent(Recorder(), tools=[get_weather], system_prompt="Be brief.",
                         middleware=[Before(), middleware, After()])
    agent.invoke({"messages": history})
    assert seen["model"] is seen["agent"]


def test_a_middleware_sharing_its_models_ledger_is_refused_not_counted_twice(llama_backend):
    """`CtxkitMiddleware.from_pipeline(p)` on an agent whose model is `CtxkitChatModel(pipeline=p)` wrote two
    records (llama.cpp and langchain-agent) for one model call into the same ledger: twice the tokens and cost."""
    ledger = Ledger()
    pipeline = Pipeline(llama_backend, ledger=ledger)
    model = CtxkitChatModel(pipeline=pipeline, temperature=0, seed=1, max_tokens=4)
    agent = create_agent(model, tools=[], middleware=[CtxkitMiddleware.from_pipeline(pipeline)])
    with pytest.raises(ConfigurationError, match="recorded twice"):
        agent.invoke({"messages": [HumanMessage("Say hi")]})
    assert len(ledger.records) == 0
    # with a ledger of its own, both records are wanted (the model's and the agent's view): allowed
    agent = create_agent(model, tools=[], middleware=[CtxkitMiddleware(pipeline.stages, ledger=Ledger())])
    agent.invoke({"messages": [HumanMessage("Say hi")]})
    assert len(ledger.records) == 1
