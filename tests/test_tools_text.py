"""What the lexical side sees: identifiers split into words, inflections folded, BM25 ranking by field."""

from __future__ import annotations

import json

import pytest

from ctxkit import Ledger, LlamaCppBackend, Pipeline
from ctxkit.backends.tool_format import ToolCallTextStream, drop_unfinished_call
from ctxkit.demo import TOOLS
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


def test_a_broken_call_block_does_not_swallow_the_valid_one_after_it():
    from ctxkit.backends.tool_format import parse_tool_calls

    text = '<tool_call>\n{"name": "f"\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert [c["function"]["name"] for c in calls] == ["g"] and '{"name": "f"' in content
    _, calls = parse_tool_calls('<tool_call>{"name": "g", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert calls[0]["function"]["arguments"] == '{"a": 1}', "arguments given as a JSON string are decoded once"
    assert parse_tool_calls('<tool_call>{"name": "g", "arguments": [1, 2]}</tool_call>')[1] == []


def test_pydantic_schemas_with_defs_get_a_grammar_and_a_call(llama_backend):
    """Nested models put $defs in the parameters; under the call's "arguments" their $refs resolved from
    the wrong root and every call with such a tool failed."""
    from pydantic import BaseModel

    from ctxkit import ChatRequest

    class Address(BaseModel):
        city: str
        zip_code: str

    class Order(BaseModel):
        item: str
        ship_to: Address

    tool = {"type": "function", "function": {"name": "place_order", "description": "Place an order.",
                                             "parameters": Order.model_json_schema()}}
    response = llama_backend.complete(ChatRequest(
        messages=[{"role": "user", "content": "Order a kettle to 1 Main St, Oslo 0150."}], tools=[tool],
        params={"tool_choice": "required", "max_tokens": 80, "temperature": 0}))
    if response.tool_calls:  # a finished call has the nested model's shape
        arguments = json.loads(response.tool_calls[0]["function"]["arguments"])
        assert set(arguments) == {"item", "ship_to"} and set(arguments["ship_to"]) == {"city", "zip_code"}
    else:  # SmolLM2 may ramble inside a string until max_tokens: the unfinished call's markup is not content
        assert response.finish_reason == "length"
        assert response.content == ""  # no markup, and an answer the app can send back


def test_a_parameter_named_definitions_survives_the_hoisting_of_defs():
    """Hoisting `$defs` for the grammar removed every key named "definitions" at any depth, so a tool whose
    schema had `$defs` (Pydantic always writes them) lost its parameter "definitions", though required."""
    from ctxkit.backends.tool_format import tool_call_grammar

    parameters = {"type": "object", "$defs": {"Lang": {"type": "string", "enum": ["en", "de"]}},
                  "properties": {"word": {"type": "string"}, "lang": {"$ref": "#/$defs/Lang"},
                                 "definitions": {"type": "integer"}},
                  "required": ["word", "definitions"]}
    grammar = tool_call_grammar([{"type": "function", "function": {"name": "define", "parameters": parameters}}],
                                "required")
    assert grammar is not None and '\\"definitions\\"' in grammar, grammar
    assert '\\"$defs\\"' not in grammar  # the hoisted definitions are rules, not an argument


def test_an_auto_tool_grammar_with_a_response_format_answers_a_call_or_that_json():
    """With tools offered ("auto") the grammar allowed a call or free text: a response_format was dropped, so
    a LangChain agent with ProviderStrategy and tools got prose back and failed to parse its structured response."""
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    from ctxkit.backends.llama_cpp import _format_grammar
    from ctxkit.backends.tool_format import tool_call_grammar

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    answer = _format_grammar({"response_format": {"type": "json_schema", "json_schema": {"name": "W", "schema": schema}}})
    grammar = tool_call_grammar(tools, "auto", answer)
    assert "free-text" not in grammar and "root ::= \"<tool_call>\\n\" call-json" in grammar
    assert "text-root ::=" in grammar and "text-city-kv" in grammar  # the answer's rules, renamed apart
    LlamaGrammar.from_string(grammar, verbose=False)  # well-formed, every rule defined once
    LlamaGrammar.from_string(tool_call_grammar(tools, None, JSON_GBNF), verbose=False)  # json_object (comments)
    assert tool_call_grammar(tools, "required", answer) == tool_call_grammar(tools, "required")  # a call only


def test_a_parameter_of_any_type_accepts_any_value(llama_backend):
    """A property with no type accepts any JSON value. Pydantic's `Any` ({"title": "Value"}) and MCP's
    {"description": ...} made the local backend refuse the request ("Unrecognized schema"), and {} (what
    compaction leaves of Pydantic's) became a grammar for objects only: "dark" was sent as {"dark": "dark"}."""
    from ctxkit import ChatRequest

    for value in ({"title": "Value"}, {"description": "Any JSON value"}, {}):
        tool = {"type": "function", "function": {"name": "set_setting", "description": "Set a setting", "parameters": {
            "type": "object", "properties": {"key": {"type": "string"}, "value": value}, "required": ["key", "value"]}}}
        response = llama_backend.complete(ChatRequest(
            messages=[{"role": "user", "content": "Set the setting 'mode' to the string 'dark'."}], tools=[tool],
            params={"tool_choice": "required", "max_tokens": 60, "temperature": 0}))
        assert json.loads(response.tool_calls[0]["function"]["arguments"]) == {"key": "mode", "value": "dark"}


# A tool call cut off by max_tokens must not reach the app as the call grammar's raw <tool_call> markup.
def _text_chunk(content, finish=None):
    delta = {} if content is None else {"content": content}
    return {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_unfinished_block_is_dropped():
    assert drop_unfinished_call('<tool_call>\n{"name": "calculator') is None
    assert drop_unfinished_call('Checking. <tool_call>\n{"na') == "Checking."
    whole = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert drop_unfinished_call(whole) == whole
    assert drop_unfinished_call("plain text cut off") == "plain text cut off"
    assert drop_unfinished_call(None) is None


def test_stream_cut_inside_a_call_sends_no_markup():
    stream = ToolCallTextStream()
    out = stream.feed(_text_chunk('<tool_call>\n{"name": "calcul')) + stream.feed(_text_chunk(None, "length"))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in out)
    assert "<tool_call>" not in text
    assert out[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_that_stops_normally_keeps_its_text():
    stream = ToolCallTextStream()
    out = stream.feed(_text_chunk("<tool_call> is a tag")) + stream.feed(_text_chunk(None, "stop"))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in out) == "<tool_call> is a tag"


def test_prose_that_names_the_tag_is_not_an_unfinished_call():
    assert drop_unfinished_call("The <tool_call> tag starts a tool call in") == "The <tool_call> tag starts a tool call in"
    assert drop_unfinished_call("Checking. <tool_call>") == "Checking."


def test_without_tools_a_cut_answer_keeps_its_text_streamed_or_not(llama_backend):
    from ctxkit import ChatRequest

    msgs = [{"role": "user", "content": "Repeat this sentence exactly: The <tool_call> tag starts a tool call in "
                                        "Hermes format, and it is closed later."}]
    params = {"max_tokens": 12, "temperature": 0}
    whole = llama_backend.complete(ChatRequest(messages=msgs, params=params))
    streamed = "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in llama_backend.stream(ChatRequest(messages=msgs, params=params, stream=True))
                       if c.get("choices"))
    assert whole.finish_reason == "length"
    assert (whole.content or "").strip() == streamed.strip()

@pytest.mark.slow
def test_cut_off_tool_call_answer_can_be_sent_back():
    client = Pipeline(LlamaCppBackend(n_threads=1), stages=[], ledger=Ledger()).openai()
    messages = [{"role": "user", "content": "What is 1234 * 56? Use the calculator."}]
    reply = client.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS, tool_choice="required",
                                           max_tokens=6, temperature=0)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "length" and not message.tool_calls
    assert message.content == ""
    messages += [message.model_dump(exclude_none=True), {"role": "user", "content": "Try again."}]
    again = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=4, temperature=0)
    assert again.choices[0].finish_reason in ("stop", "length")


