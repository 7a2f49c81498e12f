"""`ctxkit serve` as a user runs it: keys from the environment, refusal to start without any."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ctxkit import read_ledger
from tests.servers import free_port, wait_until_up

pytest_plugins = ["tests.pg_fixtures"]


def test_serve_refuses_to_start_without_api_keys(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CTXKIT_API_KEYS"}
    done = subprocess.run([sys.executable, "-m", "ctxkit.cli.main", "serve", "--ledger", str(tmp_path / "l.jsonl")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "open relay" in done.stderr


def test_serve_answers_with_keys_from_the_environment(tmp_path):
    port = free_port()
    ledger = tmp_path / "serve.jsonl"
    env = {**os.environ, "CTXKIT_API_KEYS": "cli-key-00001:cli-team", "CTXKIT_LOG_LEVEL": "info"}
    process = subprocess.Popen(
        [sys.executable, "-m", "ctxkit.cli.main", "serve", "--port", str(port), "--ledger", str(ledger),
         "--n-threads", "1", "--n-ctx", "1024"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base}/healthz", process, "ctxkit serve")
        headers = {"Authorization": "Bearer cli-key-00001"}
        answer = httpx.post(f"{base}/v1/chat/completions", headers=headers, timeout=300,
                            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        assert httpx.post(f"{base}/v1/chat/completions", json={"messages": []}).status_code == 401
        # a key in the query string is refused, and the access log prints the path without it
        assert httpx.post(f"{base}/v1/chat/completions?api_key=cli-key-00001", json={"messages": []}).status_code == 401
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    [record] = list(read_ledger(ledger))
    assert record.namespace == "cli-team" and record.status == "ok"
    assert "POST /v1/chat/completions" in output, "the access log is on"
    assert "cli-key-00001" not in output  # the startup line and access log never show a key



def _serve(port: int, ledger: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "CTXKIT_API_KEYS": "cli-key-00001:cli-team", "CTXKIT_LOG_LEVEL": "warning"}
    return subprocess.Popen(
        [sys.executable, "-m", "ctxkit.cli.main", "serve", "--port", str(port), "--ledger", str(ledger),
         "--n-threads", "1", "--n-ctx", "1024", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_two_replicas_share_one_postgres_cache(tmp_path, pg_dsn):
    """A question answered by one replica is a cache hit on the other: `--cache postgresql://...`."""
    ports = [free_port(), free_port()]
    ledgers = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    replicas = [_serve(port, ledger, "--cache", pg_dsn) for port, ledger in zip(ports, ledgers, strict=True)]
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8, "temperature": 0}
    headers = {"Authorization": "Bearer cli-key-00001"}
    try:
        answers = []
        for port, process in zip(ports, replicas, strict=True):
            wait_until_up(f"http://127.0.0.1:{port}/healthz", process, "ctxkit serve")
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers=headers, json=body, timeout=300)
            assert reply.status_code == 200, reply.text
            answers.append(reply.json()["choices"][0]["message"]["content"])
    finally:
        for process in replicas:
            process.terminate()
            process.communicate(timeout=30)
    [first] = list(read_ledger(ledgers[0]))
    [second] = list(read_ledger(ledgers[1]))
    assert first.answered_by is None and first.tokens_out > 0
    assert second.answered_by is not None and "cache" in second.answered_by
    assert answers[0] == answers[1]


def test_serve_rejects_a_cache_location_it_cannot_use(tmp_path):
    env = {**os.environ, "CTXKIT_API_KEYS": "cli-key-00001:cli-team"}
    done = subprocess.run([sys.executable, "-m", "ctxkit.cli.main", "serve", "--ledger", str(tmp_path / "l.jsonl"),
                           "--cache", "redis://localhost/0"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "postgresql://" in done.stderr and "redis://" in done.stderr


def test_a_keyword_dsn_given_to_cache_is_refused_not_made_a_directory(tmp_path, monkeypatch):
    """`--cache "host=db user=app password=..."` (libpq's keyword form) was taken for a directory: an unshared local
    cache named after the DSN, its password in the path and in every warning that names the cache."""
    from ctxkit.errors import ConfigurationError
    from ctxkit.server.cli import build_cache_store

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match="postgresql://") as caught:
        build_cache_store("host=127.0.0.1 port=5432 user=app password=Kw-0042-pw dbname=cache")
    assert "Kw-0042-pw" not in str(caught.value) and list(tmp_path.iterdir()) == []
    assert build_cache_store(str(tmp_path / "a=b")) is not None  # a directory whose name holds '=' is still one


@pytest.mark.parametrize("dsn", ["postgresql:/app:Kw-0042-pw@db/cache", "postgres:app@db/cache",
                                 "PostgreSQL:/app@db/cache"])
def test_a_dsn_with_a_slash_missing_is_refused_not_made_a_directory(dsn, tmp_path, monkeypatch):
    """`--cache postgresql:/user@db/app` has no '://', so it was taken for a directory: a local cache made under
    ./postgresql:/..., unshared by the replicas, and no error."""
    from ctxkit.errors import ConfigurationError
    from ctxkit.server.cli import build_cache_store

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match="mistyped DSN") as caught:
        build_cache_store(dsn)
    assert "Kw-0042-pw" not in str(caught.value) and list(tmp_path.iterdir()) == []
    assert build_cache_store(str(tmp_path / "postgresql-cache")) is not None  # a directory named so is still one


def test_serve_refuses_flags_that_cannot_work_with_a_clear_error(tmp_path):
    env = {**os.environ, "CTXKIT_API_KEYS": "cli-key-00001:cli-team"}
    base = [sys.executable, "-m", "ctxkit.cli.main", "serve", "--ledger", str(tmp_path / "l.jsonl")]
    for extra, message in ((["--cache", str(tmp_path / "c"), "--no-stages"], "no effect with --no-stages"),
                           (["--state-dir", str(tmp_path / "s"), "--no-stages"], "no effect with --no-stages"),
                           (["--quarantine-store", "postgresql://nobody:pw-0042@127.0.0.1:1/db"],
                            "cannot open the quarantine registry in PostgreSQL"),
                           # the error named directory=, a Python argument a CLI user cannot pass
                           (["--quarantine-store", str(tmp_path / "q")], "directory, give --state-dir DIR"),
                           (["--max-concurrency", "0"], "max_concurrency must be at least 1"),
                           (["--max-queue", "-1"], "max_queue must be at least 0"),
                           # the error named counter=, a Python argument a CLI user cannot pass
                           (["--upstream", "http://127.0.0.1:9/v1", "--upstream-model", "my-model"],
                            "pass --upstream-gguf FILE"),
                           # no scheme: taken, and every call failed as a retried "Connection error."
                           (["--upstream", "127.0.0.1:8080/v1", "--upstream-model", "gpt-4o-mini"],
                            "--upstream must be an http:// or https:// URL")):
        done = subprocess.run([*base, *extra], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_release_made_over_http_outlives_a_restart_with_a_state_dir(tmp_path):
    """`ctxkit serve` kept its quarantine list in memory: after a restart the list was gone and content an
    operator had released was held back again."""
    headers = {"Authorization": "Bearer cli-key-00001"}
    call = {"id": "c1", "type": "function", "function": {"name": "get_orders", "arguments": "{}"}}
    body = {"max_tokens": 2, "messages": [
        {"role": "user", "content": "List my orders."}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "Traceback (most recent call last):\nKeyError: 'user'"}]}

    def serving() -> tuple[subprocess.Popen[str], str]:
        port = free_port()
        process = _serve(port, tmp_path / "serve.jsonl", "--state-dir", str(tmp_path / "state"))
        wait_until_up(f"http://127.0.0.1:{port}/healthz", process, "ctxkit serve")
        return process, f"http://127.0.0.1:{port}/v1/ctxkit/quarantine"

    process, url = serving()
    try:
        assert httpx.post(url.replace("ctxkit/quarantine", "chat/completions"), headers=headers, json=body,
                          timeout=300).status_code == 200
        [record] = httpx.get(url, headers=headers).json()["data"]
    finally:
        process.terminate()
        process.communicate(timeout=30)
    process, url = serving()
    try:
        assert [r["fingerprint"] for r in httpx.get(url, headers=headers).json()["data"]] == [record["fingerprint"]]
        assert httpx.post(f"{url}/{record['fingerprint']}/release", headers=headers).status_code == 200
    finally:
        process.terminate()
        process.communicate(timeout=30)
    process, url = serving()
    try:
        assert httpx.get(url, headers=headers).json()["data"] == []
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_replicas_on_different_hosts_share_releases_through_postgres(tmp_path, pg_dsn):
    """`--quarantine-store postgresql://...`: content one replica quarantined is listed by another, and a
    release made on that one is seen by the first at its next call (with `--state-dir`, only replicas that
    share the directory, on one host, shared them)."""
    import uuid

    import psycopg

    name = f"q_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    store = pg_dsn.replace("/postgres?", f"/{name}?", 1)
    headers = {"Authorization": "Bearer cli-key-00001"}
    call = {"id": "c1", "type": "function", "function": {"name": "get_orders", "arguments": "{}"}}
    body = {"max_tokens": 2, "messages": [
        {"role": "user", "content": "List my orders."}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "Traceback (most recent call last):\nKeyError: 'user'"}]}
    ports = [free_port(), free_port()]
    replicas = [_serve(port, tmp_path / f"{port}.jsonl", "--quarantine-store", store, "--state-dir",
                       str(tmp_path / f"state-{port}")) for port in ports]
    a, b = (f"http://127.0.0.1:{port}/v1" for port in ports)
    try:
        for port, process in zip(ports, replicas, strict=True):
            wait_until_up(f"http://127.0.0.1:{port}/healthz", process, "ctxkit serve")
        assert httpx.post(f"{a}/chat/completions", headers=headers, json=body, timeout=300).status_code == 200
        [record] = httpx.get(f"{b}/ctxkit/quarantine", headers=headers).json()["data"]
        assert record["source"] == "get_orders"
        assert httpx.post(f"{b}/ctxkit/quarantine/{record['fingerprint']}/release", headers=headers).status_code == 200
        assert httpx.get(f"{a}/ctxkit/quarantine", headers=headers).json()["data"] == []
    finally:
        for process in replicas:
            process.terminate()
            process.communicate(timeout=30)


DRAGON = {"messages": [{"role": "user", "content": "Write a very long story about a dragon."}], "max_tokens": 900}


def _sigterm_during(tmp_path, call, started, *flags):
    """Serve with `flags`, run `call(base_url)` in a thread, send SIGTERM once `started()`, and return the one
    ledger record the call left."""
    import signal
    import threading
    import time

    port = free_port()
    ledger = tmp_path / "serve.jsonl"
    process = _serve(port, ledger, *flags)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base}/healthz", process, "ctxkit serve")
        client = threading.Thread(target=call, args=(base,))
        client.start()
        while not started():
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)  # within the grace and the wait for the cancelled call
        client.join(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    [record] = list(read_ledger(ledger))
    return record


def test_sigterm_with_a_stream_in_flight_ends_it_within_the_grace_and_ledgers_it(tmp_path):
    """SIGTERM waited for every open stream however long (an orchestrator then SIGKILLs: no record), and when
    uvicorn's graceful timeout cancelled a call, it re-raised SIGTERM before the call could write its record."""
    chunks = []

    def stream(base: str) -> None:
        try:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json={**DRAGON, "stream": True, "temperature": 1.0},
                              timeout=120, headers={"Authorization": "Bearer cli-key-00001"}) as answer:
                for line in answer.iter_lines():
                    chunks.append(line)
        except httpx.HTTPError:
            pass

    record = _sigterm_during(tmp_path, stream, lambda: len(chunks) >= 10, "--no-stages", "--graceful-timeout", "1")
    assert record.status == "error" and record.tokens_out > 0


