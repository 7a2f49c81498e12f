"""CtxkitChatModel.wrap around other LangChain chat models, and CtxkitMiddleware in create_agent: what
other providers say (their tool_choice spelling, stop reasons, logprobs, settings, names) survives the round
trip. The other providers are small in-process BaseChatModels: their API is not reachable from here, so
each reproduces what its LangChain class does (noted per class); the local model is the real SmolLM2."""

from __future__ import annotations

import asyncio
import re

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel

from adapters.langchain import CtxkitChatModel, CtxkitMiddleware
from ctxkit import Ledger, Pipeline
from ctxkit.errors import ContextOverflowError
from ctxkit.stages.cache.local_store import LocalStore
from ctxkit.stages.cache.stage import ExactCacheStage


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def _whole(chunks):
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    return whole


def test_streaming_through_a_wrapped_model_that_does_not_stream_keeps_the_answer(llama_backend):
    """LangChain's stream() of a model that does not stream yields the whole AIMessage, not chunks: the
    wrapper dropped it, and the stream was empty (recorded as an ok call with no output)."""
    inner = CtxkitChatModel(pipeline=Pipeline(llama_backend), temperature=0, seed=1, max_tokens=12,
                            disable_streaming=True)
    ledger = Ledger()
    outer = CtxkitChatModel.wrap(inner, counter=llama_backend.counter, ledger=ledger)
    said = outer.invoke("Say hi.").content
    assert said and _whole(list(outer.stream("Say hi."))).content == said
    assert ledger.records[-1].tokens_out > 0
    calls = _whole(list(outer.bind_tools([add], tool_choice="add", max_tokens=40).stream("Add 2 and 3.")))
    assert [c["name"] for c in calls.tool_calls] == ["add"]

    async def astream():
        return _whole([c async for c in outer.astream("Say hi.")]).content

    assert asyncio.run(astream()) == said


class AnthropicLike(BaseChatModel):
    """bind_tools reads tool_choice as langchain-anthropic's ChatAnthropic does; _generate refuses what
    Anthropic's API refuses."""

    model: str = "claude-x"

    @property
    def _llm_type(self):
        return "anthropic-like"

    def bind_tools(self, tools, *, tool_choice=None, **kwargs):
        if isinstance(tool_choice, dict):
            kwargs["tool_choice"] = tool_choice
        elif tool_choice in ("any", "auto"):
            kwargs["tool_choice"] = {"type": tool_choice}
        elif isinstance(tool_choice, str):
            kwargs["tool_choice"] = {"type": "tool", "name": tool_choice}
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _generate(self, messages, stop=None, run_manager=None, tools=None, tool_choice=None, **kwargs):
        names = {t["function"]["name"] for t in tools or []}
        if tool_choice is not None and not (tool_choice.get("type") in ("auto", "any", "none") or (
                tool_choice.get("type") == "tool" and tool_choice.get("name") in names)):
            raise ValueError(f"400 invalid_request_error: tool_choice {tool_choice}")
        name = tool_choice["name"] if tool_choice and tool_choice.get("type") == "tool" else sorted(names)[0]
        return ChatResult(generations=[ChatGeneration(message=AIMessage("", tool_calls=[
            {"name": name, "args": {"a": 2, "b": 3}, "id": "toolu_1"}]))])


def test_a_wrapped_model_gets_tool_choice_in_langchains_spelling(llama_backend):
    """The wrapper handed the wrapped model OpenAI's spelling ("required", {"type": "function", ...}):
    ChatAnthropic reads "required" as a tool of that name and passes the dict on, and Anthropic refuses both."""

    class Sum(BaseModel):
        a: int
        b: int

    model = CtxkitChatModel.wrap(AnthropicLike(), counter=llama_backend.counter)
    assert model.bind_tools([add], tool_choice="any").invoke("Add 2 and 3.").tool_calls[0]["name"] == "add"
    assert model.bind_tools([add], tool_choice="add").invoke("Add 2 and 3.").tool_calls[0]["name"] == "add"
    assert model.with_structured_output(Sum).invoke("Add 2 and 3.") == Sum(a=2, b=3)


