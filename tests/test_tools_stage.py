"""ToolRetrievalStage end to end: a real agent step on SmolLM2 through the pipeline, the find_tools
recovery on the real model, and the recovery paths a provider's unconstrained answers need.

The local model is grammar-constrained to the tools it is sent, so it can never call an unsent tool;
those paths are driven by provider answers written out as data (`_Provider`), the rest by the model.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path

import pytest

from ctxkit import ChatRequest, ChatResponse, Pipeline, Usage
from ctxkit.errors import ConfigurationError, UnknownToolError
from ctxkit.response import AsyncChatStream, ChatStream, response_as_chunks
from ctxkit.stage import Stage
from ctxkit.stages.tools import FIND_TOOLS, ToolRetrievalStage

from .forks import exit_code, start_in_fork

FIXTURES = Path(__file__).parent / "fixtures" / "tools"
PARAMS = {"tool_choice": "required", "max_tokens": 96, "temperature": 0, "seed": 7}


@pytest.fixture(scope="module")
def catalog():
    return json.loads((FIXTURES / "catalog.json").read_text())[:50]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "tool-index"


def _events(record, kind):
    return [e for e in record.events if e["stage"] == "tool_retrieval" and e["kind"] == kind]


def test_agent_step_calls_a_selected_tool_and_the_ledger_shows_the_saving(llama_backend, embedder, catalog,
                                                                          index_dir, ledger):
    stage = ToolRetrievalStage(top_k=3, compact=True, embedder=embedder, index_dir=index_dir)
    pipeline = Pipeline(llama_backend, stages=[stage], ledger=ledger)
    messages = [{"role": "user", "content": "Get the stock price of Apple for the last 5 days in NASDAQ."}]
    response = pipeline.chat(messages, tools=catalog, params=PARAMS)
    record = ledger.records[-1]
    sent = _events(record, "selected")[0]["sent"]
    assert "get_stock_price" in sent and len(sent) == 3
    order = [t["function"]["name"] for t in catalog]
    assert sent == sorted(sent, key=order.index), "tools go out in catalog order"
    assert response.tool_calls, f"tool_choice=required must produce a call, got {response.content!r}"
    call = response.tool_calls[0]["function"]
    assert call["name"] in sent
    assert isinstance(json.loads(call["arguments"]), dict)
    naive_tools = llama_backend.counter.count_prompt(messages, catalog) - llama_backend.counter.count_prompt(messages)
    assert record.saved_by_stage["tool_retrieval"] > 0.8 * naive_tools, (record.saved_by_stage, naive_tools)
    assert record.tokens_sent < record.tokens_naive / 3


def test_model_can_search_the_catalog_with_find_tools(llama_backend, embedder, catalog, index_dir, ledger):
    stage = ToolRetrievalStage(catalog=catalog, top_k=2, recovery="find_tools", compact=True, embedder=embedder,
                               index_dir=index_dir)
    pipeline = Pipeline(llama_backend, stages=[stage], ledger=ledger)
    forced = {**PARAMS, "tool_choice": {"type": "function", "function": {"name": FIND_TOOLS}}}
    response = pipeline.chat([{"role": "user", "content": "What is the musical scale of C sharp major?"}],
                             params=forced)
    record = ledger.records[-1]
    first, second = _events(record, "selected")
    assert FIND_TOOLS not in first["sent"]  # the meta-tool is offered beside the selection, not selected
    search = _events(record, "find_tools")[0]
    assert search["queries"] and search["found"]
    assert record.latency_ms["backend_calls"] == 2
    assert set(search["found"]) <= set(second["sent"])
    # The re-run must force a real tool (tool_choice named find_tools, which is no longer offered). SmolLM2
    # may ramble inside an argument until max_tokens cuts the call off, but the grammar fixes the name.
    if response.tool_calls:
        called = response.tool_calls[0]["function"]["name"]
    else:
        match = re.match(r'<tool_call>\n\{"name": "([^"]+)"', response.content or "")
        assert match, f"the re-run must answer with a tool call, got {response.content!r}"
        called = match.group(1)
    assert called in second["sent"] and called != FIND_TOOLS


class _Provider:
    """Answers as a provider would (no grammar): each call gets the next scripted assistant message."""

    def __init__(self, *messages: dict) -> None:
        self.messages = list(messages)
        self.requests: list[ChatRequest] = []

    def _answer(self, request: ChatRequest) -> ChatResponse:
        self.requests.append(request)
        message = self.messages.pop(0)
        return ChatResponse(message=message, finish_reason="tool_calls" if message.get("tool_calls") else "stop",
                            usage=Usage(100, 10), model="gpt-4o", backend="openai")

    def __call__(self, request: ChatRequest) -> ChatResponse:
        return self._answer(request)

    async def acall(self, request: ChatRequest) -> ChatResponse:
        return self._answer(request)


def _call(name: str, arguments: str = "{}") -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}]}


@pytest.fixture(scope="module")
def stage(embedder, index_dir, catalog):
    return ToolRetrievalStage(catalog=catalog, top_k=2, embedder=embedder, index_dir=index_dir)


REQUEST = ChatRequest(messages=[{"role": "user", "content": "Calculate the electric field 3 m from a 2 C charge."}])


def test_a_call_to_an_unsent_catalog_tool_is_rerun_once_with_that_tool(stage):
    answer = _call("get_stock_price", '{"company": "AAPL"}')
    provider = _Provider(answer, answer)
    response = stage.wrap_call(REQUEST, provider)
    first, second = (r.tool_names for r in provider.requests)
    assert "get_stock_price" not in first and "get_stock_price" in second
    assert set(first) <= set(second)
    assert response.tool_calls[0]["function"]["name"] == "get_stock_price"


def test_the_async_twin_recovers_the_same_way(stage):
    provider = _Provider(_call("get_stock_price"), _call("get_stock_price"))
    response = asyncio.run(stage.awrap_call(REQUEST, provider.acall))
    assert len(provider.requests) == 2 and "get_stock_price" in provider.requests[1].tool_names
    assert response.tool_calls[0]["function"]["name"] == "get_stock_price"


def test_a_model_that_says_it_lacks_a_tool_gets_twice_the_tools(stage):
    provider = _Provider({"role": "assistant", "content": "Sorry, I don't have a tool for that."},
                         {"role": "assistant", "content": "Done."})
    stage.wrap_call(REQUEST, provider)
    assert len(provider.requests[1].tools) == 2 * len(provider.requests[0].tools)


def test_a_call_to_a_tool_outside_the_catalog_raises_a_typed_error(stage):
    with pytest.raises(UnknownToolError, match="launch_rocket"):
        stage.wrap_call(REQUEST, _Provider(_call("launch_rocket")))
    with pytest.raises(UnknownToolError):
        asyncio.run(stage.awrap_call(REQUEST, _Provider(_call("launch_rocket")).acall))


def test_without_recovery_an_answer_is_returned_as_it_came(embedder, index_dir, catalog):
    stage = ToolRetrievalStage(catalog=catalog, top_k=2, recovery="off", embedder=embedder, index_dir=index_dir)
    provider = _Provider(_call("get_stock_price"))
    assert stage.wrap_call(REQUEST, provider).tool_calls[0]["function"]["name"] == "get_stock_price"
    assert len(provider.requests) == 1


def test_bad_configuration_is_rejected_at_construction():
    with pytest.raises(ConfigurationError):
        ToolRetrievalStage(recovery="sometimes")
    with pytest.raises(ConfigurationError):
        ToolRetrievalStage(top_k=0)


@pytest.mark.parametrize("content, lacks", [
    ("Sorry, I don't have a tool for that.", True),
    ("I do not have access to a function that books flights.", True),
    ("There is no suitable tool available to send an SMS.", True),
    ("None of the provided functions can do this.", True),
    ("I was not given a tool to do that.", True),
    ("I don't have the tool required to check the weather.", True),
    ("I do not have a function needed to book flights.", True),
    ("No problem! I checked with the weather tool: 18 C and sunny.", False),
    ("There is no need to call any function; the answer is 4.", False),
    ("I don't have to use a tool for this: 2 + 2 = 4.", False),
    ("I cannot see why the function failed.", False),
    # Found in review: final answers of an agent loop that are no complaint about the selection.
    ("The report is ready. None of the tools returned an error.", False),
    ("I can't use the function without your API key. Could you send it?", False),
    ("No tool calls were made; the answer is in the document you gave me.", False),
    ("None of the tools here can convert currencies.", True),
    # Found in a later review: closing answers about tools that ran, or about what is missing to run one.
    ("No tool errors were reported.", False),
    ("No tool output was returned for Oslo.", False),
    ("I don't have the tool results yet.", False),
    ("I cannot use the tool because the API key is missing.", False),
    ("None of the tools are responding right now.", False),
    # A coding assistant's answers about the functions of the user's code, not about the tools it was sent.
    ("I can't find the function parse_date in the code you shared.", False),
    ("I don't see the function you're referring to. Could you paste it?", False),
    ("Sorry, I cannot see any function in your message.", False),
    ("I don't have the function's source code, please paste it.", False),
    ("I can't find the function `parseDate` anywhere.", False),
    ("I cannot find a tool for that.", True),
    ("I don't have any function to convert currencies.", True),
    # ... but a tool the selection missed, named or pointed at, still is
    ("I'm sorry, I don't have the tools you need to check the weather.", True),
    ("I don't have the function you're asking for.", True),
    ("Sorry, I don't have a function get_weather available, so I can't check that.", True),
    ("I don't have the function get_weather in my toolset.", True),
    ("I don't have the function getWeather, sorry.", True),
    ("I can't use the function send_email here, it isn't in my tools.", True),
    ("I don't have the function parse_date's source, could you paste it?", False),
    ("I don't have the function parse_date from your code.", False),
    # A tool named or described before the word "tool" is still missing; a property of functions is no tool.
    ("I don't have a weather tool.", True),
    ("I don't have the get_weather tool.", True),
    ("Sorry, there is no currency conversion tool available.", True),
    ("Python has no function overloading.", False),
    ("There is no need for functions here.", False),
    ("I can't use the same function twice.", False),
    ("I don't have the tool descriptions.", False),
    # A function of a language or library: no tool is missing (words name a tool only before "tool").
    ("JavaScript has no native function for deep cloning; use structuredClone.", False),
    ("There's no reduce function in Python 3 builtins; import it from functools.", False),
    ("There is no standard library function for this in C.", False),
    ("You can't use the map function on a dict directly.", False),
    ("I can't use an arrow function as a constructor.", False),
    # ... also with no word before "function": a language, product or library that has none is no missing tool.
    ("JavaScript has no function for deep cloning; use structuredClone.", False),
    ("There is no function in Python called flatten; use itertools.chain.", False),
    ("SQL has no function like that; use a CTE.", False),
    ("No function in the standard library does that, but numpy.flip does.", False),
    ("There is no tool in Photoshop for that.", False),
    ("There is no tool for checking flight prices in Europe.", True),
    ("There is no tool in my toolset for that.", True),
    ("We have no function for currency conversion.", True),
])
def test_only_an_answer_that_says_a_tool_is_missing_gets_a_second_call(stage, content, lacks):
    provider = _Provider({"role": "assistant", "content": content}, {"role": "assistant", "content": "Done."})
    response = stage.wrap_call(REQUEST, provider)
    assert len(provider.requests) == (2 if lacks else 1)
    assert response.content == ("Done." if lacks else content)


def test_a_stream_is_not_offered_the_find_tools_search_it_could_not_run(embedder, index_dir, catalog):
    stage = ToolRetrievalStage(catalog=catalog, top_k=2, recovery="both", embedder=embedder, index_dir=index_dir)
    seen: list[ChatRequest] = []

    def provider(request: ChatRequest):
        seen.append(request)
        return iter(())  # what a stream is to the stage: chunks that go out as they come

    stage.wrap_call(REQUEST.override(stream=True), provider)
    assert "find_tools" not in seen[0].tool_names and len(seen[0].tools) == 2
    whole = _Provider({"role": "assistant", "content": "Done."})
    stage.wrap_call(REQUEST, whole)
    assert "find_tools" in whole.requests[0].tool_names


class _StreamedProvider(Stage):
    """Streams a scripted provider answer (what an unconstrained provider may send) after the tool stage."""

    def __init__(self, message: dict) -> None:
        self.response = ChatResponse(message=message, finish_reason="tool_calls", usage=Usage(100, 10),
                                     model="gpt-4o", backend="openai")

    def wrap_call(self, request, call_next):
        return ChatStream(iter(response_as_chunks(self.response)), backend="openai", model="gpt-4o",
                          count_completion=None)

    async def awrap_call(self, request, call_next):
        async def chunks():
            for chunk in response_as_chunks(self.response):
                yield chunk

        return AsyncChatStream(chunks(), backend="openai", model="gpt-4o", count_completion=None)


@pytest.mark.parametrize("run", ["sync", "async"])
def test_a_streamed_answer_is_checked_against_the_catalog_when_it_ends(llama_backend, stage, ledger, run):
    """A stream went out unchecked: a call to a tool outside the catalog raised nothing, and neither it nor a
    call to a catalog tool that was not sent reached the ledger."""

    def collect(pipeline: Pipeline) -> ChatResponse:
        request = REQUEST.override(stream=True)
        if run == "sync":
            return pipeline.call(request).collect()

        async def go() -> ChatResponse:
            return await (await pipeline.acall(request)).collect()

        return asyncio.run(go())

    outside = Pipeline(llama_backend, stages=[stage, _StreamedProvider(_call("launch_rocket"))], ledger=ledger)
    with pytest.raises(UnknownToolError, match="launch_rocket"):
        collect(outside)
    assert ledger.records[-1].status == "error" and _events(ledger.records[-1], "unknown_tool")
    unsent = Pipeline(llama_backend, stages=[stage, _StreamedProvider(_call("get_stock_price"))], ledger=ledger)
    assert collect(unsent).tool_calls[0]["function"]["name"] == "get_stock_price"
    noted = _events(ledger.records[-1], "tool_not_sent")
    assert noted == [{"stage": "tool_retrieval", "kind": "tool_not_sent", "tools": ["get_stock_price"],
                      "recovered": False}]


def test_a_registered_catalog_counts_in_the_naive_tokens_as_if_the_app_had_sent_it(llama_backend, embedder,
                                                                                  catalog, index_dir, ledger):
    """The naive count left the registered catalog out, so the stage seemed to add the tools it sent."""
    messages = REQUEST.messages
    params = {"max_tokens": 1, "temperature": 0}
    registered = ToolRetrievalStage(catalog=catalog, top_k=3, embedder=embedder, index_dir=index_dir)
    Pipeline(llama_backend, stages=[registered], ledger=ledger).chat(messages, params=params)
    from_catalog = ledger.records[-1]
    per_request = ToolRetrievalStage(top_k=3, embedder=embedder, index_dir=index_dir)
    Pipeline(llama_backend, stages=[per_request], ledger=ledger).chat(messages, tools=catalog, params=params)
    from_request = ledger.records[-1]
    assert from_catalog.tokens_naive == from_request.tokens_naive == llama_backend.counter.count_prompt(
        messages, catalog)
    assert from_catalog.tokens_sent == from_request.tokens_sent < from_catalog.tokens_naive / 3
    assert from_catalog.saved_by_stage["tool_retrieval"] == from_catalog.tokens_naive - from_catalog.tokens_sent


@pytest.mark.parametrize("content", ["No tool is needed for this: 2 + 2 = 4.",
                                     "No function call required; Paris is the capital of France.",
                                     "No tools are necessary here."])
def test_an_answer_that_needs_no_tool_is_not_a_missing_tool(stage, content):
    provider = _Provider({"role": "assistant", "content": content}, {"role": "assistant", "content": "Done."})
    assert stage.wrap_call(REQUEST, provider).content == content and len(provider.requests) == 1


def test_a_new_pool_being_indexed_does_not_hold_up_calls_for_pools_already_indexed(embedder, catalog):
    """The index of a new pool was built (its tools embedded: seconds) under the stage's lock, and every
    other call waited for it."""
    import threading

    stage = ToolRetrievalStage(top_k=2, embedder=embedder)
    stage.index_for(catalog[:10])
    entered, release = threading.Event(), threading.Event()

    class HeldEmbedder:  # the real model, held inside its first embedding of the new pool
        def __getattr__(self, name):
            return getattr(embedder, name)

        def embed(self, texts):
            entered.set()
            release.wait(30)
            return embedder.embed(texts)

    stage._embedder = HeldEmbedder()
    builder = threading.Thread(target=stage.index_for, args=(catalog[10:30],))
    builder.start()
    try:
        assert entered.wait(30)
        done = threading.Event()
        threading.Thread(target=lambda: (stage.index_for(catalog[:10]), done.set())).start()
        assert done.wait(10), "a call for an indexed pool waited for another pool's build"
    finally:
        release.set()
        builder.join()
    assert len(stage._indexes) == 2


def test_stage_savings_add_up_when_a_cache_in_front_answers_for_a_registered_catalog(llama_backend, embedder,
                                                                                     catalog, index_dir, ledger,
                                                                                     tmp_path):
    """The cache's tokens(in) left out the catalog that the tool stage behind it supplies: on a hit the
    stages' savings summed to 37 of 11,961 tokens saved, and the rest belonged to no stage."""
    from ctxkit.stages.cache import ExactCacheStage, LocalStore

    with LocalStore(tmp_path / "cache") as store:
        tools = ToolRetrievalStage(catalog=catalog, top_k=3, embedder=embedder, index_dir=index_dir)
        pipeline = Pipeline(llama_backend, stages=[ExactCacheStage(store), tools], ledger=ledger)
        for _ in range(2):
            pipeline.chat(REQUEST.messages, params={"max_tokens": 4, "temperature": 0})
    miss, hit = list(ledger.records)[-2:]
    assert hit.answered_by == "exact_cache" and hit.tokens_sent == 0
    for record in (miss, hit):
        assert sum(record.saved_by_stage.values()) == record.tokens_naive - record.tokens_sent, record.saved_by_stage
    assert hit.saved_by_stage["exact_cache"] == hit.tokens_naive


