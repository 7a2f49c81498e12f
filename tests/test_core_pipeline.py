"""The pipeline measures each stage's effect; savings add up; answers, streams and errors are recorded."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import time
from typing import Any

import jsonschema
import pytest

from ctxkit import (
    BackendError,
    ChatRequest,
    ChatResponse,
    ConfigurationError,
    Ledger,
    LlamaCppBackend,
    Pipeline,
    Price,
    PriceTable,
    Stage,
    Usage,
    read_ledger,
)
from ctxkit.response import ChatStream, response_as_chunks
from ctxkit.stages.pruning import DedupStage

from .forks import exit_code_in_fork

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "My name is Ada and I live in Bergen, a rainy city on the Norwegian west coast."},
    {"role": "assistant", "content": "Nice to meet you, Ada."},
    {"role": "user", "content": "I collect old maps, mostly of Scandinavia from the 1700s and 1800s."},
    {"role": "assistant", "content": "A lovely hobby."},
    {"role": "user", "content": "Say hello."},
]
PARAMS = {"max_tokens": 4, "temperature": 0}


class DropOldestTurn(Stage):
    """Removes the oldest user/assistant pair after the system message."""

    def before_model(self, request):
        messages = list(request.messages)
        return request.override(messages=messages[:1] + messages[3:])


class TrimLongMessages(Stage):
    def before_model(self, request):
        return request.override(messages=[
            {**m, "content": m["content"][:40]} if len(m.get("content") or "") > 40 else m
            for m in request.messages
        ])


class PassThrough(Stage):
    pass


class Answering(Stage):
    """Answers without calling the rest of the pipeline (what a cache hit does)."""

    def wrap_call(self, request, call_next):
        return ChatResponse(message={"role": "assistant", "content": "Hello!"}, finish_reason="stop",
                            usage=Usage(0, 3), model="smollm2", backend="answering")


def counted(backend, messages):
    return backend.counter.count_prompt(messages)


def test_each_stage_saving_is_measured_and_they_add_up(llama_backend, ledger):
    pipeline = Pipeline(llama_backend, stages=[PassThrough(), DropOldestTurn(), TrimLongMessages()], ledger=ledger)
    response = pipeline.call(ChatRequest(messages=CONVERSATION, params=PARAMS))
    record = ledger.records[-1]
    naive = counted(llama_backend, CONVERSATION)
    after_drop = counted(llama_backend, CONVERSATION[:1] + CONVERSATION[3:])
    assert record.tokens_naive == naive
    assert record.saved_by_stage["pass_through"] == 0
    assert record.saved_by_stage["drop_oldest_turn"] == naive - after_drop > 0
    assert record.saved_by_stage["trim_long_messages"] > 0
    assert sum(record.saved_by_stage.values()) == record.tokens_naive - record.tokens_sent
    assert record.tokens_sent == response.usage.prompt_tokens, "sent must equal what llama.cpp evaluated"
    assert record.count_delta == 0 and record.status == "ok"


def test_a_stage_that_answers_saves_everything(llama_backend, ledger):
    pipeline = Pipeline(llama_backend, stages=[DropOldestTurn(), Answering()], ledger=ledger)
    response = pipeline.call(ChatRequest(messages=CONVERSATION, params=PARAMS))
    record = ledger.records[-1]
    assert response.answered_by == "answering" and record.answered_by == "answering"
    assert record.tokens_sent == 0 and record.tokens_out == 0 and record.out_saved == 3
    assert sum(record.saved_by_stage.values()) == record.tokens_naive
    assert record.latency_ms["backend_calls"] == 0


def test_a_stage_that_calls_twice_is_charged_for_both_calls(llama_backend, ledger):
    answers = []

    class AskTwice(Stage):
        def wrap_call(self, request, call_next):
            answers.append(call_next(request))
            answers.append(call_next(request))
            return answers[-1]

    pipeline = Pipeline(llama_backend, stages=[AskTwice()], ledger=ledger)
    pipeline.call(ChatRequest(messages=CONVERSATION, params=PARAMS))
    record = ledger.records[-1]
    assert record.latency_ms["backend_calls"] == 2
    assert record.tokens_sent == 2 * record.tokens_naive
    assert record.saved_by_stage["ask_twice"] == -record.tokens_naive  # honest: it cost tokens
    assert record.count_delta == 0, "the reported usage is the last call's and must match its count"
    # Both answers were generated and paid for (a tool recovery re-runs the call): the first's output too.
    assert record.tokens_out == sum(a.usage.completion_tokens for a in answers) > answers[-1].usage.completion_tokens
    # An OpenAI-style client reads what the call cost from `usage`: both calls, as LangChain's usage_metadata says.
    reply = pipeline.openai().chat.completions.create(model="smollm2", messages=CONVERSATION, **PARAMS)
    first, last = answers[-2].usage, answers[-1].usage
    assert reply.usage.prompt_tokens == first.prompt_tokens + last.prompt_tokens == ledger.records[-1].tokens_sent
    assert reply.usage.completion_tokens == first.completion_tokens + last.completion_tokens


def test_stream_records_once_it_ends_and_assembles_the_answer(llama_backend, ledger):
    pipeline = Pipeline(llama_backend, stages=[DropOldestTurn()], ledger=ledger)
    stream = pipeline.call(ChatRequest(messages=CONVERSATION, params=PARAMS, stream=True))
    assert isinstance(stream, ChatStream)
    assert len(ledger.records) == 0, "nothing may be recorded before the stream ends"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in stream if c["choices"])
    record = ledger.records[-1]
    assert stream.response.content == text
    assert record.stream and record.status == "ok"
    assert record.tokens_out == stream.response.usage.completion_tokens > 0
    assert record.tokens_sent == record.tokens_naive - record.saved_by_stage["drop_oldest_turn"]
    assert stream.collect() is stream.response and len(ledger.records) == 1, "one call, one record"
    # llama.cpp's own counts, as for a whole answer: the stream's record is reconciled too
    assert record.usage_reported and record.count_delta == 0


def test_abandoned_stream_is_recorded_as_an_error_not_a_success(llama_backend, ledger):
    pipeline = Pipeline(llama_backend, ledger=ledger)
    stream = pipeline.call(ChatRequest(messages=CONVERSATION, params={"max_tokens": 32, "temperature": 0}, stream=True))
    iterator = iter(stream)
    next(iterator)
    next(iterator)
    iterator.close()
    assert ledger.records[-1].status == "error"
    assert ledger.records[-1].error == "the stream was closed before its end", "the ledger's reader gets a reason"
    assert stream.response is None


def test_collect_on_a_stream_closed_before_its_end_says_so(llama_backend, ledger):
    """A `with stream:` block left early, then stream.collect(): a bare AssertionError, no ctxkit error at all
    (and none under python -O: collect() returned None)."""
    pipeline = Pipeline(llama_backend, ledger=ledger)
    request = ChatRequest(messages=CONVERSATION, params={"max_tokens": 32, "temperature": 0}, stream=True)
    stream = pipeline.call(request)
    next(iter(stream))
    stream.close()
    with pytest.raises(BackendError, match="closed or failed before its end"):
        stream.collect()

    async def closed_then_collected() -> None:
        stream = await pipeline.acall(request)
        await stream.aclose()
        await stream.collect()

    with pytest.raises(BackendError, match="closed or failed before its end"):
        asyncio.run(closed_then_collected())
    assert [r.status for r in ledger.records] == ["error", "error"]


def test_async_call_and_async_stream(llama_backend, ledger):
    pipeline = Pipeline(llama_backend, stages=[DropOldestTurn()], ledger=ledger)

    async def run():
        response = await pipeline.acall(ChatRequest(messages=CONVERSATION, params=PARAMS))
        stream = await pipeline.acall(ChatRequest(messages=CONVERSATION, params=PARAMS, stream=True))
        streamed = await stream.collect()
        return response, streamed

    response, streamed = asyncio.run(run())
    assert isinstance(response, ChatResponse) and response.usage.prompt_tokens > 0
    assert streamed.content is not None
    assert [r.status for r in ledger.records] == ["ok", "ok"]
    assert all(r.saved_by_stage["drop_oldest_turn"] > 0 for r in ledger.records)


def test_backend_failure_is_recorded_as_error_and_raised_typed(llama_backend, ledger):
    class Broken(Stage):
        def wrap_call(self, request, call_next):
            raise BackendError("upstream exploded", backend="test", status=503)

    pipeline = Pipeline(llama_backend, stages=[Broken()], ledger=ledger)
    with pytest.raises(BackendError) as info:
        pipeline.call(ChatRequest(messages=CONVERSATION, params=PARAMS))
    assert info.value.status == 503
    record = ledger.records[-1]
    assert record.status == "error" and record.error_type == "BackendError" and record.tokens_out == 0


def test_cost_uses_the_price_table(llama_backend, tmp_path):
    prices = PriceTable({"smollm2": Price(input=1.0, cached_input=0.5, output=2.0)})
    pipeline = Pipeline(llama_backend, stages=[DropOldestTurn()], ledger=Ledger(tmp_path / "l.jsonl"), prices=prices)
    pipeline.call(ChatRequest(messages=CONVERSATION, params=PARAMS, model="smollm2"))
    r = pipeline.ledger.records[-1]
    expected = ((r.tokens_sent - r.tokens_cached) * 1.0 + r.tokens_cached * 0.5 + r.tokens_out * 2.0) / 1e6
    assert r.cost_usd == pytest.approx(expected)
    assert r.cost_naive_usd > r.cost_usd


def test_cost_without_ctxkit_has_the_prefix_cache_the_apps_own_prompts_would_have_had(llama_backend, tmp_path):
    # The cost without ctxkit was priced with the cached tokens of the pruned prompt: the previous call's whole
    # document, which the app's own prompt would have had cached, priced as uncached input (46% over in a chat).
    from ctxkit.stages.pruning import DocumentPruningStage

    prices = PriceTable({"smollm2": Price(input=1.0, cached_input=0.5, output=2.0)})
    pipeline = Pipeline(llama_backend, stages=[DocumentPruningStage(budget_tokens=120)],
                        ledger=Ledger(tmp_path / "l.jsonl"), prices=prices)
    topics = ["bridges", "bakeries", "museums", "parks", "trams", "rivers"]
    doc = " ".join(f"Paragraph {i}: Lyon has famous {topics[i % 6]} in district {i}." for i in range(60))
    first = [{"role": "user", "content": f'<document id="d1">{doc}</document>\nTell me about the bridges.'}]
    second = first + [{"role": "assistant", "content": "Lyon is nice."}, {"role": "user", "content": "And the trams?"}]
    for messages in (first, second):
        pipeline.call(ChatRequest(messages=messages, params={"max_tokens": 4, "temperature": 0}))
    one, two = pipeline.ledger.records
    assert two.tokens_cached > 0 and one.tokens_naive > 3 * one.tokens_sent  # pruned, and served from the KV cache
    expected = ((two.tokens_naive - one.tokens_naive) * 1.0 + one.tokens_naive * 0.5 + two.tokens_out * 2.0) / 1e6
    assert two.cost_naive_usd == pytest.approx(expected)


def test_replayed_chunks_assemble_to_the_same_response():
    response = ChatResponse(message={"role": "assistant", "content": "Hi", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        finish_reason="tool_calls", usage=Usage(5, 2), model="m", backend="b")
    stream = ChatStream(iter(response_as_chunks(response)), backend="b", model="m", count_completion=None)
    again = stream.collect()
    assert again.message == response.message and again.usage == response.usage
    assert again.finish_reason == "tool_calls"


def test_stage_names_must_be_unique(llama_backend):
    with pytest.raises(ConfigurationError, match="unique"):  # a CtxkitError, as docs/concepts.md says
        Pipeline(llama_backend, stages=[PassThrough(), PassThrough()])


@pytest.mark.parametrize("stages, says", [
    ([DedupStage], r"stages\[0\].*the class DedupStage \(instantiate it\)"),
    (None, "stages must be a list"), ("quarantine", "stages must be a list"), ([object()], r"stages\[0\]"),
])
def test_a_stage_list_that_is_no_list_of_stages_is_refused_up_front(llama_backend, stages, says):
    # they failed on the first call, with an AttributeError or a TypeError about naive_request()
    with pytest.raises(ConfigurationError, match=says):
        Pipeline(llama_backend, stages=stages)


def test_a_backend_that_is_no_backend_is_refused_up_front():
    with pytest.raises(ConfigurationError, match="backend must be a Backend"):
        Pipeline("model.gguf")  # type: ignore[arg-type]


def test_every_error_class_is_exported_from_the_package():
    import ctxkit
    import ctxkit.errors

    classes = {n for n, v in vars(ctxkit.errors).items() if isinstance(v, type) and issubclass(v, ctxkit.CtxkitError)}
    assert classes <= set(ctxkit.__all__), classes - set(ctxkit.__all__)


def test_async_openai_client_streams_openai_chunks_with_usage_only_when_asked(llama_backend, ledger):
    from openai.types.chat import ChatCompletionChunk

    client = Pipeline(llama_backend, ledger=ledger).async_openai()

    async def run(**extra):
        stream = await client.chat.completions.create(model="smollm2", messages=CONVERSATION, max_tokens=4,
                                                      temperature=0, stream=True, **extra)
        return [chunk async for chunk in stream]

    plain = asyncio.run(run())
    with_usage = asyncio.run(run(stream_options={"include_usage": True}))
    assert all(isinstance(c, ChatCompletionChunk) and c.choices for c in plain)
    assert with_usage[-1].usage is not None and not with_usage[-1].choices
    assert with_usage[-1].usage.prompt_tokens == ledger.records[-1].tokens_sent


def test_a_replayed_call_with_broken_arguments_reaches_the_model_with_empty_ones(llama_backend, ledger):
    """A model wrote '{"city": "Oslo"' (cut off); the agent replays the call with the tool's error. The call
    is sent with "{}" (renderers parse past arguments), the ledger says so, and the app's list is untouched."""
    broken = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"'}}
    listed = {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '["Oslo"]'}}
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [broken, listed]},
        {"role": "tool", "tool_call_id": "c1", "content": "error: arguments are not valid JSON"},
        {"role": "tool", "tool_call_id": "c2", "content": "error: arguments must be an object"},
        {"role": "user", "content": "Try again."},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    seen = []

    class Spy(Stage):
        def before_model(self, request):
            seen.append(request.messages[1]["tool_calls"])
            return request

    pipeline = Pipeline(llama_backend, [Spy()], ledger=ledger)
    response = pipeline.call(ChatRequest(messages=messages, tools=tools, params=PARAMS))
    assert response.finish_reason in ("stop", "length", "tool_calls")
    assert [c["function"]["arguments"] for c in seen[0]] == ["{}", "{}"]
    assert messages[1]["tool_calls"] == [broken, listed], "the app's own messages were changed"
    [record] = ledger.records
    [event] = [e for e in record.events if e["kind"] == "tool_arguments_replaced"]
    assert event["fields"] == ["messages[1].tool_calls[0].function.arguments",
                               "messages[1].tool_calls[1].function.arguments"]
    assert record.tokens_naive == llama_backend.counter.count_prompt(
        [messages[0], {**messages[1], "tool_calls": seen[0]}, *messages[2:]], tools)