class Refusing(BaseChatModel):
    """Refuses once, with its provider's own stop reason in response_metadata, then answers. `in_field`: as
    ChatOpenAI reports a refusal to fill a schema (empty content, the refusal in additional_kwargs)."""

    meta: dict
    in_field: bool = False
    calls: int = 0

    @property
    def _llm_type(self):
        return "refusing"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.calls += 1
        if self.calls > 1:
            message = AIMessage("Here is the answer.")
        elif self.in_field:
            message = AIMessage("", additional_kwargs={"refusal": "I can't help with that."}, response_metadata=self.meta)
        else:
            message = AIMessage("I can't help with that.", response_metadata=self.meta)
        return ChatResult(generations=[ChatGeneration(message=message)])


def test_a_providers_refusal_is_never_cached(llama_backend, tmp_path):
    """Only OpenAI's finish_reason was read: Anthropic's stop_reason "refusal" and Gemini's "SAFETY"
    became "stop", and the refusal was cached and served to the next identical request."""
    for n, meta in enumerate([{"stop_reason": "refusal"}, {"finish_reason": "SAFETY"},
                              {"finish_reason": "content_filter"}]):
        inner = Refusing(meta=meta)
        cache = ExactCacheStage(LocalStore(tmp_path / str(n)))
        model = CtxkitChatModel.wrap(inner, stages=[cache], counter=llama_backend.counter, temperature=0)
        first = model.invoke("Question?")
        assert first.response_metadata["finish_reason"] == "content_filter", meta
        assert model.invoke("Question?").content == "Here is the answer." and inner.calls == 2


def test_a_refusal_reaches_the_caller_where_chatopenai_puts_it_and_is_not_cached(llama_backend, tmp_path):
    """The refusal was dropped on the way through: the caller got an empty answer, and ChatOpenAI's
    structured-output parsers, which raise OpenAIRefusalError from it, had nothing to read."""
    inner = Refusing(meta={"finish_reason": "stop"}, in_field=True)
    cache = ExactCacheStage(LocalStore(tmp_path))
    model = CtxkitChatModel.wrap(inner, stages=[cache], counter=llama_backend.counter, temperature=0)
    first = model.invoke("Fill the form.")
    assert first.additional_kwargs.get("refusal") == "I can't help with that." and first.content == ""
    assert model.invoke("Fill the form.").content == "Here is the answer." and inner.calls == 2, \
        "a refusal is never cached"


class Metadata(BaseChatModel):
    """Answers with the given response_metadata (logprobs, as ChatOpenAI reports them)."""

    meta: dict

    @property
    def _llm_type(self):
        return "metadata"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        return ChatResult(generations=[ChatGeneration(message=AIMessage("Hi.", response_metadata=self.meta))])


def test_logprobs_come_back_where_chatopenai_puts_them(llama_backend):
    logprobs = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": None, "top_logprobs": []}]}
    model = CtxkitChatModel.wrap(Metadata(meta={"logprobs": logprobs}), counter=llama_backend.counter)
    assert model.invoke("Say hi.", logprobs=True).response_metadata["logprobs"] == logprobs


def test_the_models_own_settings_reach_the_cache_in_agents_and_wrappers(llama_backend, tmp_path):
    """The middleware read only the call's model_settings, and wrap() ignored the wrapped model's: a model set
    to temperature=0 looked sampled to the cache, which then never answered."""
    from langchain.agents import create_agent

    model = CtxkitChatModel(pipeline=Pipeline(llama_backend), temperature=0, seed=1, max_tokens=8)
    ledger = Ledger()
    cache = ExactCacheStage(LocalStore(tmp_path / "agent"))
    agent = create_agent(model, tools=[], middleware=[CtxkitMiddleware([cache], ledger=ledger,
                                                                       counter=llama_backend.counter)])
    for _ in range(2):
        agent.invoke({"messages": [HumanMessage("Name a colour.")]})
    assert [r.answered_by for r in ledger.records] == [None, "exact_cache"]

    wrapped_ledger = Ledger()
    wrapped = CtxkitChatModel.wrap(model, stages=[ExactCacheStage(LocalStore(tmp_path / "wrap"))],
                                   counter=llama_backend.counter, ledger=wrapped_ledger)
    wrapped.invoke("Name a colour.")
    wrapped.invoke("Name a colour.")
    assert [r.answered_by for r in wrapped_ledger.records] == [None, "exact_cache"]


