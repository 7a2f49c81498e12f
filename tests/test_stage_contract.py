"""What an application's own stage can rely on: a whole answer to a streaming call is streamed, a hook that
forgot its `return` is a typed error recorded with what the backend did, a subclass's own wrap_call and hooks
run in async calls as in sync ones, and a ledger given as a path is refused up front."""

from __future__ import annotations

import asyncio
import json
import math
import threading

import pytest

from ctxkit import ChatRequest, ChatResponse, ConfigurationError, Pipeline, Stage, Usage
from ctxkit.pipeline import event_recorder, record_event
from ctxkit.response import AsyncChatStream, ChatStream

MESSAGES = [{"role": "user", "content": "Say hello."}]
PARAMS = {"max_tokens": 4, "temperature": 0}


class Canned(Stage):
    def wrap_call(self, request, call_next):
        return ChatResponse(message={"role": "assistant", "content": "canned"}, finish_reason="stop",
                            usage=Usage(0, 2), model="smollm2", backend="canned")


def test_a_stage_answering_a_streaming_call_with_a_whole_response_is_streamed(llama_backend, ledger):
    pipeline = Pipeline(llama_backend, stages=[Canned()], ledger=ledger)
    stream = pipeline.call(ChatRequest(messages=MESSAGES, params=PARAMS, stream=True))
    assert isinstance(stream, ChatStream) and stream.collect().content == "canned"
    record = ledger.records[-1]
    assert record.stream and record.answered_by == "canned" and record.tokens_sent == 0 and record.out_saved == 2
    chunks = pipeline.openai().chat.completions.create(model="m", messages=MESSAGES, stream=True, **PARAMS)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "canned"

    async def main():
        result = await pipeline.acall(ChatRequest(messages=MESSAGES, params=PARAMS, stream=True))
        assert isinstance(result, AsyncChatStream)
        assert (await result.collect()).content == "canned"
        chunks = await pipeline.async_openai().chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                                                       **PARAMS)
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    assert asyncio.run(main()) == "canned"


class ForgotAfterReturn(Stage):
    def after_model(self, request, response):
        response.message["content"] = (response.content or "").upper()  # no return


class ForgotBeforeReturn(Stage):
    def before_model(self, request):
        request.override(params=PARAMS)  # no return


def test_a_hook_that_returns_nothing_is_a_typed_error_recorded_with_the_backend_call(llama_backend, ledger):
    pipeline = Pipeline(llama_backend, stages=[ForgotAfterReturn()], ledger=ledger)
    with pytest.raises(ConfigurationError, match="forgot_after_return.*NoneType"):
        pipeline.call(ChatRequest(messages=MESSAGES, params=PARAMS))
    record = ledger.records[-1]  # the model answered: that call was made, and is in the ledger
    assert record.status == "error" and record.error_type == "ConfigurationError"
    assert record.tokens_sent > 0 and record.tokens_out > 0
    with pytest.raises(ConfigurationError, match="forgot_after_return"):
        asyncio.run(pipeline.acall(ChatRequest(messages=MESSAGES, params=PARAMS)))
    assert len(ledger.records) == 2
    pipeline = Pipeline(llama_backend, stages=[ForgotBeforeReturn()], ledger=ledger)
    with pytest.raises(ConfigurationError, match="forgot_before_return.*call_next"):
        pipeline.call(ChatRequest(messages=MESSAGES, params=PARAMS))
    assert ledger.records[-1].error_type == "ConfigurationError" and ledger.records[-1].tokens_sent == 0


def test_a_ledger_given_as_a_path_is_refused_before_any_call(llama_backend, tmp_path):
    with pytest.raises(ConfigurationError, match="Ledger"):
        Pipeline(llama_backend, ledger=str(tmp_path / "calls.jsonl"))
    with pytest.raises(ConfigurationError, match="PriceTable"):
        Pipeline(llama_backend, prices="prices.json")


def test_a_subclass_of_a_ctxkit_stage_keeps_its_wrap_call_and_hooks_in_async_calls(llama_backend, ledger, tmp_path):
    from ctxkit.stages.cache import ExactCacheStage, LocalStore
    from ctxkit.stages.summarize import SummarizationStage

    seen = []

    class LoggedCache(ExactCacheStage):
        name = "logged_cache"

        def wrap_call(self, request, call_next):
            seen.append("wrap_call")
            return super().wrap_call(request, call_next)

    class LoopAwareSummary(SummarizationStage):
        def before_model(self, request):
            asyncio.get_running_loop()  # an app's hook runs on the event loop's thread (docs/concepts.md)
            seen.append(threading.current_thread() is threading.main_thread())
            return super().before_model(request)

    pipeline = Pipeline(llama_backend, stages=[LoggedCache(LocalStore(tmp_path / "cache")),
                                               LoopAwareSummary(llama_backend, trigger_messages=50)], ledger=ledger)
    asyncio.run(pipeline.acall(ChatRequest(messages=MESSAGES, params=PARAMS)))
    assert seen == ["wrap_call", True]


