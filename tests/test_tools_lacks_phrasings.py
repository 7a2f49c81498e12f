"""A model that says the selection lacks a tool in common phrasings gets the second call (recovery='rerun')."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctxkit import ChatRequest, ChatResponse, Usage
from ctxkit.stages.tools import ToolRetrievalStage
from ctxkit.stages.tools.stage import _lacks_tool

CATALOG = json.loads((Path(__file__).parent / "fixtures" / "tools" / "catalog.json").read_text())[:50]
REQUEST = ChatRequest(messages=[{"role": "user", "content": "Calculate the electric field 3 m from a 2 C charge."}])

SAYS_MISSING = [
    "The available tools do not support currency conversion.",
    "The provided tools cannot convert currencies.",
    "Unfortunately, the tools I have access to don't include currency conversion.",
    "The functions available to me don't cover currency conversion.",
    "I can't convert currencies because none of my tools support it.",
    "There isn't a tool here that converts currencies.",
    "Sorry, the tools I have can't do currency conversion.",
]
NOT_MISSING = [
    "The tools do not include any results for Oslo yet.",
    "The tools do not allow deleting files without your confirmation.",
    "The functions in your code don't handle errors.",
    "Your functions don't handle the empty list case.",
    "There isn't a tool call needed here.",
]


@pytest.mark.parametrize("text", SAYS_MISSING)
def test_common_phrasings_of_a_missing_tool_count(text):
    assert _lacks_tool(text)


@pytest.mark.parametrize("text", NOT_MISSING)
def test_other_sentences_about_tools_do_not(text):
    assert not _lacks_tool(text)


def test_the_stage_reruns_with_twice_the_tools(embedder):
    answers = [{"role": "assistant", "content": SAYS_MISSING[0]}, {"role": "assistant", "content": "ok"}]
    requests = []

    def provider(request):
        requests.append(request)
        return ChatResponse(message=answers.pop(0), finish_reason="stop", usage=Usage(100, 10), model="m", backend="openai")

    stage = ToolRetrievalStage(catalog=CATALOG, top_k=2, embedder=embedder)
    response = stage.wrap_call(REQUEST, provider)
    assert len(requests) == 2 and len(requests[1].tools) == 4
    assert response.content == "ok"
