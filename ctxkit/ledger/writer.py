"""The ledger: JSON lines appended safely from many threads and processes, and mirrored to `logging`.

Each record is one `os.write` of one whole line to a file opened with O_APPEND, under an exclusive
`flock`: O_APPEND makes every write land at the end, the lock keeps long lines from interleaving, so
no line is lost or torn however many writers there are.
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import LedgerError
from .record import LedgerRecord

logger = logging.getLogger("ctxkit")


class Ledger:
    """Where call records go. `path=None` keeps them in memory only (and still logs them)."""

    def __init__(self, path: str | Path | None = None, *, keep_in_memory: int = 10_000) -> None:
        self.path = Path(path) if path is not None else None
        self.records: collections.deque[LedgerRecord] = collections.deque(maxlen=keep_in_memory)
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: LedgerRecord) -> None:
        line = json.dumps(record.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock:
            self.records.append(record)
            if self.path is not None:
                self._append(line.encode("utf-8"))
        logger.info("%s", line.rstrip("\n"), extra={"ctxkit_record": record.to_dict()})

    def _append(self, data: bytes) -> None:
        assert self.path is not None
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LedgerError(f"cannot open ledger {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            written = 0
            while written < len(data):  # a short write is rare but legal; finish the line under the lock
                written += os.write(fd, data[written:])
        except OSError as exc:
            raise LedgerError(f"cannot append to ledger {self.path}: {exc}") from exc
        finally:
            os.close(fd)  # closing releases the lock


def read_ledger(path: str | Path, *, strict: bool = True) -> Iterator[LedgerRecord]:
    """The records of a ledger file, in order. A malformed line raises LedgerError naming it, unless
    `strict=False`, which skips it (a process killed mid-write can leave a partial last line)."""
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise LedgerError(f"cannot read ledger {path}: {exc}") from exc
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield LedgerRecord.from_dict(json.loads(line))
            except (json.JSONDecodeError, TypeError) as exc:
                if strict:
                    raise LedgerError(f"{path}:{number}: not a ledger record ({exc})") from None