@pytest.mark.parametrize("query", ["", "What the needed tool should do.", None])
def test_a_blank_find_tools_query_searches_with_the_request(llama_backend, embedder, index_dir, catalog, ledger,
                                                            query):
    """SmolLM2 often calls find_tools with an empty query, or with the schema's own words (4 of 5 forced
    calls): the stage searched for "" or "needed" and re-ran with tools unrelated to the request."""
    from ctxkit.stage import Stage

    provider = _Provider(_call(FIND_TOOLS, json.dumps({"query": query})), {"role": "assistant", "content": "Done."})

    class Scripted(Stage):  # the model's side of the exchange, as SmolLM2 answered it
        def wrap_call(self, request, call_next):
            return provider(request)

    stage = ToolRetrievalStage(catalog=catalog, top_k=2, recovery="find_tools", embedder=embedder, index_dir=index_dir)
    key = "sk-proj-Abc123Def456Ghi789Jkl012Mno345"
    asked = REQUEST.messages[0]["content"] + f" My API key is {key}."
    Pipeline(llama_backend, stages=[stage, Scripted()], ledger=ledger).call(
        REQUEST.override(messages=[{"role": "user", "content": asked}]))
    search = _events(ledger.records[-1], "find_tools")[0]
    assert search["queries"][0].startswith(REQUEST.messages[0]["content"])
    assert any("electric" in name for name in search["found"]), search["found"]
    assert key not in ledger.path.read_text(), "the user's words are recorded with their keys redacted"