def test_a_streamed_stop_reason_is_read_too(llama_backend):
    class StreamRefusal(Refusing):
        def _stream(self, messages, stop=None, run_manager=None, **kwargs):
            yield ChatGenerationChunk(message=AIMessageChunk("I can't help with that."))
            yield ChatGenerationChunk(message=AIMessageChunk("", response_metadata={"stop_reason": "refusal"}))

    model = CtxkitChatModel.wrap(StreamRefusal(meta={}), counter=llama_backend.counter, temperature=0)
    assert _whole(list(model.stream("Question?"))).response_metadata.get("finish_reason") == "content_filter"


def test_usage_metadata_counts_every_backend_call_the_ledger_counts(llama_backend, embedder):
    """A find_tools recovery runs the model twice in one call: the ledger counted both, the AIMessage's
    usage_metadata (what LangChain's usage callbacks and LangSmith add up) only the last."""
    import json
    from pathlib import Path

    from langchain_core.callbacks import get_usage_metadata_callback

    from ctxkit.stages.tools.stage import FIND_TOOLS, ToolRetrievalStage

    catalog = json.loads((Path(__file__).parent / "fixtures" / "tools" / "catalog.json").read_text())[:50]
    stage = ToolRetrievalStage(catalog=catalog, top_k=2, recovery="find_tools", compact=True, embedder=embedder)
    ledger = Ledger()
    model = CtxkitChatModel(pipeline=Pipeline(llama_backend, [stage], ledger=ledger), temperature=0, seed=7,
                            max_tokens=96)
    forced = model.bind(tool_choice={"type": "function", "function": {"name": FIND_TOOLS}})
    with get_usage_metadata_callback() as callback:
        message = forced.invoke("What is the musical scale of C sharp major?")
    record = ledger.records[-1]
    assert record.latency_ms["backend_calls"] == 2
    usage = message.usage_metadata
    assert (usage["input_tokens"], usage["output_tokens"]) == (record.tokens_sent, record.tokens_out)
    [counted] = callback.usage_metadata.values()
    assert counted["input_tokens"] == record.tokens_sent


class OtherProvider(BaseChatModel):
    """Another provider's model (one this machine cannot run), named in `model` as ChatAnthropic names it. It
    answers `answer`, and streams it word by word with no usage, as many LangChain integrations (and llama.cpp's
    server) do."""

    model: str
    answer: str

    @property
    def _llm_type(self):
        return "other"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        return ChatResult(generations=[ChatGeneration(message=AIMessage(
            self.answer, response_metadata={"model_name": self.model}))])

    def _stream(self, messages, stop=None, run_manager=None, **kwargs):
        for word in re.split(r"(?= )", self.answer):
            yield ChatGenerationChunk(message=AIMessageChunk(content=word))


def test_agents_on_different_models_do_not_share_cache_entries(llama_backend, tmp_path):
    """In the middleware a CtxkitChatModel was named by its class: an agent on the local model was served
    the answer an agent on another model had cached, and the ledger named neither model."""
    from langchain.agents import create_agent

    store = LocalStore(tmp_path)
    small = CtxkitChatModel(pipeline=Pipeline(llama_backend), temperature=0, seed=1, max_tokens=8)
    big = CtxkitChatModel.wrap(OtherProvider(model="big-model-2", answer="answer from big-model-2"),
                               counter=llama_backend.counter, temperature=0)
    answers, models = [], []
    for model in (big, small):
        ledger = Ledger()
        agent = create_agent(model, tools=[], middleware=[
            CtxkitMiddleware([ExactCacheStage(store, cache_sampled=True)], ledger=ledger,
                             counter=llama_backend.counter)])
        answers.append(agent.invoke({"messages": [HumanMessage("Name a colour.")]})["messages"][-1].content)
        models.append(ledger.records[-1].model)
    assert answers[0] == "answer from big-model-2" and answers[1] != answers[0]
    assert models[0] == "big-model-2" and models[1] != "CtxkitChatModel"


class OllamaLike(BaseChatModel):
    """Applies its own settings and takes no call argument it does not know, as langchain-ollama's ChatOllama
    (its client's chat() has no `temperature`, and `stop` may not come both ways)."""

    temperature: float | None = None
    stop: list[str] | None = None

    @property
    def _llm_type(self):
        return "ollama-like"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        if stop is not None and self.stop is not None:
            raise ValueError("`stop` found in both the input and default params.")
        if kwargs:
            raise TypeError(f"Client.chat() got an unexpected keyword argument {next(iter(kwargs))!r}")
        return ChatResult(generations=[ChatGeneration(message=AIMessage("hello"))])


