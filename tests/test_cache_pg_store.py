"""PostgresStore (the shared cache store) against a real PostgreSQL + pgvector: every store rule."""

from __future__ import annotations

import contextlib
import re

import numpy as np
import psycopg
import pytest

from ctxkit.errors import ConfigurationError, RequestError
from ctxkit.stages.cache.store import CacheEntry

pytest_plugins = ["tests.pg_fixtures"]

DIM = 384


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def near(v: np.ndarray, seed: int, noise: float = 0.05) -> np.ndarray:
    w = v + noise * vec(seed)
    return (w / np.linalg.norm(w)).astype(np.float32)


def entry(key: str, *, scope: str = "scope-a", namespace: str = "ns", created_at: float = 1000.0,
          expires_at: float | None = None, text: str = "what is the refund window?") -> CacheEntry:
    return CacheEntry(
        key=key, scope=scope, namespace=namespace, query_text=text,
        response={"id": key, "choices": [{"message": {"role": "assistant", "content": f"answer {key}"}}]},
        created_at=created_at, expires_at=expires_at, features={"numbers": ["30"], "key": key},
    )


def test_get_returns_the_exact_entry_round_trip(make_pg_store):
    store = make_pg_store()
    e = entry("k1", expires_at=5000.0)
    store.put(e, vec(1))
    assert store.get("k1", now=1001.0) == e, "the entry read back must equal the entry written, field for field"
    assert store.get("other", now=1001.0) is None


def test_search_never_crosses_scopes(make_pg_store):
    store = make_pg_store()
    v = vec(1)
    store.put(entry("in-a", scope="scope-a"), v)
    store.put(entry("in-b", scope="scope-b"), v)  # the identical vector in another scope
    hits = store.search("scope-a", v, k=5, now=1001.0)
    assert [h.entry.key for h in hits] == ["in-a"], f"scope-a search returned {[h.entry.key for h in hits]}"
    assert hits[0].similarity == pytest.approx(1.0, abs=1e-4)
    assert store.search("scope-c", v, k=5, now=1001.0) == []


def test_search_orders_by_cosine_similarity_and_honours_k(make_pg_store):
    store = make_pg_store()
    target = vec(7)
    store.put(entry("close"), near(target, 1, 0.1))
    store.put(entry("closer"), near(target, 2, 0.02))
    store.put(entry("far"), vec(99))
    hits = store.search("scope-a", target, k=2, now=1001.0)
    assert [h.entry.key for h in hits] == ["closer", "close"]
    assert hits[0].similarity > hits[1].similarity > 0.9


def test_small_scope_is_found_when_the_planner_picks_the_hnsw_index(make_pg_store, pg_dsn):
    """HNSW filters by scope after finding neighbours, so a scope that is rare in the table can come back
    empty from the index. Stale statistics (the scope was large when last analyzed) make the planner pick
    the index for it; the store must still find the scope's entry."""
    store = make_pg_store()
    target = vec(5)
    for i in range(150):
        store.put(entry(f"old{i}", scope="shrunk", namespace="old"), vec(2000 + i))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"ANALYZE {store.table_prefix}_entries")
    store.invalidate("old")
    store.put(entry("survivor", scope="shrunk", namespace="new"), near(target, 3, 0.3))
    for i in range(150):  # a crowd of vectors nearer to the query, in another scope
        store.put(entry(f"busy{i}", scope="busy"), near(target, 1000 + i, 0.01))
    with psycopg.connect(pg_dsn) as conn:
        from pgvector.psycopg import register_vector

        register_vector(conn)
        sql = f"SELECT key FROM {store.table_prefix}_entries WHERE scope = 'shrunk' ORDER BY embedding <=> %s LIMIT 3"
        plan = " ".join(r[0] for r in conn.execute("EXPLAIN " + sql, (target,)).fetchall())
        assert "_hnsw" in plan, f"the scenario must make the planner use the HNSW index: {plan}"
        assert conn.execute(sql, (target,)).fetchall() == [], "the index alone misses the entry"
    hits = store.search("shrunk", target, k=3, now=1001.0)
    assert [h.entry.key for h in hits] == ["survivor"]
    assert len(store.search("busy", target, k=10, now=1001.0)) == 10


