"""PostgresStore shared by replicas: separate processes (spawned, as separate servers would be) and
threads on one PostgreSQL. Single-flight must let exactly one replica compute an answer."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psycopg

from ctxkit.stages.cache.store import CacheEntry

pytest_plugins = ["tests.pg_fixtures"]

DIM = 384
CTX = mp.get_context("spawn")  # a fresh interpreter per replica: no connection inherited through fork


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def make_entry(key: str, content: str, *, scope: str = "scope", namespace: str = "ns", now: float = 1000.0) -> CacheEntry:
    return CacheEntry(
        key=key, scope=scope, namespace=namespace, query_text=f"question {key}",
        response={"choices": [{"message": {"role": "assistant", "content": content}}]}, created_at=now,
    )


# ---- replica bodies (module level so spawned processes can import them) -----------------------------

def replica_answer(dsn: str, prefix: str, key: str, barrier, log_path: str, out) -> None:
    """The cache-aside pattern a replica runs: look up, and on a miss compute under single_flight,
    re-checking first, so that a replica that waited reads the stored answer instead of computing."""
    from ctxkit.stages.cache.pg_store import PostgresStore

    store = PostgresStore(dsn, table_prefix=prefix)
    barrier.wait(timeout=60)
    source = "hit"
    entry = store.get(key, now=1001.0)
    if entry is None:
        with store.single_flight(key):
            entry = store.get(key, now=1001.0)
            source = "waited"
            if entry is None:
                with open(log_path, "a") as log:  # the "backend call" this test counts
                    log.write(f"{os.getpid()}\n")
                time.sleep(1.5)  # a slow model call: the other replica arrives while it runs
                entry = make_entry(key, f"computed by {os.getpid()}")
                store.put(entry, vec(1))
                source = "computed"
    out.put((source, entry.response["choices"][0]["message"]["content"]))
    store.close()


def replica_hold_lock_forever(dsn: str, prefix: str, key: str, held) -> None:
    from ctxkit.stages.cache.pg_store import PostgresStore

    store = PostgresStore(dsn, table_prefix=prefix)
    with store.single_flight(key):
        held.set()
        time.sleep(600)  # killed by the test long before this ends


def replica_write(dsn: str, prefix: str, worker: int, count: int, size_bytes: int) -> None:
    from ctxkit.stages.cache.pg_store import PostgresStore

    store = PostgresStore(dsn, table_prefix=prefix, size_bytes=size_bytes)
    for i in range(count):
        key = f"k{(worker * 7 + i) % (count + 5)}"  # writers overlap on keys: upserts race
        store.put(make_entry(key, f"w{worker}-{i}", now=1000.0 + i), vec(worker * 1000 + i))
        store.get(f"k{i}", now=1000.0 + i)
        store.search("scope", vec(i), k=3, now=1000.0 + i)
    store.close()


def replica_write_forever(dsn: str, prefix: str, size_bytes: int) -> None:
    from ctxkit.stages.cache.pg_store import PostgresStore

    store = PostgresStore(dsn, table_prefix=prefix, size_bytes=size_bytes)
    i = 0
    while True:  # batches of 20, so that a kill most likely lands inside a transaction
        store.put_many([make_entry(f"e{i + j}", f"payload {i + j} " + "z" * ((i + j) % 700), now=1000.0 + i + j)
                        for j in range(20)], [vec(i + j) for j in range(20)])
        i += 20


def replica_write_then_report(dsn: str, prefix: str, out) -> None:
    from ctxkit.stages.cache.pg_store import PostgresStore

    store = PostgresStore(dsn, table_prefix=prefix)
    store.put(make_entry("written-by-a", "answer from replica A", scope="shared"), vec(42))
    out.put("written")
    store.close()


# ---- tests ---------------------------------------------------------------------------------------------

def test_an_entry_written_by_one_replica_is_found_by_another(make_pg_store, pg_dsn, pg_prefix):
    reader = make_pg_store()
    out = CTX.Queue()
    writer = CTX.Process(target=replica_write_then_report, args=(pg_dsn, pg_prefix, out))
    writer.start()
    assert out.get(timeout=60) == "written"
    writer.join(30)
    assert writer.exitcode == 0
    got = reader.get("written-by-a", now=1001.0)
    assert got is not None and got.response["choices"][0]["message"]["content"] == "answer from replica A"
    hits = reader.search("shared", vec(42), k=1, now=1001.0)
    assert [h.entry.key for h in hits] == ["written-by-a"]


def test_single_flight_across_two_replicas_computes_once(make_pg_store, pg_dsn, pg_prefix, tmp_path: Path):
    make_pg_store()  # create the tables before the replicas race to
    log = tmp_path / "backend_calls.log"
    log.touch()
    barrier, out = CTX.Barrier(2), CTX.Queue()
    replicas = [
        CTX.Process(target=replica_answer, args=(pg_dsn, pg_prefix, "same-question", barrier, str(log), out))
        for _ in range(2)
    ]
    for p in replicas:
        p.start()
    results = sorted(out.get(timeout=90) for _ in replicas)
    for p in replicas:
        p.join(30)
        assert p.exitcode == 0
    calls = log.read_text().split()
    assert len(calls) == 1, f"the backend was called {len(calls)} times for one question: {calls}"
    assert [source for source, _ in results] == ["computed", "waited"], results
    assert results[0][1] == results[1][1] == f"computed by {calls[0]}", "both replicas must serve the one answer"
    assert make_pg_store().stats()["single_flight_waits"] >= 1


def test_single_flight_lock_is_released_when_the_holder_process_is_killed(make_pg_store, pg_dsn, pg_prefix):
    store = make_pg_store()
    held = CTX.Event()
    holder = CTX.Process(target=replica_hold_lock_forever, args=(pg_dsn, pg_prefix, "stuck", held))
    holder.start()
    try:
        assert held.wait(60), "the holder replica never took the lock"
        entered = threading.Event()

        def waiter() -> None:
            with store.single_flight("stuck"):
                entered.set()

        t = threading.Thread(target=waiter, daemon=True)
        t.start()
        assert not entered.wait(1.0), "a second caller got in while the first held the lock"
        os.kill(holder.pid, signal.SIGKILL)  # a replica dies mid-computation
        assert entered.wait(15), "the lock of a killed replica must be released by PostgreSQL"
        t.join(5)
    finally:
        holder.kill()
        holder.join(10)


def test_single_flight_across_threads_computes_once(make_pg_store):
    store = make_pg_store()
    calls: list[int] = []
    answers: list[str] = []
    start = threading.Barrier(5)

    def request() -> None:
        start.wait(30)
        entry = store.get("q", now=1001.0)
        if entry is None:
            with store.single_flight("q"):
                entry = store.get("q", now=1001.0)
                if entry is None:
                    calls.append(1)
                    time.sleep(0.5)
                    entry = make_entry("q", "the one answer")
                    store.put(entry, vec(1))
        answers.append(entry.response["choices"][0]["message"]["content"])

    threads = [threading.Thread(target=request) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(calls) == 1, f"{len(calls)} threads computed the same answer"
    assert answers == ["the one answer"] * 5


def test_single_flight_gives_up_waiting_after_the_timeout(make_pg_store, pg_dsn, pg_prefix):
    holder_store = make_pg_store()
    impatient = make_pg_store(single_flight_timeout_s=0.5)  # another replica, with a short patience
    release = threading.Event()
    held = threading.Event()

    def hold() -> None:
        with holder_store.single_flight("slow"):
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(10)
        t0 = time.monotonic()
        with impatient.single_flight("slow"):
            waited = time.monotonic() - t0
        assert 0.4 <= waited < 5, f"waited {waited:.2f}s for a 0.5 s timeout"
        assert impatient.stats()["single_flight_timeouts"] == 1
    finally:
        release.set()
        t.join(10)


def test_different_keys_do_not_wait_for_each_other(make_pg_store):
    store = make_pg_store()
    with store.single_flight("a"):
        done = threading.Event()

        def other() -> None:
            with store.single_flight("b"):
                done.set()

        threading.Thread(target=other, daemon=True).start()
        assert done.wait(5), "single_flight('b') waited for single_flight('a')"


def test_concurrent_writer_processes_keep_the_store_consistent(make_pg_store, pg_dsn, pg_prefix):
    probe = make_pg_store()
    probe.put(make_entry("probe", "w0-0"), vec(0))
    one = probe.stats()["bytes"]
    bound = one * 12  # far fewer than the writers write: eviction runs under contention
    probe.clear()
    writers = [CTX.Process(target=replica_write, args=(pg_dsn, pg_prefix, w, 40, bound)) for w in range(3)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(120)
    assert [p.exitcode for p in writers] == [0, 0, 0], "a writer failed (deadlock or serialization error?)"
    stats = probe.stats()
    with psycopg.connect(pg_dsn) as conn:
        actual, rows = conn.execute(
            f"SELECT COALESCE(sum(size_bytes), 0), count(*) FROM {pg_prefix}_entries"
        ).fetchone()
        orphans = conn.execute(
            f"SELECT count(*) FROM {pg_prefix}_entries e LEFT JOIN {pg_prefix}_access a USING (key) "
            "WHERE a.key IS NULL"
        ).fetchone()[0]
    assert stats["bytes"] == actual, "the byte counter drifted from the stored rows"
    assert actual <= bound and rows == stats["entries"] and rows > 0
    assert orphans == 0, "every entry must have its LRU record"
    assert stats["puts"] == 1 + 3 * 40 and stats["evictions"] > 0  # the probe, then the writers
    for hit in probe.search("scope", vec(5), k=5, now=2000.0):  # every stored entry is whole
        assert hit.entry.response["choices"][0]["message"]["content"].startswith("w")


def test_a_replica_killed_mid_write_leaves_a_consistent_store(make_pg_store, pg_dsn, pg_prefix):
    probe = make_pg_store()
    bound = 60_000  # small, so the killed writer was also evicting
    writer = CTX.Process(target=replica_write_forever, args=(pg_dsn, pg_prefix, bound))
    writer.start()
    try:
        deadline = time.monotonic() + 60
        while probe.stats()["puts"] < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(10)
        assert writer.exitcode == -signal.SIGKILL
    finally:
        writer.kill()
    assert probe.stats()["puts"] >= 200, "the writer never got going"
    with psycopg.connect(pg_dsn) as conn:
        actual, rows = conn.execute(
            f"SELECT COALESCE(sum(size_bytes), 0), count(*) FROM {pg_prefix}_entries").fetchone()
        contents = conn.execute(f"SELECT key, response FROM {pg_prefix}_entries").fetchall()
    stats = probe.stats()
    assert stats["bytes"] == actual and stats["entries"] == rows > 0, "a killed transaction left a partial write"
    assert actual <= bound
    for key, response in contents:
        content = response["choices"][0]["message"]["content"]
        assert content.startswith(f"payload {key[1:]} "), f"{key} holds {content[:30]!r}"
    probe.put(make_entry("after", "still writable"), vec(1))
    assert probe.get("after", now=5000.0) is not None


def test_concurrent_threads_share_one_store_object(make_pg_store):
    store = make_pg_store(pool_size=2)  # fewer connections than threads: the pool must hand them out safely
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(25):
                key = f"t{worker}-{i}"
                store.put(make_entry(key, key), vec(worker * 100 + i))
                got = store.get(key, now=1001.0)
                assert got is not None and got.key == key, f"{key} read back as {got}"
                store.search("scope", vec(i), k=2, now=1001.0)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert store.stats()["entries"] == 100 and store.stats()["hits"] == 100


def test_stats_from_several_replicas_add_up(make_pg_store):
    replicas = 2
    stores = [make_pg_store() for _ in range(replicas)]
    stores[0].put(make_entry("k", "v"), vec(1))
    for store in stores:
        store.get("k", now=1001.0)
        store.get("missing", now=1001.0)
    assert all(s.stats()["hits"] == replicas and s.stats()["misses"] == replicas for s in stores)


def test_single_flight_entered_and_left_on_different_threads_is_released(make_pg_store):
    """The cache stage's async path enters the flight in one worker thread and leaves it in another."""
    store = make_pg_store()
    flight = store.single_flight("async-key")
    enter = threading.Thread(target=flight.__enter__)
    enter.start()
    enter.join(10)
    leave = threading.Thread(target=flight.__exit__, args=(None, None, None))
    leave.start()
    leave.join(10)
    got_in = threading.Event()

    def again() -> None:
        with store.single_flight("async-key"):
            got_in.set()

    threading.Thread(target=again, daemon=True).start()
    assert got_in.wait(5), "the flight was not released when left on another thread"
