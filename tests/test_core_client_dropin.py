"""The drop-in client takes what real openai-client code passes it."""

from __future__ import annotations

import asyncio
import logging

import pydantic
from openai.types.chat import ChatCompletion

from ctxkit import Pipeline

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_a_returned_message_object_can_be_appended_to_the_history(llama_backend, ledger):
    # The openai cookbook's agent loop: messages.append(response.choices[0].message), a ChatCompletionMessage.
    client = Pipeline(llama_backend, ledger=ledger).openai()
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER], tool_choice="required",
                                           max_tokens=40, temperature=0)
    message = first.choices[0].message
    messages += [message, {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "sunny"}]
    second = client.chat.completions.create(model="m", messages=messages, max_tokens=5, temperature=0)
    assert isinstance(second, ChatCompletion)
    plain = client.chat.completions.create(model="m", messages=[messages[0], message.model_dump(exclude_none=True),
                                                                messages[2]], max_tokens=5, temperature=0)
    assert second.usage.prompt_tokens == plain.usage.prompt_tokens


def test_with_raw_response_parses_to_the_completion(llama_backend, ledger):
    pipeline = Pipeline(llama_backend, ledger=ledger)
    raw = pipeline.openai().chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert isinstance(raw.parse(), ChatCompletion) and dict(raw.headers) == {}

    async def run() -> ChatCompletion:
        araw = await pipeline.async_openai().chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        return araw.parse()

    assert isinstance(asyncio.run(run()), ChatCompletion)


def test_beta_parse_is_the_same_structured_output(llama_backend, ledger):
    import pydantic

    class Answer(pydantic.BaseModel):
        city: str

    client = Pipeline(llama_backend, ledger=ledger).openai()
    parsed = client.beta.chat.completions.parse(model="m", messages=[{"role": "user", "content": "Capital of France?"}],
                                                response_format=Answer, max_tokens=30, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Answer)
    assert Pipeline(llama_backend, ledger=ledger).async_openai().beta.chat.completions is not None


def test_errors_are_also_the_openai_clients_own(llama_backend, ledger):
    import pickle

    import openai
    import pytest

    from ctxkit import ContextOverflowError, RequestError

    client = Pipeline(llama_backend, ledger=ledger).openai()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], temperature=5)
    error = caught.value
    assert isinstance(error, RequestError) and error.status_code == 400 and error.param == "temperature"
    assert str(error) == "temperature: must be a number from 0 to 2, got 5"
    assert isinstance(pickle.loads(pickle.dumps(error)), openai.BadRequestError)
    with pytest.raises(openai.BadRequestError) as caught:  # OpenAI's context_length_exceeded is a 400 too
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 5000}], max_tokens=5)
    assert isinstance(caught.value, ContextOverflowError)

    async def run() -> None:
        await Pipeline(llama_backend, ledger=ledger).async_openai().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream="yes")

    with pytest.raises(openai.BadRequestError):
        asyncio.run(run())


def test_a_context_overflow_reads_as_openais_context_length_exceeded(llama_backend, ledger):
    """`ctxkit serve` answers code context_length_exceeded; the drop-in client's BadRequestError had code, type and
    body None and a response with no JSON, so `if e.code == "context_length_exceeded": trim()` never ran."""
    import openai
    import pytest

    client = Pipeline(llama_backend, ledger=ledger).openai()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "word " * 9000}])
    error = caught.value
    assert error.code == "context_length_exceeded" and error.type == "invalid_request_error"
    assert error.body["code"] == "context_length_exceeded"
    assert error.response.json()["error"]["code"] == "context_length_exceeded"


def test_an_error_reclassed_twice_still_pickles():
    """openai's class, then LangChain's (a LangChain agent over the drop-in client): the second class was made from
    the first made one, which has no name to pickle by (PicklingError in a process pool)."""
    import pickle

    import openai

    from adapters.langchain.errors import also_langchains
    from ctxkit import errors as ck
    from ctxkit.openai_errors import also_openais

    error = ck.BackendStatusError("slow down", backend="remote", status=429)
    also_openais(error)
    also_langchains(error)
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, openai.RateLimitError) and isinstance(again, ck.BackendStatusError)
    assert str(again) == str(error) and again.status_code == 429


# -- chat.completions.stream(...): openai's structured-output streaming helper ---------------------------
PERSON_PROMPT = [{"role": "user", "content": "Give a person named Ann aged 30 as JSON."}]


class Person(pydantic.BaseModel):
    name: str
    age: int


def test_stream_helper_gives_events_and_a_parsed_final_completion(llama_backend, ledger):
    client = Pipeline(llama_backend, ledger=ledger).openai()
    with client.chat.completions.stream(model="m", messages=PERSON_PROMPT, max_tokens=40, temperature=0,
                                        response_format=Person) as stream:
        kinds = {event.type for event in stream}
        final = stream.get_final_completion()
    assert "content.delta" in kinds and "content.done" in kinds
    assert isinstance(final.choices[0].message.parsed, Person)

    async def run():
        aclient = Pipeline(llama_backend, ledger=ledger).async_openai()
        async with aclient.chat.completions.stream(model="m", messages=PERSON_PROMPT, max_tokens=40, temperature=0,
                                                   response_format=Person) as astream:
            async for _ in astream:
                pass
            return await astream.get_final_completion()

    assert isinstance(asyncio.run(run()).choices[0].message.parsed, Person)
    assert ledger.path.read_text().count('"status":"ok"') == 2


