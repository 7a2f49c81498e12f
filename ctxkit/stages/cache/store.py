"""The cache store protocol: what the cache stage needs from a place that keeps answers.

Two implementations share one test suite: LocalStore (diskcache for entries and metadata, FAISS for
vectors, under a directory) and PostgresStore (PostgreSQL + pgvector, for many replicas).
Contract for every implementation:
- Entries never cross scopes: `search` only returns entries whose `scope` equals the query's scope.
- Writes are atomic: a reader sees a whole entry or none, also after a writer process is killed.
- Expired entries (now > expires_at) are never returned; `size_bytes` bounds the store with LRU eviction.
- `single_flight(key)` is a context manager that lets one caller at a time (in this process and, for a
  shared store, across processes/replicas) compute the answer for `key`; others wait, then re-check.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np


@dataclasses.dataclass
class CacheEntry:
    key: str  # exact key: hash of the normalized, scoped request
    scope: str  # hash of what a hit must share: namespace, model, sampling params, system prompt, tools
    namespace: str
    query_text: str  # the conversation-aware text that was embedded
    response: dict[str, Any]  # the ChatResponse as an OpenAI chat.completion dict
    created_at: float
    expires_at: float | None = None
    features: dict[str, Any] = dataclasses.field(default_factory=dict)  # for precision guards (numbers, entities...)


@dataclasses.dataclass(frozen=True)
class Hit:
    entry: CacheEntry
    similarity: float


class CacheStore(Protocol):
    def get(self, key: str, now: float) -> CacheEntry | None: ...

    def put(self, entry: CacheEntry, vector: np.ndarray) -> bool | None: ...  # False: refused (full disk, server down)

    def search(self, scope: str, vector: np.ndarray, k: int, now: float) -> list[Hit]: ...

    def invalidate(self, namespace: str) -> int: ...

    def clear(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    def single_flight(self, key: str) -> AbstractContextManager[None]: ...

    def close(self) -> None: ...

