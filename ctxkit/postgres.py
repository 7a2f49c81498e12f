"""What ctxkit's PostgreSQL stores share (the semantic cache's and the quarantine registry's): a client-side
bound on how long a statement may wait for the server, error texts without the DSN's password, and the
record of an outage for a store whose calls go on without the database."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def redact_dsn(message: str, dsn: str) -> str:
    """`message` without the password of `dsn`: libpq quotes the part of a DSN it cannot parse, which can be
    the password itself (one with an unencoded `%`) or a piece of it (an unencoded `@` makes libpq take the
    rest of the password as the host name; an unquoted space in `password=...` makes it quote the word after)."""
    secrets: list[str] = []
    # URI: the password runs to the last '@' (libpq splits at the first one, so a piece of it can be the "host")
    found = re.search(r"://[^:/@]*:(.*)@", dsn)
    if found:
        secrets.append(found.group(1))
    # keyword DSN (and a URI's ?password=): up to the next `key=` or the end, quoted or not
    for found in re.finditer(r"password\s*=\s*('(?:[^'\\]|\\.)*'|.*?)(?=\s+\w+\s*=|&|$)", dsn):
        secrets.append(found.group(1))
    pieces: set[str] = set()
    for secret in secrets:
        for s in (secret, secret.strip("'")):
            pieces.add(s)
            # the pieces libpq may quote on their own: split where it splits a DSN
            pieces.update(p for p in re.split(r"[@/?#&\s]+", s.strip("'")) if len(p) >= 3)
    for s in sorted((p for p in pieces if p), key=len, reverse=True):
        message = message.replace(s, "***")
    return message


def error_line(exc: BaseException | None, dsn: str) -> str:
    """A database error's first line (its type when it has none), without the DSN's password: libpq may quote
    it, in a log line or an error message as much as anywhere."""
    text = str(exc).strip()
    return redact_dsn(text.splitlines()[0] if text else type(exc).__name__, dsn)


# SQLSTATEs of a server that ended or refuses sessions: admin shutdown, crash shutdown, cannot connect now,
# too many connections. Class 08 is "connection exception"; a client-side failure (a refused or timed-out
# connect, a socket the watchdog shut) carries no SQLSTATE at all.
_SESSION_LOST = frozenset({"57P01", "57P02", "57P03", "53300"})


def is_server_lost(exc: BaseException) -> bool:
    """Whether `exc` (a psycopg.OperationalError) says the server or the session is gone, rather than that the
    server refused this one statement (a deadlock, a full disk, an index row too large): only the first is an
    outage that calls after it should skip."""
    sqlstate = getattr(exc, "sqlstate", None)
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in _SESSION_LOST


@contextmanager
def statement_watchdog(conn: Any, seconds: float) -> Iterator[None]:
    """Bound, on the client's side, how long the statements run in this block may wait for the server.

    `statement_timeout` and `lock_timeout` are enforced by the server: a server that stopped answering (a
    paused or overloaded VM, a network partition, a frozen backend) enforces nothing, and libpq waits on the
    socket without end, holding the request that made the lookup. Past `seconds` the socket is shut down:
    the statement fails with an OperationalError (a miss, an answer not stored), the connection is broken
    and the pool opens a new one."""
    def fire() -> None:
        with contextlib.suppress(Exception):  # a connection already closed or lost: nothing to wake
            sock = socket.socket(fileno=os.dup(conn.fileno()))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()

    timer = threading.Timer(min(seconds, 1e7), fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


class Outage:
    """Whether a PostgreSQL server is away, for a store whose calls go on without it (a cache, a registry).

    The call that finds the server gone pays its timeout and logs one ERROR (`meanwhile`: what calls do); while
    it is away every other call skips the database at once (`away`), and a background thread calls `probe` (a
    connect and a query, bounded by their timeouts) more slowly each time, at least every `retry_s` seconds,
    until it answers: the next call uses the database again, one WARNING says it is back, and `on_back` runs on
    that thread (to write what waited for the database). `probe` and `on_back` must not hold the store: a store
    dropped during an outage is collected, and `close` ends the thread."""

    def __init__(self, what: str, probe: Callable[[], None], retry_s: float, log: logging.Logger, *,
                 meanwhile: str = "calls go on without it", on_back: Callable[[], None] | None = None) -> None:
        self._what = what
        self._probe = probe
        self.retry_s = retry_s  # read at each wait: it may be changed while the server is away
        self._log = log
        self._meanwhile = meanwhile
        self._on_back = on_back
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._watcher: threading.Thread | None = None
        self._closed = threading.Event()

    @property
    def away(self) -> bool:
        if self._down_since is None:
            return False
        with self._lock:
            self._watch()  # a forked child inherits the outage but not the thread
            return self._down_since is not None

    def found_away(self, reason: str) -> None:
        """A call found the server gone (`reason`: the error's line, without the password)."""
        with self._lock:
            if self._closed.is_set():
                return
            if self._down_since is None:
                self._down_since = time.monotonic()
                self._log.error("%s cannot be reached; %s until it is back: %s", self._what, self._meanwhile, reason)
            self._watch()

    def close(self) -> None:
        self._closed.set()

    def after_fork_in_child(self) -> None:
        """The lock a parent's thread held at the fork would stay held here; its watcher thread is not here."""
        self._lock = threading.Lock()
        self._watcher = None

    def _watch(self) -> None:
        """Start the thread that waits for the server (unless it runs). Under _lock."""
        if self._down_since is not None and not self._closed.is_set() and (
                self._watcher is None or not self._watcher.is_alive()):
            self._watcher = threading.Thread(target=self._wait_until_back, name="ctxkit-postgres-reconnect",
                                             daemon=True)
            self._watcher.start()

    def _wait_until_back(self) -> None:
        wait = 0.0  # at once: when only the session was lost (a frozen or ended backend), a new one ends the outage
        while not self._closed.wait(wait):
            try:
                self._probe()
            except Exception:  # noqa: BLE001 - still away (the call that found it gone logged why)
                wait = min(max(wait * 2, 0.25), self.retry_s)
                continue
            if self._closed.is_set():
                return  # closed while the probe ran: no store to tell, nothing to write
            with self._lock:
                since, self._down_since = self._down_since, None
                self._watcher = None  # a call that finds it gone again from now on starts another
            if since is not None:
                self._log.warning("%s is back after %.0f s", self._what, time.monotonic() - since)
            if self._on_back is not None:
                self._on_back()
            return