def test_entry_ttl_expired_entries_are_never_returned(make_pg_store):
    store = make_pg_store()
    v = vec(1)
    store.put(entry("short", created_at=1000.0, expires_at=1010.0), v)
    assert store.get("short", now=1010.0) is not None, "an entry is valid up to and including expires_at"
    assert store.get("short", now=1010.5) is None
    assert store.search("scope-a", v, k=3, now=1010.5) == []
    assert [h.entry.key for h in store.search("scope-a", v, k=3, now=1005.0)] == ["short"]


def test_namespace_ttl_applies_on_read_and_write(make_pg_store):
    v = vec(1)
    writer = make_pg_store(namespace_ttl={"news": 60.0})
    writer.put(entry("n1", namespace="news", created_at=1000.0), v)
    writer.put(entry("d1", namespace="docs", created_at=1000.0, scope="scope-d"), v)
    assert writer.get("n1", now=1059.0) is not None
    assert writer.get("n1", now=1061.0) is None, "namespace 'news' lives 60 s"
    assert writer.search("scope-a", v, k=3, now=1061.0) == []
    assert writer.get("d1", now=10_000.0) is not None, "namespaces without a TTL keep their entries"
    # the TTL was baked into expires_at at write time, so a replica configured without it also honours it
    other = make_pg_store()
    assert other.get("n1", now=1061.0) is None
    # and a reader with a namespace TTL honours it for entries written by a replica without one
    plain = make_pg_store()
    plain.put(entry("d2", namespace="docs", created_at=1000.0, scope="scope-d2"), v)
    strict = make_pg_store(namespace_ttl={"docs": 10.0})
    assert strict.get("d2", now=1011.0) is None
    assert strict.search("scope-d2", v, k=3, now=1011.0) == []
    assert plain.get("d2", now=1011.0) is not None


def test_size_bound_evicts_least_recently_used_first(make_pg_store):
    probe = make_pg_store(table_prefix="probe_" + make_pg_store().table_prefix)
    probe.put(entry("k0"), vec(0))
    one = probe.stats()["bytes"]
    store = make_pg_store(size_bytes=int(one * 3.5))
    for i in range(3):
        store.put(entry(f"k{i}", created_at=1000.0 + i), vec(i))
    assert store.get("k0", now=1010.0) is not None  # k0 is now the most recently used
    store.search("scope-a", vec(1), k=1, now=1011.0)  # a search hit counts as a use of k1
    store.put(entry("k3", created_at=1012.0), vec(3))
    assert store.get("k2", now=1013.0) is None, "k2 was the least recently used and must be evicted"
    assert all(store.get(k, now=1013.0) is not None for k in ("k0", "k1", "k3"))
    stats = store.stats()
    assert stats["evictions"] == 1
    assert stats["entries"] == 3 and stats["bytes"] <= store.size_bytes


def test_eviction_drops_expired_entries_before_live_ones(make_pg_store):
    probe = make_pg_store(table_prefix="probe_" + make_pg_store().table_prefix)
    probe.put(entry("k0"), vec(0))
    one = probe.stats()["bytes"]
    store = make_pg_store(size_bytes=int(one * 2.5))
    store.put(entry("old-live", created_at=1000.0), vec(1))
    store.put(entry("newer-expired", created_at=1001.0, expires_at=1002.0), vec(2))
    store.put(entry("new", created_at=1005.0), vec(3))
    assert store.get("old-live", now=1006.0) is not None
    assert store.stats()["expired_purged"] == 1 and store.stats()["evictions"] == 0


def test_entry_larger_than_the_whole_bound_is_not_stored(make_pg_store):
    store = make_pg_store(size_bytes=2000)
    store.put(entry("small", text="hi"), vec(1))
    store.put(entry("huge", text="x" * 5000), vec(2))
    assert store.get("huge", now=1001.0) is None
    assert store.get("small", now=1001.0) is not None, "a too-large entry must not flush the others"
    assert store.stats()["rejected_too_large"] == 1


def test_overwrite_replaces_the_entry_and_keeps_the_byte_count_exact(make_pg_store, pg_dsn):
    store = make_pg_store()
    store.put(entry("k", text="first"), vec(1))
    store.put(entry("k", text="second, longer text"), vec(2))
    assert store.get("k", now=1001.0).query_text == "second, longer text"
    assert [h.entry.key for h in store.search("scope-a", vec(2), k=3, now=1001.0)] == ["k"]
    with psycopg.connect(pg_dsn) as conn:
        (actual,) = conn.execute(f"SELECT sum(size_bytes) FROM {store.table_prefix}_entries").fetchone()
    assert store.stats()["bytes"] == actual and store.stats()["entries"] == 1


