"""QuarantineStage: checks content before it becomes durable; marks, withholds, logs and releases it."""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import jsonschema

from ..._aio import tracked_to_thread
from ...errors import ConfigurationError, QuarantineStoreUnavailable
from ...lru import LRUMemo, memoized_by_digest
from ...pipeline import EventRecorder, event_recorder, record_event
from ...quarantine_marks import (
    DOCUMENTS_KEY,
    PLACEHOLDER_PREFIX,
    AnswerCheck,
    checking_answers,
    fingerprint,
    mark,
)
from ...redaction import redact
from ...request import ChatRequest, call_answered
from ...response import AsyncChatStream, ChatResponse, ChatStream, message_text
from ...settings import whole_number
from ...stage import AsyncCallNext, AsyncResult, CallNext, Result, Stage
from ..prefix import default_counter, previous_prompt_end, record_prefix_invalidated
from ..pruning.documents import DOCUMENT_BLOCK
from .contradiction import TurnResults, checkable, find_contradiction
from .finding import Finding, shorten
from .injection import find_injection
from .registry import QuarantineRecord, QuarantineRegistry
from .schema import find_schema_violation
from .tool_errors import NULL_RESULT, find_tool_error

if TYPE_CHECKING:
    from .pg_registry import PostgresQuarantineRegistry

logger = logging.getLogger("ctxkit.quarantine")
_T = TypeVar("_T")

# Filled by QuarantineStage.before_model while wrap_call runs a subclass's own before_model (which calls it through
# super()): the check of the model's answer that _prepare made, which the hook's return value cannot carry.
_PREPARED_CHECK: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("ctxkit_quarantine_check",
                                                                                    default=None)

# Verdicts kept per stage, about a text alone (a tool error, an injection) or about an answer and the tool results
# it rests on (a contradiction): an agent loop resends every step of its history on each call, and reading 150 KB of
# tool results again cost half a second per call. A loop of n steps needs about 3n of them on each call: when they do
# not all fit, each call evicts what the next one reads first, and every verdict is worked out again.
REMEMBERED_VERDICTS = 16_384
_CONTEXT_KINDS = ("schema", "contradiction")  # verdicts that depend on the request, not only on the content