def _finishes_soon(call, seconds: float = 60.0) -> bool:
    """Whether `call()` returns within `seconds` in another thread (a held model would block it for good)."""
    import threading

    done: list[object] = []
    worker = threading.Thread(target=lambda: done.append(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    return bool(done)


def test_leaving_a_stream_early_frees_the_local_model(llama_backend, ledger):
    """`break` out of a stream that is still referenced used to keep llama.cpp's lock until the stream was
    garbage: every later call on the model waited forever."""
    pipeline = Pipeline(llama_backend, ledger=ledger)
    long_answer = {"max_tokens": 40, "temperature": 0}
    stream = pipeline.call(ChatRequest(messages=CONVERSATION, params=long_answer, stream=True))
    for index, _ in enumerate(stream):
        if index == 1:
            break
    assert _finishes_soon(lambda: pipeline.chat(CONVERSATION, params=PARAMS))
    assert [r.status for r in ledger.records] == ["error", "ok"], "the abandoned stream is not a success"

    with pipeline.call(ChatRequest(messages=CONVERSATION, params=long_answer, stream=True)) as held:
        next(iter(held))
    assert _finishes_soon(lambda: pipeline.chat(CONVERSATION, params=PARAMS))
    assert [r.status for r in ledger.records] == ["error", "ok", "error", "ok"]

    whole = pipeline.call(ChatRequest(messages=CONVERSATION, params=PARAMS, stream=True))
    whole.collect()
    whole.close()  # closing an ended stream changes nothing
    assert [r.status for r in ledger.records][-1] == "ok" and len(ledger.records) == 5


def test_the_openai_style_client_parses_structured_output_like_openais(llama_backend, ledger):
    """README calls pipeline.openai() a drop-in for openai.OpenAI(); it had no chat.completions.parse."""
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str

    question = [{"role": "user", "content": "Which city is the capital of France?"}]
    client = Pipeline(llama_backend, ledger=ledger).openai()
    reply = client.chat.completions.parse(messages=question, response_format=City, max_tokens=60, temperature=0)
    assert isinstance(reply.choices[0].message.parsed, City), reply.choices[0].message.content

    async def run():
        aclient = Pipeline(llama_backend, ledger=ledger).async_openai()
        return await aclient.chat.completions.parse(messages=question, response_format=City, max_tokens=60,
                                                     temperature=0)

    assert isinstance(asyncio.run(run()).choices[0].message.parsed, City)


def test_the_openai_style_client_stream_closes_like_openais(llama_backend, ledger):
    client = Pipeline(llama_backend, ledger=ledger).openai()
    with client.chat.completions.create(messages=CONVERSATION, max_tokens=40, temperature=0, stream=True) as stream:
        first = next(stream)
    assert first.choices[0].delta.role == "assistant"
    assert _finishes_soon(lambda: client.chat.completions.create(messages=CONVERSATION, max_tokens=2))
    assert [r.status for r in ledger.records] == ["error", "ok"]
    stream = client.chat.completions.create(messages=CONVERSATION, max_tokens=40, temperature=0, stream=True)
    for _ in stream:  # no `with`, the stream kept in a variable: leaving the loop ends it
        break
    assert _finishes_soon(lambda: client.chat.completions.create(messages=CONVERSATION, max_tokens=2))
    assert [r.status for r in ledger.records] == ["error", "ok"] * 2

    async def run():
        aclient = Pipeline(llama_backend, ledger=ledger).async_openai()
        async with await aclient.chat.completions.create(messages=CONVERSATION, max_tokens=40, stream=True) as s:
            await s.__anext__()
        return await aclient.chat.completions.create(messages=CONVERSATION, max_tokens=2)

    assert _finishes_soon(lambda: asyncio.run(run()))
    assert [r.status for r in ledger.records] == ["error", "ok"] * 3


def test_a_cancelled_async_stream_frees_the_local_model(llama_backend, ledger):
    """A task cancelled (asyncio.wait_for, a web framework on disconnect) while a worker thread was inside the
    model's next token closed the generator mid-step: "generator already executing" instead of the
    timeout, and the generator, still open, kept llama.cpp's lock: every later call waited for good."""
    client = Pipeline(llama_backend, ledger=ledger).async_openai()
    messages = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]

    async def consume() -> None:
        stream = await client.chat.completions.create(messages=messages, max_tokens=200, temperature=0, stream=True)
        async for _ in stream:
            pass

    async def run() -> str:
        try:
            await asyncio.wait_for(consume(), timeout=0.5)
        except BaseException as exc:  # noqa: BLE001 - which error the caller sees is the point
            return type(exc).__name__
        return "finished"

    assert asyncio.run(run()) == "TimeoutError"
    assert _finishes_soon(lambda: Pipeline(llama_backend).chat(CONVERSATION, params=PARAMS), 30)


def test_aclose_from_another_task_ends_the_stream_once(llama_backend, ledger):
    """A "stop" button calling aclose() while the consumer task waited for the next chunk returned at once
    but let the model generate to max_tokens, and the call was written to the ledger twice (abandoned, then
    ok), so its cost counted twice."""
    pipeline = Pipeline(llama_backend, ledger=ledger)
    request = ChatRequest(messages=[{"role": "user", "content": "Count from 1 to 100, separated by commas."}],
                          params={"max_tokens": 120, "temperature": 0}, stream=True)

    async def run() -> int:
        stream = await pipeline.acall(request)
        chunks = 0

        async def consume() -> None:
            nonlocal chunks
            async for _ in stream:
                chunks += 1

        consumer = asyncio.create_task(consume())
        while chunks < 2:
            await asyncio.sleep(0.01)
        await stream.aclose()
        await consumer
        return chunks

    chunks = asyncio.run(run())
    assert chunks < 100, "the model went on generating after aclose()"
    assert [r.status for r in ledger.records] == ["error"]


def test_a_local_model_is_recorded_and_priced_as_itself_and_abandoned_output_counts(llama_backend, ledger):
    """An app that asks for "gpt-4o" from the local model used to be billed at gpt-4o's price, and a stream
    left half way recorded no output although the model had generated it."""
    from ctxkit.report import summarize

    pipeline = Pipeline(llama_backend, ledger=ledger)
    stream = pipeline.call(ChatRequest(messages=CONVERSATION, params={"max_tokens": 40, "temperature": 0},
                                       model="gpt-4o", stream=True))
    for index, _ in enumerate(stream):
        if index == 6:
            break
    answer = pipeline.call(ChatRequest(messages=CONVERSATION, params=PARAMS, model="gpt-4o"))
    assert answer.model == llama_backend.model
    abandoned, done = ledger.records
    assert abandoned.status == "error" and abandoned.tokens_out > 0, "the generated tokens were not counted"
    assert {abandoned.model, done.model} == {llama_backend.model}
    summary = summarize(ledger.records)
    assert summary["cost_usd"] == summary["cost_failed_usd"] == 0.0, "a local model costs nothing per token"
    assert summary["tokens_sent_failed"] == abandoned.tokens_sent > 0


def test_a_call_the_backend_refused_or_never_received_costs_nothing(llama_backend, ledger):
    """A refused connection was recorded as 2,008 tokens sent and their price paid."""
    from ctxkit.backends.openai_compat import OpenAIBackend
    from ctxkit.errors import BackendConnectionError
    from tests.servers import free_port

    backend = OpenAIBackend(model="gpt-4o", base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="test",
                            counter=llama_backend.counter, context_window=4096, max_retries=0, timeout=5)
    pipeline = Pipeline(backend, ledger=ledger)
    with pytest.raises(BackendConnectionError):
        pipeline.call(ChatRequest(messages=CONVERSATION, params=PARAMS))
    record = ledger.records[-1]
    assert record.status == "error" and record.tokens_sent == 0 and record.cost_usd == 0


def test_a_stage_error_after_the_answer_still_counts_what_was_paid(llama_backend, ledger):
    from ctxkit.errors import RequestError

    class FailAfter(Stage):
        def wrap_call(self, request, call_next):
            call_next(request)
            raise RequestError("this stage refused the answer")

    pipeline = Pipeline(llama_backend, stages=[FailAfter()], ledger=ledger)
    with pytest.raises(RequestError):
        pipeline.call(ChatRequest(messages=CONVERSATION, params=PARAMS))
    record = ledger.records[-1]
    assert record.status == "error" and record.tokens_sent == record.tokens_naive > 0 and record.tokens_out > 0


def test_a_stream_whose_stage_callback_fails_is_still_recorded(llama_backend, ledger):
    class BrokenStore(Stage):
        def wrap_call(self, request, call_next):
            result = call_next(request)
            result.on_complete(lambda response: (_ for _ in ()).throw(OSError("store is down")))
            return result

    pipeline = Pipeline(llama_backend, stages=[BrokenStore()], ledger=ledger)
    stream = pipeline.call(ChatRequest(messages=CONVERSATION, params=PARAMS, stream=True))
    with pytest.raises(OSError):
        list(stream)
    assert len(ledger.records) == 1
    record = ledger.records[-1]
    assert record.status == "error" and record.tokens_out > 0


def test_a_stage_event_with_numpy_numbers_and_sets_is_written(llama_backend, tmp_path):
    import numpy as np

    from ctxkit import Ledger, read_ledger
    from ctxkit.pipeline import record_event

    class Notes(Stage):
        def before_model(self, request):
            record_event(self.name, "scored", best=np.float32(0.5), kept={"doc-2", "doc-1"}, ids=np.arange(2))
            return request

    path = tmp_path / "calls.jsonl"
    Pipeline(llama_backend, stages=[Notes()], ledger=Ledger(path)).call(ChatRequest(messages=CONVERSATION, params=PARAMS))
    event = next(e for e in list(read_ledger(path))[-1].events if e["kind"] == "scored")
    assert event["best"] == 0.5 and event["kept"] == ["doc-1", "doc-2"] and event["ids"] == [0, 1]


def test_a_failed_local_call_is_recorded_as_the_local_model(llama_backend, ledger):
    """The drop-in client's model="gpt-4o" against the local model: a failed call was priced as gpt-4o."""
    stream = Pipeline(llama_backend, ledger=ledger).call(
        ChatRequest(messages=CONVERSATION, params=PARAMS, stream=True, model="gpt-4o"))
    stream.close()
    record = ledger.records[-1]
    assert record.model == llama_backend.model and record.cost_usd == 0


def test_async_calls_waiting_behind_a_stream_do_not_starve_it():
    """Waiting calls sat in the event loop's worker threads, the same threads every step of the stream
    holding the model needs: with as many waiting as the pool holds, nothing moved again. So did calls whose
    summarizer (the same model, called from a stage run in a worker thread) waited there. In a child
    process, so that a hang fails this test instead of hanging the run (stuck workers block the exit)."""
    import subprocess
    import sys

    script = """
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from ctxkit import ChatRequest, Ledger, LlamaCppBackend, Pipeline
from ctxkit.stages.summarize import SummarizationStage

backend = LlamaCppBackend(n_ctx=1024, n_threads=2)
summarize = SummarizationStage(backend, mode="model", trigger_messages=3, keep_last=1, summary_max_tokens=8)
pipeline = Pipeline(backend, stages=[summarize], ledger=Ledger())

def history(i):  # folded by the model before the call: its summarizer waits for the model too
    return [{"role": "user", "content": f"My name is user{i}."}, {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "I live in Paris."}, {"role": "assistant", "content": "Nice."},
            {"role": "user", "content": f"Say {i}"}]

async def run():
    stream = await pipeline.acall(ChatRequest(messages=[{"role": "user", "content": "Count to ten."}],
                                              params={"max_tokens": 12, "temperature": 0}, stream=True))
    async def consume():
        chunks = 0
        async for _ in stream:
            chunks += 1
            await asyncio.sleep(0.02)  # a consumer that does something with each chunk
        return chunks
    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.3)  # the stream holds the model
    calls = [asyncio.create_task(pipeline.acall(ChatRequest(messages=[{"role": "user", "content": f"Say {i}"}],
                                                            params={"max_tokens": 2, "temperature": 0})))
             for i in range(3)]
    calls += [asyncio.create_task(pipeline.acall(ChatRequest(messages=history(i), conversation_id=f"c{i}",
                                                             params={"max_tokens": 2, "temperature": 0})))
              for i in range(3)]
    return await asyncio.gather(consumer, *calls)

loop = asyncio.new_event_loop()
loop.set_default_executor(ThreadPoolExecutor(max_workers=3))  # fewer threads than waiting calls
chunks, *answers = loop.run_until_complete(run())
print(chunks, len(answers), [r.status for r in pipeline.ledger.records])
"""
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("async calls waiting behind a stream hung")
    assert done.returncode == 0, done.stderr[-2000:]
    chunks, answers, statuses = done.stdout.strip().split(" ", 2)
    assert int(chunks) > 1 and int(answers) == 6 and statuses == str(["ok"] * 7)


def test_a_stream_left_once_its_finish_reason_came_is_a_whole_answer(llama_backend, ledger):
    """It was recorded as abandoned (status error, GeneratorExit): the caller had the whole answer."""
    client = Pipeline(llama_backend, ledger=ledger).openai()
    text = ""
    for chunk in client.chat.completions.create(messages=CONVERSATION, max_tokens=8, temperature=0, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].finish_reason:
                break  # before the usage chunk
    record = ledger.records[-1]
    assert text and record.status == "ok" and record.tokens_out > 0


def test_streamed_tool_call_deltas_repeating_the_whole_name_make_one_name():
    """llama.cpp's server (--chat_format chatml-function-calling) repeats the name in every delta; the
    answer was a call to 'get_weatherget_weather...'. A name sent in pieces still joins."""
    def delta(name, arguments, finish=None):
        return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [{
            "index": 0, "finish_reason": finish,
            "delta": {"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": name, "arguments": arguments}}]}}]}

    repeated = [delta("get_weather", '{"city": '), delta("get_weather", '"Paris"}'), delta("get_weather", "", "tool_calls")]
    pieces = [delta("get_", ""), delta("weather", '{"city": "Paris"}', "tool_calls")]
    for chunks in (repeated, pieces):
        response = ChatStream(iter(chunks), backend="b", model="m", count_completion=None).collect()
        assert response.tool_calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_logit_bias_reaches_the_local_model(llama_backend, ledger):
    """It was accepted and silently ignored; OpenAI's keys are token ids, here this model's own."""
    from ctxkit import RequestError

    pipeline = Pipeline(llama_backend, ledger=ledger)
    request = ChatRequest(messages=CONVERSATION, params={"max_tokens": 4, "temperature": 0})
    plain = pipeline.call(request).content
    first = llama_backend._llama.tokenize(plain.encode(), add_bos=False, special=False)[0]
    banned = pipeline.call(request.override(params={**request.params, "logit_bias": {str(first): -100}})).content
    assert banned != plain and not banned.startswith(llama_backend._llama.detokenize([first]).decode())
    for bias, where in (({"hello": 5}, "logit_bias"), ({"99999999": 5}, "logit_bias"), ({"5": 500}, "logit_bias['5']")):
        with pytest.raises(RequestError) as info:
            pipeline.call(request.override(params={**request.params, "logit_bias": bias}))
        assert info.value.where == where


