"""PostgresStore faults an operator meets: a read-only database, text PostgreSQL refuses, a bad DSN."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import psycopg
import pytest

from ctxkit.errors import ConfigurationError
from ctxkit.stages.cache.store import CacheEntry

pytest_plugins = ["tests.pg_fixtures"]


def _entry(key: str, query: str = "question") -> CacheEntry:
    return CacheEntry(key=key, scope="s", namespace="ns", query_text=query, response={"a": 1}, created_at=1000.0)


def _vec() -> np.ndarray:
    return np.ones(384, dtype=np.float32)


def test_read_only_database_reads_and_opens(pg_dsn, make_pg_store):
    store = make_pg_store()
    store.put(_entry("a"), _vec())
    dbname = psycopg.conninfo.conninfo_to_dict(pg_dsn).get("dbname", "postgres")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                     "AND backend_type = 'client backend'")
        # pg_terminate_backend only signals: a backend still dying when the store's next query reaches it
        # fails that one query (a cache miss, as a connection lost mid-query should be), which is not what
        # this test is about. Wait until they are gone.
        for _ in range(100):
            others = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                                  "AND backend_type = 'client backend'").fetchone()
            if others is not None and others[0] == 0:
                break
            time.sleep(0.05)
    try:
        assert store.get("a", now=1001.0) is not None
        assert [h.entry.key for h in store.search("s", _vec(), 3, 1001.0)] == ["a"]
        store.put(_entry("b"), _vec())  # not stored, but the call goes on
        make_pg_store()  # a replica (re)starting while the database is read-only
    finally:
        with psycopg.connect(pg_dsn, autocommit=True, options="-c default_transaction_read_only=off") as conn:
            conn.execute(f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')


def test_nul_in_question_does_not_fail_the_call(make_pg_store):
    store = make_pg_store()
    store.put(_entry("a", "pasted\x00binary"), _vec())
    assert store.get("a", now=1001.0) is None


def test_password_not_in_connection_error():
    from ctxkit.stages.cache.pg_store import PostgresStore

    with pytest.raises(ConfigurationError) as info:
        PostgresStore("postgresql://ctxkit:S3cr%t!pw@127.0.0.1:1/ctxkit")
    assert "S3cr" not in str(info.value) and info.value.__cause__ is None



def test_a_database_error_is_told_in_one_line_without_the_password():
    """Every log line and error of both PostgreSQL stores goes through error_line: the cache's warnings quoted
    libpq's text unredacted, and an error without a message was an IndexError inside the handler."""
    from ctxkit.postgres import error_line

    dsn = "postgresql://ctxkit:S3cr%t!pw@db.internal:5432/ctxkit"
    quoted = psycopg.OperationalError('invalid percent-encoded token: "S3cr%t!pw"\nDETAIL: more')
    assert "S3cr" not in error_line(quoted, dsn) and "\n" not in error_line(quoted, dsn)
    assert error_line(psycopg.OperationalError(""), dsn) == "OperationalError"

def test_question_with_nul_is_answered_through_the_pipeline(make_pg_store, embedder, llama_backend, ledger):
    """A pasted message with a NUL character: the model answered, then storing the answer raised
    psycopg.DataError (PostgreSQL text cannot hold NUL) and the caller got an error instead of the answer."""
    from ctxkit.pipeline import Pipeline
    from ctxkit.request import ChatRequest
    from ctxkit.stages.cache.stage import SemanticCacheStage

    pipeline = Pipeline(llama_backend, stages=[SemanticCacheStage(make_pg_store(), embedder)], ledger=ledger)
    request = ChatRequest(messages=[{"role": "user", "content": "What does this log line mean?\x00 ERR 42"}],
                          params={"temperature": 0, "max_tokens": 8})
    assert pipeline.call(request).content


