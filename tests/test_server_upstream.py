"""The proxy in front of a real OpenAI-compatible upstream (llama.cpp's server in a subprocess): answers
pass through, and so do the upstream's failures: its HTTP status, 504 on a timeout, 502 once it is gone."""

from __future__ import annotations

import openai
import pytest

from ctxkit import Ledger, OpenAIBackend, Pipeline, default_model_path, read_ledger
from ctxkit.server import ApiKeys, create_app, serve_in_thread
from tests.servers import LlamaServer

KEY = "key-upstream-0001"
HELLO = [{"role": "user", "content": "Say hello."}]
UPSTREAM_CTX = 512


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """llama.cpp's own OpenAI-compatible server, on the embedded model, in a subprocess."""
    server = LlamaServer(default_model_path(), tmp_path_factory.mktemp("upstream") / "server.log",
                         n_ctx=UPSTREAM_CTX, n_threads=1)
    yield server
    server.stop()


def _proxy(upstream_url: str, counter, ledger_path, *, timeout: float = 60.0):
    backend = OpenAIBackend("smollm2", base_url=upstream_url, counter=counter, max_retries=0, timeout=timeout,
                            context_window=100_000)  # larger than the upstream's: the upstream refuses, not us
    return serve_in_thread(create_app(Pipeline(backend, ledger=Ledger(ledger_path)), ApiKeys({KEY: "up"})))


def _client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_the_proxy_answers_through_the_upstream_and_fails_with_its_status(upstream, llama_backend, tmp_path):
    upstream_url = upstream.base_url
    with _proxy(upstream_url, llama_backend.counter, tmp_path / "ledger.jsonl") as base_url:
        completion = _client(base_url).chat.completions.create(model="m", messages=HELLO, max_tokens=3)
        assert completion.choices[0].message.role == "assistant"
        stream = _client(base_url).chat.completions.create(model="m", messages=HELLO, max_tokens=3, stream=True)
        assert [c for c in stream if c.choices]

        too_long = [{"role": "user", "content": "hello " * (UPSTREAM_CTX + 100)}]
        with pytest.raises(openai.BadRequestError) as err:  # the upstream's 400, passed through
            _client(base_url).chat.completions.create(model="m", messages=too_long, max_tokens=3)
        # the upstream's own context_length_exceeded: an overflow to the client, as ctxkit's own check says it
        assert err.value.body["code"] == "context_length_exceeded"
        assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"] == "messages"
        assert "context" in err.value.body["message"].lower()
    records = list(read_ledger(tmp_path / "ledger.jsonl"))
    assert [r.status for r in records] == ["ok", "ok", "error"]
    assert records[0].backend == "openai" and records[0].namespace == "up"
    assert records[0].count_delta == 0, "the upstream's own prompt count should match ctxkit's GGUF count"


def test_an_upstream_context_overflow_is_a_context_overflow_error(upstream, llama_backend):
    """The upstream's 400 context_length_exceeded (its n_ctx is smaller than the window ctxkit was told) is a
    ContextOverflowError, with the code handlers test, as ctxkit's own check raises: not a bare status error."""
    from ctxkit import BackendStatusError, ContextOverflowError

    backend = OpenAIBackend("smollm2", base_url=upstream.base_url, counter=llama_backend.counter, max_retries=0,
                            context_window=100_000)
    too_long = [{"role": "user", "content": "hello " * (UPSTREAM_CTX + 100)}]
    with pytest.raises(openai.BadRequestError) as err:
        Pipeline(backend).openai().chat.completions.create(model="m", messages=too_long, max_tokens=3)
    assert isinstance(err.value, ContextOverflowError) and isinstance(err.value, BackendStatusError)
    assert err.value.status == 400 and err.value.code == "context_length_exceeded" and err.value.param == "messages"


def test_an_upstream_that_times_out_is_a_504(upstream, llama_backend, tmp_path):
    upstream_url = upstream.base_url
    with _proxy(upstream_url, llama_backend.counter, tmp_path / "ledger.jsonl", timeout=0.001) as base_url:
        with pytest.raises(openai.APIStatusError) as err:
            _client(base_url).chat.completions.create(model="m", messages=HELLO, max_tokens=3)
    assert err.value.status_code == 504
    assert err.value.body["code"] == "upstream_timeout"