def test_a_past_call_with_arguments_that_are_not_json_is_rendered_not_a_json_error():
    """A call cut off by max_tokens, sent back to a backend without the pipeline (which replaces such arguments),
    or counted with its GGUFPrompt: json.JSONDecodeError escaped from messages_for_plain_template."""
    from ctxkit.backends.tool_format import messages_for_plain_template

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Par'}}
    out = messages_for_plain_template([{"role": "user", "content": "W?"},
                                       {"role": "assistant", "content": None, "tool_calls": [call]},
                                       {"role": "tool", "tool_call_id": "call_1", "content": "ok"}], [])
    assert out[1]["role"] == "assistant" and "get_weather" in out[1]["content"] and "Par" in out[1]["content"]
    assert out[2]["content"].startswith('<tool_response name="get_weather">')


def test_a_pattern_as_the_grammar_holds_it_accepts_what_the_pattern_does():
    """An escaped "[" before a class's "]" ("[^\\[]") left the class open in the rewriting: the "\\d" after it was
    written "0-9", which the grammar held as those three characters; and an anchor inside an alternation
    ("^$|^\\d{5}$") reached the converter, which read it as the character "$" or "^" (the grammar held "123456"
    to "^123456"); a negated class ("[^@]") let the model write a raw quote or control character, which ends or
    breaks the JSON string."""
    import itertools
    import re

    from ctxkit.backends.schema_grammar import _anchored
    from ctxkit.backends.tool_format import tool_call_grammar

    cases = {r"^[^\[]\d$": ["a1", "[1", "ab"], r"^[\w\[]+\d$": ["a[1", "[[3", "a1b"],
             r"^[A-Za-z]{3}\d{3}$|^\d{6}$": ["abc123", "123456", "abc123$", "^123456"],
             r"^$|^\d{5}$": ["", "94103", "94103$", "^"], r"^(?:a|x)$|^1$": ["a", "1", "ax"]}
    for pattern, samples in cases.items():
        held = _anchored(pattern)
        strings = samples + ["".join(t) for n in range(4) for t in itertools.product("a1[$^", repeat=n)]
        for text in strings:  # the grammar's strings are a subset of the schema's, and here the same
            assert bool(re.fullmatch(held, text)) == bool(re.search(pattern, text, re.ASCII)), (pattern, held, text)
        tools = [{"type": "function", "function": {"name": "act", "parameters": {
            "type": "object", "properties": {"v": {"type": "string", "pattern": pattern}}, "required": ["v"]}}}]
        grammar = tool_call_grammar(tools, "auto")
        assert '"$"' not in grammar and '"^"' not in grammar and '"0-9"' not in grammar, grammar
    for text in ('a"b', "a\\b", "a\nb"):  # a negated class left the grammar free to end the JSON string early
        assert not re.fullmatch(_anchored(r"^[^@]+$"), text)