def test_put_gives_up_behind_a_stopped_writer(pg_dsn, make_pg_store, monkeypatch):
    """A replica frozen mid-put (a paused VM, a debugger) holds the byte-count row: another replica's put
    waited forever, inside single_flight, after its model had answered."""

    from ctxkit.stages.cache import pg_store

    monkeypatch.setattr(pg_store, "_PUT_LOCK_TIMEOUT_MS", 500, raising=False)
    store = make_pg_store()
    with psycopg.connect(pg_dsn) as frozen:  # a writer's transaction that does not go on
        frozen.execute(f"SELECT value FROM {store.table_prefix}_meta WHERE name = 'bytes' FOR UPDATE")
        done = threading.Event()
        threading.Thread(target=lambda: (store.put(_entry("a"), _vec()), done.set()), daemon=True).start()
        assert done.wait(10), "put still waiting on another writer's lock"
        frozen.rollback()
    store.put(_entry("a"), _vec())
    assert store.get("a", now=1001.0) is not None


# A malformed DSN's error must not quote any piece of its password (libpq quotes what it cannot parse).
@pytest.mark.parametrize("dsn, secret", [
    ("postgresql://app:p@ssw0rd@127.0.0.1:1/db", "ssw0rd"),  # an unencoded '@': libpq takes the rest as the host
    ("host=127.0.0.1 port=1 password=my secret dbname=db", "secret"),  # an unquoted space
    ("postgresql://app:s3cr%zzX@127.0.0.1:1/db", "s3cr%zzX"),
])
def test_malformed_dsn_error_keeps_the_password_out(dsn: str, secret: str) -> None:
    from ctxkit.stages.cache.pg_store import PostgresStore

    with pytest.raises(ConfigurationError) as info:
        PostgresStore(dsn, table_prefix="t_redact")
    assert secret not in str(info.value)


# A server that stops answering (a paused VM, a network partition) enforces no statement_timeout: the
# store's client-side bound must turn every call on a request's way into a miss, not a hang.
def _bounded(call, limit: float) -> bool:
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(limit)
    return not thread.is_alive()


def test_a_frozen_backend_is_a_miss_not_a_hang(make_pg_store):
    store = make_pg_store(pool_size=1, statement_timeout_s=0.5)
    store.put(_entry("k"), _vec())
    with store.single_flight("warm"):
        pass
    with store._pool.connection() as conn:
        pooled = conn.info.backend_pid
    holder = store._holder.info.backend_pid
    os.kill(pooled, signal.SIGSTOP)
    os.kill(holder, signal.SIGSTOP)
    try:
        assert _bounded(lambda: store.get("k", 1001.0), 8)
        assert _bounded(lambda: store.search("s", np.ones(384, dtype=np.float32), 3, 1001.0), 8)

        def flight() -> None:
            with store.single_flight("other"):
                pass
        assert _bounded(flight, 8)
    finally:
        os.kill(pooled, signal.SIGCONT)
        os.kill(holder, signal.SIGCONT)
    time.sleep(0.2)
    assert store.get("k", 1001.0) is not None  # the broken sessions were replaced


def test_a_model_call_is_answered_while_the_cache_backend_is_frozen(make_pg_store, embedder, llama_backend, ledger):
    """Through the pipeline: the model is up, the cache's PostgreSQL session stopped answering."""
    from ctxkit.pipeline import Pipeline
    from ctxkit.request import ChatRequest
    from ctxkit.stages.cache.stage import SemanticCacheStage

    store = make_pg_store(pool_size=1, statement_timeout_s=0.5)
    pipeline = Pipeline(llama_backend, stages=[SemanticCacheStage(store, embedder)], ledger=ledger)
    with store._pool.connection() as conn:
        pooled = conn.info.backend_pid
    os.kill(pooled, signal.SIGSTOP)
    answer: list[str] = []
    try:
        request = ChatRequest(messages=[{"role": "user", "content": "Name a primary colour."}],
                              params={"temperature": 0, "max_tokens": 8})
        assert _bounded(lambda: answer.append(pipeline.call(request).content), 60), "the call hangs on the cache"
    finally:
        os.kill(pooled, signal.SIGCONT)
    assert answer and answer[0]