def test_a_wrapped_models_own_settings_are_not_sent_back_to_it(llama_backend):
    """wrap() took the model's temperature and stop as defaults, then passed them back on every call: a model
    that takes no such call argument (ChatOllama) failed on every call."""
    from langchain.agents import create_agent

    model = CtxkitChatModel.wrap(OllamaLike(temperature=0, stop=["\n\n"]), counter=llama_backend.counter)
    assert model.invoke("Say hello.").content == "hello"
    agent = create_agent(OllamaLike(temperature=0), tools=[], middleware=[
        CtxkitMiddleware([], counter=llama_backend.counter)])
    assert agent.invoke({"messages": [HumanMessage("Say hello.")]})["messages"][-1].content == "hello"


class HuggingFaceLike(AnthropicLike):
    """bind_tools reads tool_choice as langchain-huggingface's ChatHuggingFace: "auto", "none", "required",
    or a tool's name (any other string)."""

    def bind_tools(self, tools, *, tool_choice=None, **kwargs):
        names = [convert_to_openai_tool(t)["function"]["name"] for t in tools]
        if tool_choice not in (None, "auto", "none", "required") and tool_choice not in names:
            raise ValueError(f"tool_choice {tool_choice!r} names no tool of {names}")
        choice = {"type": "tool", "name": tool_choice} if tool_choice in names else None
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], tool_choice=choice, **kwargs)


def test_a_forced_call_of_one_tool_is_named_for_every_wrapped_model(llama_backend):
    """"required" went to the wrapped model as "any", which ChatHuggingFace reads as a tool named "any"."""
    model = CtxkitChatModel.wrap(HuggingFaceLike(), counter=llama_backend.counter)
    assert model.bind_tools([add], tool_choice="required").invoke("Add 2 and 3.").tool_calls[0]["name"] == "add"


def test_a_tool_call_answer_that_says_it_stopped_finishes_with_tool_calls(llama_backend):
    """Gemini reports STOP on an answer that calls tools: it was passed on as "stop", and an app (or a stage)
    that checks finish_reason == "tool_calls" missed the calls."""

    class GeminiLike(AnthropicLike):
        def _generate(self, messages, stop=None, run_manager=None, **kwargs):
            return ChatResult(generations=[ChatGeneration(message=AIMessage(
                "", tool_calls=[{"name": "add", "args": {"a": 2, "b": 3}, "id": "c1"}],
                response_metadata={"finish_reason": "STOP"}))])

    model = CtxkitChatModel.wrap(GeminiLike(), counter=llama_backend.counter)
    answer = model.bind_tools([add]).invoke("Add 2 and 3.")
    assert answer.tool_calls[0]["name"] == "add" and answer.response_metadata["finish_reason"] == "tool_calls"


def test_the_window_comes_from_the_models_langchain_profile(llama_backend):
    """ChatAnthropic sends max_tokens=64000 by default and its profile says 200,000 input tokens; checked
    against a guessed 128,000 window, prompts above 64,000 tokens were refused before the model saw them."""
    counter = llama_backend.counter
    claude = AnthropicLike(profile={"max_input_tokens": 200_000, "max_output_tokens": 64_000})
    assert CtxkitChatModel.wrap(claude, counter=counter).pipeline.backend.context_window == 200_000
    assert CtxkitChatModel.wrap(claude, counter=counter, context_window=1000).pipeline.backend.context_window == 1000
    assert CtxkitChatModel.wrap(AnthropicLike(), counter=counter).pipeline.backend.context_window == 128_000

    tiny = AnthropicLike(profile={"max_input_tokens": 60})  # a model whose profile says 60 tokens: enforced
    wrapped = CtxkitChatModel.wrap(tiny, counter=counter)
    with pytest.raises(ContextOverflowError):
        wrapped.invoke([HumanMessage("word " * 100)])
    from langchain.agents import create_agent

    agent = create_agent(tiny, tools=[add], middleware=[CtxkitMiddleware(counter=counter)])
    with pytest.raises(ContextOverflowError):
        agent.invoke({"messages": [HumanMessage("word " * 100)]})