def test_a_lone_bracket_in_a_pattern_is_the_character_and_a_float_count_a_count():
    """llama-cpp-python's converter looped for ever on a "}" or "]" that closes nothing ("a{b}", "a{,2}" (which
    Python's re, the check after generation, reads as {0,2}), "[]a]", "x]"), holding the request and its thread; `"maxLength": 20.0` (the integer 20 to JSON Schema) was refused
    ("can't multiply sequence by non-int of type 'float'")."""
    import re
    import threading

    from ctxkit.backends.schema_grammar import _anchored
    from ctxkit.backends.tool_format import tool_call_grammar

    def grammar_for(schema: dict) -> str:
        tools = [{"type": "function", "function": {"name": "act", "parameters": {
            "type": "object", "properties": {"v": schema}, "required": ["v"]}}}]
        made: list[str] = []
        converting = threading.Thread(target=lambda: made.append(tool_call_grammar(tools, "required")), daemon=True)
        converting.start()
        converting.join(timeout=30)
        assert made, f"the converter did not finish for {schema}"
        return made[0]

    cases = {r"^a{b}$": ["a{b}", "ab", "a{b"], r"^a{,2}$": ["a{,2}", "", "aa", "aaa"], r"^[]a]+$": ["]a]", "a", "b"],
             r"^x{1,2}}$": ["xx}", "x}", "xxx}"], r"^a]$": ["a]", "a"], r"^{}$": ["{}", ""]}
    for pattern, samples in cases.items():
        grammar_for({"type": "string", "pattern": pattern})
        for text in samples:
            assert bool(re.fullmatch(_anchored(pattern), text)) == bool(re.search(pattern, text)), (pattern, text)
    for schema in ({"type": "string", "maxLength": 20.0}, {"type": "array", "items": {}, "minItems": 1.0}):
        grammar_for(schema)


