"""The OpenAI-compatible proxy: any app that speaks the OpenAI API points its base URL here and gets ctxkit.

    app = create_app(pipeline, ApiKeys.from_env())       # a Starlette ASGI app; `ctxkit serve` runs it

Endpoints: POST /v1/chat/completions (JSON, or server-sent events with `"stream": true`), GET /v1/models,
GET /healthz, GET /metrics (Prometheus; a metrics token, or loopback clients only). Every /v1 call needs `Authorization: Bearer <key>`; the key's
namespace is set on the request, so stateful stages never answer one tenant from another's data. Errors
use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: a malformed request is a 400 naming
the field, a backend's own HTTP status passes through, an unreachable backend is a 502 and a backend
that timed out a 504.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .._aio import WorkTracker, track_work
from ..errors import (
    BackendConnectionError,
    BackendError,
    BackendStatusError,
    BackendTimeoutError,
    ContextOverflowError,
    CtxkitError,
    QuarantineStoreUnavailable,
    RequestError,
    ResponseFormatError,
    ToolCallSchemaError,
)
from ..pipeline import Pipeline
from ..redaction import redact
from ..request import TRANSPORT_OPTIONS, ChatRequest
from ..response import ChatResponse
from ..settings import whole_number
from ..stages.quarantine import QuarantineStage
from ..validation import BACKEND_SAMPLING
from .auth import ApiKeys
from .metrics import MeteredLedger, ProxyMetrics

# Decoding fields of the servers an upstream is (llama.cpp's `grammar`/`json_schema`, vLLM's guided decoding), which
# the openai client sends from `extra_body` at the top level of the body as it does top_k: handed on as extra_body,
# as `pipeline.openai()` hands them to OpenAIBackend (the local model refuses them by name, as it does there).
UPSTREAM_DECODING = frozenset({"grammar", "json_schema", "n_probs", "repeat_last_n", "ignore_eos", "min_tokens",
                               "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"})

logger = logging.getLogger("ctxkit.server")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# Fields a client may set under `extra_body={"ctxkit": {...}}`; the namespace comes from the key only.
CLIENT_FIELDS = frozenset({"conversation_id", "metadata"})


LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
# Retry-After for a full queue: the calls ahead times the average slot hold, per slot. The average starts
# at a guess and follows recent calls; the openai client waits what it is told only up to 60 s. Each refused
# call is given its own return time, one slot hold after the one refused before it: the same wait for a whole
# burst brought every refused client back at the same instant, to be refused again (11 of 20 openai clients
# failed after their retries against --max-concurrency 1 --max-queue 2, for 2 s of model work).
SERVICE_SECONDS_START = 2.0
SERVICE_SECONDS_WEIGHT = 0.2
MAX_RETRY_AFTER_S = 60


class HTTPError(Exception):
    """An error answer: status, OpenAI error type, message and the offending field."""

    def __init__(self, status: int, kind: str, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.param, self.code = status, kind, message, param, code
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        return JSONResponse(body, status_code=self.status, headers={**headers, **self.headers})


def error_for(exc: BaseException) -> HTTPError:
    """The HTTP answer for an exception raised while serving a call. Its text goes to the tenant: an
    upstream's error can quote the proxy's own upstream key (or a header), so it is redacted as in the ledger."""
    text = redact(str(exc))
    if isinstance(exc, ContextOverflowError):
        return HTTPError(400, "invalid_request_error", text, exc.where, "context_length_exceeded")
    if isinstance(exc, RequestError):
        return HTTPError(400, "invalid_request_error", text, exc.where)
    if isinstance(exc, BackendStatusError) and exc.status in (401, 403):
        # The proxy's own upstream key was refused: not the client's key, so not a 401 to the client.
        return HTTPError(502, "upstream_error", text, code=f"upstream_{exc.status}")
    if isinstance(exc, BackendStatusError) and exc.status is not None:
        retry_after = exc.retry_after  # the upstream's own wait (a 429), for the client's retry
        return HTTPError(exc.status, "upstream_error", text, code=f"upstream_{exc.status}",
                         headers={"Retry-After": retry_after} if retry_after else None)
    if isinstance(exc, BackendTimeoutError):
        return HTTPError(504, "upstream_timeout", text, code="upstream_timeout")
    if isinstance(exc, ToolCallSchemaError):  # the model answered, but with a call its tool's schema refuses
        return HTTPError(502, "upstream_error", text, code="invalid_tool_call")
    if isinstance(exc, ResponseFormatError):  # the model answered, but with JSON the response format's schema refuses
        return HTTPError(502, "upstream_error", text, code="invalid_response_format")
    if isinstance(exc, (BackendConnectionError, BackendError)):
        return HTTPError(502, "upstream_error", text, code="upstream_unavailable")
    if isinstance(exc, CtxkitError):
        return HTTPError(500, "server_error", text)
    return HTTPError(500, "server_error", "internal error (see the server log)")


class _Proxy:
    """The request handlers, with the pipeline, keys and metrics they share."""

    def __init__(self, pipeline: Pipeline, keys: ApiKeys, metrics: ProxyMetrics, *, max_body_bytes: int,
                 max_concurrency: int, max_queue: int | None, metrics_token: str | None) -> None:
        self.pipeline = pipeline
        self.keys = keys
        self.metrics = metrics
        self.metrics_token = metrics_token.encode() if metrics_token else None
        self.max_body_bytes = max_body_bytes
        # Waiting requests queue here, in the event loop, rather than in worker threads: a local model
        # serves one generation at a time, and a thread blocked on its lock helps nobody.
        self.slots = asyncio.Semaphore(max_concurrency)
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.waiting = 0
        self.hold_seconds = SERVICE_SECONDS_START  # moving average of how long a call holds its slot
        self.last_return_at = 0.0  # the latest return time (time.monotonic) handed to a refused call
        self.started = int(time.time())

    # -- endpoints ----------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            namespace = self._authenticate(request)
            payload = await self._json_body(request)
            chat = self._chat_request(payload, namespace)
            include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
            response = await self._answer(chat, include_usage, t0, request)
        except HTTPError as exc:
            return self._failed("chat", exc)
        except asyncio.CancelledError:
            # uvicorn's --graceful-timeout after SIGTERM (a client that leaves is a 499, not this): a call in
            # flight is ledgered as cancelled by now, a queued one never reached the pipeline. Answered in OpenAI's
            # shape as a 503 the client may retry elsewhere, not uvicorn's plain-text 500 and a logged traceback.
            return self._failed("chat", HTTPError(
                503, "server_shutting_down", "the proxy is shutting down (SIGTERM) and cancelled this call: retry",
                code="shutting_down", headers={"Connection": "close"}))
        except Exception as exc:
            if not isinstance(exc, CtxkitError):
                logger.exception("unexpected error serving a chat completion")
            error = error_for(exc)
            if isinstance(exc, BackendError) and getattr(self.pipeline.backend, "max_retries", 0) > 0:
                # The backend already retried this call (OpenAIBackend's --upstream-retries): the openai client
                # retrying it again (2 more by default) multiplies the upstream's load, and its bill on timeouts.
                error.headers["x-should-retry"] = "false"
            return self._failed("chat", error)
        if not chat.stream:
            self.metrics.request_seconds.labels("false").observe(time.perf_counter() - t0)
        self.metrics.requests.labels("chat", str(response.status_code)).inc()
        return response

    async def models(self, request: Request) -> Response:
        try:
            self._authenticate(request)
        except HTTPError as exc:
            return self._failed("models", exc)
        self.metrics.requests.labels("models", "200").inc()
        return JSONResponse({"object": "list", "data": [self._model()]})

    async def model(self, request: Request) -> Response:
        """GET /v1/models/{model}: openai's `client.models.retrieve(id)`; another id is a 404 as OpenAI's."""
        try:
            self._authenticate(request)
            wanted = request.path_params["model"]
            if wanted != self.pipeline.backend.model:
                raise HTTPError(404, "invalid_request_error", f"The model {wanted!r} does not exist; this proxy "
                                f"serves {self.pipeline.backend.model!r}", param="model", code="model_not_found")
        except HTTPError as exc:
            return self._failed("models", exc)
        self.metrics.requests.labels("models", "200").inc()
        return JSONResponse(self._model())

    def _model(self) -> dict[str, Any]:
        return {"id": self.pipeline.backend.model, "object": "model", "created": self.started, "owned_by": "ctxkit"}

    async def healthz(self, request: Request) -> Response:
        backend = self.pipeline.backend
        return JSONResponse({"status": "ok", "backend": backend.name, "model": backend.model,
                             "stages": [stage.name for stage in self.pipeline.stages]})

    async def metrics_endpoint(self, request: Request) -> Response:
        # The metrics name every tenant and its traffic: a scraper shows the metrics token, and without
        # one configured only the machine itself may read them.
        if self.metrics_token is None:
            if (request.client.host if request.client else "") not in LOOPBACK:
                return self._failed("metrics", HTTPError(
                    403, "permission_error", "metrics are served to loopback clients only; set a metrics "
                    "token (CTXKIT_METRICS_TOKEN) to scrape them from elsewhere", code="metrics_loopback_only"))
        else:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.metrics_token):
                return self._failed("metrics", HTTPError(401, "authentication_error",
                                                         "metrics need 'Authorization: Bearer <metrics token>'",
                                                         code="invalid_metrics_token"))
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def quarantine_list(self, request: Request) -> Response:
        """The caller's namespace's quarantined content, oldest first (evidence redacted as the ledger has it)."""
        try:
            namespace = self._authenticate(request)
            records = [dataclasses.asdict(r) for stage in self._quarantines() for r in stage.list(namespace)]
        except HTTPError as exc:
            return self._failed("quarantine", exc)
        self.metrics.requests.labels("quarantine", "200").inc()
        return JSONResponse({"object": "list", "data": records})

    async def quarantine_release(self, request: Request) -> Response:
        """Lift one quarantine of the caller's namespace: the content reaches summaries and the cache again."""
        try:
            namespace = self._authenticate(request)
            fingerprint = request.path_params["fingerprint"]
            if not any([stage.release(fingerprint, namespace) for stage in self._quarantines()]):
                raise HTTPError(404, "not_found_error", f"nothing quarantined with fingerprint {fingerprint!r} "
                                "in this namespace", param="fingerprint", code="quarantine_not_found")
        except QuarantineStoreUnavailable as exc:  # the shared registry's database is away: retry later
            # The operator's log gets the cause; the tenant gets no path, host or database error of the deployment.
            logger.warning("quarantine release for namespace %r refused: %s", namespace, exc)
            return self._failed("quarantine", HTTPError(503, "service_unavailable",
                                                        "the quarantine store is unavailable; try again later",
                                                        code="quarantine_store_unavailable",
                                                        headers={"Retry-After": "10"}))
        except HTTPError as exc:
            return self._failed("quarantine", exc)
        self.metrics.requests.labels("quarantine", "200").inc()
        return JSONResponse({"fingerprint": fingerprint, "released": True})

    # -- steps --------------------------------------------------------------------------------------
    def _quarantines(self) -> list[QuarantineStage]:
        stages = [stage for stage in self.pipeline.stages if isinstance(stage, QuarantineStage)]
        if not stages:
            raise HTTPError(404, "not_found_error", "this proxy runs no quarantine stage", code="no_quarantine")
        return stages

    def _failed(self, endpoint: str, exc: HTTPError) -> Response:
        self.metrics.requests.labels(endpoint, str(exc.status)).inc()
        self.metrics.errors.labels(exc.kind).inc()
        return exc.response()

    def _authenticate(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise HTTPError(401, "authentication_error", "missing API key: send 'Authorization: Bearer <key>'",
                            code="missing_api_key")
        namespace = self.keys.namespace_for(key.strip())
        if namespace is None:
            raise HTTPError(401, "authentication_error", "invalid API key", code="invalid_api_key")
        return namespace

    async def _json_body(self, request: Request) -> dict[str, Any]:
        too_large = HTTPError(413, "request_too_large", f"request body exceeds {self.max_body_bytes} bytes",
                              code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large
        body = bytearray()
        try:
            async for part in request.stream():  # counted as it arrives: a chunked upload cannot slip past
                body += part
                if len(body) > self.max_body_bytes:
                    raise too_large
        except ClientDisconnect:  # hung up half way through its upload: a 499 as ever, not a 500 and a traceback
            raise HTTPError(499, "client_closed_request", "the client closed the connection",
                            code="client_closed") from None
        try:
            # NaN, Infinity and numbers that overflow to them (1e400) are not JSON (RFC 8259), though Python's
            # parser takes them: refused here, else they reach a backend (a TypeError in llama.cpp's ctypes, a
            # ValueError in the openai client's strict encoder) and come back as a 500/502 the SDK retries.
            payload = json.loads(body, parse_constant=_not_json, parse_float=_finite_float)
        except RecursionError:  # '[[[[...' thousands deep: the parser's own limit, not a server fault
            raise HTTPError(400, "invalid_request_error", "body is nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer past Python's 4300 digits
            raise HTTPError(400, "invalid_request_error", f"body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise HTTPError(400, "invalid_request_error", "body must be a JSON object")
        return payload

    def _chat_request(self, payload: dict[str, Any], namespace: str) -> ChatRequest:
        payload = dict(payload)
        if "extra_body" in payload:  # only the Python client knows extra_body; on the wire it is a smuggling route
            raise RequestError("is not a request field (the client merges extra_body into the body)", "extra_body")
        for option in TRANSPORT_OPTIONS:  # the Python client's HTTP options; in a body, headers for the upstream
            if option in payload:
                raise RequestError("is not a request field (the openai client applies it to its own HTTP request)",
                                   option)
        ctx = payload.pop("ctxkit", None) or {}
        if not isinstance(ctx, dict):
            raise RequestError("must be an object", "ctxkit")
        if "namespace" in ctx:
            raise RequestError("is set by the API key, not by the request", "ctxkit.namespace")
        unknown = sorted(set(ctx) - CLIENT_FIELDS)
        if unknown:
            raise RequestError(f"unsupported field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(CLIENT_FIELDS))}",
                               "ctxkit")
        if "messages" not in payload:
            raise RequestError("is required", "messages")
        if not isinstance(payload["messages"], list):
            raise RequestError("must be a list of messages", "messages")
        tools = payload.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise RequestError("must be a list of tool schemas", "tools")
        if payload.get("n") not in (None, 1):
            raise RequestError("only n=1 is supported", "n")
        # The proxy serves its backend's model whatever name the app asks for (as llama.cpp's server does).
        payload["model"] = None
        # The openai client sends `extra_body={"top_k": 40}` as a top-level "top_k": hand these on as extra_body.
        extra = {key: payload.pop(key) for key in sorted((BACKEND_SAMPLING | UPSTREAM_DECODING) & set(payload))}
        if extra:
            payload["extra_body"] = extra
        return ChatRequest.from_openai_kwargs(payload, namespace=namespace, **ctx)

    async def _take_slot(self, request: Request) -> None:
        """Waits for a free slot; past `max_queue` waiting calls, answers 503 at once with a Retry-After
        (the openai client honours it), rather than letting every caller time out behind an endless queue."""
        if self.max_queue is not None and self.slots.locked() and self.waiting >= self.max_queue:
            now = time.monotonic()
            per_slot = self.hold_seconds / self.max_concurrency
            drained = now + per_slot * (self.waiting + 1)  # when the calls waiting now have had their turn
            at = min(max(drained, self.last_return_at + per_slot), now + MAX_RETRY_AFTER_S)
            self.last_return_at = at
            wait = at - now
            raise HTTPError(503, "server_overloaded",
                            f"the proxy is at capacity ({self.max_concurrency} calls in flight, {self.waiting} "
                            f"waiting, --max-queue {self.max_queue}): retry later",
                            code="queue_full", headers={
                                "Retry-After": str(min(max(math.ceil(wait), 1), MAX_RETRY_AFTER_S)),
                                # the openai clients read this first: the spread survives rounding to seconds
                                "retry-after-ms": str(max(int(wait * 1000), 1)),
                            })
        self.waiting += 1
        self.metrics.queued.inc()
        try:
            await _unless_disconnected(request, self.slots.acquire())
        finally:
            self.waiting -= 1
            self.metrics.queued.dec()

    async def _answer(self, chat: ChatRequest, include_usage: bool, t0: float, request: Request) -> Response:
        # A client that hangs up (its timeout, then the openai client's retry) must not leave its call
        # queued for the model: uvicorn does not cancel a handler whose client left, so watch for it.
        await self._take_slot(request)
        self.metrics.in_flight.inc()
        released = False
        held_since = time.perf_counter()

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.slots.release()
                self.metrics.in_flight.dec()
                held = time.perf_counter() - held_since
                self.hold_seconds += SERVICE_SECONDS_WEIGHT * (held - self.hold_seconds)

        stream: Any = None
        # The call's stage work runs in worker threads, which a client that hangs up does not stop: counted
        # here, so its slot is freed when that work ends (else each abandoned 4 MB call left a summarization
        # running for minutes beside the next ones, and every tenant's calls queued behind them for threads).
        work = _tracked()
        try:
            result = await _unless_disconnected(request, work.run(self.pipeline.acall(chat)))
            if isinstance(result, ChatResponse):
                release()
                return JSONResponse(result.to_openai())
            stream = result
            chunks = stream.__aiter__()
            # Wait for the first chunk before answering 200: an upstream that fails now still gets its status.
            # A client that leaves meanwhile (a long prompt's time to first token) is not noticed by a response
            # that does not exist yet: watch for it here too, or its call keeps the slot and the upstream busy.
            first = await _unless_disconnected(request, chunks.__anext__())
        except StopAsyncIteration:
            first = None
        except BaseException:
            if stream is not None:
                await stream.aclose()
            await work.idle()
            release()
            raise

        async def events() -> AsyncIterator[bytes]:
            try:
                usage_sent = False
                if first is not None:
                    if first.get("choices") or include_usage:  # a usage-only chunk only when asked for
                        yield _sse(first)
                    usage_sent = bool(first.get("usage"))
                    async for chunk in chunks:
                        if chunk.get("choices") or include_usage:
                            usage_sent = usage_sent or bool(chunk.get("usage"))
                            yield _sse(chunk)
                if include_usage and not usage_sent and stream.response is not None:
                    # The upstream reports no usage for streams (llama.cpp's server): the client asked for
                    # it, and the stream counted it, so send the final usage chunk OpenAI would.
                    whole = stream.response
                    yield _sse({"id": whole.id, "object": "chat.completion.chunk", "created": whole.created,
                                "model": whole.model, "choices": [], "usage": whole.to_openai()["usage"]})
                yield b"data: [DONE]\n\n"
            except Exception as exc:  # headers are gone: report in-band, as OpenAI does
                error = error_for(exc)
                self.metrics.errors.labels(error.kind).inc()
                yield _sse({"error": {"message": error.message, "type": error.kind, "code": error.code}})
            finally:
                self.metrics.request_seconds.labels("true").observe(time.perf_counter() - t0)

        async def end() -> None:  # however the answer ended (a client that hung up too): free the model
            await stream.aclose()
            release()

        return _StreamingAnswer(events(), end, media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _tracked:
    """Runs a coroutine in a context of its own that counts the worker-thread work it starts (_aio.WorkTracker)."""

    def __init__(self) -> None:
        self.tracker: WorkTracker | None = None

    async def run(self, work: Awaitable[Any]) -> Any:
        self.tracker = track_work()  # this task's context only (the task was made with a copy of the caller's)
        return await work

    async def idle(self) -> None:
        if self.tracker is not None:
            await self.tracker.idle()


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """`await work`, cancelled (and a 499) if the client disconnects first. Call only once the body is read."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        # Cancelled itself (uvicorn's --graceful-timeout on SIGTERM): let the call unwind before this handler
        # ends, or the server's shutdown, which waits for handlers only, exits before its ledger record is written.
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise HTTPError(499, "client_closed_request", "the client closed the connection", code="client_closed")
    return task.result()


class _StreamingAnswer(StreamingResponse):
    """Server-sent events that end their stream and free its slot however the response ends, including
    when the body never starts: a client gone before the headers makes `send` raise (ASGI 2.4), and then
    the body's own cleanup never runs."""

    def __init__(self, content: AsyncIterator[bytes], end: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._end = end

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = False

        async def watched(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await super().__call__(scope, receive, watched)
        except asyncio.CancelledError:
            # uvicorn's --graceful-timeout after SIGTERM (a client that leaves ends the body without this): end the
            # stream with OpenAI's in-band error event, which the openai client raises as an APIError saying why,
            # not a body cut mid-event (a 'Connection error.') and 'Exception in ASGI application' in the log.
            error = {"message": "the proxy is shutting down (SIGTERM) and cancelled this call: retry",
                     "type": "server_shutting_down", "code": "shutting_down"}
            with contextlib.suppress(Exception):
                if started:
                    await send({"type": "http.response.body", "body": _sse({"error": error}), "more_body": False})
                else:
                    await HTTPError(503, error["type"], error["message"], code=error["code"],
                                    headers={"Connection": "close"}).response()(scope, receive, send)
        finally:
            await self._end()


def _not_json(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _sse(chunk: dict[str, Any]) -> bytes:
    usage = chunk.get("usage")
    if usage and "ctxkit_reported" in usage:  # internal flag, not part of the OpenAI format
        chunk = {**chunk, "usage": {k: v for k, v in usage.items() if k != "ctxkit_reported"}}
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def create_app(
    pipeline: Pipeline,
    keys: ApiKeys,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_concurrency: int | None = None,
    max_queue: int | None = None,
    metrics: ProxyMetrics | None = None,
    metrics_token: str | None = None,
) -> Starlette:
    """The proxy as an ASGI app serving `pipeline` (its stages, backend and ledger).

    max_body_bytes:  larger request bodies get 413 before they are parsed.
    max_concurrency: calls in flight at once; others wait their turn. Default: 1 for an in-process
                     llama.cpp model (it generates one answer at a time anyway), 64 for a remote backend.
    max_queue:       calls that may wait for a slot; one more gets 503 `queue_full` with a Retry-After, so a
                     burst is shed (or sent to another replica) instead of timing out. Default: no limit.
    metrics_token:   the bearer token /metrics asks for; without one, /metrics answers loopback clients only.
    """
    from ..backends.llama_cpp import LlamaCppBackend

    max_body_bytes = whole_number(max_body_bytes, "max_body_bytes", minimum=1)
    if max_concurrency is None:
        max_concurrency = 1 if isinstance(pipeline.backend, LlamaCppBackend) else 64
    max_concurrency = whole_number(max_concurrency, "max_concurrency", minimum=1)
    if max_queue is not None:
        max_queue = whole_number(max_queue, "max_queue")
    metrics = metrics if metrics is not None else ProxyMetrics()
    # The same stages, backend and ledger; the ledger is teed into the metrics on the way.
    metered = Pipeline(pipeline.backend, pipeline.stages, ledger=MeteredLedger(pipeline.ledger, metrics),
                       prices=pipeline.prices)
    proxy = _Proxy(metered, keys, metrics, max_body_bytes=max_body_bytes, max_concurrency=max_concurrency,
                   max_queue=max_queue, metrics_token=metrics_token)
    async def routing_error(request: Request, exc: Exception) -> Response:
        # An unknown path (/v1/embeddings) or method answers in OpenAI's error shape too, not plain text.
        assert isinstance(exc, StarletteHTTPException)
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        error = HTTPError(exc.status_code, kind, f"{request.method} {request.url.path}: {exc.detail}",
                          code="unknown_url" if exc.status_code == 404 else "method_not_allowed")
        response = error.response()
        response.headers.update(exc.headers or {})
        return response

    app = Starlette(exception_handlers={StarletteHTTPException: routing_error}, routes=[
        Route("/v1/chat/completions", proxy.chat_completions, methods=["POST"]),
        Route("/chat/completions", proxy.chat_completions, methods=["POST"]),
        Route("/v1/models", proxy.models, methods=["GET"]),
        Route("/v1/models/{model:path}", proxy.model, methods=["GET"]),
        Route("/healthz", proxy.healthz, methods=["GET"]),
        Route("/metrics", proxy.metrics_endpoint, methods=["GET"]),
        Route("/v1/ctxkit/quarantine", proxy.quarantine_list, methods=["GET"]),
        Route("/v1/ctxkit/quarantine/{fingerprint}/release", proxy.quarantine_release, methods=["POST"]),
    ])
    app.state.proxy = proxy
    app.state.metrics = metrics
    return app