def test_invalidate_removes_one_namespace_only(make_pg_store):
    store = make_pg_store()
    for i in range(3):
        store.put(entry(f"a{i}", namespace="tenant-a", scope="sa"), vec(i))
    store.put(entry("b0", namespace="tenant-b", scope="sb"), vec(10))
    assert store.invalidate("tenant-a") == 3
    assert store.get("a0", now=1001.0) is None and store.search("sa", vec(0), k=3, now=1001.0) == []
    assert store.get("b0", now=1001.0) is not None
    assert store.invalidate("tenant-a") == 0
    assert store.stats()["entries"] == 1 and store.stats()["invalidated"] == 3


def test_clear_empties_every_namespace_and_keeps_the_counters(make_pg_store):
    store = make_pg_store()
    store.put(entry("k1", namespace="a"), vec(1))
    store.put(entry("k2", namespace="b", scope="scope-b"), vec(2))
    store.get("k1", now=1001.0)
    store.clear()
    assert store.get("k1", now=1001.0) is None and store.get("k2", now=1001.0) is None
    assert store.search("scope-a", vec(1), k=3, now=1001.0) == []
    stats = store.stats()
    assert stats["entries"] == 0 and stats["bytes"] == 0
    assert (stats["hits"], stats["misses"]) == (1, 2), "clear drops entries, not the hit/miss history"


def test_stats_count_hits_and_misses_and_are_shared_between_store_objects(make_pg_store):
    a, b = make_pg_store(), make_pg_store()
    a.put(entry("k1"), vec(1))
    a.get("k1", now=1001.0)
    b.get("k1", now=1001.0)
    b.get("nope", now=1001.0)
    a.search("scope-a", vec(1), k=1, now=1001.0)
    b.search("scope-z", vec(1), k=1, now=1001.0)
    for stats in (a.stats(), b.stats()):
        assert (stats["hits"], stats["misses"], stats["search_hits"], stats["search_misses"], stats["puts"]) == (
            2, 1, 1, 1, 1), stats
        assert stats["searches"] == 2 and stats["hit_rate"] == pytest.approx(2 / 3)


def test_restart_a_new_store_object_sees_the_stored_entries(make_pg_store, pg_prefix):
    first = make_pg_store()
    first.put(entry("k1"), vec(1))
    first.close()
    reopened = make_pg_store()  # same DSN and prefix: what a restarted replica does
    assert reopened.get("k1", now=1001.0) is not None
    assert [h.entry.key for h in reopened.search("scope-a", vec(1), k=1, now=1001.0)] == ["k1"]
    assert reopened.stats()["puts"] == 1, "statistics live in the database and survive a restart"


def test_schema_creation_is_idempotent_and_checks_the_dimension(make_pg_store, pg_prefix):
    make_pg_store()
    make_pg_store()  # opening twice must not fail on existing tables or indexes
    with pytest.raises(ConfigurationError, match="dimension"):
        make_pg_store(dimension=128)


def test_tables_remade_with_another_dimension_while_running_are_named_once(make_pg_store, pg_dsn, pg_prefix, caplog):
    """Another deployment (another embedding model) remakes the tables while this replica runs: every put logged a
    WARNING "expected 768 dimensions, not 384" naming neither the table nor the cause, at every model call, and
    a bulk load raised a raw psycopg DataError."""
    store = make_pg_store()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for table in ("access", "stats", "meta", "entries"):
            conn.execute(f"DROP TABLE {pg_prefix}_{table}")
    other = make_pg_store(dimension=768)
    other.put(entry("theirs"), np.ones(768, dtype=np.float32))
    with caplog.at_level("WARNING", logger="ctxkit.stages.cache.pg_store"):
        for i in range(3):
            assert store.put(entry(f"k{i}"), vec(i)) is False
            assert store.search("scope-a", vec(i), 3, now=1001.0) == []
    assert [r.levelname for r in caplog.records] == ["ERROR"], [r.getMessage() for r in caplog.records]
    told = caplog.records[0].getMessage()
    assert f"{pg_prefix}_entries" in told and "vector(768)" in told and "dimension=384" in told
    with pytest.raises(ConfigurationError, match=f"{pg_prefix}_entries now holds vector\\(768\\)"):
        store.put_many([entry("bulk")], [vec(9)])