def test_sigterm_with_a_non_streamed_call_in_flight_ledgers_it(tmp_path):
    """A non-streamed call that --graceful-timeout cancelled left no ledger record: the handler re-raised the
    cancellation without waiting for the call's own task, and the server exited before it wrote one."""
    import time

    sent_at: list[float] = []

    def call(base: str) -> None:
        sent_at.append(time.monotonic())
        try:
            httpx.post(f"{base}/v1/chat/completions", json={**DRAGON, "temperature": 0}, timeout=120,
                       headers={"Authorization": "Bearer cli-key-00001"})
        except httpx.HTTPError:
            pass

    record = _sigterm_during(tmp_path, call, lambda: bool(sent_at) and time.monotonic() - sent_at[0] > 1.5,
                             "--graceful-timeout", "3", "--cache", str(tmp_path / "cache"),
                             "--state-dir", str(tmp_path / "state"))  # the default stages; the model is generating
    assert record.status == "error" and record.error_type == "CancelledError"


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_serve_graceful_timeout_must_be_finite_and_not_negative(value, capsys):
    from ctxkit.cli.main import main

    with pytest.raises(SystemExit):
        main(["serve", "--graceful-timeout", value])
    assert "--graceful-timeout: must be a finite number of seconds" in capsys.readouterr().err


