"""LocalStore: the embedded cache store, diskcache for entries and metadata, FAISS for vectors, in one directory.

Layout under `directory`:
    entries/   diskcache (SQLite): exact key -> entry record. LRU eviction under `size_bytes`, tagged
               with the namespace so `invalidate(namespace)` is one indexed delete, expiry per entry.
    meta/      diskcache, never evicted: the write sequence, ("vec", key) -> (seq, scope, vector),
               ("log", seq) -> key, the invalidation epoch, hit/miss counters.
    faiss/     a snapshot of the in-memory FAISS indexes (one per scope) and the sequence they cover.
    locks/     lock files for cross-process single-flight (65,536, made as needed in 256 folders).

Why this shape:
- diskcache is the source of truth; every write is an SQLite transaction, so a process killed mid-write
  leaves a whole entry or none. The FAISS index is a cache of the vectors in meta/: it can always be
  rebuilt from there, and is when its snapshot is missing, stale or unreadable.
- Several processes write at once: each keeps its own in-memory index and, before a search, reads the
  log of vectors written since it last looked (one small read when nothing changed). A vector, its log
  record and the sequence number are written in one transaction, so a reader never sees a hole.
- Entries evicted or invalidated leave their vectors behind for a while: a search checks every
  candidate against entries/ (a stale vector is skipped) and the index is rebuilt, dropping them, once
  they are a large share of it.
- `size_bytes` bounds entries/ (the responses and their metadata, diskcache's own accounting of its
  SQLite file). Vectors add 1.6 KB per live entry in meta/ and in memory.

Index type: exact inner-product search (IndexFlatIP) by default; `index="hnsw"` uses IndexHNSWFlat
for very large stores. `ctxkit bench cache --scale 1000000 --index-only` (synthetic clustered vectors,
one search thread, MiniLM embedding ~13 ms on this 2-core machine) measured, with 1,000,000 entries in
one scope: flat search p50 57 ms (lookup ~71 ms, over the 50 ms goal), 1.5 GB; HNSW (M=32) search p50
0.5-0.7 ms at efSearch 64 but only 88% of stored paraphrases found, 1.2-2.4 ms and 95% at efSearch 256
(two runs), 1.8 GB, 275-337 s to build on two threads; the real store adds ~1.2 ms of candidate fetch
(measured at 20,000 entries), so a lookup at 1,000,000 entries is ~16-18 ms. Hence efSearch 256 below,
and flat until a scope holds a few hundred thousand entries (flat search grows linearly: ~6 ms at 100,000).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigurationError, RequestError
from ...forking import renew_after_fork
from ...settings import number_between, whole_number
from ...sqlite_damage import damage_reported, is_damage
from ...temp_files import remove_stale
from .store import CacheEntry, Hit

logger = logging.getLogger(__name__)
_REFUSED = object()  # a read the disk refused (see LocalStore._record)
_REMEDY = "move it aside or clear it to start with an empty cache"

# Lock files, made as needed in 256 folders. Two unrelated keys that share one wait for each other's whole
# backend call: with 1,024 files, 50 misses in flight shared one 70% of the time; with 65,536, 2%.
_LOCK_STRIPES = 65536
_SNAPSHOT_EVERY = 10_000  # write a FAISS snapshot after this many new vectors (and on close)
_LOG_KEEP = 100_000  # log records kept for processes catching up; older ones force a rebuild
# diskcache writes a long answer's file before the row that names it commits, and waits at most its `timeout`
# (60 s) for that commit: an unnamed file older than this was left by a writer killed in between.
_ORPHAN_AFTER_S = 600.0


# HNSW search breadth: 256 finds 95% of stored paraphrases among 1,000,000 entries (64: 88%) for ~+1 ms.
HNSW_EF_SEARCH = 256
HNSW_EF_CONSTRUCTION = 80


def new_index(dimension: int, index_type: str = "flat", hnsw_m: int = 32) -> Any:
    """An empty FAISS inner-product index with ids, as a scope of LocalStore uses (the scale benchmark too)."""
    import faiss

    base: Any
    if index_type == "hnsw":
        base = faiss.IndexHNSWFlat(dimension, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efSearch = HNSW_EF_SEARCH
        base.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    else:
        base = faiss.IndexFlatIP(dimension)
    return faiss.IndexIDMap(base)


@dataclasses.dataclass
class _ScopeIndex:
    index: Any  # faiss.Index with ids
    keys: dict[int, str]  # faiss id (the write sequence) -> entry key


class LocalStore:
    """A CacheStore on the local disk, safe for several processes sharing one directory."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        dimension: int = 384,
        size_bytes: int = 1 << 30,
        index: str = "flat",
        hnsw_m: int = 32,
        lock_timeout: float = 120.0,
    ) -> None:
        import diskcache

        if index not in ("flat", "hnsw"):
            raise ConfigurationError(f"LocalStore index must be 'flat' or 'hnsw', not {index!r}")
        dimension = whole_number(dimension, "LocalStore dimension", minimum=1)
        size_bytes = whole_number(size_bytes, "LocalStore size_bytes", minimum=1)
        # FAISS's HNSW aborted the process (M=0) or crashed it (M=1) on the first vector stored, or hung (M<0)
        hnsw_m = whole_number(hnsw_m, "LocalStore hnsw_m", minimum=2)
        # a negative timeout made single_flight wait for ever; a string or NaN failed the first miss
        lock_timeout = number_between(lock_timeout, "LocalStore lock_timeout (seconds; 0: never wait)", 0,
                                      threading.TIMEOUT_MAX)
        self.directory = Path(directory)
        self.dimension = dimension
        self.size_bytes = size_bytes
        self.index_type = index
        self.hnsw_m = hnsw_m
        self.lock_timeout = lock_timeout
        try:
            (self.directory / "locks").mkdir(parents=True, exist_ok=True)
            (self.directory / "faiss").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"cannot create the cache directory {self.directory}: {exc}") from exc
        remove_stale(self.directory / "faiss", ".*.tmp")
        try:
            self._entries = diskcache.Cache(
                str(self.directory / "entries"), size_limit=size_bytes, eviction_policy="least-recently-used",
                cull_limit=10, timeout=60,
            )
            self._meta = diskcache.Cache(str(self.directory / "meta"), eviction_policy="none", timeout=60)
            self._entries.create_tag_index()
            _remove_orphan_values(self.directory / "entries")
        except sqlite3.DatabaseError as exc:
            if is_damage(exc):
                raise ConfigurationError(f"the cache in {self.directory} is damaged ({exc}); {_REMEDY}") from exc
            # not damage: a full disk, a read-only volume, another owner; clearing would lose a good cache
            raise ConfigurationError(f"cannot open the cache in {self.directory} ({exc}); check that the "
                                     "disk has room and this process can write to the directory") from exc
        self._lock = threading.RLock()  # guards the in-memory indexes
        self._closed = False
        self._flight_guard = threading.Lock()
        self._flights: dict[str, list[Any]] = {}  # key -> [lock, users]
        renew_after_fork(self, LocalStore._after_fork_in_child)
        self._indexes: dict[str, _ScopeIndex] = {}
        self._seq = 0  # the last write sequence this process has indexed
        self._epoch = -1
        self._stale = 0
        self._vectors = 0  # vectors in this process's indexes, live or not
        self._since_snapshot = 0
        # Counters are kept here and added to meta/ in batches: a write per lookup would cost more than
        # the lookup itself when many processes share the store.
        self._counts: dict[str, int] = {}
        self._counts_flushed = time.monotonic()
        try:
            # A page of meta/ damaged past its header (a power cut) is met here, by the first read: the typed
            # error that damage found by diskcache's open gives, not sqlite3's DatabaseError.
            with self._damage_is_typed():
                self._check_dimension()
                with self._lock:
                    self._load()
        except BaseException:
            with contextlib.suppress(Exception):
                self._entries.close()
                self._meta.close()
            raise

    # -- the protocol -------------------------------------------------------------------------------
    def get(self, key: str, now: float) -> CacheEntry | None:
        self._unless_closed()
        record = self._record(key)
        entry = self._entry(key, record) if record is not None and record is not _REFUSED else None
        if entry is not None and entry.expires_at is not None and now > entry.expires_at:
            entry = None
        self._count("hits" if entry else "misses")
        return entry

    def put(self, entry: CacheEntry, vector: np.ndarray) -> bool:
        """Store `entry`. A write the disk refuses (full, turned read-only, quota) is logged and skipped, as
        PostgresStore does when its server is down: the call that answered goes on, its answer not stored.
        Returns whether it was stored (the stage notes a refused write in the call's ledger record)."""
        self._unless_closed()
        vec = _as_vector(vector, self.dimension)
        try:
            self._put(entry, vec)
        except (sqlite3.DatabaseError, OSError) as exc:  # DatabaseError: full, read-only, or damaged
            logger.warning("the cache in %s cannot store an answer: %s", self.directory, exc)
            return False
        return True

    def _put(self, entry: CacheEntry, vec: np.ndarray) -> None:
        record = dataclasses.asdict(entry)
        expire = _ttl_of(entry)
        # The entry first: a writer killed between the two leaves an entry the exact layer can serve
        # and no vector, never a vector pointing at nothing.
        self._entries.set(entry.key, _dump(record), expire=expire, tag=entry.namespace)
        with self._meta.transact():
            seq = self._meta.incr("seq")
            self._meta.set(("vec", entry.key), (seq, entry.scope, vec.tobytes()))
            self._meta.set(("log", seq), entry.key)
            if seq % 1000 == 0:
                self._prune_log(seq)
        self._count("puts")

    def put_many(self, entries: list[CacheEntry], vectors: np.ndarray) -> None:
        """Bulk `put` (warming a cache, benchmarks): one transaction per store instead of one per entry."""
        self._unless_closed()
        if len(entries) != len(vectors):  # as PostgresStore: never entries stored without their vectors
            raise RequestError(f"{len(entries)} entries but {len(vectors)} vectors", "vectors")
        vecs = [_as_vector(v, self.dimension) for v in vectors]
        with self._entries.transact():
            for entry in entries:
                expire = _ttl_of(entry)
                self._entries.set(entry.key, _dump(dataclasses.asdict(entry)), expire=expire, tag=entry.namespace)
        with self._meta.transact():
            for entry, vec in zip(entries, vecs, strict=False):
                seq = self._meta.incr("seq")
                self._meta.set(("vec", entry.key), (seq, entry.scope, vec.tobytes()))
                self._meta.set(("log", seq), entry.key)
                if seq % 1000 == 0:
                    self._prune_log(seq)
            self._meta.incr(("stat", "puts"), len(entries))

    def search(self, scope: str, vector: np.ndarray, k: int, now: float) -> list[Hit]:
        self._unless_closed()
        vec = _as_vector(vector, self.dimension)
        with self._lock, self._damage_is_typed():
            self._sync()
            scoped = self._indexes.get(scope)
            if scoped is None or scoped.index.ntotal == 0:
                return []
            want = min(scoped.index.ntotal, max(k * 4, 16))
            scores, ids = scoped.index.search(vec[None, :], want)
            candidates = [(float(s), scoped.keys.get(int(i))) for s, i in zip(scores[0], ids[0], strict=False) if i >= 0]
        hits: list[Hit] = []
        seen: set[str] = set()
        stale = 0
        for score, key in candidates:
            if key is None or key in seen:
                continue
            seen.add(key)
            record = self._record(key)
            if record is _REFUSED:
                break  # the disk refuses writes: the rest of the candidates would fail alike
            entry = self._entry(key, record) if record is not None else None
            if entry is None:
                stale += 1
                continue
            if entry.scope != scope or (entry.expires_at is not None and now > entry.expires_at):
                continue
            hits.append(Hit(entry=entry, similarity=score))
            if len(hits) >= k:
                break
        if stale:
            with self._lock:
                self._stale += stale
        self._count("searches")
        return hits

    def invalidate(self, namespace: str) -> int:
        """Drop every entry of a namespace; their vectors go at the next rebuild."""
        self._unless_closed()
        with self._damage_is_typed():
            removed = int(self._entries.evict(namespace))
        self._count("invalidated", removed)
        return removed

    def clear(self) -> None:
        """Drop everything; other processes see the new epoch and rebuild (empty) indexes."""
        self._unless_closed()
        self._entries.clear()
        with self._meta.transact():
            for key in list(self._meta.iterkeys()):
                if isinstance(key, tuple) and key[0] in ("vec", "log"):
                    self._meta.delete(key)
            self._meta.incr("epoch")
        with self._lock:
            self._sync()

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + amount
            due = time.monotonic() - self._counts_flushed > 5.0 or sum(self._counts.values()) >= 200
        if due:
            self._flush_counts()

    def _flush_counts(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
            self._counts_flushed = time.monotonic()
        if counts:
            try:
                with self._meta.transact():
                    for name, amount in counts.items():
                        self._meta.incr(("stat", name), amount)
            except (sqlite3.OperationalError, OSError) as exc:  # a full or read-only disk: counters are a hint
                logger.warning("the cache in %s cannot update its counters: %s", self.directory, exc)

    def stats(self) -> dict[str, Any]:
        """Entries, bytes, vectors, and hit/miss counts summed over every process that used the store."""
        self._unless_closed()
        self._flush_counts()
        with self._lock:
            self._sync()
            vectors = sum(s.index.ntotal for s in self._indexes.values())
            scopes = len(self._indexes)
        stat = {name: int(self._meta.get(("stat", name), 0)) for name in ("hits", "misses", "puts", "searches", "invalidated")}
        return {
            "store": "local",
            "entries": len(self._entries),
            "bytes": int(self._entries.volume()),
            "size_limit": self.size_bytes,
            "vectors": vectors,
            "scopes": scopes,
            "index": self.index_type,
            **stat,
        }

    @contextlib.contextmanager
    def single_flight(self, key: str) -> Iterator[None]:
        """One caller at a time per key: first in this process (a lock per key), then across processes
        (an flock on one of a fixed set of lock files; the kernel releases it if the holder dies)."""
        self._unless_closed()
        with self._flight_guard:
            slot = self._flights.setdefault(key, [threading.Lock(), 0])
            slot[1] += 1
        acquired = slot[0].acquire(timeout=self.lock_timeout)
        try:
            path = self.directory / "locks" / lock_file(key)
            handle = None
            try:
                path.parent.mkdir(exist_ok=True)
                handle = open(path, "a+")  # noqa: SIM115 - closed by the `with` below
            except OSError as exc:
                # A full or read-only disk: no answer can be stored for another process to find, so the call
                # goes on locked in this process only, as a lookup there is a miss (not a failed call).
                logger.warning("the cache in %s cannot take its lock file: %s; the call goes on", self.directory, exc)
            if handle is None:
                yield
                return
            with handle:
                locked = _flock(handle.fileno(), self.lock_timeout)
                try:
                    yield
                finally:
                    if locked:
                        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        finally:
            if acquired:
                slot[0].release()
            with self._flight_guard:
                slot[1] -= 1
                if slot[1] == 0:
                    self._flights.pop(key, None)

    def _after_fork_in_child(self) -> None:
        """In a forked child (gunicorn --preload, multiprocessing's fork) the parent's flights are the parent's:
        their per-key locks, held through a whole backend call, made the child's calls for those keys wait
        lock_timeout each, for ever; the index lock, held by a thread indexing at the fork, would hang it."""
        self._lock = threading.RLock()
        self._flight_guard = threading.Lock()
        self._flights = {}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._flush_counts()
        with self._lock:
            with contextlib.suppress(Exception):
                self._sync()
                self._save_snapshot()
        self._entries.close()
        self._meta.close()

    def _unless_closed(self) -> None:
        # diskcache reopens a closed cache at its next use: a store used after close() held three more open files
        # (its SQLite database, WAL and shared memory) that nothing closed again
        if self._closed:
            raise ConfigurationError(f"the LocalStore in {self.directory} is closed")

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _entry(self, key: str, record: str) -> CacheEntry | None:
        """The stored entry; None, dropping it, when its record is damaged (diskcache keeps a long answer in a
        file of its own, written without fsync: a crash can leave it cut short while its row survives). A
        cache miss then, not a failed call for every later request like it."""
        try:
            return _entry_from(record)
        except (ValueError, TypeError) as exc:
            logger.warning("the cache in %s holds a damaged entry %s (%s); dropped", self.directory, key[:16], exc)
            with contextlib.suppress(sqlite3.Error, OSError):
                self._entries.delete(key)
            return None

    def _record(self, key: str) -> Any:
        """The entry's stored record; None when there is none; _REFUSED when the disk refuses writes (full,
        turned read-only): diskcache records every read for its LRU, and raised "database or disk is full" for a
        lookup, failing the call. A miss then, as a PostgresStore lookup is when its server is away."""
        import diskcache

        with self._damage_is_typed():
            try:
                return self._entries.get(key)
            except (sqlite3.OperationalError, diskcache.Timeout) as exc:  # Timeout: refused at BEGIN, or locked
                logger.warning("the cache in %s cannot be read: %s; a lookup is a miss", self.directory,
                               exc or type(exc).__name__)
                return _REFUSED

    def _damage_is_typed(self) -> contextlib.AbstractContextManager[None]:
        """A damaged page found after the store opened (a power cut): the error open gives, not sqlite3's."""
        return damage_reported(f"the cache in {self.directory}", _REMEDY)

    def _check_dimension(self) -> None:
        """The directory keeps the dimension of its vectors: opening it with another one (a new embedding
        model) is a configuration error, not an AssertionError from FAISS on every search."""
        stored = self._meta.get("dimension")
        if stored is None:
            for key in self._meta.iterkeys():  # a store written before the dimension was recorded
                if isinstance(key, tuple) and key[0] == "vec":
                    record = self._meta.get(key)
                    if record is not None:
                        stored = len(record[2]) // 4
                        break
            self._meta.add("dimension", stored if stored is not None else self.dimension)
            stored = self._meta.get("dimension")
        if int(stored) != self.dimension:
            self._entries.close()
            self._meta.close()
            raise ConfigurationError(
                f"the cache in {self.directory} holds {stored}-dimensional vectors but was opened with "
                f"dimension={self.dimension}; use another directory for another embedding model"
            )

    # -- the in-memory index ------------------------------------------------------------------------
    def _new_index(self) -> Any:
        return new_index(self.dimension, self.index_type, self.hnsw_m)

    def _add_many(self, rows: list[tuple[int, str, str, np.ndarray]]) -> None:
        by_scope: dict[str, list[tuple[int, str, np.ndarray]]] = {}
        for seq, scope, key, vec in rows:
            if vec.any():  # an all-zero vector marks an exact-only entry: found by key, never by search
                by_scope.setdefault(scope, []).append((seq, key, vec))
        for scope, items in by_scope.items():
            scoped = self._indexes.get(scope)
            if scoped is None:
                scoped = self._indexes[scope] = _ScopeIndex(self._new_index(), {})
            scoped.index.add_with_ids(np.stack([v for _, _, v in items]), np.array([s for s, _, _ in items], dtype=np.int64))
            scoped.keys.update((s, k) for s, k, _ in items)
            self._vectors += len(items)
        self._since_snapshot += len(rows)

    def _sync(self) -> None:
        """Bring this process's indexes up to date with what every process has written."""
        epoch = int(self._meta.get("epoch", 0))
        if epoch != self._epoch:
            self._rebuild(epoch)
            return
        seq = int(self._meta.get("seq", 0))
        if seq > self._seq:
            floor = int(self._meta.get("log_floor", 0))
            if self._seq < floor:
                self._rebuild(epoch)
                return
            rows = []
            for s in range(self._seq + 1, seq + 1):
                key = self._meta.get(("log", s))
                vec_record = self._meta.get(("vec", key)) if key is not None else None
                if vec_record is None or vec_record[0] != s:
                    continue  # overwritten by a later put of the same key, or cleared
                rows.append((s, vec_record[1], key, np.frombuffer(vec_record[2], dtype=np.float32)))
            if rows:
                self._add_many(rows)
                # Evicted, expired and replaced entries leave their vectors behind (diskcache culls
                # without telling): compact once they outnumber the live entries, so that meta/ and the
                # in-memory indexes stay within a small multiple of what `size_bytes` admits.
                if self._vectors > 2 * len(self._entries) + 1024:
                    self._rebuild(epoch)
                    return
            self._seq = seq
        # Counting the vectors visits every scope: only when enough are stale to consider a rebuild.
        if self._stale > 1000 and self._stale > sum(s.index.ntotal for s in self._indexes.values()) // 2:
            self._rebuild(epoch)
        elif self._since_snapshot >= _SNAPSHOT_EVERY:
            self._save_snapshot()

    def _rebuild(self, epoch: int) -> None:
        """Rebuild every index from the vectors in meta/, dropping those whose entry is gone."""
        seq = int(self._meta.get("seq", 0))
        self._indexes = {}
        self._vectors = 0
        rows = []
        dead = []
        for key in self._meta.iterkeys():
            if not (isinstance(key, tuple) and key[0] == "vec"):
                continue
            record = self._meta.get(key)
            if record is None or record[0] > seq:
                continue  # written after we read `seq`: the next sync picks it up
            if key[1] not in self._entries:
                dead.append((key, record[0]))
                continue
            rows.append((record[0], record[1], key[1], np.frombuffer(record[2], dtype=np.float32)))
        for start in range(0, len(rows), 50_000):
            self._add_many(rows[start : start + 50_000])
        try:
            for key, s in dead:  # compaction; a concurrent re-put of the key wrote a newer seq: keep it
                with self._meta.transact():
                    current = self._meta.get(key)
                    if current is not None and current[0] == s:
                        self._meta.delete(key)
        except sqlite3.OperationalError as exc:  # a full or read-only disk: the dead vectors stay until later
            logger.warning("the cache in %s cannot drop stale vectors: %s", self.directory, exc)
        self._seq = seq
        self._epoch = epoch
        self._stale = 0
        self._save_snapshot()

    def _prune_log(self, seq: int) -> None:
        floor = int(self._meta.get("log_floor", 0))
        new_floor = seq - _LOG_KEEP
        if new_floor <= floor:
            return
        for s in range(floor + 1, new_floor + 1):
            self._meta.delete(("log", s))
        self._meta.set("log_floor", new_floor)

    # -- snapshots ----------------------------------------------------------------------------------
    def _snapshot_path(self) -> Path:
        return self.directory / "faiss" / f"snapshot-{self.index_type}.npz"

    def _save_snapshot(self) -> None:
        """Write the indexes atomically (temp file + rename): a reader sees the old snapshot or the new."""
        import faiss

        arrays: dict[str, np.ndarray] = {}
        scopes: list[dict[str, Any]] = []
        manifest = {"seq": self._seq, "epoch": self._epoch, "scopes": scopes}
        for n, (scope, scoped) in enumerate(self._indexes.items()):
            arrays[f"index{n}"] = faiss.serialize_index(scoped.index)
            ids = np.fromiter(scoped.keys.keys(), dtype=np.int64, count=len(scoped.keys))
            arrays[f"ids{n}"] = ids
            scopes.append({"scope": scope, "keys": list(scoped.keys.values())})
        arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
        path = self._snapshot_path()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)  # type: ignore[arg-type]
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            # A full or read-only disk: the snapshot is only a shortcut (the vectors are in meta/), so a lookup
            # goes on; raised, it failed every search, each one leaving a partial temp file on the full disk.
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            logger.warning("the cache in %s cannot save its index snapshot (%s); the next process rebuilds it",
                           self.directory, exc)
        self._since_snapshot = 0  # tried: not again until as many new vectors have come

    def _load(self) -> None:
        """Start from the snapshot when it is usable, then catch up from the log; else rebuild."""
        import faiss

        epoch = int(self._meta.get("epoch", 0))
        path = self._snapshot_path()
        try:
            with np.load(path) as data:
                manifest = json.loads(bytes(data["manifest"]).decode())
                if manifest["epoch"] != epoch or manifest["seq"] < int(self._meta.get("log_floor", 0)):
                    raise ValueError("snapshot is stale")
                if manifest["seq"] > int(self._meta.get("seq", 0)):
                    raise ValueError("snapshot is newer than the store")  # the store was replaced
                indexes = {}
                for n, info in enumerate(manifest["scopes"]):
                    index = faiss.deserialize_index(data[f"index{n}"])
                    ids = data[f"ids{n}"]
                    indexes[info["scope"]] = _ScopeIndex(index, dict(zip(ids.tolist(), info["keys"], strict=False)))
        except Exception:  # noqa: BLE001 - missing, stale or unreadable (OSError, ValueError, BadZipFile on a
            # truncated file, EOFError on an empty one, RuntimeError from FAISS): the vectors are in meta/
            self._rebuild(epoch)
            return
        self._indexes = indexes
        self._vectors = sum(scoped.index.ntotal for scoped in indexes.values())
        self._seq = manifest["seq"]
        self._epoch = epoch
        self._since_snapshot = 0
        self._sync()


