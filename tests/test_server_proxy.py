"""The OpenAI-compatible proxy over real HTTP on loopback: uvicorn serving the embedded model, the `openai`
client (and raw httpx where the client would hide what is on the wire) talking to it."""

from __future__ import annotations

import json
import logging
import socket
import time

import httpx
import openai
import pytest

from ctxkit import ChatRequest, Ledger, Pipeline, read_ledger
from ctxkit.errors import ConfigurationError
from ctxkit.server import ApiKeys, create_app, serve_in_thread
from ctxkit.stage import Stage

KEYS = {"key-alpha-0001": "alpha", "key-beta-0002": "beta"}
MAX_BODY = 64 * 1024
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def proxy(llama_backend, tmp_path_factory):
    """(base_url, ledger path) of a proxy over the embedded model."""
    path = tmp_path_factory.mktemp("proxy") / "ledger.jsonl"
    pipeline = Pipeline(llama_backend, ledger=Ledger(path))
    app = create_app(pipeline, ApiKeys(KEYS), max_body_bytes=MAX_BODY)
    with serve_in_thread(app) as base_url:
        yield base_url, path


def client(base_url: str, key: str = "key-alpha-0001") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=120)


def records(path):
    return list(read_ledger(path)) if path.exists() else []


def test_requests_without_a_key_or_with_a_wrong_key_get_401(proxy):
    base_url, path = proxy
    before = len(records(path))
    missing = httpx.post(f"{base_url}/v1/chat/completions", json={"messages": HELLO})
    assert missing.status_code == 401, missing.text
    assert missing.json()["error"]["code"] == "missing_api_key"
    assert httpx.get(f"{base_url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError) as wrong:
        client(base_url, key="key-wrong-9999").chat.completions.create(model="m", messages=HELLO, max_tokens=2)
    assert wrong.value.status_code == 401
    assert "key-wrong-9999" not in wrong.value.response.text  # an error never echoes a key
    assert len(records(path)) == before, "a refused request must never reach the pipeline"


def test_each_key_maps_to_its_own_namespace(proxy):
    base_url, path = proxy
    for key, conversation in (("key-alpha-0001", "tenancy-a"), ("key-beta-0002", "tenancy-b")):
        client(base_url, key).chat.completions.create(
            model="m", messages=HELLO, max_tokens=2, extra_body={"ctxkit": {"conversation_id": conversation}}
        )
    by_conversation = {r.conversation_id: r.namespace for r in records(path)}
    assert by_conversation["tenancy-a"] == "alpha"
    assert by_conversation["tenancy-b"] == "beta"


def test_a_request_cannot_choose_another_tenants_namespace(proxy):
    base_url, _ = proxy
    with pytest.raises(openai.BadRequestError) as err:
        client(base_url).chat.completions.create(
            model="m", messages=HELLO, max_tokens=2, extra_body={"ctxkit": {"namespace": "beta"}}
        )
    assert err.value.body["param"] == "ctxkit.namespace"
    smuggled = httpx.post(f"{base_url}/v1/chat/completions", headers={"Authorization": "Bearer key-alpha-0001"},
                          json={"messages": HELLO, "extra_body": {"ctxkit": {"namespace": "beta"}}})
    assert smuggled.status_code == 400 and smuggled.json()["error"]["param"] == "extra_body"


@pytest.mark.parametrize("option", ["extra_headers", "extra_query", "timeout"])
def test_a_body_cannot_carry_the_python_clients_http_options(proxy, option):
    """The drop-in client takes extra_headers= for its own HTTP request; in a proxy's body they would become
    the upstream request's headers (its Authorization, the operator's key) under a tenant's control."""
    base_url, _ = proxy
    value = {"timeout": 5}.get(option, {"Authorization": "Bearer tenant-chosen"})
    sent = httpx.post(f"{base_url}/v1/chat/completions", headers={"Authorization": "Bearer key-alpha-0001"},
                      json={"messages": HELLO, "max_tokens": 2, option: value})
    assert sent.status_code == 400 and sent.json()["error"]["param"] == option


def test_an_oversized_body_gets_413_before_any_work(proxy):
    base_url, path = proxy
    before = len(records(path))
    with pytest.raises(openai.APIStatusError) as err:
        client(base_url).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x" * (MAX_BODY + 10)}], max_tokens=2
        )
    assert err.value.status_code == 413
    assert len(records(path)) == before


