"""The quarantine registry on PostgreSQL (`QuarantineStage(store="postgresql://...")`), on a real pgserver
PostgreSQL: replicas on different hosts share records and releases through one database."""

from __future__ import annotations

import logging
import multiprocessing
import time
import uuid
from typing import Any

import psycopg
import pytest

from ctxkit import QuarantineStoreUnavailable
from ctxkit.errors import ConfigurationError
from ctxkit.quarantine_marks import PLACEHOLDER_PREFIX
from ctxkit.request import ChatRequest
from ctxkit.stages.quarantine import QuarantineRecord, QuarantineStage
from ctxkit.stages.quarantine.pg_registry import PostgresQuarantineRegistry

from .forks import exit_code_in_fork

pytest_plugins = ["tests.pg_fixtures"]

TRACEBACK = "Traceback (most recent call last):\n  File \"app.py\", line 1, in run\nZeroDivisionError: division by zero"


@pytest.fixture
def db_url(pg_dsn: str) -> str:
    """A fresh database of the session's server: each test starts with no quarantine tables."""
    name = f"q_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return pg_dsn.replace("/postgres?", f"/{name}?", 1)


def _history(result: str, *, answered: bool = False) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Divide 1 by 0"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
         "function": {"name": "divide", "arguments": "{\"a\": 1, \"b\": 0}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": result},
    ]
    if answered:  # a later step: the tool result is no longer new, so it is withheld
        messages += [{"role": "assistant", "content": "It failed."}, {"role": "user", "content": "Try 1 by 2"}]
    return messages


def _send(stage: QuarantineStage, messages: list[dict], namespace: str = "team-a") -> ChatRequest:
    return stage.before_model(ChatRequest(messages=messages, namespace=namespace))


def _record(fp: str, namespace: str = "ns") -> QuarantineRecord:
    return QuarantineRecord(fingerprint=fp, namespace=namespace, kind="tool_error", reason="r", evidence="e",
                            role="tool", source="s", excerpt="x", conversation_id=None, created_at=time.time())


def test_release_on_one_replica_is_seen_by_another_at_its_next_call(db_url):
    a, b = QuarantineStage(store=db_url), QuarantineStage(store=db_url)
    sent = _send(a, _history(TRACEBACK, answered=True))
    assert sent.messages[2]["content"].startswith(PLACEHOLDER_PREFIX)  # withheld on replica A

    [record] = b.list("team-a")  # replica B lists what A quarantined
    assert (record.kind, record.role, record.source) == ("tool_error", "tool", "divide")
    assert b.list("team-b") == []  # another tenant's namespace holds nothing
    assert not b.release(record.fingerprint, "team-b")  # and cannot release it
    assert b.release(record.fingerprint, "team-a")

    assert a.list("team-a") == []
    again = _send(a, _history(TRACEBACK, answered=True))  # A's next call: the content is sent as it is
    assert again.messages[2]["content"] == TRACEBACK
    assert b.list("team-a") == [] and a.list("team-a") == []  # and not quarantined again


def test_a_quarantine_on_one_replica_is_not_recorded_twice_by_another(db_url, caplog):
    a, b = QuarantineStage(store=db_url), QuarantineStage(store=db_url)
    caplog.set_level(logging.WARNING, "ctxkit.quarantine")
    _send(a, _history(TRACEBACK))
    _send(b, _history(TRACEBACK))
    assert len(a.list("team-a")) == len(b.list("team-a")) == 1
    assert len([r for r in caplog.records if r.getMessage().startswith("quarantined")]) == 1


def test_release_without_namespace_reaches_every_namespace(db_url):
    a, b = QuarantineStage(store=db_url), QuarantineStage(store=db_url)
    _send(a, _history(TRACEBACK), namespace="x")
    [record] = a.list("x")
    assert b.release(record.fingerprint)  # the namespace found in the database, not in B's memory
    assert a.list("x") == []