def lock_file(key: str) -> str:
    """The single-flight lock file of a key, relative to locks/."""
    stripe = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % _LOCK_STRIPES
    return f"{stripe >> 8:02x}/{stripe & 0xFF:02x}.lock"


def _flock(fd: int, timeout: float) -> bool:
    """Take an exclusive flock, waiting up to `timeout` seconds; False if it could not be had."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False  # a stuck holder must not stall the caller forever: go on unlocked
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def _as_vector(vector: np.ndarray, dimension: int) -> np.ndarray:
    vec = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(-1))
    if vec.shape[0] != dimension:
        raise ValueError(f"vector has {vec.shape[0]} dimensions, the store holds {dimension}")
    return vec


def _ttl_of(entry: CacheEntry) -> float | None:
    """The entry's lifetime, for diskcache's own expiry (a backstop that frees space: `get` and `search`
    judge expiry by the caller's `now`, so entries written with a test clock behave the same)."""
    if entry.expires_at is None:
        return None
    return max(entry.expires_at - entry.created_at, 0.001)


def _remove_orphan_values(folder: Path, older_than_s: float = _ORPHAN_AFTER_S) -> int:
    """Delete the value files of a diskcache in `folder` that no row names, once older than `older_than_s`; how
    many went. A writer killed between writing a long answer's file and committing its row left the file for
    good: outside diskcache's size accounting, so the cache grew past size_bytes with every such crash."""
    import diskcache

    cutoff = time.time() - older_than_s
    old = set()
    for path in folder.glob("*/*/*.val"):  # listed before the rows are read: a file named since is young
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                old.add(path.relative_to(folder).as_posix())
    if not old:
        return 0
    try:
        with contextlib.closing(sqlite3.connect(folder / diskcache.core.DBNAME, timeout=60)) as db:
            named = {row[0] for row in db.execute("SELECT filename FROM Cache WHERE filename IS NOT NULL")}
    except sqlite3.Error as exc:  # busy past the timeout, or worse: the store's own reads will say; sweep next time
        logger.warning("the cache in %s: leftover value files not swept (%s)", folder, exc)
        return 0
    orphans = old - named
    for name in orphans:
        with contextlib.suppress(OSError):
            (folder / name).unlink()
    return len(orphans)


def _dump(record: dict[str, Any]) -> str:
    # JSON text, not a pickle: diskcache sizes text rows exactly, and its LRU cull misbehaved with
    # pickled dicts (it emptied the whole cache); JSON is also readable by any other tool.
    return json.dumps(record, separators=(",", ":"), default=str)


def _entry_from(record: str) -> CacheEntry:
    return CacheEntry(**json.loads(record))