@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_the_local_grammar_cannot_take_is_a_request_error_naming_it(llama_backend, ledger, stream):
    """A $ref to a definition that is not there passes validation, and failed inside llama.cpp as an
    untyped BackendError (the proxy answered 502, the ledger counted the prompt as sent)."""
    from ctxkit import RequestError

    fine = {"type": "function", "function": {"name": "ok", "parameters": {"type": "object", "properties": {}}}}
    broken = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}}}}
    request = ChatRequest(messages=[{"role": "user", "content": "go"}], tools=[fine, broken],
                          params={"max_tokens": 5}, stream=stream)
    with pytest.raises(RequestError) as info:
        result = Pipeline(llama_backend, ledger=ledger).call(request)
        if stream:
            result.collect()
    assert info.value.where == "tools[1].function.parameters"
    assert ledger.records[-1].tokens_sent == 0


STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to fly."}]  # runs to max_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_a_per_call_timeout_stops_the_local_model_and_frees_it(llama_backend, ledger, stream):
    """timeout= was refused by the drop-in client; the local model now stops at its next token past it."""
    from ctxkit import BackendTimeoutError

    pipeline = Pipeline(llama_backend, ledger=ledger)
    with pytest.raises(BackendTimeoutError, match="timeout passed after") as timed_out:
        result = pipeline.call(ChatRequest(messages=STORY, params={"max_tokens": 400, "temperature": 0},
                                           stream=stream, timeout=0.5))
        if stream:
            result.collect()
    generated = int(re.search(r"after (\d+) generated", str(timed_out.value)).group(1))
    assert generated < 200, "it stopped near its timeout, not at max_tokens (400 tokens take 8 s or more here)"
    assert ledger.records[-1].error_type == "BackendTimeoutError"
    assert ledger.records[-1].tokens_out == generated, "the ledger and the error must agree on what was generated"
    again = pipeline.call(ChatRequest(messages=CONVERSATION, params={"max_tokens": 3}))  # the model was let go
    assert again.usage.completion_tokens > 0


