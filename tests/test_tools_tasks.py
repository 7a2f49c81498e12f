"""A multi-task request gets a tool per task: sentences grouped into tasks, commands cut at "and <action>",
a task told in several sentences answered once. Real MiniLM and FAISS on the fixture catalogs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ctxkit.stages.tools import QueryPart, ToolIndex, ToolSelector, conversation_query
from ctxkit.stages.tools.text import stem

FIXTURES = Path(__file__).parent / "fixtures" / "tools"


def _load(stem: str) -> tuple[list[dict], list[dict]]:
    catalog = json.loads((FIXTURES / f"{stem}catalog.json").read_text())
    queries = [json.loads(line) for line in (FIXTURES / f"{stem}queries.jsonl").read_text().splitlines() if line]
    return catalog, queries


@pytest.fixture(scope="module")
def workplace(embedder, tmp_path_factory):
    catalog, queries = _load("workplace_")
    return ToolIndex(catalog, embedder, directory=tmp_path_factory.getbasetemp() / "tool-index"), queries


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_sentences_without_a_sequencing_marker_continue_the_task_before():
    parts = conversation_query(_user(
        "First, find a guitar. My budget is $500. I prefer a Fender. Then book a hotel in Paris. Lastly, a taxi."))
    sentences = [p for p in parts[1:] if p.text.endswith(".") and p.text != parts[0].text]
    assert [(p.text, p.task) for p in sentences[:5]] == [
        ("First, find a guitar.", 0), ("My budget is $500.", 0), ("I prefer a Fender.", 0),
        ("Then book a hotel in Paris.", 1), ("Lastly, a taxi.", 2)]
    # The guitar task, told in three sentences, is also searched as one passage.
    assert QueryPart("First, find a guitar. My budget is $500. I prefer a Fender.", 1.0, 0) in parts
    assert parts[0].task is None and parts[0].weight < 1.0


def test_and_before_one_of_the_catalogs_actions_starts_a_new_command():
    text = "Acknowledge incident P123 and post in #incidents that I'm on it."
    parts = conversation_query(_user(text), actions=frozenset({stem("post"), stem("acknowledge")}))
    assert [(p.text, p.task) for p in parts[1:3]] == [("Acknowledge incident P123", 0),
                                                       ("post in #incidents that I'm on it.", 1)]
    # "and" before a word that is no action of the catalog joins nouns, not commands.
    assert len(conversation_query(_user("Find the area and perimeter of a circle."), actions=frozenset({"post"}))) == 1


def test_a_company_suffix_does_not_end_a_sentence():
    parts = conversation_query(_user("Get details about Apple Inc. stocks in the NASDAQ market. Then buy some."))
    assert [p.text for p in parts[1:3]] == ["Get details about Apple Inc. stocks in the NASDAQ market.",
                                            "Then buy some."]


def test_the_index_learns_its_actions_from_the_descriptions(workplace):
    index, _ = workplace
    assert {stem(w) for w in ("send", "post", "schedule", "cancel", "upload", "share")} <= index.actions
    assert "the" not in index.actions and "gmail" not in index.actions


def test_each_command_of_a_compound_sentence_gets_its_tool(workplace):
    index, _ = workplace
    # Searched as one sentence, the message finds the three pagerduty tools and ranks slack sixth.
    selection = ToolSelector(index, top_k=3).select(
        _user("Acknowledge PagerDuty incident P123 and post in #incidents that I'm on it."))
    assert {"pagerduty.acknowledge_incident", "slack.send_message"} <= set(selection.retrieved), selection.retrieved


def test_a_task_told_in_several_sentences_takes_one_slot_not_two(workplace):
    index, _ = workplace
    text = ("First, get me the last 200 log lines of pod checkout-7f9. It is one of the pods in the payments "
            "namespace that keep crashing. Then tell #payments in Slack that I am on it.")
    selector = ToolSelector(index, top_k=2)
    query = conversation_query(_user(text), actions=index.actions)
    assert selector.rank(query, 2) == ["k8s.get_logs", "slack.send_message"]
    # The same parts without their tasks: the second sentence of the logs task takes the Slack task's slot.
    untasked = [dataclasses.replace(part, task=None) for part in query]
    assert selector.rank(untasked, 2) == ["k8s.get_logs", "k8s.get_pods"]


def test_recall_on_the_workplace_set_written_in_another_domain(workplace):
    index, queries = workplace
    selector = ToolSelector(index, top_k=5)
    hits = {q["id"]: set(q["gold"]) <= set(selector.select(q["messages"]).retrieved) for q in queries}
    single = [hit for q in queries for hit in [hits[q["id"]]] if len(q["gold"]) == 1]
    multi = [hit for q in queries for hit in [hits[q["id"]]] if len(q["gold"]) > 1]
    assert all(single), [i for i, h in hits.items() if not h]
    assert sum(multi) >= 6, f"{sum(multi)} of {len(multi)} multi-task requests got all their tools: {hits}"