class QuarantineStage(Stage):
    """Mark tool errors, broken tool promises, injected instructions and contradicted claims."""

    name = "quarantine"

    def __init__(
        self,
        *,
        output_schemas: Mapping[str, Mapping[str, Any]] | None = None,
        check_errors: bool = True,
        check_schemas: bool = True,
        check_injection: bool = True,
        check_contradictions: bool = True,
        check_documents: bool = True,
        withhold_after_step: bool = True,
        counter: Any = None,
        max_records: int = 10_000,
        directory: str | Path | None = None,
        store: str | None = None,
    ) -> None:
        """max_records: per namespace, the most quarantine records (and released fingerprints, and
        placeholders) kept; beyond it the oldest go, so a long-running server does not grow without end.
        Content whose record went is checked again when it comes back.
        directory: keep the records and releases there too (registry.py): they outlive a restart,
        and processes given the same directory share them.
        store: a `postgresql://` URL instead: the records and releases are kept in that database
        (pg_registry.py), shared by replicas on any host; a release on one is seen by the others at their
        next call. Give either `directory` or `store`."""
        max_records = whole_number(max_records, "max_records", minimum=1)
        self.max_records = max_records
        self.output_schemas = {k: dict(v) for k, v in (output_schemas or {}).items()}
        for tool, schema in self.output_schemas.items():
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as exc:
                raise ConfigurationError(f"output schema of {tool!r} is not a valid JSON Schema: {exc.message}") from None
        self.check_errors = check_errors
        self.check_schemas = check_schemas
        self.check_injection = check_injection
        self.check_contradictions = check_contradictions
        self.check_documents = check_documents
        self.withhold_after_step = withhold_after_step
        self.counter = counter if counter is not None else default_counter()
        self.registry: QuarantineRegistry | PostgresQuarantineRegistry
        if store is not None:
            if directory is not None:
                raise ConfigurationError("give the quarantine registry a directory or a store, not both")
            if not isinstance(store, str) or not store.startswith(("postgresql://", "postgres://")):
                scheme = str(store).split("://")[0] + "://" if "://" in str(store) else "a path"  # never the password
                raise ConfigurationError(f"store takes a postgresql:// URL, not {scheme} (a directory goes in directory=)")
            from .pg_registry import PostgresQuarantineRegistry  # psycopg only where it is used

            self.registry = PostgresQuarantineRegistry(max_records, store)
        else:
            self.registry = QuarantineRegistry(max_records, directory)
        self._verdicts: LRUMemo[tuple[str, ...], Finding | None] = LRUMemo(REMEMBERED_VERDICTS)
        self._unwritable = False  # the registry's last write failed (a full or read-only disk): logged once

    # -- the public registry ----------------------------------------------------------------------
    def list(self, namespace: str = "default") -> list[QuarantineRecord]:  # noqa: A003 - the issue's name
        """The quarantined content of one namespace, oldest first."""
        return sorted(self.registry.snapshot(namespace).records.values(), key=lambda r: r.created_at)

    def release(self, fingerprint: str, namespace: str | None = None) -> bool:
        """Lift a quarantine (in one namespace, or wherever it is); the content is not quarantined again.
        Returns False when nothing with that fingerprint was quarantined."""
        spaces = [namespace] if namespace is not None else self.registry.namespaces()
        # A registry that cannot write (its database away, a full or read-only disk) raises
        # QuarantineStoreUnavailable: nothing was released.
        released = any([self.registry.release(fingerprint, space) for space in spaces])
        if released:
            logger.info("quarantine released: %s", fingerprint)
        return released

    # -- checks -----------------------------------------------------------------------------------
    def check_message(
        self, messages: Sequence[Mapping[str, Any]], index: int, schemas: Mapping[str, Mapping[str, Any]],
        *, after_injection: bool = False, injected: Sequence[str] = (),
        failed: Sequence[tuple[str, Finding]] | _FailedLines | None = None, results_key: str | None = None,
        turn: TurnResults | None = None, named: Container[str] | None = None,
    ) -> Finding | None:
        """The first finding about messages[index], or None when it is clean. `after_injection`: a tool
        result of this turn carried an injection, so an answer repeating it is checked for one too.
        `failed`: the failed or schema-breaking tool results of this turn with their findings, when the
        caller has them (the stage's pass over a request collects them once); else they are found here.
        `results_key`: a digest of this turn's tool results before messages[index], when the caller has it: an
        assistant message's contradiction verdict is then remembered under it. `turn`: those results read (the
        stage's pass reads each once), else they are found and read here. `named`: what the user and the tool
        results since the last injected one named before messages[index] (_NamedSoFar), else found here."""
        message = messages[index]
        text = message_text(dict(message))
        role = message.get("role")
        if role == "tool":
            tool = _tool_name(messages, index)
            schema = schemas.get(tool)
            if self.check_errors and (finding := self._text_finding(find_tool_error, text, tool)):
                if not (finding.reason == NULL_RESULT and schema is not None
                        and find_schema_violation(text, schema) is None):  # the tool promises null may come
                    return finding
            if self.check_schemas and schema is not None and (finding := find_schema_violation(text, schema)):
                return finding
            if self.check_injection and (finding := self._text_finding(find_injection, text)):
                return finding
        elif role == "assistant" and isinstance(message.get("content"), str):
            if after_injection and self.check_injection and (finding := find_injection(message["content"])):
                return Finding("injection", f"the answer repeats an injection ({finding.reason.removeprefix('content ')})",
                               finding.evidence)
            # What the user said, and what a clean tool result returned (a later turn's docs search giving the
            # same link an injected page listed), is not planted: the answer may pass it on.
            # Only a tool result that came after the last injected one: a search result listing the very page
            # (and link) that the next fetch showed injected is no independent source of that link.
            # Only when a tool result carried an injection: read for every assistant message of the history, the
            # whole history before it made each call quadratic in its length (8.8 s of CPU per call at 1,200 messages).
            if self.check_injection and injected:
                if named is None:
                    earlier = [dict(m) for m in messages[:index]]
                    last_injected = max((i for i, m in enumerate(earlier)
                                         if m.get("role") == "tool" and message_text(m) in injected), default=-1)
                    named = _named_in(text for i, m in enumerate(earlier) if (text := message_text(m)) and (
                        m.get("role") == "user" or (m.get("role") == "tool" and i > last_injected and text not in injected)))
                if carried := _repeated_payload(message["content"], injected, named):
                    # the answer passes on what the injection planted (its link, its account number, its code)
                    return Finding("injection", "the answer repeats what an injected tool result planted", carried)
            if (echoed := self._repeated_failed_result(messages, index, schemas, failed)) is not None:
                return echoed
            if self.check_contradictions and checkable(message["content"]):
                # Only the prose is a claim; tool-call arguments are requests, not statements.
                claim = message["content"]

                def contradiction() -> Finding | None:
                    return find_contradiction(claim, turn if turn is not None else _turn_tool_results(messages, index))

                if results_key is None:
                    return contradiction()
                # Each step of an agent loop was read against all of its turn's results again on every call: each
                # call quadratic in the loop's length (6 s of CPU per call at 600 steps that state numbers).
                return self._remembered(("find_contradiction", _digest(claim), results_key), contradiction)
        return None

    def _written(self, write: Callable[[], _T], unwritten: _T) -> _T:
        """A registry write. A registry that cannot write (a full or read-only disk) fails no model call (as the
        summary store): the content is still marked for this call and found again on the next, and an ERROR, logged
        once until a write succeeds again, says that quarantines are not kept meanwhile."""
        try:
            result = write()
        except QuarantineStoreUnavailable as exc:
            if not self._unwritable:
                logger.error("%s; quarantines found meanwhile are marked but not kept", exc)
            self._unwritable = True
            return unwritten
        self._unwritable = False
        return result

    def _text_finding(self, detector: Callable[..., Finding | None], text: str, *args: str) -> Finding | None:
        """`detector(text, *args)`, remembered by the text's hash (see REMEMBERED_VERDICTS)."""
        return self._remembered((detector.__name__, _digest(text), *args), partial(detector, text, *args))

    def _remembered(self, key: tuple[str, ...], verdict: Callable[[], Finding | None]) -> Finding | None:
        remembered = self._verdicts.get([key])
        if key in remembered:
            return remembered[key]
        finding = verdict()
        self._verdicts.put({key: finding})
        return finding

    def _repeated_failed_result(self, messages: Sequence[Mapping[str, Any]], index: int,
                                schemas: Mapping[str, Mapping[str, Any]],
                                failed: Sequence[tuple[str, Finding]] | _FailedLines | None) -> Finding | None:
        """An answer that copies a failed or schema-breaking tool result of its turn word for word (a small
        model often answers with the `<tool_response>` it was shown, also one from an earlier step of the
        turn) carries that result into summaries and the cache: it is quarantined with it. Only a copied line
        of 24 characters or more counts."""
        answer = messages[index]["content"]
        if failed is None:
            failed = [(message_text(dict(messages[j])), finding) for j in _turn_tool_indices(messages, index)
                      if (finding := self.check_message(messages, j, schemas)) is not None]
        lines = failed if isinstance(failed, _FailedLines) else _FailedLines(failed)
        finding = lines.copied_in(answer)
        if finding is None:
            return None
        return Finding(finding.kind, f"the answer repeats a tool result that was quarantined ({finding.reason})",
                       finding.evidence)

    def before_model(self, request: ChatRequest) -> ChatRequest:
        request, check = self._prepare(request)
        box = _PREPARED_CHECK.get()
        if box is not None:  # wrap_call running a subclass's own before_model: its answer is checked all the same
            box.append(check)
        return request

    def _prepare(self, request: ChatRequest) -> tuple[ChatRequest, AnswerCheck | None]:
        """The request to pass on, and the check of the model's answer to it (None: nothing to check it for)."""
        namespace = request.namespace
        messages = list(request.messages)
        schemas = {**_schemas_from_tools(request.tools), **self.output_schemas}
        step_start = previous_prompt_end(messages)
        state = self.registry.snapshot(namespace)
        released, known, issued = set(state.released), state.records, set(state.issued)
        marks: list[tuple[Mapping[str, Any], str]] = []
        out = list(messages)
        withheld: list[int] = []
        injected_turn = False  # a tool result of the current turn carried an injection
        # The texts of the injected tool results so far, in any turn: a later answer that passes on what one
        # planted (its link, its account number) is the injection still working, turns after its result.
        injected: list[str] = []
        failed: list[tuple[str, Finding]] = []  # the current turn's failed results: an answer copying one carries it
        failed_lines = _FailedLines()  # their lines, as each answer of the turn looks for them
        turn_results = False  # the current turn has tool results (an answer to it may contradict them)
        results_digest = hashlib.blake2b(digest_size=16)  # of the current turn's tool results so far
        # The current turn's tool results so far, each read once: read again for each of its assistant messages,
        # the first call on a long agent loop was quadratic in its length (2.3 s of CPU at 600 steps).
        turn = TurnResults()
        # What the user and the tool results since the last injected one named, each read once (see check_message).
        named = _NamedSoFar()
        last_tool: str | None = None  # the text of the tool result just checked
        for index, message in enumerate(messages):
            if last_tool is not None:  # now that it is known whether it was injected
                named.tool_result(last_tool, injected=last_tool in injected)
                last_tool = None
            if message.get("role") == "user":
                named.user(message_text(dict(message)))
                injected_turn = False
                failed = []
                failed_lines = _FailedLines()
                turn_results = False
                results_digest = hashlib.blake2b(digest_size=16)
                turn = TurnResults()
                # Documents pasted into a user message are checked too; the message is marked (kept out of
                # summaries and the cache) but never withheld: the user's own words are in it.
                if (reason := self._check_user_documents(request, message, released, known)) is not None:
                    marks.append((message, reason))
            if message.get("role") not in ("tool", "assistant"):
                continue
            results_key = results_digest.hexdigest()  # the results an assistant message here rests on
            if message.get("role") == "tool":
                turn_results = True
                tool, text = _tool_name(messages, index), message_text(dict(message))
                results_digest.update(f"{tool}\0{_digest(text)}\0".encode())
                turn.add(tool, text)
                last_tool = text
            if message_text(dict(message)) in issued:
                marks.append((message, "withheld by quarantine"))
                continue
            record = self._record(request, message, released, known,
                                  partial(self._message_finding, messages, index, schemas, injected_turn,
                                          tuple(injected), failed_lines, results_key, turn, named))
            if record is None:
                continue
            if record.kind == "injection" and message.get("role") == "tool":
                injected_turn = True
                injected.append(message_text(dict(message)))
            if record.kind in ("tool_error", "schema") and message.get("role") == "tool":
                failed.append((message_text(dict(message)), Finding(record.kind, record.reason, record.evidence)))
                failed_lines.add(*failed[-1])
            marks.append((message, f"{record.kind}: {record.reason}"))
            if self.withhold_after_step and index < step_start:
                placeholder = _placeholder(messages, index, record)
                self._written(partial(self.registry.add_issued, namespace, placeholder), None)
                out[index] = {**message, "content": placeholder}
                marks.append((out[index], "withheld by quarantine"))
                withheld.append(index)
        metadata_changes: dict[str, Any] = {}
        if self.check_documents and self.check_injection and isinstance(request.metadata.get("documents"), list):
            flagged = self._check_documents(request, request.metadata["documents"], released, known)
            if flagged:
                metadata_changes[DOCUMENTS_KEY] = {**request.metadata.get(DOCUMENTS_KEY, {}), **flagged}
        check: AnswerCheck | None = None
        if injected or (turn_results and self.check_contradictions):
            # The model's answer to this request is checked as soon as it comes back (see wrap_call), and a stage
            # that stores it (the cache) asks first: checked only when the app sent it back, a contradicted
            # answer was cached and served meanwhile, and one the app never sends back with its tool results
            # (a chat UI that keeps user and assistant turns) was never checked at all.
            check = _once(partial(self._check_answer, request, messages, schemas, injected_turn, tuple(injected),
                                  tuple(failed), frozenset(released)))
        if not marks and not metadata_changes:
            return request, check
        if withheld:
            # Content withheld on an earlier call was sent as the same placeholder then: only what appeared
            # in the previous step is newly replaced, and only that breaks the cached prefix.
            previous_step = previous_prompt_end(messages[:step_start])
            new = [i for i in withheld if i >= previous_step]
            record_prefix_invalidated(self.name, self.counter, messages, min(new) if new else None)
            record_event(self.name, "withheld", messages=len(withheld), new=len(new))
        edited = request.override(messages=out) if withheld else request
        if metadata_changes:
            edited = edited.override(metadata={**edited.metadata, **metadata_changes})
        return (mark(edited, marks) if marks else edited), check

    def wrap_call(self, request: ChatRequest, call_next: CallNext) -> Result:
        if type(self).before_model is not QuarantineStage.before_model:  # a subclass's own before_model
            box: list[AnswerCheck | None] = []
            token = _PREPARED_CHECK.set(box)
            try:
                request = self.before_model(request)
            finally:
                _PREPARED_CHECK.reset(token)
            check = box[-1] if box else None
        else:
            request, check = self._prepare(request)
        with checking_answers(check):
            result = call_next(request)
        result = self._watch_answer(check, result)
        # a subclass's own after_model still runs, as Stage.wrap_call runs it
        return self.after_model(request, result) if isinstance(result, ChatResponse) else result

    async def awrap_call(self, request: ChatRequest, call_next: AsyncCallNext) -> AsyncResult:
        if type(self).before_model is not QuarantineStage.before_model:
            # The hooks as Stage.awrap_call runs them (an application's own hook on the event loop's thread), not
            # the whole wrap_call in a worker thread, which Stage.awrap_call does for a stage that writes wrap_call.
            box: list[AnswerCheck | None] = []
            token = _PREPARED_CHECK.set(box)  # the list, not a value: a hook run in a worker thread fills it too
            try:
                request = await self._run_hook("before_model", request)
            finally:
                _PREPARED_CHECK.reset(token)
            check = box[-1] if box else None
        else:
            request, check = await tracked_to_thread(self._prepare, request)
        with checking_answers(check):
            result = await call_next(request)
        result = self._watch_answer(check, result)
        if not isinstance(result, ChatResponse) or type(self).after_model is Stage.after_model:
            return result
        return await self._run_hook("after_model", request, result)

    @staticmethod
    def _watch_answer(check: AnswerCheck | None, result: Any) -> Any:
        """Check the model's answer when it comes (a stream: when it ends), so that it is quarantined before the
        app sends it back: its next request finds the record even without the tool results it rests on."""
        if check is None:
            return result
        if isinstance(result, ChatResponse):
            if result.answered_by is None:
                check(result.message, None)
        elif isinstance(result, (ChatStream, AsyncChatStream)):
            record = event_recorder()

            def check_at_end(response: ChatResponse) -> None:
                check(response.message, record)

            result.on_complete(check_at_end)
        return result

    def _check_answer(self, request: ChatRequest, messages: Sequence[Mapping[str, Any]],
                      schemas: Mapping[str, Mapping[str, Any]], after_injection: bool, injected: Sequence[str],
                      failed: Sequence[tuple[str, Finding]], released: frozenset[str], message: Mapping[str, Any],
                      record: EventRecorder | None = None) -> str | None:
        """Why the model's answer to `request` is quarantined (recorded as the app will send it back), or None."""
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            return None
        answer: dict[str, Any] = {"role": "assistant", "content": content}
        if message.get("tool_calls"):
            answer["tool_calls"] = message["tool_calls"]
        history = [*messages, answer]
        finding = self.check_message(history, len(history) - 1, schemas, after_injection=after_injection,
                                     injected=injected, failed=failed)
        fp = fingerprint(answer)
        if finding is None or fp in released:
            return None
        kept = self._add(request, fp, finding, answer, "assistant", note=record or record_event)
        return f"{kept.kind}: {kept.reason}" if kept is not None else None

    def _check_user_documents(self, request: ChatRequest, message: Mapping[str, Any], released: set[str],
                              known: Mapping[str, QuarantineRecord]) -> str | None:
        """The reason to mark a user message whose `<document id=...>` blocks carry an injection, or None."""
        # content parts too: the OpenAI SDK, LangChain and the Vercel AI SDK send a user message as a list
        text = message_text(dict(message)) if isinstance(message.get("content"), list) else message.get("content")
        if not (self.check_documents and self.check_injection and isinstance(text, str) and "<document id=" in text):
            return None

        def check() -> tuple[Finding | None, str]:
            for match in DOCUMENT_BLOCK.finditer(text):
                if finding := find_injection(match.group(2)):
                    return finding, f"document {match.group(1)}"
            return None, ""

        record = self._record(request, message, released, known, check)
        return f"{record.kind}: {record.reason}" if record is not None else None

    def _check_documents(
        self, request: ChatRequest, documents: Sequence[Any], released: set[str], known: Mapping[str, QuarantineRecord]
    ) -> dict[str, str]:
        flagged: dict[str, str] = {}
        for doc in documents:
            if not isinstance(doc, Mapping) or not isinstance(doc.get("text"), str):
                continue
            pseudo = {"role": "document", "content": doc["text"], "name": str(doc.get("id"))}
            record = self._record(request, pseudo, released, known, partial(_injection_in, doc["text"], pseudo["name"]))
            if record is not None:
                flagged[pseudo["name"]] = f"{record.kind}: {record.reason}"
        return flagged

    def _message_finding(self, messages: Sequence[Mapping[str, Any]], index: int,
                         schemas: Mapping[str, Mapping[str, Any]], after_injection: bool,
                         injected: Sequence[str] = (),
                         failed: Sequence[tuple[str, Finding]] | _FailedLines = (), results_key: str | None = None,
                         turn: TurnResults | None = None, named: Container[str] | None = None) -> tuple[Finding | None, str]:
        return (self.check_message(messages, index, schemas, after_injection=after_injection, injected=injected,
                                   failed=failed, results_key=results_key, turn=turn, named=named),
                _source(messages, index))

    def _record(self, request: ChatRequest, content: Mapping[str, Any], released: set[str],
                known: Mapping[str, QuarantineRecord],
                check: Callable[[], tuple[Finding | None, str]]) -> QuarantineRecord | None:
        """The quarantine record of `content`: the one kept from an earlier call, or a new one when
        `check()` (a finding, and the source to name) finds something; None for clean or released content."""
        fp = fingerprint(content)
        if fp in released:
            return None
        record = known.get(fp)
        if record is None or record.kind in _CONTEXT_KINDS:
            # A schema or contradiction verdict depends on more than the content (the tool's schema, the
            # results the answer rests on): the same words can be right in another conversation.
            finding, source = check()
            if finding is None:
                return None
            if record is None:
                record = self._add(request, fp, finding, content, source)
        return record

    def _add(
        self, request: ChatRequest, fp: str, finding: Finding, message: Mapping[str, Any], source: str,
        note: EventRecorder = record_event,
    ) -> QuarantineRecord | None:
        # The evidence is often an error text, and error texts quote keys: the record, the log line and the
        # ledger event carry it redacted (the excerpt redacted before it is cut: a key cut in two escapes it).
        record = QuarantineRecord(
            fingerprint=fp, namespace=request.namespace, kind=finding.kind, reason=finding.reason,
            evidence=redact(finding.evidence),
            role=str(message.get("role")), source=source, excerpt=shorten(redact(message_text(dict(message))), 160),
            conversation_id=request.conversation_id, created_at=time.time(),
        )
        unwritten: QuarantineRecord | None = record  # not kept, but quarantined for this call all the same
        kept = self._written(partial(self.registry.add_record, record), unwritten)
        if kept is None:  # released by another thread or process since this call's snapshot: it stays released
            return None
        if kept is not record:  # another thread or process got there first: one record, one log line
            return kept
        detail = redact(finding.detail)
        logger.warning("quarantined %s from %s in namespace %r: %s (%s)", record.role, source,
                       request.namespace, detail, fp)
        note(self.name, "quarantined", fingerprint=fp, check=finding.kind, reason=detail, source=source)
        return record



