"""A real PostgreSQL with pgvector for the shared-cache tests, started by the PyPI package `pgserver`.

pgserver bundles the PostgreSQL binaries and pgvector, initdb's a data directory and starts the server on
a unix socket (as root it runs it under a `pgserver` system user it creates), so CI needs no database
service. Test modules pull these fixtures in with `pytest_plugins = ["tests.pg_fixtures"]`.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """The DSN of a throwaway PostgreSQL server for this test session, deleted at the end."""
    pgserver = pytest.importorskip("pgserver", reason="the shared-store tests need: pip install 'ctxkit[postgres]'")
    import psycopg

    # Not under pytest's tmp dir: that is private to root (0700) and, as root, the server runs as the
    # `pgserver` user, which must reach its data directory to stop cleanly.
    server = pgserver.get_server(tempfile.mkdtemp(prefix="ctxkit-pg-"), cleanup_mode="delete")
    try:
        dsn = server.get_uri()
        with psycopg.connect(dsn, autocommit=True) as conn:
            # A throwaway test server needs no durability; each commit's fsync costs ~8 ms on these disks.
            conn.execute("ALTER SYSTEM SET fsync = off")
            conn.execute("ALTER SYSTEM SET synchronous_commit = off")
            conn.execute("SELECT pg_reload_conf()")
        yield dsn
    finally:
        server.cleanup()


@pytest.fixture
def pg_prefix() -> str:
    """A fresh table prefix, so every test has its own cache tables in the shared server."""
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_pg_store(pg_dsn: str, pg_prefix: str) -> Iterator[Callable[..., object]]:
    """Open PostgresStores on this test's tables (several calls = several replicas); all closed at the end."""
    from ctxkit.stages.cache.pg_store import PostgresStore

    opened: list[PostgresStore] = []

    def make(**kwargs: object) -> PostgresStore:
        kwargs.setdefault("table_prefix", pg_prefix)
        store = PostgresStore(pg_dsn, **kwargs)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()
