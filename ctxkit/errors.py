"""The exceptions ctxkit raises: one hierarchy, so callers can catch broadly or precisely.

CtxkitError
├── RequestError            the request is malformed; raised before any backend call
│   ├── InvalidMessageError     names the message index and field
│   ├── InvalidToolError        names the tool index and the JSON-Schema path
│   └── ContextOverflowError    the request is larger than the model's context after all stages
├── BackendError            the backend failed; carries its HTTP-like status when it has one
│   ├── BackendConnectionError  could not reach it (refused, reset, stopped mid-run)
│   ├── BackendTimeoutError     it did not answer in time
│   └── BackendStatusError      it answered with an error status (429, 5xx, 4xx)
├── UnknownToolError        the model called a tool that is in neither the catalog nor the request's tools
├── ConfigurationError      ctxkit was set up wrongly (missing model file, unknown model, bad price table)
└── LedgerError             the ledger could not be read or written
"""

from __future__ import annotations


class CtxkitError(Exception):
    """Base class of every error ctxkit raises on purpose."""

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuilt from its message and fields, not by calling __init__ again with the message (which takes
        # other arguments): pickled to a parent process or copied, it stays the error it was.
        return restore_error, (type(self), self.args, dict(self.__dict__))


def restore_error(cls: type[BaseException], args: tuple[object, ...], state: dict[str, object]) -> BaseException:
    """An error of class `cls` with `args` and attributes `state`, made without its __init__ (unpickling)."""
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


def also_of_class(error: CtxkitError, theirs: type[Exception]) -> bool:
    """Re-class `error` in place to be an instance of `theirs` as well (a framework's error for the same failure:
    openai's `RateLimitError`, LangChain's `ContextOverflowError`), so the caller re-raises the same object,
    traceback and all, and both `except` clauses catch it. False when the two classes cannot share a layout."""
    try:
        error.__class__ = _both(type(error), theirs)
    except TypeError:
        return False
    return True


def _both(ours: type[CtxkitError], theirs: type[Exception]) -> type[CtxkitError]:
    # A class per error raised: errors are rare, and a memo of classes would be state shared by all. Made
    # here, it cannot be pickled by name: it pickles as how to make it again (a process pool's worker sends
    # the error back to its parent; an error that did not pickle came back as a PicklingError). An error
    # re-classed twice (openai's, then LangChain's) is made from the named classes, never from a made one,
    # which has no name to pickle by.
    bases: tuple[type[BaseException], ...] = (*getattr(ours, "_ctxkit_bases", (ours,)), theirs)

    def __reduce__(self: BaseException) -> tuple[object, ...]:
        return _restore_made, (bases, self.args, dict(self.__dict__))

    # __str__: ctxkit's message, not the other class's rendering of its own fields
    named = bases[0]
    return type(named.__name__, bases, {"__module__": named.__module__, "__qualname__": named.__qualname__,
                                        "__reduce__": __reduce__, "__str__": Exception.__str__,
                                        "_ctxkit_bases": bases})


def _restore_made(bases: tuple[type[BaseException], ...], args: tuple[object, ...],
                  state: dict[str, object]) -> BaseException:
    made = bases[0]
    for theirs in bases[1:]:
        made = _both(made, theirs)  # type: ignore[arg-type]
    return restore_error(made, args, state)


class RequestError(CtxkitError, ValueError):
    """A request that no backend should see. `where` names the offending field, e.g. `messages[3].content`."""

    def __init__(self, message: str, where: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class InvalidMessageError(RequestError):
    def __init__(self, message: str, index: int, field: str | None = None) -> None:
        self.index = index
        self.field = field
        where = f"messages[{index}]" + (f".{field}" if field else "")
        super().__init__(message, where)


class InvalidToolError(RequestError):
    def __init__(self, message: str, index: int, path: str | None = None) -> None:
        self.index = index
        self.path = path
        where = f"tools[{index}]" + (f".{path}" if path else "")
        super().__init__(message, where)


class ContextOverflowError(RequestError):
    def __init__(self, prompt_tokens: int, max_tokens: int, context_window: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_window = context_window
        super().__init__(
            f"the request needs {prompt_tokens} prompt tokens + {max_tokens} for the answer, "
            f"but the model's context holds {context_window} (after all stages ran)",
            "messages",
        )


class BackendError(CtxkitError):
    """The backend did not produce an answer. `status` is the HTTP status when there was one."""

    def __init__(self, message: str, *, backend: str, status: int | None = None) -> None:
        self.backend = backend
        self.status = status
        prefix = f"[{backend}" + (f" {status}]" if status is not None else "]")
        super().__init__(f"{prefix} {message}")


class BackendConnectionError(BackendError):
    pass


class BackendTimeoutError(BackendError):
    # Tokens the model generated before the timeout stopped it (a local model knows; a remote one does not):
    # computed, and billed where a provider bills them, though the partial answer is dropped.
    completion_tokens: int | None = None


class ToolCallSchemaError(BackendError):
    """The model called a tool with arguments its `parameters` schema refuses, where the grammar could not hold
    the model to it (a `maximum` on a float, `multipleOf`, `format: email`): raised rather than handed to the app
    as a valid call. `tool`, `where` (the argument's path) and `arguments` (as generated) name it."""

    completion_tokens: int | None = None  # the tokens generated for the refused answer, as BackendTimeoutError's

    def __init__(self, tool: str, where: str, problem: str, arguments: str, *, backend: str) -> None:
        self.tool, self.where, self.arguments = tool, where, arguments
        super().__init__(f"the model called {tool!r} with {where} that its schema refuses: {problem}",
                         backend=backend)


class ResponseFormatError(BackendError):
    """The model's answer breaks the `json_schema` of the call's `response_format` where the grammar could not hold
    it to the schema (as ToolCallSchemaError, and a maxLength or maxItems too wide for a grammar): raised rather than
    handed to the app as a valid answer. `where` (the value's path) and `content` (as generated) name it. An answer
    cut short by `max_tokens` or a stop sequence is returned as it is, with its finish_reason, as OpenAI does."""

    completion_tokens: int | None = None

    def __init__(self, where: str, problem: str, content: str, *, backend: str) -> None:
        self.where, self.content = where, content
        super().__init__(f"the model answered with {where} that the response_format schema refuses: {problem}",
                         backend=backend)


class BackendStatusError(BackendError):
    # The backend's Retry-After header, when it sent one (a 429 or a 503): how long it asked callers to wait.
    retry_after: str | None = None


class BackendContextOverflowError(BackendStatusError, ContextOverflowError):
    """The backend itself refused the prompt as too long for its context (OpenAI's and llama.cpp's server's 400
    `context_length_exceeded`): a ContextOverflowError as ctxkit's own check raises, so handlers of an overflow
    (`e.code == "context_length_exceeded"`, LangChain's SummarizationMiddleware) see it, and a BackendStatusError
    with the backend's status. The token numbers are the backend's to know: None here."""

    def __init__(self, message: str, *, backend: str, status: int | None = None) -> None:
        self.prompt_tokens = self.max_tokens = self.context_window = None  # type: ignore[assignment]
        self.where = "messages"
        self.backend, self.status = backend, status
        prefix = f"[{backend}" + (f" {status}]" if status is not None else "]")
        Exception.__init__(self, f"{prefix} {message}")  # not BackendError's: its super() is ContextOverflowError's


class UnknownToolError(CtxkitError, ValueError):
    """The model called a tool the application never offered: executing it is impossible, guessing is wrong."""

    def __init__(self, name: str, known: int, detail: str | None = None) -> None:
        self.name = name
        self.known = known
        super().__init__(detail or f"the model called tool {name!r}, which is not among the {known} tools of the catalog")


class ConfigurationError(CtxkitError, ValueError):
    """ctxkit was set up wrongly (an argument out of range, stage names twice). A ValueError too, as a bad
    argument is."""


class LedgerError(CtxkitError):
    pass


class MalformedLedgerLine(LedgerError):
    """A line of a ledger that is no record (a writer killed mid-line leaves one), read strictly."""


class CacheStoreUnavailable(CtxkitError):
    """The shared cache's database cannot be reached, or its tables are gone; what was asked of it (invalidate,
    clear, stats) is not done. A lookup or a write on a model call's way never raises it: the call goes on
    without the cache."""


class QuarantineStoreUnavailable(CtxkitError):
    """The shared quarantine registry's database cannot be reached; what was asked (a release) is not done."""
