"""Malformed requests are rejected before any backend call, with an error naming the index or field."""

from __future__ import annotations

import json

import pytest

from ctxkit import (
    ChatRequest,
    ContextOverflowError,
    InvalidMessageError,
    InvalidToolError,
    Ledger,
    Pipeline,
    RequestError,
)


class CountingBackend:
    """The real local backend, with a count of the calls that reached it."""

    def __init__(self, backend):
        self._backend = backend
        self.calls = 0
        self.name, self.model = backend.name, backend.model
        self.counter, self.context_window = backend.counter, backend.context_window

    def complete(self, request):
        self.calls += 1
        return self._backend.complete(request)

    def stream(self, request):
        self.calls += 1
        return self._backend.stream(request)

    async def acomplete(self, request):
        self.calls += 1
        return await self._backend.acomplete(request)

    def astream(self, request):
        self.calls += 1
        return self._backend.astream(request)

    def close(self):
        pass


@pytest.fixture
def counting(llama_backend):
    return CountingBackend(llama_backend)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}

CASES = [
    ("unknown role", [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}], [],
     InvalidMessageError, "messages[1].role"),
    ("tool message with no matching call",
     [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_9", "content": "12C"}], [],
     InvalidMessageError, "messages[1].tool_call_id"),
    ("tool message answering a call twice",
     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "call_1", "content": "12C"},
      {"role": "tool", "tool_call_id": "call_1", "content": "13C"}], [WEATHER],
     InvalidMessageError, "messages[3].tool_call_id"),
    ("non-string content", [{"role": "system", "content": {"text": "be nice"}}, {"role": "user", "content": "hi"}], [],
     InvalidMessageError, "messages[0].content"),
    ("number as content", [{"role": "user", "content": 42}], [], InvalidMessageError, "messages[0].content"),
    ("tool-call arguments that are not a string",
     [{"role": "user", "content": "hi"},
      {"role": "assistant", "content": None, "tool_calls": [
          {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}],
     [WEATHER], InvalidMessageError, "messages[1].tool_calls[0].function.arguments"),
    ("tool schema that is not JSON Schema", [{"role": "user", "content": "hi"}],
     [WEATHER, {"type": "function", "function": {"name": "bad", "parameters": {
         "type": "object", "properties": {"n": {"type": "integr"}}}}}],
     InvalidToolError, "tools[1].function.parameters['properties']['n']['type']"),
    ("duplicate tool name", [{"role": "user", "content": "hi"}], [WEATHER, WEATHER],
     InvalidToolError, "tools[1].function.name"),
    ("tool without type function", [{"role": "user", "content": "hi"}], [{"function": {"name": "x"}}],
     InvalidToolError, "tools[0].type"),
    ("empty messages", [], [], RequestError, "messages"),
    ("tool calls on a user message", [{"role": "user", "content": "hi", "tool_calls": True}], [],
     InvalidMessageError, "messages[0].tool_calls"),
    ("tool call left unanswered before the next turn",
     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
      {"role": "user", "content": "and?"}], [WEATHER], InvalidMessageError, "messages[2].role"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_request_is_rejected_before_the_backend(case, counting, ledger):
    _, messages, tools, error_type, where = case
    pipeline = Pipeline(counting, ledger=ledger)
    with pytest.raises(error_type) as info:
        pipeline.call(ChatRequest(messages=messages, tools=tools))
    assert info.value.where == where, f"error names {info.value.where!r}, expected {where!r}"
    assert where in str(info.value)
    assert counting.calls == 0, "a malformed request reached the backend"


@pytest.mark.parametrize("message, says", [
    ({"role": "user", "text": "hi"}, "messages[0].content: is missing: a user message needs content (its other keys: 'text')"),
    ({"role": "system"}, "messages[0].content: is missing: a system message needs content"),
])
def test_a_message_without_content_says_so_and_names_the_keys_it_has(message, says, counting, ledger):
    """A first-time `{"role": "user", "text": "hi"}` was told "content: must be a string or a list of content parts,
    got NoneType", which reads as a type error in ctxkit rather than a missing key in the message."""
    with pytest.raises(InvalidMessageError) as info:
        Pipeline(counting, ledger=ledger).call(ChatRequest(messages=[message]))
    assert str(info.value) == says and info.value.where == "messages[0].content"
    assert counting.calls == 0


def test_a_developer_message_of_text_parts_is_taken_as_a_system_one_is(counting, ledger):
    """OpenAI accepts `"content": [{"type": "text", ...}]` from a developer message; it was refused here ("must be a
    string, got list") while the same message as "system" passed."""
    parts = [{"type": "text", "text": "Answer in one word."}]
    response = Pipeline(counting, ledger=ledger).call(ChatRequest(
        messages=[{"role": "developer", "content": parts}, {"role": "user", "content": "hi"}],
        params={"max_tokens": 4, "temperature": 0}))
    assert counting.calls == 1 and response.finish_reason in ("stop", "length")


def test_bad_sampling_parameter_names_the_field(counting, ledger):
    pipeline = Pipeline(counting, ledger=ledger)
    with pytest.raises(RequestError, match="temperature"):
        pipeline.call(ChatRequest(messages=[{"role": "user", "content": "hi"}], params={"temperature": 7}))
    with pytest.raises(RequestError, match="temperature"):  # True is an int in Python, not a temperature
        pipeline.call(ChatRequest(messages=[{"role": "user", "content": "hi"}], params={"temperature": True}))
    with pytest.raises(RequestError, match="max_tokens"):
        pipeline.call(ChatRequest(messages=[{"role": "user", "content": "hi"}], params={"max_tokens": 0}))
    assert counting.calls == 0


def test_request_larger_than_the_context_after_all_stages_is_rejected(counting, ledger):
    pipeline = Pipeline(counting, ledger=ledger)
    long_text = "word " * 5000  # ~5000 tokens > n_ctx 4096
    with pytest.raises(ContextOverflowError) as info:
        pipeline.call(ChatRequest(messages=[{"role": "user", "content": long_text}], params={"max_tokens": 16}))
    assert info.value.prompt_tokens > counting.context_window
    assert info.value.context_window == 4096
    assert counting.calls == 0
    record = ledger.records[-1]
    assert record.status == "error" and record.error_type == "ContextOverflowError"


def test_a_stage_that_breaks_the_request_is_caught_before_the_backend(counting, ledger):
    from ctxkit import Stage

    class DropFirstMessage(Stage):
        def before_model(self, request):
            return request.override(messages=list(request.messages)[1:])

    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "12C"}]
    class DropSecondMessage(Stage):  # drops the assistant tool call: its result is orphaned
        def before_model(self, request):
            return request.override(messages=list(request.messages)[1:])

    pipeline = Pipeline(counting, stages=[DropFirstMessage(), DropSecondMessage()], ledger=ledger)
    with pytest.raises(InvalidMessageError, match="answers no earlier assistant tool call"):
        pipeline.call(ChatRequest(messages=messages, tools=[WEATHER]))
    assert counting.calls == 0