def test_per_request_pools_do_not_each_leave_a_saved_index(embedder, catalog, tmp_path):
    """Each distinct pool saved a full copy of its vectors (1.2 MB per pool of 716 tools), never removed."""
    stage = ToolRetrievalStage(top_k=2, embedder=embedder, index_dir=tmp_path)
    for skip in range(5):
        stage.index_for([t for i, t in enumerate(catalog) if i != skip])
    assert list(tmp_path.glob("*/*/index.npz")) == []
    registered = ToolRetrievalStage(catalog=catalog, top_k=2, embedder=embedder, index_dir=tmp_path)
    registered.index_for(registered.catalog)
    assert len(list(tmp_path.glob("*/*/index.npz"))) == 1, "the registered catalog's index is saved whole"


def test_a_changed_selection_is_noted_as_the_prefix_it_uncaches(llama_backend, embedder, catalog, index_dir):
    """The tool block leads the prompt: a selection that changes between the calls of a conversation
    un-caches all of the previous prompt, and the ledger said nothing of it."""
    from ctxkit import Ledger
    from tests.recording import Sent

    ledger = Ledger()
    stage = ToolRetrievalStage(top_k=2, embedder=embedder, index_dir=index_dir, counter=llama_backend.counter)
    pipeline = Pipeline(llama_backend, stages=[stage, Sent()], ledger=ledger)
    messages = [{"role": "user", "content": "Get the stock price of Apple for the last 5 days."}]
    pipeline.chat(messages, tools=catalog)
    first = _events(ledger.records[-1], "selected")[0]["sent"]
    call = {"id": "c1", "type": "function", "function": {"name": first[0], "arguments": "{}"}}
    messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": "c1", "content": "190.5"}]
    pipeline.chat(messages, tools=catalog)  # a tool loop step: same tools, nothing un-cached
    assert _events(ledger.records[-1], "selected")[0]["sent"] == first
    assert not _events(ledger.records[-1], "prefix_invalidated")
    messages += [{"role": "assistant", "content": "Apple closed at 190.5."},
                 {"role": "user", "content": "Now translate 'good morning' into French."}]
    pipeline.chat(messages, tools=catalog)
    record = ledger.records[-1]
    changed = _events(record, "prefix_invalidated")
    assert _events(record, "selected")[0]["sent"] != first and len(changed) == 1
    assert changed[0]["tools_before"] == first and changed[0]["tokens"] > 0