def test_bad_input_raises_typed_errors(make_pg_store, pg_dsn):
    store = make_pg_store()
    with pytest.raises(RequestError, match="shape"):
        store.put(entry("k"), np.ones(10, dtype=np.float32))
    with pytest.raises(RequestError, match="non-zero"):
        store.search("scope-a", np.zeros(DIM, dtype=np.float32), k=1, now=0.0)
    with pytest.raises(RequestError, match="finite"):
        store.put(entry("k"), np.full(DIM, np.nan, dtype=np.float32))
    with pytest.raises(RequestError, match="JSON"):
        bad = entry("k")
        bad.response = {"x": object()}
        store.put(bad, vec(1))
    with pytest.raises(ConfigurationError, match="table_prefix"):
        make_pg_store(table_prefix="bad; DROP TABLE x")
    with pytest.raises(ConfigurationError, match="cannot connect"):
        from ctxkit.stages.cache.pg_store import PostgresStore

        PostgresStore("postgresql://nobody@/nodb?host=/nonexistent-socket-dir")


def test_semantic_search_finds_a_paraphrase_with_real_embeddings(make_pg_store, embedder):
    store = make_pg_store()
    questions = ["How long do I have to return a pair of shoes?", "Do you ship to Norway?",
                 "What are your opening hours on Sunday?"]
    for i, (q, v) in enumerate(zip(questions, embedder.embed(questions), strict=True)):
        store.put(entry(f"q{i}", text=q), v)
    hits = store.search("scope-a", embedder.embed_one("what's the return window for shoes?"), k=3, now=1001.0)
    assert hits[0].entry.key == "q0", [(h.entry.query_text, h.similarity) for h in hits]
    assert hits[0].similarity > hits[1].similarity + 0.2


def test_put_many_writes_a_batch_in_one_transaction_within_the_bound(make_pg_store):
    probe = make_pg_store(table_prefix="probe_" + make_pg_store().table_prefix)
    probe.put(entry("b0", created_at=1000.0), vec(0))
    one = probe.stats()["bytes"]
    store = make_pg_store(size_bytes=int(one * 4.5))
    store.put(entry("old", created_at=900.0), vec(50))
    batch = [entry(f"b{i}", created_at=1000.0 + i) for i in range(4)] + [entry("b0", created_at=1010.0)]
    store.put_many(batch, [vec(i) for i in range(5)])
    assert store.get("old", now=1011.0) is None, "the older entry makes room for the batch"
    assert all(store.get(f"b{i}", now=1011.0) is not None for i in range(4))
    assert store.get("b0", now=1011.0).created_at == 1010.0, "the later duplicate in a batch wins"
    assert store.stats()["entries"] == 4 and store.stats()["bytes"] <= store.size_bytes
    with pytest.raises(RequestError, match="vectors"):
        store.put_many([entry("x")], [])


def test_a_step_ending_in_a_tool_result_is_cached_exactly_through_the_pipeline(make_pg_store, embedder,
                                                                               llama_backend, ledger):
    """Such a request has no user question to embed, so its entry is exact-only (a zero vector): the
    store must take it after the model has answered, and serve it again by key."""
    from ctxkit.pipeline import Pipeline
    from ctxkit.request import ChatRequest
    from ctxkit.stages.cache.stage import SemanticCacheStage

    pipeline = Pipeline(llama_backend, stages=[SemanticCacheStage(make_pg_store(), embedder)], ledger=ledger)
    request = ChatRequest(messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C and sunny"},
    ], params={"temperature": 0, "max_tokens": 8})
    first = pipeline.call(request)
    assert first.answered_by is None and first.content
    second = pipeline.call(request)
    assert second.content == first.content and ledger.records[-1].answered_by == "semantic_cache"
    assert any(e["kind"] == "hit" and e["layer"] == "exact" for e in ledger.records[-1].events)


def _sessions(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as admin:
        return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                             "AND pid <> pg_backend_pid()").fetchone()[0]


def test_keys_in_flight_hold_at_most_lock_pool_size_sessions(make_pg_store, pg_dsn):
    """Each miss in flight held its own session for the whole backend call, however small pool_size was:
    two replicas with 60 misses in flight each passed PostgreSQL's 100 connections, and calls failed."""
    import contextlib

    store = make_pg_store(pool_size=2, lock_pool_size=3)
    store.get("warm", now=1.0)
    before = _sessions(pg_dsn)
    with contextlib.ExitStack() as flights:
        for i in range(8):  # eight different keys computing at once
            flights.enter_context(store.single_flight(f"key-{i}"))
        assert _sessions(pg_dsn) - before <= 1 + 2  # one shared session holds every advisory lock
    assert store.stats()["single_flight_timeouts"] == 0, "every key in flight is locked across replicas"