def test_a_stage_that_edits_in_place_is_counted_and_leaves_the_app_history_alone(llama_backend, ledger):
    class AddNote(Stage):
        def before_model(self, request):
            request.messages.insert(0, {"role": "system", "content": "Answer in French. " * 20})
            return request

    app_messages = [{"role": "user", "content": "Say hello."}]
    pipeline = Pipeline(llama_backend, stages=[AddNote()], ledger=ledger)
    response = pipeline.chat(app_messages, params=PARAMS)
    record = ledger.records[-1]
    assert record.tokens_sent == response.usage.prompt_tokens and record.count_delta == 0
    assert record.saved_by_stage["add_note"] == record.tokens_naive - record.tokens_sent < 0
    assert app_messages == [{"role": "user", "content": "Say hello."}]


def test_the_drop_in_clients_are_context_managers_as_openais_are(llama_backend, ledger):
    pipeline = Pipeline(llama_backend, ledger=ledger)
    with pipeline.openai() as client:
        assert client.chat.completions.create(model="m", messages=MESSAGES, **PARAMS).choices[0].message

    async def main():
        async with pipeline.async_openai() as client:
            return await client.chat.completions.create(model="m", messages=MESSAGES, **PARAMS)

    assert asyncio.run(main()).choices[0].message


def test_a_stage_editing_content_parts_in_place_changes_neither_the_history_nor_the_count(llama_backend, tmp_path):
    """Content as a list of parts (OpenAI's multimodal shape) was shared with the app's history: a stage that
    appended a part grew the history the app resends, and the ledger kept the count from before the edit."""
    from ctxkit import Ledger, Pipeline, read_ledger
    from ctxkit.stage import Stage

    reminder = "Reminder: answer politely and briefly. " * 20

    class AddPart(Stage):
        name = "add_part"

        def before_model(self, request):
            request.messages[-1]["content"].append({"type": "text", "text": reminder})
            request.messages[-1]["content"][0]["text"] += " Please."
            return request

    history = [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]
    path = tmp_path / "ledger.jsonl"
    Pipeline(llama_backend, [AddPart()], ledger=Ledger(path)).call(
        ChatRequest(messages=history, params={"max_tokens": 1}))
    assert history == [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]
    sent = [{"role": "user", "content": [{"type": "text", "text": "Say hi. Please."}, {"type": "text", "text": reminder}]}]
    assert list(read_ledger(path))[-1].tokens_sent == llama_backend.counter.count_prompt(sent, [])


def test_a_stage_editing_a_tool_description_in_place_changes_neither_the_apps_tools_nor_the_count(llama_backend,
                                                                                                   ledger):
    """Stages got their own tool list but the app's tool dicts: shortening a description in place rewrote the
    app's tool schemas (the next call's naive count was of the shortened tools) and the ledger kept the count
    from before the edit (0 saved by a stage that cut 19 tokens)."""
    import copy

    class ShortenInPlace(Stage):
        def before_model(self, request):
            for tool in request.tools:
                tool["function"]["description"] = tool["function"]["description"][:20]
            return request

    tools = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "description": "Look up the current weather for a city: temperature, wind and conditions, from the "
                       "national weather service, updated hourly."}}]
    original = copy.deepcopy(tools)
    pipeline = Pipeline(llama_backend, [ShortenInPlace()], ledger=ledger)
    for _ in range(2):
        pipeline.call(ChatRequest(messages=MESSAGES, tools=tools, params={"max_tokens": 1}))
        record = ledger.records[-1]
        assert record.tokens_naive == llama_backend.counter.count_prompt(MESSAGES, original)
        assert record.saved_by_stage["shorten_in_place"] == record.tokens_naive - record.tokens_sent > 0
    assert tools == original, "the app's tool schemas were edited by a stage"


@pytest.mark.parametrize("stage, settings, message", [
    ("ToolResultClearingStage", {"exclude_tools": "search"}, "exclude_tools must be a list of tool names"),
    ("ToolResultClearingStage", {"keep_last": math.nan}, "keep_last must be a whole number"),
    ("ToolResultClearingStage", {"clear_at_least": "64"}, "clear_at_least must be a whole number"),
    ("DocumentPruningStage", {"budget_tokens": math.nan}, "budget_tokens must be a whole number"),
    ("DocumentPruningStage", {"budget_tokens": "500"}, "budget_tokens must be a whole number"),
    ("DocumentPruningStage", {"budget_fraction": math.nan}, "budget_fraction must be a number in"),
    ("DedupStage", {"threshold": "0.6"}, "threshold must be a number in"),
    ("ToolRetrievalStage", {"top_k": math.nan}, "top_k must be a whole number"),
    ("ToolRetrievalStage", {"top_k": 2.5}, "top_k must be a whole number"),
    ("ToolRetrievalStage", {"pinned": None}, "pinned must be a list of tool names"),
    ("ToolRetrievalStage", {"pinned": "search_docs"}, "pinned must be a list of tool names"),
])
def test_a_setting_of_the_wrong_type_is_refused_when_the_stage_is_built(stage, settings, message):
    """NaN passes every `<` check (DocumentPruningStage then pruned nothing) and a bare string is an iterable of
    one-letter names (exclude_tools="search" cleared the results it was told to keep): refused, named."""
    from ctxkit.stages.pruning import DedupStage, DocumentPruningStage, ToolResultClearingStage
    from ctxkit.stages.tools import ToolRetrievalStage

    stages = {cls.__name__: cls for cls in (DedupStage, DocumentPruningStage, ToolResultClearingStage, ToolRetrievalStage)}
    with pytest.raises(ConfigurationError, match=message):
        stages[stage](**settings)