def test_params_and_extra_body_of_the_wrong_shape_name_the_field(counting, ledger):
    pipeline = Pipeline(counting, ledger=ledger)
    with pytest.raises(RequestError) as info:
        pipeline.call(ChatRequest(messages=[{"role": "user", "content": "hi"}], params=None))
    assert info.value.where == "params"
    with pytest.raises(RequestError) as info:
        ChatRequest.from_openai_kwargs({"messages": [{"role": "user", "content": "hi"}],
                                        "extra_body": {"ctxkit": {"namspace": "team-a"}}})
    assert info.value.where == 'extra_body["ctxkit"]' and "namspace" in str(info.value)
    assert counting.calls == 0


def test_an_unknown_sampling_parameter_is_named_not_ignored(counting, ledger):
    """`max_token` let the local model generate 256 tokens and reached the openai SDK as a TypeError."""
    pipeline = Pipeline(counting, ledger=ledger)
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(RequestError, match="max_token") as info:
        pipeline.call(ChatRequest(messages=hi, params={"max_token": 3}))
    assert info.value.where == "params"
    with pytest.raises(RequestError, match=r"extra_body"):
        pipeline.call(ChatRequest(messages=hi, params={"top_k": 1}))
    assert counting.calls == 0
    pipeline.call(ChatRequest(messages=hi, params={"max_tokens": 3, "extra_body": {"top_k": 1}}))
    assert counting.calls == 1


