"""The shared store under load and behind locks: single-flight across replicas holds however many keys
are in flight, and a lookup never waits without end behind a table lock."""

from __future__ import annotations

import threading
import time

import numpy as np
import psycopg

from ctxkit.stages.cache.store import CacheEntry

pytest_plugins = ["tests.pg_fixtures"]


def test_single_flight_holds_across_replicas_past_many_keys_in_flight(make_pg_store):
    a, b = make_pg_store(), make_pg_store()
    calls: list[str] = []
    guard = threading.Lock()

    def call(store, key):
        if store.get(key, now=10.0) is not None:
            return
        with store.single_flight(key):
            if store.get(key, now=10.0) is not None:
                return
            with guard:
                calls.append(key)
            time.sleep(0.3)
            store.put(CacheEntry(key=key, scope="s", namespace="n", query_text=key, response={"k": key},
                                 created_at=10.0), np.ones(384, np.float32))

    threads = [threading.Thread(target=call, args=(s, f"k{i}")) for i in range(40) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(calls) == sorted(f"k{i}" for i in range(40))  # one backend call per question, not two
    assert a.stats()["single_flight_timeouts"] == 0


def test_a_lookup_behind_a_table_lock_is_a_miss_after_the_statement_timeout(make_pg_store, pg_dsn, pg_prefix):
    store = make_pg_store(statement_timeout_s=0.5)
    with psycopg.connect(pg_dsn) as admin:
        admin.execute(f"LOCK TABLE {pg_prefix}_entries IN ACCESS EXCLUSIVE MODE")  # VACUUM FULL, ALTER TABLE
        t0 = time.monotonic()
        assert store.get("k", now=1.0) is None
        assert store.search("s", np.ones(384, np.float32), 3, now=1.0) == []
        assert time.monotonic() - t0 < 5
        admin.rollback()
    store.put(CacheEntry(key="k", scope="s", namespace="n", query_text="q", response={}, created_at=1.0),
              np.ones(384, np.float32))
    assert store.get("k", now=1.0) is not None