def test_a_malformed_request_gets_400_naming_the_field(proxy):
    base_url, _ = proxy
    with pytest.raises(openai.BadRequestError) as err:
        client(base_url).chat.completions.create(model="m", messages=[{"role": "wizard", "content": "hi"}])
    assert err.value.body["param"] == "messages[0].role"
    assert "unknown role 'wizard'" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client(base_url).chat.completions.create(model="m", messages=HELLO, max_tokens=0)
    assert err.value.body["param"] == "max_tokens"
    headers = {"Authorization": "Bearer key-alpha-0001", "Content-Type": "application/json"}
    not_json = httpx.post(f"{base_url}/v1/chat/completions", headers=headers, content=b"{not json")
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]["message"]
    no_messages = httpx.post(f"{base_url}/v1/chat/completions", headers=headers, json={"model": "m"})
    assert no_messages.status_code == 400 and no_messages.json()["error"]["param"] == "messages"
    for field, value in (("stream", "false"), ("stream", 1), ("stream_options", "x"), ("stream_options", [1])):
        bad = httpx.post(f"{base_url}/v1/chat/completions", headers=headers,
                         json={"model": "m", "messages": HELLO, field: value})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == field, (field, value, bad.text)


def test_include_usage_that_is_not_a_boolean_is_a_400_not_taken_as_true(proxy):
    """'false' (a string from a form or a config file) was truthy: the stream ended with the usage chunk the
    client said it did not want, where every other field of a wrong type is a 400 naming it."""
    base_url, _ = proxy
    headers = {"Authorization": "Bearer key-alpha-0001"}
    for value in ("false", 0, "yes"):
        bad = httpx.post(f"{base_url}/v1/chat/completions", headers=headers, timeout=60,
                         json={"messages": HELLO, "max_tokens": 2, "stream": True,
                               "stream_options": {"include_usage": value}})
        assert bad.status_code == 400, (value, bad.text[-300:])
        assert bad.json()["error"]["param"] == "stream_options.include_usage"
    good = httpx.post(f"{base_url}/v1/chat/completions", headers=headers, timeout=60,
                      json={"messages": HELLO, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": False}})
    assert good.status_code == 200 and '"usage"' not in good.text


def test_an_upstream_that_refuses_the_proxys_own_key_is_a_502_not_a_401():
    from ctxkit.errors import BackendStatusError
    from ctxkit.server.app import error_for

    for status in (401, 403):
        answer = error_for(BackendStatusError("invalid key", backend="openai", status=status))
        assert answer.status == 502 and answer.code == f"upstream_{status}"
        assert "WWW-Authenticate" not in answer.response().headers
    assert error_for(BackendStatusError("slow down", backend="openai", status=429)).status == 429


def test_a_completion_reports_the_usage_the_ledger_recorded(proxy):
    base_url, path = proxy
    c = client(base_url, "key-beta-0002")
    models = c.models.list()
    completion = c.chat.completions.create(
        model="anything", messages=HELLO, max_tokens=4, temperature=0,
        extra_body={"ctxkit": {"conversation_id": "usage-check"}},
    )
    assert completion.model == models.data[0].id  # the proxy serves its own model whatever is asked
    assert completion.choices[0].message.role == "assistant"
    record = next(r for r in records(path) if r.conversation_id == "usage-check")
    assert record.status == "ok" and record.namespace == "beta"
    assert completion.usage.prompt_tokens == record.tokens_sent == record.tokens_naive
    assert completion.usage.completion_tokens == record.tokens_out <= 4


def test_streaming_answers_arrive_as_server_sent_events(proxy):
    base_url, path = proxy
    stream = client(base_url).chat.completions.create(
        model="m", messages=HELLO, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ctxkit": {"conversation_id": "sse-check"}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and not chunks[-1].choices  # the usage chunk comes last
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    record = next(r for r in records(path) if r.conversation_id == "sse-check")
    assert record.stream and record.status == "ok"
    assert chunks[-1].usage.completion_tokens == record.tokens_out
    assert text  # the model said something

    with httpx.stream("POST", f"{base_url}/v1/chat/completions",
                      headers={"Authorization": "Bearer key-alpha-0001"},
                      json={"messages": HELLO, "max_tokens": 3, "stream": True}) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in raw.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(line[6:]) for line in lines[:-1])  # not asked for: not sent


def test_metrics_count_tokens_by_namespace_and_errors_by_type(proxy):
    base_url, _ = proxy
    client(base_url, "key-beta-0002").chat.completions.create(model="m", messages=HELLO, max_tokens=2)
    httpx.post(f"{base_url}/v1/chat/completions", json={"messages": HELLO})  # a 401
    text = httpx.get(f"{base_url}/metrics").text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['ctxkit_tokens_naive_total{namespace="beta"}'] > 0
    assert samples['ctxkit_tokens_sent_total{namespace="beta"}'] > 0
    assert samples['ctxkit_errors_total{type="authentication_error"}'] >= 1
    assert samples['ctxkit_request_seconds_count{stream="false"}'] >= 1
    assert samples["ctxkit_backend_seconds_count"] >= 1
    assert httpx.get(f"{base_url}/healthz").json()["status"] == "ok"


def test_metrics_count_the_tokens_of_a_call_that_failed_after_the_backend_took_it(llama_backend, tmp_path):
    """A stream whose client left half way was processed and generated that far, and the ledger says so: the
    token totals in /metrics skipped every failed call, so they disagreed with the ledger (and the bill)."""
    path = tmp_path / "ledger.jsonl"
    app = create_app(Pipeline(llama_backend, ledger=Ledger(path)), ApiKeys(KEYS))
    with serve_in_thread(app) as base_url:
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", headers={"Authorization": "Bearer key-alpha-0001"},
                          json={"messages": HELLO, "max_tokens": 200, "temperature": 0, "stream": True},
                          timeout=60) as raw:
            for number, _ in enumerate(raw.iter_lines()):
                if number > 6:
                    break
        client(base_url).chat.completions.create(model="m", messages=HELLO, max_tokens=2)  # its slot came back
        text = httpx.get(f"{base_url}/metrics").text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    left = [r for r in records(path) if r.status == "error"]
    assert len(left) == 1 and left[0].tokens_sent > 0 and left[0].tokens_out > 0
    assert samples['ctxkit_tokens_sent_total{namespace="alpha"}'] == sum(r.tokens_sent for r in records(path))
    assert samples['ctxkit_tokens_out_total{namespace="alpha"}'] == sum(r.tokens_out for r in records(path))
    assert samples["ctxkit_backend_seconds_count"] == 1  # latencies stay those of completed calls


def test_keys_never_reach_the_logs_or_the_ledger(proxy, caplog):
    base_url, path = proxy
    caplog.set_level(logging.DEBUG)
    client(base_url, "key-alpha-0001").chat.completions.create(model="m", messages=HELLO, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client(base_url, "key-guess-7777").chat.completions.create(model="m", messages=HELLO, max_tokens=2)
    logged = caplog.text + path.read_text()
    for key in (*KEYS, "key-guess-7777"):
        assert key not in logged
    assert "key-alpha" not in repr(ApiKeys(KEYS))


def test_keys_are_required_and_well_formed():
    with pytest.raises(ConfigurationError, match="open relay"):
        ApiKeys.parse("")
    with pytest.raises(ConfigurationError, match="not 'key:namespace'"):
        ApiKeys.parse("just-a-key-without-namespace")
    keys = ApiKeys.parse("k-1234567:team-a, k-7654321:team-b\n# comment\n")
    assert keys.namespace_for("k-1234567") == "team-a" and keys.namespace_for("k-7654321") == "team-b"
    assert keys.namespace_for("k-0000000") is None
    # A key may contain ':' in a file's 'key namespace' lines: it was split there, refused, and half the key
    # printed in the error as a namespace.
    keys = ApiKeys.parse("sk-live-abcdef:SECRETPART1234 team-a\nkey-2:x:y team-b\n")
    assert keys.namespace_for("sk-live-abcdef:SECRETPART1234") == "team-a" and keys.namespace_for("key-2:x:y") == "team-b"
    assert ApiKeys.parse("sk-abcdefgh :team-a").namespace_for("sk-abcdefgh") == "team-a"


def test_from_openai_kwargs_is_what_the_proxy_builds_on():
    # The proxy relies on from_openai_kwargs rejecting fields it does not know (typos never pass silently).
    with pytest.raises(Exception, match="unsupported argument"):
        ChatRequest.from_openai_kwargs({"messages": HELLO, "temprature": 0.1})


def test_a_client_that_hangs_up_mid_stream_does_not_hold_the_model(proxy):
    """The local model serves one generation at a time; a stream whose client left must let go of it."""
    base_url, path = proxy
    with httpx.stream("POST", f"{base_url}/v1/chat/completions",
                      headers={"Authorization": "Bearer key-alpha-0001"},
                      json={"messages": HELLO, "max_tokens": 200, "temperature": 0, "stream": True,
                            "ctxkit": {"conversation_id": "hung-up"}}) as raw:
        next(raw.iter_lines())
    answer = client(base_url).with_options(timeout=60).chat.completions.create(
        model="m", messages=HELLO, max_tokens=2, extra_body={"ctxkit": {"conversation_id": "after-hang-up"}})
    assert answer.choices[0].message.content is not None
    by_conversation = {r.conversation_id: r for r in records(path)}
    assert by_conversation["hung-up"].status == "error"
    assert by_conversation["after-hang-up"].status == "ok"


def test_a_client_that_hangs_up_during_its_upload_is_a_499_not_a_server_error(proxy, caplog):
    """A client gone half way through sending its body (its timeout on a slow link) left the proxy logging an
    'unexpected error' traceback and counting a 500 server_error, which pages whoever watches the 5xx rate."""
    base_url, _ = proxy
    caplog.set_level(logging.ERROR, logger="ctxkit.server")

    def count(metrics: str, line: str) -> float:
        found = [float(m.rsplit(" ", 1)[1]) for m in metrics.splitlines() if m.startswith(line + " ")]
        return found[0] if found else 0.0

    closed = 'ctxkit_http_requests_total{endpoint="chat",status="499"}'
    failed = 'ctxkit_http_requests_total{endpoint="chat",status="500"}'
    before = httpx.get(f"{base_url}/metrics").text
    with socket.create_connection((httpx.URL(base_url).host, httpx.URL(base_url).port)) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer key-alpha-0001\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 10000\r\n\r\n{\"messages\": [")
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while count(httpx.get(f"{base_url}/metrics").text, closed) == count(before, closed) and time.monotonic() < deadline:
        time.sleep(0.05)
    after = httpx.get(f"{base_url}/metrics").text
    assert count(after, closed) == count(before, closed) + 1
    assert count(after, failed) == count(before, failed)
    assert "unexpected error" not in caplog.text


def test_metrics_need_the_metrics_token_when_one_is_set(llama_backend, tmp_path):
    app = create_app(Pipeline(llama_backend, ledger=Ledger(tmp_path / "l.jsonl")), ApiKeys(KEYS),
                     metrics_token="scrape-token-42")
    with serve_in_thread(app) as base_url:
        assert httpx.get(f"{base_url}/metrics").status_code == 401
        tenant_key = {"Authorization": "Bearer key-alpha-0001"}  # a tenant's key does not show other tenants
        assert httpx.get(f"{base_url}/metrics", headers=tenant_key).status_code == 401
        scraped = httpx.get(f"{base_url}/metrics", headers={"Authorization": "Bearer scrape-token-42"})
        assert scraped.status_code == 200 and "ctxkit_http_requests_total" in scraped.text
        assert httpx.get(f"{base_url}/healthz").status_code == 200  # probes need no secret


def test_without_a_token_metrics_answer_loopback_clients_only(llama_backend, tmp_path):
    from starlette.testclient import TestClient

    app = create_app(Pipeline(llama_backend, ledger=Ledger(tmp_path / "l.jsonl")), ApiKeys(KEYS))
    with TestClient(app) as remote:  # its requests come from the host "testclient", not loopback
        refused = remote.get("/metrics")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "metrics_loopback_only"
        assert "ctxkit_" not in refused.text
        assert remote.get("/healthz").status_code == 200


def test_a_client_gone_before_the_headers_does_not_keep_the_slot(llama_backend, tmp_path):
    """Under ASGI 2.4 `send` raises once the client is gone; if that happens on the response headers, the
    body never starts and its cleanup never ran: the one slot of a local model stayed taken for good.
    (A fake `send`: uvicorn's h11 server does not raise there, so this fault cannot be made over HTTP.)"""
    import asyncio

    app = create_app(Pipeline(llama_backend, ledger=Ledger(tmp_path / "l.jsonl")), ApiKeys(KEYS))
    body = json.dumps({"stream": True, "max_tokens": 30, "messages": HELLO}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5), "server": ("127.0.0.1", 80),
             "headers": [(b"authorization", b"Bearer key-alpha-0001"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}

    async def gone_client() -> None:
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)

        async def send(message):
            raise OSError("client disconnected")

        with pytest.raises(Exception):  # noqa: B017 - Starlette's ClientDisconnect or the OSError
            await app(scope, receive, send)

    async def next_client() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://proxy") as local:
            return await asyncio.wait_for(local.post(
                "/v1/chat/completions", headers={"Authorization": "Bearer key-alpha-0001"},
                json={"messages": HELLO, "max_tokens": 2}), timeout=60)

    asyncio.run(gone_client())
    assert asyncio.run(next_client()).status_code == 200  # the old code waited here for the slot forever


def _post(base_url: str, body: dict | str, timeout: float = 60) -> httpx.Response:
    headers = {"Authorization": "Bearer key-alpha-0001", "Content-Type": "application/json"}
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{base_url}/v1/chat/completions", headers=headers, content=content, timeout=timeout)


@pytest.mark.parametrize("field, value", [("top_p", "x"), ("stop", 5), ("stop", [1, 2]), ("seed", "abc"),
                                          ("presence_penalty", "a"), ("logprobs", True), ("tool_choice", "required")])
def test_parameters_the_model_cannot_honour_are_a_400_naming_them(proxy, field, value):
    """They reached llama.cpp and failed there as a 502 (which the openai client retries twice), or were
    dropped: `logprobs: null` for logprobs=True, free text for tool_choice="required" without tools."""
    answer = _post(proxy[0], {"messages": HELLO, "max_tokens": 2, field: value})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == field


def test_an_image_part_is_refused_not_dropped_unseen(proxy):
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    answer = _post(proxy[0], {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                                                         image]}], "max_tokens": 2})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "messages[0].content[1]", answer.text