def test_a_call_waiting_for_the_busy_local_model_times_out_while_it_waits(llama_backend, ledger):
    from ctxkit import BackendTimeoutError

    busy = llama_backend.stream(ChatRequest(messages=STORY, params={"max_tokens": 40}))
    next(busy)  # the stream holds the model
    try:
        with pytest.raises(BackendTimeoutError, match="waited for the model"):
            llama_backend.complete(ChatRequest(messages=CONVERSATION, params={"max_tokens": 3}, timeout=0.2))
        with pytest.raises(BackendTimeoutError, match="waited for the model"):
            asyncio.run(llama_backend.acomplete(ChatRequest(messages=CONVERSATION, params={"max_tokens": 3},
                                                            timeout=0.2)))
        priced = Pipeline(llama_backend, ledger=ledger, prices=PriceTable({llama_backend.model: Price(1, 1, 1)}))
        with pytest.raises(BackendTimeoutError):
            priced.call(ChatRequest(messages=CONVERSATION, params={"max_tokens": 3}, timeout=0.2))
        record = ledger.records[-1]
        assert (record.tokens_sent, record.cost_usd) == (0, 0), "the model never received a prompt it waited for"
    finally:
        busy.close()


def test_a_closed_local_backend_refuses_calls_with_a_typed_error():
    from ctxkit import LlamaCppBackend

    backend = LlamaCppBackend(n_ctx=512, n_threads=1)
    backend.close()
    request = ChatRequest(messages=CONVERSATION, params={"max_tokens": 3})
    with pytest.raises(BackendError, match="closed"):
        backend.complete(request)
    with pytest.raises(BackendError, match="closed"):
        asyncio.run(backend.acomplete(request))  # was a bare RuntimeError from the shut-down thread pool


def test_a_streamed_call_leaves_no_reference_cycle_holding_its_pipeline(llama_backend, ledger):
    """A stream kept the callbacks that record its call, and they held the stream: a cycle per streamed call, so a
    pipeline (and its backend's model) dropped after streaming stayed alive until the cyclic collector ran."""
    import weakref

    gc.disable()  # what only the cyclic collector frees has to wait for it, as between two of its runs
    try:
        for read in (lambda s: s.collect(), lambda s: next(iter(s))):  # read to its end, and closed half way
            pipeline = Pipeline(llama_backend, ledger=ledger)
            with pipeline.call(ChatRequest(messages=CONVERSATION, params={"max_tokens": 2}, stream=True)) as stream:
                read(stream)
            dropped = weakref.ref(pipeline)
            del pipeline, stream
            assert dropped() is None
    finally:
        gc.enable()
    assert [r.status for r in ledger.records][-2:] == ["ok", "error"]