def _writer(url: str, who: int, count: int) -> None:
    registry = PostgresQuarantineRegistry(10_000, url)
    for i in range(count):
        registry.add_record(_record(f"{who}-{i}"))
        registry.add_record(_record("shared"))  # every process records the same one too: one is kept
    registry.close()


def test_concurrent_writers_in_several_processes_lose_nothing(db_url):
    follower = PostgresQuarantineRegistry(10_000, db_url)
    follower.add_record(_record("first"))  # its copy of the namespace is followed through the change log
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_writer, args=(db_url, who, 40)) for who in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    expected = {f"{who}-{i}" for who in range(4) for i in range(40)} | {"shared", "first"}
    loaded = PostgresQuarantineRegistry(10_000, db_url).snapshot("ns")  # read whole
    followed = follower.snapshot("ns")
    assert set(loaded.records) == expected
    assert followed.records == loaded.records and followed.generation == loaded.generation == len(expected)


def test_max_records_is_kept_per_namespace_and_followed_by_other_replicas(db_url):
    a, b = PostgresQuarantineRegistry(3, db_url), PostgresQuarantineRegistry(3, db_url)
    assert b.snapshot("ns").records == {}
    for i in range(5):
        a.add_record(_record(f"r{i}"))
    assert list(b.snapshot("ns").records) == ["r2", "r3", "r4"]  # from the change log, oldest gone
    assert list(PostgresQuarantineRegistry(3, db_url).snapshot("ns").records) == ["r2", "r3", "r4"]


def test_odd_text_is_stored(db_url):
    registry = PostgresQuarantineRegistry(100, db_url)
    namespace, placeholder = "team\ud83d", "[ctxkit: withheld \x00 and \udc00]"
    registry.add_record(_record("fp\x00", namespace))
    registry.add_issued(namespace, placeholder)
    fresh = PostgresQuarantineRegistry(100, db_url)
    assert list(fresh.snapshot(namespace).records) == ["fp\x00"]
    assert list(fresh.snapshot(namespace).issued) == [placeholder]
    assert fresh.namespaces() == [namespace]


@pytest.mark.parametrize("setting", [
    # 0 set PostgreSQL's statement_timeout to 0, which is no limit; -1 failed every session's SET
    {"statement_timeout_s": 0}, {"statement_timeout_s": -1}, {"connect_timeout_s": float("inf")},
    {"retry_s": "10"}, {"statement_timeout_s": True}, {"max_records": 0},
])
def test_a_timeout_that_is_no_positive_number_is_refused_naming_it(setting):
    (name, value), = setting.items()
    options = {"max_records": 10, **setting}
    with pytest.raises(ConfigurationError, match=f"{name} must .*got {value!r}"):
        PostgresQuarantineRegistry(dsn="postgresql://app:pw@127.0.0.1:1/db", **options)


@pytest.mark.parametrize("url", ["postgresql://nobody@127.0.0.1:1/db", "postgresql://u:s3cret-pw@[bad/db"])
def test_bad_url_or_unreachable_server_is_a_configuration_error(url):
    with pytest.raises(ConfigurationError, match="cannot open the quarantine registry in PostgreSQL") as info:
        QuarantineStage(store=url)
    assert "s3cret-pw" not in str(info.value)


def test_store_and_directory_are_checked(tmp_path, db_url):
    with pytest.raises(ConfigurationError, match="not both"):
        QuarantineStage(store=db_url, directory=tmp_path)
    with pytest.raises(ConfigurationError, match="postgresql://") as info:
        QuarantineStage(store="mysql://u:pw@h/db")
    assert "pw" not in str(info.value)


