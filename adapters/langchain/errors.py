"""ctxkit's errors as LangChain's: each raised error is both, so `except ctxkit.ContextOverflowError` and
LangChain's own handling (`SummarizationMiddleware` catching `ContextOverflowError`, `ModelRetryMiddleware`
reading `is_retryable`) both work. A langchain-core without these classes gets ctxkit's errors unchanged."""

from __future__ import annotations

from langchain_core import exceptions as lc

from ctxkit import errors as ck

_MODEL_ERROR: type[Exception] | None = getattr(lc, "ModelError", None)
# The LangChain class for an upstream's HTTP status; other 5xx are ModelAPIError, other 4xx invalid requests.
_BY_STATUS = {401: "ModelAuthenticationError", 403: "ModelPermissionDeniedError", 404: "ModelNotFoundError",
              429: "ModelRateLimitError"}


def _langchain_class(exc: ck.CtxkitError) -> type[Exception] | None:
    if _MODEL_ERROR is not None and isinstance(exc.__cause__, _MODEL_ERROR):
        return type(exc.__cause__)  # a wrapped LangChain model's own error: keep its kind
    if isinstance(exc, ck.ContextOverflowError):
        name = "ContextOverflowError"
    elif isinstance(exc, ck.BackendTimeoutError):
        name = "ModelTimeoutError"
    elif isinstance(exc, ck.BackendConnectionError):
        name = "ModelConnectionError"
    elif isinstance(exc, ck.BackendError) and exc.status is not None:
        name = _BY_STATUS.get(exc.status) or ("ModelAPIError" if exc.status >= 500 else "ModelInvalidRequestError")
    elif isinstance(exc, ck.RequestError):
        name = "ModelInvalidRequestError"
    else:
        return None
    return getattr(lc, name, None)


def also_langchains(exc: BaseException) -> None:
    """Re-class `exc` in place to also be the matching LangChain error (unchanged when there is none), so
    the caller re-raises the same object with its traceback."""
    if _MODEL_ERROR is None or isinstance(exc, _MODEL_ERROR) or not isinstance(exc, ck.CtxkitError):
        return
    theirs = _langchain_class(exc)
    if theirs is None:
        return
    ck.also_of_class(exc, theirs)  # a layout the two classes cannot share: ctxkit's error as it is