def test_a_body_nested_too_deeply_is_a_400_not_a_500(proxy):
    answer = _post(proxy[0], '{"messages":' + "[" * 5000 + "]" * 5000 + "}")
    assert answer.status_code == 400 and "nested too deeply" in answer.json()["error"]["message"]


@pytest.mark.parametrize("field", ["content", "name"])
def test_a_value_the_parser_takes_but_nested_hundreds_deep_is_a_400_not_a_500(proxy, field):
    """600 levels parse, and then ran the request's deepcopy out of stack: a RecursionError, a 500."""
    deep = "[" * 600 + "]" * 600
    message = '{"role": "user", "content": "hi", "' + field + '": ' + deep + "}"
    answer = _post(proxy[0], '{"max_tokens": 2, "messages": [' + message + "]}")
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "messages", answer.text


@pytest.mark.parametrize("kind", [{}, []])
def test_a_content_part_whose_type_is_an_object_is_a_400_not_a_500(proxy, kind):
    answer = _post(proxy[0], {"messages": [{"role": "user", "content": [{"type": kind, "text": "hi"}]}],
                              "max_tokens": 2})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "messages[0].content[0]", answer.text


def test_a_number_too_long_for_python_is_a_400_not_a_500(proxy):
    """json.loads raises a plain ValueError (not JSONDecodeError) past 4300 digits: malformed input, not a fault."""
    answer = _post(proxy[0], '{"messages":[{"role":"user","content":"hi"}],"max_tokens":1' + "0" * 5000 + "}")
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]["message"], answer.text


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_number_json_does_not_have_is_a_400_not_a_500(proxy, number):
    """Python's parser takes NaN/Infinity (and 1e400 as inf): top_k NaN reached llama.cpp's ctypes as a 502
    'upstream_unavailable', and an upstream's openai client (strict JSON) as a 500, both retried by the SDK."""
    answer = _post(proxy[0], '{"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"top_k":' + number + "}")
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]["message"], answer.text


