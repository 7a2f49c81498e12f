"""The quarantine registry on PostgreSQL: replicas on different hosts share records and releases.

`PostgresQuarantineRegistry(max_records, "postgresql://user@host/db")` keeps what `QuarantineRegistry`
keeps, with the same semantics, in three tables (`{table_prefix}_namespaces`, `_entries`, `_changes`):
one row per record, released fingerprint or placeholder, and a short per-namespace change log. Each
replica keeps its own copy of the namespaces it uses and, at each call, reads only the changes made since
(one small query when there are none): a release on one replica is seen by the others at their next call.

Writers to one namespace are serialized by a row lock on its `_namespaces` row, taken at the start of
the transaction, so concurrent replicas lose nothing and number their changes without gaps.

The database going away (a restart, a failover, a network cut, the tables dropped) fails no model call:
the registry logs an ERROR once and works from its copy in memory; what it quarantines meanwhile is kept
there and written to the database when it is back. Only the call that finds the database gone waits for it
(a connect or statement timeout); while it is away a background thread tries to reconnect (more slowly each
time, at least every `retry_s` seconds), so calls meanwhile cost no wait, and the first call after it is back
uses it again. That thread writes the backlog, a little at a time with calls taking their turns between: no
call pays for it (a release first writes its namespace's).
What is still in memory when the process ends is lost (an ERROR names it): content sent again is checked
again, but a model answer quarantined in its context (it repeats an injected link) is not when that context
is not sent again.
A release cannot be kept in memory only (the other replicas would hold the content back, and the
operator believe it released): it raises `QuarantineStoreUnavailable` until the database is back.
A bad URL, an unreachable server or missing rights at construction raise `ConfigurationError`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from ...errors import ConfigurationError, QuarantineStoreUnavailable
from ...forking import renew_after_fork
from ...postgres import Outage, error_line, statement_watchdog
from ...settings import positive_seconds, whole_number
from .registry import (
    _ESCAPED,
    CHANGE_LOG,
    ISSUED,
    MAX_NAMESPACES_IN_MEMORY,
    RECORD,
    RELEASED,
    Namespace,
    QuarantineRecord,
    _from_db,
    keep_record,
)
from .registry import _to_db as _sqlite_to_db

logger = logging.getLogger("ctxkit.quarantine")

_PREFIX_RE = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
_T = TypeVar("_T")
# How long the outage's thread holds the registry at a time writing what was kept in memory during an outage:
# after a long one, thousands of quarantines are written in slices, calls taking their turns between.
FLUSH_BUDGET_S = 0.2
# A failed try that took longer than this met a server that does not answer: a second try would double the wait.
_SLOW_FAILURE_S = 1.0


class PostgresQuarantineRegistry:
    """QuarantineRegistry on PostgreSQL; per namespace at most `max_records` records, released fingerprints
    and placeholders each, the oldest going first."""

    def __init__(self, max_records: int, dsn: str, *, table_prefix: str = "ctxkit_quarantine",
                 connect_timeout_s: float = 2.0, statement_timeout_s: float = 2.0, retry_s: float = 10.0) -> None:
        if not _PREFIX_RE.match(table_prefix):
            raise ConfigurationError(f"table_prefix must match {_PREFIX_RE.pattern}, got {table_prefix!r}")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ConfigurationError("the shared quarantine registry needs: pip install 'ctxkit[postgres]'") from None
        # PostgreSQL reads a statement_timeout of 0 as no limit: 0 (or under a millisecond) set none at all, and a
        # negative one made every session's SET fail; infinity was an OverflowError
        connect_timeout_s = positive_seconds(connect_timeout_s, "connect_timeout_s")
        statement_timeout_s = positive_seconds(statement_timeout_s, "statement_timeout_s")
        retry_s = positive_seconds(retry_s, "retry_s")
        self.max_records = whole_number(max_records, "max_records", minimum=1)
        self.dsn = dsn
        self._connect_timeout = max(2, math.ceil(connect_timeout_s))
        self._statement_timeout_ms = max(1, round(statement_timeout_s * 1000))
        self._t = {name: f"{table_prefix}_{name}" for name in ("namespaces", "entries", "changes")}
        self._lock = threading.Lock()  # one connection, used under it by any thread, as the SQLite registry does
        self._spaces: dict[str, Namespace] = {}  # insertion order = least recently used first
        self._conn: Any = None
        self._closed = False  # under _lock: the outage's thread hands a closed registry no connection
        self._pending: list[tuple[str, Any]] = []  # writes made while the database was away, oldest first
        self._inherited: list[Any] = []  # a parent's connection after a fork: never used, never closed
        # the thread holds the registry weakly: one dropped unclosed during an outage is collected (its finalizer
        # names what it held) and the thread ends, rather than both living until the database is back
        me = weakref.ref(self)
        self._outage = Outage("the quarantine registry's PostgreSQL",
                              partial(_weakly, me, PostgresQuarantineRegistry._reconnect), retry_s, logger,
                              meanwhile="quarantines are kept in this replica's memory and releases refused",
                              on_back=partial(_weakly, me, PostgresQuarantineRegistry._write_backlog))
        weakref.finalize(self, self._outage.close)
        # A process that ends during an outage loses what it kept in memory: the operator is told what.
        weakref.finalize(self, _report_unwritten, self._pending)
        renew_after_fork(self, PostgresQuarantineRegistry._after_fork_in_child)
        try:
            self._conn = self._connect()
        except Exception as exc:  # noqa: BLE001 - any failure to open is the operator's to fix
            raise ConfigurationError(f"cannot open the quarantine registry in PostgreSQL: {self._redact(exc)}") from None

    @property
    def retry_s(self) -> float:
        """At most how long the background thread waits between its tries to reconnect."""
        return self._outage.retry_s

    @retry_s.setter
    def retry_s(self, seconds: float) -> None:
        self._outage.retry_s = seconds

    # -- the registry's interface (as QuarantineRegistry's) ----------------------------------------
    def snapshot(self, namespace: str) -> Namespace:
        """A copy of the namespace's state as the database has it now (while it is away: as this replica last
        saw it, with what it quarantined since)."""
        with self._lock:
            space = self._attempt(lambda conn: self._current(conn, namespace), lambda: self._cached(namespace))
            return Namespace(dict(space.records), dict(space.released), dict(space.issued), space.generation)

    def namespaces(self) -> list[str]:
        with self._lock:
            return self._attempt(
                lambda conn: [_from_db(r[0]) for r in conn.execute(
                    f"SELECT namespace FROM {self._t['namespaces']} WHERE seq > 0 ORDER BY namespace")],
                lambda: sorted(self._spaces))

    def add_record(self, record: QuarantineRecord) -> QuarantineRecord | None:
        """Keep `record`; the record kept already when another replica got there first; None when the content
        was released meanwhile."""
        with self._lock:
            return self._attempt(lambda conn: self._add_record(conn, record),
                                 lambda: self._offline_write("record", record))

    def release(self, fingerprint: str, namespace: str) -> bool:
        """Lift one quarantine; False when nothing with that fingerprint was quarantined there. Raises
        QuarantineStoreUnavailable when the database cannot be reached."""
        def release(conn: Any) -> bool:
            with self._writer(conn, namespace) as writer:
                if not writer.delete(RECORD, fingerprint):
                    return False
                writer.put(RELEASED, fingerprint)
            self._current(conn, namespace)
            return True

        def unavailable() -> bool:
            raise QuarantineStoreUnavailable("the quarantine registry's PostgreSQL cannot be reached: nothing was "
                                             "released; try again when it is back")

        with self._lock:
            # a record kept in memory during the outage is written first, to be released like any other
            return self._attempt(release, unavailable, flush=namespace)

    def add_issued(self, namespace: str, placeholder: str) -> None:
        with self._lock:
            if placeholder in self._cached(namespace).issued:  # most calls re-send placeholders issued before
                return
            self._attempt(lambda conn: self._add_issued(conn, namespace, placeholder),
                          lambda: self._offline_write("issued", (namespace, placeholder)))

    def close(self) -> None:
        self._outage.close()
        with self._lock:
            self._closed = True
            self._drop_connection()
            _report_unwritten(self._pending)  # under the lock: the outage's thread may be writing them

    # -- connection and outages -------------------------------------------------------------------
    def _connect(self) -> Any:
        import psycopg

        # libpq waits for a server without end by default; the URL's or PGCONNECT_TIMEOUT's value wins
        given = "connect_timeout" in psycopg.conninfo.conninfo_to_dict(self.dsn) or os.environ.get("PGCONNECT_TIMEOUT")
        timeout: dict[str, Any] = {} if given else {"connect_timeout": self._connect_timeout}
        conn = psycopg.connect(self.dsn, autocommit=True, **timeout)
        try:
            # a write must not wait without end behind a lock or a stuck server: past this it is an outage. A
            # server that stops answering once connected enforces nothing: these are cut off as any statement is
            with statement_watchdog(conn, self._statement_timeout_ms / 1000 + 2):
                conn.execute(f"SET statement_timeout = {self._statement_timeout_ms}")
                self._ensure_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _ensure_schema(self, conn: Any) -> None:
        t = self._t
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"ctxkit_quarantine:{t['entries']}",))
            conn.execute(f"CREATE TABLE IF NOT EXISTS {t['namespaces']} (namespace text PRIMARY KEY, seq bigint NOT NULL)")
            conn.execute(f"""CREATE TABLE IF NOT EXISTS {t['entries']} (
                namespace text NOT NULL, kind text NOT NULL, key text NOT NULL, value text, seq bigint NOT NULL,
                PRIMARY KEY (namespace, kind, key))""")
            conn.execute(f"CREATE INDEX IF NOT EXISTS {t['entries']}_by_age ON {t['entries']} (namespace, kind, seq)")
            conn.execute(f"""CREATE TABLE IF NOT EXISTS {t['changes']} (
                namespace text NOT NULL, seq bigint NOT NULL, kind text NOT NULL, key text NOT NULL, value text,
                deleted boolean NOT NULL, PRIMARY KEY (namespace, seq))""")

    def _attempt(self, work: Callable[[Any], _T], offline: Callable[[], _T], *, flush: str | None = None,
                 backlog_s: float = 0.0) -> _T:
        """`work` on the database; once more on a new connection (and the tables made again) when the first
        try failed at once, for a server restarted since the last call; `offline()` when the database is away,
        at once while the outage lasts. `flush`: a namespace whose writes kept in memory are all written first;
        `backlog_s`: how long to spend on the others (the outage's thread's slice: a call that wrote one too
        waited for every other caller's). Under _lock."""
        import psycopg

        if self._closed:  # it would connect again, and nothing would close that session
            raise ConfigurationError("the PostgreSQL quarantine registry is closed")
        if self._outage.away:
            return offline()
        error: Exception | None = None
        for _ in range(2):
            started = time.monotonic()
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = self._connect()
                if flush is not None:
                    self._flush_pending(None, flush)
                if backlog_s:
                    self._flush_pending(backlog_s)
                return self._watched(work)
            except (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.ReadOnlySqlTransaction,
                    psycopg.errors.UndefinedTable, psycopg.errors.InsufficientPrivilege) as exc:
                error = exc
                self._drop_connection()
                if time.monotonic() - started > _SLOW_FAILURE_S:
                    break  # timed out: the server does not answer, and a new connection would wait as long
        self._outage.found_away(self._redact(error))
        return offline()

    def _watched(self, work: Callable[[Any], _T]) -> _T:
        # the server enforces statement_timeout; one that stopped answering is cut off by the watchdog
        with statement_watchdog(self._conn, self._statement_timeout_ms / 1000 + 2):
            return work(self._conn)

    def _reconnect(self) -> None:
        """The outage's probe: a connection opened outside the lock (no call waits for its connect timeout), used by
        the calls once it took a slice of the backlog. Raises while it cannot: the outage goes on."""
        conn = self._connect()
        with self._lock:
            if self._closed:
                conn.close()
                return
            self._drop_connection()
            self._conn = conn
            self._flush_pending(FLUSH_BUDGET_S)

    def _write_backlog(self) -> None:
        """The outage's hook once the database is back: the rest of the backlog, a slice at a time (calls take their
        turns between), so that an idle replica does not hold it."""
        while True:
            with self._lock:
                if self._closed or not self._pending or self._outage.away:
                    return
                self._attempt(_nothing, _nothing, backlog_s=FLUSH_BUDGET_S)
            time.sleep(0.01)  # long enough for the calls waiting on the lock to take it

    def _after_fork_in_child(self) -> None:
        """In a forked child: a lock the parent's calls or background thread held at the fork would stay held
        forever; the parent's connection is parked (closing it would end its session); the parent's backlog is
        left to the parent, which writes it (the child writing it too would write it twice, and report it lost
        when it ends)."""
        self._lock = threading.Lock()
        self._outage.after_fork_in_child()
        self._inherited.append(self._conn)
        self._conn = None
        self._pending.clear()  # the very list the finalizer reports from: this process has none unwritten

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a lost connection
                pass
        self._conn = None

    def _offline_write(self, what: str, item: Any) -> Any:
        """Keep a write in memory while the database is away; it is written when the database is back."""
        if what == "record":
            space = self._cached(item.namespace)
            kept = space.records.get(item.fingerprint)
            if kept is not None:
                return kept
            if item.fingerprint in space.released:
                return None
            space.records[item.fingerprint] = item
            self._pending.append((what, item))
            return item
        namespace, placeholder = item
        self._cached(namespace).issued[placeholder] = None
        self._pending.append((what, item))
        return None

    def _flush_pending(self, budget_s: float | None, namespace: str | None = None) -> None:
        """Write what was kept in memory during an outage, oldest first, for at most `budget_s` (None: all of it;
        `namespace`: only that namespace's); the rest at the next calls (read meanwhile from _pending)."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        for what, item in list(self._pending):
            if deadline is not None and time.monotonic() > deadline:
                return
            if namespace is not None and (item.namespace if what == "record" else item[0]) != namespace:
                continue
            if what == "record":
                self._watched(partial(self._add_record, record=item))
            else:
                self._watched(partial(self._add_issued, namespace=item[0], placeholder=item[1]))
            self._pending.remove((what, item))

    def _redact(self, exc: BaseException | None) -> str:
        """The error's first line without the URL's password (libpq may quote it)."""
        return error_line(exc, self.dsn)

    # -- the namespaces' state ---------------------------------------------------------------------
    def _cached(self, namespace: str) -> Namespace:
        """This replica's copy of the namespace (an empty one, kept, when it has none)."""
        space = self._spaces.pop(namespace, None) or Namespace()
        self._spaces[namespace] = space
        self._evict()
        return space

    def _evict(self) -> None:
        while len(self._spaces) > MAX_NAMESPACES_IN_MEMORY:
            del self._spaces[next(iter(self._spaces))]

    def _current(self, conn: Any, namespace: str) -> Namespace:
        """The namespace's state with every change made since this replica last looked."""
        t, key = self._t, _to_db(namespace)
        row = conn.execute(f"SELECT seq FROM {t['namespaces']} WHERE namespace = %s", (key,)).fetchone()
        latest = row[0] if row else 0
        space = self._spaces.pop(namespace, None)
        if space is None:
            if latest == 0 and not self._pending:
                return Namespace()  # nothing ever written there (most namespaces): nothing to keep
            return self._load(conn, namespace, latest)
        self._spaces[namespace] = space
        if latest == space.generation:
            return space
        changes = conn.execute(
            f"SELECT seq, kind, key, value, deleted FROM {t['changes']} WHERE namespace = %s AND seq > %s "
            "AND seq <= %s ORDER BY seq", (key, space.generation, latest)).fetchall()
        if latest < space.generation or not changes or changes[0][0] != space.generation + 1:
            return self._load(conn, namespace, latest)  # the log no longer reaches back (or the tables were remade)
        for _seq, kind, stored, value, deleted in changes:
            space.apply(kind, _from_db(stored), value, deleted)
        space.generation = latest
        return space

    def _load(self, conn: Any, namespace: str, latest: int) -> Namespace:
        space = Namespace(generation=latest)
        rows = conn.execute(f"SELECT kind, key, value FROM {self._t['entries']} WHERE namespace = %s ORDER BY seq",
                            (_to_db(namespace),))
        for kind, stored, value in rows:
            space.apply(kind, _from_db(stored), value, False)
        for what, item in self._pending:  # kept in memory during an outage, not written yet
            if what == "record" and item.namespace == namespace and item.fingerprint not in space.released:
                space.records.setdefault(item.fingerprint, item)
            elif what == "issued" and item[0] == namespace:
                space.issued.setdefault(item[1], None)
        self._spaces[namespace] = space
        self._evict()
        return space

    def _add_record(self, conn: Any, record: QuarantineRecord) -> QuarantineRecord | None:
        with self._writer(conn, record.namespace) as writer:
            kept = keep_record(writer, record)
        if kept is record:
            self._current(conn, record.namespace)
        return kept

    def _add_issued(self, conn: Any, namespace: str, placeholder: str) -> None:
        with self._writer(conn, namespace) as writer:
            writer.put(ISSUED, placeholder)
        self._current(conn, namespace)

    def _writer(self, conn: Any, namespace: str) -> _Transaction:
        return _Transaction(conn, self._t, namespace, self.max_records)


class _Transaction:
    """The changes to one namespace in one transaction: each entry written, logged with the next sequence
    number, and its kind kept within max_records (the oldest go). The namespace's row is locked first, so
    writers on every replica take turns and build on each other's changes."""

    def __init__(self, conn: Any, tables: dict[str, str], namespace: str, max_records: int) -> None:
        self.conn, self.t, self.namespace, self.max_records = conn, tables, _to_db(namespace), max_records
        self._tx: Any = None

    def __enter__(self) -> _Transaction:
        self._tx = self.conn.transaction()
        self._tx.__enter__()
        self.conn.execute(f"INSERT INTO {self.t['namespaces']} VALUES (%s, 0) ON CONFLICT (namespace) DO NOTHING",
                          (self.namespace,))
        row = self.conn.execute(f"SELECT seq FROM {self.t['namespaces']} WHERE namespace = %s FOR UPDATE",
                                (self.namespace,)).fetchone()
        self.start = self.seq = row[0]
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        if exc[0] is None and self.seq != self.start:
            try:
                self.conn.execute(f"UPDATE {self.t['namespaces']} SET seq = %s WHERE namespace = %s",
                                  (self.seq, self.namespace))
                self.conn.execute(f"DELETE FROM {self.t['changes']} WHERE namespace = %s AND seq <= %s",
                                  (self.namespace, self.seq - CHANGE_LOG))
            except BaseException as error:  # rolled back, not left open on the connection
                self._tx.__exit__(type(error), error, error.__traceback__)
                raise
        return self._tx.__exit__(*exc)  # type: ignore[no-any-return]

    def get(self, kind: str, key: str) -> tuple[str | None] | None:
        row = self.conn.execute(f"SELECT value FROM {self.t['entries']} WHERE namespace = %s AND kind = %s AND key = %s",
                                (self.namespace, kind, _to_db(key))).fetchone()
        return None if row is None else (row[0],)

    def put(self, kind: str, key: str, value: str | None = None) -> bool:
        stored = _to_db(key)
        inserted = self.conn.execute(
            f"INSERT INTO {self.t['entries']} VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (self.namespace, kind, stored, value, self.seq + 1)).rowcount
        if not inserted:
            return False
        self._log(kind, stored, value, deleted=False)
        (count,) = self.conn.execute(f"SELECT count(*) FROM {self.t['entries']} WHERE namespace = %s AND kind = %s",
                                     (self.namespace, kind)).fetchone()
        if count > self.max_records:
            oldest = self.conn.execute(
                f"DELETE FROM {self.t['entries']} WHERE (namespace, kind, key) IN (SELECT namespace, kind, key FROM "
                f"{self.t['entries']} WHERE namespace = %s AND kind = %s ORDER BY seq LIMIT %s) RETURNING key",
                (self.namespace, kind, count - self.max_records)).fetchall()
            for (old,) in oldest:
                self._log(kind, old, None, deleted=True)
        return True

    def delete(self, kind: str, key: str) -> bool:
        stored = _to_db(key)
        gone = self.conn.execute(f"DELETE FROM {self.t['entries']} WHERE namespace = %s AND kind = %s AND key = %s",
                                 (self.namespace, kind, stored)).rowcount
        if gone:
            self._log(kind, stored, None, deleted=True)
        return bool(gone)

    def _log(self, kind: str, key: str, value: str | None, *, deleted: bool) -> None:
        self.seq += 1
        self.conn.execute(f"INSERT INTO {self.t['changes']} VALUES (%s, %s, %s, %s, %s, %s)",
                          (self.namespace, self.seq, kind, key, value, deleted))


def _weakly(registry: weakref.ref[PostgresQuarantineRegistry],
            method: Callable[[PostgresQuarantineRegistry], None]) -> None:
    """The outage thread's `method`, on the registry unless it was collected: the thread must not hold it."""
    held = registry()
    if held is not None:
        method(held)


def _nothing(*_: Any) -> None:
    return None


def _report_unwritten(pending: list[tuple[str, Any]]) -> None:
    """At the registry's end (closed, collected, or the process exiting): what the outage kept in memory and
    no database will have."""
    records = [item.fingerprint for what, item in pending if what == "record"]
    if records:
        logger.error("%d quarantine(s) found while the registry's PostgreSQL was away were never written and are "
                     "lost: %s; their content is checked again when it is sent again", len(records),
                     ", ".join(records[:20]) + (", ..." if len(records) > 20 else ""))
    pending.clear()


def _to_db(text: str) -> str:
    """A namespace, fingerprint or placeholder PostgreSQL cannot keep as text (a lone surrogate, which the SQLite
    registry escapes too, or a NUL character) is kept as its JSON escape behind the SQLite registry's mark."""
    return _ESCAPED + json.dumps(text) if "\x00" in text else _sqlite_to_db(text)


__all__ = ["PostgresQuarantineRegistry"]