def test_a_changed_selection_seen_after_a_restart_notes_what_the_same_process_notes(llama_backend, embedder,
                                                                                   catalog, index_dir):
    """A stage that did not see the previous call (a restart, another replica) re-selects it: it must subtract the
    head both tool blocks share as the stage that saw it does (it noted the whole previous prompt: 191 for 144)."""
    from ctxkit import Ledger

    system = {"role": "system", "content": "You are a helpful assistant for ACME Corp. Answer briefly and politely."}
    first = [system, {"role": "user", "content": "Get the stock price of Apple for the last 5 days."}]
    second = [*first, {"role": "assistant", "content": "Apple closed at 190.5."},
              {"role": "user", "content": "Now translate 'good morning' into French."}]
    noted = []
    for restart in (False, True):
        ledger = Ledger()
        stage = ToolRetrievalStage(top_k=2, embedder=embedder, index_dir=index_dir, counter=llama_backend.counter)
        Pipeline(llama_backend, stages=[stage], ledger=ledger).chat(first, tools=catalog)
        if restart:
            stage = ToolRetrievalStage(top_k=2, embedder=embedder, index_dir=index_dir, counter=llama_backend.counter)
        Pipeline(llama_backend, stages=[stage], ledger=ledger).chat(second, tools=catalog)
        (event,) = _events(ledger.records[-1], "prefix_invalidated")
        noted.append(event["tokens"])
    assert noted[0] == noted[1] > 0

