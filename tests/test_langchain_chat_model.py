"""CtxkitChatModel and LangChainBackend with the embedded model: real chains, tools, streams, async, and
the ledger arithmetic behind each call."""

from __future__ import annotations

import asyncio
import json

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from adapters.langchain import CtxkitChatModel, LangChainBackend, from_openai_messages, to_openai_messages
from ctxkit import ConfigurationError, Ledger, Pipeline, RequestError, Stage
from ctxkit.response import ChatResponse, Usage


@tool
def get_weather(city: str) -> str:
    """Look up the current weather in a city."""
    return f"Sunny in {city}"


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class KeepLastUserMessage(Stage):
    """A test stage with a measurable effect: sends only the system prompt and the last user message."""

    def before_model(self, request):
        system = [m for m in request.messages if m["role"] == "system"]
        last_user = [m for m in request.messages if m["role"] == "user"][-1:]
        return request.override(messages=system + last_user)


PROMPT = ChatPromptTemplate.from_messages([("system", "You answer in a few words."), ("user", "{question}")])


@pytest.fixture
def model(llama_backend, ledger):
    return CtxkitChatModel(pipeline=Pipeline(llama_backend, ledger=ledger), temperature=0, max_tokens=6, seed=1)


def test_a_prompt_model_parser_chain_runs_and_is_recorded(model, ledger, llama_backend):
    answer = (PROMPT | model | StrOutputParser()).invoke({"question": "Name a colour."})
    assert isinstance(answer, str) and answer
    [record] = ledger.records
    expected = llama_backend.counter.count_prompt(
        [{"role": "system", "content": "You answer in a few words."}, {"role": "user", "content": "Name a colour."}]
    )
    assert record.tokens_naive == record.tokens_sent == expected
    assert record.tokens_out <= 6 and record.status == "ok"


def test_invoke_returns_an_ai_message_with_the_usage_the_ledger_holds(model, ledger):
    message = model.invoke([HumanMessage("Say hi.")], namespace="team-a", conversation_id="c-1")
    assert isinstance(message, AIMessage)
    [record] = ledger.records
    assert (record.namespace, record.conversation_id) == ("team-a", "c-1")
    assert message.usage_metadata["input_tokens"] == record.tokens_sent
    assert message.usage_metadata["output_tokens"] == record.tokens_out
    assert message.response_metadata["finish_reason"] in ("stop", "length")


def test_a_stage_edit_reaches_the_model_and_its_saving_is_measured(llama_backend, ledger):
    model = CtxkitChatModel(pipeline=Pipeline(llama_backend, [KeepLastUserMessage()], ledger=ledger), max_tokens=4)
    history = [SystemMessage("Be brief."), HumanMessage("My name is Ada and I like long walks by the sea."),
               AIMessage("Nice to meet you, Ada."), HumanMessage("Say hi.")]
    message = model.invoke(history)
    [record] = ledger.records
    assert record.saved_by_stage["keep_last_user_message"] == record.tokens_naive - record.tokens_sent > 0
    assert message.usage_metadata["input_tokens"] == record.tokens_sent  # the backend saw the shorter prompt


def test_streams_yield_message_chunks_that_add_up_to_the_recorded_answer(model, ledger):
    chunks = list(model.stream("Name a fruit."))
    assert chunks and all(isinstance(c, AIMessageChunk) for c in chunks)
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    [record] = ledger.records
    assert record.stream and record.status == "ok"
    assert whole.usage_metadata["output_tokens"] == record.tokens_out
    text_chunks = list((PROMPT | model | StrOutputParser()).stream({"question": "Name a fruit."}))
    assert all(isinstance(c, str) for c in text_chunks) and "".join(text_chunks)


def test_async_invoke_and_astream_go_through_the_pipeline(model, ledger):
    async def main():
        message = await model.ainvoke("Name a day of the week.")
        chunks = [c async for c in model.astream("Name a month.")]
        return message, chunks

    message, chunks = asyncio.run(main())
    assert isinstance(message, AIMessage) and all(isinstance(c, AIMessageChunk) for c in chunks)
    assert [r.stream for r in ledger.records] == [False, True]
    assert all(r.status == "ok" for r in ledger.records)