def test_budgets_usage_and_logprobs_come_back_through_a_llama_cpp_upstream(upstream, llama_backend, tmp_path):
    """llama.cpp's server reads only max_tokens (max_completion_tokens=3 generated until the context was
    full), streams no usage chunk (a client asking for one got none), and its logprobs came back null."""
    with _proxy(upstream.base_url, llama_backend.counter, tmp_path / "ledger.jsonl") as base_url:
        client = _client(base_url)
        short = client.chat.completions.create(model="m", messages=HELLO, max_completion_tokens=3)
        assert short.usage.completion_tokens <= 3 and short.choices[0].finish_reason == "length"
        chunks = list(client.chat.completions.create(model="m", messages=HELLO, max_tokens=3, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
        assert sum(1 for c in chunks if c.usage) == 1
        scored = client.chat.completions.create(model="m", messages=HELLO, max_tokens=3, logprobs=True, top_logprobs=2)
        assert scored.choices[0].logprobs is not None and scored.choices[0].logprobs.content


def test_llama_cpp_decoding_fields_in_extra_body_reach_the_upstream(upstream, llama_backend, tmp_path):
    """The openai client sends extra_body={"grammar": ...} at the top level of the body; pipeline.openai() hands it
    to the upstream, and the proxy refused it with 400 "unsupported argument(s): grammar"."""
    with _proxy(upstream.base_url, llama_backend.counter, tmp_path / "ledger.jsonl") as base_url:
        answer = _client(base_url).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=5, temperature=0,
            extra_body={"grammar": 'root ::= "yes" | "no"'})
    assert answer.choices[0].message.content in ("yes", "no")
    with serve_in_thread(create_app(Pipeline(llama_backend, ledger=Ledger(tmp_path / "local.jsonl")),
                                    ApiKeys({KEY: "up"}))) as base_url:  # the local model still refuses it by name
        with pytest.raises(openai.BadRequestError, match="grammar"):
            _client(base_url).chat.completions.create(model="m", messages=HELLO, max_tokens=2,
                                                      extra_body={"grammar": 'root ::= "yes"'})


class _Gateway:
    """A scripted OpenAI-compatible upstream on 127.0.0.1, for faults a real server cannot be made to produce:
    `answer(n, key)` gives the n-th request's (status, headers, JSON body, or the body's raw bytes)."""

    def __init__(self, answer):
        import http.server
        import json
        import threading

        self.requests = 0
        gateway = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                gateway.requests += 1
                status, headers, body = answer(gateway.requests, self.headers.get("Authorization", "").partition(" ")[2])
                data = body if isinstance(body, bytes) else json.dumps(body).encode()  # bytes: sent as they are
                try:
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the proxy hung up first

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def close(self):
        self._server.shutdown()


def _completion(usage):
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": "m", "usage": usage,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello!"}}]}


@pytest.mark.parametrize("secret", ["sk-proj-OPERATORSECRET0123456789abcdefghijklmnop", "corp-gw-7f3a9c2e1b8d4f60"])
def test_an_upstream_error_quoting_the_proxys_key_reaches_no_tenant(secret, llama_backend, tmp_path, monkeypatch):
    """Some gateways quote the key they refused: the tenant's 502 carried the operator's upstream key. A key
    not shaped like sk-... ("Invalid API key: corp-gw-...") passed every redaction pattern, into the ledger too."""
    gateway = _Gateway(lambda n, key: (401, {}, {"error": {"message": f"Invalid API key: {key}",
                                                           "type": "invalid_request_error"}}))
    monkeypatch.setenv("CTXKIT_TEST_UPSTREAM_KEY", secret)
    backend = OpenAIBackend("smollm2", base_url=gateway.url, api_key_env="CTXKIT_TEST_UPSTREAM_KEY",
                            counter=llama_backend.counter, max_retries=0)
    app = create_app(Pipeline(backend, ledger=Ledger(tmp_path / "ledger.jsonl")), ApiKeys({KEY: "up"}))
    try:
        with serve_in_thread(app) as base_url:
            for stream in (False, True):
                with pytest.raises(openai.APIStatusError) as err:
                    _client(base_url).chat.completions.create(model="m", messages=HELLO, max_tokens=2, stream=stream)
                assert err.value.status_code == 502 and secret not in err.value.response.text
                assert "Invalid API key" in err.value.response.text
    finally:
        gateway.close()
    assert secret not in (tmp_path / "ledger.jsonl").read_text()


