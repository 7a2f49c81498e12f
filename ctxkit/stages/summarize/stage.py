"""SummarizationStage: when the history grows past a trigger, fold its oldest turns into a summary.

    stage = SummarizationStage(backend, trigger_fraction=0.6, keep_last=6)

- Trigger: prompt tokens over `trigger_tokens` (or `trigger_fraction` of the backend's context window),
  or more than `trigger_messages` messages. It then shrinks the request to `target_tokens` (default: 60%
  of the token trigger, so the next calls only append and the summary stays put).
- The newest `keep_last` messages stay verbatim (fewer if they alone would not fit), and the cut never
  separates an assistant tool call from its tool results.
- Rolling and incremental: per (namespace, conversation_id) the stage keeps what it has folded; a later
  fold reads only the newly overflowed turns (the model summarizer gets the previous summary plus them).
- The summary is one message right after the leading system message(s), and it is reused byte for byte
  until the next fold, so everything after it stays in the provider's prefix cache between folds.
- Quarantined messages (`ctxkit.quarantine_marks`) are never folded into a summary: they stay visible
  while they are in the verbatim tail, and simply vanish once they fall out of it.
- `mode`: "extractive" (sentences kept verbatim, see facts.py), "model" (the backend's summary alone) or
  "hybrid" (the model's summary plus the extractive facts in the rest of the budget; the default).
- Cache awareness: a fold records in the ledger how many tokens of the previous prompt (as the backend got
  it, later stages' edits included) are no longer a prefix of what it passes on now (`prefix_invalidated`).
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..._aio import tracked_to_thread
from ...backends.base import Backend
from ...errors import BackendError, ConfigurationError
from ...forking import renew_after_fork
from ...pipeline import previous_prompt_sent, record_event
from ...quarantine_marks import fingerprint, quarantined
from ...request import ChatRequest, Message
from ...response import message_text
from ...sentences import leading_sentences
from ...settings import fraction, number_between, whole_number
from ...stage import Stage
from ..prefix import previous_prompt_end
from ..templates import sandboxed_environment
from . import facts as fact_keeper
from .model import ModelSummarizer
from .state import ConversationState, SummaryStore, digest
from .turns import valid_cuts

MODES = ("extractive", "model", "hybrid")
FILL_ATTEMPTS = 24  # exact recounts spent filling the budget after the estimate; each costs one tokenization
# Newlines sit before block tags: the sandboxed environment trims the one right after a tag.
SUMMARY_TEMPLATE = (
    "Earlier conversation ({{ folded }} messages), {{ 'summarized' if summary else 'excerpts' }}:\n"
    "{% if summary %}{{ summary }}\n{% if facts %}Excerpts:\n{% endif %}{% endif %}"
    "{% for line in facts %}{{ line }}\n{% endfor %}"
)


@dataclasses.dataclass(frozen=True)
class SummaryResult:
    """What one call did: the messages passed on and how the summary was built (for benchmarks and tests)."""

    messages: Sequence[Message]
    folded: int  # messages folded into the summary so far
    refolded: bool  # whether this call rebuilt the summary
    summary: str


_OPENING_MESSAGES = 3  # what names a conversation without a conversation_id (see SummarizationStage._key)

class SummarizationStage(Stage):
    """Folds the oldest turns into a rolling summary once the conversation passes a trigger."""

    name = "summarization"

    def __init__(
        self,
        backend: Backend,
        *,
        trigger_tokens: int | None = None,
        trigger_fraction: float | None = None,
        trigger_messages: int | None = None,
        target_tokens: int | None = None,
        keep_last: int = 6,
        max_tail_fraction: float = 0.5,
        mode: str = "hybrid",
        summarizer: Backend | None = None,
        embedder: Any = None,
        model_share: float = 0.3,
        summary_max_tokens: int = 96,
        summary_role: str = "system",
        state_dir: str | Path | None = None,
        weights: fact_keeper.Weights | None = None,
        context_turns: int = 8,
    ) -> None:
        """backend: the pipeline's backend (its counter and context window size the request).
        summarizer: the backend that writes the model summary (default: `backend`).
        embedder: a ctxkit.embed.Embedder for the fact keeper (default: one is loaded when first needed).
        """
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}")
        if trigger_tokens is None and trigger_fraction is None and trigger_messages is None:
            raise ConfigurationError("give at least one trigger: trigger_tokens, trigger_fraction or trigger_messages")
        if trigger_fraction is not None:
            trigger_fraction = fraction(trigger_fraction, "trigger_fraction")
        if trigger_tokens is not None:
            trigger_tokens = whole_number(trigger_tokens, "trigger_tokens", minimum=1)
        if trigger_messages is not None:
            trigger_messages = whole_number(trigger_messages, "trigger_messages", minimum=1)
        if target_tokens is not None:
            target_tokens = whole_number(target_tokens, "target_tokens", minimum=1)
        keep_last = whole_number(keep_last, "keep_last", minimum=1)
        context_turns = whole_number(context_turns, "context_turns", minimum=1)  # -0: a slice of all
        summary_max_tokens = whole_number(summary_max_tokens, "summary_max_tokens", minimum=1)
        max_tail_fraction = fraction(max_tail_fraction, "max_tail_fraction")
        model_share = number_between(model_share, "model_share", 0, 1)
        if summary_role not in ("system", "user"):
            raise ConfigurationError(f"summary_role must be 'system' or 'user', got {summary_role!r}")
        self.backend = backend
        self.counter = backend.counter
        token_triggers = [t for t in (trigger_tokens,
                                      int(trigger_fraction * backend.context_window) if trigger_fraction else None)
                          if t is not None]
        self.trigger_tokens = min(token_triggers) if token_triggers else None
        if target_tokens is not None and self.trigger_tokens is not None and target_tokens > self.trigger_tokens:
            # folded down to more than the trigger, the next call folds again: the fold never gets under it
            raise ConfigurationError(f"target_tokens ({target_tokens}) must not exceed the token trigger "
                                     f"({self.trigger_tokens}, from trigger_tokens / trigger_fraction)")
        self.trigger_messages = trigger_messages
        self._target_given = target_tokens is not None
        if target_tokens is None and self.trigger_tokens is not None:
            target_tokens = max(1, int(self.trigger_tokens * 0.6))
        self.target_tokens = target_tokens
        self.keep_last = keep_last
        self.max_tail_fraction = max_tail_fraction
        self.mode = mode
        self.model = ModelSummarizer(summarizer or backend, max_tokens=summary_max_tokens) if mode != "extractive" else None
        self.model_share = model_share if mode == "hybrid" else (1.0 if mode == "model" else 0.0)
        self.summary_role = summary_role
        self.weights = weights or fact_keeper.Weights()
        self.context_turns = context_turns
        self.store = SummaryStore(state_dir)
        self._embedder = embedder
        self._embedder_lock = threading.Lock()
        self._template = sandboxed_environment().from_string(SUMMARY_TEMPLATE)
        # Weak values: a conversation's lock lives while a call holds it, so a long-running server does
        # not keep one per conversation it has ever seen.
        self._conversation_locks: weakref.WeakValueDictionary[tuple[str, str], Any] = weakref.WeakValueDictionary()
        self._locks_lock = threading.Lock()
        renew_after_fork(self, SummarizationStage._after_fork_in_child)

    # -- hooks --------------------------------------------------------------------------------------
    def before_model(self, request: ChatRequest) -> ChatRequest:
        if not request.conversation_id:
            # No conversation_id: the key names the conversation's opening, which other conversations may share
            # ("Hello", a fixed greeting or task template): no lock across them, and no prefix accounting
            # against what another conversation sent last. A refold is still accounted for, against this
            # request's own previous prompt (its messages before the newest assistant message) as this stage
            # passed it on then: else every refold of a conversation without an id un-cached the prompt unreported.
            before = self.store.get(self._key(request))
            result = self.summarize(request)
            if result.refolded:
                self._note_implicit_refold(request, before, result.messages)
            if result.messages is request.messages:
                return request
            return request.override(messages=list(result.messages))
        key = self._key(request)
        with self._conversation_lock(key):  # two calls of one conversation must not fold the same turns twice
            before = self.store.get(key)
            folded_before = before.folded if before is not None else 0
            result = self.summarize(request)
            state = self.store.get(key)
            sent = tuple(result.messages)
            if state is not None:
                # Only this stage's own edits: a fold, or a start over. Between folds what it passes on changes
                # only where an earlier stage changed it (quarantine withholding a result), which that stage notes.
                prints = tuple(fingerprint(m) for m in sent)  # once: compared now, kept for the next call
                invalidated = self._invalidated(state, sent, prints)
                if invalidated and (result.refolded or result.folded != folded_before):
                    record_event(self.name, "prefix_invalidated", tokens=invalidated, refolded=result.refolded)
                state.last_sent = prints
                state.last_sent_tokens = self.counter.count_prompt(list(sent), request.tools)
                state.last_tools = tuple(request.tools)
        if result.messages is request.messages:
            return request
        return request.override(messages=list(result.messages))

    # async: folding with a model is slow, so ctxkit's own before_model runs in a thread whatever
    # hooks_in_thread says; an application's override runs where Stage._run_hook puts it (the event loop's
    # thread unless it sets hooks_in_thread = True), as the docs say of a subclass's hooks.
    async def awrap_call(self, request: ChatRequest, call_next: Any) -> Any:

        from ...response import ChatResponse

        if type(self).before_model is SummarizationStage.before_model:
            request = await tracked_to_thread(self.before_model, request)
        else:
            request = await self._run_hook("before_model", request)
        result = await call_next(request)
        return self.after_model(request, result) if isinstance(result, ChatResponse) else result

    # -- the work -----------------------------------------------------------------------------------
    def summarize(self, request: ChatRequest) -> SummaryResult:
        """What this stage would pass on for `request` (and the state it keeps for its conversation)."""
        head, body = _split_head(request.messages)
        key = self._key(request)
        marks = quarantined(request)
        prints = [fingerprint(m) for m in body]
        state = self.store.get(key)
        if state is None or not self._still_valid(state, body, prints, marks):
            # New, or the app rewrote its history, or a folded message was quarantined since: start over,
            # remembering what was sent last, so the invalidated prefix is still reported.
            state = ConversationState(last_sent=state.last_sent if state else (),
                                      last_sent_tokens=state.last_sent_tokens if state else 0,
                                      last_tools=state.last_tools if state else ())
            if request.conversation_id:  # an implicit key (see _key) keeps only a folded state
                self.store.put(key, state)

        # The message pinned at the last fold stays until the next one: recomputed, a new user turn would take it
        # away from right after the summary, and un-cache everything after it with no fold.
        current = self._assemble([*head, *_instructions(body[: state.folded])], state,
                                 [*_kept(body, self._pinned_since_fold(state, body, request)), *body[state.folded:]])
        unchanged = request.messages if state.folded == 0 else current
        if not self._over_trigger(current, request):
            return SummaryResult(unchanged, state.folded, False, state.summary)
        cut = self._choose_cut(head, body, state.folded, request)
        if cut <= state.folded:
            # Nothing new can be folded (the kept turns alone are too big): leave the summary as it is.
            return SummaryResult(unchanged, state.folded, False, state.summary)
        # Work on a copy: a summarizer that fails half way must not leave a half-folded state behind.
        state = dataclasses.replace(state, facts=list(state.facts), texts=dict(state.texts),
                                    included=list(state.included), unsummarized=list(state.unsummarized))
        new = [(i, m, prints[i]) for i in range(state.folded, cut) for m in (body[i],)
               if prints[i] not in marks and m.get("role") not in _INSTRUCTION_ROLES]
        # A request that no longer fits the window must be folded now, summarizer or not: passed on unfolded,
        # the pipeline refuses it (ContextOverflowError), and every later call of the conversation with it.
        must_fold = self._over_window(current, request)
        try:
            excerpts_only = self._fold(state, new, must_fold=must_fold)
        except BackendError as exc:
            # Model mode, and the summarizer failed (a rate limit, a timeout): the app's call must not fail with
            # it. Nothing else holds these turns: pass the request on as it stands, and fold at a later call.
            record_event(self.name, "summarizer_failed", error=type(exc).__name__, status=exc.status, folded=False)
            return SummaryResult(unchanged, state.folded, False, state.summary)
        state.folded = cut
        state.folded_digest = digest(prints[:cut])
        state.pinned = self._pinned(body, cut, request)
        head, tail = [*head, *_instructions(body[:cut])], [*_kept(body, state.pinned), *body[cut:]]
        state.summary = self._build_summary(head, tail, state, request, self._recent_turns(body, prints, marks),
                                            excerpts_only=excerpts_only)
        self.store.put(key, state)
        return SummaryResult(self._assemble(head, state, tail), cut, True, state.summary)

    def _fold(self, state: ConversationState, new: Sequence[tuple[int, Message, str]], *,
              must_fold: bool = False) -> bool:
        """Add newly overflowed (and clean) messages to the fact pool and to the rolling model summary.
        True when model mode's summarizer failed on a fold that cannot wait: the summary is excerpts."""
        added: list[fact_keeper.Fact] = []
        for index, message, print_ in new:
            state.included.append(print_)
            units = fact_keeper.extract(message, index, print_)
            if units:
                state.texts[index] = fact_keeper.message_units(message)[0]
            added.extend(units)
        if self.model_share < 1.0 and added:
            vectors = self._embed([f.text for f in added])
            old = self._vectors(state)
            state.vectors = vectors if old is None or not len(old) else np.vstack([old, vectors])
        elif added:
            state.vectors = None  # model mode embeds only when it falls back to excerpts (see _build_summary)
        state.facts.extend(added)
        if self.model is not None and new:
            try:
                lost: list[int] = []
                state.model_summary = self.model.fold(state.model_summary, [m for _, m, _ in new], lost=lost)
                # Turns the model summarized into nothing: the rolling summary never reads them again, and in
                # model mode the excerpts stood in for them only until the next fold gave the model a summary.
                state.unsummarized.extend(new[i][0] for i in lost)
            except BackendError as exc:
                if self.model_share >= 1.0 and not must_fold:
                    raise  # model mode: summarize passes the request on unfolded
                # Hybrid: the facts above hold the new turns; the model's summary stays as it was.
                record_event(self.name, "summarizer_failed", error=type(exc).__name__, status=exc.status, folded=True)
                return self.model_share >= 1.0
        return False

    def _build_summary(self, head: list[Message], tail: list[Message], state: ConversationState,
                       request: ChatRequest, recent: list[str], *, excerpts_only: bool = False) -> str:
        """Fill the target budget: the model summary (its share), then the best facts, verified by counting."""
        target = self._target(request)
        base = self.counter.count_prompt(self._assemble(head, None, tail), request.tools)
        empty = self._render(state.folded, "", [])
        framing = self.counter.count_text(empty) + 8  # 8: the summary message's own framing
        if self.target_tokens is None:
            # Message-count trigger only: a quarter of the window is more than most conversations hold
            # (32,000 tokens for a 128k model), so the summary kept every folded sentence and, in hybrid mode,
            # added the model's summary on top: more than the app sent. A summary replaces the folded turns
            # with at most 60% of their tokens, as a token trigger's default target does.
            marks = quarantined(request)
            folded_tokens = sum(self.counter.count_text(f.text) for f in state.facts if f.fingerprint not in marks)
            target = min(target, base + framing + int(folded_tokens * 0.6))
        room = target - base - framing
        model_text = ""
        if self.model_share > 0 and state.model_summary and room > 0 and not excerpts_only:
            model_text = leading_sentences(state.model_summary, int(room * self.model_share), self.counter)
            room -= self.counter.count_text(model_text) if model_text else 0
        chosen: list[fact_keeper.Fact] = []
        # Model mode with nothing usable from the model (an empty or wholly ungrounded answer, a summary cut
        # off before its first sentence ended, or a first sentence bigger than the room): the folded turns
        # must not be replaced by a bare header. Fall back to excerpts, as hybrid mode does.
        # Model mode with a summary that never read some folded turns (see _fold): their excerpts fill the rest.
        unsummarized = set(state.unsummarized) if self.model_share >= 1.0 and model_text else None
        if (self.model_share < 1.0 or not model_text or unsummarized) and state.facts and room > 0:
            marks = quarantined(request)
            pool = [i for i, f in enumerate(state.facts) if f.fingerprint not in marks
                    and (unsummarized is None or f.message in unsummarized)]
            facts = [state.facts[i] for i in pool]
            vectors = self._vectors(state)
            assert vectors is not None
            recent = recent or [""]
            scores = fact_keeper.rank(facts, vectors[pool], recent, self._embed(recent), self.weights)
            chosen = fact_keeper.select(facts, scores, room, self.counter)
            # The estimate above counts units one by one; the exact count decides.
            order = {id(f): s for f, s in zip(facts, scores, strict=True)}
            while chosen:
                text = self._render(state.folded, model_text, fact_keeper.render(chosen, state.texts))
                if self.counter.count_prompt(self._assemble(head, None, tail, text), request.tools) <= target:
                    break
                # standing facts were given their share first (fact_keeper.select): they go last
                chosen.remove(min(chosen, key=lambda f: (f.standing, order[id(f)])))
            # The estimate is conservative (separators, chat-template framing): fill what is left, best first.
            taken = {id(f) for f in chosen}
            for i in np.argsort(-scores, kind="stable")[:FILL_ATTEMPTS]:
                fact = facts[int(i)]
                if id(fact) in taken:
                    continue
                trial = [*chosen, fact]
                text = self._render(state.folded, model_text, fact_keeper.render(trial, state.texts))
                if self.counter.count_prompt(self._assemble(head, None, tail, text), request.tools) <= target:
                    chosen = trial
                    taken.add(id(fact))
        return self._render(state.folded, model_text, fact_keeper.render(chosen, state.texts))

    # -- helpers ------------------------------------------------------------------------------------
    def _recent_turns(self, body: list[Message], prints: list[str], marks: Mapping[str, str]) -> list[str]:
        """The texts of the newest `context_turns` clean messages, folded or not: what the ranking asks about."""
        newest = slice(-self.context_turns, None)
        texts = [message_text(dict(m)) for m, p in zip(body[newest], prints[newest], strict=True) if p not in marks]
        return [t for t in texts if t.strip()]

    def _render(self, folded: int, summary: str, lines: list[str]) -> str:
        return self._template.render(folded=folded, summary=summary, facts=lines).strip()

    def _assemble(self, head: list[Message], state: ConversationState | None, tail: list[Message],
                  summary: str | None = None) -> list[Message]:
        text = summary if summary is not None else (state.summary if state is not None and state.folded else "")
        if not text:
            return [*head, *tail]
        return [*head, {"role": self.summary_role, "content": text}, *tail]

    def _over_window(self, messages: list[Message], request: ChatRequest) -> bool:
        return self.counter.count_prompt(messages, request.tools) + (request.max_tokens or 0) > self.backend.context_window

    def _over_trigger(self, messages: list[Message], request: ChatRequest) -> bool:
        if self.trigger_messages is not None and len(messages) > self.trigger_messages:
            return True
        answer = request.max_tokens or 0
        tokens = self.counter.count_prompt(messages, request.tools)
        if self.trigger_tokens is not None and tokens > self.trigger_tokens:
            return True
        # A request that no longer fits the window (with its max_tokens, when given) is folded, whatever the
        # trigger (a message-count trigger, a token trigger above this backend's window): else the pipeline
        # refuses it with ContextOverflowError "after all stages ran".
        return tokens + answer > self.backend.context_window

    def _target(self, request: ChatRequest) -> int:
        target = self._base_target(request)
        answer = request.max_tokens or 0
        # The prompt must fit the window, and the answer needs room too: a fold (triggered, or forced by an
        # overflow, see _over_trigger) must leave prompt + max_tokens within the window.
        return max(1, min(target, self.backend.context_window - answer))

    def _base_target(self, request: ChatRequest) -> int:
        if self.target_tokens is not None:
            if self._target_given or self.trigger_tokens is None:
                return self.target_tokens
            # The default target is 60% of the trigger *above what no fold can shrink*: the leading system
            # messages and the tool schemas. Counted from zero, 1,500 tokens of tools under a 1,474-token
            # target left no room for a summary at all: every fold dropped the history whole and the next
            # calls crossed the trigger again at once.
            fixed = self.counter.count_prompt(_split_head(request.messages)[0], request.tools)
            return max(self.target_tokens, fixed + int(max(self.trigger_tokens - fixed, 0) * 0.6))
        # Message-count trigger only: the target is what the kept turns need, plus room for a summary.
        return self.backend.context_window // 4

    def _choose_cut(self, head: list[Message], body: list[Message], floor: int, request: ChatRequest) -> int:
        """Keep the newest `keep_last` messages, fewer if they would take more than their share of the target."""
        valid = valid_cuts(body)
        last_possible = len(body) - 1
        while last_possible > floor and not valid[last_possible]:
            last_possible -= 1  # the newest message and the tool results it belongs with
        keep = self.keep_last
        if self.trigger_messages is not None:
            # Like the token target: after a fold the next call must have room to append an exchange (2
            # messages) beside the head and the summary before the count trigger fires again, else every
            # call folds and sends a new summary.
            # The folded instructions kept verbatim beside the head count too.
            kept_instructions = min(MAX_KEPT_INSTRUCTIONS, sum(m.get("role") in _INSTRUCTION_ROLES for m in body))
            keep = min(keep, max(2, self.trigger_messages - len(head) - kept_instructions - 3))
        cut = max(floor, len(body) - keep)
        while cut > floor and not valid[cut]:
            cut -= 1
        # The kept turns' share is of the target above the part no fold can shrink (system messages, tools).
        fixed = self.counter.count_prompt(head, request.tools)
        target = self._target(request)
        limit = fixed + int(max(target - fixed, 0) * self.max_tail_fraction) if fixed < target \
            else int(target * self.max_tail_fraction)
        while cut < last_possible and self.counter.count_prompt([*head, *_kept(body, self._pinned(body, cut, request)),
                                                                       *body[cut:]], request.tools) > limit:
            cut += 1
            while cut < last_possible and not valid[cut]:
                cut += 1
        return cut

    def _pinned(self, body: Sequence[Message], cut: int, request: ChatRequest) -> int:
        """The newest user message (its index; -1: none), when a cut inside its turn (a big tool result) folds
        it: the request itself stays verbatim, right after the summary, so the model still sees what it was
        asked. Not when it is too big to keep (a pasted document): that is folded like any turn, as the summary
        exists to make it fit."""
        last_user = max((i for i, m in enumerate(body) if m.get("role") == "user"), default=-1)
        if not 0 <= last_user < cut:
            return -1
        if self.counter.count_prompt([body[last_user]]) > int(self._target(request) * self.max_tail_fraction) // 2:
            return -1
        return last_user

    def _pinned_since_fold(self, state: ConversationState, body: Sequence[Message], request: ChatRequest) -> int:
        """The message the last fold pinned (a state saved before pins were kept: the one it would have)."""
        return self._pinned(body, state.folded, request) if state.pinned is None else state.pinned

    def _still_valid(self, state: ConversationState, body: list[Message], prints: list[str],
                     marks: Mapping[str, str]) -> bool:
        if state.folded > len(prints) or (state.folded and digest(prints[: state.folded]) != state.folded_digest):
            return False
        # A tool result that arrived after the fold for a call that was folded (a slow parallel call): the
        # old cut now separates them, and the result would be sent without its call. Fold again, validly.
        if state.folded and not valid_cuts(body)[state.folded]:
            return False
        # The summary sent until the next fold holds what was folded: a source quarantined since must go.
        return not any(source in marks for source in state.included)

    def _note_implicit_refold(self, request: ChatRequest, before: ConversationState | None,
                              sent: Sequence[Message]) -> None:
        """prefix_invalidated for a refold of a request without a conversation_id: the previous prompt is
        rebuilt from this request (its messages before the newest assistant message, as the state held before
        this call passed them on), never taken from another conversation that opens alike."""
        head, body = _split_head(request.messages)
        end = previous_prompt_end(request.messages) - len(head)
        if end <= 0:
            return
        if before is not None and before.folded > end:
            return
        if before is None or not before.folded or \
                digest([fingerprint(m) for m in body[: before.folded]]) != before.folded_digest:
            # Unfolded, or the state is another conversation's that opens alike (it folded last): this request's
            # previous call found no state of its own either, so it passed its messages on as they were.
            previous = list(request.messages[: len(head) + end])
        else:
            # the state is this conversation's: its folded messages are this request's
            previous = self._assemble([*head, *_instructions(body[: before.folded])], before,
                                      [*_kept(body, self._pinned_since_fold(before, body, request)),
                                       *body[before.folded:end]])
        was = ConversationState(last_sent=tuple(fingerprint(m) for m in previous), last_tools=tuple(request.tools),
                                last_sent_tokens=self.counter.count_prompt(previous, request.tools))
        tokens = self._invalidated(was, tuple(sent), tuple(fingerprint(m) for m in sent))
        if tokens:
            record_event(self.name, "prefix_invalidated", tokens=tokens, refolded=True)

    def _invalidated(self, state: ConversationState, sent: tuple[Any, ...], prints: tuple[str, ...]) -> int:
        """Tokens of the previous request (as passed on) that are no longer a prefix of this one (`sent`, whose
        message fingerprints are `prints`)."""
        previous = state.last_sent
        if not previous:
            return 0
        common = 0
        for a, b in zip(previous, prints, strict=False):
            if a != b:
                break
            common += 1
        if common == len(previous):
            return 0
        # The common prefix is the same messages now as then. Counted with the tools sent *then*: the previous
        # prompt includes them, and this call's tools (chosen per call by tool retrieval) may be bigger or smaller.
        # That prompt is what the backend got (later stages cleared results in it), when they left the common
        # prefix as this stage passed it on: else what this stage passed on.
        before = previous_prompt_sent()
        if before is not None and before.prints[:common] == tuple(previous[:common]):
            total, tools = before.tokens, list(before.tools)
        else:
            total, tools = state.last_sent_tokens, list(state.last_tools)
        kept = self.counter.count_prompt(list(sent[:common]), tools) if common else 0
        return max(0, total - kept)

    def _key(self, request: ChatRequest) -> tuple[str, str]:
        if request.conversation_id:
            return (request.namespace, request.conversation_id)
        # No conversation_id (the OpenAI drop-in client and LangChain's chat model send none unless told):
        # without a key every call re-read and re-ranked the whole folded history and sent a new summary,
        # breaking the prefix cache on every call, unreported. Name the conversation by its opening (the
        # leading system messages and the first message after them). A state is used only when its folded
        # messages are this request's, word for word (the digest check), so two conversations that open
        # alike never see each other's summary; they only take turns rebuilding it.
        # The app's instructions lead as "system" or, for OpenAI's newer models, "developer" messages: the opening
        # is them and the first message after them. With the developer prompt taken for the first message,
        # every conversation of such an app had one key: each call threw another user's state away and refolded
        # its whole history.
        # The opening is the first exchange and the next message too: chats of one app mostly open alike (its
        # system prompt, then "hi" and its greeting) and part at the second user message. With the first message
        # only, every such chat had one key and each call refolded another's state away. A folded state keeps
        # `keep_last` messages after its cut, so a request that has one holds these three unless its kept turns
        # did not fit (a huge tool result): such a conversation refolds once when it grows past them.
        lead = 0
        while lead < len(request.messages) and request.messages[lead].get("role") in _INSTRUCTION_ROLES:
            lead += 1
        opening = digest([fingerprint(m) for m in request.messages[: lead + _OPENING_MESSAGES]])
        return (request.namespace, f"ctxkit:opening:{opening}")

    def _after_fork_in_child(self) -> None:
        """In a forked child (gunicorn --preload, multiprocessing's fork): a fold of the parent's held its conversation's
        lock through a summarizer call (seconds), and making the embedder held the embedder's: held for ever here, so
        the child's first call of that conversation hung. The parent's folds are not the child's to wait for."""
        self._conversation_locks = weakref.WeakValueDictionary()
        self._locks_lock = threading.Lock()
        self._embedder_lock = threading.Lock()

    def _conversation_lock(self, key: tuple[str, str]) -> Any:
        with self._locks_lock:
            lock = self._conversation_locks.get(key)
            if lock is None:
                lock = self._conversation_locks[key] = threading.Lock()
            return lock

    def _embed(self, texts: list[str]) -> np.ndarray:
        with self._embedder_lock:
            if self._embedder is None:
                from ...embed import Embedder

                self._embedder = Embedder()
        return self._embedder.embed(texts)

    def _vectors(self, state: ConversationState) -> np.ndarray | None:
        if state.vectors is None and state.facts:
            state.vectors = self._embed([f.text for f in state.facts])  # a state loaded from disk
        return state.vectors