def test_bind_tools_returns_well_formed_calls_to_offered_tools(model, ledger):
    bound = model.bind_tools([get_weather, add], tool_choice="any", max_tokens=40)
    message = bound.invoke("What is the weather in Oslo?")
    assert message.tool_calls, f"tool_choice='any' must produce a call, got {message.content!r}"
    for call in message.tool_calls:
        assert call["name"] in ("get_weather", "add")
        schema_keys = set(get_weather.args if call["name"] == "get_weather" else add.args)
        assert set(call["args"]) == schema_keys
        assert call["id"]
    record = ledger.records[-1]
    assert record.tokens_naive > 100  # the two tool schemas were counted into the prompt


def test_with_structured_output_works_unchanged(model):
    class City(BaseModel):
        name: str
        country: str

    result = model.with_structured_output(City).bind(max_tokens=40).invoke("Paris is in France.")
    assert isinstance(result, City)


def test_any_langchain_chat_model_can_be_wrapped_with_its_own_counter(model, llama_backend):
    # The wrapped model is itself a CtxkitChatModel here (a real LangChain model on the embedded model):
    # its stream hands tool calls over as tool-call chunks, which the wrapper turns back into OpenAI deltas.
    outer_ledger = Ledger()
    outer = CtxkitChatModel.wrap(model, counter=llama_backend.counter, ledger=outer_ledger, max_tokens=4)
    message = outer.invoke("Say hi.")
    assert isinstance(message, AIMessage)
    chunks = list(outer.bind_tools([add], tool_choice="add", max_tokens=40).stream("Add 2 and 3."))
    assert any(c.tool_call_chunks for c in chunks), "a streamed tool call arrives as tool-call chunks"
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    assert [c["name"] for c in whole.tool_calls] == ["add"]
    plain, streamed = outer_ledger.records
    assert plain.backend == "langchain:CtxkitChatModel"
    assert plain.count_delta == 0, "the wrapped model's reported prompt must match ctxkit's count"
    assert streamed.stream and streamed.status == "ok" and streamed.tokens_out > 0


def test_a_non_openai_model_needs_an_explicit_counter(model):
    with pytest.raises(ConfigurationError, match="pass counter="):
        LangChainBackend(model)


def test_an_openai_model_is_counted_with_tiktoken(model):
    from ctxkit import TiktokenCounter

    backend = LangChainBackend(model.model_copy(update={"model_name": "gpt-4o-mini"}))
    assert isinstance(backend.counter, TiktokenCounter) and backend.model == "gpt-4o-mini"


@pytest.mark.parametrize("window", [0, -1, "4096", 4096.0, True])
def test_a_context_window_that_is_no_count_of_tokens_is_refused(model, window):
    """0 fell back to the profile's window or 128,000 without a word; -1 refused every call."""
    with pytest.raises(ConfigurationError, match=f"context_window .*got {window!r}"):
        LangChainBackend(model.model_copy(update={"model_name": "gpt-4o-mini"}), context_window=window)


def test_unknown_call_arguments_are_refused(model):
    with pytest.raises(RequestError, match="unsupported argument"):
        model.invoke("hi", temprature=0.3)