def test_a_local_backend_dropped_without_close_frees_its_model_at_once():
    """A backend per job or notebook cell, never closed: its token-counting wrapper made a reference cycle, so each
    model stayed loaded until the cyclic collector ran (6 of 20 still loaded, 860 MB, where one takes 130 MB)."""
    import weakref

    from ctxkit import LlamaCppBackend

    gc.disable()  # what the cyclic collector would free has to wait for it, as between two of its runs
    try:
        backend = LlamaCppBackend(n_ctx=512, n_threads=1)
        backend.complete(ChatRequest(messages=CONVERSATION, params={"max_tokens": 2}))
        model = weakref.ref(backend._llama)
        del backend
        assert model() is None, "the model is freed when its backend is dropped, not at the next collection"
    finally:
        gc.enable()


CLOSE_WHILE_BUSY = """
import threading, time
from ctxkit import ChatRequest, LlamaCppBackend
backend = LlamaCppBackend(n_ctx=512, n_threads=1)
story = ChatRequest(messages=[{"role": "user", "content": "Write a long story about a dragon."}],
                    params={"max_tokens": 120, "temperature": 0})
outcomes = {}
def call(name):
    try:
        backend.complete(story)
        outcomes[name] = "ok"
    except Exception as exc:
        outcomes[name] = type(exc).__name__ + (" closed" if "closed" in str(exc) else "")
generating = threading.Thread(target=call, args=("generating",))
generating.start()
time.sleep(0.5)
waiting = threading.Thread(target=call, args=("waiting",))
waiting.start()
time.sleep(0.3)
backend.close()
generating.join()
waiting.join()
print(sorted(outcomes.items()))
"""


def test_closing_the_local_backend_while_it_generates_fails_the_calls_and_never_crashes():
    """close() freed the model under a generation in flight: the process died with a segfault in llama.cpp's
    decode (run in a child process, so a crash fails this test instead of the suite)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CLOSE_WHILE_BUSY], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == \
        "[('generating', 'BackendError closed'), ('waiting', 'BackendError closed')]", done.stdout


def test_a_streams_timeout_counts_the_models_time_not_the_readers(llama_backend, ledger):
    """The deadline ran on while the caller held each chunk: a reader that took 0.6 s per chunk failed a
    10-token answer the model wrote in well under its timeout."""
    stream = Pipeline(llama_backend, ledger=ledger).call(
        ChatRequest(messages=STORY, params={"max_tokens": 10, "temperature": 0}, stream=True, timeout=5))
    for _ in stream:
        time.sleep(0.6)
    assert stream.response is not None and stream.response.usage.completion_tokens == 10


def test_a_stage_event_holding_nan_is_written_as_json_the_report_reads(llama_backend, tmp_path):
    """A stage recorded np.mean([]) (NaN): the writer wrote a bare NaN, which the reader then refused."""
    import numpy as np

    from ctxkit.pipeline import record_event
    from ctxkit.stage import Stage

    class Noting(Stage):
        name = "noting"

        def before_model(self, request):
            record_event(self.name, "scores", mean=np.mean(np.array([], dtype=float)), top=float("inf"))
            return request

    path = tmp_path / "ledger.jsonl"
    Pipeline(llama_backend, stages=[Noting()], ledger=Ledger(path)).chat(CONVERSATION, params=PARAMS)
    [record] = read_ledger(path)
    assert [(e["mean"], e["top"]) for e in record.events if e["kind"] == "scores"] == [(None, None)]


class _RefusesPasswords(Stage):
    """A guard written as the README shows: wrap_call only, answering by itself."""

    name = "block_secrets"

    def wrap_call(self, request, call_next):
        if "password" in str(request.messages[-1].get("content")).lower():
            return ChatResponse(message={"role": "assistant", "content": "I can't help with that."},
                                finish_reason="stop", usage=Usage(0, 0), model="guard", backend="guard")
        return call_next(request)


def test_a_stage_written_with_wrap_call_only_also_runs_in_async_calls(llama_backend, ledger):
    """The default awrap_call ran before_model/after_model only: under acall, async_openai(), ctxkit serve
    and LangChain's ainvoke, such a guard was skipped without a word."""
    pipeline = Pipeline(llama_backend, stages=[_RefusesPasswords()], ledger=ledger)
    asked = ChatRequest(messages=[{"role": "user", "content": "What is the admin password?"}], params=PARAMS)
    assert pipeline.call(asked).content == "I can't help with that."
    assert asyncio.run(pipeline.acall(asked)).content == "I can't help with that."
    passed = asyncio.run(pipeline.acall(ChatRequest(messages=CONVERSATION, params=PARAMS)))
    assert passed.usage.completion_tokens > 0 and [r.answered_by for r in ledger.records] == [
        "block_secrets", "block_secrets", None]


def test_a_stream_dropped_before_it_was_read_is_still_recorded(llama_backend, ledger):
    import gc

    stream = Pipeline(llama_backend, ledger=ledger).call(ChatRequest(messages=CONVERSATION, params=PARAMS,
                                                                     stream=True))
    del stream
    gc.collect()
    assert [(r.status, r.error_type) for r in ledger.records] == [("error", "GeneratorExit")]
    assert Pipeline(llama_backend, ledger=ledger).chat(CONVERSATION, params=PARAMS).content is not None