def test_an_upstreams_retry_after_reaches_the_client_and_retries_are_not_multiplied(llama_backend, tmp_path):
    """The proxy dropped a 429's Retry-After, so the openai client retried at once; and on top of the proxy's own
    retries, the client's two more made up to 12 upstream requests for one completion."""
    gateway = _Gateway(lambda n, key: (429, {"Retry-After": "0"}, {"error": {"message": "slow down",
                                                                             "type": "rate_limit_error"}}))
    backend = OpenAIBackend("smollm2", base_url=gateway.url, counter=llama_backend.counter, max_retries=1,
                            backoff_s=0.01)
    app = create_app(Pipeline(backend, ledger=Ledger(tmp_path / "ledger.jsonl")), ApiKeys({KEY: "up"}))
    try:
        with serve_in_thread(app) as base_url:
            client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=2, timeout=60)
            with pytest.raises(openai.RateLimitError) as err:
                client.chat.completions.create(model="m", messages=HELLO, max_tokens=2)
            assert err.value.response.headers["retry-after"] == "0"
            assert err.value.response.headers["x-should-retry"] == "false"
            assert gateway.requests == 2, "the proxy's own retry only; the client did not retry the proxy's retries"
    finally:
        gateway.close()


def test_usage_with_a_count_missing_is_counted_not_a_500(llama_backend, tmp_path):
    """A server that sends usage with a null count: the answer was paid for, then the ledger's sums failed,
    the client got a 500 and the call had no record."""
    gateway = _Gateway(lambda n, key: (200, {}, _completion({"prompt_tokens": 30, "completion_tokens": None,
                                                             "total_tokens": None})))
    backend = OpenAIBackend("smollm2", base_url=gateway.url, counter=llama_backend.counter, max_retries=0)
    app = create_app(Pipeline(backend, ledger=Ledger(tmp_path / "ledger.jsonl")), ApiKeys({KEY: "up"}))
    try:
        with serve_in_thread(app) as base_url:
            answer = _client(base_url).chat.completions.create(model="m", messages=HELLO, max_tokens=5)
    finally:
        gateway.close()
    assert answer.choices[0].message.content == "Hello!"
    (record,) = read_ledger(tmp_path / "ledger.jsonl")
    assert record.status == "ok" and record.tokens_out == llama_backend.counter.count_text("Hello!")
    assert not record.usage_reported


def test_a_stream_whose_client_left_before_its_first_chunk_frees_its_slot(llama_backend, tmp_path):
    """A streaming client that gave up while the upstream was still reading a long prompt kept its call, its
    slot and the upstream busy: with one slot, the next caller waited for an answer nobody read."""
    import threading

    release = threading.Event()

    def answer(n, key):
        if n == 1:
            release.wait(60)  # a long prompt's time to first token
        return 200, {}, _completion({"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12})

    gateway = _Gateway(answer)
    backend = OpenAIBackend("smollm2", base_url=gateway.url, counter=llama_backend.counter, max_retries=0)
    app = create_app(Pipeline(backend, ledger=Ledger(tmp_path / "ledger.jsonl")), ApiKeys({KEY: "up"}),
                     max_concurrency=1)
    try:
        with serve_in_thread(app) as base_url:
            impatient = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=1)
            with pytest.raises(openai.APITimeoutError):
                impatient.chat.completions.create(model="m", messages=HELLO, max_tokens=2, stream=True)
            patient = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=20)
            answer_2 = patient.chat.completions.create(model="m", messages=HELLO, max_tokens=2)
            assert answer_2.choices[0].message.content == "Hello!", "the slot was freed while request 1 still hung"
    finally:
        release.set()
        gateway.close()