def test_non_finite_float_in_answer_is_not_stored_and_does_not_fail_the_call(make_pg_store):
    """An upstream's logprob of -inf (JSON -Infinity, parsed to float('-inf')) is kept by LocalStore;
    the json column cannot hold it: the answer is not stored, and put does not raise out of the stage."""
    import time

    import numpy as np

    from ctxkit.stages.cache.store import CacheEntry

    store = make_pg_store()
    entry = CacheEntry(key="k", scope="s", namespace="a", query_text="q", created_at=time.time(),
                       response={"choices": [{"logprobs": {"content": [{"token": "x", "logprob": float("-inf")}]}}]})
    store.put(entry, np.ones(384, dtype=np.float32))
    assert store.get("k", time.time()) is None


def test_a_model_call_is_answered_after_the_cache_tables_are_dropped(make_pg_store, pg_dsn, pg_prefix,
                                                                    embedder, llama_backend, ledger):
    """An operator resets the shared cache by dropping its tables (as the dimension error advises), or a
    failover lands on a database without them: replicas still serving must answer without the cache, not
    fail every call with UndefinedTable."""
    from ctxkit.pipeline import Pipeline
    from ctxkit.request import ChatRequest
    from ctxkit.stages.cache.stage import SemanticCacheStage

    pipeline = Pipeline(llama_backend, stages=[SemanticCacheStage(make_pg_store(), embedder)], ledger=ledger)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for table in ("access", "stats", "meta", "entries"):
            conn.execute(f"DROP TABLE {pg_prefix}_{table}")
    request = ChatRequest(messages=[{"role": "user", "content": "Name a color."}],
                          params={"temperature": 0, "max_tokens": 8})
    assert pipeline.call(request).content


def test_admin_calls_raise_a_typed_error_when_the_tables_are_dropped_or_the_server_is_away(make_pg_store, pg_dsn,
                                                                                         pg_prefix):
    """invalidate, clear and stats are an operator's calls: unlike a lookup they cannot quietly do nothing, and a
    raw psycopg error named neither the cache nor what was not done."""
    from ctxkit import CacheStoreUnavailable
    from ctxkit.stages.cache.pg_store import PostgresStore

    store = make_pg_store()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for table in ("access", "stats", "meta", "entries"):
            conn.execute(f"DROP TABLE {pg_prefix}_{table}")
    for call, what in ((lambda: store.invalidate("ns"), "invalidating namespace 'ns'"), (store.clear, "clearing"),
                       (store.stats, "statistics")):
        with pytest.raises(CacheStoreUnavailable, match=f"{pg_prefix}_\\* are missing") as caught:
            call()
        assert what in str(caught.value)
    PostgresStore(pg_dsn, table_prefix=pg_prefix)  # a new store makes them again, and the old one works
    assert store.stats()["entries"] == 0

    # the server turns this replica away (its role may no longer log in: as after a credentials rotation)
    role = f"away_{pg_prefix}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {role}")
    conninfo = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    replica = PostgresStore(psycopg.conninfo.make_conninfo(**{**conninfo, "user": role}),
                            table_prefix=f"{pg_prefix}_r")
    assert replica.stats()["entries"] == 0
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {role} NOLOGIN")
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
    try:
        with pytest.raises(CacheStoreUnavailable, match="cannot be reached"):
            replica.clear()
    finally:
        replica.close()


def test_admin_calls_of_a_role_without_write_privileges_raise_a_typed_error(make_pg_store, pg_dsn, pg_prefix):
    """A replica whose role may only read the cache's tables (a read-only reporting role, grants changed): invalidate
    and clear are refused by the server, a CacheStoreUnavailable as for a server that is away, not a raw psycopg
    InsufficientPrivilege; stats still reads, and so do lookups (without their LRU touch), while a write on a
    call's way is logged and skipped: it failed every model call with InsufficientPrivilege."""
    import numpy as np

    from ctxkit import CacheStoreUnavailable
    from ctxkit.stages.cache.pg_store import PostgresStore
    from ctxkit.stages.cache.store import CacheEntry

    writer = make_pg_store()
    stored = CacheEntry(key="k", scope="s", namespace="ns", query_text="q", created_at=time.time(),
                        response={"choices": [{"message": {"role": "assistant", "content": "blue"}}]})
    assert writer.put(stored, np.ones(384, dtype=np.float32))
    role = f"reader_{pg_prefix}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {role}")
        for table in ("access", "stats", "meta", "entries"):
            conn.execute(f"GRANT SELECT ON {pg_prefix}_{table} TO {role}")
    conninfo = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    reader = PostgresStore(psycopg.conninfo.make_conninfo(**{**conninfo, "user": role}), table_prefix=pg_prefix)
    try:
        for call in (lambda: reader.invalidate("ns"), reader.clear):
            with pytest.raises(CacheStoreUnavailable, match="refused this role"):
                call()
        assert reader.stats()["entries"] == 1
        # on a model call's way the cache still serves what it may read, and a refused write is no failure
        found = reader.get("k", time.time())
        assert found is not None and found.response == stored.response
        assert [hit.entry.key for hit in reader.search("s", np.ones(384, dtype=np.float32), 1, time.time())] == ["k"]
        assert reader.put(CacheEntry(key="k2", scope="s", namespace="ns", query_text="q2", created_at=time.time(),
                                     response={}), np.ones(384, dtype=np.float32)) is False
    finally:
        reader.close()


