"""LocalStore specifics beyond the shared contract: its FAISS snapshot, rebuilding the index from
diskcache when the snapshot is stale or broken, compaction of vectors left by evicted entries, HNSW."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from ctxkit.errors import ConfigurationError
from ctxkit.stages.cache.local_store import LocalStore
from ctxkit.stages.cache.store import CacheEntry

DIM = 384


def unit(seed: str) -> np.ndarray:
    rng = np.random.default_rng(abs(hash(seed)) % 2**32)
    v = rng.normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def near(v: np.ndarray) -> np.ndarray:
    w = v + 0.01 * np.random.default_rng(1).normal(size=v.shape).astype(np.float32)
    return w / np.linalg.norm(w)


def make_entry(key: str, namespace: str = "ns") -> CacheEntry:
    return CacheEntry(key=key, scope="scope-a", namespace=namespace, query_text=key,
                      response={"choices": [{"message": {"role": "assistant", "content": key}}]},
                      created_at=time.time())


def fill(store, n, prefix="k", **kw):
    for i in range(n):
        store.put(make_entry(f"{prefix}{i}", **kw), unit(f"{prefix}{i}"))


def test_restart_loads_the_snapshot_and_catches_up_on_later_writes(tmp_path):
    first = LocalStore(tmp_path)
    fill(first, 10)
    first.close()  # writes the snapshot
    assert list((tmp_path / "faiss").glob("snapshot-flat.npz"))
    writer = LocalStore(tmp_path)
    fill(writer, 5, prefix="late")  # written after the snapshot: only in the log
    reader = LocalStore(tmp_path)
    for key in ("k3", "late4"):
        hits = reader.search("scope-a", near(unit(key)), 1, time.time())
        assert hits and hits[0].entry.key == key, f"{key} missing after restart"
    writer.close()
    reader.close()


def test_a_corrupt_snapshot_is_rebuilt_from_diskcache(tmp_path):
    store = LocalStore(tmp_path)
    fill(store, 10)
    store.close()
    (tmp_path / "faiss" / "snapshot-flat.npz").write_bytes(b"not a snapshot")
    again = LocalStore(tmp_path)
    hits = again.search("scope-a", unit("k6"), 1, time.time())
    assert hits and hits[0].entry.key == "k6"
    assert again.stats()["vectors"] == 10
    again.close()


def test_invalidated_entries_leave_no_vectors_after_a_rebuild(tmp_path):
    store = LocalStore(tmp_path)
    fill(store, 10, namespace="gone")
    fill(store, 3, prefix="kept", namespace="kept")
    store.invalidate("gone")
    store.close()
    (tmp_path / "faiss" / "snapshot-flat.npz").unlink()
    again = LocalStore(tmp_path)  # no snapshot: rebuilt from meta/, dropping vectors of missing entries
    assert again.stats()["vectors"] == 3
    again.close()


def test_hnsw_index_finds_the_same_neighbour(tmp_path):
    store = LocalStore(tmp_path, index="hnsw")
    fill(store, 200)
    hits = store.search("scope-a", near(unit("k123")), 1, time.time())
    assert hits and hits[0].entry.key == "k123"
    store.close()


def test_put_many_is_searchable_and_bounded(tmp_path):
    store = LocalStore(tmp_path)
    entries = [make_entry(f"b{i}") for i in range(50)]
    store.put_many(entries, np.stack([unit(f"b{i}") for i in range(50)]))
    assert store.get("b49", time.time()) is not None
    assert store.search("scope-a", unit("b7"), 1, time.time())[0].entry.key == "b7"
    store.close()


def test_bad_configuration_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigurationError):
        LocalStore(tmp_path, index="ivf-magic")
    with pytest.raises(ConfigurationError):
        LocalStore(tmp_path, size_bytes=0)
    store = LocalStore(tmp_path)
    with pytest.raises(ValueError, match="dimensions"):
        store.put(make_entry("x"), np.zeros(10, dtype=np.float32))
    store.close()


@pytest.mark.parametrize("setting", [
    # FAISS's HNSW: M=0 aborted the process on the first vector stored, M=1 crashed it, M<0 hung
    {"index": "hnsw", "hnsw_m": 0}, {"index": "hnsw", "hnsw_m": 1}, {"index": "hnsw", "hnsw_m": -3},
    {"hnsw_m": 32.0}, {"hnsw_m": True},
    # -1 made single_flight wait for ever; "120" and NaN failed the first miss (TypeError, ValueError)
    {"lock_timeout": -1}, {"lock_timeout": "120"}, {"lock_timeout": float("nan")}, {"lock_timeout": float("inf")},
    {"size_bytes": "1GB"}, {"size_bytes": float("nan")}, {"size_bytes": True},
    {"dimension": 0}, {"dimension": True}, {"dimension": "384"},
])
def test_a_wrong_number_is_refused_when_the_store_opens(tmp_path, setting):
    name, value = next((k, v) for k, v in setting.items() if k != "index")
    with pytest.raises(ConfigurationError, match=f"LocalStore {name}.*{re.escape(repr(value))}"):
        LocalStore(tmp_path, **setting)


def test_a_lock_timeout_of_zero_means_never_wait(tmp_path):
    store = LocalStore(tmp_path, lock_timeout=0)
    with store.single_flight("k"), store.single_flight("k"):  # the second goes on at once, unlocked
        pass
    store.close()


def test_keys_that_shared_a_lock_file_under_1024_files_no_longer_wait_for_each_other(tmp_path):
    """Misses that shared one of 1,024 lock files waited for each other's whole backend call; with 50 in
    flight, two shared one 70% of the time. Two keys that shared a file then must not share one now."""
    import hashlib
    import threading

    from ctxkit.stages.cache.local_store import lock_file

    def old_stripe(key: str) -> int:
        return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 1024

    first = "question-0"
    second = next(k for k in (f"question-{i}" for i in range(1, 100_000)) if old_stripe(k) == old_stripe(first))
    assert lock_file(first) != lock_file(second)
    with LocalStore(tmp_path / "c") as store:
        entered = threading.Event()

        def other() -> None:
            with store.single_flight(second):
                entered.set()

        with store.single_flight(first):
            worker = threading.Thread(target=other)
            worker.start()
            assert entered.wait(5), "a key that shares no lock file waited for another key's flight"
        worker.join()


@pytest.mark.parametrize("snapshot", [b"", b"PK\x03\x04 truncated"])
def test_an_empty_or_truncated_snapshot_is_rebuilt_not_fatal(tmp_path, snapshot):
    """A disk that filled up mid-write leaves an empty or truncated snapshot: the store would not open
    (EOFError, BadZipFile), nor the cache stage or `ctxkit serve --cache`, until someone deleted it."""
    store = LocalStore(tmp_path)
    fill(store, 10)
    store.close()
    (tmp_path / "faiss" / "snapshot-flat.npz").write_bytes(snapshot)
    again = LocalStore(tmp_path)
    assert again.stats()["vectors"] == 10
    again.close()


def test_a_damaged_database_is_a_typed_error_naming_the_cache(tmp_path):
    LocalStore(tmp_path).close()
    (tmp_path / "meta" / "cache.db").write_bytes(b"SQLite format 3\x00" + b"\xff" * 2000)
    with pytest.raises(ConfigurationError, match=str(tmp_path)):
        LocalStore(tmp_path)


def test_a_cache_that_cannot_be_opened_is_not_called_damaged(tmp_path):
    """A full disk or a read-only volume was reported as a damaged cache, with the advice to clear it: that
    throws away a good cache. (Made with a folder where the database file should be: permissions do not
    stop root.)"""
    (tmp_path / "entries").mkdir()
    (tmp_path / "entries" / "cache.db").mkdir()
    with pytest.raises(ConfigurationError, match="cannot open the cache") as caught:
        LocalStore(tmp_path)
    assert "damaged" not in str(caught.value)


def test_a_put_the_disk_refuses_is_skipped_not_raised(tmp_path, caplog):
    """A full disk made every cache miss fail with sqlite3.OperationalError after the backend had answered
    (and been paid). SQLite's own page limit makes the same "database or disk is full" for real."""
    store = LocalStore(tmp_path)
    store.put(make_entry("before"), unit("before"))
    for cache in (store._entries, store._meta):
        pages = cache._sql("PRAGMA page_count").fetchone()[0]
        cache._sql(f"PRAGMA max_page_count = {pages}")
    for i in range(5):  # 20 kB each: below diskcache's 32 kB, so kept in SQLite, which has no page left
        big = make_entry(f"big{i}")
        big = CacheEntry(**{**big.__dict__, "response": {"choices": [{"message": {"content": "x" * 20_000}}]}})
        store.put(big, unit(f"big{i}"))  # no exception
    assert "cannot store an answer" in caplog.text
    assert store.get("before", time.time()) is not None and store.get("big4", time.time()) is None
    store._counts_flushed = 0.0
    store.get("before", time.time())  # a counter flush on the full disk does not fail a lookup either