def test_messages_and_tool_calls_convert_both_ways():
    messages = [
        SystemMessage("sys"), HumanMessage("hi"),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "c1"}]),
        ToolMessage("3", tool_call_id="c1"), AIMessage("done"),
    ]
    openai_messages = to_openai_messages(messages)
    assert openai_messages[2] == {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "id": "c1", "function": {"name": "add", "arguments": json.dumps({"a": 1, "b": 2})}}]}
    assert openai_messages[3] == {"role": "tool", "tool_call_id": "c1", "content": "3"}
    back = from_openai_messages(openai_messages)
    assert [type(m) for m in back] == [type(m) for m in messages]
    assert back[2].tool_calls[0]["args"] == {"a": 1, "b": 2}

    from adapters.langchain import to_ai_message

    broken = ChatResponse(
        message={"role": "assistant", "content": None, "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "add", "arguments": "{not json"}}]},
        finish_reason="tool_calls", usage=Usage(10, 5), model="m", backend="b",
    )
    ai = to_ai_message(broken)
    assert not ai.tool_calls and ai.invalid_tool_calls[0]["name"] == "add"


def test_an_invalid_tool_call_answered_by_the_agent_goes_back_to_the_model(model, ledger):
    """LangChain keeps unparseable arguments in invalid_tool_calls and its converter drops them, which left
    the agent's error ToolMessage answering no call. The answered call is sent (with "{}" arguments)."""
    from langchain_core.messages.tool import invalid_tool_call

    bad = AIMessage("", invalid_tool_calls=[invalid_tool_call(name="add", args='{"a": 1,', id="c1", error="x"),
                                            invalid_tool_call(name="add", args="{", id="c9", error="x")])
    history = [HumanMessage("What is 1 + 2?"), bad, ToolMessage("error: arguments are not JSON", tool_call_id="c1")]
    openai_messages = to_openai_messages(history)
    assert openai_messages[1]["tool_calls"] == [
        {"type": "function", "id": "c1", "function": {"name": "add", "arguments": '{"a": 1,'}}]
    answer = model.bind_tools([add]).invoke([*history, HumanMessage("Try again.")])
    assert isinstance(answer, AIMessage)
    [record] = ledger.records
    assert record.status == "ok"
    assert any(e["kind"] == "tool_arguments_replaced" for e in record.events)


def test_anthropic_style_tool_results_in_a_human_message_reach_the_model(model, ledger):
    """LangChain turns tool_result blocks of a HumanMessage into tool messages; they must not be lost, and
    go before the text so that the call is answered before the next turn."""
    history = [
        HumanMessage("What is 1 + 2?"),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "t1"}]),
        HumanMessage([{"type": "tool_result", "tool_use_id": "t1", "content": "3"}, {"type": "text", "text": "So?"}]),
    ]
    assert [(m["role"], m.get("tool_call_id")) for m in to_openai_messages(history)] == [
        ("user", None), ("assistant", None), ("tool", "t1"), ("user", None)]
    assert isinstance(model.invoke(history), AIMessage)
    assert ledger.records[-1].status == "ok"


def test_langchain_call_options_are_taken_as_langchain_means_them(model):
    assert isinstance(model.invoke("hi", stream=False), AIMessage)  # core's own invoke/stream switch
    strict = model.bind_tools([add], strict=True)
    assert strict.kwargs["tools"][0]["function"]["strict"] is True
    with pytest.raises(RequestError, match="bind_tools.*unsupported argument"):
        model.bind_tools([add], temprature=0)  # refused at bind time, not on the first call
    from adapters.langchain.messages import to_openai_tool_choice

    assert to_openai_tool_choice(False) == "none"
    assert to_openai_tool_choice({"type": "tool", "name": "add"}) == {"type": "function", "function": {"name": "add"}}


class RecordingModel(CtxkitChatModel):
    """A real LangChain model on the embedded model that keeps the messages it was given."""

    received: list = Field(default_factory=list)

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.received.append(list(messages))
        return super()._generate(messages, stop, run_manager, **kwargs)


def test_a_wrapped_model_gets_the_callers_own_messages_where_no_stage_changed_them(llama_backend):
    """The OpenAI form drops cache_control blocks and a ToolMessage's status and artifact: round-tripped,
    Anthropic prompt caching and is_error were silently lost for every wrapped call."""
    inner = RecordingModel(pipeline=Pipeline(llama_backend, ledger=Ledger()), temperature=0, max_tokens=4)
    system = SystemMessage([{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}])
    call = AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "c1"}])
    failed = ToolMessage("ValueError: bad", tool_call_id="c1", status="error", artifact={"trace": "..."})
    question = HumanMessage("What went wrong? Answer in one short sentence, please, and be precise.")
    CtxkitChatModel.wrap(inner, counter=llama_backend.counter).invoke([system, call, failed, question])
    assert all(a is b for a, b in zip(inner.received[-1], [system, call, failed, question], strict=True))

    class Shout(Stage):
        def before_model(self, request):
            *rest, last = request.messages
            return request.override(messages=[*rest, {**last, "content": last["content"].upper()}])

    hello = HumanMessage("Say hi.")
    CtxkitChatModel.wrap(inner, stages=[Shout()], counter=llama_backend.counter).invoke([system, hello])
    kept_system, rewritten = inner.received[-1]
    assert kept_system is system and rewritten is not hello and rewritten.content == "SAY HI."


