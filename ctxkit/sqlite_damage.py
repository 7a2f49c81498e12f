"""Damage a crash or power cut can leave in the SQLite files ctxkit keeps (the local cache's diskcache, the
quarantine registry), told apart from a full or read-only disk and reported as a ConfigurationError that
names the store and what to do, whether it is found when the store opens or on a page read later."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

from .errors import ConfigurationError

_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26  # SQLite's primary result codes for a damaged file, a file of another kind


def is_damage(exc: sqlite3.DatabaseError) -> bool:
    """A damaged file, as opposed to a full disk, a read-only volume or a lock: clearing it loses nothing good."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # a Python without result codes, or none given ("Cannot operate on a closed database")
        return type(exc) is sqlite3.DatabaseError  # its subclasses are locks, misuse, constraints: not damage
    return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


@contextlib.contextmanager
def damage_reported(store: str, remedy: str) -> Iterator[None]:
    """Inside: damage is `ConfigurationError("<store> is damaged (...); <remedy>")`; other errors pass as they are."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if not is_damage(exc):
            raise
        raise ConfigurationError(f"{store} is damaged ({exc}); {remedy}") from exc