def test_a_long_answer_whose_value_file_a_crash_cut_short_is_a_miss_not_a_failed_call(tmp_path, caplog):
    """diskcache keeps a value of 32 kB or more in a file of its own, written without fsync: a power cut can
    leave it cut short while its row survives. get and search raised json's JSONDecodeError for it, on every
    later call like it (a 500 from the server) until the cache was cleared by hand."""
    store = LocalStore(tmp_path)
    long = CacheEntry(**{**make_entry("long").__dict__, "response": {"choices": [{"message": {"content": "z" * 40_000}}]}})
    store.put(long, unit("long"))
    store.put(make_entry("short"), unit("short"))
    store.close()
    (value_file,) = tmp_path.glob("entries/**/*.val")
    value_file.write_bytes(value_file.read_bytes()[:1000])
    store = LocalStore(tmp_path)
    assert [h.entry.key for h in store.search("scope-a", unit("long"), 1, time.time())] == ["short"]
    assert store.get("long", time.time()) is None
    assert "damaged entry" in caplog.text
    assert store.get("short", time.time()) is not None
    store.put(long, unit("long"))  # stored again, whole
    assert store.get("long", time.time()) is not None


_KILLED_AT_A_VALUE_FILE = """
import os, signal, sys, time
import diskcache, numpy as np
from ctxkit.stages.cache.local_store import LocalStore
from ctxkit.stages.cache.store import CacheEntry
store = LocalStore(sys.argv[1])
write = diskcache.Disk._write
def write_then_die(self, *args, **kwargs):  # the value file is written; its row never commits
    write(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
diskcache.Disk._write = write_then_die
store.put(CacheEntry(key="killed", scope="scope-a", namespace="ns", query_text="killed",
                     response={"choices": [{"message": {"content": "z" * 200_000}}]}, created_at=time.time()),
          np.ones(384, np.float32) / np.sqrt(384))
"""


