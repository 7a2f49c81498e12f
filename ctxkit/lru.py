"""A bounded, thread-safe memo: values by key, the least recently used dropped past `size`.

Stages keep what they computed once for many calls in one: tool vectors and stemmed tool documents shared
by the indexes of a tool-retrieval stage, document vectors and token counts shared by the rankers of a
pruning stage.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUMemo(Generic[K, V]):
    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: collections.OrderedDict[K, V] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, keys: Iterable[K]) -> dict[K, V]:
        """The values of the keys it holds (each now the most recently used)."""
        with self._lock:
            found = {k: self._entries[k] for k in keys if k in self._entries}
            for k in found:
                self._entries.move_to_end(k)
            return found

    def put(self, entries: Mapping[K, V]) -> None:
        with self._lock:
            for k, value in entries.items():
                self._entries[k] = value
                self._entries.move_to_end(k)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


def memoized_by_digest(size: int) -> Callable[[Callable[[str], V]], Callable[[str], V]]:
    """A decorator: a pure function of one text, remembered for the last `size` texts under a digest of each.
    functools.lru_cache keys by the text itself and so keeps the last `size` texts alive after the requests
    that sent them have ended (tool results, tool schemas: megabytes each, hundreds of megabytes in all)."""

    def decorate(function: Callable[[str], V]) -> Callable[[str], V]:
        memo: LRUMemo[bytes, V] = LRUMemo(size)

        @functools.wraps(function)
        def memoized(text: str) -> V:
            key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            found = memo.get([key])
            if key in found:
                return found[key]
            value = function(text)
            memo.put({key: value})
            return value

        return memoized

    return decorate