def _cut_off(url: str) -> None:
    """End every session of the test's database, as a server restart or a failover does."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                     "AND datname = current_database()")


def test_a_restarted_server_costs_no_call(db_url):
    a, b = QuarantineStage(store=db_url), QuarantineStage(store=db_url)
    _send(a, _history(TRACEBACK))
    _cut_off(db_url)
    [record] = b.list("team-a")  # both replicas open a new session at once
    assert b.release(record.fingerprint, "team-a")
    _cut_off(db_url)
    assert _send(a, _history(TRACEBACK, answered=True)).messages[2]["content"] == TRACEBACK


def test_database_gone_mid_run_keeps_calls_working_from_memory(db_url, caplog):
    a, b = QuarantineStage(store=db_url), QuarantineStage(store=db_url)
    _send(a, _history(TRACEBACK))  # known to A before the outage
    good = a.registry.dsn
    a.registry.dsn = "postgresql://nobody@127.0.0.1:1/db"  # what A reconnects to is gone
    a.registry._drop_connection()
    caplog.set_level(logging.WARNING, "ctxkit.quarantine")

    sent = _send(a, _history(TRACEBACK, answered=True))  # the model call goes on, from memory
    assert sent.messages[2]["content"].startswith(PLACEHOLDER_PREFIX)
    other = "Error: connection refused by upstream"
    _send(a, _history(other), namespace="team-c")  # quarantined meanwhile: kept in memory
    assert [r.role for r in a.list("team-c")] == ["tool"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "cannot be reached" in errors[0].getMessage()  # logged once, not per call
    with pytest.raises(QuarantineStoreUnavailable):
        a.release(a.list("team-c")[0].fingerprint, "team-c")  # not released in memory only

    a.registry.dsn = good  # the database is back: the background thread reconnects, no call waits for it
    _until_back(a.registry)
    assert [r.role for r in a.list("team-c")] == ["tool"]
    assert [r.role for r in b.list("team-c")] == ["tool"]  # what A kept meanwhile reached the database
    assert any("is back" in r.getMessage() for r in caplog.records)


def test_dropped_tables_are_made_again(db_url):
    a = QuarantineStage(store=db_url)
    _send(a, _history(TRACEBACK))
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DROP TABLE ctxkit_quarantine_namespaces, ctxkit_quarantine_entries, ctxkit_quarantine_changes")
    assert a.list("team-a") == []  # the operator cleared the registry: this replica sees it cleared
    _send(a, _history(TRACEBACK))
    assert len(QuarantineStage(store=db_url).list("team-a")) == 1


def test_a_release_over_http_while_the_database_is_away_is_a_503(db_url, llama_backend, tmp_path, caplog):
    """Not a 500 with a traceback, and not released by this replica only: the operator is told to retry."""
    from starlette.testclient import TestClient

    from ctxkit import Ledger, Pipeline
    from ctxkit.server.app import create_app
    from ctxkit.server.auth import ApiKeys

    stage = QuarantineStage(store=db_url, counter=llama_backend.counter)
    _send(stage, _history(TRACEBACK), namespace="alpha")
    [record] = stage.list("alpha")
    stage.registry.dsn = "postgresql://nobody@127.0.0.1:1/db"
    stage.registry._drop_connection()
    app = create_app(Pipeline(llama_backend, stages=[stage], ledger=Ledger(tmp_path / "l.jsonl")),
                     ApiKeys({"key-alpha-0001": "alpha"}))
    headers = {"Authorization": "Bearer key-alpha-0001"}
    with TestClient(app) as http:
        assert [r["fingerprint"] for r in http.get("/v1/ctxkit/quarantine", headers=headers).json()["data"]] == [
            record.fingerprint]  # listed from memory
        refused = http.post(f"/v1/ctxkit/quarantine/{record.fingerprint}/release", headers=headers)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "quarantine_store_unavailable"
    assert refused.headers["retry-after"] == "10"
    # The tenant is told to retry, not how the deployment keeps its registry (a SQLite registry's error names its
    # directory); the cause goes to the operator's log.
    assert "PostgreSQL" not in refused.json()["error"]["message"]
    assert any("PostgreSQL cannot be reached" in r.getMessage() for r in caplog.records if r.name == "ctxkit.server")


def _until_back(registry: PostgresQuarantineRegistry, within_s: float = 15.0) -> float:
    """Wait, making no call, until the registry uses its database again; how long that took."""
    started = time.monotonic()
    while registry._outage.away:
        assert time.monotonic() - started < within_s, "the registry did not reconnect by itself"
        time.sleep(0.05)
    return time.monotonic() - started


def _until_written(registry: PostgresQuarantineRegistry, within_s: float = 15.0) -> None:
    """Wait, making no call, until what the registry kept in memory during an outage is in the database."""
    started = time.monotonic()
    while registry._pending:
        assert time.monotonic() - started < within_s, "an idle replica kept its backlog in memory"
        time.sleep(0.05)


def test_calls_during_a_silent_outage_do_not_wait(db_url):
    """A server that does not answer (dropped packets, a stopped VM) costs the call that finds it gone one connect
    timeout, not two, and every later call nothing: the background thread reconnects (it cost 10 s, then 5 s at
    every retry_s). When the server is back, the registry uses it again without being asked."""
    import socket

    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers, like a stopped server
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        a = QuarantineStage(store=db_url)
        _send(a, _history(TRACEBACK))
        good = a.registry.dsn
        a.registry.dsn = f"postgresql://nobody@127.0.0.1:{silent.getsockname()[1]}/db"
        a.registry._drop_connection()
        a.registry.retry_s = 0.5  # the reconnecting thread tries often: no call may wait for its tries
        started = time.monotonic()
        _send(a, _history(TRACEBACK, answered=True))
        assert time.monotonic() - started < 3.0  # one connect timeout (2 s)
        slowest = 0.0
        for i in range(40):  # 4 s of calls, over several of the thread's tries
            started = time.monotonic()
            sent = _send(a, _history(f"Error: upstream failed with code {i}", answered=True))
            slowest = max(slowest, time.monotonic() - started)
            assert sent.messages[2]["content"].startswith(PLACEHOLDER_PREFIX)  # quarantined from memory
            time.sleep(0.1)
        assert slowest < 0.5
        with pytest.raises(QuarantineStoreUnavailable):
            a.release("0" * 32, "team-a")  # refused at once too
        a.registry.dsn = good
        assert _until_back(a.registry) < 5.0  # a try cut short by the connect timeout, then one that works
        _until_written(a.registry)
        assert len(QuarantineStage(store=db_url).list("team-a")) == 41  # what A kept meanwhile reached the database
    finally:
        silent.close()


def test_writes_the_server_refuses_are_retried_slowly_not_by_a_reconnect_storm(db_url, caplog):
    """A server that answers but refuses the registry's writes (INSERT revoked; a full disk alike) is an outage:
    the backlog waits, tried again more slowly each time up to retry_s. The reconnecting thread took a connection
    that opened for the end of the outage: it opened one every 50 ms for as long as the writes were refused (27 in
    3 s here), each making the tables again under an advisory lock."""
    role = f"q_app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
    url = db_url.replace("postgresql://postgres:", f"postgresql://{role}:", 1)
    registry = PostgresQuarantineRegistry(100, url, retry_s=1.0)
    registry.add_record(_record("a" * 32))
    connects = 0
    connect = registry._connect

    def counted() -> Any:
        nonlocal connects
        connects += 1
        return connect()

    registry._connect = counted  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING, "ctxkit.quarantine")
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"REVOKE INSERT ON ctxkit_quarantine_entries FROM {role}")
        registry.add_record(_record("b" * 32))  # refused: kept in memory, the outage begins
        time.sleep(3.0)
        assert connects <= 8, connects  # two by the call, then tries after 0, 0.25, 0.5, 1, 1 s
        conn.execute(f"GRANT INSERT ON ctxkit_quarantine_entries TO {role}")
    _until_written(registry)
    assert sorted(registry.snapshot("ns").records) == ["a" * 32, "b" * 32]
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]  # once away, once back
    registry.close()


@pytest.fixture
def own_server() -> Any:
    """A PostgreSQL server of this test's own, to stop and start (the session's one serves the other tests)."""
    import tempfile

    import pgserver

    directory = tempfile.mkdtemp(prefix="ctxkit-pg-own-")
    server = pgserver.get_server(directory, cleanup_mode="delete")
    try:
        yield server, directory
    finally:
        server.cleanup()


def _server_processes(server: Any) -> list[Any]:
    import psutil

    postmaster = psutil.Process(server.get_pid())
    return [postmaster, *postmaster.children()]


def test_a_frozen_server_and_a_restart_lose_and_duplicate_nothing(own_server):
    """Two replicas through a real server frozen (SIGSTOP: it answers nothing, as behind a network cut) and then
    thawed: the calls meanwhile do not wait, each quarantine reaches the database once, what one replica released
    before the outage is not quarantined again by the other, and a release refused during the outage works after."""
    server, _ = own_server
    url = server.get_uri()
    a, b = QuarantineStage(store=url), QuarantineStage(store=url)
    for stage in (a, b):
        stage.registry.retry_s = 0.5
    released = "Error: disk quota exceeded on /var/data"
    _send(a, _history(released))
    [record] = b.list("team-a")
    _send(a, _history(TRACEBACK))  # quarantined before the outage
    assert b.release(record.fingerprint, "team-a")  # A has not seen this release yet
    [kept] = [r for r in b.list("team-a") if r.fingerprint != record.fingerprint]

    frozen = _server_processes(server)
    for process in frozen:
        process.suspend()
    try:
        started = time.monotonic()
        _send(a, _history("Error: upstream failed with code 1"))  # finds the server gone: one watchdog wait
        _send(b, _history("Error: upstream failed with code 1"))  # the same content on both replicas
        assert time.monotonic() - started < 10.0
        started = time.monotonic()
        _send(a, _history(released))  # released on B before the outage, which A has not seen
        for i in range(2, 12):
            _send(a if i % 2 else b, _history(f"Error: upstream failed with code {i}"))
        assert time.monotonic() - started < 1.0  # eleven calls, none waiting for the server
        with pytest.raises(QuarantineStoreUnavailable):
            b.release(kept.fingerprint, "team-a")
    finally:
        for process in frozen:
            process.resume()
    for stage in (a, b):
        _until_back(stage.registry)
        _until_written(stage.registry)
    assert b.release(kept.fingerprint, "team-a")
    expected = {f"Error: upstream failed with code {i}" for i in range(1, 12)}
    fresh = QuarantineStage(store=url)
    assert sorted(r.excerpt for r in fresh.list("team-a")) == sorted(expected)  # each once; the released ones gone
    assert sorted(r.excerpt for r in a.list("team-a")) == sorted(expected)


def test_what_a_replica_still_held_in_memory_when_it_ends_is_named(db_url, caplog):
    """A replica that ends during an outage loses what it kept in memory: an ERROR names it, and the content,
    sent again to a replica after the database is back, is quarantined again."""
    a = QuarantineStage(store=db_url)
    good = a.registry.dsn
    a.registry.dsn = "postgresql://nobody@127.0.0.1:1/db"
    a.registry._drop_connection()
    _send(a, _history(TRACEBACK))
    [record] = a.list("team-a")
    caplog.set_level(logging.ERROR, "ctxkit.quarantine")
    a.registry.close()
    assert any("lost" in r.getMessage() and record.fingerprint in r.getMessage() for r in caplog.records)
    b = QuarantineStage(store=good)
    assert b.list("team-a") == []
    _send(b, _history(TRACEBACK))
    assert [r.fingerprint for r in b.list("team-a")] == [record.fingerprint]


def test_a_registry_dropped_unclosed_during_an_outage_ends_with_its_thread(db_url, caplog):
    """The reconnecting thread held its registry: one dropped without close() while the database was away was
    never collected (its ERROR about what it held never came) and its thread tried to connect forever, one more
    thread per registry so dropped."""
    import gc
    import weakref

    caplog.set_level(logging.ERROR, "ctxkit.quarantine")
    refs, threads = [], []
    for i in range(3):
        registry = PostgresQuarantineRegistry(100, db_url, retry_s=0.5)
        registry.dsn = "postgresql://nobody@127.0.0.1:1/db"
        registry._drop_connection()
        registry.add_record(_record(f"{i:032x}"))  # finds the database gone: kept in memory, the thread started
        refs.append(weakref.ref(registry))
        threads.append(registry._outage._watcher)
        del registry
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(thread.is_alive() for thread in threads):
        gc.collect()
        time.sleep(0.1)
    assert [ref() for ref in refs] == [None, None, None]
    assert not any(thread.is_alive() for thread in threads)
    lost = " ".join(r.getMessage() for r in caplog.records if "lost" in r.getMessage())
    assert all(f"{i:032x}" in lost for i in range(3))


@pytest.mark.timeout(60)
def test_a_child_forked_while_a_call_waits_on_the_database_does_not_hang(db_url):
    """gunicorn --preload and multiprocessing's fork copy the registry's lock as it is: a child forked while a call
    of the parent waited on the database (here a namespace's row lock) had it held for ever, and its first call hung.
    The parent's backlog is the parent's: a child ending does not report it lost."""
    import threading

    registry = PostgresQuarantineRegistry(100, db_url, statement_timeout_s=5)
    registry.add_record(_record("a" * 32))
    blocker = psycopg.connect(db_url)
    blocker.execute("SELECT 1 FROM ctxkit_quarantine_namespaces WHERE namespace = 'ns' FOR UPDATE")
    waiting = threading.Thread(target=registry.add_record, args=(_record("b" * 32),))
    waiting.start()
    time.sleep(0.5)  # the call now waits on the row lock, holding the registry's lock
    registry._pending.append(("record", _record("c" * 32)))  # as an outage leaves it: the parent writes it

    def child() -> None:
        assert [r.fingerprint for r in registry.snapshot("ns").records.values()] == ["a" * 32]
        assert registry._pending == []

    try:
        assert exit_code_in_fork(child, timeout=10) == 0
    finally:
        blocker.rollback()
        blocker.close()
        waiting.join()
    registry._pending.clear()
    registry.close()


def test_a_child_forked_during_an_outage_reconnects_by_itself_and_leaves_the_backlog_to_its_parent(db_url):
    """A child forked while the database is away inherits the outage but not the thread that waits for it: its
    calls go on from memory, it starts its own thread, uses the database once it is back, and writes nothing of
    the parent's backlog (the parent does)."""
    registry = PostgresQuarantineRegistry(100, db_url, retry_s=0.5)
    registry.dsn = "postgresql://nobody@127.0.0.1:1/db"
    registry._drop_connection()
    registry.add_record(_record("a" * 32))  # finds the database gone: kept in memory

    def child() -> None:
        registry.add_record(_record("b" * 32))  # at once, from memory: the outage goes on in the child
        assert registry._outage.away
        registry.dsn = db_url
        _until_back(registry)
        _until_written(registry)
        assert _stored(db_url) == ["b" * 32]  # the parent's "a" is the parent's to write

    assert exit_code_in_fork(child, timeout=30) == 0
    registry.dsn = db_url
    _until_back(registry)
    _until_written(registry)
    assert _stored(db_url) == ["a" * 32, "b" * 32]
    registry.close()


def _stored(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [key for (key,) in conn.execute("SELECT key FROM ctxkit_quarantine_entries ORDER BY key")]


def test_calls_while_the_backlog_is_written_leave_it_to_the_background_thread(db_url):
    """Each call wrote FLUSH_BUDGET_S of the backlog, and calls take the one connection in turns: with eight
    threads calling after an outage, each waited for the others' slices and the background thread's (up to
    3.3 s after a 6 s freeze, 4.9 s after a restart, the database answering in milliseconds). The background
    thread writes the backlog alone now, so a call waits for one slice at most (measured, not asserted here:
    wall times on a shared machine are not a test)."""
    import threading

    registry = PostgresQuarantineRegistry(100_000, db_url, retry_s=0.5)
    registry.dsn = "postgresql://nobody@127.0.0.1:1/db"
    registry._drop_connection()
    for i in range(3000):  # an outage's quarantines, kept in memory
        registry.add_record(_record(f"{i:032x}", f"ns{i % 3}"))
    registry.dsn = db_url
    _until_back(registry)
    writers: set[str] = set()  # the threads that wrote a slice of the backlog
    flush = registry._flush_pending

    def recorded(budget: float | None, *args: Any) -> Any:
        if budget is not None:
            writers.add(threading.current_thread().name)
        return flush(budget, *args)

    registry._flush_pending = recorded  # type: ignore[method-assign]
    made = [0] * 8

    def caller(who: int) -> None:
        for i in range(500):
            if not registry._pending:  # written: what is checked is the calls made while it was being written
                return
            made[who] += 1
            registry.add_record(_record(f"f{who:03x}{i:028x}", f"ns{who % 3}"))
            registry.snapshot(f"ns{who % 3}")
            time.sleep(0.02)

    callers = [threading.Thread(target=caller, args=(who,), name=f"caller-{who}") for who in range(8)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join()
    assert sum(made) >= 80, made  # calls were made while the backlog was being written
    _until_written(registry, within_s=60)
    assert writers and not writers & {thread.name for thread in callers}, writers
    assert len(_stored(db_url)) == 3000 + sum(made)  # each once, none lost
    registry.close()


@pytest.mark.timeout(60)
def test_a_server_frozen_while_a_call_opens_its_session_costs_one_timeout(own_server):
    """A call that opens a session (its last one ended) and finds the server frozen once it has connected (the
    registry's SET and CREATE TABLE IF NOT EXISTS are sent, no answer comes) waited for as long as the server
    stayed frozen, holding the registry's lock, so every other call waited too: only the statements that
    followed the connection were bounded on the client's side. It waits one statement timeout now."""
    import threading

    server, _ = own_server
    url = server.get_uri()
    registry = PostgresQuarantineRegistry(100, url, statement_timeout_s=1.0, retry_s=0.5)
    registry.add_record(_record("a" * 32))
    _cut_off(url)  # the registry's session ends: its next call opens another
    holder = psycopg.connect(url, autocommit=True)  # holds what _ensure_schema waits for: the server is working
    holder.execute("SELECT pg_advisory_lock(hashtext('ctxkit_quarantine:ctxkit_quarantine_entries'))")
    took: list[float] = []

    def call() -> None:
        started = time.monotonic()
        registry.add_record(_record("b" * 32))
        took.append(time.monotonic() - started)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)  # connected, waiting in _ensure_schema
    frozen = _server_processes(server)
    for process in frozen:
        process.suspend()
    try:
        caller.join(timeout=12.0)
    finally:
        for process in frozen:
            process.resume()
    caller.join()
    holder.close()
    assert took[0] < 5.0, took  # the statement timeout (1 s) and the watchdog's 2 s, not the 12 s frozen
    assert "b" * 32 in registry.snapshot("ns").records  # kept in memory meanwhile
    _until_back(registry)
    _until_written(registry)
    registry.close()


def test_a_closed_registry_refuses_calls_rather_than_open_a_session_nothing_closes(db_url):
    """A registry closed at a tenant's teardown and then used by a call still in flight connected again: a
    PostgreSQL session per such call that no close() ended (pg_stat_activity grew by one for each)."""
    def sessions() -> int:
        with psycopg.connect(db_url, autocommit=True) as conn:
            return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                "AND pid <> pg_backend_pid()").fetchone()[0]

    registry = PostgresQuarantineRegistry(10, db_url)
    registry.add_record(_record("f1"))
    registry.close()
    registry.close()  # twice: nothing more to do
    before = sessions()
    for call in (lambda: registry.namespaces(), lambda: registry.snapshot("ns"),
                 lambda: registry.add_record(_record("f2")), lambda: registry.release("f1", "ns")):
        with pytest.raises(ConfigurationError, match="closed"):
            call()
    assert sessions() == before