def test_a_value_file_left_by_a_writer_killed_before_its_row_is_swept_on_open(tmp_path):
    """A writer SIGKILLed between diskcache writing a long answer's file and committing its row left the file
    for good (200 kB here), outside diskcache's size accounting: the cache outgrew size_bytes crash by crash.
    Opening sweeps those old enough that no live writer can still be about to commit them."""
    import os
    import signal
    import subprocess
    import sys

    LocalStore(tmp_path).close()
    done = subprocess.run([sys.executable, "-c", _KILLED_AT_A_VALUE_FILE, str(tmp_path)], timeout=120)
    assert done.returncode == -signal.SIGKILL
    (orphan,) = tmp_path.glob("entries/*/*/*.val")
    store = LocalStore(tmp_path)  # a live writer may be about to commit a young file: left alone
    long = CacheEntry(**{**make_entry("long").__dict__, "response": {"choices": [{"message": {"content": "z" * 40_000}}]}})
    store.put(long, unit("long"))
    store.close()
    assert orphan.exists() and len(list(tmp_path.glob("entries/*/*/*.val"))) == 2
    hours_ago = time.time() - 3 * 3600
    for value_file in tmp_path.glob("entries/*/*/*.val"):
        os.utime(value_file, (hours_ago, hours_ago))
    store = LocalStore(tmp_path)
    assert not orphan.exists() and len(list(tmp_path.glob("entries/*/*/*.val"))) == 1
    assert store.get("long", time.time()) is not None  # a file its row names is kept, however old
    store.close()


