"""CtxkitCallbackHandler: ledger records for plain LangChain runs, comparable with runs through ctxkit."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from adapters.langchain import CtxkitCallbackHandler, CtxkitChatModel
from ctxkit import Ledger, Pipeline, Stage
from ctxkit.report import summarize

PROMPT = ChatPromptTemplate.from_messages([
    ("system", "You are a terse assistant. Earlier notes: the user likes tea, lives in Leeds, has a cat."),
    ("user", "{question}"),
])


class DropSystemPrompt(Stage):
    """A test stage that saves a known amount: the system message is not sent."""

    def before_model(self, request):
        return request.override(messages=[m for m in request.messages if m["role"] != "system"])


@pytest.fixture
def plain_model(llama_backend):
    # A chat model with no stages, standing in for "the app without ctxkit": its pipeline's own ledger is
    # not the one compared; the callback handler writes the baseline records.
    return CtxkitChatModel(pipeline=Pipeline(llama_backend, ledger=Ledger()), temperature=0, max_tokens=4)


def test_the_handler_records_each_chat_model_call_with_its_usage(plain_model, llama_backend):
    baseline = Ledger()
    handler = CtxkitCallbackHandler(baseline, counter=llama_backend.counter, namespace="baseline")
    chain = PROMPT | plain_model | StrOutputParser()
    chain.invoke({"question": "Say hi."}, config={"callbacks": [handler], "metadata": {"thread_id": "t-1"}})
    asyncio.run(chain.ainvoke({"question": "Say bye."}, config={"callbacks": [handler]}))
    first, second = baseline.records
    for record in (first, second):
        assert record.status == "ok" and record.namespace == "baseline" and record.backend == "langchain"
        assert record.tokens_naive == record.tokens_sent > 0 and record.saved_by_stage == {}
        assert record.count_delta == 0, "counted and reported prompt tokens must agree for the same model"
        assert 0 < record.tokens_out <= 4
    assert first.conversation_id == "t-1"
    assert first.tokens_naive == plain_model.pipeline.ledger.records[0].tokens_sent


def test_runs_with_and_without_ctxkit_compare_in_one_report(plain_model, llama_backend):
    baseline = Ledger()
    handler = CtxkitCallbackHandler(baseline, counter=llama_backend.counter)
    (PROMPT | plain_model).invoke({"question": "Say hi."}, config={"callbacks": [handler]})
    with_ctxkit = Ledger()
    model = CtxkitChatModel(pipeline=Pipeline(llama_backend, [DropSystemPrompt()], ledger=with_ctxkit),
                            temperature=0, max_tokens=4)
    (PROMPT | model).invoke({"question": "Say hi."})
    [before], [after] = baseline.records, with_ctxkit.records
    assert after.tokens_naive == before.tokens_sent  # the same request, counted the same way
    assert after.tokens_sent < before.tokens_sent
    assert summarize([before])["tokens_saved"] == 0
    assert summarize([after])["tokens_saved"] == before.tokens_sent - after.tokens_sent


def test_a_failed_call_is_recorded_as_an_error(llama_backend):
    ledger = Ledger()
    handler = CtxkitCallbackHandler(ledger, counter=llama_backend.counter)
    model = CtxkitChatModel(pipeline=Pipeline(llama_backend, ledger=Ledger()), max_tokens=10_000)
    with pytest.raises(Exception, match="context"):
        model.invoke("hi", config={"callbacks": [handler]})  # 10,000 answer tokens do not fit in 4,096
    [record] = ledger.records
    assert record.status == "error" and record.error_type == "ContextOverflowError" and record.tokens_sent == 0


def test_a_streamed_run_is_recorded_as_a_stream(plain_model, llama_backend):
    ledger = Ledger()
    handler = CtxkitCallbackHandler(ledger, counter=llama_backend.counter)
    chunks = list(plain_model.stream("Say hi.", config={"callbacks": [handler]}))
    assert chunks
    plain_model.invoke("Say hi.", config={"callbacks": [handler]})
    assert [r.stream for r in ledger.records] == [True, False]
    assert [r.stream for r in plain_model.pipeline.ledger.records] == [True, False]  # the pipeline agrees


def test_a_failed_calls_error_text_is_redacted(llama_backend):
    """The handler wrote str(error) as it was; the pipeline redacts the same ledger field. requests' HTTPError
    quotes the URL, and a key in its query string with it."""
    from langchain_core.language_models import BaseChatModel

    class Refused(BaseChatModel):
        @property
        def _llm_type(self):
            return "refused"

        def _generate(self, messages, stop=None, run_manager=None, **kwargs):
            raise RuntimeError("401 Client Error: Unauthorized for url: https://gw.example.com/v1/chat"
                               "?api_key=sk-proj-abcdEFGH1234ijklMNOP5678")

    ledger = Ledger()
    with pytest.raises(RuntimeError):
        Refused().invoke("hi", config={"callbacks": [CtxkitCallbackHandler(ledger, counter=llama_backend.counter)]})
    [record] = ledger.records
    assert record.status == "error" and "Unauthorized" in record.error and "EFGH1234" not in record.error