def test_openais_not_given_sentinels_mean_left_out(counting, ledger):
    """Wrappers (the OpenAI Agents SDK, LangChain) pass openai.NOT_GIVEN / openai.omit for every setting
    their caller left unset; the drop-in client refused them as values."""
    import openai

    client = Pipeline(counting, ledger=ledger).openai()
    for unset in {openai.NOT_GIVEN, getattr(openai, "omit", openai.NOT_GIVEN)}:
        reply = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=unset,
            tool_choice=unset, stream=unset, stop=unset, metadata=unset, user=unset)
        assert reply.choices[0].message is not None
    assert [r.status for r in ledger.records] == ["ok"] * counting.calls


def test_the_openai_clients_per_call_options_are_taken_and_unknown_extras_named(counting, ledger):
    """timeout=, extra_headers=, reasoning_effort= and store= were refused (or extra_headers silently dropped)
    by the drop-in client; the local model has nothing the service settings change, and answers."""
    client = Pipeline(counting, ledger=ledger).openai()
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=2, timeout=30,
        extra_headers={"X-Trace-Id": "t"}, reasoning_effort="low", store=False, service_tier="auto")
    assert reply.choices[0].message is not None
    import openai

    dropped = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                             extra_headers={"X-Stainless-Lang": openai.Omit()})
    assert dropped.choices[0].message is not None, "openai's way to drop one of its default headers"
    with pytest.raises(RequestError, match="extra_heders"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                       extra_heders={"X-Trace-Id": "t"})


def test_backend_specific_sampling_in_extra_body_reaches_the_local_model(llama_backend, ledger):
    """top_k=1 makes sampling greedy: at temperature 1.5 three different seeds then agree."""
    client = Pipeline(llama_backend, ledger=ledger).openai()
    messages = [{"role": "user", "content": "Name three colours."}]
    request = ChatRequest.from_openai_kwargs({"messages": messages, "extra_body": {"top_k": 1, "ctxkit": {
        "namespace": "team-a"}}})
    assert request.params["extra_body"] == {"top_k": 1} and request.namespace == "team-a"
    answers = {client.chat.completions.create(model="m", messages=messages, temperature=1.5, max_tokens=16, seed=seed,
                                              extra_body={"top_k": 1}).choices[0].message.content
               for seed in (1, 2, 3)}
    assert len(answers) == 1, answers


def test_vllms_repetition_penalty_reaches_the_local_model_as_its_repeat_penalty(llama_backend, ledger):
    """`repetition_penalty` (vLLM's name, which `ctxkit serve` moves into extra_body) was dropped in silence."""
    client = Pipeline(llama_backend, ledger=ledger).openai()
    messages = [{"role": "user", "content": "Repeat the word 'cat' ten times."}]

    def answer(extra_body: dict) -> str | None:
        return client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=24,
                                              extra_body=extra_body).choices[0].message.content

    penalised = answer({"repeat_penalty": 3.0})
    assert penalised != answer({}), "the prompt must show the penalty at all"
    assert answer({"repetition_penalty": 3.0}) == penalised
    assert answer({"repetition_penalty": 3.0, "repeat_penalty": 1.0}) == answer({"repeat_penalty": 1.0}), \
        "llama.cpp's own name wins"
    for unknown in ({"top_kk": 1}, {"guided_json": {"type": "object"}}):
        with pytest.raises(RequestError, match=rf"extra_body\['{next(iter(unknown))}'\]: is not a setting"):
            answer(unknown)


