"""Async helpers for backends whose client library is synchronous (llama.cpp)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


async def iterate_in_thread(iterator: Iterator[T]) -> AsyncIterator[T]:
    """Consume a blocking iterator from async code without blocking the event loop."""
    # A task cancelled while a worker thread runs next() leaves that step running: closing the generator
    # then would fail ("generator already executing") and leave it open, holding whatever it holds (the
    # llama.cpp model). Steps and the close take turns on this lock, so the close waits for the step.
    turn = threading.Lock()

    def step() -> object:
        with turn:
            return next(iterator, _DONE)

    def close() -> None:
        with turn:
            closer = getattr(iterator, "close", None)
            if closer is not None:
                closer()

    try:
        while True:
            item = await asyncio.to_thread(step)
            if item is _DONE:
                return
            yield item  # type: ignore[misc]
    finally:
        await asyncio.to_thread(close)
