"""What a QuarantineStage has quarantined, released and written in its place, per namespace.

The registry is an SQLite database: in memory by default, or a file in a directory, so that a restarted
process, or another process given the same directory (the workers of one proxy), keeps the list and,
above all, the releases: content an operator vouched for is not held back again after a restart.

Each entry (a record, a released fingerprint, a placeholder) is a row of its own, so a change writes one
row in one transaction, whatever the namespace holds. (The namespace used to be one pickled value: at
10,000 records every change rewrote 2 MB, and every other process loaded it all again.) Every change is
also appended to a short per-namespace change log; each process keeps its own copy of a namespace and,
at each call, reads only the changes made since (one small query when there are none). A process that
fell further behind than the log reaches loads the namespace again.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sqlite3
import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from ...errors import ConfigurationError, QuarantineStoreUnavailable
from ...forking import renew_after_fork
from ...sqlite_damage import damage_reported, is_damage

FILE_NAME = "quarantine.sqlite3"
# Changes kept per namespace for other processes to catch up with; one further behind reloads all.
CHANGE_LOG = 1000
RECORD, RELEASED, ISSUED = "record", "released", "issued"
_REMEDY = "move the directory aside to start with an empty registry"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS namespaces (namespace TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    namespace TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT, seq INTEGER NOT NULL,
    PRIMARY KEY (namespace, kind, key));
CREATE INDEX IF NOT EXISTS entries_by_age ON entries (namespace, kind, seq);
CREATE TABLE IF NOT EXISTS changes (
    namespace TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT,
    deleted INTEGER NOT NULL, PRIMARY KEY (namespace, seq));
"""


@dataclasses.dataclass(frozen=True)
class QuarantineRecord:
    """One quarantined message or document, as `QuarantineStage.list()` returns it."""

    fingerprint: str
    namespace: str
    kind: str
    reason: str
    evidence: str
    role: str  # "tool", "assistant", or "document"
    source: str  # tool name, document id, or "assistant"
    excerpt: str
    conversation_id: str | None
    created_at: float


@dataclasses.dataclass
class Namespace:
    """One namespace's state. Each dict keeps insertion order (oldest first).

    records:  fingerprint -> the quarantine record.
    released: fingerprints the app vouched for.
    issued:   placeholders this registry's stage wrote (only those count as already handled: a tool can
              return text that starts like one).
    generation: the sequence number of the namespace's last change this copy holds.
    """

    records: dict[str, QuarantineRecord] = dataclasses.field(default_factory=dict)
    released: dict[str, None] = dataclasses.field(default_factory=dict)
    issued: dict[str, None] = dataclasses.field(default_factory=dict)
    generation: int = 0

    def apply(self, kind: str, key: str, value: str | None, deleted: bool) -> None:
        entries: dict[str, Any] = self.records if kind == RECORD else self.released if kind == RELEASED else self.issued
        if deleted:
            entries.pop(key, None)
        else:
            entries[key] = _decode(value) if kind == RECORD else None


# Namespaces whose state a registry keeps in memory (the most recently used); the others are read again when used.
MAX_NAMESPACES_IN_MEMORY = 1024


