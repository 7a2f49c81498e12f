"""The remote backend: any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp's server, Ollama).

Retries with exponential backoff and jitter on 429, 5xx and connection errors (honouring Retry-After),
but only before the first byte of an answer: a stream that breaks midway is an error, never a retry that
could duplicate output. The API key is read from the environment and never logged or recorded.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import importlib
import json
import logging
import numbers
import os
import random
import re
import threading
import time
import urllib.parse
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import httpx
import openai

from ..errors import (
    BackendConnectionError,
    BackendContextOverflowError,
    BackendError,
    BackendStatusError,
    BackendTimeoutError,
    ConfigurationError,
    RequestError,
)
from ..redaction import redact
from ..request import ChatRequest
from ..response import ChatResponse, Usage
from ..settings import positive_seconds
from ..tokens import TokenCounter
from ..tokens.tiktoken_counter import TiktokenCounter, counting_key, encoding_name_for_model
from ..validation import sendable_header_value
from .gguf_prompt import GGUFPrompt
from .server_schema import schema_for_server_grammar
from .tool_format import (
    CallStops,
    ToolCallTextStream,
    drop_unfinished_call,
    may_call,
    messages_for_plain_template,
    parse_tool_calls,
    stop_at,
    tool_call_grammar,
)

T = TypeVar("T")
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_SECRET_HEADER = re.compile(r"auth|key|token|secret|cookie|session|signature|password|credential", re.IGNORECASE)

# Context windows of common OpenAI models; anything else: pass context_window=.
_CONTEXT_WINDOWS = {"gpt-4.1": 1_047_576, "gpt-5": 400_000, "gpt-4o": 128_000, "o1": 200_000, "o3": 200_000,
                    "o4": 200_000, "gpt-4-turbo": 128_000, "gpt-4": 8_192, "gpt-3.5-turbo": 16_385,
                    # "gpt-4" is a prefix of these, whose windows are not gpt-4's 8k:
                    "gpt-4.5": 128_000, "gpt-4-0125-preview": 128_000, "gpt-4-1106-preview": 128_000,
                    "gpt-4-vision": 128_000, "gpt-4-32k": 32_768}


class OpenAIBackend:
    """Chat completions over HTTP with the `openai` client."""

    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | httpx.URL | None = None,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        counter: TokenCounter | None = None,
        context_window: int | None = None,
    ) -> None:
        """counter: how to count prompts for this model. Defaults to tiktoken for OpenAI models; a model
        served from a GGUF (llama.cpp's server) counts exactly with `GGUFPrompt.from_gguf(path)`."""
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigurationError(f"max_retries must be a whole number >= 0, got {max_retries!r}")
        if context_window is not None and (isinstance(context_window, bool) or not isinstance(context_window, int)
                                           or context_window < 1):
            # 0 became the model's default window (128k for a GGUF-served model) and -1 refused every call
            raise ConfigurationError(f"context_window must be a whole number of tokens >= 1 (None: the model's "
                                     f"known window), got {context_window!r}")
        if not isinstance(model, str) or not model:
            raise ConfigurationError(f"model must be the name of the model to call, got {model!r}")
        if isinstance(base_url, httpx.URL):  # the openai client takes one; ctxkit reads its parts as text
            base_url = str(base_url)
        if base_url is not None:
            check_base_url(base_url)
        if timeout is not None and not isinstance(timeout, httpx.Timeout):  # an httpx.Timeout passes through
            timeout = positive_seconds(timeout, "timeout")  # "60" was a TypeError on the first call
        if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in (backoff_s, max_backoff_s)) \
                or not backoff_s >= 0 or not max_backoff_s >= 0:
            raise ConfigurationError(f"backoff_s and max_backoff_s must be >= 0, got {backoff_s!r}, {max_backoff_s!r}")
        key = api_key or os.environ.get(api_key_env)
        if not key:
            if base_url is None:
                raise ConfigurationError(f"no API key: set ${api_key_env} or pass api_key=")
            key = "not-needed"  # local OpenAI-compatible servers usually accept any key
        if not sendable_header_value(f"Bearer {key}"):
            # A key read from a file keeps its final newline (a mounted Kubernetes secret, `open(...).read()`):
            # HTTP refuses the header, every call failed as a retried "Connection error." with its cause hidden,
            # and httpcore's DEBUG log printed the whole key in the refusal. Said here, without the key.
            raise ConfigurationError(f"the API key ({'api_key=' if api_key else '$' + api_key_env}) holds a line "
                                     "break, a control character, a character outside ASCII or spaces at its "
                                     "ends, which no HTTP header can carry (a key read from a file keeps its final "
                                     "newline: strip it)")
        if counter is None:
            if encoding_name_for_model(model) is None:
                raise ConfigurationError(
                    f"model {model!r} is not an OpenAI model: pass counter= (for a GGUF model, "
                    "GGUFPrompt.from_gguf(path)) so token counts are exact"
                )
            counter = TiktokenCounter(model)
        # The counter was chosen for `model`: a call that asks for another OpenAI model (the drop-in client's
        # model=...) is counted with that model's own encoding, not this one's.
        self._counter_is_default = isinstance(counter, TiktokenCounter) and counter.model == model
        self._counters: dict[tuple[str, str | None, str | None], TokenCounter] = {}
        self._context_window_given = context_window is not None
        self.model = model
        self.base_url = base_url
        self.counter = counter
        self.context_window = context_window or _known_context(model)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._timeout = timeout
        # The key's own text, to take out of every error message: a gateway may quote the key it refused, and
        # a key not shaped like sk-... is one pattern-based redaction cannot recognise. (A placeholder such as
        # "x" for a local server is no secret, and taking it out would garble every message.)
        self._secret = key if len(key) >= 8 and key != "not-needed" else None
        # The base URL's own credentials: its password (httpx sends user:password as `Authorization: Basic
        # <base64>`, which a gateway may quote back as it quotes a key) and its query string's values (?api-key=).
        self._url_secrets = _url_secrets(base_url)
        # httpx logs each request's URL at INFO: its user:password@ too, and its query string, where a base URL's
        # or a call's extra_query key (?api-key=, ?subscription-key=) travels.
        _redact_http_library_logs()
        # Retries are ours (visible, bounded, never after a stream started); the client's are off.
        self._client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)
        self._aclient_args: dict[str, Any] = {"base_url": base_url, "api_key": key, "timeout": timeout, "max_retries": 0}
        # One async client per event loop: its pooled connections belong to the loop that opened them, and
        # reused from another (a second asyncio.run, a test's fresh loop) fail with "Event loop is closed".
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, openai.AsyncOpenAI] = (
            weakref.WeakKeyDictionary())
        self._aclients_lock = threading.Lock()
        self._closers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self._closing: set[asyncio.Task[None]] = set()  # async clients closing in this loop (asyncio holds tasks weakly)
        self._closed = False
        # llama-cpp-python's server takes a JSON schema only as {"type": "json_object", "schema": ...} and answers
        # OpenAI's "json_schema" with a 500: set once it has, so the schema goes in the form it honours.
        self._schema_as_json_object = False

    @property
    def _aclient(self) -> openai.AsyncOpenAI:
        loop = asyncio.get_running_loop()
        with self._aclients_lock:
            if self._closed:  # a client made now would never be closed
                raise _closed(self.name)
            # A loop closed without shutdown_asyncgens (loop.run_until_complete, then loop.close()) never ran its
            # closer: its client's pooled connections keep the loop, so the weak key never lets go. Let go here:
            # the sockets are closed as they are collected, not one kept open per loop ever used.
            for stale in [other for other in list(self._aclients) if other.is_closed()]:
                _abandon(self._aclients.pop(stale))
                self._closers.pop(stale, None)
            client = self._aclients.get(loop)
            if client is None:
                client = self._aclients[loop] = openai.AsyncOpenAI(**self._aclient_args)
                # Its pooled connections hold the loop, so the weak key alone never lets go: close the client
                # as the loop shuts down (asyncio.run closes the loop's async generators first, in the loop).
                closer = _close_at_shutdown(client, lambda: self._forget(loop))
                self._closers[loop] = closer
                loop.create_task(_first_step(closer))  # started: the loop now tracks it, and will close it
            return client

    def _forget(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._aclients_lock:
            self._aclients.pop(loop, None)
            self._closers.pop(loop, None)

    def counter_for(self, model: str | None) -> TokenCounter:
        """The counter for a call that asks for `model`: the backend's own, unless it was the default tiktoken
        counter and `model` is another OpenAI model with another encoding (gpt-4 asked of a gpt-4o backend)."""
        if not model or model == self.model or not self._counter_is_default:
            return self.counter
        key = counting_key(model)
        if key is None or key == counting_key(self.counter.model):  # type: ignore[attr-defined,union-attr]
            return self.counter
        # One counter per encoding and image-pricing family, not per name: a proxy's clients may send any number
        # of model names. (Per encoding alone, gpt-4o-mini's images were counted at gpt-4o's price: 776 tokens
        # for a 1024x1024 image billed 25,512.)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = TiktokenCounter(model)
        return counter

    def context_window_for(self, model: str | None) -> int:
        """The window of the model a call asks for (a window passed to the backend applies to every call)."""
        if not model or model == self.model or self._context_window_given or encoding_name_for_model(model) is None:
            return self.context_window
        return _known_context(model)

    def __repr__(self) -> str:  # never show the key: nor one in the URL's query string or user part
        return f"OpenAIBackend(model={self.model!r}, base_url={_shown_url(self.base_url)!r})"

    # -- sync ---------------------------------------------------------------------------------------
    def complete(self, request: ChatRequest) -> ChatResponse:
        completion = self._with_retries(lambda: self._client.chat.completions.create(**self._args(request)),
                                        self._retry_recorder(request), request)
        return self._to_response(completion, request)

    def stream(self, request: ChatRequest) -> Iterator[dict[str, Any]]:
        return self._stream(request, self._retry_recorder(request))  # bound to the call now: the stream starts when first read

    def _stream(self, request: ChatRequest, record: Callable[..., None]) -> Iterator[dict[str, Any]]:
        chunks = self._with_retries(lambda: self._client.chat.completions.create(**self._args(request, stream=True)),
                                    record, request)
        answer = _StreamedAnswer(self._text_calls(request), self._call_stops(request))
        failure: BackendError | None = None
        # A server that keeps the connection alive (SSE comments, blank lines) but sends no chunk never trips the
        # HTTP read timeout: a watchdog ends such a stream once no chunk came for the call's timeout.
        watchdog = _Watchdog(self._stall_limit(request), chunks)
        try:
            for chunk in watchdog.chunks():
                yield from answer.feed(chunk)
                if answer.stopped:
                    break
            if not answer.ended:
                raise _cut_off(self.name)
        except _STREAM_FAILURES as exc:
            failure = self._stream_failure(exc, request)
        finally:
            watchdog.stop()
            chunks.close()
        if watchdog.fired:  # the watchdog cut the connection: whatever that raised, the stream stalled
            failure = _stalled(watchdog.limit, self.name)
        last = self._last_usage(request, record, answer, failure)
        if last is not None:
            yield last
        if failure is not None:
            raise failure

    def _stream_failure(self, exc: Exception, request: ChatRequest) -> BackendError:
        """The typed error a stream that broke off raises (one of _STREAM_FAILURES)."""
        if self._closed:  # close() took its connection: not the server's "Connection error."
            failure = _closed(self.name)
            failure.__cause__ = exc
            return failure
        if isinstance(exc, openai.OpenAIError):
            # not chained: the openai error's own text is not scrubbed, and a traceback would print it
            return self._translate(exc, request)
        if isinstance(exc, BackendError):  # _cut_off, _stalled
            return exc
        failure = _malformed(exc, self.name) if isinstance(exc, json.JSONDecodeError) else _lost_mid_stream(exc, self.name)
        failure.__cause__ = exc
        return failure

    def _last_usage(self, request: ChatRequest, record: Callable[..., None], answer: _StreamedAnswer,
                    failure: BackendError | None) -> dict[str, Any] | None:
        """The counted usage chunk a stream ends with, if any: for a failed stream, the tokens of the text held back
        as a possible tool call; for a whole one whose tools went as text and the server sent no usage, the answer's."""
        calls = answer.calls
        if failure is not None:
            return self._held_back_usage(request, answer)
        self._note_counted_stream(request, record, answer.finish_reason, answer.usage_seen)
        if calls is not None and not answer.usage_seen and answer.generated:
            # The server sent no usage: count what it generated. An unfinished call cut off by max_tokens is
            # dropped from the answer, and counting the answer alone recorded 0 tokens for max_tokens generated;
            # a stop ctxkit applied is cut from the answer, and counting the answer alone missed its tokens.
            return self._usage_chunk(request, answer.generated, answer.last)
        return None

    def _held_back_usage(self, request: ChatRequest, answer: _StreamedAnswer) -> dict[str, Any] | None:
        """For a stream that failed while text that may become a tool call was held back: a usage chunk (counted)
        with that text's tokens, which were generated and billed though never passed on."""
        if answer.calls is None or not answer.calls.held_back:
            return None
        return self._usage_chunk(request, answer.generated, answer.last)

    def _usage_chunk(self, request: ChatRequest, generated: str, last: dict[str, Any]) -> dict[str, Any]:
        """A usage chunk, counted (not the server's), for a stream whose answer text was `generated`."""
        counter = self.counter_for(request.model)
        prompt = counter.count_prompt(list(request.messages), self.tools_shown(request))
        completion = counter.count_completion({"content": generated})
        # A whole chat.completion.chunk (id, model, ...): the drop-in client validates it as one.
        return {"id": last.get("id") or f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
                "created": last.get("created") or int(time.time()), "model": last.get("model") or request.model or self.name,
                "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                         "total_tokens": prompt + completion, "ctxkit_reported": False}}

    # -- async twins --------------------------------------------------------------------------------
    async def acomplete(self, request: ChatRequest) -> ChatResponse:
        completion = await self._awith_retries(lambda: self._aclient.chat.completions.create(**self._args(request)),
                                               self._retry_recorder(request), request)
        return self._to_response(completion, request)

    def astream(self, request: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        return self._astream(request, self._retry_recorder(request))

    async def _astream(self, request: ChatRequest, record: Callable[..., None]) -> AsyncIterator[dict[str, Any]]:
        chunks = await self._awith_retries(
            lambda: self._aclient.chat.completions.create(**self._args(request, stream=True)), record, request)
        answer = _StreamedAnswer(self._text_calls(request), self._call_stops(request))
        failure: BackendError | None = None
        limit = self._stall_limit(request)
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(chunks.__anext__(), limit)
                except StopAsyncIteration:
                    break
                except TimeoutError:  # kept alive (SSE comments) but no chunk: see _stream
                    raise _stalled(limit, self.name) from None
                for passed in answer.feed(chunk):
                    yield passed
                if answer.stopped:
                    break
            if not answer.ended:
                raise _cut_off(self.name)
        except _STREAM_FAILURES as exc:
            failure = self._stream_failure(exc, request)
        finally:
            await chunks.close()
        last = self._last_usage(request, record, answer, failure)
        if last is not None:
            yield last
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Close the connections of the sync client and of every event loop's async client; later calls fail with
        BackendError. (Closing only the sync client left each async one's pooled connections open for as long
        as the backend was referenced: an open socket per backend closed after an async call.)"""
        with self._aclients_lock:
            self._closed = True
            clients, self._aclients = list(self._aclients.items()), weakref.WeakKeyDictionary()
        self._client.close()
        for loop, client in clients:
            self._close_in_its_loop(loop, client)

    def _close_in_its_loop(self, loop: asyncio.AbstractEventLoop, client: openai.AsyncOpenAI) -> None:
        """An async client's connections can only be closed in the loop that opened them."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is running:
            task = loop.create_task(client.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        elif loop.is_running():  # another thread's loop
            asyncio.run_coroutine_threadsafe(client.close(), loop)
        else:  # closed, or idle between run_until_complete calls: its sockets close when it runs or is collected
            _abandon(client)

    # -- helpers ------------------------------------------------------------------------------------
    def _tools_as_text(self) -> bool:
        """Whether the server renders a GGUF chat template without tool support: tools then go as text."""
        return isinstance(self.counter, GGUFPrompt) and not self.counter.native_tools

    def _llama_cpp_server(self) -> bool:
        """Whether the server is llama.cpp's family: it serves a GGUF (a GGUFPrompt counter), or it refused a
        json_schema format as llama-cpp-python's server does. OpenAI proper gets each schema as the caller wrote it."""
        return isinstance(self.counter, GGUFPrompt) or self._schema_as_json_object

    def _tools_for_server(self, tools: list[dict[str, Any]], tool_choice: Any) -> list[dict[str, Any]]:
        """`tools` as sent natively. A tool_choice that names a tool has llama-cpp-python's server build the call's
        grammar from that tool's parameters with its own converter: sent as written, an enum value with a NUL or a
        quote, or a `"maxLength": 2000`, killed the server. Those parameters go as a response format's schema does."""
        name = ((tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None)
        if name is None or not self._llama_cpp_server():
            return tools
        return [{**tool, "function": {**tool["function"], "parameters": schema_for_server_grammar(
                    tool["function"]["parameters"], f"tools[{i}].function.parameters")}}
                if isinstance(tool.get("function"), dict) and tool["function"].get("name") == name
                and isinstance(tool["function"].get("parameters"), dict) else tool
                for i, tool in enumerate(tools)]

    def tools_shown(self, request: ChatRequest) -> list[dict[str, Any]]:
        """The tools as the server's chat template shows them to the model, which its prompt_tokens count: a forced
        tool's parameters rewritten for a llama.cpp server's grammar (_tools_for_server) are rendered rewritten
        too (a 1..60 integer as its 60 values). Counted as the caller wrote them, a forced call's prompt was 103
        tokens where the server read 328."""
        if not request.tools or self._tools_as_text():
            return list(request.tools)
        try:
            return self._tools_for_server(list(request.tools), request.params.get("tool_choice"))
        except RequestError:  # refused as the call is sent (_args), where the call is recorded with the refusal
            return list(request.tools)

    def _text_calls(self, request: ChatRequest) -> ToolCallTextStream | None:
        """For a stream whose tools went as text: what turns its <tool_call> blocks into tool_calls deltas."""
        return ToolCallTextStream() if self._tools_as_text() and may_call(request.tools, request.params) else None

    def _call_stops(self, request: ChatRequest) -> CallStops | None:
        """The caller's stop sequences, when ctxkit applies them itself: tools went as text and the answer may be a
        call. The server would cut a <tool_call> block at a stop inside it (stop ["\\n"] ended every call at
        "<tool_call>", returned as content); OpenAI never cuts a call's arguments at a stop, nor does LlamaCppBackend."""
        if not (self._tools_as_text() and may_call(request.tools, request.params)):
            return None
        stop = request.params.get("stop") or []
        stops = [s for s in ([stop] if isinstance(stop, str) else list(stop)) if s]
        return CallStops(stops) if stops else None

    def _args(self, request: ChatRequest, stream: bool = False) -> dict[str, Any]:
        messages = list(request.messages)
        plain = self._tools_as_text()
        if plain:
            # Sent as one string, an image or audio part would vanish unseen and the model answer as if it saw
            # it: refused, naming the part, as LlamaCppBackend refuses it.
            for i, message in enumerate(messages):
                parts = message.get("content")
                for k, part in enumerate(parts if isinstance(parts, list) else []):
                    if isinstance(part, dict) and part.get("type") not in ("text", "refusal"):
                        raise RequestError(f"{part.get('type')} parts are not supported by this text-only model",
                                           f"messages[{i}].content[{k}]")
            # A llama.cpp-family server rendering the GGUF's own template (no tool support, SmolLM2's) answers 500
            # for content null (every OpenAI client's assistant turn beside tool_calls), content parts and the
            # developer role, drops tool calls from the prompt and ignores `tools`. Sent as the text GGUFPrompt
            # renders (the tools in the system message, calls as <tool_call> blocks, results as user turns), the
            # model sees what LlamaCppBackend shows it, and the server's prompt_tokens equal the count. OpenAI
            # proper (a tiktoken counter) gets the messages as given.
            messages = messages_for_plain_template(messages, list(request.tools))
        args: dict[str, Any] = {"model": request.model or self.model, "messages": messages}
        if request.tools and not plain:
            args["tools"] = self._tools_for_server(list(request.tools), request.params.get("tool_choice"))
        args.update(request.params)
        fmt = args.get("response_format")
        if self._schema_as_json_object and isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema", {})
            args["response_format"] = {"type": "json_object", "schema": schema_for_server_grammar(
                schema, "response_format.json_schema.schema")}
        elif self._llama_cpp_server() and isinstance(fmt, dict) and isinstance(fmt.get("schema"), dict):
            # llama-cpp-python's own form, sent by the caller: its converter is as above
            args["response_format"] = {**fmt, "schema": schema_for_server_grammar(fmt["schema"], "response_format.schema")}
        if plain:  # the tools went as text; the server has none to choose from (and refuses "required")
            choice = args.pop("tool_choice", None)
            args.pop("parallel_tool_calls", None)
            if may_call(request.tools, request.params):
                args.pop("stop", None)  # applied here, outside the call blocks: see _call_stops
            if may_call(request.tools, request.params) and "response_format" not in args:
                # llama.cpp's `grammar` field (other servers ignore fields they do not know): a 135M model writes
                # a well-formed call only when held to one, as LlamaCppBackend holds it
                grammar = tool_call_grammar(list(request.tools), choice)
                if grammar is not None:
                    args["extra_body"] = {**(args.get("extra_body") or {}), "grammar": grammar}
        if ("max_completion_tokens" in args and "max_tokens" not in args and encoding_name_for_model(args["model"]) is None
                and not isinstance(self.counter, TiktokenCounter)):
            # Not OpenAI's model: llama.cpp's server (and others) read only max_tokens, and would ignore the
            # budget and generate until their context is full. (OpenAI's o-series refuse max_tokens: a name
            # tiktoken does not know, a fine-tune "ft:o4-mini-..." or an Azure deployment, counted with tiktoken
            # is OpenAI's model.)
            args["max_tokens"] = args["max_completion_tokens"]
        if stream:
            args["stream"] = True
            args["stream_options"] = {"include_usage": True}
        args.update(request.transport_options())  # the caller's per-call HTTP options
        return args

    def _to_response(self, completion: Any, request: ChatRequest) -> ChatResponse:
        if not getattr(completion, "choices", None):  # a 200 that carries an error, or nothing, is no answer
            error = (getattr(completion, "model_extra", None) or {}).get("error") or "no choices in the answer"
            # scrubbed as an error status's text is (a gateway quoting the key it refused), then cut: a key cut in
            # two escapes the scrub
            shown = self._scrub(str(error), self._call_secrets(request))[:300]
            raise BackendError(f"the server answered without a completion: {shown}", backend=self.name)
        choice = completion.choices[0]
        message = choice.message.model_dump(exclude_none=True)
        message.setdefault("content", None)
        generated = dict(message)  # as the server sent it, before a tool call's text is parsed out of it
        finish_reason = choice.finish_reason or "stop"
        if self._tools_as_text() and may_call(request.tools, request.params):
            stops = self._call_stops(request)
            cut = stop_at(message["content"] or "", stops.stops) if stops is not None else None
            if cut is not None:  # the caller's stop, outside any call (the server was not given it)
                message["content"], finish_reason = message["content"][:cut], "stop"
            content, calls = parse_tool_calls(message["content"] or "")  # the <tool_call> blocks the tools' text asks for
            if calls:
                message.update(content=content, tool_calls=calls)
                finish_reason = "tool_calls"
            elif finish_reason == "length":  # a call cut off by max_tokens: no raw markup, as the stream sends
                message["content"] = drop_unfinished_call(message["content"])
        usage = completion.usage
        # Some servers send usage with a count missing or null: that is no usage reported (a None would fail the
        # ledger's sums after the answer was paid for, and the call would be a 500 with no record).
        if usage is not None and all(isinstance(getattr(usage, name, None), int)
                                     for name in ("prompt_tokens", "completion_tokens")):
            details = usage.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details is not None else 0
            counted = Usage(usage.prompt_tokens, usage.completion_tokens, cached)
            self._note_completion_count(request, generated, usage.completion_tokens)
        else:  # some servers report nothing: count, and say so
            counter = self.counter_for(request.model)
            counted = Usage(counter.count_prompt(request.messages, self.tools_shown(request)),
                            counter.count_completion(message), 0, reported=False)
        return ChatResponse(
            message=message, finish_reason=finish_reason, usage=counted,
            model=completion.model or self.model, backend=self.name, id=completion.id,
            # asked for with logprobs=true: an app then indexes them, so never answer a silent null
            logprobs=choice.logprobs.model_dump(exclude_unset=True) if choice.logprobs is not None else None,
        )

    def _note_completion_count(self, request: ChatRequest, generated: dict[str, Any], reported: int) -> None:
        """A ledger event when a GGUF counter's count of the answer differs from the completion_tokens the server
        reported (the ledger's tokens_out, which is the server's): the answer's text does not carry every token
        generated (a stop sequence's, a control token's), so a stream of it, which the server sends without usage
        (llama-cpp-python's) and ctxkit counts, is counted short by as much."""
        counter = self.counter_for(request.model)
        if not isinstance(counter, GGUFPrompt):  # tiktoken's answer count is OpenAI's recipe, not the server's own
            return
        try:
            counted = counter.count_completion(generated)
        except Exception:  # noqa: BLE001 - a note: the answer, paid for, is returned whatever becomes of it
            return
        # stop_sequence: the server counts the stop text's tokens and cuts the text before them; otherwise a
        # control token generated decodes to no text, or the tokens are not the ones the text tokenizes to
        if counted != reported:
            from ..pipeline import event_recorder  # the pipeline imports the backends

            event_recorder()(self.name, "completion_count_differs", reported=reported, counted=counted,
                             reason="stop_sequence" if request.params.get("stop") else "tokens_not_in_text")

    def _note_counted_stream(self, request: ChatRequest, record: Callable[..., None], finish_reason: str | None,
                             usage_seen: bool) -> None:
        """A ledger event for a stream the server sent no usage for (ctxkit counted its answer) that a stop
        sequence the server applied may have ended: the server counts the tokens of the stop text, which it sends
        neither as text nor as a number, so tokens_out is a lower bound (by 1 token for stop ["\n"])."""
        if usage_seen or finish_reason != "stop" or not self._server_stops(request):
            return
        record(self.name, "completion_count_lower_bound", reason="stop_sequence")

    def _server_stops(self, request: ChatRequest) -> bool:
        """Whether the caller's stop sequences go to the server (not applied by ctxkit: see _call_stops)."""
        stop = request.params.get("stop")
        return bool(stop) and not (self._tools_as_text() and may_call(request.tools, request.params))

    def _delay(self, attempt: int, exc: openai.OpenAIError) -> float | None:
        """Seconds to wait before the next attempt; None when the server asks for longer than
        `max_backoff_s` (a Retry-After of an hour): the error goes to the caller now, not after an hour."""
        retry_after = None
        if isinstance(exc, openai.APIStatusError):
            retry_after = _retry_after(exc.response.headers)
        if retry_after is not None:
            return retry_after if retry_after <= self.max_backoff_s else None
        base = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return base * (0.5 + random.random() / 2)

    def _stall_limit(self, request: ChatRequest) -> float | None:
        """The longest a stream may go without a chunk: the call's timeout, else the backend's (read) timeout."""
        timeout = request.timeout if request.timeout is not None else self._timeout
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
            return float(timeout)
        read = getattr(timeout, "read", None)  # an httpx.Timeout
        return float(read) if isinstance(read, (int, float)) else None

    def _retryable(self, exc: openai.OpenAIError) -> bool:
        if isinstance(exc, openai.APIConnectionError):  # includes timeouts
            return True
        return isinstance(exc, openai.APIStatusError) and exc.status_code in RETRYABLE_STATUS

    def _with_retries(self, call: Callable[[], T], record: Callable[..., None], request: ChatRequest,
                      resent: bool = False) -> T:
        deadline = _deadline(request)
        for attempt in range(self.max_retries + 1):
            # Each attempt: a close() while the call waited to retry (another thread's shutdown) left the retry
            # httpx's bare RuntimeError("Cannot send a request, as the client has been closed.")
            if self._closed:
                raise _closed(self.name)
            try:
                return call()
            except json.JSONDecodeError as exc:  # a 200 whose body is not JSON: the upstream's fault, not ours
                raise _malformed(exc, self.name) from exc
            except RuntimeError:
                if self._closed:  # closed between the check and the send
                    raise _closed(self.name) from None
                raise
            except openai.OpenAIError as exc:
                if not resent and self._refuses_json_schema(exc, request):  # resent at once, as it takes a schema
                    return self._with_retries(call, record, request, resent=True)
                delay = _within(deadline, self._delay(attempt, exc))
                if attempt == self.max_retries or not self._retryable(exc) or delay is None:
                    raise self._translate(exc, request) from None
                self._note_retry(record, attempt, exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    async def _awith_retries(self, call: Callable[[], Any], record: Callable[..., None], request: ChatRequest,
                             resent: bool = False) -> Any:
        deadline = _deadline(request)
        for attempt in range(self.max_retries + 1):
            try:
                return await call()
            except json.JSONDecodeError as exc:
                raise _malformed(exc, self.name) from exc
            except openai.OpenAIError as exc:
                if not resent and self._refuses_json_schema(exc, request):
                    return await self._awith_retries(call, record, request, resent=True)
                delay = _within(deadline, self._delay(attempt, exc))
                if attempt == self.max_retries or not self._retryable(exc) or delay is None:
                    raise self._translate(exc, request) from None
                self._note_retry(record, attempt, exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _refuses_json_schema(self, exc: openai.OpenAIError, request: ChatRequest) -> bool:
        """Whether `exc` is llama-cpp-python's server refusing `response_format` type "json_schema" (its request
        validation: "Input should be 'text' or 'json_object'") for a request that sent it. Learned once per
        backend; later calls send the schema as {"type": "json_object", "schema": ...}, which it enforces."""
        fmt = request.params.get("response_format")
        # Not whether it was learned already: calls sent at once, before the first refusal came back, are each
        # refused, and each is resent (once: `resent`).
        if not isinstance(exc, openai.APIStatusError) or not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            return False
        if "'text' or 'json_object'" not in str(exc.message) or "response_format" not in str(exc.message):
            return False
        self._schema_as_json_object = True
        return True

    def _retry_recorder(self, request: ChatRequest) -> Callable[..., None]:
        """record_event bound to the current call, each retry noted with this request's own model and prompt:
        the call's backend is not the only one that retries (a summarizing model's calls run inside it)."""
        from ..pipeline import event_recorder  # the pipeline imports the backends

        record = event_recorder()

        def note(stage: str, kind: str, **data: Any) -> None:
            data["model"] = request.model or self.model
            if data.get("may_be_billed"):
                data["prompt_tokens"] = self.counter_for(request.model).count_prompt(list(request.messages),
                                                                                     self.tools_shown(request))
            record(stage, kind, **data)

        return note

    def _note_retry(self, record: Callable[..., None], attempt: int, exc: openai.OpenAIError, delay: float) -> None:
        """A failed attempt in the call's ledger record. One that timed out may have been processed, and billed
        (a 429, a 5xx or a refused connection was not): the pipeline prices its prompt into the call's cost."""
        error = self._translate(exc)
        record(self.name, "backend_retry", attempt=attempt + 1, error=type(error).__name__, status=error.status,
               delay_s=round(delay, 3), may_be_billed=isinstance(error, BackendTimeoutError))

    def _translate(self, exc: openai.OpenAIError, request: ChatRequest | None = None) -> BackendError:
        headers = self._call_secrets(request)
        if isinstance(exc, openai.APITimeoutError):
            return BackendTimeoutError(self._scrub(str(exc), headers), backend=self.name)
        if isinstance(exc, openai.APIConnectionError):
            return BackendConnectionError(self._scrub(str(exc), headers), backend=self.name)
        if isinstance(exc, openai.APIStatusError) and _context_overflow(exc):
            return BackendContextOverflowError(self._scrub(exc.message, headers), backend=self.name, status=exc.status_code)
        if isinstance(exc, openai.APIStatusError):
            error = BackendStatusError(self._scrub(exc.message, headers), backend=self.name, status=exc.status_code)
            # How long the upstream asked callers to wait (a 429, a 503): a proxy passes it on to its clients.
            error.retry_after = exc.response.headers.get("retry-after")
            return error
        return BackendError(self._scrub(str(exc), headers), backend=self.name)

    @staticmethod
    def _call_secrets(request: ChatRequest | None) -> dict[str, str]:
        """The call's extra_headers and, as a secret-named query parameter (?api-key=) is a credential as a header
        is, its extra_query values: what `_scrub` takes out of a text beside the backend's own key."""
        if request is None:
            return {}
        headers = {k: v for k, v in request.extra_headers.items() if isinstance(v, str)}
        headers.update({k: str(v) for k, v in request.extra_query.items() if isinstance(v, (str, int))})
        return headers

    def _scrub(self, text: str, headers: Any = None) -> str:
        """`text` without this backend's own API key, nor the call's extra_headers values (a tenant token
        a gateway quotes back), whatever their shape."""
        secrets = ([self._secret] if self._secret else []) + self._url_secrets
        for name, value in (headers or {}).items():
            if not _SECRET_HEADER.search(str(name)):
                continue  # Accept: application/json is no secret, and taking it out would garble messages
            value = str(value)
            secrets += [value, value.partition(" ")[2]] if value.lower().startswith(("bearer ", "basic ", "token ")) else [value]
        for secret in sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True):
            text = text.replace(secret, "…")
        return text




class _RedactedRecords(logging.Filter):
    """A log record's text without secrets (a URL's user:password@): for the HTTP libraries' own loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        shown = redact(text)
        if shown != text:
            record.msg, record.args = shown, None
        return True


_REDACTED_RECORDS = _RedactedRecords()


def _redact_http_library_logs() -> None:
    """httpx (httpx2 from openai 3) logs `HTTP Request: POST <url>` at INFO, the URL's credentials included: an app
    that turns INFO on to see ctxkit's ledger lines (docs/ledger.md) would write its upstream password to its logs."""
    # httpcore (under both) logs a refused header's value at DEBUG: "Illegal header value b'Bearer <key>'"
    for name in ("httpx", "httpx2", "httpcore"):
        log = logging.getLogger(name)
        if _REDACTED_RECORDS not in log.filters:
            log.addFilter(_REDACTED_RECORDS)


def _url_secrets(url: str | None) -> list[str]:
    """The credentials a base URL holds: its password, user:password as a Basic header carries it, and the values
    of its secret-named query parameters."""
    if not url:
        return []

    parts = urllib.parse.urlsplit(url)
    found = []
    if parts.password:
        found.append(parts.password)
        userinfo = parts.netloc.rpartition("@")[0]
        for user_pass in {userinfo, f"{urllib.parse.unquote(parts.username or '')}:{urllib.parse.unquote(parts.password)}"}:
            found.append(base64.b64encode(user_pass.encode()).decode())
        found.append(urllib.parse.unquote(parts.password))
    found += [value for name, value in urllib.parse.parse_qsl(parts.query) if _SECRET_HEADER.search(name)]
    return found


def check_base_url(url: object, name: str = "base_url") -> None:
    """An absolute http(s) URL with a host: anything else ("localhost:8080/v1", "") was taken, and every call
    failed as a retried, cause-less "Connection error." as if the server were down. `name`: what the caller
    calls the setting (`ctxkit serve`'s --upstream)."""
    text = url if isinstance(url, str) else None
    try:
        parts = urllib.parse.urlsplit(text) if text is not None else None
        usable = parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname) \
            and (parts.port is None or parts.port > 0)
    except ValueError:  # an unclosed [IPv6] host, a port that is no number or past 65535
        usable = False
    if not usable:
        # Not echoed where it may hold a credential: a scheme-less "user:password@host" would show the password.
        shown = repr(url) if text is None or not re.search(r"[@?#]", text) else "a URL not shown (it may hold a credential)"
        raise ConfigurationError(f"{name} must be an http:// or https:// URL with a host, such as "
                                 f"http://127.0.0.1:8080/v1 (None: OpenAI's), got {shown}")


def _shown_url(url: str | None) -> str | None:
    """`url` without its query string (a gateway's ?api-key=, ?code=) and its user part's password."""
    if url is None:
        return None

    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:…@{host}" if ":" in user else netloc
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", ""))


def _transport_errors(name: str) -> tuple[type[Exception], ...]:
    """One error class of each HTTP library the openai SDK may run on (httpx; httpx2 from openai 3)."""
    found = []
    for module in ("httpx", "httpx2"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_TRANSPORT_ERRORS = _transport_errors("HTTPError")
_TRANSPORT_TIMEOUTS = _transport_errors("TimeoutException")


# What a stream's reading may raise, each made a typed error by OpenAIBackend._stream_failure: the SDK's errors, a
# chunk that is not JSON, a connection lost mid-stream (the SDK leaves it to its HTTP library), _cut_off, _stalled.
_STREAM_FAILURES: tuple[type[Exception], ...] = (openai.OpenAIError, json.JSONDecodeError, *_TRANSPORT_ERRORS,
                                                 BackendConnectionError, BackendTimeoutError)


def _lost_mid_stream(exc: Exception, backend: str) -> BackendError:
    if isinstance(exc, _TRANSPORT_TIMEOUTS):
        return BackendTimeoutError(f"the stream stalled: {exc}", backend=backend)
    return BackendConnectionError(f"the connection was lost mid-stream: {exc}", backend=backend)


def _closed(backend: str) -> BackendError:
    return BackendError("this backend was closed; make a new OpenAIBackend", backend=backend)


def _abandon(client: Any) -> None:
    """Mark the client of a loop that is closed as closed: its connections cannot be closed in their own loop any
    more (their sockets close as they are collected), and the openai client's finalizer would otherwise schedule
    that close on whatever loop is running then, where it fails ("Task exception was never retrieved")."""
    closing = client.close()
    try:
        closing.send(None)  # marks the client closed, then fails at the first step that needs its (closed) loop
    except BaseException:  # noqa: S110 - RuntimeError("Event loop is closed"), or StopIteration: nothing to close
        pass
    finally:
        closing.close()


async def _first_step(generator: AsyncIterator[None]) -> None:
    await generator.__anext__()


async def _close_at_shutdown(client: Any, forget: Callable[[], None]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        forget()
        await client.close()


def _context_overflow(exc: Any) -> bool:
    """Whether an upstream's 4xx says the prompt does not fit its context: OpenAI and llama-cpp-python's server send
    code `context_length_exceeded`; llama.cpp's own server (llama-server) type `exceed_context_size_error` ("request
    (9412 tokens) exceeds the available context size (8192 tokens)"); vLLM only the text ("This model's maximum
    context length is ...")."""
    if not 400 <= exc.status_code < 500:
        return False
    if getattr(exc, "code", None) == "context_length_exceeded" or getattr(exc, "type", None) == "exceed_context_size_error":
        return True
    return exc.status_code == 400 and any(
        text in str(exc.message) for text in ("maximum context length", "exceeds the available context size"))


def _retry_after(headers: Any) -> float | None:
    """Seconds the server asks to wait: `retry-after-ms` (OpenAI's), `Retry-After` in seconds or as an HTTP date."""
    millis = headers.get("retry-after-ms")
    try:
        if millis is not None and float(millis) >= 0:
            return float(millis) / 1000
    except ValueError:
        pass
    header = (headers.get("retry-after") or "").strip()
    if header.replace(".", "", 1).isdigit():
        return float(header)
    if header:
        try:
            when = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError, IndexError):
            return None
        if when is not None and when.tzinfo is not None:
            return max(0.0, when.timestamp() - time.time())
    return None


def _deadline(request: ChatRequest) -> float | None:
    """When the call's own `timeout` (seconds this call may take) runs out: no wait for a retry may outlast it."""
    return time.monotonic() + request.timeout if request.timeout is not None else None


def _within(deadline: float | None, delay: float | None) -> float | None:
    """`delay`, or None (no retry: the error goes to the caller now) when waiting it would pass `deadline`."""
    if delay is None or deadline is None:
        return delay
    return delay if time.monotonic() + delay < deadline else None


def _stalled(limit: float | None, backend: str) -> BackendTimeoutError:
    return BackendTimeoutError(f"the stream stalled: no chunk for {limit:g} s", backend=backend)


class _Watchdog:
    """Shuts the stream's socket down once the server sent no chunk for `limit` seconds (the time the consumer
    holds a chunk does not count). One thread per stream waits for the current deadline; a shutdown, unlike a
    close, wakes the thread blocked reading the socket and frees no file descriptor another thread could get."""

    def __init__(self, limit: float | None, chunks: Any) -> None:
        self.limit = limit
        self.fired = False
        self._chunks = chunks
        self._due: float | None = None  # when the chunk being waited for is late; None while the consumer has one
        self._stopped = False
        self._wake = threading.Condition()
        stream = (getattr(getattr(chunks, "response", None), "extensions", None) or {}).get("network_stream")
        self._socket = stream.get_extra_info("socket") if stream is not None else None
        self._thread: threading.Thread | None = None

    def chunks(self) -> Iterator[Any]:
        if self.limit is None or self._socket is None:  # nothing to watch with: today's behaviour
            yield from self._chunks
            return
        self._thread = threading.Thread(target=self._watch, name="ctxkit-stream-watchdog", daemon=True)
        self._thread.start()
        iterator = iter(self._chunks)
        while True:
            with self._wake:
                self._due = time.monotonic() + self.limit
                self._wake.notify()
            try:
                chunk = next(iterator)
            except StopIteration:
                return
            finally:
                with self._wake:
                    self._due = None
            if self.fired:
                return
            yield chunk

    def _watch(self) -> None:
        with self._wake:
            while not self._stopped:
                if self._due is None:
                    self._wake.wait()
                    continue
                left = self._due - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                self.fired = True
                try:
                    self._socket.shutdown(2)  # type: ignore[union-attr]  # socket.SHUT_RDWR; chunks() checked it
                except OSError:
                    pass
                return

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()


class _StreamedAnswer:
    """What a streamed answer's chunks have told so far, and the chunks to pass on for each: the same for the sync
    and the async stream, which differ only in how they wait for the next chunk."""

    def __init__(self, calls: ToolCallTextStream | None, stops: CallStops | None) -> None:
        self.calls = calls  # the tools went as text: what turns <tool_call> blocks into tool_calls deltas
        self.stops = stops  # the caller's stop sequences, when ctxkit applies them itself
        self.ended = False  # a chunk gave a finish_reason, or the caller's stop ended the answer
        self.finish_reason: str | None = None
        self.last: dict[str, Any] = {}  # the last chunk received, whose id and model a counted usage chunk takes
        self.usage_seen = False  # whether the server sent its own usage
        self._slots: list[str | None] = []  # the id of each tool call so far, for deltas that carry no index

    def feed(self, chunk: Any) -> list[dict[str, Any]]:
        """The chunks to pass on for one chunk received."""
        self.ended = self.ended or _ends_answer(chunk)
        self.finish_reason = _finish_reason(chunk) or self.finish_reason
        data = self.last = _index_tool_calls(chunk.model_dump(exclude_unset=True), self._slots)
        self.usage_seen = self.usage_seen or bool(data.get("usage"))
        passed = []
        for kept in self.stops.feed(data) if self.stops else [data]:
            passed += self.calls.feed(kept) if self.calls else [kept]
        if self.stopped:
            self.ended = True
        return passed

    @property
    def stopped(self) -> bool:
        """The caller's stop, outside any call: the answer ends here."""
        return self.stops is not None and self.stops.done

    @property
    def generated(self) -> str:
        """All the text the server generated so far: passed on, held back as a possible call, or cut by the
        caller's stop (the stop's own text, which the server was not given, generated and billed)."""
        if self.stops is not None:
            return self.stops.received
        return self.calls.generated if self.calls is not None else ""


def _index_tool_calls(data: dict[str, Any], slots: list[str | None]) -> dict[str, Any]:
    """`data` with an `index` on each tool-call delta. Some servers send each call whole, without one: read as
    index 0, every call would be folded into the first (names and arguments run together), and the drop-in
    client's ChatCompletionChunk refuses the chunk. A delta with a new id starts a call, one without continues
    the last."""
    for choice in data.get("choices") or []:
        for call in (choice.get("delta") or {}).get("tool_calls") or []:
            if not isinstance(call, dict):
                continue
            if isinstance(call.get("index"), int):
                while len(slots) <= call["index"]:
                    slots.append(None)
                slots[call["index"]] = call.get("id") or slots[call["index"]]
                continue
            if not slots or (call.get("id") and call["id"] != slots[-1]):
                slots.append(call.get("id"))
            call["index"] = len(slots) - 1
    return data


def _ends_answer(chunk: Any) -> bool:
    """Whether a chunk says why the answer ended: every complete stream has one."""
    return any(getattr(choice, "finish_reason", None) for choice in getattr(chunk, "choices", None) or [])


def _finish_reason(chunk: Any) -> str | None:
    return next((choice.finish_reason for choice in getattr(chunk, "choices", None) or []
                 if getattr(choice, "finish_reason", None)), None)


def _malformed(exc: json.JSONDecodeError, backend: str) -> BackendError:
    return BackendError(f"the server's answer is not valid JSON: {exc.msg} at char {exc.pos}", backend=backend)


def _cut_off(backend: str) -> BackendConnectionError:
    # The stream ended (the connection closed cleanly) before any chunk gave a finish_reason: the answer was
    # cut off half way, though nothing raised. Not a whole answer, so not a success.
    return BackendConnectionError("the stream ended before the answer did (no finish_reason)", backend=backend)


def _known_context(model: str) -> int:
    name = model.split("/")[-1].lower()
    for prefix in sorted(_CONTEXT_WINDOWS, key=len, reverse=True):
        if name.startswith(prefix):
            return _CONTEXT_WINDOWS[prefix]
    return 128_000