def test_a_character_json_holds_only_escaped_is_written_escaped_and_a_nul_no_longer_aborts_the_process():
    """A NUL in a pattern ("\\x00", "[\\x00]") or in an enum or const value, and a class left with no character a
    token writes ("[^\\x20-\\U0010FFFF]"), made a grammar llama.cpp parsed but could not sample from: the process
    aborted ("Unexpected empty grammar stack"), for every tenant. The converter wrote a value's JSON escapes as
    llama.cpp's own ("a\\\\b" came back as "a" and a backspace, an emoji as two surrogates), and a pattern's "\\n"
    or '"' raw, which breaks the JSON string."""
    import json
    import re
    import subprocess
    import sys
    import threading

    from ctxkit.backends.llama_cpp import _format_grammar
    from ctxkit.backends.schema_grammar import _anchored

    patterns = {r"^\x00$": ["\x00", "", "x"], r"^a[\x00]b$": ["a\x00b", "ab"], r"^[^\x20-\U0010FFFF]$": ["\x01", "a"],
                r"^a\n+b$": ["a\nb", "a\n\nb", "ab"], r'^say "hi"$': ['say "hi"', "say hi"], r"^\\d$": ["\\d", "1"],
                r"^[\n\t]$": ["\n", "\t", "n"]}
    assert _anchored(r"^[\p{L}]+$") == r"^([\p{L}]+)$"  # not Python's syntax: left for the converter, not a re.error
    for pattern, samples in patterns.items():
        for text in samples:  # the grammar holds the JSON text of the string; the pattern, the string
            assert bool(re.fullmatch(_anchored(pattern), json.dumps(text)[1:-1])) == bool(re.search(pattern, text)), (
                pattern, text)
    schemas = [{"type": "string", "pattern": p} for p in patterns] + [
        {"enum": ["\x00"]}, {"enum": ["a\\b"]}, {"const": 'say "hi"'}, {"enum": ["😀"]}, {"const": "two\nlines"},
        {"type": "object", "properties": {'k"\\': {"const": 1}}, "required": ['k"\\']}]
    for schema in schemas:
        made: list[str | None] = []
        params = {"response_format": {"type": "json_schema", "json_schema": {"name": "f", "schema": schema}}}
        converting = threading.Thread(target=lambda made=made, params=params: made.append(_format_grammar(params)),
                                      daemon=True)
        converting.start()
        converting.join(timeout=30)
        assert made, f"the converter did not finish for {schema}"
    # Sampled for real, in a process of its own: an abort here would end the test run.
    script = """if True:
        import json, sys
        from ctxkit import LlamaCppBackend
        from ctxkit.request import ChatRequest
        backend = LlamaCppBackend(n_ctx=512, n_threads=1)
        for schema in json.loads(sys.argv[1]):
            fmt = {"type": "json_schema", "json_schema": {"name": "f", "schema": schema}}
            answer = backend.complete(ChatRequest(messages=[{"role": "user", "content": "Answer."}],
                                                  params={"max_tokens": 24, "temperature": 0, "response_format": fmt}))
            print(json.dumps(answer.content))
    """
    sampled = schemas[:2] + schemas[len(patterns):]  # the NUL patterns, and each value
    run = subprocess.run([sys.executable, "-c", script, json.dumps(sampled)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    answers = [json.loads(json.loads(line)) for line in run.stdout.splitlines()]
    assert answers == ["\x00", "a\x00b", "\x00", "a\\b", 'say "hi"', "😀", "two\nlines", {'k"\\': 1}], answers


def test_a_value_json_holds_raw_is_written_raw_in_the_grammar(llama_backend):
    """The grammar's literals escaped every non-ASCII character as JSON does by default: the model had to spell
    "Köln" as "K\\u00f6ln" (15 tokens for 9) and the app got that text back; a property name "prénom" likewise.
    What a JSON string holds only escaped (a NUL, a quote, a backslash, a lone surrogate) stays escaped."""
    from ctxkit import ChatRequest
    from ctxkit.backends.llama_cpp import _format_grammar

    values = ["Zürich", "Köln", "東京", "😀"]
    schema = {"type": "object", "properties": {"prénom": {"enum": [*values, "a\\b", "\x00", "\ud800"]}},
              "required": ["prénom"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "f", "schema": schema}}
    grammar = _format_grammar({"response_format": fmt})
    assert all(f'"\\"{v}\\""' in grammar for v in ["prénom", *values]), grammar
    assert '"\\"a\\\\\\\\b\\""' in grammar and '"\\"\\\\u0000\\""' in grammar and '"\\"\\\\ud800\\""' in grammar
    only = {"type": "object", "properties": {"city": {"enum": ["Köln"]}}, "required": ["city"]}
    answer = llama_backend.complete(ChatRequest(messages=[{"role": "user", "content": "A city, as JSON."}], params={
        "max_tokens": 30, "temperature": 0, "response_format": {**fmt, "json_schema": {"name": "f", "schema": only}}}))
    assert "Köln" in answer.content and answer.usage.completion_tokens <= 10, (answer.content, answer.usage)


def test_the_table_of_every_character_is_cheap_to_build():
    """Built on the request whose pattern class first needed it: one str per code point took 0.3 s of CPU and
    104 MB of memory there."""
    import re
    import time
    import tracemalloc

    from ctxkit.backends.schema_grammar import _every_character

    _every_character.cache_clear()
    started = time.process_time()
    _every_character()
    cpu = time.process_time() - started
    _every_character.cache_clear()
    tracemalloc.start()
    try:
        raw, escaped = _every_character()
        peak_mb = tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()
    assert cpu < 0.15 and peak_mb < 40, (cpu, peak_mb)
    held_raw = re.compile('[^"\\\\\\x00-\\x1F\\uD800-\\uDFFF]')
    assert len(raw) + len(escaped) == 0x110000 and not held_raw.search(escaped)
    assert raw == "".join(held_raw.findall(raw)) and [ord(c) for c in raw] == sorted(ord(c) for c in raw)