class _Scripted(Stage):
    """The model's side of the exchange, played by a provider script behind the stage."""

    name = "scripted"

    def __init__(self, provider: _Provider) -> None:
        self.provider = provider

    def wrap_call(self, request, call_next):
        return self.provider(request)


def test_a_tool_forced_on_the_first_step_leaves_the_tool_block_as_the_next_step_finds_it(llama_backend, embedder,
                                                                                          index_dir, catalog, ledger):
    """tool_choice naming a tool kept it out of the ranking: the forced step got top_k other tools plus it, the
    next step ("auto", the tool now used) one tool fewer, and the changed block, which leads the prompt,
    un-cached it all without a prefix_invalidated in the ledger."""
    stage = ToolRetrievalStage(catalog=catalog, top_k=3, embedder=embedder, index_dir=index_dir)
    answer = _call("calculate_electric_field", '{"charge": 2, "distance": 3}')
    provider = _Provider(answer, {"role": "assistant", "content": "About 2e9 N/C."})
    pipeline = Pipeline(llama_backend, stages=[stage, _Scripted(provider)], ledger=ledger)
    pipeline.call(REQUEST.override(params={"tool_choice": {"type": "function",
                                                           "function": {"name": "calculate_electric_field"}}}))
    pipeline.call(REQUEST.override(messages=[*REQUEST.messages, answer,
                                             {"role": "tool", "tool_call_id": "call_1", "content": "2e9"}]))
    first, second = (r.tool_names for r in provider.requests)
    assert first == second and "calculate_electric_field" in first
    assert _events(ledger.records[-1], "prefix_invalidated") == []


