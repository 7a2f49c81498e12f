"""What the lexical side sees: identifiers split into words, inflections folded, BM25 ranking by field."""

from __future__ import annotations

from ctxkit.stages.tools.lexical import LexicalIndex
from ctxkit.stages.tools.text import ToolDocument, split_identifier, terms


def _tool(name: str, description: str, **params: str) -> dict:
    properties = {k: {"type": "string", "description": v} for k, v in params.items()}
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": {"type": "object", "properties": properties}}}


def test_identifiers_split_on_snake_camel_dots_and_acronyms():
    assert split_identifier("get_current_weather") == ["get", "current", "weather"]
    assert split_identifier("numOfPlayers") == ["num", "of", "players"]
    assert split_identifier("HTTPServer.restart") == ["http", "server", "restart"]
    assert split_identifier("calc_Compound_Interest") == ["calc", "compound", "interest"]


def test_query_words_and_identifier_parts_fold_to_the_same_terms():
    assert terms("calculate the roots") == terms("calculating root")
    assert terms("get_current_weather") == terms("the current weather")
    assert "123" not in terms("order 123 books") and "the" not in terms("the books")


def test_tool_document_collects_nested_parameter_names():
    tool = _tool("ship", "Ship an order.")
    tool["function"]["parameters"]["properties"]["address"] = {
        "type": "object", "properties": {"postalCode": {"type": "string", "description": "ZIP code"}}}
    document = ToolDocument.from_tool(tool)
    assert "postalCode" in document.param_names
    assert set(terms("postal code")) <= set(document.fields()["param_names"])


def test_bm25_ranks_the_tool_whose_name_matches_first():
    tools = [
        _tool("get_current_weather", "Current conditions for a city.", city="City name"),
        _tool("send_email", "Send an email about the weather report.", to="recipient"),
        _tool("book_flight", "Book a flight.", origin="from", destination="to"),
    ]
    index = LexicalIndex([ToolDocument.from_tool(t) for t in tools])
    scores = index.scores("what is the current weather in Oslo")
    assert scores.argmax() == 0, scores
    assert index.scores("numOfPlayers")[0] == 0.0  # nothing matches: all zero, no crash
