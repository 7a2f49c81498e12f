"""How stages tell each other that content is quarantined (erroneous, failed or untrusted).

The quarantine stage marks messages by fingerprint in `request.metadata`; fingerprints survive other
stages dropping or reordering messages. A stage that rewrites a message (pruning, dedup) gives the new
message the old one's mark with `carry`. Stages that make content durable (summaries, caches, memory)
must ask `is_quarantined` / `has_quarantined` and keep marked content out.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from .request import ChatRequest

METADATA_KEY = "ctxkit.quarantined"  # {fingerprint: reason}
DOCUMENTS_KEY = "ctxkit.quarantined_documents"  # {document id: reason}, of request.metadata["documents"]
PLACEHOLDER_PREFIX = "[quarantined by ctxkit:"  # how a withheld message starts (it says why it was withheld)
# The check of the model's answer to the current call, set by the quarantine stage while the rest of the call
# runs: given the answer, why it is quarantined (a claim its own step's tool results contradict, a planted link
# it passes on), or None. A stage that stores the answer itself (the semantic cache) asks `answer_quarantined`.
AnswerCheck = Callable[[Mapping[str, Any], Any], "str | None"]
_answer_check: contextvars.ContextVar[AnswerCheck | None] = contextvars.ContextVar("ctxkit_answer_check", default=None)


def fingerprint(message: Mapping[str, Any]) -> str:
    """A stable id for a message's role, content and tool linkage."""
    core = {k: message.get(k) for k in ("role", "content", "tool_calls", "tool_call_id", "name")}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:32]


def quarantined(request: ChatRequest) -> Mapping[str, str]:
    """{fingerprint: reason} of the quarantined messages of this request."""
    return request.metadata.get(METADATA_KEY, {})


def is_quarantined(request: ChatRequest, message: Mapping[str, Any]) -> bool:
    return fingerprint(message) in quarantined(request)


def has_quarantined(request: ChatRequest) -> bool:
    """Whether anything the model sees in this request is quarantined: a marked message, or a flagged
    document still in `metadata["documents"]` (stages later in the chain may render it)."""
    marks = quarantined(request)
    if marks and any(fingerprint(m) in marks for m in request.messages):
        return True
    flagged = request.metadata.get(DOCUMENTS_KEY) or {}
    documents = request.metadata.get("documents")
    return bool(flagged) and isinstance(documents, list) and any(
        isinstance(d, Mapping) and str(d.get("id")) in flagged for d in documents)


def current_answer_check() -> AnswerCheck | None:
    """The answer check of the call running now (None: no quarantine stage runs before this one)."""
    return _answer_check.get()


@contextmanager
def checking_answers(check: AnswerCheck | None) -> Iterator[None]:
    """Let the stages after the quarantine (run inside this block) check the model's answer."""
    token = _answer_check.set(check)
    try:
        yield
    finally:
        _answer_check.reset(token)


def answer_quarantined(message: Mapping[str, Any], record: Any = None, check: AnswerCheck | None = None) -> str | None:
    """Why the model's answer to the current call is quarantined, or None (also when no quarantine stage runs).
    `check`: one taken with `current_answer_check()` earlier (a stream ends after its call returned);
    `record`: where the quarantine's ledger note goes (a stream's `event_recorder()`)."""
    check = check or _answer_check.get()
    return check(message, record) if check is not None else None


def mark(request: ChatRequest, marks: Iterable[tuple[Mapping[str, Any], str]]) -> ChatRequest:
    """A copy of `request` with these (message, reason) pairs marked as quarantined."""
    merged = dict(quarantined(request))
    merged.update((fingerprint(message), reason) for message, reason in marks)
    return request.override(metadata={**request.metadata, METADATA_KEY: merged})


def carry(request: ChatRequest, rewritten: Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> ChatRequest:
    """A copy of `request` in which each rewritten message (old, new) keeps the old one's mark: a shortened
    or collapsed quarantined message is still quarantined. `request` itself if nothing was marked."""
    marks = quarantined(request)
    carried = [(new, marks[fingerprint(old)]) for old, new in rewritten if fingerprint(old) in marks]
    return mark(request, carried) if carried else request
