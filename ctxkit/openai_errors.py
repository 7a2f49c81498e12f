"""ctxkit's errors as the `openai` package's: each error the drop-in client raises is both, so an agent loop's
`except openai.RateLimitError` (and tenacity's retry rules, and `e.code == "context_length_exceeded"`) keeps
working after the switch, and `except ctxkit.BackendError` works too. The LangChain adapter does the same
for LangChain's classes (adapters/langchain/errors.py)."""

from __future__ import annotations

from typing import Any

from . import errors as ck

# The openai client's class for an HTTP status it got; other 4xx are APIStatusError, 5xx InternalServerError.
_BY_STATUS = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
              404: "NotFoundError", 409: "ConflictError", 422: "UnprocessableEntityError", 429: "RateLimitError"}


def _openai_class(exc: ck.CtxkitError) -> tuple[type[Exception], int | None] | None:
    import openai

    if isinstance(exc, ck.RequestError):  # OpenAI answers a malformed or too long request with a 400
        return openai.BadRequestError, 400
    if isinstance(exc, ck.BackendTimeoutError):
        return openai.APITimeoutError, None
    if isinstance(exc, ck.BackendConnectionError):
        return openai.APIConnectionError, None
    if isinstance(exc, ck.BackendError) and exc.status is not None:
        name = _BY_STATUS.get(exc.status) or ("InternalServerError" if exc.status >= 500 else "APIStatusError")
        return getattr(openai, name), exc.status
    if isinstance(exc, ck.BackendError):
        return openai.APIError, None
    return None


def also_openais(exc: BaseException) -> None:
    """Re-class a ctxkit error in place to also be the `openai` client's error for it (`BadRequestError`,
    `RateLimitError`, `APITimeoutError`, ...), with the attributes handlers read (`status_code`, `response`,
    `message`, `param`), so an agent loop's `except openai.RateLimitError` keeps working after the switch."""
    import httpx
    import openai

    if not isinstance(exc, ck.CtxkitError) or isinstance(exc, openai.OpenAIError):
        return
    found = _openai_class(exc)
    if found is None:
        return
    theirs, status = found
    request = httpx.Request("POST", "http://ctxkit.invalid/v1/chat/completions")
    # The fields OpenAI (and `ctxkit serve`) send for it: handlers test `e.code == "context_length_exceeded"`,
    # read `e.body`, or parse `e.response.json()`.
    code = "context_length_exceeded" if isinstance(exc, ck.ContextOverflowError) else None
    kind = "invalid_request_error" if isinstance(exc, ck.RequestError) else None
    body = {"message": str(exc), "type": kind, "param": getattr(exc, "where", None), "code": code}
    state: dict[str, Any] = {"message": str(exc), "request": request, "body": body, "code": code,
                             "param": body["param"], "type": kind}
    if status is not None:
        retry_after = getattr(exc, "retry_after", None)
        state.update(status_code=status, request_id=None, response=httpx.Response(
            status, request=request, json={"error": body},
            headers={"retry-after": retry_after} if retry_after else None))
    if not ck.also_of_class(exc, theirs):
        return  # a layout the two classes cannot share: ctxkit's error as it is
    for key, value in state.items():
        if key not in exc.__dict__:
            exc.__dict__[key] = value