_INSTRUCTION_ROLES = ("system", "developer")


def _kept(body: Sequence[Message], pinned: int) -> list[Message]:
    return [body[pinned]] if 0 <= pinned < len(body) else []


def _split_head(messages: Sequence[Message]) -> tuple[list[Message], list[Message]]:
    """The leading system messages (never folded) and the conversation after them."""
    lead = 0
    while lead < len(messages) and messages[lead].get("role") == "system":
        lead += 1
    return list(messages[:lead]), list(messages[lead:])


MAX_KEPT_INSTRUCTIONS = 4  # folded mid-conversation instructions kept verbatim: the newest distinct ones


def _instructions(folded: Sequence[Message]) -> list[Message]:
    """The system messages among folded ones: the app's instructions (a policy given mid-conversation)
    are not facts to rank against the question; they stay verbatim, after the leading ones. Only the newest
    MAX_KEPT_INSTRUCTIONS distinct ones: an agent framework that adds a note every turn ("Step 12 of the run")
    otherwise grew the request without bound past the window, and with a message-count trigger folded (and
    sent a new summary) on every call."""
    kept: list[Message] = []
    seen: set[str] = set()
    for message in reversed(folded):
        if message.get("role") not in _INSTRUCTION_ROLES:
            continue
        text = str(message.get("content"))
        if text in seen:
            continue
        seen.add(text)
        kept.append(message)
        if len(kept) == MAX_KEPT_INSTRUCTIONS:
            break
    return kept[::-1]
