"""The ledger: JSON lines appended safely from many threads and processes, and mirrored to `logging`.

Each record is one `os.write` of one whole line to a file opened with O_APPEND, under an exclusive
`flock`: O_APPEND makes every write land at the end, the lock keeps long lines from interleaving, so
no line is lost or torn however many writers there are. A process killed mid-write can still leave a
partial last line; the next writer ends it with a newline first, so only that record is lost, and
readers skip it with `strict=False`.

A record is written after the call it describes has been answered. A file that cannot be written then
does not take the answer away from the caller: the failure is logged as an error and counted in
`write_errors`, and the record stays in `records`. A file that cannot be opened at all is an error
when the Ledger is made.
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import LedgerError, MalformedLedgerLine
from ..forking import renew_after_fork
from ..settings import whole_number
from .record import LedgerRecord

logger = logging.getLogger("ctxkit")


class Ledger:
    """Where call records go. `path=None` keeps them in memory only (and still logs them)."""

    def __init__(self, path: str | Path | None = None, *, keep_in_memory: int | None = 10_000) -> None:
        """keep_in_memory: how many of the newest records `records` holds (None: all, as a deque's maxlen)."""
        # deque's own refusals were a bare ValueError ("maxlen must be non-negative") or TypeError, and True kept one
        if keep_in_memory is not None:
            keep_in_memory = whole_number(keep_in_memory, "keep_in_memory (records kept in Ledger.records; None: all)")
        self.path = Path(path) if path is not None else None
        self.records: collections.deque[LedgerRecord] = collections.deque(maxlen=keep_in_memory)
        self.write_errors = 0
        self._lock = threading.Lock()
        self._appending: int | None = None  # the descriptor an append has open (and maybe locked), under _lock
        renew_after_fork(self, Ledger._after_fork_in_child)
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                os.close(self._open())
            except OSError as exc:
                raise LedgerError(f"cannot open ledger {self.path}: {exc}") from exc

    def write(self, record: LedgerRecord) -> None:
        text = _dumps(record.to_dict())
        # A lone surrogate (from a client's string) cannot be UTF-8: written as its JSON escape instead.
        line = text.encode("utf-8", "backslashreplace") + b"\n"
        with self._lock:
            if self.path is not None:
                try:
                    self._append(line)
                except OSError as exc:
                    self.write_errors += 1
                    logger.error("ctxkit ledger: record %s not written to %s: %s", record.id, self.path, exc)
            self.records.append(record)
        logger.info("%s", text, extra={"ctxkit_record": record.to_dict()})

    def _after_fork_in_child(self) -> None:
        """A thread appending at the fork held _lock (held for ever here) and an open descriptor whose flock,
        granted before the fork or after, lasts while any copy is open: the child's copy would lock every
        writer of the file, this child first, for the child's life."""
        self._lock = threading.Lock()
        if self._appending is not None:
            os.close(self._appending)  # this copy only: the parent's append goes on and unlocks when it closes
            self._appending = None

    def _open(self) -> int:
        assert self.path is not None
        return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)

    def _append(self, data: bytes) -> None:
        fd = self._appending = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # a writer died mid-line: end its line, do not glue this record to it
            written = 0
            while written < len(data):  # a short write is rare but legal; finish the line under the lock
                written += os.write(fd, data[written:])
        finally:
            self._appending = None
            os.close(fd)  # closing releases the lock


def _dumps(data: object) -> str:
    """One record as JSON. NaN and Infinity (a stage's note: numpy's mean of nothing) are written as null:
    json.dumps would write them as bare NaN, which is no JSON, and which read_ledger refuses."""
    options: dict = {"ensure_ascii": False, "separators": (",", ":"), "default": _jsonable}
    try:
        return json.dumps(data, allow_nan=False, **options)
    except (ValueError, TypeError):  # NaN, or a key JSON has no type for (a Counter of pairs)
        return json.dumps(_plain(data), allow_nan=False, **options)


def _plain(value: object) -> object:
    """`value` as plain JSON values: keys as text (as json.dumps writes the ones it takes), NaN and Infinity
    as null."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if value is None or isinstance(value, (str, int)):
        return value
    if not isinstance(value, (dict, list, tuple)):
        return _plain(_jsonable(value))  # numpy values, sets, anything else as its text
    if isinstance(value, dict):
        return {_key(k): _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value]


def _key(key: object) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key)  # what json.dumps makes of these keys: "1", "true", "null", "1.5"
    return str(key)


def _jsonable(value: object) -> object:
    """A stage's note (`record_event`) may hold what JSON has no type for: numpy numbers and arrays, sets.
    Written as their plain values (anything else as its text): a note never costs a call its answer."""
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def read_ledger(path: str | Path, *, strict: bool = True,
                skipped: list[str] | None = None) -> Iterator[LedgerRecord]:
    """The records of a ledger file, in order. A malformed line raises LedgerError naming it, unless
    `strict=False`, which skips it (a process killed mid-write can leave a partial last line) with a
    warning, and appends the line's description to `skipped` when given."""
    try:
        handle = open(path, "rb")  # decoded line by line: a line torn inside a character is one bad line
    except OSError as exc:
        raise LedgerError(f"cannot read ledger {path}: {exc}") from exc
    with handle:
        # Writers append under an exclusive flock; holding a shared one for an instant gives a size at which
        # no append is half done. Lines appended after it are left for the next read: a report run beside a
        # live service never sees a record half written (a write is not atomic for readers).
        # A pipe (`zcat old.jsonl.gz | ctxkit report /dev/stdin`) has no size and no writer to wait for: read it all.
        remaining: float = float("inf")
        if stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
            try:
                remaining = os.fstat(handle.fileno()).st_size
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        for number, raw in enumerate(handle, 1):
            if remaining <= 0:
                break
            if remaining < len(raw):
                raw = raw[:int(remaining)]
            remaining -= len(raw)
            if not raw.strip():
                continue
            try:
                # NaN and Infinity are no JSON (json.dumps writes them): a total or a --json report would be too.
                data = json.loads(raw.decode("utf-8"), parse_constant=_not_a_number)
                yield LedgerRecord.from_dict(data)
            except (ValueError, RecursionError) as exc:  # JSON, UTF-8 and field-type errors are all ValueErrors;
                # a garbled line of '[[[[...' thousands deep is past the parser's own limit
                problem = f"{path}:{number}: not a ledger record ({exc})"
                if strict:
                    raise MalformedLedgerLine(problem) from None
                if skipped is not None:
                    skipped.append(problem)  # the caller says so
                else:
                    logger.warning("ctxkit ledger: skipped %s", problem)


def _not_a_number(constant: str) -> float:
    raise ValueError(f"{constant} is not a number JSON allows")
