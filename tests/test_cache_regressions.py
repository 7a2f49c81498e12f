"""Regressions found in review: wrong answers served from the cache, and store bounds that did not hold.
Real MiniLM, real LocalStore."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ctxkit.errors import ConfigurationError, RequestError
from ctxkit.request import ChatRequest
from ctxkit.response import ChatResponse, Usage
from ctxkit.stages.cache.local_store import LocalStore
from ctxkit.stages.cache.stage import ExactCacheStage, SemanticCacheStage
from ctxkit.stages.cache.store import CacheEntry

PARAMS = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def store(tmp_path):
    s = LocalStore(tmp_path / "cache")
    yield s
    s.close()


@pytest.fixture
def stage(store, embedder):
    return SemanticCacheStage(store, embedder)


def req(messages, **fields):
    fields.setdefault("params", PARAMS)
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return ChatRequest(messages=messages, **fields)


def seed(stage, request, text="the answer"):
    response = ChatResponse(message={"role": "assistant", "content": text}, finish_reason="stop",
                            usage=Usage(30, 5), model="m", backend="test")
    assert stage.remember(request, response, stage.lookup(request))


def test_indentation_of_pasted_code_is_part_of_the_question(stage):
    after_loop = "What does this print?\n```\nfor i in range(3):\n    x = i\nprint(x)\n```"
    in_loop = "What does this print?\n```\nfor i in range(3):\n    x = i\n    print(x)\n```"
    seed(stage, req(after_loop), "2")
    assert stage.lookup(req(in_loop)).response is None
    assert stage.lookup(req(after_loop.replace("What does", "What  does"))).layer == "exact"


def test_a_tool_result_keeps_which_call_it_answers(stage):
    def conversation(first, second):
        return [
            {"role": "user", "content": "Weather in Paris and London?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
                {"id": "b", "type": "function", "function": {"name": "weather", "arguments": '{"city":"London"}'}}]},
            first, second,
            {"role": "user", "content": "Which city is warmer?"},
        ]
    seed(stage, req(conversation({"role": "tool", "tool_call_id": "a", "content": "30C"},
                                 {"role": "tool", "tool_call_id": "b", "content": "10C"})), "Paris")
    swapped = conversation({"role": "tool", "tool_call_id": "b", "content": "30C"},
                           {"role": "tool", "tool_call_id": "a", "content": "10C"})
    assert stage.lookup(req(swapped)).response is None


@pytest.mark.parametrize("other", ["sunny", "dry", "snowy"])
def test_a_follow_up_after_another_tool_result_misses(stage, other):
    def conversation(forecast):
        return [
            {"role": "user", "content": "What's the forecast for my hike tomorrow?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "forecast", "arguments": '{"when": "tomorrow"}'}}]},
            {"role": "tool", "tool_call_id": "c1",
             "content": f"Tomorrow: {forecast} all day, light wind from the west, good visibility on the trails."},
            {"role": "assistant", "content": f"Tomorrow will be {forecast} all day with a light westerly wind."},
            {"role": "user", "content": "Should I bring an umbrella?"},
        ]
    seed(stage, req(conversation("rainy")), "Yes")
    assert stage.lookup(req(conversation("rainy"))).layer == "exact"
    assert stage.lookup(req(conversation(other))).response is None


def test_a_follow_up_compares_turns_older_than_the_context_window(stage):
    def conversation(order):
        return [
            {"role": "user", "content": f"I need help with my order {order}."},
            {"role": "assistant", "content": "Sure, what would you like to do?"},
            {"role": "user", "content": "First, what is your refund policy?"},
            {"role": "assistant", "content": "Refunds are possible within 30 days of delivery."},
            {"role": "user", "content": "And how long does shipping usually take?"},
            {"role": "assistant", "content": "Standard shipping takes 3 to 5 business days."},
            {"role": "user", "content": "Do you ship internationally?"},
            {"role": "assistant", "content": "Yes, we ship to most countries."},
            {"role": "user", "content": "Cancel it."},
        ]
    seed(stage, req(conversation("5521")), "Order 5521 is cancelled.")
    assert stage.lookup(req(conversation("7730"))).response is None


@pytest.mark.parametrize(("a", "b"), [
    ("How do I convert a string to an int in python?", "How do I convert an int to a string in python?"),
    ("Is a square a rectangle?", "Is a rectangle a square?"),
    ("How to merge main into my branch?", "How to merge my branch into main?"),
    ("How do I copy files from the server to my laptop?", "How do I copy files from my laptop to the server?"),
])
def test_the_same_words_in_swapped_roles_miss(stage, a, b):
    seed(stage, req(a))
    assert stage.lookup(req(b)).response is None


def test_template_inputs_are_part_of_the_scope(stage):
    seed(stage, req("What is my name?", metadata={"ctxkit.template": {"memory": "The user is Alice."}}), "Alice")
    assert stage.lookup(req("What is my name?", metadata={"ctxkit.template": {"memory": "The user is Bob."}})).response is None


@pytest.mark.parametrize("ttl", ["1h", float("nan"), float("inf"), -5, 0, True])
def test_a_malformed_request_ttl_is_refused_before_the_backend(stage, ttl):
    with pytest.raises(RequestError, match="cache_ttl"):
        stage.lookup(req("hello there", metadata={"cache_ttl": ttl}))


def test_a_request_ttl_cannot_outlive_the_configured_one(tmp_path):
    now = [1000.0]
    with LocalStore(tmp_path / "c") as store:
        stage = ExactCacheStage(store, ttl=60, clock=lambda: now[0])
        seed(stage, req("hello there", metadata={"cache_ttl": 1e9}))
        now[0] += 120
        assert stage.lookup(req("hello there", metadata={"cache_ttl": 1e9})).response is None


def test_reopening_with_another_dimension_is_a_configuration_error(tmp_path):
    with LocalStore(tmp_path / "c") as store:
        entry = CacheEntry(key="k", scope="s", namespace="default", query_text="q",
                           response={"choices": [{"message": {"role": "assistant", "content": "x"}}]},
                           created_at=time.time())
        store.put(entry, np.ones(384, np.float32) / np.sqrt(384))
    with pytest.raises(ConfigurationError, match="384-dimensional"):
        LocalStore(tmp_path / "c", dimension=768)


def test_vectors_of_evicted_entries_do_not_accumulate(tmp_path):
    rng = np.random.default_rng(0)
    with LocalStore(tmp_path / "c", size_bytes=100_000) as store:
        for i in range(6000):
            v = rng.standard_normal(384).astype(np.float32)
            store.put(CacheEntry(key=f"k{i}", scope=f"user{i % 500}", namespace="default", query_text="q",
                                 response={"choices": [{"message": {"role": "assistant", "content": "a" * 200}}]},
                                 created_at=time.time()), v / np.linalg.norm(v))
            if i % 100 == 0:
                store.search("user0", v, 4, time.time())
        stats = store.stats()
        assert stats["vectors"] <= 2 * stats["entries"] + 1024, stats
