"""The semantic cache: stage (stage.py), keys and scope (keys.py), precision guards (guards.py),
self-correction repair (disfluency.py), and its stores (store.py protocol, local_store.py, pg_store.py)."""

from __future__ import annotations

from .guards import Thresholds
from .local_store import LocalStore
from .stage import ExactCacheStage, Lookup, SemanticCacheStage
from .store import CacheEntry, CacheStore, Hit

__all__ = [
    "CacheEntry", "CacheStore", "ExactCacheStage", "Hit", "LocalStore", "Lookup", "SemanticCacheStage", "Thresholds",
]


def __getattr__(name: str) -> object:
    # PostgresStore needs the `postgres` extra (psycopg); import it only when asked for.
    if name == "PostgresStore":
        from .pg_store import PostgresStore

        return PostgresStore
    raise AttributeError(name)