def test_a_streamed_answer_counts_the_tokens_the_model_generated_as_a_whole_answer_does(llama_backend, ledger):
    """A stream's usage re-tokenized the text: the tokens a stop sequence matched were cut from the text and
    never counted, and sampled tokens do not always re-tokenize to as many."""
    client = Pipeline(llama_backend, ledger=ledger).openai()
    kwargs = dict(temperature=0, max_tokens=40, stop=["5"],
                  messages=[{"role": "user", "content": "Count from 1 to 20 separated by commas."}])
    whole = client.chat.completions.create(model="m", **kwargs)
    chunks = list(client.chat.completions.create(model="m", stream=True, stream_options={"include_usage": True},
                                                 **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert ledger.records[-1].tokens_out == ledger.records[-2].tokens_out
    # Cut at max_tokens, the model generated exactly that many, whatever the text re-tokenizes to.
    chunks = list(client.chat.completions.create(
        model="m", stream=True, stream_options={"include_usage": True}, temperature=1.3, seed=0, max_tokens=25,
        messages=[{"role": "user", "content": "Write a long poem about Zürich, with emoji and Größe."}]))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 25 == ledger.records[-1].tokens_out


@pytest.mark.parametrize("max_tokens", [20, 23])
@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_caps_an_answer_that_ends_inside_a_multibyte_character(llama_backend, max_tokens, stream):
    """llama-cpp-python samples on past max_tokens while the text ends inside an emoji or a CJK character: 21
    tokens came back for max_tokens=20 (billed, and past the window at its edge)."""
    client = Pipeline(llama_backend, ledger=Ledger()).openai()
    kwargs = dict(model="m", max_tokens=max_tokens, temperature=0,
                  messages=[{"role": "user", "content": "R\u00e9p\u00e8te: \U0001f600\U0001f389 \u4e2d\u6587"}])
    if stream:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        usage = chunks[-1].usage
        [finish] = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        answer = client.chat.completions.create(**kwargs)
        usage, finish = answer.usage, answer.choices[0].finish_reason
    assert usage.completion_tokens <= max_tokens and finish == "length"
    short = client.chat.completions.create(model="m", max_tokens=200, temperature=0,
                                           messages=[{"role": "user", "content": "Say hi"}])
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 200


def test_tool_choice_none_never_answers_with_a_tool_call(llama_backend):
    """The model still sees the tools, and may write a <tool_call> block unasked: it was parsed into
    tool_calls. SmolLM2-135M rarely writes one when told not to, so its text is given here."""
    import copy

    from ctxkit import LlamaCppBackend

    backend = LlamaCppBackend(llama_backend.model_path, n_ctx=1024, n_threads=1)
    real = backend._llama.create_completion
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call>'

    def wrote_a_call(prompt, stream=False, **kwargs):
        out = real(prompt=prompt, stream=False, **{**kwargs, "max_tokens": 1})
        out["choices"][0]["text"], out["choices"][0]["finish_reason"] = text, "stop"
        return out if not stream else (piece for piece in [copy.deepcopy({"choices": out["choices"]})])

    backend._llama.create_completion = wrote_a_call
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    client = Pipeline(backend).openai()
    kwargs = dict(model="m", messages=[{"role": "user", "content": "Weather in Berlin?"}], tools=[tool])
    try:
        called = client.chat.completions.create(**kwargs)
        assert called.choices[0].message.tool_calls, "with tool_choice auto the same text is a call"
        answer = client.chat.completions.create(tool_choice="none", **kwargs)
        assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
        assert "get_weather" in answer.choices[0].message.content
        chunks = list(client.chat.completions.create(tool_choice="none", stream=True, **kwargs))
        assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    finally:
        backend.close()


@pytest.mark.parametrize("stop", ["\n", "}", "Berlin"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_sequence_never_cuts_a_tool_call(llama_backend, stop, stream):
    """llama.cpp's own stop check ran inside the <tool_call> block: with stop=["\n"] every required call ended at
    "<tool_call>", which came back as the content (finish_reason "stop", no tool_calls)."""
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    client = Pipeline(llama_backend, ledger=Ledger()).openai()
    kwargs = dict(model="m", messages=[{"role": "user", "content": "Weather in Berlin?"}], tools=[tool],
                  tool_choice="required", stop=[stop], temperature=0, max_tokens=60)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(calls) == 1 and finish == ["tool_calls"]
        assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        answer = client.chat.completions.create(**kwargs)
        assert answer.choices[0].finish_reason == "tool_calls" and answer.choices[0].message.content is None
        assert answer.choices[0].message.tool_calls[0].function.name == "get_weather"
    # outside a call the stop still ends the answer, the stop text left out
    plain = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                           tools=[tool], tool_choice="auto", stop=["Paris"], temperature=0,
                                           max_tokens=60)
    if not plain.choices[0].message.tool_calls:
        assert "Paris" not in (plain.choices[0].message.content or "")


def test_an_async_call_counts_and_validates_off_the_event_loop(llama_backend, monkeypatch):
    """Counting a large prompt takes seconds: on the event loop it stalled every other call the loop served
    (a proxy's other tenants, its health checks)."""
    import threading

    counted_on: set[int] = set()
    count_prompt = llama_backend.counter.count_prompt

    def recording(*args, **kwargs):
        counted_on.add(threading.get_ident())
        return count_prompt(*args, **kwargs)

    monkeypatch.setattr(llama_backend.counter, "count_prompt", recording)

    async def main():
        pipeline = Pipeline(llama_backend, [DropOldestTurn()])
        await pipeline.acall(ChatRequest(messages=[{"role": "user", "content": "Say hi."}], params={"max_tokens": 2}))
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert counted_on and loop_thread not in counted_on


def test_an_async_call_given_up_stops_the_model_behind_a_wrap_call_only_stage(llama_backend, ledger):
    """A stage that writes only wrap_call runs in a thread whose call_next runs the rest on the loop as a task
    of its own: asyncio.wait_for giving up cancelled the caller, not that task, and the model went on to
    max_tokens for no one while the next call waited for it."""
    from ctxkit import Stage

    class Guard(Stage):
        def wrap_call(self, request, call_next):
            return call_next(request)

    pipeline = Pipeline(llama_backend, [Guard()], ledger=ledger)
    generated = []
    original = llama_backend._llama.create_completion

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        generated.append(out["usage"]["completion_tokens"])
        return out

    long = ChatRequest(messages=[{"role": "user", "content": "Write a very long essay about the history of rivers."}],
                       params={"max_tokens": 250, "temperature": 0.8})

    async def run():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pipeline.acall(long), 0.5)
        await pipeline.acall(ChatRequest(messages=[{"role": "user", "content": "Hi"}], params={"max_tokens": 2}))

    llama_backend._llama.create_completion = spy
    try:
        asyncio.run(run())
    finally:
        del llama_backend._llama.create_completion
    assert generated[0] < 250, "the model generated the whole answer after its caller gave up"
    assert ledger.records[0].error_type == "CancelledError" and ledger.records[1].status == "ok"


def test_an_async_call_cancelled_while_it_waited_for_the_local_model_sent_nothing(llama_backend, ledger):
    """Its timeout passing while it waited is recorded as never sent (tokens_sent 0); a cancellation at the
    same point was recorded as a prompt sent to the model, which never saw it."""
    pipeline = Pipeline(llama_backend, ledger=ledger)

    async def run():
        holder = await pipeline.acall(ChatRequest(messages=[{"role": "user", "content": "Write an essay."}],
                                                  params={"max_tokens": 60}, stream=True))
        chunks = holder.__aiter__()
        await chunks.__anext__()  # the holder has the model now

        async def waiting():
            return await pipeline.acall(ChatRequest(messages=[{"role": "user", "content": "Hi"}],
                                                    params={"max_tokens": 2}))

        task = asyncio.create_task(waiting())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await holder.aclose()

    asyncio.run(run())
    [cancelled] = [r for r in ledger.records if r.error_type == "CancelledError"]
    assert cancelled.tokens_sent == 0 and cancelled.cost_usd == 0


@pytest.mark.parametrize("parent", ["Stage", "DedupStage"])
def test_an_applications_own_hooks_stay_on_the_event_loop_thread(llama_backend, ledger, parent):
    """Running every stage's hooks in worker threads broke stages that worked in async calls: per-call state
    in a contextvar set in before_model was gone in after_model, asyncio.get_running_loop() raised, and a
    sqlite3 connection made at startup refused the worker thread. An app's subclass of a ctxkit stage that
    writes hooks of its own inherited ctxkit's hooks_in_thread, and broke the same way."""
    import contextvars
    import sqlite3
    import threading

    started: contextvars.ContextVar = contextvars.ContextVar("started", default=None)
    seen: list = []

    class Audit(Stage if parent == "Stage" else DedupStage):  # type: ignore[misc]
        name = "audit"

        def __init__(self):
            super().__init__()
            self.db = sqlite3.connect(":memory:")
            self.db.execute("CREATE TABLE log (n INTEGER)")

        def before_model(self, request):
            asyncio.get_running_loop()
            started.set("t0")
            self.db.execute("INSERT INTO log VALUES (?)", (len(request.messages),))
            return super().before_model(request)

        def after_model(self, request, response):
            seen.append((started.get(), threading.current_thread()))
            return response

    class QuietDedup(DedupStage):  # no hook of its own: ctxkit's hooks still run off the loop
        name = "quiet_dedup"

    quiet, quiet_ran_in = QuietDedup(), []
    ctxkits_hook = quiet.before_model
    quiet.before_model = lambda request: quiet_ran_in.append(threading.current_thread()) or ctxkits_hook(request)
    pipeline = Pipeline(llama_backend, stages=[Audit(), quiet], ledger=ledger)

    async def run():
        await pipeline.acall(ChatRequest(messages=[{"role": "user", "content": "Hi"}], params={"max_tokens": 2}))
        return threading.current_thread()

    loop_thread = asyncio.run(run())
    assert seen == [("t0", loop_thread)]
    assert quiet_ran_in and quiet_ran_in[0] is not loop_thread


def test_a_streamed_local_tool_call_is_the_call_the_whole_answer_makes(llama_backend, ledger):
    """The local stream held a call back with its own parser, beside the one OpenAIBackend streams through:
    the two are one now. Real model, tool_choice required (the grammar makes the call)."""
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    request = ChatRequest(messages=[{"role": "user", "content": "What is the weather in Oslo?"}], tools=[tool],
                          params={"tool_choice": "required", "max_tokens": 48, "temperature": 0, "seed": 3})
    pipeline = Pipeline(llama_backend, ledger=ledger)
    whole = pipeline.call(request)
    chunks = list(pipeline.call(request.override(stream=True)))
    texts = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "<tool_call>" not in texts and "get_weather" not in texts
    streamed = [call for c in chunks if c["choices"] for call in c["choices"][0]["delta"].get("tool_calls") or []]
    assert [c["function"] for c in streamed] == [c["function"] for c in whole.tool_calls]
    assert streamed[0]["function"]["name"] == "get_weather"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] \
        == ["tool_calls"]
    assert ledger.records[-1].status == "ok"


def test_n_threads_also_limits_how_the_prompt_is_read(llama_backend):
    """n_threads=1 left prompt reading on every core (llama-cpp-python's n_threads_batch default)."""
    from ctxkit import LlamaCppBackend

    for kwargs, batch in (({"n_threads": 1}, 1), ({"n_threads": 1, "n_threads_batch": 2}, 2)):
        backend = LlamaCppBackend(llama_backend.model_path, n_ctx=256, **kwargs)
        try:
            assert backend._llama.context_params.n_threads_batch == batch
        finally:
            backend.close()


# -- the local grammar keeps an integer's bounds; a prompt llama.cpp has whole in its cache counts whole -----
BOUNDED_DAYS = {"type": "object", "properties": {"city": {"type": "string"},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"]}
BOUNDED_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": BOUNDED_DAYS}}]


def test_tool_call_integer_bounds_are_enforced(llama_backend):
    # The model asks for 10-25 days here without the bounds in the grammar (llama-cpp-python ignores them).
    for seed in range(3):
        for text in ("Forecast for Tokyo, 10 days, in kelvin", " hi"):
            r = llama_backend.complete(ChatRequest(messages=[{"role": "user", "content": text}], tools=BOUNDED_TOOLS,
                                                   params={"tool_choice": "required", "temperature": 1.0,
                                                           "seed": seed, "max_tokens": 80}))
            (call,) = r.message["tool_calls"]
            jsonschema.validate(json.loads(call["function"]["arguments"]), BOUNDED_DAYS)


def test_response_format_integer_bounds_are_enforced(llama_backend):
    schema = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "exclusiveMaximum": 4}},
              "required": ["score"]}
    for seed in range(3):
        r = llama_backend.complete(ChatRequest(
            messages=[{"role": "user", "content": "Rate this movie from 1 to 3: it was 99 out of 100 great"}],
            params={"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
                    "temperature": 1.0, "seed": seed, "max_tokens": 30}))
        jsonschema.validate(json.loads(r.message["content"]), schema)