def test_a_pinned_name_not_in_the_catalog_is_refused_when_the_stage_is_made(embedder, index_dir, catalog):
    with pytest.raises(ConfigurationError, match="calculate_electric_feld"):
        ToolRetrievalStage(catalog=catalog, pinned=["calculate_electric_feld"], embedder=embedder, index_dir=index_dir)
    with pytest.raises(ConfigurationError):
        ToolRetrievalStage(catalog=catalog, pinned="calculate_electric_field", embedder=embedder, index_dir=index_dir)


def test_a_second_answer_that_calls_another_unsent_tool_is_recorded(llama_backend, embedder, index_dir, catalog,
                                                                    ledger):
    """The re-run's answer called yet another tool that was not sent: the caller got it, the ledger said nothing."""
    stage = ToolRetrievalStage(catalog=catalog, top_k=2, embedder=embedder, index_dir=index_dir)
    provider = _Provider(_call("get_stock_price"), _call("find_prime_numbers"))
    Pipeline(llama_backend, stages=[stage, _Scripted(provider)], ledger=ledger).call(REQUEST)
    missed = _events(ledger.records[-1], "tool_not_sent")
    assert missed and missed[-1].get("recovered") is False, missed


def test_after_a_recovery_rerun_the_next_step_compares_with_what_the_rerun_sent(llama_backend, embedder, index_dir,
                                                                                catalog, ledger):
    """The previous prompt was selected again with this call's settings, not looked up: after a re-run that
    added the called tool, the next step reported hundreds of un-cached tokens for a block nobody sent."""
    stage = ToolRetrievalStage(catalog=catalog, top_k=2, embedder=embedder, index_dir=index_dir)
    answer = _call("get_stock_price", '{"company": "AAPL"}')
    provider = _Provider(answer, answer, {"role": "assistant", "content": "AAPL is at 190."})
    pipeline = Pipeline(llama_backend, stages=[stage, _Scripted(provider)], ledger=ledger)
    pipeline.call(REQUEST)
    pipeline.call(REQUEST.override(messages=[*REQUEST.messages, answer,
                                             {"role": "tool", "tool_call_id": "call_1", "content": "190"}]))
    rerun, step_two = provider.requests[1].tool_names, provider.requests[2].tool_names
    invalidated = _events(ledger.records[-1], "prefix_invalidated")
    assert (rerun == step_two) == (invalidated == []), (rerun, step_two, invalidated)


def test_an_answer_under_tool_choice_none_is_not_rerun_with_more_tools(stage):
    """The app asked for no call: more tools cannot change the answer, and the re-run billed it twice."""
    provider = _Provider({"role": "assistant", "content": "Sorry, I don't have a tool for that."},
                         {"role": "assistant", "content": "Done."})
    response = stage.wrap_call(REQUEST.override(params={"tool_choice": "none"}), provider)
    assert len(provider.requests) == 1 and response.content.startswith("Sorry")


def test_a_pool_that_differs_by_one_tool_stems_only_that_tool(embedder, catalog, monkeypatch):
    """Each distinct pool re-split and re-stemmed every schema (164-764 ms a call for 720 tools)."""
    from ctxkit.stages.tools import index as index_module

    stage = ToolRetrievalStage(top_k=2, embedder=embedder)
    stage.index_for(catalog[:40])
    built = []
    real = index_module.ToolDocument.from_tool

    def counting(tool):
        built.append(tool["function"]["name"])
        return real(tool)

    monkeypatch.setattr(index_module.ToolDocument, "from_tool", staticmethod(counting))
    stage.index_for([*catalog[:39], catalog[45]])
    assert set(built) == {catalog[45]["function"]["name"]}, "only the new tool (its terms and its embedding text)"