def test_an_unknown_body_field_is_named_in_param(proxy):
    answer = _post(proxy[0], {"messages": HELLO, "max_tokens": 2, "functions": [{"name": "f", "parameters": {}}]})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "functions", answer.text


def test_backend_sampling_settings_sent_as_extra_body_reach_the_model(proxy):
    """docs/integrations.md tells openai-client users to pass top_k/min_p in extra_body; the client sends them
    at the top level of the body, and the proxy refused them as unsupported arguments."""
    answer = client(proxy[0]).chat.completions.create(model="m", messages=HELLO, max_tokens=2,
                                                      extra_body={"top_k": 1, "min_p": 0.05})
    assert answer.choices[0].message.content is not None


def test_response_format_json_makes_the_local_model_answer_json(proxy):
    question = [{"role": "user", "content": "Which city is the capital of France? Answer with city and country."}]
    answer = client(proxy[0]).chat.completions.create(model="m", messages=question, max_tokens=40, temperature=0,
                                                      response_format={"type": "json_object"})
    text = answer.choices[0].message.content
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict), text
    else:  # cut off by max_tokens: still JSON as far as it went
        assert text.lstrip().startswith("{"), text


def test_a_client_that_times_out_does_not_leave_its_call_running(proxy):
    """uvicorn does not cancel a handler whose client left: the abandoned call was generated to max_tokens
    while every other client waited for the model (and the openai client's retries added more)."""
    base_url, path = proxy
    long_task = {"messages": [{"role": "user", "content": "Count from 1 to 400, separated by commas."}],
                 "max_tokens": 400, "temperature": 0, "ctxkit": {"conversation_id": "gave-up"}}
    with pytest.raises(httpx.TimeoutException):
        _post(base_url, long_task, timeout=1.0)
    after = client(base_url).chat.completions.create(model="m", messages=HELLO, max_tokens=2,
                                                     extra_body={"ctxkit": {"conversation_id": "after-giving-up"}})
    assert after.choices[0].message.content is not None
    by_conversation = {r.conversation_id: r for r in records(path)}
    gave_up = by_conversation["gave-up"]
    assert gave_up.status == "error" and gave_up.tokens_out < 400, (gave_up.status, gave_up.tokens_out)