def test_with_structured_output_json_schema_and_json_mode_use_response_format(llama_backend):
    """method="json_schema" / "json_mode" were dropped by BaseChatModel's default and became a forced tool
    call; they now send response_format, which holds the local model to the schema (or to JSON) by grammar."""

    class City(BaseModel):
        name: str

    model = CtxkitChatModel(pipeline=Pipeline(llama_backend, ledger=Ledger()), temperature=0, max_tokens=40, seed=1)
    out = model.with_structured_output(City, method="json_schema", include_raw=True).invoke("Name a city in France.")
    assert isinstance(out["parsed"], City) and out["parsing_error"] is None
    assert not out["raw"].tool_calls and json.loads(out["raw"].content) == out["parsed"].model_dump()
    raw = model.with_structured_output(None, method="json_mode", include_raw=True).invoke("A city as JSON.")["raw"]
    assert not raw.tool_calls and raw.content.startswith("{")  # JSON by grammar (max_tokens may cut it short)
    assert isinstance(model.with_structured_output(City).invoke("Name a city in France."), City)  # function_calling


def test_a_stop_sequence_given_as_a_string_is_one_sequence(llama_backend):
    """stop="lo" became ["l", "o"]: the answer stopped at the first "l" or "o" anywhere."""
    seen = []

    class Spy(Stage):
        def before_model(self, request):
            seen.append(request.params.get("stop"))
            return request

    model = CtxkitChatModel(pipeline=Pipeline(llama_backend, [Spy()], ledger=Ledger()), max_tokens=2)
    model.invoke("Say hello.", stop="lo")
    model.bind(stop="lo").invoke("Say hello.")
    model.invoke("Say hello.", stop=["lo", "x"])
    assert seen == [["lo"], ["lo"], ["lo", "x"]]


def test_a_setting_the_model_does_not_have_is_refused_not_dropped(llama_backend):
    """CtxkitChatModel(top_p=0.5) or model_kwargs={...} (ChatOpenAI's spelling) were silently ignored."""
    from pydantic import ValidationError

    for extra in ({"top_p": 0.5}, {"model_kwargs": {"top_p": 0.5}}):
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            CtxkitChatModel(pipeline=Pipeline(llama_backend), **extra)
    assert CtxkitChatModel(pipeline=Pipeline(llama_backend), model="m", max_tokens=2).model_name == "m"


def test_ctxkit_errors_are_langchains_own_error_types_too(llama_backend, ledger):
    """LangChain v1 middleware decides by type: SummarizationMiddleware catches its ContextOverflowError,
    ModelRetryMiddleware reads is_retryable. ctxkit's errors matched neither, so an overflow was retried."""
    from langchain_core import exceptions as lc
    from langchain_core.language_models import BaseChatModel

    from ctxkit import ContextOverflowError
    from ctxkit.backends.gguf_prompt import GGUFPrompt
    from ctxkit.backends.llama_cpp import default_model_path

    model = CtxkitChatModel(pipeline=Pipeline(llama_backend, ledger=ledger), max_tokens=4)
    for call in (lambda: model.invoke("word " * 5000), lambda: list(model.stream("word " * 5000))):
        with pytest.raises(ContextOverflowError) as info:
            call()
        assert isinstance(info.value, lc.ContextOverflowError)
    with pytest.raises(RequestError) as bad:
        model.invoke("hi", max_token=3)
    assert isinstance(bad.value, lc.ModelInvalidRequestError)

    class Denied(BaseChatModel):
        @property
        def _llm_type(self):
            return "denied"

        def _generate(self, *args, **kwargs):
            raise lc.ModelAuthenticationError("invalid x-api-key")

    wrapped = CtxkitChatModel.wrap(Denied(), counter=GGUFPrompt.from_gguf(default_model_path()))
    with pytest.raises(lc.ModelAuthenticationError) as denied:
        wrapped.invoke("hi")
    assert denied.value.is_retryable is False


