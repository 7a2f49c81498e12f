"""ToolResultClearingStage: old tool results become placeholders, in cache-friendly steps, never orphaned."""

from __future__ import annotations

import json

from ctxkit import ChatRequest, Ledger, Pipeline
from ctxkit.stages.pruning import ToolResultClearingStage
from ctxkit.stages.pruning.tool_results import PLACEHOLDER_PREFIX
from ctxkit.validation import validate_request


def _agent_history(results: int, size: int = 400) -> list[dict]:
    messages: list[dict] = [
        {"role": "system", "content": "You look things up for the user."},
        {"role": "user", "content": "Compare the weather in these cities."},
    ]
    for k in range(results):
        call_id = f"call_{k}"
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": f"City{k}"})}}]})
        body = " ".join(f"hour {h}: {k + h % 7} degrees, wind {h % 5} m/s." for h in range(size // 12))
        messages.append({"role": "tool", "tool_call_id": call_id, "content": body})
    messages.append({"role": "assistant", "content": "Here is what I found so far."})
    messages.append({"role": "user", "content": "Which city was warmest?"})
    return messages


def _call_and_result(k: int, name: str, arguments: dict, body: str) -> list[dict]:
    """One step of an agent loop: the assistant's call `call_{k}` and the tool's result."""
    call = {"id": f"call_{k}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    return [{"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": body}]


def _tool_contents(request: ChatRequest) -> list[str]:
    return [m["content"] for m in request.messages if m["role"] == "tool"]


def test_old_results_become_placeholders_that_name_the_call_to_repeat():
    stage = ToolResultClearingStage(keep_last=2, clear_at_least=0)
    request = ChatRequest(messages=_agent_history(5))
    out = stage.before_model(request)
    contents = _tool_contents(out)
    assert all(c.startswith(PLACEHOLDER_PREFIX) for c in contents[:3]), contents[:3]
    assert 'get_weather({"city": "City0"})' in contents[0]
    assert contents[3:] == _tool_contents(request)[3:], "the newest results must stay verbatim"
    assert _tool_contents(request)[0].startswith("hour 0"), "the incoming request must not be mutated"


def test_clearing_never_orphans_a_tool_call():
    stage = ToolResultClearingStage(keep_last=0, clear_at_least=0)
    out = stage.before_model(ChatRequest(messages=_agent_history(4)))
    validate_request(out)  # raises if a tool message lost its call or a call lost its result
    assert len(out.messages) == len(_agent_history(4))
    assert [m.get("tool_call_id") for m in out.messages] == [m.get("tool_call_id") for m in _agent_history(4)]


def test_small_savings_below_clear_at_least_leave_the_request_untouched():
    stage = ToolResultClearingStage(keep_last=1, clear_at_least=100_000)
    request = ChatRequest(messages=_agent_history(4))
    assert stage.before_model(request) is request


def test_clearing_moves_in_steps_so_the_prefix_stays_stable_between_calls():
    # Each result saves ~350 tokens; with clear_at_least=1000 a step closes every 3 results.
    stage = ToolResultClearingStage(keep_last=1, clear_at_least=1000)
    cleared_counts = []
    previous = None
    changed_prefix_calls = 0
    for n in range(2, 10):
        out = stage.before_model(ChatRequest(messages=_agent_history(n)))
        contents = _tool_contents(out)
        cleared_counts.append(sum(c.startswith(PLACEHOLDER_PREFIX) for c in contents))
        if previous is not None and contents[: len(previous) - 1] != previous[: len(previous) - 1]:
            changed_prefix_calls += 1
        previous = contents
    assert cleared_counts == sorted(cleared_counts), "the cleared boundary must only move forward"
    assert set(cleared_counts) <= {0, 3, 6}, f"clearing should move in whole steps, got {cleared_counts}"
    assert changed_prefix_calls <= 2, f"prefix changed on {changed_prefix_calls} calls, expected only at steps"


def test_excluded_tools_are_never_cleared():
    stage = ToolResultClearingStage(keep_last=0, clear_at_least=0, exclude_tools=["get_weather"])
    request = ChatRequest(messages=_agent_history(3))
    assert stage.before_model(request) is request


def test_pipeline_ledger_shows_saving_and_prefix_invalidation(llama_backend, tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    stage = ToolResultClearingStage(keep_last=1, clear_at_least=0, counter=llama_backend.counter)
    pipeline = Pipeline(llama_backend, stages=[stage], ledger=ledger)
    # Mid-turn in an agent loop: the newest result just arrived, so result 1 (kept on the previous call,
    # when it was the newest) is cleared now, inside the prefix the previous call sent.
    messages = _agent_history(3, size=150)[:-2]
    pipeline.call(ChatRequest(messages=messages, params={"max_tokens": 4, "temperature": 0}))
    record = ledger.records[-1]
    assert record.saved_by_stage["tool_result_clearing"] > 150
    events = [e for e in record.events if e["kind"] == "prefix_invalidated"]
    assert events and events[0]["tokens"] > 0, record.events
    # Result 0 was already cleared on the previous call: the invalidation starts at result 1.
    first_tool = next(i for i, m in enumerate(messages) if m.get("tool_call_id") == "call_1")
    assert events[0]["first_message"] == first_tool
    # Next call: the answer and a new question follow. The same results are cleared as on the previous
    # call, so no cached prefix is lost and nothing is recorded.
    pipeline.call(ChatRequest(messages=_agent_history(3, size=150), params={"max_tokens": 4, "temperature": 0}))
    assert not [e for e in ledger.records[-1].events if e["kind"] == "prefix_invalidated"], ledger.records[-1].events


def test_prefix_invalidated_is_what_llama_cpp_no_longer_finds_in_its_cache(llama_backend, tmp_path):
    """The tokens the ledger says an edit un-cached are the ones llama.cpp's own prefix cache stops serving:
    the previous prompt's length less what the next call found cached. Counting each message's text plus 4
    missed the assistant's tool calls (content None) and the chat template's framing."""
    ledger = Ledger(tmp_path / "ledger.jsonl")
    stage = ToolResultClearingStage(keep_last=1, clear_at_least=0, counter=llama_backend.counter)
    pipeline = Pipeline(llama_backend, stages=[stage], ledger=ledger)
    history = _agent_history(3, size=150)[:-2]  # mid-turn: three calls, their results, no answer yet
    params = {"max_tokens": 1, "temperature": 0}
    pipeline.call(ChatRequest(messages=history[:-2], params=params))  # the step before: two results
    previous = ledger.records[-1]
    pipeline.call(ChatRequest(messages=history, params=params))  # result 1 is cleared now, inside that prompt
    record = ledger.records[-1]
    [event] = [e for e in record.events if e["kind"] == "prefix_invalidated"]
    assert event["tokens"] == previous.tokens_sent - record.tokens_cached > 100, (event, previous, record)


def test_results_the_model_has_not_read_are_never_cleared():
    """Four parallel calls with keep_last=2: clearing two of their fresh results told the model to call
    again, and the new batch lost two again."""
    calls = [{"id": f"c{k}", "type": "function",
              "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
             for k, city in enumerate(["Oslo", "Paris", "Rome", "Madrid"])]
    body = " ".join(f"hour {h}: {h % 9} degrees, wind {h % 5} m/s." for h in range(40))
    messages = [{"role": "user", "content": "Weather in four cities?"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                *({"role": "tool", "tool_call_id": c["id"], "content": body} for c in calls)]
    stage = ToolResultClearingStage(keep_last=2, clear_at_least=0)
    request = ChatRequest(messages=messages)
    assert stage.before_model(request) is request
    answered = [*messages, {"role": "assistant", "content": "Oslo is coldest."},
                {"role": "user", "content": "And tomorrow?"}]
    assert [c.startswith(PLACEHOLDER_PREFIX) for c in _tool_contents(stage.before_model(ChatRequest(
        messages=answered)))] == [True, True, False, False], "once read, the older ones may go"


def test_a_cleared_results_placeholder_keeps_the_whole_arguments_to_call_again():
    """Arguments past 300 characters were cut with '...': the placeholder said 'call it again with these
    arguments' and held invalid JSON."""
    sql = ("SELECT c.id, c.name, c.email, SUM(o.total) AS revenue, COUNT(o.id) AS orders FROM customers c "
           "JOIN orders o ON o.customer_id = c.id WHERE o.created_at >= '2024-01-01' AND o.status IN "
           "('paid','shipped','delivered') AND c.country = 'NO' GROUP BY c.id, c.name, c.email "
           "HAVING SUM(o.total) > 10000 ORDER BY revenue DESC LIMIT 50")
    rows = "\n".join(f"{i}, customer {i}, c{i}@example.com, {20000 - i * 37}" for i in range(300))
    messages = [{"role": "user", "content": "Who are our best Norwegian customers?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                 "function": {"name": "run_sql", "arguments": json.dumps({"query": sql})}}]},
                {"role": "tool", "tool_call_id": "c1", "content": rows},
                {"role": "assistant", "content": "Here are the top 50."}]
    for k in range(2, 6):
        messages += [{"role": "user", "content": f"question {k}"},
                     {"role": "assistant", "content": None, "tool_calls": [{"id": f"c{k}", "type": "function",
                      "function": {"name": "now", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": f"c{k}", "content": "12:00"},
                     {"role": "assistant", "content": "noon"}]
    messages.append({"role": "user", "content": "Show me that customer list again."})
    stage = ToolResultClearingStage(keep_last=1, clear_at_least=64)
    placeholder = stage.before_model(ChatRequest(messages=messages)).messages[2]["content"]
    assert placeholder.startswith(PLACEHOLDER_PREFIX)
    arguments = placeholder[placeholder.index("run_sql(") + len("run_sql("): placeholder.index(") returned")]
    assert json.loads(arguments) == {"query": sql}


def test_a_quarantined_result_keeps_its_reason_and_its_mark_when_old():
    """Clearing turned the quarantine's "withheld (tool_error: ...)" into "call it again", inviting a call
    known to fail, and the cleared message lost its quarantine mark (it could reach a summary or a cache)."""
    from ctxkit.quarantine_marks import PLACEHOLDER_PREFIX as WITHHELD
    from ctxkit.quarantine_marks import is_quarantined
    from ctxkit.stages.quarantine import QuarantineStage

    messages = _agent_history(4)
    messages[3] = {**messages[3], "content": 'Traceback (most recent call last):\n  File "w.py", line 3, in get\n'
                                             "    raise KeyError('City0')\nKeyError: 'City0'"}
    pipeline_stages = [QuarantineStage(), ToolResultClearingStage(keep_last=1, clear_at_least=0)]
    request = ChatRequest(messages=messages)
    for stage in pipeline_stages:
        request = stage.before_model(request)
    failed = request.messages[3]
    assert failed["content"].startswith(WITHHELD) and "traceback" in failed["content"]
    assert is_quarantined(request, failed)
    assert all(m["content"].startswith(PLACEHOLDER_PREFIX) for m in request.messages[5:8:2]), "others cleared"


def test_a_placeholder_names_its_own_call_when_providers_reuse_call_ids():
    """Some servers number calls per response ("call_0" on every step): Oslo's cleared result said
    get_weather({"city": "Rome"}), and the quarantine's withheld result named Rome too."""
    from ctxkit.stages.quarantine import QuarantineStage

    def call(city: str) -> dict:
        return {"id": "call_0", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}

    forecast = [{"day": d, "high": 10 + d, "summary": "partly cloudy with light winds " * 5} for d in range(8)]
    messages = [{"role": "user", "content": "Compare the weather in Oslo, Bergen, Paris and Rome."}]
    for city in ["Oslo", "Bergen", "Paris", "Rome"]:
        messages += [{"role": "assistant", "content": None, "tool_calls": [call(city)]},
                     {"role": "tool", "tool_call_id": "call_0", "content": json.dumps({"forecast": forecast})}]
    messages += [{"role": "assistant", "content": "Done."}, {"role": "user", "content": "And Oslo again?"}]
    out = ToolResultClearingStage(keep_last=1, clear_at_least=1).before_model(ChatRequest(messages=messages))
    assert '"Oslo"' in out.messages[2]["content"] and '"Bergen"' in out.messages[4]["content"]

    failed = [{"role": "user", "content": "Weather in Oslo, then Rome?"},
              {"role": "assistant", "content": None, "tool_calls": [call("Oslo")]},
              {"role": "tool", "tool_call_id": "call_0",
               "content": "Traceback (most recent call last):\n  File \"weather_service/client.py\", line 3, in "
                          "get_forecast\n    return self._cache[city]\nKeyError: 'Oslo'"},
              {"role": "assistant", "content": None, "tool_calls": [call("Rome")]},
              {"role": "tool", "tool_call_id": "call_0", "content": '{"temperature": 21}'},
              {"role": "assistant", "content": "Rome is 21°C; Oslo failed."},
              {"role": "user", "content": "Try Oslo again"}]
    withheld = QuarantineStage().before_model(ChatRequest(messages=failed)).messages[2]["content"]
    assert '"Oslo"' in withheld and "Rome" not in withheld, withheld


def test_prefix_invalidated_counts_the_documents_message_a_later_stage_sent(llama_backend, embedder):
    """DocumentPruningStage (after clearing, as default_stages orders them) rendered the documents before the
    question, after the result cleared now: that message was in the previous prompt too, and is un-cached."""
    from ctxkit.stages.pruning import DocumentPruningStage

    def turn(k: int) -> list[dict]:
        body = " ".join(f"hour {h}: {k + h % 7} degrees, wind {h % 5} m/s." for h in range(12))
        return _call_and_result(k, "get_weather", {"city": f"City{k}"}, body)

    docs = [{"id": f"d{i}", "text": " ".join(f"Valve {i * 10 + j} sits in building {chr(65 + i)}." for j in range(12))}
            for i in range(2)]
    history = [{"role": "system", "content": "You look things up for the user."},
               {"role": "user", "content": "Weather in City0?"}, *turn(0),
               {"role": "assistant", "content": "Mild."}, {"role": "user", "content": "And in City1, City2?"}, *turn(1)]
    ledger = Ledger()
    stages = [ToolResultClearingStage(keep_last=1, clear_at_least=150, counter=llama_backend.counter),
              DocumentPruningStage(budget_tokens=100, embedder=embedder, counter=llama_backend.counter)]
    pipeline = Pipeline(llama_backend, stages=stages, ledger=ledger)
    params = {"max_tokens": 1, "temperature": 0}
    for messages in (history, [*history, *turn(2)]):  # the second clears both older results (one step)
        pipeline.call(ChatRequest(messages=messages, params=params, metadata={"documents": docs}))
    previous, record = ledger.records
    [event] = [e for e in record.events if e["kind"] == "prefix_invalidated"]
    assert event["first_message"] == 3
    assert abs(event["tokens"] - (previous.tokens_sent - record.tokens_cached)) <= 3, (event, previous, record)


def test_prefix_invalidated_in_one_turn_with_documents_before_the_question(llama_backend, embedder):
    """The usual agent loop: one question, the documents rendered before it (message 1), tool results after.
    The previous prompt the backend got had that documents message, an older result cleared and a long one cut:
    its messages no longer lined up with the app's, and the claim fell back to the app's whole results (5,204
    tokens claimed where llama.cpp lost 3,078)."""
    from ctxkit.stages.pruning import DocumentPruningStage

    def step(k: int, size: int) -> list[dict]:
        body = " ".join(f"Txn {k}-{t}: {t * 13 % 97} EUR to merchant {t % 11}." for t in range(size))
        return _call_and_result(k, "get_balance", {"account": f"A{k}"}, body)

    docs = [{"id": "faq", "text": " ".join(f"Rule {i}: fees for account tier {i} are {i * 3} EUR." for i in range(30))}]
    history = [{"role": "system", "content": "You are a support agent."},
               {"role": "user", "content": "Which account has the most transactions?"}, *step(0, 30), *step(1, 150)]
    ledger = Ledger()
    stages = [ToolResultClearingStage(keep_last=1, clear_at_least=0, counter=llama_backend.counter),
              DocumentPruningStage(budget_tokens=100, long_message_tokens=300, embedder=embedder,
                                   counter=llama_backend.counter)]
    pipeline = Pipeline(llama_backend, stages=stages, ledger=ledger)
    params = {"max_tokens": 1, "temperature": 0}
    for messages in (history, [*history, *step(2, 20)]):  # the second clears the long result, cut before
        pipeline.call(ChatRequest(messages=messages, params=params, metadata={"documents": docs},
                                  conversation_id="loop"))
    previous, record = ledger.records
    [event] = [e for e in record.events if e["kind"] == "prefix_invalidated"]
    assert event["first_message"] == 5
    assert abs(event["tokens"] - (previous.tokens_sent - record.tokens_cached)) <= 3, (event, previous, record)


GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def test_a_chat_template_that_takes_no_system_message_still_serves_a_cleared_loop():
    """Gemma 2's template raises on a system message: the sent prompt's count of each message a stage made (a
    cleared result) rendered it after an empty system message, and every call of an agent loop failed."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from ctxkit import LlamaCppBackend

    backend = LlamaCppBackend(n_ctx=4096, n_threads=1)
    try:  # the embedded model, rendered with Gemma 2's template (as a Gemma 2 GGUF is)
        backend.prompt.formatter = Jinja2ChatFormatter(template=GEMMA2_TEMPLATE, eos_token="<|im_end|>",
                                                       bos_token="<|im_start|>")

        def step(k: int) -> list[dict]:
            body = " ".join(f"Txn {k}-{t}: {t * 13 % 97} EUR." for t in range(40))
            return _call_and_result(k, "get_balance", {"account": f"A{k}"}, body)

        ledger = Ledger()
        stages = [ToolResultClearingStage(keep_last=1, clear_at_least=0, counter=backend.counter)]
        pipeline = Pipeline(backend, stages=stages, ledger=ledger)
        history = [{"role": "user", "content": "Which account has the most transactions?"}, *step(0), *step(1)]
        for messages in (history, [*history, *step(2)]):
            pipeline.call(ChatRequest(messages=messages, params={"max_tokens": 1, "temperature": 0},
                                      conversation_id="gemma"))
        assert [r.status for r in ledger.records] == ["ok", "ok"]
    finally:
        backend.close()