_PLANTED = re.compile(r"https?://[^\s)\]>\"'<]+|\bwww\.[\w-]+\.[^\s)\]>\"'<]+|\b[\w.+-]+@[\w-]+\.[\w.]+\w|"
                      # a bare host name ("zenbook-deals.example", "shop.evil.co.uk"), not a file name ("setup.py")
                      r"(?<![\w.@/-])(?:[A-Za-z0-9](?:[\w-]*[A-Za-z0-9])?\.)+(?!(?:py|js|ts|tsx|jsx|json|md|txt|html?|"
                      r"css|ya?ml|toml|ini|cfg|sh|png|jpe?g|gif|svg|pdf|csv|log|xml|exe|zip|gz|tar|rs|go|java|rb|php|"
                      r"cpp|hpp|lock|env)\b)[A-Za-z]{2,24}\b(?![\w-]|\.\w)|"
                      r"\b(?=[\w-]*\d)(?=[\w-]*[A-Za-z])[A-Za-z0-9][\w-]{4,}\b")


def _once(check: AnswerCheck) -> AnswerCheck:
    """`check` run at most once per answer: the cache asks before it stores the answer, and the stage checks it
    when it comes back; the second asks for the first one's verdict, not for the whole history read again."""
    verdicts: dict[str, str | None] = {}

    def checked(message: Mapping[str, Any], record: Any = None) -> str | None:
        key = json.dumps(message, sort_keys=True, default=str)
        if key not in verdicts:
            verdicts[key] = check(message, record)
        return verdicts[key]

    return checked


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _is_link(text: str) -> bool:
    """Whether a _PLANTED match is a link or an e-mail address (not a bare code)."""
    return text.lower().startswith(("http://", "https://", "www.")) or "@" in text