def _server_pids(dsn: str) -> list[int]:
    """The postmaster and every process of the server: what a frozen VM or container stops."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        (data,) = conn.execute("SHOW data_directory").fetchone()
        others = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()")]
    with open(os.path.join(data, "postmaster.pid")) as pidfile:
        return [int(pidfile.readline())] + others


def test_a_frozen_server_costs_one_call_its_timeout_then_calls_skip_it_until_it_is_back(pg_dsn, make_pg_store,
                                                                                        caplog):
    """The whole server frozen (a paused VM): every lookup, search, single-flight and put paid a connect timeout on a
    new session, about 30 s per model call with the defaults, and each logged a WARNING. Now the call that finds it
    gone pays its timeout, the next ones skip the cache at once, one ERROR is logged, and the store serves again
    when the server does, without a restart."""
    store = make_pg_store(statement_timeout_s=0.5, retry_s=0.5)
    store.put(_entry("k"), _vec())

    def user_call(key: str) -> float:  # what SemanticCacheStage does on a miss
        started = time.monotonic()
        store.get(key, 1001.0)
        store.search("s", _vec(), 3, 1001.0)
        with store.single_flight(key):
            store.get(key, 1001.0)
            store.put(_entry(key), _vec())
        return time.monotonic() - started

    pids = _server_pids(pg_dsn)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        with caplog.at_level("WARNING", logger="ctxkit.stages.cache.pg_store"):
            blocked = [user_call(f"frozen{i}") for i in range(4)]
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert blocked[0] < 4, blocked  # the statement's client-side bound (0.5 + 2 s), once
    assert sum(blocked[1:]) < 0.5, blocked
    assert [r.levelname for r in caplog.records] == ["ERROR"], [r.getMessage() for r in caplog.records]
    deadline = time.monotonic() + 15
    while store.get("k", 1001.0) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.get("k", 1001.0) is not None, "the store did not use the server again once it was back"
    user_call("after")
    assert store.get("after", 1001.0) is not None


@pytest.mark.timeout(60)
def test_a_statement_the_server_refuses_is_not_an_outage(make_pg_store, caplog):
    """An index row too large (a 6 KB namespace), a deadlock, a full disk are OperationalErrors too, but the
    server answered: each began an 'outage' (an ERROR saying the server cannot be reached, a WARNING that it
    is back, and other calls skipping the cache meanwhile). One WARNING for the call, and the cache goes on."""
    store = make_pg_store()
    huge_namespace = os.urandom(3000).hex()  # incompressible: over the btree index's 2704-byte row limit
    entry = CacheEntry(key="big", scope="s", namespace=huge_namespace, query_text="q", response={}, created_at=1000.0)
    with caplog.at_level("WARNING", logger="ctxkit.stages.cache.pg_store"):
        assert store.put(entry, _vec()) is False
        assert store.put(_entry("k"), _vec()) is True  # the next call uses the cache, no outage began
    assert [r.levelname for r in caplog.records] == ["WARNING"], [r.getMessage() for r in caplog.records]
    assert "index row size" in caplog.records[0].getMessage()


@pytest.mark.timeout(60)
def test_sessions_from_before_an_outage_are_replaced_not_met_one_timeout_each(make_pg_store, caplog):
    """Pooled sessions whose backends stopped answering (a frozen backend; a failover that cut the old primary
    off without a reset) while new ones work: after the first call found one dead and the probe found the
    server back, each other pooled session cost a call the statement's bound (4 s with the defaults) and began
    the outage again, an ERROR and a WARNING each. The outage replaces the pool's sessions."""
    store = make_pg_store(statement_timeout_s=0.5)
    store.put(_entry("k"), _vec())
    with store.single_flight("k"):  # opens the session that holds the single-flight locks
        pass
    sessions = [store._pool.connection() for _ in range(4)]
    pids = [s.__enter__().info.backend_pid for s in sessions] + [store._holder.info.backend_pid]
    for s in sessions:
        s.__exit__(None, None, None)  # four idle sessions in the pool
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        with caplog.at_level("WARNING", logger="ctxkit.stages.cache.pg_store"):
            store.get("k", 1001.0)  # finds its session frozen: the outage begins, the probe finds the server back
            deadline = time.monotonic() + 10
            while store._outage.away and time.monotonic() < deadline:
                time.sleep(0.05)
            started = time.monotonic()
            hits = [store.get("k", 1001.0) is not None for _ in range(4)]
            with store.single_flight("k"):
                pass
            took = time.monotonic() - started
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert hits == [True] * 4 and took < 1.0, (hits, took)
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"], [r.getMessage() for r in caplog.records]


