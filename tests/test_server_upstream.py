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
        assert err.value.body["code"] == "upstream_400"
        assert "context" in err.value.body["message"].lower()
    records = list(read_ledger(tmp_path / "ledger.jsonl"))
    assert [r.status for r in records] == ["ok", "ok", "error"]
    assert records[0].backend == "openai" and records[0].namespace == "up"
    assert records[0].count_delta == 0, "the upstream's own prompt count should match ctxkit's GGUF count"


def test_an_upstream_that_times_out_is_a_504(upstream, llama_backend, tmp_path):
    upstream_url = upstream.base_url
    with _proxy(upstream_url, llama_backend.counter, tmp_path / "ledger.jsonl", timeout=0.001) as base_url:
        with pytest.raises(openai.APIStatusError) as err:
            _client(base_url).chat.completions.create(model="m", messages=HELLO, max_tokens=3)
    assert err.value.status_code == 504
    assert err.value.body["code"] == "upstream_timeout"


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