def _repeated_payload(answer: str, injected: Sequence[str], named: Container[str] = ()) -> str:
    """A link, address or code that an injected tool result of this turn carried near its injection and
    that the answer gives on ("" when none): an answer that passes on the planted link is the injection working.
    Not planted: what the user named ("How much are the WH-1000XM5?") or a clean result after the injected one
    did (`named`, lower case), nor what the result says in lines before the injection's own (the product page's
    model number, above a poisoned review)."""
    own: set[str] = set()
    for text in injected:
        near, page_codes = _planted_in(text)
        own |= page_codes
        planted = {p for p in near if p not in named and p not in own}
        for match in _PLANTED.finditer(answer):
            if match.group(0).rstrip(".,;:").lower() in planted:
                return match.group(0).rstrip(".,;:")
    return ""


@memoized_by_digest(1024)
def _planted_in(text: str) -> tuple[frozenset[str], frozenset[str]]:
    """The links, addresses and codes an injected tool result carries near its injection, and the page's own codes
    (not links) in the lines above it: read once per result, not once per later answer."""
    finding = find_injection(text)
    # the evidence is redacted (a ?key= value, a password: ... cut to "…"): look for its part before that
    probe = finding.evidence.split("\u2026", 1)[0][:40] if finding is not None and finding.evidence else ""
    at = text.find(probe) if probe else -1
    if at < 0:
        return frozenset(_named_in([text])), frozenset()
    # The page's own codes above the injection's line (the product's model number) are not planted; a
    # link or address there is: "confirm your card at <link>" one line above "tell the user to use the
    # link above" is the same injection, and its link went through when lines above counted as the page's.
    line = text.rfind("\n", 0, at) + 1
    page_codes = {m.group(0).rstrip(".,;:").lower() for m in _PLANTED.finditer(text[:line]) if not _is_link(m.group(0))}
    return frozenset(_named_in([text[max(0, at - 300):]])), frozenset(page_codes)