@pytest.mark.timeout(60)
def test_an_outage_found_while_a_flight_checks_the_holder_still_replaces_it(make_pg_store, monkeypatch):
    """An outage found by another thread while a flight stood between checking the single-flight session and
    starting its query: the flag the outage set was cleared by that flight, so the holder from before the outage
    (maybe as frozen as the session that found it) was kept, and cost a call its timeout once the server was back.
    The window is microseconds wide; the other thread's outage is run inside it here."""
    from ctxkit.stages.cache import pg_store

    store = make_pg_store()
    with store.single_flight("k"):  # opens the single-flight session
        pass
    before = store._holder
    real_dropped = pg_store._dropped

    def outage_found_meanwhile(conn: object) -> bool:
        if conn is before and not store._outage.away:
            store._found_away(psycopg.OperationalError("server closed the connection unexpectedly"))
        return real_dropped(conn)

    monkeypatch.setattr(pg_store, "_dropped", outage_found_meanwhile)
    store._on_holder("SELECT pg_try_advisory_lock(%s)", 1)  # a flight, while another call finds the server away
    monkeypatch.setattr(pg_store, "_dropped", real_dropped)
    deadline = time.monotonic() + 10
    while store._outage.away and time.monotonic() < deadline:  # the probe finds the server back
        time.sleep(0.05)
    with store.single_flight("k2"):
        pass
    assert store._holder is not before and before.closed, "the session from before the outage was kept"


@pytest.mark.timeout(60)
def test_the_pool_counts_its_sessions_right_while_outages_retire_them(make_pg_store):
    """Eight threads take sessions and give them back while two others retire the pool, as outages found by
    concurrent calls do: no session is counted twice or lost (a count below zero would open more than
    pool_size; one leaked would block every call once pool_size were reached), and no waiter sleeps for ever."""
    store = make_pg_store()
    pool = store._pool
    stop = time.monotonic() + 3
    failures: list[BaseException] = []

    def take_and_give_back() -> None:
        try:
            while time.monotonic() < stop:
                with pool.connection() as conn:
                    conn.execute("SELECT 1")
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            failures.append(exc)

    def retire() -> None:
        while time.monotonic() < stop:
            pool.retire()
            time.sleep(0.002)

    threads = [threading.Thread(target=take_and_give_back) for _ in range(8)]
    threads += [threading.Thread(target=retire) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert not any(thread.is_alive() for thread in threads), "a thread waited for a session for ever"
    assert not failures, failures[:3]
    assert pool._open == len(pool._idle) <= pool._max_size, (pool._open, len(pool._idle))
    with pool.connection() as conn:  # the pool still gives sessions that work
        assert conn.execute("SELECT 1").fetchone() == (1,)