def test_a_tenant_lists_and_releases_its_quarantines_over_http(llama_backend, tmp_path):
    """Quarantines could be listed and released only in-process (QuarantineStage.list/release): a team using
    `ctxkit serve` had no way to see why content was held back, or to vouch for it."""
    from ctxkit.stages.quarantine import QuarantineStage

    pipeline = Pipeline(llama_backend, stages=[QuarantineStage(counter=llama_backend.counter)],
                        ledger=Ledger(tmp_path / "ledger.jsonl"))
    call = {"id": "c1", "type": "function", "function": {"name": "get_orders", "arguments": "{}"}}
    messages = [{"role": "user", "content": "List my orders."},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1",
                 "content": "Traceback (most recent call last):\n  File \"orders.py\", line 9\nKeyError: 'user'"}]
    with serve_in_thread(create_app(pipeline, ApiKeys(KEYS))) as base_url:
        client(base_url).chat.completions.create(model="m", messages=messages, max_tokens=2)
        alpha = {"Authorization": "Bearer key-alpha-0001"}
        listed = httpx.get(f"{base_url}/v1/ctxkit/quarantine", headers=alpha).json()["data"]
        assert [(r["kind"], r["source"], r["namespace"]) for r in listed] == [("tool_error", "get_orders", "alpha")]
        other = httpx.get(f"{base_url}/v1/ctxkit/quarantine", headers={"Authorization": "Bearer key-beta-0002"})
        assert other.json()["data"] == [], "a tenant sees only its own namespace"
        fingerprint = listed[0]["fingerprint"]
        refused = httpx.post(f"{base_url}/v1/ctxkit/quarantine/{fingerprint}/release",
                             headers={"Authorization": "Bearer key-beta-0002"})
        assert refused.status_code == 404, "nor releases another tenant's"
        released = httpx.post(f"{base_url}/v1/ctxkit/quarantine/{fingerprint}/release", headers=alpha)
        assert released.status_code == 200 and released.json()["released"] is True
        assert httpx.get(f"{base_url}/v1/ctxkit/quarantine", headers=alpha).json()["data"] == []
        assert httpx.get(f"{base_url}/v1/ctxkit/quarantine").status_code == 401


