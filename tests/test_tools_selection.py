"""Tool selection on a BFCL-derived catalog of 90 tools: fused recall, order, pinned, used and follow-up tools.

Real MiniLM and real FAISS; the fixture's 32 queries come with the tools they need (gold).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctxkit.stages.tools import FusionConfig, ToolIndex, ToolSelector

FIXTURES = Path(__file__).parent / "fixtures" / "tools"


@pytest.fixture(scope="module")
def catalog():
    return json.loads((FIXTURES / "catalog.json").read_text())


@pytest.fixture(scope="module")
def queries():
    return [json.loads(line) for line in (FIXTURES / "queries.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    # One folder for the session: the tool test modules embed the fixture catalog once between them.
    return tmp_path_factory.getbasetemp() / "tool-index"


@pytest.fixture(scope="module")
def index(catalog, embedder, index_dir):
    return ToolIndex(catalog, embedder, directory=index_dir)


def _recall(index: ToolIndex, queries: list[dict], k: int) -> float:
    selector = ToolSelector(index, top_k=k)
    hits = [set(q["gold"]) <= set(selector.select(q["messages"]).names) for q in queries]
    return sum(hits) / len(hits)


def test_fused_retrieval_beats_dense_alone_and_lexical_alone(catalog, queries, embedder, index_dir, index):
    # Same stored vectors, three fusions: only the weighting differs.
    dense_only = ToolIndex(catalog, embedder, directory=index_dir, fusion=FusionConfig(dense_weight=1.0))
    lexical_only = ToolIndex(catalog, embedder, directory=index_dir, fusion=FusionConfig(dense_weight=0.0))
    fused, dense, lexical = (_recall(i, queries, 3) for i in (index, dense_only, lexical_only))
    assert fused >= 0.9, f"fused recall@3 {fused:.2f} on the fixture"
    assert fused >= max(dense, lexical), f"fused {fused:.2f} vs dense {dense:.2f}, lexical {lexical:.2f}"
    assert _recall(index, queries, 5) >= 0.95


def test_identifier_named_in_the_query_is_selected_first(index):
    selector = ToolSelector(index, top_k=1)
    selection = selector.select([{"role": "user", "content": "run kinematics.calculate_time for me"}])
    assert selection.retrieved == ("kinematics.calculate_time",)


def test_a_tool_the_user_names_outranks_its_near_twins(index):
    # get_museum_hours describes the same thing; the user asked for museum.get_hours by name.
    selector = ToolSelector(index, top_k=1)
    selection = selector.select([{"role": "user", "content": "Please call museum.get_hours for the Louvre."}])
    assert selection.retrieved == ("museum.get_hours",)


def test_every_tool_named_in_one_sentence_is_selected(index):
    # One sentence, two named tools: the words are mostly about stocks, yet both names count.
    text = "What time is it in Tokyo? Use get_current_time, then tell me the price of AAPL with get_stock_price."
    selection = ToolSelector(index, top_k=2).select([{"role": "user", "content": text}])
    assert set(selection.retrieved) == {"get_current_time", "get_stock_price"}


def test_a_name_written_as_an_ordinary_word_gets_no_boost(index):
    # "integrate" is a tool's name and an English word: it ranks on its meaning, not as a named tool.
    candidates, scores = index.score(["integrate the sales figures into the quarterly report"])
    assert scores.max() < 1.0


def test_selection_is_in_catalog_order_and_identical_across_calls(index, catalog):
    selector = ToolSelector(index, top_k=5)
    messages = [{"role": "user", "content": "Who won the last match between the Bulls and the Lakers?"}]
    first, second = selector.select(messages), selector.select(messages)
    order = [t["function"]["name"] for t in catalog]
    assert list(first.names) == sorted(first.names, key=order.index)
    assert first.tools == second.tools
    assert json.dumps(first.tools) == json.dumps(second.tools)


def test_pinned_tools_are_always_sent_on_top_of_top_k(index):
    selector = ToolSelector(index, top_k=3, pinned=["translate_text", "not_in_catalog"])
    selection = selector.select([{"role": "user", "content": "What is the NPV of these cash flows at 8%?"}])
    assert "translate_text" in selection.names
    assert "not_in_catalog" not in selection.names
    assert len(selection.retrieved) == 3 and "translate_text" not in selection.retrieved


def test_tools_the_conversation_already_used_stay_available(index):
    messages = [
        {"role": "user", "content": "Translate 'good morning' into French."},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "translate_text", "arguments": '{"text": "good morning", "target_language": "fr"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "bonjour"},
        {"role": "user", "content": "Now find the stock price of Apple for the last 5 days."},
    ]
    selection = ToolSelector(index, top_k=2).select(messages)
    assert "translate_text" in selection.used and "translate_text" in selection.names
    assert {"get_stock_price", "stock_price"} & set(selection.retrieved), selection.retrieved
    assert "translate_text" not in ToolSelector(index, top_k=2, keep_used=False).select(messages).names


def test_calling_a_tool_that_was_sent_does_not_change_the_tools_sent(index):
    """A used tool was excluded from the ranking, so it pulled in one more tool on every step of a tool loop:
    the tool block, which leads the prompt, changed and the prefix cache missed on every step."""
    selector = ToolSelector(index, top_k=3)
    messages = [{"role": "user", "content": "Translate 'good morning' into French."}]
    before = selector.select(messages).names
    for step, name in enumerate(before):
        messages += [{"role": "assistant", "content": None, "tool_calls": [{"id": f"c{step}", "type": "function",
                      "function": {"name": name, "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": f"c{step}", "content": "done"}]
        assert selector.select(messages).names == before, f"step {step}"


def test_each_task_of_a_multi_task_request_gets_a_tool(index):
    text = ("Find the sum of all the multiples of 3 and 5 between 1 and 1000. "
            "Also find the product of the first five prime numbers.")
    selection = ToolSelector(index, top_k=2).select([{"role": "user", "content": text}])
    assert set(selection.retrieved) == {"math_toolkit.sum_of_multiples", "math_toolkit.product_of_primes"}


def test_a_follow_up_question_is_read_with_the_turns_before_it(index):
    messages = [
        {"role": "user", "content": "When is the Louvre museum open?"},
        {"role": "assistant", "content": "It opens at 9am on most days."},
        {"role": "user", "content": "And on Sundays?"},
    ]
    selection = ToolSelector(index, top_k=3).select(messages)
    assert {"museum.get_hours", "get_museum_hours"} & set(selection.retrieved), selection.retrieved


def test_a_long_message_keeps_its_opening_instruction_in_the_query():
    """Only the last 2,000 characters were searched: "Post the following incident report to #ops on Slack:"
    followed by a 3,400-character report was searched with the report alone, and Slack's tool was not sent."""
    from ctxkit.stages.tools.selector import conversation_query

    report = "The checkout service returned errors for twelve minutes after the deploy of build 4411. " * 40
    parts = conversation_query([{"role": "user", "content": "Post the following incident report to #ops on "
                                                            "Slack:\n\n" + report}])
    assert any("Post the following incident report" in p.text for p in parts)