def test_an_embedder_of_another_dimension_does_not_share_minilms_stored_vectors(embedder, catalog, tmp_path):
    """An embedder that names no model was filed under MiniLM's: its vectors were stacked with MiniLM's
    stored ones, and the index build failed (all input arrays must have the same shape)."""
    import numpy as np

    class Small:
        dimension = 16

        def embed(self, texts):
            rng = np.random.default_rng(len(texts))
            vectors = rng.normal(size=(len(texts), 16)).astype(np.float32)
            return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    from ctxkit.embed import Embedder

    full = Embedder(precision="float32")  # stored under MiniLM's own name, as an unnamed embedder is
    ToolRetrievalStage(catalog=catalog[:10], top_k=2, embedder=full, index_dir=tmp_path).index_for(catalog[:10])
    small = ToolRetrievalStage(catalog=catalog[:11], top_k=2, embedder=Small(), index_dir=tmp_path)
    assert len(small.index_for(small.catalog)) == 11


def test_a_named_embedder_of_another_dimension_keeps_its_stored_vectors(catalog, tmp_path):
    """The dimension went into every non-384 embedder's folder name: one that names its model found none of
    the vectors it had stored, and embedded its whole catalog again after the upgrade."""
    import numpy as np

    class Named:
        dimension = 32
        model_id = "acme-embed"

        def embed(self, texts):
            vectors = np.random.default_rng(len(texts)).normal(size=(len(texts), 32)).astype(np.float32)
            return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    ToolRetrievalStage(catalog=catalog[:5], top_k=2, embedder=Named(), index_dir=tmp_path).index_for(catalog[:5])
    [folder] = [p.name for p in tmp_path.iterdir()]
    assert folder.startswith("acme-embed-") and "32d" not in folder  # the model's name and what it embeds
    again = ToolRetrievalStage(catalog=catalog[:5], top_k=2, embedder=Named(), index_dir=tmp_path).index_for(catalog[:5])
    assert again.embedded_tools == 0 and [p.name for p in tmp_path.iterdir()] == [folder], "found again, not re-embedded"


def test_a_second_find_tools_call_is_refused_for_what_it_is(embedder, index_dir, catalog):
    """A provider that searched again on the re-run (it had not been offered find_tools there) was told
    that find_tools 'is not among the 50 tools of the catalog', as if the app had a tool missing."""
    stage = ToolRetrievalStage(catalog=catalog, top_k=2, recovery="find_tools", embedder=embedder, index_dir=index_dir)
    search = _call(FIND_TOOLS, '{"query": "electric field"}')
    with pytest.raises(UnknownToolError, match="again after its one search"):
        stage.wrap_call(REQUEST, _Provider(search, search))


def test_a_find_tools_call_that_was_never_offered_is_not_called_a_second_search(embedder, index_dir, catalog):
    """Under recovery="rerun" no search is offered: a provider that calls find_tools anyway was told it had
    called it "again after its one search", which sends whoever reads the error looking for a first one."""
    stage = ToolRetrievalStage(catalog=catalog, top_k=2, recovery="rerun", embedder=embedder, index_dir=index_dir)
    provider = _Provider(_call(FIND_TOOLS, '{"query": "electric field"}'))
    with pytest.raises(UnknownToolError, match="did not offer") as raised:
        stage.wrap_call(REQUEST, provider)
    assert "again" not in str(raised.value)


def test_a_tool_block_remembered_for_one_tenant_is_not_another_tenants_previous_prompt(llama_backend, embedder,
                                                                                      index_dir, catalog):
    """The tool blocks sent were remembered by the prompt alone: a tenant whose conversation opens as another
    tenant's did ("Hello") got a prefix_invalidated event naming that tenant's tools, and its tokens."""
    from ctxkit import Ledger

    ledger = Ledger()
    stage = ToolRetrievalStage(top_k=2, embedder=embedder, index_dir=index_dir)
    provider = _Provider({"role": "assistant", "content": "Hi."}, {"role": "assistant", "content": "Sunny."})
    pipeline = Pipeline(llama_backend, stages=[stage, _Scripted(provider)], ledger=ledger)
    opening = [{"role": "user", "content": "Hello, I need help with something."}]
    private = [{**t, "function": {**t["function"], "name": f"acme_private_{i}"}} for i, t in enumerate(catalog[:6])]
    pipeline.call(ChatRequest(messages=opening, tools=private, namespace="team-a"))
    pipeline.call(ChatRequest(messages=[*opening, {"role": "assistant", "content": "Sure."},
                                        {"role": "user", "content": "Get the stock price of Apple."}],
                              tools=catalog[6:20], namespace="team-b"))
    record = ledger.records[-1]
    assert record.namespace == "team-b"
    leaked = [e for e in _events(record, "prefix_invalidated")
              if any(name.startswith("acme_private_") for name in e.get("tools_before", []))]
    assert leaked == []