def test_a_wrapped_reasoning_model_gets_its_thinking_blocks_back_next_turn():
    """Turn 2 held turn 1's answer with a `thinking` block, which ctxkit refused before the model was
    called; an answer of content blocks without usage crashed the GGUF counter."""
    from langchain_core.language_models import BaseChatModel
    from langchain_core.outputs import ChatGeneration, ChatResult

    from ctxkit.backends.gguf_prompt import GGUFPrompt
    from ctxkit.backends.llama_cpp import default_model_path

    class Thinking(BaseChatModel):
        """Answers as ChatAnthropic does with thinking enabled, and keeps what it was sent."""

        seen: list = []
        report_usage: bool = True

        @property
        def _llm_type(self):
            return "thinking"

        def _generate(self, messages, stop=None, run_manager=None, **kwargs):
            self.seen.append(messages)
            usage = {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15} if self.report_usage else None
            return ChatResult(generations=[ChatGeneration(message=AIMessage(content=[
                {"type": "thinking", "thinking": "the user greets me", "signature": "sig=="},
                {"type": "text", "text": "Hello!"}], usage_metadata=usage))])

    counter = GGUFPrompt.from_gguf(default_model_path())
    inner = Thinking()
    model = CtxkitChatModel.wrap(inner, counter=counter)
    first = model.invoke([HumanMessage("hi")])
    model.invoke([HumanMessage("hi"), first, HumanMessage("and again")])
    assert inner.seen[-1][1].content[0]["type"] == "thinking", "the model gets its own block back"
    quiet = CtxkitChatModel.wrap(Thinking(report_usage=False), counter=counter).invoke("hi")
    assert quiet.usage_metadata["output_tokens"] == counter.count_completion({"role": "assistant", "content": "Hello!"})


def test_a_users_document_block_is_refused_by_name_not_dropped(model):
    """Only an assistant turn's reasoning blocks are left out of the OpenAI form; a user's PDF block was
    dropped as well, and the model answered without it."""
    from ctxkit import InvalidMessageError

    pdf = HumanMessage(content=[{"type": "text", "text": "Summarize the attached PDF."},
                                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                                "data": "JVBERi0xLjQK"}}])
    with pytest.raises(InvalidMessageError) as info:
        model.invoke([pdf])
    assert info.value.where == "messages[0].content[1]"


def test_an_answer_from_ctxkits_cache_costs_nothing_in_usage_metadata(llama_backend, ledger, tmp_path):
    """LangChain marks a hit of its own cache with `total_cost: 0` and keeps the tokens; a hit of ctxkit's
    cache repeated the stored usage as if billed again, and cost trackers summed it."""
    from ctxkit.stages.cache import ExactCacheStage, LocalStore

    with LocalStore(tmp_path / "cache") as store:
        pipeline = Pipeline(llama_backend, stages=[ExactCacheStage(store)], ledger=ledger)
        model = CtxkitChatModel(pipeline=pipeline, temperature=0, max_tokens=6, seed=1)
        first = model.invoke("Name a colour.")
        again = model.invoke("Name a colour.")
        streamed = None
        for chunk in model.stream("Name a colour."):
            streamed = chunk if streamed is None else streamed + chunk
    assert "total_cost" not in first.usage_metadata
    assert again.content == first.content and again.usage_metadata["total_cost"] == 0
    assert again.usage_metadata["output_tokens"] == first.usage_metadata["output_tokens"]
    assert streamed.usage_metadata["total_cost"] == 0