def _act(parameters: dict) -> list[dict]:
    return [{"type": "function", "function": {"name": "act", "description": "Do it.", "parameters": parameters}}]


def test_tool_call_integer_bounds_of_any_range_and_nullable_types_are_enforced(llama_backend):
    # Only ranges of at most 128 integers were held (as an enum): `minimum: 1` alone let -5 and 0 through, a
    # 1024-65535 port was 80, and `"type": ["integer", "null"]` dropped its bounds (10 stars of 5).
    cases = [({"count": {"type": "integer", "minimum": 1}}, "Set the count to -5."),
             ({"port": {"type": "integer", "minimum": 1024, "maximum": 65535}}, "Use port 80."),
             ({"stars": {"type": ["integer", "null"], "minimum": 1, "maximum": 5}}, "Rate it 10 stars."),
             ({"code": {"type": ["string", "null"], "maxLength": 3}}, "The code is ABCDEFG."),
             ({"ratio": {"type": "number", "minimum": 0, "maximum": 1}}, "Set the ratio to 2.5.")]
    for properties, text in cases:
        parameters = {"type": "object", "properties": properties, "required": list(properties)}
        for seed in range(2):
            r = llama_backend.complete(ChatRequest(messages=[{"role": "user", "content": text}], tools=_act(parameters),
                                                   params={"tool_choice": "required", "temperature": 1.0,
                                                           "seed": seed, "max_tokens": 48}))
            (call,) = r.message["tool_calls"]
            jsonschema.validate(json.loads(call["function"]["arguments"]), parameters)


def test_tool_call_patterns_with_escapes_groups_or_no_anchor_give_valid_calls(llama_backend):
    # The converter copied `\d`, `\.` into the grammar, where GBNF has no such escape, and refused `(?:`: the request
    # failed with a RequestError. An unanchored pattern got 32 free characters each side, which the model filled
    # ('}}  # This will return the value12345'): it is held to its match now, which the schema accepts as well.
    cases = [({"zip": {"type": "string", "pattern": r"^\d{5}$"}}, "Ship it to zip code 94103."),
             ({"zip": {"type": "string", "pattern": "[0-9]{5}"}}, "Ship it to zip code 94103."),
             ({"ref": {"type": "string", "pattern": r"^(?:AB|CD)-\d{3}\.\w+$"}}, "The reference is AB-123.x7."),
             ({"price": {"type": "string", "pattern": r"^\$\d+(\.\d{2})?$"}}, "It costs $12.50.")]
    for properties, text in cases:
        parameters = {"type": "object", "properties": properties, "required": list(properties)}
        r = llama_backend.complete(ChatRequest(messages=[{"role": "user", "content": text}], tools=_act(parameters),
                                               params={"tool_choice": "required", "temperature": 0, "max_tokens": 48}))
        (call,) = r.message["tool_calls"]
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, parameters)
        (value,) = arguments.values()
        pattern = next(iter(properties.values()))["pattern"]
        assert re.fullmatch(pattern.strip("^$"), value), value  # the match alone, nothing around it


def test_integer_bounds_past_16_digits_or_2_to_the_53_still_give_a_valid_call(llama_backend):
    # `minimum: 10**17` alone made an empty rule (the model wrote `{"ts": }`, handed over as text, no call), and
    # bounds went through float(): 2**53 + 3 became 2**53 + 4, refusing the one integer the schema allows.
    cases = [{"type": "integer", "minimum": 10**17}, {"type": "number", "minimum": 10**17},
             {"type": "integer", "maximum": -(10**17)}, {"type": "integer", "minimum": 2**53 + 3, "maximum": 2**53 + 3}]
    for schema in cases:
        parameters = {"type": "object", "properties": {"ts": schema}, "required": ["ts"]}
        r = llama_backend.complete(ChatRequest(messages=[{"role": "user", "content": "Set ts."}], tools=_act(parameters),
                                               params={"tool_choice": "required", "temperature": 0, "max_tokens": 90}))
        (call,) = r.message["tool_calls"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), parameters)


def test_a_tool_call_the_grammar_cannot_hold_to_its_schema_is_a_typed_error(llama_backend):
    # `multipleOf` is not in the grammar: {"qty": 7} for a multiple of 5 was handed over as a valid call.
    from ctxkit import ToolCallSchemaError

    parameters = {"type": "object", "properties": {"qty": {"type": "integer", "multipleOf": 5}}, "required": ["qty"]}
    request = ChatRequest(messages=[{"role": "user", "content": "Buy 7."}], tools=_act(parameters),
                          params={"tool_choice": "required", "temperature": 0, "max_tokens": 48})
    with pytest.raises(ToolCallSchemaError) as raised:
        llama_backend.complete(request)
    error = raised.value
    assert error.tool == "act" and error.where == "arguments['qty']" and "multiple of 5" in str(error)
    assert json.loads(error.arguments)["qty"] % 5 and error.completion_tokens
    with pytest.raises(ToolCallSchemaError):  # streamed too: the call is held back to the end, then refused
        list(llama_backend.stream(request))