def test_a_damaged_page_met_after_opening_is_the_typed_error_and_a_put_is_skipped(tmp_path, caplog):
    """A page zeroed by a power cut passes the check at open; get raised sqlite3.DatabaseError, and put
    raised it after the backend had answered."""
    store = LocalStore(tmp_path)
    fill(store, 3000)
    store.close()
    db = tmp_path / "entries" / "cache.db"
    with open(db, "r+b") as handle:
        handle.seek(db.stat().st_size // 4096 // 2 * 4096)
        handle.write(b"\0" * 4096)
    store = LocalStore(tmp_path)
    with pytest.raises(ConfigurationError, match="is damaged"):
        for i in range(3000):
            store.get(f"k{i}", time.time())
    for i in range(50):
        store.put(make_entry(f"new{i}"), unit(f"new{i}"))  # no exception


def test_put_many_with_fewer_vectors_than_entries_stores_nothing(tmp_path):
    """zip() without strict: the entries past the last vector were stored with no vector, silently (the
    PostgresStore raises RequestError for the same call)."""
    from ctxkit.errors import RequestError

    store = LocalStore(tmp_path)
    with pytest.raises(RequestError, match="3 entries but 2 vectors"):
        store.put_many([make_entry("a"), make_entry("b"), make_entry("c")], np.stack([unit("a"), unit("b")]))
    assert store.get("c", time.time()) is None


def test_only_damage_is_called_damage():
    """"Cannot operate on a closed database" carries no result code: it is misuse, and "move it aside" would
    throw a good store away."""
    import sqlite3

    from ctxkit.sqlite_damage import is_damage

    db = sqlite3.connect(":memory:")
    db.close()
    with pytest.raises(sqlite3.ProgrammingError) as closed:
        db.execute("SELECT 1")
    assert not is_damage(closed.value)
    assert is_damage(sqlite3.DatabaseError("file is not a database"))


def test_a_damaged_page_of_meta_is_the_typed_error_when_the_store_opens(tmp_path):
    """The vectors' database (meta/) damaged past its header passes diskcache's open; its first read, in
    LocalStore's own start-up, raised sqlite3.DatabaseError instead of the ConfigurationError naming the cache."""
    store = LocalStore(tmp_path)
    fill(store, 3000)
    store.close()
    db = tmp_path / "meta" / "cache.db"
    with open(db, "r+b") as handle:
        handle.seek(4096 * 5)
        handle.write(b"\xff" * 4096 * 4)
    with pytest.raises(ConfigurationError, match="is damaged"):
        LocalStore(tmp_path)


def test_a_lookup_on_a_disk_that_refuses_writes_is_a_miss_not_a_failed_call(tmp_path, monkeypatch, caplog):
    """diskcache records each read for its LRU: on a full or read-only disk every get and search raised
    sqlite3.OperationalError, failing the model call (PostgresStore's lookup is a miss when its server is
    away). The snapshot due after enough new vectors raised OSError on every search too, and left its temp file.
    (SQLite's query_only makes the refused write for real; a file where faiss/ was, the refused snapshot.)"""
    import ctxkit.stages.cache.local_store as local_store

    monkeypatch.setattr(local_store, "_SNAPSHOT_EVERY", 5)
    writer, reader = LocalStore(tmp_path / "a"), LocalStore(tmp_path / "a")
    fill(writer, 10)
    (tmp_path / "a" / "faiss" / "snapshot-flat.npz").unlink()
    (tmp_path / "a" / "faiss").rmdir()
    (tmp_path / "a" / "faiss").write_text("not a folder")
    assert [h.entry.key for h in reader.search("scope-a", unit("k3"), 1, time.time())] == ["k3"]
    assert "cannot save its index snapshot" in caplog.text
    reader._entries._sql("PRAGMA query_only = ON")
    assert reader.get("k3", time.time()) is None
    assert reader.search("scope-a", unit("k3"), 1, time.time()) == []
    assert "a lookup is a miss" in caplog.text



def test_a_closed_store_refuses_calls_rather_than_reopen_its_files(tmp_path):
    """diskcache reopens a closed cache at its next use: a store closed at a tenant's teardown and then used by a
    call still in flight held three more open files (SQLite database, WAL, shared memory) that nothing closed."""
    import os

    store = LocalStore(tmp_path / "c")
    store.put(make_entry("k1"), unit("k1"))
    store.close()
    store.close()  # twice: nothing more to do
    files = len(os.listdir("/proc/self/fd"))
    for call in (lambda: store.get("k1", time.time()), lambda: store.search("s", unit("k1"), 3, time.time()),
                 lambda: store.put(make_entry("k2"), unit("k2")), lambda: store.stats(),
                 lambda: store.invalidate("ns"), lambda: store.clear()):
        with pytest.raises(ConfigurationError, match="closed"):
            call()
    assert len(os.listdir("/proc/self/fd")) == files