def test_a_tool_result_langchain_marked_failed_never_reaches_the_cache(llama_backend, ledger, tmp_path):
    """ToolNode marks a failed call with ToolMessage(status="error"), whatever its text says; the OpenAI form
    has no status, so an answer built on "The weather service is unavailable" was cached and replayed."""
    from ctxkit.stages.cache import ExactCacheStage, LocalStore
    from ctxkit.stages.quarantine import QuarantineStage

    call = {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"}
    messages = [HumanMessage("Weather in Paris?"), AIMessage("", tool_calls=[call]),
                ToolMessage("The weather service is unavailable right now.", tool_call_id="call_1", status="error")]
    with LocalStore(tmp_path / "cache") as store:
        pipeline = Pipeline(llama_backend, stages=[QuarantineStage(), ExactCacheStage(store)], ledger=ledger)
        model = CtxkitChatModel(pipeline=pipeline, temperature=0, max_tokens=6, seed=1)
        model.invoke(messages)
        again = model.invoke(messages)
    assert again.response_metadata["ctxkit_answered_by"] is None
    assert [r.answered_by for r in ledger.records] == [None, None]


class KwargsRecordingModel(CtxkitChatModel):
    """A real LangChain model on the embedded model that keeps the call kwargs it was given."""

    calls: list = Field(default_factory=list)

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.calls.append(dict(kwargs))
        return super()._generate(messages, stop, run_manager, **kwargs)


def test_per_call_http_options_are_taken_as_chatopenai_takes_them(llama_backend, ledger):
    """An app written for ChatOpenAI passes `timeout=` and `extra_headers=` per call: they were refused as
    unsupported arguments, and a wrapped model never got them."""
    from ctxkit.errors import BackendTimeoutError

    model = CtxkitChatModel(pipeline=Pipeline(llama_backend, ledger=ledger), max_tokens=200, temperature=0)
    with pytest.raises(BackendTimeoutError):
        model.invoke("Write a long story about a dragon.", timeout=0.05)
    slow_default = model.model_copy(update={"timeout": 0.05})
    with pytest.raises(BackendTimeoutError):
        slow_default.invoke("Write a long story about a dragon.")
    assert isinstance(slow_default.invoke("Say hi.", timeout=60, max_tokens=3), AIMessage), "a call's own timeout wins"

    inner = KwargsRecordingModel(pipeline=Pipeline(llama_backend), max_tokens=3)
    outer = CtxkitChatModel.wrap(inner, counter=llama_backend.counter)
    outer.invoke("Say hi.", timeout=30, extra_headers={"X-Trace": "abc"}, extra_query={"v": "1"})
    assert inner.calls[-1]["timeout"] == 30
    assert inner.calls[-1]["extra_headers"] == {"X-Trace": "abc"} and inner.calls[-1]["extra_query"] == {"v": "1"}
    outer.invoke("Say hi.")
    assert not {"timeout", "extra_headers", "extra_query"} & set(inner.calls[-1]), "unset options are not passed on"


def test_langchains_own_cache_keeps_apart_models_with_other_settings_or_tenants(llama_backend):
    """set_llm_cache keys answers by _identifying_params, which named only the model, backend and stages: a
    model with max_tokens=3 filled the cache for one with max_tokens=40, and one tenant's answer went to another."""
    from langchain_core.caches import InMemoryCache
    from langchain_core.globals import get_llm_cache, set_llm_cache

    previous = get_llm_cache()
    set_llm_cache(InMemoryCache())
    try:
        def model(**fields):
            ledger = Ledger()
            return CtxkitChatModel(pipeline=Pipeline(llama_backend, ledger=ledger), temperature=0, seed=7,
                                   **fields), ledger

        short, _ = model(max_tokens=3)
        long, long_ledger = model(max_tokens=40)
        short.invoke("Tell me about Lisbon")
        assert long.invoke("Tell me about Lisbon").usage_metadata["output_tokens"] > 3
        assert len(long_ledger.records) == 1
        a, _ = model(max_tokens=5, namespace="tenant-a")
        b, b_ledger = model(max_tokens=5, namespace="tenant-b")
        a.invoke("Say hi")
        b.invoke("Say hi")
        assert len(b_ledger.records) == 1
    finally:
        set_llm_cache(previous)


def test_ctxkits_errors_as_langchains_survive_pickling_and_copying():
    """A process pool sends a worker's error back pickled: the re-classed error (and ctxkit's own, whose
    __init__ takes other arguments than its message) came back as a PicklingError / TypeError."""
    import copy
    import pickle

    from langchain_core import exceptions as lc

    from adapters.langchain.errors import also_langchains
    from ctxkit.errors import BackendStatusError, ContextOverflowError

    for error in (ContextOverflowError(9031, 4, 4096), BackendStatusError("slow down", backend="b", status=429)):
        also_langchains(error)
        for again in (pickle.loads(pickle.dumps(error)), copy.deepcopy(error)):
            assert type(again).__mro__[1] is type(error).__mro__[1] and str(again) == str(error)
            assert again.__dict__ == error.__dict__
    assert isinstance(pickle.loads(pickle.dumps(error)), lc.ModelRateLimitError)
    plain = ContextOverflowError(1, 2, 3)
    assert pickle.loads(pickle.dumps(plain)).context_window == 3


def test_request_fields_per_call_reach_the_request_in_invoke_and_stream(llama_backend):
    """`metadata=` per call reached only stream(): LangChain's invoke/ainvoke/batch have a `metadata` of their
    own (TypeError: multiple values). A request field given as None was refused as an unknown argument."""

    class Seen(Stage):
        def before_model(self, request):
            seen.append((request.metadata.get("tag"), request.conversation_id))
            return request

    seen: list = []
    model = CtxkitChatModel(pipeline=Pipeline(llama_backend, stages=[Seen()]), temperature=0, max_tokens=2)
    model.invoke("Hi", ctxkit_metadata={"tag": 1}, conversation_id=None)
    list(model.stream("Hi", ctxkit_metadata={"tag": 2}))
    asyncio.run(model.ainvoke("Hi", ctxkit_metadata={"tag": 3}, conversation_id="c"))
    model.bind_tools([add], ctxkit_metadata={"tag": 4}).batch(["Hi"])
    assert seen == [(1, None), (2, None), (3, "c"), (4, None)]


def test_a_block_langchains_converter_cannot_express_is_a_request_error(model):
    """LangChain's v1 `text-plain` block made its OpenAI converter raise a bare ValueError out of invoke, stream
    and ainvoke: neither ctxkit's RequestError nor LangChain's ModelInvalidRequestError, unlike every other part."""
    from langchain_core import exceptions as lc

    from ctxkit.errors import InvalidMessageError

    messages = [HumanMessage(content=[{"type": "text-plain", "text": "Revenue grew.", "mime_type": "text/plain"},
                                      {"type": "text", "text": "Summarize."}])]
    for call in (lambda: model.invoke(messages), lambda: list(model.stream(messages)),
                 lambda: asyncio.run(model.ainvoke(messages))):
        with pytest.raises(InvalidMessageError, match=r"messages\[0\]\.content") as caught:
            call()
        if hasattr(lc, "ModelInvalidRequestError"):
            assert isinstance(caught.value, lc.ModelInvalidRequestError)


def test_a_stream_says_which_backend_or_stage_answered_as_invoke_does(llama_backend, tmp_path):
    """invoke() puts ctxkit_backend and ctxkit_answered_by in response_metadata; a streamed answer had neither,
    so a streaming app could not tell a cache hit from a model call."""
    from ctxkit.stages.cache import ExactCacheStage, LocalStore

    with LocalStore(tmp_path / "cache") as store:
        model = CtxkitChatModel(pipeline=Pipeline(llama_backend, stages=[ExactCacheStage(store)], ledger=Ledger()),
                                temperature=0, max_tokens=6, seed=1)
        first = model.invoke("Name a colour.")
        hit = None
        for chunk in model.stream("Name a colour."):
            hit = chunk if hit is None else hit + chunk

        async def astream():
            merged = None
            async for chunk in model.astream("Name a fruit."):
                merged = chunk if merged is None else merged + chunk
            return merged

        miss = asyncio.run(astream())
    assert first.response_metadata["ctxkit_answered_by"] is None
    assert hit.response_metadata["ctxkit_answered_by"] == "exact_cache"
    assert hit.response_metadata["ctxkit_backend"] == "cache:exact_cache"
    assert miss.response_metadata["ctxkit_answered_by"] is None
    assert miss.response_metadata["ctxkit_backend"] == llama_backend.name
    assert miss.response_metadata["model_name"] == llama_backend.model  # not repeated (merged strings concatenate)


def test_langchain_token_counting_and_profile_use_the_backends_tokenizer_and_window(llama_backend):
    """trim_messages(token_counter=model) and SummarizationMiddleware's fractional triggers read the model's
    get_num_tokens_from_messages and profile: LangChain's defaults (GPT-2's tokenizer, no profile) gave 0
    tokens offline (nothing trimmed) and a ValueError."""
    from langchain_core.messages.utils import trim_messages

    model = CtxkitChatModel(pipeline=Pipeline(llama_backend, [], ledger=Ledger()))
    history = [SystemMessage("You are helpful.")]
    for i in range(8):
        history += [HumanMessage(f"Tell me fact {i} about Lisbon."), AIMessage(f"Fact {i}: Lisbon is very old.")]
    exact = llama_backend.counter.count_prompt(to_openai_messages(history))
    assert model.get_num_tokens_from_messages(history) == exact
    assert model.get_num_tokens("Lisbon") == llama_backend.counter.count_text("Lisbon")
    trimmed = trim_messages(history, max_tokens=exact // 2, token_counter=model, strategy="last", include_system=True)
    assert 1 < len(trimmed) < len(history)
    assert llama_backend.counter.count_prompt(to_openai_messages(trimmed)) <= exact // 2
    assert model.profile["max_input_tokens"] == llama_backend.context_window


def test_a_content_block_without_a_type_is_a_request_error_not_a_key_error(llama_backend):
    """A tool node's `ToolMessage(content=search_results)` (dicts without "type"): LangChain's converter raised
    a bare KeyError('type'), which no `except RequestError` nor LangChain's own error handling saw."""
    model = CtxkitChatModel(pipeline=Pipeline(llama_backend, [], ledger=Ledger()), max_tokens=4)
    history = [HumanMessage("search"), AIMessage("", tool_calls=[{"name": "search", "args": {}, "id": "c1"}]),
               ToolMessage(content=[{"title": "Lisbon", "url": "https://example.org"}], tool_call_id="c1")]
    with pytest.raises(RequestError, match=r"messages\[2\]"):
        model.invoke(history)
    with pytest.raises(RequestError):
        list(model.stream([HumanMessage(content=[{"text": "hi"}])]))


def test_token_counting_uses_the_counter_of_the_model_asked_for():
    """CtxkitChatModel(model="gpt-4") over a gpt-4o backend is billed with gpt-4's encoding (the pipeline's
    counter_for): get_num_tokens counted with gpt-4o's, and trim_messages kept a prompt past its budget."""
    from ctxkit import OpenAIBackend

    backend = OpenAIBackend("gpt-4o", base_url="http://127.0.0.1:9/v1", api_key="unused")
    model = CtxkitChatModel(pipeline=Pipeline(backend, [], ledger=Ledger()), model="gpt-4")
    text = "Größenwahn: 東京都の人口は約1400万人です。 Привет, как дела?"
    assert model.get_num_tokens(text) == backend.counter_for("gpt-4").count_text(text) != backend.counter.count_text(text)
    history = [HumanMessage(text)]
    assert model.get_num_tokens_from_messages(history) == backend.counter_for("gpt-4").count_prompt(
        to_openai_messages(history))


def test_with_structured_output_function_calling_sends_strict_and_refuses_an_unknown_method(llama_backend):
    """with_structured_output(schema, strict=True) (method function_calling, the default) went to LangChain's base
    implementation, which drops `strict`: the tool was sent without it. An unknown method became function_calling."""
    seen = []

    class Spy(Stage):
        def before_model(self, request):
            seen.append(request.tools)
            return request

    class City(BaseModel):
        """A city."""

        name: str

    model = CtxkitChatModel(pipeline=Pipeline(llama_backend, [Spy()], ledger=Ledger()), temperature=0, max_tokens=40)
    assert isinstance(model.with_structured_output(City, strict=True).invoke("Paris is a city."), City)
    assert seen[-1][0]["function"].get("strict") is True
    out = model.with_structured_output(City, include_raw=True).invoke("Paris is a city.")
    assert isinstance(out["parsed"], City) and out["raw"].tool_calls and "strict" not in seen[-1][0]["function"]
    with pytest.raises(ValueError, match="xml"):
        model.with_structured_output(City, method="xml")


def test_bind_tools_takes_the_per_call_transport_options(model):
    """invoke(x, timeout=5) is taken (as ChatOpenAI takes it), yet bind_tools(tools, timeout=5) was refused."""
    bound = model.bind_tools([add], timeout=30, tool_choice="add", max_tokens=40)
    assert bound.invoke("Add 2 and 3.").tool_calls[0]["name"] == "add"


def test_a_call_from_the_thread_whose_stream_is_still_open_fails_instead_of_waiting_forever(model, ledger):
    """`it = model.stream(q); next(it); model.invoke(...)` waited for the local model, which the unread stream
    held until this very thread read it on: a hang with no error (the alarm here only bounds the old hang)."""
    import signal

    from ctxkit import BackendError

    def hung(*_):
        raise TimeoutError("the call waited for the stream this thread holds")

    stream = model.stream("Tell me a long story about a dragon.", max_tokens=30)
    next(stream)
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        with pytest.raises(BackendError, match="still streaming"):
            model.invoke("Say hi.")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        stream.close()
    assert model.invoke("Say hi.").content  # the model is free again