def test_a_keys_file_with_a_byte_order_mark_keeps_its_first_key(tmp_path):
    """Saved by Notepad or PowerShell 5, the file's first key began with an invisible U+FEFF: the server
    started, and its first tenant got 401 on every call."""
    path = tmp_path / "keys.txt"
    path.write_bytes("\ufeffsk-tenantA-secret-0001 team-a\r\nsk-tenantB-secret-0002 team-b\r\n".encode())
    keys = ApiKeys.from_file(path)
    assert keys.namespace_for("sk-tenantA-secret-0001") == "team-a"
    assert keys.namespace_for("sk-tenantB-secret-0002") == "team-b"


@pytest.mark.parametrize("key", ["\ufeffsk-tenant-0001", "sk-tenant\u200b-0001", "sk-tenant\x07-0001",
                                 "sk-caf\u00e9-0001"])  # non-ASCII: no HTTP client can send it
def test_a_key_with_an_invisible_character_is_refused_at_start(key):
    with pytest.raises(ConfigurationError, match="invisible"):
        ApiKeys({key: "team-a"})


@pytest.mark.parametrize("where", ["hook", "wrap_call"])
def test_a_client_that_hangs_up_during_slow_stage_work_keeps_its_slot_until_that_work_ends(llama_backend, tmp_path,
                                                                                          where):
    """The slot was freed as soon as the client left, but the call's stage work cannot be cancelled and went
    on: a hook in a worker thread (summarizing a big request), or a stage that writes only wrap_call (run on a
    thread of its own). Clients that hang up after a second each piled up that work beside the next calls, and
    every tenant's call then waited minutes for a thread."""
    import threading
    import time

    from ctxkit.stage import Stage

    class Slow(Stage):
        name = "slow"
        hooks_in_thread = True

        def __init__(self) -> None:
            self.lock, self.running, self.most = threading.Lock(), 0, 0

        def work(self) -> None:
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(1.0)
            with self.lock:
                self.running -= 1

    class SlowHook(Slow):
        def before_model(self, request):
            self.work()
            return request

    class SlowWrap(Slow):
        def wrap_call(self, request, call_next):
            self.work()
            return call_next(request)

    slow = SlowHook() if where == "hook" else SlowWrap()
    app = create_app(Pipeline(llama_backend, [slow], ledger=Ledger(tmp_path / "ledger.jsonl")), ApiKeys(KEYS),
                     max_concurrency=1)
    with serve_in_thread(app) as base_url:
        for n in range(3):
            body = {"messages": [{"role": "user", "content": f"Say hello {n}."}], "max_tokens": 2, "temperature": 0}
            with pytest.raises(httpx.TimeoutException):
                _post(base_url, body, timeout=0.3)
        answer = client(base_url).chat.completions.create(model="m", messages=HELLO, max_tokens=2)
    assert answer.choices[0].message.content is not None
    assert slow.most == 1, f"{slow.most} calls' stage work ran at once under max_concurrency=1"


