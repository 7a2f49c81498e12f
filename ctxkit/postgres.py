"""What ctxkit's PostgreSQL stores share (the semantic cache's and the quarantine registry's): a client-side
bound on how long a statement may wait for the server, and error texts without the DSN's password."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from collections.abc import Iterator
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