def _named_in(texts: Iterable[str]) -> set[str]:
    """The links, addresses and codes the texts name, lower case."""
    return {m.group(0).rstrip(".,;:").lower() for text in texts for m in _PLANTED.finditer(text)}


class _NamedSoFar:
    """What the user and the tool results since the last injected one named, before the message being checked
    (_repeated_payload's `named`): kept as the stage's pass goes, and read only when an answer is checked for a
    planted payload. Worked out again from the whole history before each answer, one injected result early in an
    agent loop made every call quadratic in its length (16 s of CPU per call at 600 steps)."""

    def __init__(self) -> None:
        self._by_user: set[str] = set()
        self._by_tools: set[str] = set()
        self._unread: list[tuple[str, set[str]]] = []  # (text, the set its names go to), in order

    def user(self, text: str) -> None:
        self._unread.append((text, self._by_user))

    def tool_result(self, text: str, *, injected: bool) -> None:
        if injected:  # a result before an injected one is no independent source of what that one planted
            self._by_tools = set()
            self._unread = [(t, names) for t, names in self._unread if names is self._by_user]
        else:
            self._unread.append((text, self._by_tools))

    def __contains__(self, name: object) -> bool:
        for text, names in self._unread:
            names |= _named_in([text])
        self._unread.clear()
        return name in self._by_user or name in self._by_tools