@pytest.mark.parametrize(("fields", "where"), [
    ({"metadata": "abc"}, "metadata"),
    ({"metadata": [1, 2]}, "metadata"),
    ({"extra_body": {"ctxkit": {"metadata": "abc"}}}, 'extra_body["ctxkit"].metadata'),
    ({"extra_body": {"ctxkit": {"conversation_id": ["a"]}}}, "conversation_id"),
    ({"extra_body": {"ctxkit": {"conversation_id": 17}}}, "conversation_id"),
    ({"extra_body": {"ctxkit": {"conversation_id": ""}}}, "conversation_id"),
    ({"extra_body": {"ctxkit": {"namespace": {"x": 1}}}}, "namespace"),
    # PostgreSQL indexes them: past its index row size every write failed, and a quarantine kept for a later
    # write held the shared registry offline for good
    ({"extra_body": {"ctxkit": {"namespace": "n" * 257}}}, "namespace"),
    ({"extra_body": {"ctxkit": {"conversation_id": "é" * 257}}}, "conversation_id"),
    ({"timeout": -1}, "timeout"),
    ({"timeout": "30"}, "timeout"),
    ({"extra_headers": {"Authorization": 123}}, "extra_headers"),
    ({"extra_query": ["api-version"]}, "extra_query"),
    ({"reasoning_effort": 2}, "reasoning_effort"),
    ({"store": "no"}, "store"),
])
def test_ctxkit_fields_of_the_wrong_type_name_the_field(counting, ledger, fields, where):
    """A list as conversation_id used to be a 500 in the proxy (unhashable, in the summary store)."""
    pipeline = Pipeline(counting, ledger=ledger)
    with pytest.raises(RequestError) as info:
        pipeline.openai().chat.completions.create(messages=[{"role": "user", "content": "hi"}], **fields)
    assert info.value.where == where
    assert counting.calls == 0 and not ledger.records


def test_a_tool_choice_naming_a_tool_not_sent_is_refused_before_the_local_model(llama_backend, ledger):
    """It built an empty grammar, and llama.cpp crashed the whole process (SIGSEGV) on it."""
    pipeline = Pipeline(llama_backend, ledger=ledger)
    choice = {"type": "function", "function": {"name": "get_wether"}}
    with pytest.raises(RequestError, match="not among the tools sent") as info:
        pipeline.chat([{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER],
                      params={"tool_choice": choice, "max_tokens": 8})
    assert info.value.where == "tool_choice"
    with pytest.raises(RequestError, match="must be"):
        pipeline.chat([{"role": "user", "content": "hi"}], tools=[WEATHER], params={"tool_choice": "any"})


def test_a_prompt_that_fills_the_window_is_the_typed_overflow_error(llama_backend):
    from ctxkit import LlamaCppBackend

    small = LlamaCppBackend(llama_backend.model_path, n_ctx=256, n_threads=1)
    window = small.context_window
    with pytest.raises(ContextOverflowError):  # called without a pipeline, too
        small.complete(ChatRequest(messages=[{"role": "user", "content": "word " * (2 * window)}]))
    words = 1
    while small.counter.count_prompt([{"role": "user", "content": "word " * words}]) < window:
        words += 1
    exact = [{"role": "user", "content": "word " * words}]
    if small.counter.count_prompt(exact) == window:  # a prompt of exactly the window leaves no room to answer
        with pytest.raises(ContextOverflowError):
            Pipeline(small, ledger=Ledger()).call(ChatRequest(messages=exact))
    # A prompt plus max_tokens over the window: llama.cpp alone quietly cut max_tokens to what was left and
    # answered "length"; the backend refuses it as the pipeline does, without one too.
    half = [{"role": "user", "content": "word " * (words // 2)}]
    with pytest.raises(ContextOverflowError):
        small.complete(ChatRequest(messages=half, params={"max_tokens": window}))


def test_a_tool_schema_sent_on_every_call_is_checked_once(monkeypatch):
    """Each call re-checked every schema against the JSON Schema meta-schema: a request carrying 1,500 tools
    cost seconds of validation per call. The verdict is remembered per schema (errors included)."""
    from ctxkit import validation
    from ctxkit.validation import validate_request

    checked: list[str] = []
    check = validation._check_schema
    monkeypatch.setattr(validation, "_check_schema", lambda canonical: checked.append(canonical) or check(canonical))
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "description": "memo test once"}}}}}
    request = ChatRequest(messages=[{"role": "user", "content": "hi"}], tools=[tool])
    validate_request(request)
    validate_request(request.override(tools=[json.loads(json.dumps(tool))]))  # an equal copy, as the next call sends
    assert len(checked) == 1
    bad = {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {"n": {"type": "float"}}}}}
    for _ in range(2):  # a remembered error is still raised, with its place
        with pytest.raises(InvalidToolError, match=r"tools\[0\].*properties.*n"):
            validate_request(request.override(tools=[bad]))