def test_the_store_recovers_after_the_server_ends_its_sessions(make_pg_store, pg_dsn):
    """A restart or failover ends every session; the pooled ones looked alive until a query failed on
    them, so the next calls after the database was back failed too."""
    store = make_pg_store(pool_size=2)
    store.put(entry("k1"), vec(1))
    with store.single_flight("k2"):
        pass
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE pid <> pg_backend_pid() AND datname = current_database()")
    import time

    time.sleep(0.2)  # the termination notices reach the idle sockets
    assert store.get("k1", now=1001.0) is not None
    with store.single_flight("k2"):
        store.put(entry("k2"), vec(2))
    assert store.get("k2", now=1001.0) is not None


def test_a_pooled_session_is_reused_when_its_socket_number_is_above_1024(make_pg_store):
    """select() refuses descriptors of 1024 and more: in a busy process every checkout took the healthy
    session for a dropped one and opened a new one."""
    import os

    store = make_pg_store(pool_size=1)
    padding = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        store.get("warm", now=1.0)  # the pool's session opens now, on a high descriptor

        def backend_pid():
            with store._pool.connection() as conn:
                assert conn.fileno() >= 1024
                return conn.execute("SELECT pg_backend_pid()").fetchone()[0]

        assert backend_pid() == backend_pid()
    finally:
        for fd in padding:
            os.close(fd)