class QuarantineRegistry:
    """Per namespace, at most `max_records` records, released fingerprints and placeholders each; beyond it
    the oldest go."""

    def __init__(self, max_records: int, directory: str | Path | None = None) -> None:
        self.max_records = max_records
        self._lock = threading.Lock()
        # A copy of the namespaces used lately, least recently used first: the database holds them all, and a
        # service that sees a new namespace now and then (tenants, users) must not keep each one for good.
        self._spaces: collections.OrderedDict[str, Namespace] = collections.OrderedDict()
        self._where = str(directory) if directory is not None else "memory"
        self._inherited: list[sqlite3.Connection] = []  # a parent's connections after a fork: never used, never closed
        renew_after_fork(self, QuarantineRegistry._after_fork_in_child)
        if directory is None:
            self._db = self._open(":memory:", "memory")
            return
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only volume, a file in the way: say so, as a registry that cannot open does
            raise ConfigurationError(f"cannot create the quarantine registry's directory {directory}: {exc}") from exc
        self._db = self._open(str(Path(directory) / FILE_NAME), str(directory))
        try:
            self._import_diskcache(Path(directory))
        except BaseException:
            self._db.close()
            raise

    def snapshot(self, namespace: str) -> Namespace:
        """A copy of the namespace's state, as the database has it now."""
        with self._lock, self._damage_is_typed():
            space = self._current(namespace)
            return Namespace(dict(space.records), dict(space.released), dict(space.issued), space.generation)

    def namespaces(self) -> list[str]:
        with self._lock, self._damage_is_typed():
            return [_from_db(row[0]) for row in self._db.execute("SELECT namespace FROM namespaces ORDER BY namespace")]

    def add_record(self, record: QuarantineRecord) -> QuarantineRecord | None:
        """Keep `record`; when its content was quarantined already (another thread or process got there
        first), the record that was kept; None when it was released meanwhile (a caller works from a
        snapshot taken before the release: its record must not bring the released content back)."""
        with self._write(record.namespace) as writer:
            return keep_record(writer, record)

    def release(self, fingerprint: str, namespace: str) -> bool:
        """Lift one quarantine; False when nothing with that fingerprint was quarantined there."""
        with self._write(namespace) as writer:
            if not writer.delete(RECORD, fingerprint):
                return False
            writer.put(RELEASED, fingerprint)
        return True

    def add_issued(self, namespace: str, placeholder: str) -> None:
        with self._lock, self._damage_is_typed():  # most calls re-send placeholders issued before: no write
            if placeholder in self._current(namespace).issued:
                return
        with self._write(namespace) as writer:
            writer.put(ISSUED, placeholder)

    # -- internals ----------------------------------------------------------------------------------
    def _after_fork_in_child(self) -> None:
        """In a forked child (gunicorn --preload, multiprocessing's fork): a write of the parent's waiting on the
        database (another process's transaction) held the lock, held for ever here; and SQLite's connection, maybe
        mid-transaction, is the parent's (SQLite: never carry one across a fork). Closing it here could checkpoint
        and remove the WAL the parent uses: it is kept unused. An in-memory registry keeps its copy."""
        self._lock = threading.Lock()
        if self._where != "memory":
            self._inherited.append(self._db)
            self._db = self._open(str(Path(self._where) / FILE_NAME), self._where)

    @staticmethod
    def _open(target: str, where: str) -> sqlite3.Connection:
        try:
            # Autocommit: _transaction opens its own. One connection, used under _lock, by any thread.
            db = sqlite3.connect(target, timeout=30.0, isolation_level=None, check_same_thread=False)
            if target != ":memory:":
                db.execute("PRAGMA journal_mode=WAL")  # readers in other processes never wait for a writer
                db.execute("PRAGMA synchronous=FULL")  # a commit survives a crash of the machine too
            db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            if is_damage(exc):
                raise ConfigurationError(f"the quarantine registry in {where} is damaged ({exc}); {_REMEDY}") from exc
            # not damage: a directory this process cannot write (read-only, another owner), a full disk;
            # moving it aside would throw away every record and release in it
            raise ConfigurationError(f"cannot open the quarantine registry in {where} ({exc}); check that "
                                     "this process can write to the directory") from exc
        return db

    def _current(self, namespace: str) -> Namespace:
        """The namespace's state with every change made since this process last looked; under _lock."""
        row = self._db.execute("SELECT seq FROM namespaces WHERE namespace = ?", (_to_db(namespace),)).fetchone()
        latest = row[0] if row else 0
        space = self._spaces.get(namespace)
        if space is None:
            # Nothing ever written there (most namespaces): nothing to keep. Else read it whole from the database.
            return Namespace() if latest == 0 else self._load(namespace, latest)
        self._spaces.move_to_end(namespace)
        if latest == space.generation:
            return space
        changes = self._db.execute(
            "SELECT seq, kind, key, value, deleted FROM changes WHERE namespace = ? AND seq > ? AND seq <= ? "
            "ORDER BY seq", (_to_db(namespace), space.generation, latest)).fetchall()
        if latest < space.generation or not changes or changes[0][0] != space.generation + 1:
            return self._load(namespace, latest)  # the log no longer reaches back to this copy
        for _seq, kind, key, value, deleted in changes:
            space.apply(kind, _from_db(key), value, bool(deleted))
        space.generation = latest
        return space

    def _load(self, namespace: str, latest: int) -> Namespace:
        space = Namespace(generation=latest)
        rows = self._db.execute("SELECT kind, key, value FROM entries WHERE namespace = ? ORDER BY seq",
                                (_to_db(namespace),))
        for kind, key, value in rows:
            space.apply(kind, _from_db(key), value, False)
        self._spaces[namespace] = space
        self._spaces.move_to_end(namespace)
        while len(self._spaces) > MAX_NAMESPACES_IN_MEMORY:
            self._spaces.popitem(last=False)
        return space

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One SQLite transaction, taken for writing at once: another process's change made before it is
        built upon, none can come in between. Under _lock."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            # SQLite rolls a transaction back by itself on some errors (a full disk, an I/O error): a ROLLBACK
            # then fails with "no transaction is active" and would hide the error that says what happened.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _damage_is_typed(self) -> AbstractContextManager[None]:
        """A damaged page met after the registry opened (a power cut): the error opening it gives, not sqlite3's."""
        return damage_reported(f"the quarantine registry in {self._where}", _REMEDY)

    @contextmanager
    def _write(self, namespace: str) -> Iterator[_Writer]:
        with self._lock, self._damage_is_typed():
            try:
                with self._transaction():
                    writer = _Writer(self._db, namespace, self.max_records)
                    yield writer
                    writer.finish()
            except sqlite3.OperationalError as exc:
                # A full or read-only disk: nothing was written, as when the shared registry's database is away.
                raise QuarantineStoreUnavailable(f"the quarantine registry in {self._where} cannot write: {exc}") from exc
            self._current(namespace)

    def _import_diskcache(self, directory: Path) -> None:
        """A directory written by ctxkit 0.1's diskcache registry (one pickled Namespace per namespace): its
        records, releases and placeholders are copied over once, in one transaction, so an upgrade loses
        none of them, even when it is interrupted."""
        with self._lock, self._transaction():
            if self._db.execute("SELECT 1 FROM meta WHERE key = 'imported_diskcache'").fetchone():
                return
            self._db.execute("INSERT INTO meta VALUES ('imported_diskcache', '')")
            if not (directory / "cache.db").exists():
                return
            import diskcache

            # 0.1 pickled its Namespace as ctxkit.stages.quarantine_registry.Namespace, the module this one was:
            # without the old name every record and release was dropped as unreadable.
            legacy = "ctxkit.stages.quarantine_registry"
            alias = sys.modules.setdefault(legacy, sys.modules[__name__]) is sys.modules[__name__]
            try:
                with diskcache.Cache(str(directory), eviction_policy="none") as old:
                    # A row whose value file is gone (0.1 deleted the old file before its write committed, and a
                    # writer killed between lost it) is what 0.1 itself read as an empty namespace: not a reason to
                    # refuse every other namespace's records and releases.
                    spaces = [(key[1], space) for key in old.iterkeys()
                              if isinstance(key, tuple) and key[0] == "space"
                              and (space := old.get(key, _VALUE_FILE_GONE)) is not _VALUE_FILE_GONE]
                unreadable = [repr(name) for name, space in spaces if not isinstance(space, Namespace)]
                if unreadable:
                    raise ValueError(f"namespace {', '.join(unreadable)} is not a registry namespace")
            except Exception as exc:  # noqa: BLE001 - damaged SQLite, a pickle cut short, another program's file
                # Records and releases are the user's, not a cache: an upgrade never starts empty over them
                # unsaid (releases lost hold content an operator vouched for back again). Nothing is marked
                # imported, so the import runs once the file is mended or moved aside.
                raise ConfigurationError(
                    f"the quarantine registry in {directory} has a {directory / 'cache.db'} written by ctxkit 0.1 "
                    f"that cannot be read ({type(exc).__name__}: {exc}); its records and releases were not imported. "
                    "Restore it from a backup, or move cache.db aside to start without them") from exc
            finally:
                if alias:
                    sys.modules.pop(legacy, None)
            for name, space in spaces:
                writer = _Writer(self._db, name, self.max_records)
                for fingerprint, record in space.records.items():
                    writer.put(RECORD, fingerprint, _encode(record))
                for fingerprint in space.released:
                    writer.put(RELEASED, fingerprint)
                for placeholder in space.issued:
                    writer.put(ISSUED, placeholder)
                writer.finish()