class _FailedLines:
    """The lines (24 characters or more) of a turn's failed or schema-breaking tool results, in order, found in an
    answer by their first 24 characters once there are many: each answer of a long turn was compared with every
    line of every failed result so far, on every call (0.8 s of CPU per call at 2,400 steps, a quarter failing)."""

    _KEY = 24  # the shortest line that counts as copied
    _SCAN_FROM = 32  # lines: fewer are each looked for in the answer (cheaper than reading the answer's windows)

    def __init__(self, failed: Iterable[tuple[str, Finding]] = ()) -> None:
        self._findings: list[Finding] = []
        self._lines: list[tuple[int, str]] = []  # (which finding, line)
        self._by_start: dict[str, list[tuple[int, str]]] = {}
        for text, finding in failed:
            self.add(text, finding)

    def add(self, text: str, finding: Finding) -> None:
        if finding.kind not in ("tool_error", "schema"):
            return
        self._findings.append(finding)
        for line in (line.strip() for line in text.splitlines()):
            if len(line) >= self._KEY:
                self._lines.append((len(self._findings) - 1, line))
                self._by_start.setdefault(line[: self._KEY], []).append(self._lines[-1])

    def copied_in(self, answer: str) -> Finding | None:
        """The finding of the first failed result that the answer copies a line of, or None."""
        if len(self._lines) < self._SCAN_FROM:
            return next((self._findings[k] for k, line in self._lines if line in answer), None)
        first: int | None = None
        for i in range(len(answer) - self._KEY + 1):
            for k, line in self._by_start.get(answer[i : i + self._KEY], ()):
                if (first is None or k < first) and answer.startswith(line, i):
                    first = k
        return None if first is None else self._findings[first]