def test_sigterm_answers_queued_and_cancelled_calls_with_an_openai_shaped_503(tmp_path):
    """Calls that --graceful-timeout cancelled (the one generating and those queued behind it) got uvicorn's
    plain-text '500 Internal Server Error', logged as 'Exception in ASGI application' with a traceback each."""
    import signal
    import threading
    import time

    port = free_port()
    process = _serve(port, tmp_path / "serve.jsonl", "--no-stages", "--max-concurrency", "1", "--max-queue", "2",
                     "--graceful-timeout", "2")
    base = f"http://127.0.0.1:{port}"
    answers: list[httpx.Response] = []

    def call() -> None:
        answers.append(httpx.post(f"{base}/v1/chat/completions", json={**DRAGON, "temperature": 1.0}, timeout=60,
                                  headers={"Authorization": "Bearer cli-key-00001"}))

    try:
        wait_until_up(f"{base}/healthz", process, "ctxkit serve")
        threads = [threading.Thread(target=call) for _ in range(3)]  # one generating, two queued
        for thread in threads:
            thread.start()
            time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        for thread in threads:
            thread.join(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert [a.status_code for a in answers] == [503] * 3, [a.text[:80] for a in answers]
    assert {a.json()["error"]["type"] for a in answers} == {"server_shutting_down"}
    assert "Exception in ASGI application" not in output


@pytest.mark.parametrize("missing", ["prometheus_client", "starlette", "uvicorn"])
def test_serve_without_its_extra_is_a_clear_error(missing, monkeypatch, capsys):
    """`ctxkit serve` without the serve extra: one `ctxkit: error:` line naming the extra, exit 2. The `local`
    extra's llama-cpp-python[server] brings uvicorn and starlette but not prometheus-client, so a check on
    uvicorn alone let the command die on a ModuleNotFoundError traceback (exit 1)."""
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` raises ImportError
    for name in [m for m in sys.modules if m.startswith("ctxkit.server.app") or m.startswith("ctxkit.server.metrics")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setenv("CTXKIT_API_KEYS", "k-team-a-0001:team-a")
    from ctxkit.cli.main import main

    assert main(["serve", "--port", "0", "--no-stages"]) == 2
    err = capsys.readouterr().err
    assert "ctxkit[serve]" in err and missing in err


def test_serve_refuses_a_log_level_uvicorn_does_not_know_before_loading_anything(monkeypatch, capsys):
    """CTXKIT_LOG_LEVEL=verbose was a KeyError traceback from uvicorn, after the model and the stages had loaded."""
    monkeypatch.setenv("CTXKIT_API_KEYS", "k-team-a-0001:team-a")
    monkeypatch.setenv("CTXKIT_LOG_LEVEL", "verbose")
    from ctxkit.cli.main import main

    assert main(["serve", "--port", "0", "--no-stages"]) == 2
    assert "CTXKIT_LOG_LEVEL must be one of critical, error, warning, info, debug, trace, got 'verbose'" in \
        capsys.readouterr().err


def test_serve_with_an_upstream_gguf_that_is_not_a_gguf_is_a_clear_error(tmp_path):
    not_gguf = tmp_path / "catalog.json"
    not_gguf.write_text("[]\n")
    env = {**os.environ, "CTXKIT_API_KEYS": "cli-key-00001:cli-team"}
    done = subprocess.run([sys.executable, "-m", "ctxkit.cli.main", "serve", "--ledger", str(tmp_path / "l.jsonl"),
                           "--upstream", "http://127.0.0.1:9/v1", "--upstream-model", "my-model",
                           "--upstream-gguf", str(not_gguf)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"ctxkit: error: cannot load the GGUF file {not_gguf}" in done.stderr


def test_sigterm_ends_a_stream_in_flight_with_an_openai_error_event_not_a_cut_body(tmp_path):
    """A stream that --graceful-timeout cancelled was cut mid-body (the openai client: 'Connection error.') and
    logged as 'Exception in ASGI application' with a traceback, unlike the non-streamed calls' 503."""
    import signal
    import threading
    import time

    import openai

    port = free_port()
    process = _serve(port, tmp_path / "serve.jsonl", "--no-stages", "--graceful-timeout", "1")
    base = f"http://127.0.0.1:{port}"
    chunks: list[object] = []
    raised: list[BaseException] = []

    def stream() -> None:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="cli-key-00001", max_retries=0, timeout=60)
        try:
            for chunk in client.chat.completions.create(model="m", stream=True, temperature=1.0, **DRAGON):
                chunks.append(chunk)
        except openai.OpenAIError as exc:
            raised.append(exc)

    try:
        wait_until_up(f"{base}/healthz", process, "ctxkit serve")
        thread = threading.Thread(target=stream)
        thread.start()
        while len(chunks) < 10 and thread.is_alive():
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        thread.join(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    [error] = raised
    assert type(error) is openai.APIError and "shutting down" in str(error), repr(error)
    assert "Exception in ASGI application" not in output
