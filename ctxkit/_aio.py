"""Async helpers for backends whose client library is synchronous (llama.cpp)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()


async def in_thread(fn: Callable[[], T], executor: Executor) -> T:
    """`fn()` in `executor`, with the caller's context variables (as asyncio.to_thread passes them)."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(context.run, fn))


async def iterate_in_thread(iterator: Iterator[T], executor: Executor) -> AsyncGenerator[T, None]:
    """Consume a blocking iterator from async code without blocking the event loop, its steps in `executor`."""
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
            item = await in_thread(step, executor)
            if item is _DONE:
                return
            yield item  # type: ignore[misc]
    finally:
        await in_thread(close, executor)


async def acquire(lock: threading.Lock, deadline: float | None = None) -> bool:
    """Take a thread lock from async code without parking a worker thread on it; False when `deadline` (on
    the monotonic clock) passed first. Worker threads blocked on a lock that a stream holds are the threads
    that stream's next step needs (they come from the same pool, min(32, cores + 4) of them): enough
    waiting calls and nothing moves again."""
    delay = 0.0005
    while not lock.acquire(blocking=False):
        if deadline is not None and time.monotonic() >= deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True


async def to_thread_holding(lock: threading.Lock, fn: Callable[[], T], executor: Executor) -> T:
    """`fn()` in a worker thread of `executor`, with `lock` (already taken by the caller) released when `fn`
    ends: in that thread once `fn` has started (a cancelled caller leaves it running), here if it never did."""
    claim = threading.Lock()
    state = "waiting"

    def run() -> T:
        nonlocal state
        with claim:
            if state == "abandoned":  # the caller went away before this thread began, and let go itself
                raise asyncio.CancelledError
            state = "running"
        try:
            return fn()
        finally:
            lock.release()

    try:
        return await in_thread(run, executor)
    except BaseException:
        with claim:
            if state == "waiting":
                state = "abandoned"
                lock.release()
        raise


async def enter_in_thread(flight: Any) -> None:
    """`flight.__enter__()` (a blocking lock's context manager) in a worker thread. A caller cancelled while it
    waits (asyncio.wait_for) leaves that thread waiting: once it has the lock, the thread lets go of it itself,
    or no one would until the cancelled call's frames were collected (never, while its exception is kept)."""
    claim = threading.Lock()
    state = "waiting"

    def enter() -> None:
        nonlocal state
        flight.__enter__()
        with claim:
            if state == "abandoned":
                flight.__exit__(None, None, None)
                return
            state = "entered"

    try:
        await asyncio.to_thread(enter)
    except BaseException:
        with claim:
            entered, state = state == "entered", "abandoned"
        if entered:  # cancelled after the thread took the lock, before this task resumed
            flight.__exit__(None, None, None)
        raise


class WorkTracker:
    """The worker-thread work a call started (its stages' hooks, counting), for a caller that abandons the
    call: cancelling the task does not stop a thread, so its work goes on, and whoever limits how many calls
    run at once (`ctxkit serve`'s slots) must count it until it ends. Set with `track_work`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()

    def started(self) -> None:
        with self._lock:
            self._running += 1
            self._idle.clear()

    def finished(self) -> None:  # in the worker thread
        with self._lock:
            self._running -= 1
            if self._running == 0:
                self._loop.call_soon_threadsafe(self._idle.set)

    async def idle(self) -> None:
        """Until no worker thread of the call runs any more."""
        while True:
            await self._idle.wait()
            with self._lock:
                if self._running == 0:
                    return
            self._idle.clear()


_work: contextvars.ContextVar[WorkTracker | None] = contextvars.ContextVar("ctxkit_work", default=None)


def current_work() -> WorkTracker | None:
    """The WorkTracker of this context (see track_work), if any: for work started in a thread of its own."""
    return _work.get()


def track_work() -> WorkTracker:
    """Count the worker-thread work of what runs in this context from now on (a task created after it)."""
    tracker = WorkTracker()
    _work.set(tracker)
    return tracker


async def tracked_to_thread(fn: Callable[..., T], /, *args: Any) -> T:
    """asyncio.to_thread, counted by the context's WorkTracker when there is one: the thread's work ends
    when `fn` returns, not when the awaiting task is cancelled."""
    tracker = _work.get()
    if tracker is None:
        return await asyncio.to_thread(fn, *args)
    tracker.started()
    guard = threading.Lock()
    state = {"ran": False, "dropped": False}

    def run() -> T:
        with guard:
            if state["dropped"]:  # the caller left before a worker took this job: it was counted as ended
                raise asyncio.CancelledError
            state["ran"] = True
        try:
            return fn(*args)
        finally:
            tracker.finished()

    try:
        return await asyncio.to_thread(run)
    except BaseException:
        # Cancelled while the job still waited in the executor's queue (every worker busy): the executor drops
        # it, so `run` never calls finished(), and the slot that waits for idle() would be held for good.
        with guard:
            if not state["ran"]:
                state["dropped"] = True
                tracker.finished()
        raise