def test_a_call_holding_or_awaiting_the_single_flight_lock_survives_the_server_ending_its_sessions(make_pg_store, pg_dsn):
    """A failover or restart during a backend call ended the session holding the lock: the answer was
    computed and stored, then letting go of the lock raised AdminShutdown and the call failed; a caller
    waiting for the lock failed the same way."""
    import threading
    import time

    holder, waiter = make_pg_store(), make_pg_store()
    inside, errors = threading.Event(), []

    def wait_for_the_lock() -> None:
        try:
            inside.wait()
            with waiter.single_flight("k"):
                pass
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    thread = threading.Thread(target=wait_for_the_lock)
    thread.start()
    with holder.single_flight("k"):
        inside.set()
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            for _ in range(200):  # until the waiter is blocked in pg_advisory_lock
                if admin.execute("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                 "AND query LIKE 'SELECT pg_advisory_lock%'").fetchone():
                    break
                time.sleep(0.05)
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE pid <> pg_backend_pid() AND datname = current_database()")
        time.sleep(0.2)  # the termination notices reach the idle sockets
        holder.put(entry("k"), vec(1))  # the answer is stored on a fresh session
    thread.join(10)
    assert not errors, errors
    assert holder.get("k", now=1001.0) is not None
    with holder.single_flight("k"):
        pass


def test_while_the_server_is_down_a_call_goes_on_without_the_cache(tmp_path, caplog):
    """A stopped or failing-over PostgreSQL failed every model call with psycopg.OperationalError: a
    cache outage became an outage of the whole proxy. The outage is logged once, not at every call, and
    the store serves again when the server is back, without a restart."""
    import os
    import signal
    import tempfile
    import time

    pgserver = pytest.importorskip("pgserver")
    from ctxkit.stages.cache.pg_store import PostgresStore

    server = pgserver.get_server(tempfile.mkdtemp(prefix="ctxkit-pg-"), cleanup_mode="delete")
    try:
        store = PostgresStore(server.get_uri(), table_prefix="outage", dimension=DIM, retry_s=0.5)
        store.put(entry("k1"), vec(1))
        os.kill(server.get_pid(), signal.SIGINT)  # a fast shutdown: every session ends, no new one is taken
        time.sleep(2)
        with caplog.at_level("WARNING", logger="ctxkit.stages.cache.pg_store"):
            for _ in range(3):
                assert store.get("k1", now=1001.0) is None, "a miss"
                assert store.search("scope-a", vec(1), 4, now=1001.0) == []
                assert store.put(entry("k2"), vec(2)) is False  # not stored, and the call that answered is not failed
                with store.single_flight("k2"):
                    pass
        assert [r.levelname for r in caplog.records] == ["ERROR"], [r.getMessage() for r in caplog.records]
        with pytest.raises(psycopg.OperationalError):
            store.put_many([entry("k3")], [vec(3)])  # a bulk load is told
        server.ensure_postgres_running()  # the server restarts
        deadline = time.monotonic() + 15
        while store.get("k1", now=1001.0) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.get("k1", now=1001.0) is not None, "the store did not use the server again once it was back"
        assert store.put(entry("k2"), vec(2)) is True
    finally:
        with contextlib.suppress(Exception):
            server.cleanup()


# A cache table of another shape (another app's, a hand-made one) is refused when the store opens.
def test_a_table_lacking_columns_is_refused_at_open(pg_dsn, pg_prefix):
    from ctxkit.stages.cache.pg_store import PostgresStore

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(f"""CREATE TABLE {pg_prefix}_entries (key text PRIMARY KEY, scope text NOT NULL,
            namespace text NOT NULL, query_text text NOT NULL, response json NOT NULL,
            created_at double precision NOT NULL, expires_at double precision, size_bytes bigint NOT NULL,
            embedding vector(384) NOT NULL)""")
    with pytest.raises(ConfigurationError, match="lacks features"):
        PostgresStore(pg_dsn, table_prefix=pg_prefix)


# statement_timeout_s is accepted up to any finite number, but PostgreSQL takes at most 2**31 - 1 ms: past
# 24.8 days every session's SET failed, and every lookup raised out of the model call.
def test_a_statement_timeout_past_postgres_range_still_serves(make_pg_store):
    store = make_pg_store(statement_timeout_s=30 * 86400)
    assert store.get("absent", 0.0) is None
    with store.single_flight("k"):
        pass


# A flight still polling for another replica's lock when its store is closed must not open a new session
# (it would never be closed).
def test_a_flight_waiting_at_close_opens_no_session(make_pg_store, pg_dsn):
    import threading
    import time

    a, b = make_pg_store(single_flight_timeout_s=5), make_pg_store(single_flight_timeout_s=5)
    taken, done = threading.Event(), threading.Event()

    def hold():
        with b.single_flight("k"):
            taken.set()
            done.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    taken.wait(5)
    waiter = threading.Thread(target=_enter_quietly, args=(a, "k"))
    waiter.start()
    time.sleep(0.3)
    a.close()
    done.set()
    holder.join()
    waiter.join()
    assert a._holder is None


def _enter_quietly(store, key):
    with contextlib.suppress(ConfigurationError), store.single_flight(key):
        pass


# Entries PostgreSQL cannot store (a NUL in the question, a lone surrogate anywhere) are left out with a
# warning: the rest of a put_many batch is stored, and a put never raises after the model answered.
def _storable_entry(key: str, query: str = "question", content: str = "answer") -> CacheEntry:
    return CacheEntry(key=key, scope="s", namespace="ns", query_text=query, response={"a": content}, created_at=1000.0)


def test_put_many_stores_the_entries_it_can(make_pg_store):
    store = make_pg_store()
    store.put_many([_storable_entry("ok"), _storable_entry("nul", "a\x00b"), _storable_entry("sur", content="x\ud83d")],
                   np.ones((3, 384), dtype=np.float32))
    assert store.get("ok", 1001.0) is not None
    assert store.get("nul", 1001.0) is None and store.get("sur", 1001.0) is None
    assert store.stats()["entries"] == 1


def test_put_of_an_answer_with_a_lone_surrogate_does_not_raise(make_pg_store):
    store = make_pg_store()
    store.put(_storable_entry("sur", content="half an emoji \ud83d"), np.ones(384, dtype=np.float32))
    assert store.get("sur", 1001.0) is None


@pytest.mark.parametrize("setting", [
    # each was taken (a bool as 1, a negative single-flight timeout as "wait for ever") or was a TypeError
    {"dimension": True}, {"dimension": "384"}, {"dimension": 384.0}, {"size_bytes": "1GB"}, {"size_bytes": float("nan")},
    {"pool_size": True}, {"pool_size": 2.5}, {"ef_search": 50.5}, {"statement_timeout_s": True},
    {"connect_timeout_s": "2"}, {"retry_s": True}, {"single_flight_timeout_s": -1}, {"single_flight_timeout_s": "5"},
    {"single_flight_timeout_s": float("nan")}, {"namespace_ttl": {"a": True}},
])
def test_a_setting_of_the_wrong_kind_is_refused_naming_it_before_connecting(setting):
    from ctxkit.stages.cache.pg_store import PostgresStore

    (name, value), = setting.items()
    shown = re.escape(repr(value if name != "namespace_ttl" else value["a"]))
    with pytest.raises(ConfigurationError, match=f"{name}.*{shown}"):
        PostgresStore("postgresql://app:pw@127.0.0.1:1/db", **setting)
