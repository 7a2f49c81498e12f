"""Stage: one small piece of middleware around the rest of the pipeline (Starlette's `call_next`).

Hooks are named for when they run (LangChain v1's agent middleware):

- `before_model(request) -> request`: edit what the model will see (return a copy: `request.override`).
- `after_model(request, response) -> response`: look at or change a whole answer (not applied to streams,
  whose chunks have already gone out; use `stream.on_complete` for those).
- `wrap_call(request, call_next)` / `awrap_call(...)`: full control; answer without calling further
  (a cache), call again (a recovery), or wrap a stream. The defaults run the two hooks above.

A stage never reports its own savings: the pipeline counts the request that goes into a stage and the
request(s) the stage passes on, so the ledger shows exactly what each stage did.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import re
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from ._aio import current_work, in_thread, iterate_in_thread, tracked_to_thread
from .request import ChatRequest
from .response import AsyncChatStream, ChatResponse, ChatStream

Result = ChatResponse | ChatStream
AsyncResult = ChatResponse | AsyncChatStream
CallNext = Callable[[ChatRequest], Result]
AsyncCallNext = Callable[[ChatRequest], Awaitable[AsyncResult]]


class Stage:
    """Base class for stages. Subclasses set `name` or get one from their class name."""

    name: str = ""
    # Whether async calls run this stage's sync before_model/after_model in a worker thread (so a slow hook
    # does not stall the event loop). None: a hook ctxkit wrote does, a hook an application wrote (its own
    # stage, or its override in a subclass of a ctxkit stage) runs on the event loop's thread, as it always
    # did: it may use a contextvar, asyncio.get_running_loop(), or a connection made on that thread (sqlite3).
    hooks_in_thread: bool | None = None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower().removesuffix("_stage")

    def before_model(self, request: ChatRequest) -> ChatRequest:
        return request

    def naive_request(self, request: ChatRequest) -> ChatRequest:
        """The request as the caller would have sent it without this stage, for the ledger's naive count: a
        stage that supplies something the caller registered with it (a tool catalog) puts it back here."""
        return request

    def after_model(self, request: ChatRequest, response: ChatResponse) -> ChatResponse:
        return response

    def wrap_call(self, request: ChatRequest, call_next: CallNext) -> Result:
        request = self.before_model(request)
        result = call_next(request)
        return self.after_model(request, result) if isinstance(result, ChatResponse) else result

    async def awrap_call(self, request: ChatRequest, call_next: AsyncCallNext) -> AsyncResult:
        if type(self).wrap_call is not Stage.wrap_call:
            # A stage that wrote only wrap_call (a guard or cache that answers by itself) must not be skipped
            # by async calls: run it in a worker thread, its call_next running the rest on this event loop.
            return await _wrap_call_in_thread(self, request, call_next)
        # The hooks are sync and may be slow (a stage that embeds documents with MiniLM, scans a long history):
        # on the event loop they would stall every other call it serves. A hook that may (see hooks_in_thread)
        # runs in a worker thread, with this call's context, so record_event still reaches its ledger record.
        if type(self).before_model is not Stage.before_model:
            request = await self._run_hook("before_model", request)
        result = await call_next(request)
        if not isinstance(result, ChatResponse) or type(self).after_model is Stage.after_model:
            return result
        return await self._run_hook("after_model", request, result)

    async def _run_hook(self, hook: str, *args: Any) -> Any:
        method = getattr(self, hook)
        in_thread = self.hooks_in_thread
        if in_thread is None:
            in_thread = getattr(type(self), hook).__module__.startswith("ctxkit.")
        return await tracked_to_thread(method, *args) if in_thread else method(*args)


def _defined_in(cls: type, attr: str) -> type:
    return next(klass for klass in cls.__mro__ if attr in klass.__dict__)


def writes_wrap_call_only(stage: Stage) -> bool:
    """Whether the stage's own `wrap_call` is newer than its `awrap_call`: an application's stage that wrote
    only wrap_call, or its subclass of a ctxkit stage (a cache) that overrides wrap_call only. Async calls must
    run that wrap_call (in a thread of its own), not the inherited awrap_call that would skip it."""
    cls = type(stage)
    sync_owner, async_owner = _defined_in(cls, "wrap_call"), _defined_in(cls, "awrap_call")
    return sync_owner is not async_owner and issubclass(sync_owner, async_owner)


def writes_awrap_call_only(stage: Stage) -> bool:
    """Whether an application wrote the stage's `awrap_call` and no `wrap_call` as new (its async-only stage, or
    its subclass of a ctxkit stage that overrides awrap_call only): a sync call cannot run it, and the inherited
    wrap_call would skip it without a word. (ctxkit's own async-only awrap_calls run the same hooks as wrap_call.)"""
    cls = type(stage)
    sync_owner, async_owner = _defined_in(cls, "wrap_call"), _defined_in(cls, "awrap_call")
    return (sync_owner is not async_owner and issubclass(async_owner, sync_owner)
            and not async_owner.__module__.startswith("ctxkit."))


def _sync_view(stream: AsyncChatStream, loop: asyncio.AbstractEventLoop) -> ChatStream:
    """`stream` (the rest of an async call) as the ChatStream a sync wrap_call expects, on its worker thread:
    each chunk is drawn from the event loop."""
    chunks = stream.__aiter__()

    async def next_chunk() -> dict[str, Any]:
        return await chunks.__anext__()

    def pull() -> Any:
        try:
            while True:
                try:
                    chunk = asyncio.run_coroutine_threadsafe(next_chunk(), loop).result()
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            try:
                on_loop = asyncio.get_running_loop() is loop
            except RuntimeError:
                on_loop = False
            if on_loop:  # collected on the loop's own thread: waiting there would never end
                loop.create_task(stream.aclose())
            else:
                asyncio.run_coroutine_threadsafe(stream.aclose(), loop).result()

    view = ChatStream.relaying(stream, pull())
    view._async_source = stream  # type: ignore[attr-defined]
    return view


def _back_to_async(stream: ChatStream, views: list[ChatStream]) -> AsyncChatStream:
    """A ChatStream a sync wrap_call returned, for the async chain. The view of the rest it passed on unread (a
    stage that wraps nothing) is the rest itself again, with the callbacks the stage set on the view."""
    source = getattr(stream, "_async_source", None)
    if source is None or stream.received_any:
        return _async_view(stream, views)
    source._on_complete.extend(stream._on_complete)
    source._on_error.extend(stream._on_error)
    stream._on_complete.clear()
    stream._on_error.clear()
    stream._failed = True  # handed back: dropping the view records nothing
    return source


def _async_view(stream: ChatStream, views: list[ChatStream]) -> AsyncChatStream:
    """What a sync wrap_call returned for a streaming async call, as the AsyncChatStream the async chain takes:
    its steps on a thread of their own (each may wait for the event loop, see _sync_view). When it ends, so do
    the views of the rest the stage drew it from: a generator of the stage's that is closed half way does not
    close what it was iterating, which would hold the model until collected."""
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ctxkit-stream")

    async def chunks() -> Any:
        try:
            async for chunk in iterate_in_thread(iter(stream), executor):
                yield chunk
        finally:
            try:
                if views:
                    await in_thread(lambda: _close_all(views), executor)
            finally:
                executor.shutdown(wait=False)

    return AsyncChatStream.relaying(stream, chunks())


def _close_all(streams: list[ChatStream]) -> None:
    for stream in streams:
        stream.close()


async def run_wrap_call(stage: Stage, request: ChatRequest, call_next: AsyncCallNext) -> AsyncResult:
    """`stage` in an async call: its awrap_call, or its newer sync wrap_call in a thread of its own."""
    if writes_wrap_call_only(stage):
        return await _wrap_call_in_thread(stage, request, call_next)
    return await stage.awrap_call(request, call_next)


async def _wrap_call_in_thread(stage: Stage, request: ChatRequest, call_next: AsyncCallNext) -> AsyncResult:
    """`stage.wrap_call` on a thread of its own (not the loop's default executor: the backend's async calls
    need its workers while this thread waits for them), its call_next running on this event loop."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[AsyncResult] = loop.create_future()
    # The rest of the call runs as tasks of its own on the loop: a caller cancelled (asyncio.wait_for, a client
    # gone) cancels them too, or the model went on generating the whole answer for no one, holding its lock.
    guard = threading.Lock()
    pending: set[concurrent.futures.Future[AsyncResult]] = set()
    views: list[ChatStream] = []  # the rest's streams, as the stage's thread was given them
    gone = False

    def sync_next(next_request: ChatRequest) -> Result:
        async def rest() -> AsyncResult:
            return await call_next(next_request)

        with guard:
            if gone:
                raise asyncio.CancelledError
            future = asyncio.run_coroutine_threadsafe(rest(), loop)
            pending.add(future)
        try:
            result = future.result()
            # A sync wrap_call iterates a stream as a ChatStream (its docs: "wrap a stream"), not an async one.
            if isinstance(result, AsyncChatStream):
                view = _sync_view(result, loop)
                views.append(view)
                return view
            return result
        finally:
            with guard:
                pending.discard(future)

    def settle(result: Any, error: BaseException | None) -> None:
        if not done.done():
            done.set_exception(error) if error is not None else done.set_result(result)

    tracker = current_work()  # ctxkit serve keeps the call's slot until this thread's work ends too

    def run() -> None:
        try:
            returned = stage.wrap_call(request, sync_next)
            result = _back_to_async(returned, views) if isinstance(returned, ChatStream) else returned
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)
        finally:
            if tracker is not None:
                tracker.finished()

    if tracker is not None:
        tracker.started()
    try:
        threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True,
                         name=f"ctxkit-{stage.name}").start()
    except BaseException:
        if tracker is not None:
            tracker.finished()
        raise
    try:
        return await done
    except asyncio.CancelledError:
        with guard:
            gone = True
            for future in pending:
                future.cancel()
        raise