def test_an_answer_the_grammar_cannot_hold_to_the_response_format_is_a_typed_error(llama_backend):
    # A response format's schema was never checked after generation: {"qty": 7} for a multiple of 5 (and a value
    # past a maxLength too wide for the grammar) reached the app as a valid answer. An answer cut short by
    # max_tokens or by the caller's stop sequence is returned as it is, with its finish_reason, as OpenAI does.
    from ctxkit import ResponseFormatError

    schema = {"type": "object", "properties": {"qty": {"type": "integer", "multipleOf": 5}}, "required": ["qty"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": schema}}

    def order(text: str, **params: object) -> ChatRequest:
        return ChatRequest(messages=[{"role": "user", "content": text}],
                           params={"response_format": fmt, "temperature": 0, "max_tokens": 30, **params})

    for answer in (llama_backend.complete, lambda request: list(llama_backend.stream(request))):
        with pytest.raises(ResponseFormatError) as raised:
            answer(order("Buy 7."))
        error = raised.value
        assert error.where == "content['qty']" and "multiple of 5" in str(error) and error.completion_tokens
        assert json.loads(error.content)["qty"] % 5
    assert json.loads(llama_backend.complete(order("Buy 10.")).message["content"])["qty"] == 10
    cut = llama_backend.complete(order("Buy 7.", max_tokens=3))
    assert cut.finish_reason == "length" and not cut.message["content"].endswith("}")
    stopped = llama_backend.complete(order("Buy 7.", stop=[":"]))
    streamed = list(llama_backend.stream(order("Buy 7.", stop=[":"])))
    assert stopped.finish_reason == "stop" and ":" not in stopped.message["content"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed if c["choices"]) == \
        stopped.message["content"]


def test_exact_prefix_cache_hit_is_all_cached(llama_backend):
    request = ChatRequest(messages=[{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
                          params={"max_tokens": 1, "temperature": 0})
    llama_backend.complete(request)
    evaluated: list[int] = []
    llama = llama_backend._llama
    real_eval = llama.eval
    llama.eval = lambda tokens: (evaluated.append(len(tokens)), real_eval(tokens))[1]
    try:
        again = llama_backend.complete(request)
    finally:
        del llama.eval
    assert sum(evaluated) == again.usage.prompt_tokens - again.usage.cached_tokens


# -- a closed local backend fails what still counts with it typed, never with a SIGSEGV -------------------
HI = [{"role": "user", "content": "Hi"}]


def test_a_call_and_a_dropped_stream_after_close_are_typed_not_a_crash(tmp_path):
    backend = LlamaCppBackend(n_ctx=1024, n_threads=1)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    pipeline = Pipeline(backend, [], ledger=ledger)
    stream = pipeline.call(ChatRequest(messages=HI, params={"max_tokens": 2}, stream=True))
    stream.cycle = stream  # freed by the collector, after the close
    del stream
    counter = backend.counter
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        counter.count_text("hello")
    with pytest.raises(BackendError, match="closed"):
        pipeline.openai().chat.completions.create(model="m", messages=HI, max_tokens=2)
    gc.collect()  # the dropped stream is recorded (abandoned), with the model already freed
    assert '"error_type":"GeneratorExit"' in ledger.path.read_text()


def test_a_stream_holds_back_a_stop_that_ends_in_a_possible_tool_call_start():
    """"return a <" may go on as "<tool_call>" (then "a <" is no stop) or as "< b" (then it is): the stream passed
    "return a " on, and once " b" came the stop's own text had already been sent."""
    from ctxkit.backends.tool_format import stop_at, stop_safe_end

    text = "    return a <"
    assert stop_at(text, ["a <"]) is None  # not yet: the "<" may begin a call
    assert stop_safe_end(text, ["a <"]) <= text.index("a <")
    assert stop_safe_end(text, [" <"]) <= text.index(" <")
    assert stop_at(text + " b", ["a <"]) == text.index("a <")
    assert stop_safe_end("see <tool", ["zzz"]) == len("see ")  # other stops: as before


def test_the_stop_check_detokenizes_each_token_once(llama_backend):
    """The check ran after every token on the whole answer detokenized again: O(n^2) in Python
    (15 s of a 4,000-token answer, 8 ms a token at the end)."""
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    detokenize = llama_backend._llama.detokenize
    ours = []

    def counting(tokens, *args, **kwargs):
        if "prev_tokens" not in kwargs:  # llama-cpp-python's own calls pass prev_tokens
            ours.append(len(tokens))
        return detokenize(tokens, *args, **kwargs)

    llama_backend._llama.detokenize = counting
    try:
        answer = Pipeline(llama_backend, ledger=Ledger()).openai().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Count from 1 to 100."}], tools=[tool],
            stop=["@@@"], temperature=0, max_tokens=60,
            logit_bias={str(llama_backend._llama.token_eos()): -100})
    finally:
        del llama_backend._llama.detokenize
    n = answer.usage.completion_tokens
    assert n > 30 and sum(ours) <= n + 1, (n, sum(ours))


def test_remembered_prompts_share_one_copy_of_a_resent_tool_set(llama_backend, ledger):
    """The proxy decodes a new catalog for every call: the prompts the pipeline remembers for prefix accounting
    must hold it once, not once per call (1,024 copies of a large catalog)."""
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    pipeline = Pipeline(llama_backend, stages=[], ledger=ledger)
    for question in ("Weather in Oslo?", "Weather in Rome?"):
        tools = json.loads(json.dumps([tool]))  # equal content, new objects, as a decoded request body has
        pipeline.call(ChatRequest(messages=[{"role": "user", "content": question}], tools=tools,
                                  params={"max_tokens": 1}))
    remembered = list(pipeline._sent_prompts._entries.values())
    assert len(remembered) == 2 and remembered[0].tools is remembered[1].tools


def test_a_sync_stream_read_on_by_another_thread_lets_the_thread_that_read_it_wait(llama_backend):
    """A stream read one step per pool thread (Starlette's StreamingResponse over a sync iterator) left the model
    marked as held by the last thread that stepped it: a call that pool thread ran next (another request's sync
    endpoint) failed at once with BackendError, though another thread was reading the stream on."""
    import threading

    pipeline = Pipeline(llama_backend, ledger=Ledger())
    stream = pipeline.call(ChatRequest(messages=[{"role": "user", "content": "Count from one to twenty."}],
                                       params={"max_tokens": 24, "temperature": 0}, stream=True))
    it = iter(stream)
    next(it)
    next(it)  # read in this thread so far

    def read_on():
        time.sleep(0.2)
        for _ in it:  # another thread reads the rest
            time.sleep(0.02)

    reader = threading.Thread(target=read_on)
    reader.start()
    try:
        answer = pipeline.call(ChatRequest(messages=[{"role": "user", "content": "Say hi."}], params={"max_tokens": 4}))
    finally:
        reader.join()
    assert answer.usage.completion_tokens >= 1


def _answer_in_fork(backend: LlamaCppBackend) -> None:
    import os

    request = ChatRequest(messages=[{"role": "user", "content": "Say hi"}], params={"max_tokens": 4})
    backend.complete(request)
    asyncio.run(asyncio.wait_for(backend.acomplete(request), 20))
    os._exit(0)


@pytest.mark.timeout(120)
def test_a_child_forked_after_the_model_answered_can_answer(llama_backend):
    """gunicorn --preload with a warm-up call, or multiprocessing's fork: after the parent generated (sync and async),
    a forked child's first generation hung for ever in libgomp (llama.cpp's threads), and its async calls queued
    work for executor threads that were the parent's."""
    request = ChatRequest(messages=[{"role": "user", "content": "Say hi"}], params={"max_tokens": 4})
    llama_backend.complete(request)
    asyncio.run(llama_backend.acomplete(request))
    assert exit_code_in_fork(_answer_in_fork, llama_backend) == 0
    assert llama_backend.complete(request).usage.completion_tokens >= 1  # the parent keeps its threads



class CancelsWhileCounted(Stage):
    """Passes the request on; the `n`-th time the ledger counts what reaches it (in a worker thread), the
    call's task is cancelled and the count takes a while: a client that goes away while a stage counts."""

    def __init__(self, n: int, loop: asyncio.AbstractEventLoop) -> None:
        self.n, self.loop, self.task, self.seen = n, loop, None, 0

    def naive_request(self, request):
        self.seen += 1
        if self.seen == self.n and self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)
            time.sleep(0.2)  # the cancellation lands while the call awaits this count
        return request


def test_an_async_call_cancelled_between_stages_still_has_savings_that_add_up(llama_backend, ledger):
    """Each stage's tokens(in) was added after an await: a call cancelled there (a client gone while a stage
    counted) was recorded without that stage's tokens(in), and its savings fell short of tokens_naive -
    tokens_sent by them (the whole prompt for the first stage), where a sync call's failing stage keeps them."""
    async def cancelled_at(n: int) -> None:
        second = CancelsWhileCounted(n, asyncio.get_running_loop())
        pipeline = Pipeline(llama_backend, [DropOldestTurn(), second], ledger=ledger)
        second.task = asyncio.create_task(pipeline.acall(ChatRequest(messages=CONVERSATION, params=PARAMS)))
        try:
            await asyncio.wait_for(second.task, 60)
        except asyncio.CancelledError:
            pass

    async def run() -> None:
        for n in range(2, 6):  # each count of what reaches the second stage after the call's own (the first)
            await cancelled_at(n)

    asyncio.run(asyncio.wait_for(run(), 300))
    sent = counted(llama_backend, CONVERSATION[:1] + CONVERSATION[3:])  # what the stages pass on
    cancelled = [r for r in ledger.records if r.status == "error"]
    assert len(ledger.records) == 4 and cancelled
    for record in cancelled:
        assert record.error_type == "CancelledError" and record.tokens_sent == 0
        # cancelled in a stage (nothing passed on yet), or while the backend's call was being prepared
        assert sum(record.saved_by_stage.values()) in (record.tokens_naive, record.tokens_naive - sent), record


def test_an_async_call_cancelled_while_its_prompt_was_counted_sent_nothing(llama_backend, ledger, monkeypatch):
    """The worker thread that checked and counted the prompt also marked it sent: a call cancelled while that
    thread counted (a stage's edited message) was recorded with the prompt sent and paid for, though no
    backend ever got it."""
    real = llama_backend.counter
    loop_and_task: list[Any] = []

    class CancelsWhileCountingEdits:  # the backend's own counter; the caller goes away while it counts
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def count_prompt(self, messages: Any, tools: Any = None) -> int:
            if loop_and_task and messages[0] == {"role": "system", "content": ""}:  # one edited message's size
                loop, task = loop_and_task.pop()
                loop.call_soon_threadsafe(task.cancel)
                time.sleep(0.2)  # the cancellation lands while the call awaits this count
            return real.count_prompt(messages, tools)

    monkeypatch.setattr(llama_backend, "counter", CancelsWhileCountingEdits())
    pipeline = Pipeline(llama_backend, [TrimLongMessages()], ledger=ledger)

    async def run() -> None:
        task = asyncio.create_task(pipeline.acall(ChatRequest(messages=CONVERSATION, params=PARAMS)))
        loop_and_task.append((asyncio.get_running_loop(), task))
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 60)
        await asyncio.sleep(0.5)  # the counting thread has ended

    asyncio.run(run())
    assert not loop_and_task, "the call was not cancelled while it counted"
    [record] = ledger.records
    assert record.error_type == "CancelledError"
    assert record.tokens_sent == 0 and record.latency_ms["backend_calls"] == 0