def test_a_call_cancelled_while_its_thread_work_waits_for_a_worker_does_not_keep_its_slot_for_good():
    """Cancelled while its job still sat in the default executor's queue (every worker busy with other calls),
    the job never ran, so the WorkTracker never heard it end: idle() hung, and ctxkit serve's slot with it."""
    import asyncio
    import concurrent.futures
    import threading
    import time

    from ctxkit._aio import track_work, tracked_to_thread

    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=1))
        gate = threading.Event()
        busy = asyncio.ensure_future(asyncio.to_thread(gate.wait))
        await asyncio.sleep(0.05)
        trackers = []

        async def call() -> None:
            trackers.append(track_work())
            await tracked_to_thread(time.sleep, 0.01)

        task = asyncio.ensure_future(call())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        await busy
        await asyncio.wait_for(trackers[0].idle(), 5)

    asyncio.run(main())


class _HoldsTheSlot(Stage):
    """Keeps its call's slot for 1.5 s, so that the calls after it queue or are refused."""

    name = "holds_the_slot"
    hooks_in_thread = True

    def before_model(self, request):
        import time

        time.sleep(1.5)
        return request


def test_past_max_queue_a_call_gets_503_with_a_retry_after_and_the_queue_drains(llama_backend, tmp_path):
    """Without a bound, a burst queued every call behind the model until each client timed out (and its
    retry queued again). With --max-queue, the call past it is refused at once, with a wait the openai
    client honours, and the calls already admitted are answered."""
    import threading
    import time

    ledger = tmp_path / "ledger.jsonl"
    app = create_app(Pipeline(llama_backend, [_HoldsTheSlot()], ledger=Ledger(ledger)), ApiKeys(KEYS),
                     max_concurrency=1, max_queue=1)
    body = {"messages": HELLO, "max_tokens": 2, "temperature": 0}
    with serve_in_thread(app) as base_url:
        admitted: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: admitted.append(_post(base_url, body))) for _ in range(2)]
        for thread in threads:  # one in flight, one waiting
            thread.start()
            time.sleep(0.4)
        refused = _post(base_url, body)
        queued_then = httpx.get(f"{base_url}/metrics").text
        for thread in threads:
            thread.join()
        answer = client(base_url).chat.completions.create(model="m", messages=HELLO, max_tokens=2)
        queued_after = httpx.get(f"{base_url}/metrics").text

    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("server_overloaded", "queue_full")
    assert "--max-queue 1" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert "ctxkit_queued_requests 1.0" in queued_then
    assert [r.status_code for r in admitted] == [200, 200]
    assert answer.choices[0].message.content is not None
    assert "ctxkit_queued_requests 0.0" in queued_after
    assert len(records(ledger)) == 3, "the refused call never reached the pipeline"