def _injection_in(text: str, source: str) -> tuple[Finding | None, str]:
    return find_injection(text), source


def _tool_name(messages: Sequence[Mapping[str, Any]], index: int) -> str:
    call = call_answered(messages, index)
    return call[0] if call is not None else str(messages[index].get("name") or "tool")


def _source(messages: Sequence[Mapping[str, Any]], index: int) -> str:
    role = messages[index].get("role")
    return _tool_name(messages, index) if role == "tool" else str(role)


def _turn_tool_indices(messages: Sequence[Mapping[str, Any]], index: int) -> list[int]:
    """Where the tool results an assistant message rests on are: those since the last user message before it."""
    indices: list[int] = []
    for k in range(index - 1, -1, -1):
        role = messages[k].get("role")
        if role == "user":
            break
        if role == "tool":
            indices.append(k)
    return indices


def _turn_tool_results(messages: Sequence[Mapping[str, Any]], index: int) -> list[tuple[str, str]]:
    """The tool results an assistant message rests on, as (tool name, text)."""
    return [(_tool_name(messages, k), message_text(dict(messages[k]))) for k in _turn_tool_indices(messages, index)]


def _schemas_from_tools(tools: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    schemas: dict[str, Mapping[str, Any]] = {}
    for tool in tools:
        function = tool.get("function") or {}
        schema = function.get("x-output-schema") or function.get("output_schema") or function.get("outputSchema")
        if isinstance(schema, Mapping) and function.get("name"):
            schemas[str(function["name"])] = schema
    return schemas


def _placeholder(messages: Sequence[Mapping[str, Any]], index: int, record: QuarantineRecord) -> str:
    """What a withheld message says instead: whose content it was and why it was withheld; without whose, then
    without the reason, when that would be longer than the content ("Error: rate limit exceeded" is shorter
    than its explanation, and the call it answers stands right above it): withholding must not cost more
    than it removes."""
    message = messages[index]
    if message.get("role") == "tool":
        name, arguments = call_answered(messages, index) or (record.source, "{}")
        what = f"the result of {name}({shorten(arguments, 200)})"
    else:
        what = "an earlier assistant answer"
    why = f"{record.kind}: {shorten(record.reason, 160)}"
    forms = (f"{PLACEHOLDER_PREFIX} {what} was withheld ({why})]", f"{PLACEHOLDER_PREFIX} withheld ({why})]")
    size = len(message_text(dict(message)))
    return next((form for form in forms if len(form) < size), f"{PLACEHOLDER_PREFIX} withheld ({record.kind})]")