class Recorder(BaseChatModel):
    """Stands in for langchain-anthropic's ChatAnthropic: keeps the messages it was given."""

    model: str = "claude-sonnet-4-5"
    seen: list = []

    @property
    def _llm_type(self) -> str:
        return "recorder"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        Recorder.seen = list(messages)
        usage = {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}
        return ChatResult(generations=[ChatGeneration(message=AIMessage("ok", usage_metadata=usage))])


def test_a_tool_result_block_in_the_history_leaves_the_other_messages_the_callers_own(llama_backend):
    """A HumanMessage with Anthropic's tool_result blocks becomes two OpenAI messages; then no message went
    to the wrapped model as the caller's object: the system prompt lost its cache_control and the assistant
    turn its signed thinking block (which Anthropic requires back beside a tool call)."""
    from langchain_core.messages import SystemMessage

    system = SystemMessage(content=[{"type": "text", "text": "Policy.", "cache_control": {"type": "ephemeral"}}])
    turn = AIMessage(content=[{"type": "thinking", "thinking": "need weather", "signature": "sig=="},
                              {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}],
                     tool_calls=[{"name": "weather", "args": {"city": "Paris"}, "id": "toolu_1"}])
    history = [system, HumanMessage("Weather in Paris?"), turn,
               HumanMessage(content=[{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                                     {"type": "text", "text": "And tomorrow?"}])]
    CtxkitChatModel.wrap(Recorder(), counter=llama_backend.counter).invoke(history)
    assert [m is o for m, o in zip(Recorder.seen[:3], history[:3], strict=True)] == [True, True, True]
    assert [type(m).__name__ for m in Recorder.seen[3:]] == ["ToolMessage", "HumanMessage"]


class WholeToolCallStreamer(BaseChatModel):
    """Streams whole tool calls as langchain-ollama's ChatOllama does (AIMessageChunk(tool_calls=[...])), so
    LangChain gives each tool-call chunk index None."""

    model: str = "llama3.1"
    temperature: float = 0

    @property
    def _llm_type(self):
        return "whole-tool-call-streamer"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        raise AssertionError("streamed only")

    def _stream(self, messages, stop=None, run_manager=None, **kwargs):
        yield ChatGenerationChunk(message=AIMessageChunk(content="", tool_calls=[
            {"name": "get_weather", "args": {"city": "Oslo"}, "id": "call_a"},
            {"name": "get_time", "args": {"tz": "CET"}, "id": "call_b"}]))


def test_parallel_tool_calls_streamed_without_an_index_stay_apart(llama_backend):
    """index None became 0 for every call: the pipeline's stream assembler (ledger, stages' view of the
    answer, the OpenAI-style client) glued them into one call named 'get_weatherget_time'."""
    from ctxkit.request import ChatRequest

    model = CtxkitChatModel.wrap(WholeToolCallStreamer(), counter=llama_backend.counter)
    stream = model.pipeline.call(ChatRequest(messages=[{"role": "user", "content": "Weather and time?"}], stream=True))
    chunks = list(stream)
    calls = stream.response.message["tool_calls"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("get_weather", '{"city": "Oslo"}'), ("get_time", '{"tz": "CET"}')]
    assert len({call["index"] for chunk in chunks for choice in chunk["choices"]
                for call in choice["delta"].get("tool_calls") or []}) == 2
    assert [c["name"] for c in _whole(list(model.stream("Weather and time?"))).tool_calls] == ["get_weather", "get_time"]




def test_a_stream_whose_backend_reports_no_usage_still_ends_with_the_counted_usage(llama_backend):
    """invoke() had usage_metadata (counted), stream()/astream() had none, though the ledger counted it."""
    from langchain_core.callbacks import get_usage_metadata_callback

    ledger = Ledger()
    model = CtxkitChatModel.wrap(OtherProvider(model="no-usage-1", answer="Hello there friend"),
                                 counter=llama_backend.counter, ledger=ledger)
    with get_usage_metadata_callback() as callback:
        usage = _whole(list(model.stream("Say hi."))).usage_metadata
    record = ledger.records[-1]
    assert usage and (usage["input_tokens"], usage["output_tokens"]) == (record.tokens_sent, record.tokens_out)
    assert callback.usage_metadata["no-usage-1"]["output_tokens"] == record.tokens_out

    async def astream():
        return _whole([c async for c in model.astream("Say hi.")]).usage_metadata

    assert asyncio.run(astream())["output_tokens"] == record.tokens_out