def test_numpy_numbers_are_settings_like_any_other():
    import numpy as np

    from ctxkit.stages.pruning import DedupStage, DocumentPruningStage, ToolResultClearingStage

    assert ToolResultClearingStage(keep_last=np.int64(2)).keep_last == 2
    assert DocumentPruningStage(budget_tokens=np.int32(300)).budget_tokens == 300
    assert DedupStage(threshold=np.float32(0.5)).threshold == 0.5


def test_cache_pure_tools_refuses_a_bare_string(tmp_path):
    from ctxkit.stages.cache import LocalStore, SemanticCacheStage

    with LocalStore(tmp_path) as store, pytest.raises(ConfigurationError, match="pure_tools must be a list"):
        SemanticCacheStage(store, object(), pure_tools="get_time")


# -- a stage written for one kind of call, run in the other: never skipped without a word, never a crash ----
SAY_HI = [{"role": "user", "content": "Say hi."}]


class Shout(Stage):
    """Sync only: upper-cases a streamed answer as it passes (stage.py: wrap_call may "wrap a stream")."""

    def wrap_call(self, request, call_next):
        result = call_next(request)
        if isinstance(result, ChatResponse):
            return result
        record_event(self.name, "stream_seen", stream_type=type(result).__name__)

        def chunks():
            for chunk in result:
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        delta["content"] = delta["content"].upper()
                yield chunk

        return ChatStream.relaying(result, chunks())


class AsyncOnly(Stage):
    async def awrap_call(self, request, call_next):
        return await call_next(request.override(messages=[*request.messages, {"role": "user", "content": "!"}]))


def _records(ledger):
    return [json.loads(line) for line in ledger.path.read_text().splitlines()]


def test_a_sync_stage_wrapping_a_stream_runs_in_async_calls(llama_backend, ledger):
    client = Pipeline(llama_backend, [Shout()], ledger=ledger).async_openai()

    async def go(stop_after=None):
        stream = await client.chat.completions.create(model="m", messages=SAY_HI, max_tokens=8, temperature=0,
                                                      stream=True)
        text = ""
        async with stream:
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    if stop_after is not None and len(text) >= stop_after:
                        break
        return text

    text = asyncio.run(go())
    assert text and text == text.upper()
    record = _records(ledger)[-1]
    assert record["status"] == "ok" and record["tokens_out"] > 0
    assert record["events"][0]["kind"] == "stream_seen"
    asyncio.run(asyncio.wait_for(go(stop_after=1), 60))  # left early: ends, the model is let go
    assert _records(ledger)[-1]["status"] == "error"
    assert asyncio.run(asyncio.wait_for(go(), 60)) == text  # and the next call gets the model


def test_an_async_only_stage_is_refused_by_a_sync_call_not_skipped(llama_backend, ledger):
    pipeline = Pipeline(llama_backend, [AsyncOnly()], ledger=ledger)
    with pytest.raises(ConfigurationError, match="awrap_call"):
        pipeline.openai().chat.completions.create(model="m", messages=SAY_HI, max_tokens=4)
    assert _records(ledger)[-1]["error_type"] == "ConfigurationError"
    reply = asyncio.run(pipeline.async_openai().chat.completions.create(model="m", messages=SAY_HI, max_tokens=4))
    assert reply.choices[0].message.content


class PassOn(Stage):
    """Sync only; passes a stream on untouched and notes its end (stage.py: use stream.on_complete)."""

    def wrap_call(self, request, call_next):
        result = call_next(request)
        if not isinstance(result, ChatResponse):
            note = event_recorder()
            result.on_complete(lambda response: note(self.name, "done", tokens=response.usage.completion_tokens))
        return result


def test_a_sync_stage_passing_a_stream_on_hands_the_async_stream_back_with_its_callbacks(llama_backend, ledger):
    client = Pipeline(llama_backend, [PassOn()], ledger=ledger).async_openai()

    async def go():
        stream = await client.chat.completions.create(model="m", messages=SAY_HI, max_tokens=6, stream=True)
        return [chunk async for chunk in stream]

    assert asyncio.run(go())
    record = _records(ledger)[-1]
    assert record["status"] == "ok" and record["tokens_out"] > 0
    assert record["events"] == [{"stage": "pass_on", "kind": "done", "tokens": record["tokens_out"]}]