_VALUE_FILE_GONE = object()  # the default diskcache's get returns: a row whose value file is missing


def keep_record(writer: Any, record: QuarantineRecord) -> QuarantineRecord | None:
    """Write `record` through a registry's writer (SQLite's or PostgreSQL's, inside its transaction): the record
    kept already when its content was quarantined first elsewhere; None when it was released meanwhile."""
    kept = writer.get(RECORD, record.fingerprint)
    if kept is not None:
        return _decode(kept[0])
    if writer.get(RELEASED, record.fingerprint) is not None:
        return None
    writer.put(RECORD, record.fingerprint, _encode(record))
    return record


class _Writer:
    """The changes to one namespace inside a transaction: each entry written, logged with the next sequence
    number, and its kind kept within max_records (the oldest go)."""

    def __init__(self, db: sqlite3.Connection, namespace: str, max_records: int) -> None:
        self.db, self.namespace, self.max_records = db, _to_db(namespace), max_records
        row = db.execute("SELECT seq FROM namespaces WHERE namespace = ?", (self.namespace,)).fetchone()
        self.start = self.seq = row[0] if row else 0

    def get(self, kind: str, key: str) -> tuple[str | None] | None:
        """The entry's row (its value), or None when there is none."""
        return self._row(kind, _to_db(key))

    def put(self, kind: str, key: str, value: str | None = None) -> bool:
        """Add the entry; False when it is there already."""
        stored = _to_db(key)
        if self._row(kind, stored) is not None:
            return False
        self._log(kind, stored, value, deleted=False)
        self.db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?)", (self.namespace, kind, stored, value, self.seq))
        (count,) = self.db.execute("SELECT count(*) FROM entries WHERE namespace = ? AND kind = ?",
                                   (self.namespace, kind)).fetchone()
        if count > self.max_records:
            oldest = self.db.execute("SELECT key FROM entries WHERE namespace = ? AND kind = ? ORDER BY seq LIMIT ?",
                                     (self.namespace, kind, count - self.max_records)).fetchall()
            for (old,) in oldest:
                self._delete_row(kind, old)
        return True

    def delete(self, kind: str, key: str) -> bool:
        """Remove the entry; False when it was not there."""
        return self._delete_row(kind, _to_db(key))

    # Rows are keyed as stored (_to_db): the public methods take the app's keys, these the database's.
    def _row(self, kind: str, stored: str) -> tuple[str | None] | None:
        row = self.db.execute("SELECT value FROM entries WHERE namespace = ? AND kind = ? AND key = ?",
                              (self.namespace, kind, stored)).fetchone()
        return None if row is None else (row[0],)

    def _delete_row(self, kind: str, stored: str) -> bool:
        gone = self.db.execute("DELETE FROM entries WHERE namespace = ? AND kind = ? AND key = ?",
                               (self.namespace, kind, stored)).rowcount
        if gone:
            self._log(kind, stored, None, deleted=True)
        return bool(gone)

    def finish(self) -> None:
        if self.seq == self.start:
            return
        self.db.execute("INSERT INTO namespaces VALUES (?, ?) ON CONFLICT (namespace) DO UPDATE SET seq = excluded.seq",
                        (self.namespace, self.seq))
        self.db.execute("DELETE FROM changes WHERE namespace = ? AND seq <= ?", (self.namespace, self.seq - CHANGE_LOG))

    def _log(self, kind: str, key: str, value: str | None, *, deleted: bool) -> None:
        self.seq += 1
        self.db.execute("INSERT INTO changes VALUES (?, ?, ?, ?, ?, ?)",
                        (self.namespace, self.seq, kind, key, value, int(deleted)))


# A namespace, fingerprint or placeholder holding a lone surrogate (a JSON body's "\\ud83d", a tool call's
# arguments cut inside an emoji) is stored as its JSON escape behind this mark: SQLite takes only UTF-8.
_ESCAPED = "\ufffejson:"


def _to_db(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _ESCAPED + json.dumps(text)
    return text


def _from_db(text: str) -> str:
    return json.loads(text[len(_ESCAPED):]) if text.startswith(_ESCAPED) else text


def _encode(record: QuarantineRecord) -> str:
    # ASCII: a lone surrogate (a document in the request metadata is not checked for one) is kept as its
    # JSON escape; SQLite takes only UTF-8, and the in-memory registry of 0.1 took anything.
    return json.dumps(dataclasses.asdict(record))


def _decode(value: str | None) -> QuarantineRecord:
    return QuarantineRecord(**json.loads(value or "{}"))


__all__ = ["Namespace", "QuarantineRecord", "QuarantineRegistry"]