def test_a_changed_selection_notes_what_the_backend_really_lost(llama_backend, embedder, catalog, index_dir):
    """The note counted the messages the stage saw, not the prompt later stages sent: documents rendered
    after it (1467 tokens lost, 537 noted in a review's repro) and the template's head, which stays cached."""
    from ctxkit import Ledger
    from ctxkit.stages.prefix import shared_prefix
    from ctxkit.stages.pruning import DocumentPruningStage

    sent: list[list[int]] = []
    real = llama_backend._prompt_tokens
    llama_backend._prompt_tokens = lambda request: (sent.append(real(request)) or sent[-1])
    try:
        ledger = Ledger()
        stages = [ToolRetrievalStage(top_k=2, embedder=embedder, index_dir=index_dir, counter=llama_backend.counter),
                  DocumentPruningStage(budget_tokens=600, embedder=embedder, counter=llama_backend.counter)]
        pipeline = Pipeline(llama_backend, stages=stages, ledger=ledger)
        documents = [{"id": "handbook", "text": " ".join(
            f"Policy {i}: staff in region {i % 6} may claim {20 + i} EUR a day for meals." for i in range(40))}]
        messages = [{"role": "user", "content": "Get the stock price of Apple for the last 5 days."}]
        ask = dict(tools=catalog, params={"max_tokens": 1, "temperature": 0}, conversation_id="c",
                   metadata={"documents": documents})
        pipeline.chat(list(messages), **ask)
        messages += [{"role": "assistant", "content": "Apple closed at 190.5."},
                     {"role": "user", "content": "Now translate 'good morning' into French."}]
        pipeline.chat(list(messages), **ask)
    finally:
        llama_backend._prompt_tokens = real
    before, now = sent
    noted = max(e["tokens"] for e in _events(ledger.records[-1], "prefix_invalidated"))
    assert noted == len(before) - shared_prefix(before, now)


@pytest.mark.parametrize("content", ["", [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]])
def test_a_request_with_no_words_still_gets_top_k_tools(stage, content):
    """An image-only or blank user message ranked nothing and was sent no tool at all: tool_choice "required"
    became a RequestError, and the model could call nothing."""
    provider = _Provider({"role": "assistant", "content": "Done."})
    stage.wrap_call(ChatRequest(messages=[{"role": "user", "content": content}]), provider)
    assert len([t for t in provider.requests[0].tools if t["function"]["name"] != FIND_TOOLS]) == stage.top_k


def test_a_schema_edited_under_the_same_name_is_noted_as_the_prefix_it_uncaches(llama_backend, embedder):
    """A tool's schema edited under the same name between two steps of a tool loop (an MCP server upgraded)
    changes the tool block, which leads the prompt: the backend's prefix cache keeps only the head before the
    edit, and the ledger must say so as it does when the selection's names change."""
    catalog = json.loads((FIXTURES / "catalog.json").read_text())[:50]
    from ctxkit import Ledger

    ledger = Ledger()
    stage = ToolRetrievalStage(top_k=3, embedder=embedder, counter=llama_backend.counter)
    pipeline = Pipeline(llama_backend, stages=[stage], ledger=ledger)
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Get the stock price of Apple for the last 5 days."}]
    params = {"max_tokens": 8, "temperature": 0}
    first = pipeline.chat(messages, tools=catalog, params=params, conversation_id="c1")
    sent = _events(ledger.records[-1], "selected")[0]["sent"]
    call = {"id": "c1", "type": "function", "function": {"name": sent[0], "arguments": "{}"}}
    messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": "c1", "content": "190.5"}]
    upgraded = json.loads(json.dumps(catalog))
    for tool in upgraded:
        if tool["function"]["name"] == sent[-1]:  # the last tool of the block: a constraint added
            properties = tool["function"]["parameters"]["properties"]
            properties[next(iter(properties))]["minLength"] = 1
    second = pipeline.chat(messages, tools=upgraded, params=params, conversation_id="c1")
    record = ledger.records[-1]
    assert _events(record, "selected")[0]["sent"] == sent  # the same names
    uncached = first.usage.prompt_tokens - second.usage.cached_tokens
    assert uncached > 0  # llama.cpp re-read the tool block from the edit on
    (event,) = _events(record, "prefix_invalidated")
    assert event["tokens"] == uncached


class _Embedding:
    """The real embedder, saying when it has begun embedding."""

    def __init__(self, embedder):
        self._embedder = embedder
        self.begun = threading.Event()

    def __getattr__(self, name):
        return getattr(self._embedder, name)

    def embed(self, texts):
        self.begun.set()
        return self._embedder.embed(texts)


def _index_in_fork(stage, tools):
    stage.index_for(tools)


def test_a_child_forked_while_a_pool_is_indexed_can_index_it(embedder):
    """gunicorn --preload and multiprocessing's fork copy the stage's locks as they are: a child forked while the
    parent embedded a pool of tools had that pool's build lock held for ever, and its first call with it hung."""
    tools = json.loads((FIXTURES / "catalog.json").read_text())[:300]
    embedding = _Embedding(embedder)
    stage = ToolRetrievalStage(embedder=embedding)
    building = threading.Thread(target=stage.index_for, args=(tools,))
    building.start()
    assert embedding.begun.wait(60)  # the build now embeds the tools, holding the pool's lock
    child = start_in_fork(_index_in_fork, stage, tools)
    building.join()
    assert exit_code(child, 60) == 0
