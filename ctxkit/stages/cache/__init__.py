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
