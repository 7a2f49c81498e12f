"""The shared cache store: PostgreSQL + pgvector, for many application replicas using one cache.

PostgresStore implements the CacheStore protocol of `store.py` with the same semantics as the local
store, with state kept in the database so that every replica sees the same entries, LRU order and
statistics:

- `{prefix}_entries`: one row per entry, the vector in a pgvector column with an HNSW index (cosine).
- `{prefix}_access`: last access time per entry. Kept apart from the entries so that a read touches a
  small row instead of rewriting the entry row, which would re-insert it into the HNSW index on every hit.
- `{prefix}_meta`: the running total of stored bytes. Every write transaction locks this row first, so
  writers are serialized (cache writes follow a model call; they are rare next to reads) and the byte
  count and LRU eviction stay exact without scanning the table.
- `{prefix}_stats`: hit/miss/put/eviction counters, spread over a few slots per name so that concurrent
  readers on many replicas do not queue on one hot row.

Single-flight across replicas uses a session-level PostgreSQL advisory lock on a dedicated connection: if
the process holding it dies, its session ends and the lock is released, so waiters never hang on a dead
replica.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import select
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import numpy as np

from ...errors import CacheStoreUnavailable, ConfigurationError, RequestError
from ...forking import renew_after_fork
from ...postgres import Outage, error_line, is_server_lost, redact_dsn, statement_watchdog
from ...settings import number_between, positive_seconds, whole_number
from .store import CacheEntry, Hit

logger = logging.getLogger(__name__)

DEFAULT_SIZE_BYTES = 1 << 30  # 1 GiB
_STATS_SLOTS = 8  # counter rows per name; more slots = less row contention, a slightly larger sum
_EVICT_BATCH = 256
# How long a put waits for another writer's transaction before giving up. A put is on its call's way (the
# answer returns after it), and its client-side bound, which is all a frozen server leaves, grows with this.
_PUT_LOCK_TIMEOUT_MS = 2_000
_PREFIX_RE = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
# pgvector's errors for a vector of another dimension than the column's (on a write, on a comparison)
_DIMENSIONS_RE = re.compile(r"expected (\d+) dimensions, not (\d+)|different vector dimensions (\d+) and (\d+)")
_ENTRY_COLUMNS = ("key", "scope", "namespace", "query_text", "response", "features", "created_at", "expires_at",
                  "size_bytes", "embedding")
_COUNTERS = (
    "hits", "misses", "search_hits", "search_misses", "puts", "evictions", "expired_purged",
    "invalidated", "rejected_too_large", "single_flight_waits", "single_flight_timeouts",
)


class _ConnectionPool:
    """A small thread-safe pool: a connection is used by one thread at a time, never shared."""

    def __init__(self, dsn: str, max_size: int, configure: Any, connect_kwargs: dict[str, Any] | None = None) -> None:
        self._dsn = dsn
        self._connect_kwargs = dict(connect_kwargs or {})
        self._configure = configure
        self._max_size = max_size
        self._idle: list[Any] = []
        self._open = 0
        self._cond = threading.Condition()
        self._pid = os.getpid()
        self._closed = False
        # Connections inherited through fork belong to the parent's sessions: closing them here would end
        # the parent's sessions too, so they are parked (never used, never closed) after a fork.
        self._inherited: list[Any] = []
        self._generation = 0  # bumped by retire: a session checked out before it is closed when it comes back

    def after_fork_in_child(self) -> None:
        """A condition another thread held at the fork would stay held in the child for ever."""
        self._cond = threading.Condition()
        self._after_fork()

    def _after_fork(self) -> None:
        if os.getpid() != self._pid:
            self._inherited.extend(self._idle)
            self._idle, self._open, self._pid = [], 0, os.getpid()

    def _connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(self._dsn, autocommit=True, **self._connect_kwargs)
        try:
            self._configure(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def connection(self, wait: bool = True) -> Iterator[Any]:
        """A connection for this thread; with wait=False, None at once when all `max_size` are in use."""
        with self._cond:
            if self._closed:
                raise ConfigurationError("the PostgresStore is closed")
            self._after_fork()
            while wait and not self._idle and self._open >= self._max_size:
                self._cond.wait()
            full = not self._idle and self._open >= self._max_size
            conn = None
            generation = self._generation
            if not full:
                conn = self._idle.pop() if self._idle else None
                if conn is None:
                    self._open += 1
        if full:
            yield None
            return
        try:
            if conn is not None and not (conn.closed or conn.broken) and _dropped(conn):
                conn.close()  # the server ended it while it sat idle: a restart, a failover, a timeout
            if conn is None or conn.closed or conn.broken:
                conn = self._connect()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise
        try:
            yield conn
        finally:
            with self._cond:
                if os.getpid() != self._pid:
                    pass  # a fork happened while this was checked out; the child must not reuse it
                elif conn.closed or conn.broken or self._closed or generation != self._generation:
                    self._open -= 1
                    conn.close()
                else:
                    self._idle.append(conn)
                self._cond.notify()

    @property
    def generation(self) -> int:
        """How many times retire ran: a session opened before the count moved belongs to a past outage."""
        return self._generation

    def retire(self) -> None:
        """Replace every session opened so far: the idle ones now, the ones in use when they come back. After a
        session stopped answering, the others may be as dead (a frozen server, a failover that cut the old
        primary off without a reset) and would cost a call a timeout each once the server is back."""
        with self._cond:
            self._generation += 1
            stale, self._idle = self._idle, []
            self._open -= len(stale)
            self._cond.notify_all()
            if os.getpid() != self._pid:
                return  # the parent's sessions: parked by _after_fork, never closed here
        for conn in stale:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            if os.getpid() == self._pid:
                for conn in self._idle:
                    conn.close()
            self._idle = []
            self._cond.notify_all()


def _dropped(conn: Any) -> bool:
    """Whether the server has ended an idle connection: its socket has something to read (the server's
    termination notice, or end of file) although no query is running. psycopg only finds out on the next
    query, which would then fail the call that took the connection from the pool."""
    try:
        fd = conn.fileno()
        if hasattr(select, "poll"):  # select.select refuses descriptors >= FD_SETSIZE (1024): a busy process has them
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
            return bool(poller.poll(0))
        readable, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class PostgresStore:
    """CacheStore on PostgreSQL + pgvector, shared by every process that opens the same `dsn` and prefix.

    `size_bytes` bounds the stored bytes (entry text, JSON and vector); beyond it the least recently used
    entries are evicted in the writing transaction. `namespace_ttl` maps a namespace to a time-to-live in
    seconds, on top of each entry's own `expires_at`; it is applied when reading (so it holds for entries
    written by replicas configured without it) and baked into `expires_at` when writing.
    `single_flight_timeout_s` bounds how long a caller waits for another's answer before computing it
    itself: a hung replica must not stall every other one.
    A server that stops answering or goes away costs one call its timeout (`connect_timeout_s`, or
    `statement_timeout_s` plus 2 s for a session that stopped answering) and one ERROR in the log; until it is
    back every call skips the cache at once (a miss, an answer not stored, no single-flight wait) while a
    background thread tries to reconnect, at least every `retry_s` seconds.
    """

    def __init__(
        self,
        dsn: str,
        *,
        table_prefix: str = "ctxkit_cache",
        dimension: int = 384,
        size_bytes: int = DEFAULT_SIZE_BYTES,
        namespace_ttl: dict[str, float] | None = None,
        pool_size: int = 4,
        ef_search: int = 100,
        single_flight_timeout_s: float = 120.0,
        lock_pool_size: int = 16,
        statement_timeout_s: float = 2.0,
        connect_timeout_s: float = 2.0,
        retry_s: float = 10.0,
    ) -> None:
        if not _PREFIX_RE.match(table_prefix):
            raise ConfigurationError(f"table_prefix must match {_PREFIX_RE.pattern}, got {table_prefix!r}")
        # The settings helpers' checks: a bool is no number here (True was a dimension of 1 and a 1 s timeout),
        # a string a ConfigurationError naming the setting, not a TypeError, and a negative single-flight
        # timeout no longer waits for ever.
        dimension = whole_number(dimension, "dimension", minimum=1)
        if dimension > 2000:
            raise ConfigurationError(f"dimension must be in 1..2000 (pgvector's HNSW limit), got {dimension}")
        size_bytes = whole_number(size_bytes, "size_bytes", minimum=1)
        pool_size = whole_number(pool_size, "pool_size", minimum=1)
        lock_pool_size = whole_number(lock_pool_size, "lock_pool_size", minimum=1)
        statement_timeout_s = positive_seconds(statement_timeout_s, "statement_timeout_s")
        connect_timeout_s = positive_seconds(connect_timeout_s, "connect_timeout_s")
        retry_s = positive_seconds(retry_s, "retry_s")
        single_flight_timeout_s = number_between(single_flight_timeout_s, "single_flight_timeout_s (0: never wait)",
                                                 0, threading.TIMEOUT_MAX)
        ef_search = whole_number(ef_search, "ef_search", minimum=1)
        if ef_search > 1000:
            raise ConfigurationError(f"ef_search must be in 1..1000, got {ef_search}")
        ttl = dict(namespace_ttl or {})
        for ns, seconds in ttl.items():
            if isinstance(seconds, bool) or not (isinstance(seconds, (int, float)) and seconds > 0 and math.isfinite(seconds)):
                raise ConfigurationError(f"namespace_ttl[{ns!r}] must be a positive number of seconds, got {seconds!r}")
        try:
            import psycopg  # noqa: F401
            from pgvector.psycopg import register_vector  # noqa: F401
        except ImportError:
            raise ConfigurationError("the shared cache store needs: pip install 'ctxkit[postgres]'") from None

        self.dsn = dsn
        self.table_prefix = table_prefix
        self.dimension = dimension
        self.size_bytes = size_bytes
        self.namespace_ttl = ttl
        self.ef_search = ef_search
        self.single_flight_timeout_s = single_flight_timeout_s
        self.statement_timeout_s = statement_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._t = {name: f"{table_prefix}_{name}" for name in ("entries", "access", "meta", "stats")}
        self._ensure_schema()
        self._pool = _ConnectionPool(dsn, pool_size, self._configure_connection, self._connect_kwargs())
        self._outage = Outage("the cache's PostgreSQL",
                              partial(_probe, dsn, self._connect_kwargs(), self._lookup_deadline_s()), retry_s, logger)
        weakref.finalize(self, self._outage.close)  # a store dropped during an outage ends its reconnecting thread
        self._sf_guard = threading.Lock()
        self._sf_locks: dict[str, list[Any]] = {}  # key -> [threading.Lock, number of users]
        # Advisory locks are taken with pg_try_advisory_lock on one shared session (a session holds any
        # number of them; it is kept apart from the pool, whose sessions callers need to write answers) and
        # waited for by polling: identical requests on two replicas wait for one answer however many other
        # keys are in flight, on one session per process (`lock_pool_size` is accepted and no longer used).
        self._holder: Any = None
        self._holder_pid = os.getpid()
        self._holder_gen = 0
        # The pool's generation when the holder opened: once an outage retires the pool, the holder may be as dead
        # as the session that found it. A count, not a flag the next flight clears: a flag set while a flight was
        # between reading and clearing it was lost, and the stale holder cost a call its timeout after the outage.
        self._holder_pool_gen = self._pool.generation
        self._holder_guard = threading.Lock()
        self._mismatch_reported = False
        renew_after_fork(self, PostgresStore._after_fork_in_child)

    # ---- setup -------------------------------------------------------------------------------------

    def _connect_kwargs(self) -> dict[str, Any]:
        """libpq waits for a connection without end by default: a server that accepts no more (frozen, or
        unreachable after a failover) would hold every request. The DSN's or PGCONNECT_TIMEOUT's value wins."""
        import psycopg

        if "connect_timeout" in psycopg.conninfo.conninfo_to_dict(self.dsn) or os.environ.get("PGCONNECT_TIMEOUT"):
            return {}
        return {"connect_timeout": max(2, math.ceil(min(self.connect_timeout_s, 3600.0)))}  # libpq: 2 s at least

    def _lookup_deadline_s(self) -> float:
        # the server's statement_timeout fires first while the server answers; this is the backstop
        return self.statement_timeout_s + 2.0

    def _configure_connection(self, conn: Any) -> None:
        from pgvector.psycopg import register_vector

        register_vector(conn)
        conn.execute(f"SET hnsw.ef_search = {int(self.ef_search)}")
        # A lookup on a call's way must not wait without end behind a lock (VACUUM FULL, REINDEX, a
        # migration's ALTER TABLE) or a stuck query: past this it is a miss, as when the server is down.
        conn.execute(f"SET statement_timeout = {self._statement_timeout_ms()}")
        # Lookups write an LRU time and a counter; they need not wait for the disk (losing the last
        # touches in a database crash costs nothing). Writes of entries turn durability back on.
        conn.execute("SET synchronous_commit = off")

    def _ensure_schema(self) -> None:
        import psycopg

        t = self._t
        try:
            conn = psycopg.connect(self.dsn, autocommit=True, **self._connect_kwargs())
        except (psycopg.OperationalError, psycopg.ProgrammingError) as exc:  # ProgrammingError: a malformed DSN
            message = redact_dsn(str(exc), self.dsn)  # libpq may quote the password; and no chained traceback shows it
            raise ConfigurationError(f"cannot connect to PostgreSQL for the cache store: {message}") from None
        with conn:
            names = [t[n] for n in ("entries", "access", "meta", "stats")] + [f"{t['entries']}_hnsw"]
            found = conn.execute("SELECT count(to_regclass(n)) FROM unnest(%s::text[]) AS n", (names,)).fetchone()
            present = found[0] if found is not None else 0
            with conn.transaction():
                # Concurrent CREATE ... IF NOT EXISTS can still collide in the catalog: serialize creators.
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('ctxkit_cache:schema'))")
                has_vector = present == len(names) or conn.execute(
                    "SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone()
                if not has_vector:
                    try:
                        with conn.transaction():
                            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                    except psycopg.Error as exc:
                        raise ConfigurationError(
                            f"the pgvector extension is missing and could not be created ({exc}); "
                            "ask the database owner to run: CREATE EXTENSION vector"
                        ) from exc
                if present < len(names):  # else a replica opens a read-only database too (a standby)
                    conn.execute(
                        f"""CREATE TABLE IF NOT EXISTS {t['entries']} (
                            key text PRIMARY KEY,
                            scope text NOT NULL,
                            namespace text NOT NULL,
                            query_text text NOT NULL,
                            response json NOT NULL,
                            features json NOT NULL,
                            created_at double precision NOT NULL,
                            expires_at double precision,
                            size_bytes bigint NOT NULL,
                            embedding vector({int(self.dimension)}) NOT NULL)"""
                    )
                    conn.execute(
                        f"""CREATE TABLE IF NOT EXISTS {t['access']} (
                            key text PRIMARY KEY REFERENCES {t['entries']} (key) ON DELETE CASCADE,
                            last_access double precision NOT NULL)"""
                    )
                    conn.execute(f"CREATE TABLE IF NOT EXISTS {t['meta']} (name text PRIMARY KEY, value bigint NOT NULL)")
                    conn.execute(
                        f"""CREATE TABLE IF NOT EXISTS {t['stats']} (
                            name text NOT NULL, slot int NOT NULL, value bigint NOT NULL, PRIMARY KEY (name, slot))"""
                    )
                    conn.execute(f"CREATE INDEX IF NOT EXISTS {t['entries']}_scope ON {t['entries']} (scope)")
                    conn.execute(f"CREATE INDEX IF NOT EXISTS {t['entries']}_namespace ON {t['entries']} (namespace)")
                    conn.execute(f"CREATE INDEX IF NOT EXISTS {t['entries']}_expires ON {t['entries']} (expires_at)")
                    conn.execute(
                        f"CREATE INDEX IF NOT EXISTS {t['entries']}_hnsw ON {t['entries']} "
                        "USING hnsw (embedding vector_cosine_ops)"
                    )
                    conn.execute(f"CREATE INDEX IF NOT EXISTS {t['access']}_lru ON {t['access']} (last_access, key)")
                    conn.execute(
                        f"INSERT INTO {t['meta']} (name, value) "
                        f"SELECT 'bytes', COALESCE(sum(size_bytes), 0) FROM {t['entries']} ON CONFLICT (name) DO NOTHING"
                    )
                row = conn.execute(
                    "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                    "WHERE attrelid = %s::regclass AND attname = 'embedding'",
                    (t["entries"],),
                ).fetchone()
                columns = {r[0] for r in conn.execute(
                    "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
                    (t["entries"],),
                ).fetchall()}
        missing = sorted(set(_ENTRY_COLUMNS) - columns)
        if missing:  # else every lookup and write fails with an UndefinedColumn that fails the model call
            raise ConfigurationError(
                f"table {t['entries']} was not made by this version of ctxkit (it lacks {', '.join(missing)}); "
                "use another table_prefix, or drop the old tables"
            )
        if row is None or row[0] != f"vector({self.dimension})":
            raise ConfigurationError(
                f"table {t['entries']} holds {row[0] if row else 'no'} embeddings but this store was opened "
                f"with dimension={self.dimension}; use another table_prefix or the same dimension"
            )

    # ---- helpers -----------------------------------------------------------------------------------

    def _vector(self, vector: np.ndarray, *, exact_only_allowed: bool = False) -> np.ndarray:
        """A stored vector may be all zeros: an exact-only entry (no question text to embed, such as a
        step that ends in a tool result), found by its key and never by search. pgvector leaves it out
        of the HNSW index and gives it a NaN distance, which `search` drops. A search vector may not."""
        v = np.asarray(vector, dtype=np.float32)
        if v.ndim == 2 and v.shape[0] == 1:
            v = v[0]
        if v.shape != (self.dimension,):
            raise RequestError(f"expected a vector of shape ({self.dimension},), got {v.shape}", "vector")
        if not np.all(np.isfinite(v)):
            raise RequestError("the vector must be finite", "vector")
        if not exact_only_allowed and not np.any(v):
            raise RequestError("the search vector must be non-zero (cosine distance is undefined)", "vector")
        return v

    def _ttl_clause(self, now: float) -> tuple[str, dict[str, Any]]:
        """SQL that keeps only unexpired rows of alias `e`, by entry TTL and by this store's namespace TTLs."""
        clause = "(e.expires_at IS NULL OR e.expires_at >= %(now)s)"
        params: dict[str, Any] = {"now": now}
        if self.namespace_ttl:
            clause += (
                " AND e.created_at + COALESCE((SELECT t.ttl FROM unnest(%(ttl_ns)s::text[], %(ttl_s)s::float8[])"
                " AS t(ns, ttl) WHERE t.ns = e.namespace), 'Infinity'::float8) >= %(now)s"
            )
            params["ttl_ns"] = list(self.namespace_ttl)
            params["ttl_s"] = [float(s) for s in self.namespace_ttl.values()]
        return clause, params

    @staticmethod
    def _entry(row: tuple[Any, ...]) -> CacheEntry:
        key, scope, namespace, query_text, response, features, created_at, expires_at = row[:8]
        return CacheEntry(
            key=key, scope=scope, namespace=namespace, query_text=query_text, response=response,
            created_at=created_at, expires_at=expires_at, features=features,
        )

    _COLUMNS = "e.key, e.scope, e.namespace, e.query_text, e.response, e.features, e.created_at, e.expires_at"

    def _count(self, conn: Any, name: str, n: int = 1) -> None:
        if n:
            conn.execute(
                f"INSERT INTO {self._t['stats']} AS s (name, slot, value) VALUES (%s, %s, %s) "
                "ON CONFLICT (name, slot) DO UPDATE SET value = s.value + EXCLUDED.value",
                (name, random.randrange(_STATS_SLOTS), n),
            )

    def _read_with_bookkeeping(self, conn: Any, select: str, params: dict[str, Any], hit: str, miss: str) -> list[Any]:
        """Run `select` (a CTE body yielding rows with a `key` column) and, in the same statement, touch
        the LRU time of the rows it returns and count a hit or a miss: one round trip per lookup.

        The touch skips rows a writer holds (an LRU time is a hint, not worth a wait or a deadlock), and
        the connection does not wait for the commit to reach disk (see `_configure_connection`).
        """
        t = self._t
        sql = f"""WITH found AS ({select}),
            touched AS (
                UPDATE {t['access']} SET last_access = GREATEST(last_access, %(now)s)
                WHERE key = ANY(ARRAY(SELECT key FROM {t['access']} WHERE key = ANY(ARRAY(SELECT key FROM found))
                                      FOR UPDATE SKIP LOCKED))),
            counted AS (
                INSERT INTO {t['stats']} AS st (name, slot, value)
                SELECT CASE WHEN EXISTS (SELECT 1 FROM found) THEN %(hit)s ELSE %(miss)s END, %(slot)s, 1
                ON CONFLICT (name, slot) DO UPDATE SET value = st.value + 1)
            SELECT * FROM found"""
        import psycopg

        params = dict(params, hit=hit, miss=miss, slot=random.randrange(_STATS_SLOTS))
        with statement_watchdog(conn, self._lookup_deadline_s()):
            try:
                return list(conn.execute(sql, params).fetchall())
            # a standby, writes frozen, or a role that may only read (a reporting replica): read, without bookkeeping
            except (psycopg.errors.ReadOnlySqlTransaction, psycopg.errors.InsufficientPrivilege):
                return list(conn.execute(select, params).fetchall())

    # ---- the CacheStore protocol -------------------------------------------------------------------

    @contextmanager
    def _or_unavailable(self, what: str) -> Iterator[None]:
        """A lookup or a write on a call's way: when the server cannot be reached (down, restarting, failing
        over) the call goes on without the cache (a miss, an answer not stored), as it would without one;
        a cache must not turn a database outage into a failure of every model call."""
        import psycopg

        try:
            yield
        except (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable,
                psycopg.errors.ReadOnlySqlTransaction) as exc:
            # the server answers, this statement could not: it waited past statement_timeout behind a lock or a
            # slow query, or the database takes no writes (a failover to a standby; lookups write an LRU time)
            logger.warning("the cache's PostgreSQL did not answer in time or cannot write, %s: %s", what,
                           error_line(exc, self.dsn))
        except psycopg.OperationalError as exc:
            if is_server_lost(exc):  # the server is gone or stopped answering: logged once, later calls skip it
                self._found_away(exc)
            else:  # the server answers but refused this statement (a deadlock, a full disk, an index row too large)
                logger.warning("the cache's PostgreSQL could not run a statement, %s: %s", what, error_line(exc, self.dsn))
        except psycopg.errors.InsufficientPrivilege as exc:
            # a role that may not read or write the tables (grants changed, a reporting role): the call goes on
            logger.error("the cache's PostgreSQL refused this role, %s: %s", what, error_line(exc, self.dsn))
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn, psycopg.DataError) as exc:
            # the tables were dropped (a cache reset, a failover to a database without them) or remade by a
            # deployment with another embedding dimension: the cache is unusable here until this replica is
            # restarted, but the model call goes on without it
            mismatch = self._dimension_mismatch(exc)
            if mismatch is not None:
                self._report_mismatch(mismatch)
                return
            logger.error("the cache's tables %s_* are missing or were changed (another deployment's dimension?), "
                         "%s; restart this replica: %s", self.table_prefix, what, error_line(exc, self.dsn))

    def _found_away(self, exc: BaseException) -> None:
        """A call found the server gone: the outage begins (once), and every session opened before it is replaced."""
        self._pool.retire()  # the holder too, on its next use (not here: a flight may be using it, under _holder_guard)
        self._outage.found_away(error_line(exc, self.dsn))

    def _dimension_mismatch(self, exc: BaseException) -> str | None:
        """What is wrong when `exc` is pgvector refusing a vector of this store's dimension: the tables were remade,
        while this replica runs, by a deployment with another embedding model. None for any other error."""
        found = _DIMENSIONS_RE.search(str(exc))
        if found is None:
            return None
        theirs = sorted({int(d) for d in found.groups() if d is not None} - {self.dimension})
        return (f"table {self._t['entries']} now holds vector({theirs[0] if theirs else '?'}) embeddings but this "
                f"store was opened with dimension={self.dimension} (remade by a deployment with another embedding "
                "model?); use another table_prefix or the same dimension, and restart this replica")

    def _report_mismatch(self, mismatch: str) -> None:
        # every lookup and write meets it until a restart: told once, not at every model call
        if not self._mismatch_reported:
            self._mismatch_reported = True
            logger.error("the cache is skipped: %s", mismatch)

    @contextmanager
    def _administered(self, what: str) -> Iterator[None]:
        """An administrator's call (invalidate, clear, stats): unlike a lookup it cannot quietly do nothing, so
        an unreachable server or dropped tables are a CacheStoreUnavailable that says which and why."""
        import psycopg

        try:
            yield
        except (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction) as exc:
            reason = error_line(exc, self.dsn)
            raise CacheStoreUnavailable(f"the cache's PostgreSQL cannot be reached or cannot write: {what} was "
                                        f"not done ({reason})") from None
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
            reason = error_line(exc, self.dsn)
            raise CacheStoreUnavailable(f"the cache's tables {self.table_prefix}_* are missing or were changed: {what} "
                                        f"was not done; a new PostgresStore creates them ({reason})") from None
        except psycopg.errors.InsufficientPrivilege as exc:  # the role may read the tables, not change them
            reason = error_line(exc, self.dsn)
            raise CacheStoreUnavailable(f"the cache's PostgreSQL refused this role: {what} was not done ({reason})") \
                from None

    def get(self, key: str, now: float) -> CacheEntry | None:
        """The entry stored under exactly `key`, or None when there is none or it has expired."""
        ttl_clause, params = self._ttl_clause(now)
        select = f"SELECT {self._COLUMNS} FROM {self._t['entries']} e WHERE e.key = %(key)s AND {ttl_clause}"
        rows: list[Any] = []
        if self._outage.away:
            return None
        with self._or_unavailable("a lookup is a miss"), self._pool.connection() as conn:
            rows = self._read_with_bookkeeping(conn, select, dict(params, key=key), "hits", "misses")
        return self._entry(rows[0]) if rows else None

    def search(self, scope: str, vector: np.ndarray, k: int, now: float) -> list[Hit]:
        """Up to `k` unexpired entries of `scope` nearest to `vector`, most similar first (cosine similarity).

        The HNSW index answers first. It filters by scope after finding neighbours, so a scope that is
        rare in the whole table (or was, when the planner's statistics were taken) can come back short;
        then, in the same statement, the scope is searched exactly through its btree index, which is
        cheap precisely because such a scope is small.
        """
        if k <= 0:
            return []
        q = self._vector(vector)
        ttl_clause, params = self._ttl_clause(now)
        params.update(scope=scope, q=q, k=int(k))
        base = (
            f"SELECT {self._COLUMNS}, e.embedding <=> %(q)b AS distance FROM {self._t['entries']} e "
            f"WHERE e.scope = %(scope)s AND {ttl_clause}"
        )
        # `+ 0` hides the distance from the planner's index matching: an exact top-k within the scope,
        # run only when the index came back short (an uncorrelated condition: evaluated once, up front).
        select = f"""WITH approx AS MATERIALIZED ({base} ORDER BY e.embedding <=> %(q)b LIMIT %(k)s)
            SELECT * FROM approx WHERE (SELECT count(*) FROM approx) >= %(k)s
            UNION ALL
            (SELECT * FROM ({base} AND (SELECT count(*) FROM approx) < %(k)s
                             ORDER BY (e.embedding <=> %(q)b) + 0 LIMIT %(k)s) exact)"""
        rows: list[Any] = []
        if self._outage.away:
            return []
        with self._or_unavailable("a search finds nothing"), self._pool.connection() as conn:
            rows = self._read_with_bookkeeping(conn, select, params, "search_hits", "search_misses")
        rows = [r for r in rows if not math.isnan(r[8])]  # exact-only entries have no direction
        rows.sort(key=lambda r: (r[8], r[0]))
        return [Hit(entry=self._entry(r), similarity=float(1.0 - r[8])) for r in rows]

    def put(self, entry: CacheEntry, vector: np.ndarray) -> bool:
        """Store (or replace) `entry` in one transaction, then evict expired and least recently used
        entries until the store fits `size_bytes`. An entry larger than the whole bound is not stored, nor
        one written while the server cannot be reached (logged: the call that answered goes on).
        Returns whether it was stored (the stage notes a refused write in the call's ledger record)."""
        import psycopg

        rows, rejected = self._rows([entry], [vector])
        stored = False
        if self._outage.away:
            return stored
        with self._or_unavailable("an answer is not stored"):
            try:
                self._put_rows(rows, rejected, lock_timeout_ms=_PUT_LOCK_TIMEOUT_MS)
                stored = bool(rows)  # none: too large for the bound, or text PostgreSQL cannot hold
            except psycopg.DataError as exc:  # text PostgreSQL cannot store (a NUL character in the question)
                if self._dimension_mismatch(exc) is not None:
                    raise  # the tables were remade with another dimension: _or_unavailable tells it once
                logger.warning("the cache cannot store this answer: %s", error_line(exc, self.dsn))
            except psycopg.errors.LockNotAvailable:  # a writer frozen mid-transaction (a paused VM, a debugger)
                logger.warning("the cache's byte count stayed locked for %d ms, an answer is not stored",
                               _PUT_LOCK_TIMEOUT_MS)
        return stored

    def put_many(self, entries: list[CacheEntry], vectors: list[np.ndarray] | np.ndarray) -> None:
        """`put` for many entries in one transaction (warming a cache, moving one from another store).
        Later entries replace earlier ones with the same key."""
        if len(entries) != len(vectors):
            raise RequestError(f"{len(entries)} entries but {len(vectors)} vectors", "vectors")
        import psycopg

        try:
            self._put_rows(*self._rows(entries, vectors))
        except psycopg.DataError as exc:
            mismatch = self._dimension_mismatch(exc)
            if mismatch is None:
                raise
            raise ConfigurationError(mismatch) from None

    def _rows(self, entries: list[CacheEntry], vectors: list[np.ndarray] | np.ndarray) -> tuple[dict[str, tuple[Any, ...]], int]:
        rows: dict[str, tuple[Any, ...]] = {}
        rejected = 0
        for entry, vector in zip(entries, vectors, strict=False):
            v = self._vector(vector, exact_only_allowed=True)
            try:
                row = self._row(entry, v)
            except UnicodeEncodeError:  # a lone surrogate (a JSON "\ud83d" from a client or an upstream)
                problem = "a lone surrogate, which is not valid Unicode"
            except _NonFinite:
                problem = "a number JSON cannot hold (NaN or Infinity)"
            else:  # JSON escapes a NUL; the text columns cannot hold one
                problem = "a NUL character, which PostgreSQL text cannot hold" if any("\x00" in s for s in row[:4]) else ""
            if problem:  # as put: this entry is not stored, the others (of a put_many) are
                logger.warning("the cache cannot store the entry %r: it holds %s", entry.key[:64], problem)
                continue
            if row[8] > self.size_bytes:
                rejected += 1
            else:
                rows[entry.key] = row
        return rows, rejected

    def _put_rows(self, rows: dict[str, tuple[Any, ...]], rejected: int, lock_timeout_ms: int = 0) -> None:
        t = self._t
        # a put on a call's way is bounded on the client's side too (see statement_watchdog); put_many is not
        deadline = lock_timeout_ms / 1000 + 2 * self.statement_timeout_s + 2.0 if lock_timeout_ms else None
        with self._pool.connection() as conn, (
                statement_watchdog(conn, deadline) if deadline else contextlib.nullcontext()), conn.transaction():
            if not rows:
                self._count(conn, "rejected_too_large", rejected)
                return
            keys = list(rows)
            conn.execute("SET LOCAL synchronous_commit = on")
            conn.execute("SET LOCAL statement_timeout = 0")  # bounded by lock_timeout; put_many may be large
            if lock_timeout_ms:  # a put on a call's way must not wait forever behind a writer that stopped
                conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
            (total,) = conn.execute(f"SELECT value FROM {t['meta']} WHERE name = 'bytes' FOR UPDATE").fetchone()
            (old,) = conn.execute(
                f"SELECT COALESCE(sum(size_bytes), 0) FROM {t['entries']} WHERE key = ANY(%s)", (keys,)
            ).fetchone()
            with conn.cursor() as cur:
                cur.executemany(
                    f"""INSERT INTO {t['entries']} AS e (key, scope, namespace, query_text, response, features,
                            created_at, expires_at, size_bytes, embedding)
                        VALUES (%s, %s, %s, %s, %s::json, %s::json, %s, %s, %s, %s)
                        ON CONFLICT (key) DO UPDATE SET scope = EXCLUDED.scope, namespace = EXCLUDED.namespace,
                            query_text = EXCLUDED.query_text, response = EXCLUDED.response,
                            features = EXCLUDED.features, created_at = EXCLUDED.created_at,
                            expires_at = EXCLUDED.expires_at, size_bytes = EXCLUDED.size_bytes,
                            embedding = EXCLUDED.embedding""",
                    list(rows.values()),
                )
                cur.executemany(
                    f"INSERT INTO {t['access']} (key, last_access) VALUES (%s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET last_access = EXCLUDED.last_access",
                    [(row[0], row[6]) for row in rows.values()],
                )
            total += sum(row[8] for row in rows.values()) - old
            purged = evicted = 0
            if total > self.size_bytes:
                newest = max(row[6] for row in rows.values())
                purged, freed = self._delete_expired(conn, newest, keep=keys)
                total -= freed
            for keep in (keys, []):  # older entries first; the batch's own only if it alone is too big
                if total > self.size_bytes:
                    n, freed = self._evict_lru(conn, total - self.size_bytes, keep=keep)
                    evicted += n
                    total -= freed
            conn.execute(f"UPDATE {t['meta']} SET value = %s WHERE name = 'bytes'", (total,))
            self._count(conn, "puts", len(rows))
            self._count(conn, "rejected_too_large", rejected)
            self._count(conn, "expired_purged", purged)
            self._count(conn, "evictions", evicted)

    def _row(self, entry: CacheEntry, v: np.ndarray) -> tuple[Any, ...]:
        """The entries-table row of `entry`: namespace TTL applied, JSON encoded, its size in bytes."""
        expires_at = entry.expires_at
        ttl = self.namespace_ttl.get(entry.namespace)
        if ttl is not None:
            expires_at = min(expires_at, entry.created_at + ttl) if expires_at is not None else entry.created_at + ttl
        try:
            response = json.dumps(entry.response, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            features = json.dumps(entry.features, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except ValueError as exc:  # NaN or Infinity (a logprob of -inf from an upstream): JSON cannot hold them
            raise _NonFinite(str(exc)) from exc
        except TypeError as exc:  # an object JSON has no form for: the code that built the entry is at fault
            raise RequestError(f"the cache entry is not JSON-serializable: {exc}", "entry") from exc
        size = (
            sum(len(s.encode("utf-8")) for s in (entry.key, entry.scope, entry.namespace, entry.query_text, response, features))
            + 4 * self.dimension + 48  # the vector and the fixed-width columns
        )
        return (entry.key, entry.scope, entry.namespace, entry.query_text, response, features,
                entry.created_at, expires_at, size, v)

    def _delete_expired(self, conn: Any, now: float, keep: list[str]) -> tuple[int, int]:
        rows = conn.execute(
            f"DELETE FROM {self._t['entries']} WHERE expires_at < %s AND NOT (key = ANY(%s)) RETURNING size_bytes",
            (now, keep),
        ).fetchall()
        return len(rows), sum(r[0] for r in rows)

    def _evict_lru(self, conn: Any, excess: int, keep: list[str]) -> tuple[int, int]:
        evicted = freed = 0
        while freed < excess:
            batch = conn.execute(
                f"SELECT a.key, e.size_bytes FROM {self._t['access']} a JOIN {self._t['entries']} e USING (key) "
                "WHERE NOT (a.key = ANY(%s)) ORDER BY a.last_access, a.key LIMIT %s",
                (keep, _EVICT_BATCH),
            ).fetchall()
            if not batch:
                break
            victims = []
            for key, size in batch:
                victims.append(key)
                freed += size
                if freed >= excess:
                    break
            conn.execute(f"DELETE FROM {self._t['entries']} WHERE key = ANY(%s)", (victims,))
            evicted += len(victims)
        return evicted, freed

    def invalidate(self, namespace: str) -> int:
        """Delete every entry of `namespace`, for every replica; returns how many were deleted.
        CacheStoreUnavailable when the database cannot be reached or its tables are gone."""
        with self._administered(f"invalidating namespace {namespace!r}"), self._pool.connection() as conn, \
                conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = on")
            conn.execute("SET LOCAL statement_timeout = 0")  # an administrator's call: it may take long
            conn.execute(f"SELECT value FROM {self._t['meta']} WHERE name = 'bytes' FOR UPDATE")
            rows = conn.execute(
                f"DELETE FROM {self._t['entries']} WHERE namespace = %s RETURNING size_bytes", (namespace,)
            ).fetchall()
            conn.execute(
                f"UPDATE {self._t['meta']} SET value = value - %s WHERE name = 'bytes'", (sum(r[0] for r in rows),)
            )
            self._count(conn, "invalidated", len(rows))
        return len(rows)

    def clear(self) -> None:
        """Delete every entry of every namespace (the hit/miss counters are kept, as in LocalStore).
        CacheStoreUnavailable when the database cannot be reached or its tables are gone."""
        with self._administered("clearing the cache"), self._pool.connection() as conn, conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = on")
            conn.execute("SET LOCAL statement_timeout = 0")  # an administrator's call: it may take long
            conn.execute(f"SELECT value FROM {self._t['meta']} WHERE name = 'bytes' FOR UPDATE")
            conn.execute(f"DELETE FROM {self._t['entries']}")
            conn.execute(f"UPDATE {self._t['meta']} SET value = 0 WHERE name = 'bytes'")

    def stats(self) -> dict[str, Any]:
        """Counters shared by every replica, plus the current number of entries and stored bytes.

        `hits`/`misses` count exact lookups (`get`); `search_hits`/`search_misses` count searches that
        returned candidates or none (whether a candidate is used is the stage's decision)."""
        t = self._t
        with self._administered("reading the statistics"), self._pool.connection() as conn:
            counts = dict(conn.execute(f"SELECT name, sum(value)::bigint FROM {t['stats']} GROUP BY name").fetchall())
            (entries,) = conn.execute(f"SELECT count(*) FROM {t['entries']}").fetchone()
            (stored,) = conn.execute(f"SELECT value FROM {t['meta']} WHERE name = 'bytes'").fetchone()
        result: dict[str, Any] = {name: int(counts.get(name, 0)) for name in _COUNTERS}
        lookups = result["hits"] + result["misses"]
        result.update(
            store="postgres", entries=int(entries), bytes=int(stored), size_limit=self.size_bytes,
            searches=result["search_hits"] + result["search_misses"],
            hit_rate=result["hits"] / lookups if lookups else 0.0,
        )
        return result

    @contextmanager
    def single_flight(self, key: str) -> Iterator[None]:
        """Let one caller at a time, in this process and across every replica, compute the answer for `key`.

        Threads of this process queue on an in-process lock per key (advisory locks are re-entrant within
        the one session that holds them all); the winner then takes a PostgreSQL advisory lock keyed by a
        64-bit hash of the prefix and key. After `single_flight_timeout_s` a waiter goes on without the lock: a duplicate
        backend call is better than a stalled replica.
        """
        with self._sf_guard:
            slot = self._sf_locks.setdefault(key, [threading.Lock(), 0])
            slot[1] += 1
        local: threading.Lock = slot[0]
        deadline = time.monotonic() + self.single_flight_timeout_s
        got_local = local.acquire(blocking=False)
        try:
            if not got_local:
                self._record_wait()
                got_local = local.acquire(timeout=self.single_flight_timeout_s)
            if not got_local:
                self._record_timeout()
                yield
                return
            lock_id = int.from_bytes(
                hashlib.blake2b(f"{self.table_prefix}\0{key}".encode(), digest_size=8).digest(), "big", signed=True
            )
            with self._shared_flight(lock_id, deadline):
                yield
        finally:
            if got_local:
                local.release()
            with self._sf_guard:
                slot[1] -= 1
                if slot[1] == 0:
                    del self._sf_locks[key]

    def _after_fork_in_child(self) -> None:
        """In a forked child: the parent's single flights are the parent's. Their per-key locks, held through a
        whole backend call, would make the child's calls for those keys wait single_flight_timeout_s each, for
        ever; a guard held at the fork (one on a lookup waiting for the server) would hang the child."""
        self._sf_guard = threading.Lock()
        self._sf_locks = {}
        self._holder_guard = threading.Lock()
        self._pool.after_fork_in_child()
        self._outage.after_fork_in_child()

    def _statement_timeout_ms(self) -> int:
        # PostgreSQL takes at most 2**31 - 1 ms (24.8 days); above that SET fails and so would every lookup
        return min(2**31 - 1, max(1, int(self.statement_timeout_s * 1000)))

    def _on_holder(self, sql: str, lock_id: int) -> tuple[bool, int]:
        """Run a one-value advisory-lock query on the shared session; returns its value and the session's
        generation (a new session after the old one ended: the old one's locks ended with it)."""
        import psycopg

        with self._holder_guard:
            h = self._holder
            if h is not None and self._holder_pid != os.getpid():
                h = None  # inherited through fork: the parent's session, never used nor closed here
            elif h is not None and not (h.closed or h.broken) and (
                    self._holder_pool_gen != self._pool.generation or _dropped(h)):
                h.close()
            if h is None and self._holder_gen < 0:  # closed: a flight still polling opens no new session
                raise psycopg.OperationalError("the PostgresStore is closed")
            if h is None or h.closed or h.broken:
                pool_gen = self._pool.generation  # read before connecting: an outage found meanwhile retires it too
                h = self._holder = psycopg.connect(self.dsn, autocommit=True, **self._connect_kwargs())
                with statement_watchdog(h, self._lookup_deadline_s()):
                    h.execute(f"SET statement_timeout = {self._statement_timeout_ms()}")
                self._holder_pid = os.getpid()
                self._holder_pool_gen = pool_gen
                self._holder_gen += 1
            with statement_watchdog(h, self._lookup_deadline_s()):
                return bool(h.execute(sql, (lock_id,)).fetchone()[0]), self._holder_gen

    @contextmanager
    def _shared_flight(self, lock_id: int, deadline: float) -> Iterator[None]:
        import psycopg

        held_gen = None
        if self._outage.away:  # no lock to be had: each replica computes its own answer, as without a cache
            yield
            return
        try:
            held, gen = self._on_holder("SELECT pg_try_advisory_lock(%s)", lock_id)
            if not held:
                self._record_wait()
                delay = 0.005
                while not held and time.monotonic() < deadline:
                    time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                    delay = min(delay * 2, 0.1)
                    held, gen = self._on_holder("SELECT pg_try_advisory_lock(%s)", lock_id)
                if not held:
                    self._record_timeout()
            if held:
                held_gen = gen
        except psycopg.errors.QueryCanceled:  # the server answers, too slowly: a duplicate call beats a stalled one
            self._record_timeout()
        except psycopg.OperationalError as exc:  # no session to be had: a duplicate call beats a failed one
            if is_server_lost(exc):
                self._found_away(exc)
            else:
                logger.warning("the cache's PostgreSQL could not take a single-flight lock: %s", error_line(exc, self.dsn))
        try:
            yield
        finally:
            if held_gen is not None:
                with contextlib.suppress(psycopg.OperationalError), self._holder_guard:
                    h = self._holder
                    if (h is not None and self._holder_gen == held_gen and self._holder_pid == os.getpid()
                            and not (h.closed or h.broken)):
                        with statement_watchdog(h, self._lookup_deadline_s()):
                            h.execute("SELECT pg_advisory_unlock(%s)", (lock_id,))

    def _record_wait(self) -> None:
        if self._outage.away:
            return
        with self._or_unavailable("a wait is not counted"), self._pool.connection() as conn, \
                statement_watchdog(conn, self._lookup_deadline_s()):
            self._count(conn, "single_flight_waits")

    def _record_timeout(self) -> None:
        if self._outage.away:
            return
        with self._or_unavailable("a timeout is not counted"), self._pool.connection() as conn, \
                statement_watchdog(conn, self._lookup_deadline_s()):
            self._count(conn, "single_flight_timeouts")

    def close(self) -> None:
        self._outage.close()
        self._pool.close()
        with self._holder_guard:
            if self._holder is not None and self._holder_pid == os.getpid():
                self._holder.close()
            self._holder = None
            self._holder_gen = -1  # no flight's lock is unlocked, and none opens a new session

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _probe(dsn: str, connect_kwargs: dict[str, Any], deadline_s: float) -> None:
    """Raises unless the server takes a connection and answers a query: the outage's test that it is back
    (a module function: the reconnecting thread must not hold the store)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True, **connect_kwargs) as conn, statement_watchdog(conn, deadline_s):
        conn.execute("SELECT 1")


class _NonFinite(ValueError):
    """An entry holding NaN or Infinity, which PostgreSQL's json type refuses: not stored, the call goes on."""
