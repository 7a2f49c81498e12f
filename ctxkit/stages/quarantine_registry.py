"""What a QuarantineStage has quarantined, released and written in its place, per namespace.

In memory by default. With a directory, the registry is also kept on disk (diskcache: each change one
SQLite transaction), so a restarted process, or another process given the same directory (the workers of
one proxy), keeps the list and, above all, the releases: content an operator vouched for is not held back
again after a restart. Each process works from its own copy of a namespace and reads the disk copy again
when another process changed it (a generation number per namespace says so), so a call costs one small
read, not a load of every record.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from .quarantine import QuarantineRecord


@dataclasses.dataclass
class Namespace:
    """One namespace's state. Each dict keeps insertion order, so the oldest entry goes first past the bound.

    records:  fingerprint -> the quarantine record.
    released: fingerprints the app vouched for.
    issued:   placeholders this registry's stage wrote (only those count as already handled: a tool can
              return text that starts like one).
    """

    records: dict[str, QuarantineRecord] = dataclasses.field(default_factory=dict)
    released: dict[str, None] = dataclasses.field(default_factory=dict)
    issued: dict[str, None] = dataclasses.field(default_factory=dict)
    generation: int = 0


class QuarantineRegistry:
    """Per namespace, at most `max_records` records, released fingerprints and placeholders each."""

    def __init__(self, max_records: int, directory: str | Path | None = None) -> None:
        self.max_records = max_records
        self._lock = threading.Lock()
        self._spaces: dict[str, Namespace] = {}
        self._disk: Any = None
        if directory is not None:
            import diskcache

            Path(directory).mkdir(parents=True, exist_ok=True)
            # Every value inline in SQLite, never in a file of its own: diskcache deletes a value's old file
            # as soon as set() returns, before transact() commits, so a writer killed (or interrupted) before
            # the commit left the row pointing at a deleted file (the whole namespace read back empty), and a
            # process reading meanwhile saw the namespace empty.
            try:
                self._disk = diskcache.Cache(str(directory), eviction_policy="none", disk_min_file_size=1 << 62)
            except sqlite3.DatabaseError as exc:
                raise ConfigurationError(f"the quarantine registry in {directory} is damaged ({exc}); move the "
                                         "directory aside to start with an empty registry") from exc

    def snapshot(self, namespace: str) -> Namespace:
        """A copy of the namespace's state, as the disk has it now."""
        with self._lock:
            space = self._current(namespace)
            return Namespace(dict(space.records), dict(space.released), dict(space.issued), space.generation)

    def namespaces(self) -> list[str]:
        with self._lock:
            if self._disk is not None:
                for key in self._disk.iterkeys():
                    if isinstance(key, tuple) and key[0] == "space":
                        self._current(key[1])
            return list(self._spaces)

    def add_record(self, record: QuarantineRecord) -> QuarantineRecord:
        """Keep `record`; when its content was quarantined already (another thread or process got there
        first), the record that was kept."""
        found: list[QuarantineRecord] = []

        def change(space: Namespace) -> bool:
            if record.fingerprint in space.records:
                found.append(space.records[record.fingerprint])
                return False
            self._bounded(space.records, record.fingerprint, record)
            return True

        self._update(record.namespace, change)
        return found[0] if found else record

    def release(self, fingerprint: str, namespace: str) -> bool:
        """Lift one quarantine; False when nothing with that fingerprint was quarantined there."""
        def change(space: Namespace) -> bool:
            if space.records.pop(fingerprint, None) is None:
                return False
            self._bounded(space.released, fingerprint, None)
            return True

        return self._update(namespace, change)

    def add_issued(self, namespace: str, placeholder: str) -> None:
        def change(space: Namespace) -> bool:
            if placeholder in space.issued:
                return False
            self._bounded(space.issued, placeholder, None)
            return True

        self._update(namespace, change)

    # -- internals ----------------------------------------------------------------------------------
    def _bounded(self, entries: dict[str, Any], key: str, value: Any) -> None:
        entries[key] = value
        while len(entries) > self.max_records:
            del entries[next(iter(entries))]

    def _current(self, namespace: str) -> Namespace:
        """The namespace's state, read again from disk when another process changed it; under _lock."""
        space = self._spaces.get(namespace)
        if self._disk is None:
            return self._spaces.setdefault(namespace, Namespace()) if space is None else space
        generation = self._disk.get(("generation", namespace), 0)
        if space is None or space.generation != generation:
            stored = self._disk.get(("space", namespace))
            space = stored if isinstance(stored, Namespace) else Namespace()
            space.generation = generation
            self._spaces[namespace] = space
        return space

    def _update(self, namespace: str, change: Any) -> bool:
        """Apply `change(space) -> changed?` to the namespace, on disk in one transaction when there is one."""
        with self._lock:
            if self._disk is None:
                return bool(change(self._current(namespace)))
            with self._disk.transact():  # another process's change in between is read, then built upon
                space = self._current(namespace)
                if not change(space):
                    return False
                space.generation += 1
                self._disk.set(("space", namespace), space)
                self._disk.set(("generation", namespace), space.generation)
            return True


__all__ = ["Namespace", "QuarantineRegistry"]