def test_remembered_schema_verdicts_do_not_keep_the_schemas_alive():
    """The verdicts were an lru_cache keyed by each schema's text: the last 32,768 schemas a long-running
    process was sent stayed in memory after their requests ended (200 schemas of 50 KB: 10 MB held)."""
    import gc
    import tracemalloc

    from ctxkit.validation import validate_request

    def request(i: int) -> ChatRequest:
        tool = {"type": "function", "function": {"name": f"t{i}", "parameters": {
            "type": "object", "properties": {"q": {"type": "string", "description": f"{i} " + "x" * 50_000}}}}}
        return ChatRequest(messages=[{"role": "user", "content": "hi"}], tools=[tool])

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200):
            validate_request(request(i))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 1_000_000, f"{held} bytes held after 200 requests had ended"


def test_a_schema_llama_cpp_cannot_parse_is_a_request_error_not_a_crash():
    """`"pattern": "^\\b\\d{5}$"` (a word boundary, which no grammar holds) and an empty enum passed validation,
    and llama.cpp, unable to parse the grammar made from them, sampled without one: the whole process died
    (SIGSEGV), the proxy with it."""
    import subprocess
    import sys

    script = """
from ctxkit import LlamaCppBackend, Pipeline, RequestError
client = Pipeline(LlamaCppBackend(n_ctx=512, n_threads=1)).openai()
def tool(spec):
    return [{"type": "function", "function": {"name": "lookup", "description": "Look up a code",
             "parameters": {"type": "object", "properties": {"code": spec}, "required": ["code"]}}}]
for spec in ({"type": "string", "pattern": "^\\\\b\\\\d{5}$"}, {"type": "string", "enum": []}):
    try:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Look up 10001."}],
                                       tools=tool(spec), max_tokens=8)
        print("answered")
    except RequestError as exc:
        print("refused", exc.where)
ok = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Look up 10001."}],
                                    tools=tool({"type": "string", "pattern": "^[0-9]{5}$"}), max_tokens=8)
print("fine", ok.choices[0].finish_reason)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["refused tools[0].function.parameters"] * 2, done.stdout
    assert "fine" in done.stdout


def test_malformed_create_arguments_are_typed_errors_naming_the_argument(llama_backend):
    """A missing `messages`, `tools` given as one dict, `extra_body` as a string, a `tool_choice` whose
    function is a bare name, a `model` that is a number: KeyError, TypeError, AttributeError (a 500 from
    `ctxkit serve`), or a ledger record lost to the price lookup."""
    client = Pipeline(llama_backend, ledger=Ledger()).openai()
    hello = [{"role": "user", "content": "hi"}]
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    cases = [({}, "messages"), ({"messages": hello, "tools": weather}, "tools"),
             ({"messages": hello, "extra_body": "x"}, "extra_body"),
             ({"messages": hello, "tools": [weather], "tool_choice": {"type": "function", "function": "get_weather"}},
              "tool_choice"),
             ({"messages": hello, "model": 5}, "model"),
             ({"messages": hello, "timeout": float("inf")}, "timeout")]
    for kwargs, where in cases:
        with pytest.raises(RequestError) as info:
            client.chat.completions.create(**{"model": "m", "max_tokens": 2, **kwargs})
        assert info.value.where == where, (kwargs, info.value)


def test_a_lone_surrogate_is_an_invalid_message_naming_where(llama_backend):
    client = Pipeline(llama_backend).openai()
    for content, field in (("hi \ud800 there", "content"), ([{"type": "text", "text": "\udfff"}], "content[0].text")):
        with pytest.raises(InvalidMessageError) as info:
            client.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "user", "content": content}])
        assert info.value.where == f"messages[0].{field}", info.value.where


def test_a_lone_surrogate_in_a_tool_call_or_a_tool_schema_is_refused_by_name(llama_backend):
    client = Pipeline(llama_backend).openai()
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"q": "\ud800"}'}}
    replayed = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    with pytest.raises(InvalidMessageError) as info:
        client.chat.completions.create(model="m", max_tokens=2, messages=replayed)
    assert info.value.where == "messages[1].tool_calls[0].function.arguments"
    for function, where in (({"description": "Find \udfff"}, "tools[0].function.description"),
                            ({"parameters": {"type": "object", "properties": {"q": {"type": "string",
                                                                                    "enum": ["\ud800"]}}}},
                             "tools[0].function.parameters")):
        tool = {"type": "function", "function": {"name": "f", **function}}
        with pytest.raises(InvalidToolError) as info:
            client.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}],
                                           tools=[tool])
        assert info.value.where == where, info.value.where


def test_a_lone_surrogate_in_any_other_field_the_backend_gets_is_refused_by_name():
    """A stop sequence, `user`, a message's name or a response_format schema holding "\\ud800" failed its UTF-8
    encode deep in the backend: `ctxkit serve` answered 500 (an upstream) or 502 (the local model), not a 400."""
    from ctxkit.validation import validate_request

    hi = [{"role": "user", "content": "hi"}]
    schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object", "description": "\ud800"}}}
    for request, where in ((ChatRequest(hi, params={"stop": ["x\ud800"]}), "stop[0]"),
                           (ChatRequest(hi, params={"user": "u\udfff"}), "user"),
                           (ChatRequest([{"role": "user", "name": "b\ud800", "content": "hi"}]), "messages[0].name"),
                           (ChatRequest(hi, params={"response_format": schema}),
                            "response_format.json_schema.schema.description"),
                           (ChatRequest(hi, metadata={"documents": [{"id": "d", "text": "cut \ud83d"}]}),
                            "metadata.documents[0].text"),
                           # extra_body={"ctxkit": {"namespace": ...}}: hashed into the prompt keys, a UnicodeEncodeError
                           (ChatRequest(hi, namespace="acme\udcff"), "namespace"),
                           # a tool's field beside its parameters: hashed into the cache's keys, a UnicodeEncodeError
                           (ChatRequest(hi, tools=[{"type": "function", "function": {"name": "f", "strict": "\ud800"}}]),
                            "tools[0].function.strict"),
                           # a description beside "function", not in it: checked at neither level
                           (ChatRequest(hi, tools=[{"type": "function", "function": {"name": "f"},
                                                    "description": "\ud800"}]), "tools[0].description")):
        with pytest.raises(RequestError) as info:
            validate_request(request)
        assert info.value.where == where, info.value.where
    validate_request(ChatRequest(hi, params={"stop": ["\U0001f600"], "user": "caf\u00e9"}))  # real Unicode passes


def test_a_file_that_is_no_gguf_is_a_configuration_error(tmp_path):
    from ctxkit import ConfigurationError, LlamaCppBackend

    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a model" * 100)
    with pytest.raises(ConfigurationError, match="cannot load the GGUF model"):
        LlamaCppBackend(path)
    with pytest.raises(ConfigurationError, match="n_ctx"):
        LlamaCppBackend(n_ctx=-5)


@pytest.mark.parametrize("key", ["ctxkit.quarantined", "ctxkit.quarantined_documents"])
@pytest.mark.parametrize("value", [5, "abc", ["x"], {"fp": 3}])
def test_quarantine_marks_of_the_wrong_shape_in_metadata_name_the_field(key, value, counting, ledger, tmp_path,
                                                                        embedder):
    """A proxy client sends OpenAI's `metadata` as it likes: {"ctxkit.quarantined": 5} was a TypeError deep in the
    cache stage ('argument of type int is not iterable'), a 500 "internal error" from `ctxkit serve`."""
    from ctxkit.stages.cache import LocalStore, SemanticCacheStage

    cache = SemanticCacheStage(LocalStore(tmp_path / "cache"), embedder, default_model=counting.model)
    pipeline = Pipeline(counting, [cache], ledger=ledger)
    metadata = {key: value, "documents": [{"id": "d", "text": "Oslo is in Norway."}]}
    with pytest.raises(RequestError) as info:
        pipeline.call(ChatRequest(messages=[{"role": "user", "content": "Where is Oslo?"}],
                                  params={"temperature": 0, "max_tokens": 4}, metadata=metadata))
    assert info.value.where == f'metadata["{key}"]'
    assert counting.calls == 0


def test_a_content_part_whose_type_is_no_string_names_the_part():
    """`{"type": {}}` is unhashable: the set lookup of known part types raised TypeError (a 500 from the proxy)."""
    from ctxkit.validation import validate_request

    for kind in ({}, [], 5, None):
        with pytest.raises(InvalidMessageError) as info:
            validate_request(ChatRequest([{"role": "user", "content": [{"type": kind, "text": "hi"}]}]))
        assert info.value.where == "messages[0].content[0]", info.value.where


def _nested(depth):
    value = "leaf"
    for _ in range(depth):
        value = {"a": [value]}
    return value


def test_values_nested_past_the_limit_are_refused_by_name_not_a_recursion_error(llama_backend):
    """A value hundreds of levels deep (a JSON body's parser takes ~1000) ran the surrogate check, the JSON Schema
    check or the client's deepcopy out of stack: a RecursionError, a 500 from `ctxkit serve`. A list that holds
    itself is as deep as it gets."""
    from ctxkit.validation import MAX_NESTING, validate_request

    hi = [{"role": "user", "content": "hi"}]
    itself: list = []
    itself.append(itself)
    deep = _nested(MAX_NESTING)

    def tool(**function):
        return [{"type": "function", "function": {"name": "f", **function}}]

    for request, where in ((ChatRequest([{**hi[0], "x": deep}]), "messages[0].x"),
                           (ChatRequest([{**hi[0], "x": itself}]), "messages[0].x"),
                           (ChatRequest(hi, metadata={"x": deep}), "metadata.x"),
                           (ChatRequest(hi, params={"logit_bias": {"1": deep}}), "params.logit_bias.1"),
                           (ChatRequest(hi, tools=tool(strict=deep)), "tools[0].function.strict"),
                           (ChatRequest(hi, tools=tool(parameters={"type": "object", "properties": {"a": deep}})),
                            "tools[0].function.parameters.properties.a")):
        with pytest.raises(RequestError, match="nested more than") as info:
            validate_request(request)
        assert info.value.where.startswith(where), info.value.where
    validate_request(ChatRequest([{**hi[0], "x": _nested(MAX_NESTING // 2 - 1)}]))  # deep, but within the limit
    client = Pipeline(llama_backend).openai()
    for field, value in (("messages", [{**hi[0], "x": _nested(600)}]),
                         ("tools", tool(parameters={"type": "object", "properties": {"a": _nested(600)}}))):
        with pytest.raises(RequestError) as info:
            client.chat.completions.create(model="m", max_tokens=2, **{"messages": hi, field: value})
        assert info.value.where.startswith(field), info.value.where


def test_tool_call_arguments_nested_past_the_parsers_limit_are_replaced_not_a_crash():
    """Replayed arguments '{"a": [[[[...' 50,000 deep: the check for a JSON object raised RecursionError."""
    from ctxkit.validation import replace_malformed_arguments, validate_request

    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": ' + "[" * 50_000 + "}"}}
    request = ChatRequest([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                                                                "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "c1", "content": "error"}])
    validate_request(request)
    fixed, replaced = replace_malformed_arguments(request)
    assert replaced == ["messages[1].tool_calls[0].function.arguments"]
    assert fixed.messages[1]["tool_calls"][0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize(("prop", "refused"), [
    ({"type": "string", "minLength": 100_000_000}, "minLength 100000000"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 100_000_000}, "minItems 100000000"),
    ({"type": "string", "pattern": "^[a-z]{20000000}$"}, r"pattern quantifier \{20000000\}"),
])
def test_a_repetition_count_no_answer_can_hold_is_refused_not_built(prop, refused, llama_backend):
    """`"minLength": 100000000` (a 200-byte request) spent 26 s and 2 GB building a 500 MB grammar for the local
    model before llama.cpp parsed it: one call of the proxy's tenant stalled it for everyone. A pattern's count
    (`{20000000}`) took 8 s and 1.4 GB."""
    import time

    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"b": prop}, "required": ["b"]}}}
    started = time.perf_counter()
    with pytest.raises(RequestError, match=refused) as info:
        Pipeline(llama_backend).chat([{"role": "user", "content": "hi"}], tools=[tool],
                                     params={"max_tokens": 2, "tool_choice": "required"})
    assert info.value.where == "tools[0].function.parameters"
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("spec", [{"type": "string", "maxLength": 2000},
                                  {"type": "array", "items": {"type": "integer"}, "maxItems": 2000},
                                  {"type": "string", "pattern": "^[a-z]{0,2000}$"}])
@pytest.mark.parametrize("place", ["tools", "response_format"])
def test_a_wide_maximum_is_left_out_of_the_grammar_not_refused_or_a_crash(spec, place, llama_backend):
    """The converter writes a maximum as one nested optional group per copy: llama.cpp refused past 1,000 (a
    summary of `"maxLength": 2000` was "the local model cannot follow this schema") and past ~10,000 overflowed
    its stack (`"maxLength": 20000`: SIGSEGV, the server gone). The grammar leaves it out; a call past it is
    refused after generation."""
    from ctxkit.backends.schema_grammar import schema_for_grammar, schema_to_gbnf

    schema = {"type": "object", "properties": {"b": spec}, "required": ["b"]}
    if place == "tools":
        kwargs: dict = {"tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}],
                        "params": {"max_tokens": 4, "tool_choice": "required"}}
    else:
        kwargs = {"params": {"max_tokens": 4, "response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "x", "schema": schema}}}}
    Pipeline(llama_backend).chat([{"role": "user", "content": "hi"}], **kwargs)
    huge = json.loads(json.dumps(schema).replace("2000", "1000000"))  # 100,000,000: 3 s and 2.3 GB, then SIGSEGV
    assert len(schema_to_gbnf(schema_for_grammar(huge, root=True), prop_order=[])) < 10_000