def test_calls_refused_in_one_burst_are_told_different_waits(llama_backend, tmp_path):
    """Every call refused in a burst was told the same Retry-After: the openai clients all came back at the
    same instant, were refused again, and 11 of 20 failed after their retries for 2 s of model work. Each
    refusal now gets its own return time, a slot hold after the previous one, also in retry-after-ms."""
    import threading
    import time

    app = create_app(Pipeline(llama_backend, [_HoldsTheSlot()], ledger=Ledger(tmp_path / "l.jsonl")),
                     ApiKeys(KEYS), max_concurrency=1, max_queue=0)
    body = {"messages": HELLO, "max_tokens": 2, "temperature": 0}
    with serve_in_thread(app) as base_url:
        holder = threading.Thread(target=lambda: _post(base_url, body))
        holder.start()
        time.sleep(0.4)
        refused = [_post(base_url, body) for _ in range(4)]
        holder.join()
    assert [r.status_code for r in refused] == [503] * 4
    waits = [int(r.headers.get("retry-after-ms") or int(r.headers["retry-after"]) * 1000) for r in refused]
    assert waits == sorted(waits) and len(set(waits)) == 4, waits
    assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in refused)


def test_a_negative_max_queue_is_refused(llama_backend, tmp_path):
    with pytest.raises(ConfigurationError, match="max_queue must be at least 0"):
        create_app(Pipeline(llama_backend, ledger=Ledger(tmp_path / "l.jsonl")), ApiKeys(KEYS), max_queue=-1)


def test_the_clients_models_retrieve_gets_the_served_model_and_another_id_is_a_404(proxy):
    base_url, _ = proxy
    served = client(base_url).models.list().data[0]
    assert client(base_url).models.retrieve(served.id).id == served.id
    with pytest.raises(openai.NotFoundError) as missing:
        client(base_url).models.retrieve("gpt-nope")
    assert missing.value.code == "model_not_found"
    assert httpx.get(f"{base_url}/v1/models/{served.id}").status_code == 401  # a key, as /v1/models