def test_an_unknown_path_or_method_answers_in_openais_error_shape(llama_backend, tmp_path):
    import httpx

    app = create_app(Pipeline(llama_backend, ledger=Ledger(tmp_path / "ledger.jsonl")), ApiKeys({KEY: "up"}))
    with serve_in_thread(app) as base_url:
        missing = httpx.post(f"{base_url}/v1/embeddings", json={}, headers={"Authorization": f"Bearer {KEY}"})
        wrong = httpx.get(f"{base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_url"
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "invalid_request_error"
    assert "POST" in wrong.headers["allow"]


@pytest.mark.parametrize(("path", "body", "window"), [
    ("/props", {"default_generation_settings": {"n_ctx": 2048}}, 2048),  # llama.cpp's llama-server
    ("/v1/models", {"data": [{"id": "smollm2", "max_model_len": 3072}]}, 3072),  # vLLM (run with --api-key)
    (None, None, "trained"),  # llama-cpp-python's server, Ollama: nothing said, the GGUF's trained context
])
def test_an_upstream_gguf_gives_the_upstreams_context_window(path, body, window, caplog, monkeypatch):
    """Without --upstream-context-window a GGUF-served model was taken for a 128k OpenAI one: summarization
    at 60% of that never ran, and long chats failed at the upstream. (Fake upstreams: what each server says.)"""
    import argparse
    import http.server
    import json
    import threading

    from ctxkit.backends.gguf_prompt import GGUFPrompt
    from ctxkit.server.cli import build_backend

    class Says(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.headers.get("Authorization") != "Bearer sk-upstream-1":  # an upstream run with a key
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            payload = json.dumps(body).encode() if self.path == path else b'{"detail": "Not Found"}'
            self.send_response(200 if self.path == path else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Says)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("CTXKIT_TEST_UPSTREAM_KEY", "sk-upstream-1")
    args = argparse.Namespace(upstream=f"http://127.0.0.1:{server.server_address[1]}/v1", upstream_model="smollm2",
                              upstream_key_env="CTXKIT_TEST_UPSTREAM_KEY", upstream_gguf=default_model_path(),
                              upstream_context_window=None, upstream_timeout=5.0, upstream_retries=0)
    try:
        trained = GGUFPrompt.from_gguf(default_model_path()).context_length
        assert trained is not None and trained < 100_000
        assert build_backend(args).context_window == (trained if window == "trained" else window)
        assert ("--upstream-context-window" in caplog.text) == (window == "trained"), "unknown: say so"
        args.upstream_context_window = 1024
        assert build_backend(args).context_window == 1024
    finally:
        server.shutdown()


def test_a_stopped_upstream_is_a_502_for_calls_and_streams(upstream, llama_backend, tmp_path):
    with _proxy(upstream.base_url, llama_backend.counter, tmp_path / "ledger.jsonl") as base_url:
        _client(base_url).chat.completions.create(model="m", messages=HELLO, max_tokens=2)
        upstream.stop()
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as err:
                _client(base_url).chat.completions.create(model="m", messages=HELLO, max_tokens=2, stream=stream)
            assert err.value.status_code == 502, f"stream={stream}"
            assert err.value.body["code"] == "upstream_unavailable"
    statuses = [(r.status, r.error_type) for r in read_ledger(tmp_path / "ledger.jsonl")]
    assert statuses == [("ok", None), ("error", "BackendConnectionError"), ("error", "BackendConnectionError")]


def test_an_upstream_answering_malformed_json_is_a_502_with_a_backend_error_record(llama_backend, tmp_path):
    """A 200 whose body is not JSON (a broken gateway, a truncated chunk) is the upstream's fault: a 502
    upstream_error and a BackendError record, not the proxy's own 500 with a JSONDecodeError in the ledger
    (and three upstream calls from a client that retries 500s)."""
    good = ('{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
            '"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}')

    def answer(n, key):
        if n == 1:
            return 200, {}, b"{not json"
        return 200, {"Content-Type": "text/event-stream"}, f"data: {good}\n\ndata: {{oops\n\n".encode()

    gateway = _Gateway(answer)
    try:
        with _proxy(gateway.url, llama_backend.counter, tmp_path / "ledger.jsonl") as base_url:
            client = _client(base_url)
            with pytest.raises(openai.APIStatusError) as err:
                client.chat.completions.create(model="m", messages=HELLO, max_tokens=3)
            assert err.value.status_code == 502 and err.value.body["type"] == "upstream_error"
            assert "not valid JSON" in err.value.body["message"]
            with pytest.raises(openai.APIError) as err:
                list(client.chat.completions.create(model="m", messages=HELLO, max_tokens=3, stream=True))
            assert "not valid JSON" in str(err.value)
    finally:
        gateway.close()
    records = list(read_ledger(tmp_path / "ledger.jsonl"))
    assert [(r.status, r.error_type) for r in records] == [("error", "BackendError")] * 2


def test_a_client_that_leaves_mid_stream_is_recorded_in_words(llama_backend, tmp_path):
    """The record of a streaming client that hung up mid-answer held anyio's repr of a cancel scope and a
    uvicorn task (memory addresses, the server's file paths) as its error text."""
    import time

    import httpx

    app = create_app(Pipeline(llama_backend, ledger=Ledger(tmp_path / "ledger.jsonl")), ApiKeys({KEY: "ns"}))
    with serve_in_thread(app) as base_url:
        body = {"model": "m", "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            lines = response.iter_lines()
            assert [next(lines) for _ in range(3)]
        deadline = time.monotonic() + 30
        while not (tmp_path / "ledger.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    [record] = list(read_ledger(tmp_path / "ledger.jsonl"))
    assert record.status == "error" and record.error_type == "CancelledError"
    assert "cancel scope" not in record.error and "Task" not in record.error, record.error