def test_with_options_sets_the_calls_timeout_and_refuses_what_it_cannot_honour(llama_backend, ledger, caplog):
    """with_options() was an AttributeError: its timeout now reaches the call as create's own timeout= does."""
    import openai
    import pytest

    from ctxkit.errors import BackendTimeoutError, ConfigurationError

    pipeline = Pipeline(llama_backend, ledger=ledger)
    story = [{"role": "user", "content": "Write a long story about a dog."}]
    for client in (pipeline.openai(), pipeline.async_openai()):
        timed = client.with_options(timeout=0.3, max_retries=0)  # the local backend does not retry: honoured
        with pytest.raises(BackendTimeoutError) as timed_out:
            create = timed.chat.completions.create(model="m", messages=story, max_tokens=400, temperature=0)
            if asyncio.iscoroutine(create):
                asyncio.run(create)
        assert isinstance(timed_out.value, openai.APITimeoutError)
        with pytest.raises(ConfigurationError, match="cannot honour api_key, base_url:"):
            client.with_options(api_key="sk-x", base_url="http://x", max_retries=5)
        with caplog.at_level(logging.WARNING, logger="ctxkit.client"):  # openai code sets it everywhere: taken, said
            client.with_options(max_retries=5)
        assert "max_retries=5) is not per client" in caplog.text
    quick = pipeline.openai().with_options(timeout=0.001).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, timeout=60)  # the call's own wins
    assert isinstance(quick, ChatCompletion)


def test_models_lists_and_retrieves_the_backends_model(llama_backend, ledger):
    import openai
    import pytest
    from openai.pagination import SyncPage
    from openai.types import Model

    pipeline = Pipeline(llama_backend, ledger=ledger)
    page = pipeline.openai().models.list()
    assert isinstance(page, SyncPage) and [m.id for m in page] == [llama_backend.model]
    assert isinstance(pipeline.openai().models.retrieve(llama_backend.model), Model)
    with pytest.raises(openai.NotFoundError):
        pipeline.openai().models.retrieve("gpt-4o")

    async def run() -> tuple[list[str], list[str], str]:
        client = pipeline.async_openai()
        awaited = [m.id for m in (await client.models.list()).data]
        iterated = [m.id async for m in client.models.list()]
        return awaited, iterated, (await client.models.retrieve(llama_backend.model)).id

    assert asyncio.run(run()) == ([llama_backend.model], [llama_backend.model], llama_backend.model)


def test_with_streaming_response_parses_to_what_create_gives(llama_backend, ledger):
    import json

    from openai.types.chat import ChatCompletionChunk

    pipeline = Pipeline(llama_backend, ledger=ledger)
    hi = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    completions = pipeline.openai().chat.completions
    with completions.with_streaming_response.create(**hi) as response:
        assert isinstance(response.parse(), ChatCompletion) and response.status_code == 200
        assert json.loads(b"".join(response.iter_bytes()))["object"] == "chat.completion"
    with completions.with_streaming_response.create(**hi, stream=True) as response:
        lines = list(response.iter_lines())
    assert lines[-2:] == ["data: [DONE]", ""]
    assert ChatCompletionChunk.model_validate_json(lines[0].removeprefix("data: ")).choices
    with completions.with_streaming_response.create(**hi, stream=True) as response:
        assert all(isinstance(chunk, ChatCompletionChunk) for chunk in response.parse())

    async def run() -> tuple[ChatCompletion, list[str]]:
        acompletions = pipeline.async_openai().chat.completions
        async with acompletions.with_streaming_response.create(**hi) as aresponse:
            parsed = await aresponse.parse()
        async with acompletions.with_streaming_response.create(**hi, stream=True) as aresponse:
            return parsed, [line async for line in aresponse.iter_lines()]

    parsed, alines = asyncio.run(run())
    assert isinstance(parsed, ChatCompletion) and alines[-2:] == ["data: [DONE]", ""]


def test_default_headers_none_keeps_the_clients_headers_as_openai_does(llama_backend, ledger):
    """openai reads default_headers=None / default_query=None as "not given": ctxkit dropped the headers and
    query a with_options(...) before had set (a gateway's tenant or api-version), so the upstream call lost them."""
    import openai

    real = openai.OpenAI(api_key="x", default_headers={"X-Tenant": "acme"}, default_query={"api-version": "1"})
    kept = real.with_options(default_headers=None, default_query=None, timeout=10)
    assert kept.default_headers["X-Tenant"] == "acme" and kept.default_query == {"api-version": "1"}
    client = Pipeline(llama_backend, ledger=ledger).openai().with_options(
        default_headers={"X-Tenant": "acme"}, default_query={"api-version": "1"})
    again = client.with_options(default_headers=None, default_query=None, timeout=10)
    assert again._options == {"timeout": 10, "extra_headers": {"X-Tenant": "acme"}, "extra_query": {"api-version": "1"}}
    assert again.with_options(timeout=None)._options == {"extra_headers": {"X-Tenant": "acme"},
                                                         "extra_query": {"api-version": "1"}}


def test_a_dropped_client_lets_go_of_its_pipeline_at_once(llama_backend, ledger):
    """completions.with_raw_response and .with_streaming_response were kept on the completions they held: a
    reference cycle, so a pipeline (and its backend's loaded model) dropped with its client stayed alive until the
    cyclic garbage collector ran."""
    import gc
    import weakref

    gc.disable()  # what only the cyclic collector frees has to wait for it, as between two of its runs
    try:
        for make in (lambda p: p.openai(), lambda p: p.async_openai()):
            pipeline = Pipeline(llama_backend, ledger=ledger)
            client = make(pipeline)
            assert client.chat.completions.with_raw_response is not None
            dropped = weakref.ref(pipeline)
            del pipeline, client
            assert dropped() is None
    finally:
        gc.enable()
