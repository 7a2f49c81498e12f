"""The abstractive half of a summary: any ctxkit Backend folds the previous summary and the newly overflowed
turns into a new summary (rolling: it never re-reads turns it has already folded).

The prompt asks for what a later turn most often needs: names, numbers, dates, decisions, preferences and
open tasks. Prompts are rendered by the sandboxed template engine; the turns enter only as variables.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..._aio import tracked_to_thread
from ...backends.base import Backend
from ...errors import BackendTimeoutError, ConfigurationError
from ...pipeline import record_event
from ...request import ChatRequest
from ...response import message_text
from ...sentences import split_sentences
from ..templates import sandboxed_environment
from .facts import content_words, speaker

_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80",
                      "ninety": "90", "hundred": "100", "thousand": "1000", "dozen": "12", "once": "1", "twice": "2",
                      # scale words: "2 million euros" from turns that said "2,400 euros" is a made-up number
                      "million": "1000000", "billion": "1000000000", "trillion": "1000000000000"})
# A scale written as a number's suffix ("$2.5M", "3bn", "40 mln"): a summary that writes "2.5 million" of it
# states no new number.
_SCALE_SUFFIX = re.compile(r"\d ?(M|MM|m|mn|mln|B|b|bn|bln|T|tn|trn)\b")
_SCALE_OF_SUFFIX = {"M": "million", "MM": "million", "m": "million", "mn": "million", "mln": "million",
                    "B": "billion", "b": "billion", "bn": "billion", "bln": "billion",
                    "T": "trillion", "tn": "trillion", "trn": "trillion"}


def _numbers(text: str, *, spelled: bool = False) -> set[str]:
    """The numbers of a text by value: "1,250.00" and "1250" are one number; with `spelled`, "four" is 4."""
    out = set()
    for number in _NUMBER.findall(text):
        if re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", number):
            number = number.replace(",", "")  # thousands separators
        if re.fullmatch(r"\d+\.\d+", number):
            number = number.rstrip("0").rstrip(".")  # 1250.00 -> 1250, 2.50 -> 2.5
        out.add(number)
    if spelled:
        out.update(_NUMBER_WORDS[w] for w in re.findall(r"[a-z]+", text.lower()) if w in _NUMBER_WORDS)
        out.update(_NUMBER_WORDS[_SCALE_OF_SUFFIX[suffix]] for suffix in _SCALE_SUFFIX.findall(text))
    return out


# The words a summary reports with, which the turns themselves rarely use ("the user asked for ...").
_REPORTING = content_words(
    "user users assistant asked asks requested requests wants wanted said says mentioned discussed confirmed "
    "agreed decided provided shared noted explained suggested recommended conversation summary earlier "
    "previously currently customer person they inquired inquiry question questions answered replied")

SYSTEM = (
    "You write the running summary of a conversation for an assistant that will not see the old turns. "
    "Keep every name, number, date, decision, preference and open task. Be brief. Write plain sentences."
)
USER = (
    "{% if previous %}Summary so far:\n{{ previous }}\n\n{% endif %}"
    "New turns:\n{% for turn in turns %}{{ turn.role }}: {{ turn.text }}\n{% endfor %}\n"
    "Write the updated summary."
)


class ModelSummarizer:
    """Rolls a summary forward with a backend (default in the stage: the embedded local model)."""

    def __init__(self, backend: Backend, *, max_tokens: int = 96, temperature: float = 0.0) -> None:
        if max_tokens < 1 or max_tokens > backend.context_window // 2:
            raise ConfigurationError(f"summary max_tokens must be between 1 and half the summarizer's window "
                                     f"({backend.context_window // 2}), got {max_tokens}")
        self.backend = backend
        self.max_tokens = max_tokens
        self.temperature = temperature
        self._user = sandboxed_environment().from_string(USER)

    def _request(self, previous: str, turns: Sequence[Mapping[str, str]]) -> ChatRequest:
        return ChatRequest(
            messages=[{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": self._user.render(previous=previous, turns=list(turns))}],
            params={"max_tokens": self.max_tokens, "temperature": self.temperature, "seed": 0},
        )

    def fold(self, previous: str, messages: Sequence[Mapping[str, Any]], *, lost: list[int] | None = None) -> str:
        """The new summary: `previous` plus `messages` (already cleared of quarantined content).
        lost: when given, gets the positions (in `messages`) of those whose chunk the model summarized into
        nothing usable (an answer cut off before its first sentence ended, or wholly ungrounded): the rolling
        summary never reads them again, so whoever keeps them must know."""
        turns: list[dict[str, Any]] = [{"role": speaker(m), "text": message_text(dict(m)).strip(), "at": i}
                                       for i, m in enumerate(messages)]
        turns = [t for t in turns if t["text"]]
        if not turns:
            return previous
        # Fold in chunks that fit the summarizer's own window: a long history must not overflow it.
        limit = self.backend.context_window - self.max_tokens - 64
        summary = previous
        chunk: list[dict[str, Any]] = []

        def call(summary: str, chunk: list[dict[str, Any]]) -> str:
            folded = self._call(summary, [{"role": t["role"], "text": t["text"]} for t in chunk])
            if folded == summary and lost is not None:
                lost.extend(t["at"] for t in chunk)
            return folded

        for turn in turns:
            if self._fits(summary, [*chunk, turn], limit):
                chunk.append(turn)
                continue
            if chunk:  # the chunk is full: fold it, and start the next with this turn
                summary = call(summary, chunk)
                chunk = []
            chunk.append({**self._fitted(summary, turn, limit), "at": turn["at"]})
        return call(summary, chunk)

    def _fits(self, summary: str, turns: Sequence[Mapping[str, str]], limit: int) -> bool:
        return self.backend.counter.count_prompt(self._request(summary, turns).messages) <= limit

    def _fitted(self, summary: str, turn: dict[str, str], limit: int) -> dict[str, str]:
        """`turn`, cut to its start when it alone is too long for the window (the extractive keeper has
        the rest). A window too small for even the empty prompt is a configuration error, not a hang."""
        while not self._fits(summary, [turn], limit):
            if not turn["text"]:
                raise ConfigurationError(
                    f"the summarizer's window ({self.backend.context_window} tokens) has no room for a turn "
                    f"next to a {self.max_tokens}-token summary: lower summary_max_tokens")
            turn = {**turn, "text": turn["text"][: len(turn["text"]) // 2]}
        return turn

    def _call(self, previous: str, turns: Sequence[Mapping[str, str]]) -> str:
        request = self._request(previous, turns)
        try:
            response = self.backend.complete(request)
        except BackendTimeoutError:
            # The last attempt timed out: received, maybe processed and billed, as the pipeline counts its own
            # call's last timed-out attempt (the retried ones are backend_retry events). Noted, not hidden.
            record_event("summarization", "summarizer_call", model=request.model or self.backend.model,
                         prompt_tokens=self.backend.counter.count_prompt(request.messages, request.tools),
                         cached_tokens=0, completion_tokens=0, timed_out=True)
            raise
        text = response.content or ""
        if response.finish_reason == "length":
            # Cut off by max_tokens: its last sentence is unfinished ("... on 14 March 2027 to Lisbon, on 2350",
            # where 2350 was the budget in euros); a fragment reads as a fact it does not state.
            text = finished_sentences(text)
        summary, dropped = grounded(text, [previous, *(t["text"] for t in turns)])
        # This call is paid for but is no hand-over the pipeline counts: note its usage in the call's record.
        record_event("summarization", "summarizer_call", model=response.model,
                     prompt_tokens=response.usage.prompt_tokens, cached_tokens=response.usage.cached_tokens,
                     completion_tokens=response.usage.completion_tokens, sentences_dropped=dropped)
        return summary or previous

    async def afold(self, previous: str, messages: Sequence[Mapping[str, Any]]) -> str:

        return await tracked_to_thread(self.fold, previous, messages)


# A full stop before a space or the end; CJK full stops need no space after them.
_SENTENCE_END = re.compile(r"(?:[.!?][\"'\u201d\u2019)\]]*(?=\s|$)|[\u3002\uff01\uff1f][\u201d\u300d)]*)")


def finished_sentences(text: str) -> str:
    """`text` up to its last sentence end: what a generation cut off by its token limit finished saying."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text.rstrip())]
    return text[: ends[-1]] if ends else ""


def grounded(summary: str, sources: Sequence[str]) -> tuple[str, int]:
    """The summary's sentences that its sources support, once each, and how many were dropped.

    A small model loops ("The latest update:" sixteen times, filling its whole budget) and writes words the
    turns never used; such a sentence takes the room of facts and misleads the model that reads it. A
    sentence is kept when at least half its content words occur in the sources and every number in it does.
    That does not prove a sentence right (true words can be recombined wrongly), which is why the stage
    keeps verbatim facts beside the summary; it removes what is plainly not from the conversation.
    """
    source_words = set().union(*(_words(s) for s in sources)) if sources else set()
    source_numbers = set().union(*(_numbers(s, spelled=True) for s in sources)) if sources else set()
    kept: list[str] = []
    said = " "  # the kept sentences' words, each run of them padded by spaces
    dropped = 0
    for whole in (s.strip() for line in summary.splitlines() for s in split_sentences(line)):
        if not whole:
            continue
        sentence = _before_repeat(whole)
        # Said already, whole or as part of a kept sentence ('Azaelia said, "I will not let you ...' and then
        # 'I will not let you ...' again): a repeat takes room and adds nothing.
        key = " ".join(w.lower() for w in _TOKEN.findall(sentence))
        words = _words(sentence) - _REPORTING
        # A sentence in a script without spaces (Chinese, Japanese) has no words to look up: kept, unjudged.
        supported = len(words & source_words) * 2 >= len(words) if words else bool(_UNSPACED.search(sentence))
        if (not key or _said_already(key, said) or not supported or not _claimed_numbers(sentence) <= source_numbers
                or _loops(sentence)):
            dropped += 1
            continue
        said += f"{key} | "
        kept.append(sentence)
    return " ".join(kept), dropped


# Words after which a kept sentence holds a clause as a question, not as a statement: "The user asked whether the
# refund was approved." does not say "The refund was approved.", and the answer must not be dropped as said.
_EMBEDDED_QUESTION = re.compile(r"(?<!\bwhether)(?<!\bif)(?<!\basked)(?<!\basks)(?<!\bask)(?<!\bwondered)"
                                r"(?<!\bwonders)(?<!\bknow)")


def _said_already(key: str, said: str) -> bool:
    """Whether a kept sentence said `key` (a sentence's words, lower case) whole or as part of it, as a statement."""
    return re.search(_EMBEDDED_QUESTION.pattern + " " + re.escape(key) + " ", said) is not None


def _claimed_numbers(sentence: str) -> set[str]:
    """The numbers a summary sentence states, spelled ones too ("within twelve days" from turns that said 5 is a
    made-up number as much as "12" is). Not "one"/"once": a pronoun or a conjunction far more often than a count."""
    words = re.findall(r"[a-z]+", sentence.lower())
    # "The user asked two questions: ..." counts the conversation, which no turn says of itself: no claim.
    spelled = {_NUMBER_WORDS[w] for w, after in zip(words, [*words[1:], ""], strict=False)
               if w in _NUMBER_WORDS and w not in ("one", "once") and after not in _CONVERSATION_NOUNS}
    return _numbers(sentence) | spelled


_CONVERSATION_NOUNS = frozenset("question questions topic topics thing things issue issues request requests concern "
                                "concerns point points message messages".split())


def _before_repeat(sentence: str) -> str:
    """`sentence` up to where it starts saying again what it said ('She said, "I will not let you destroy the
    throne room again. I will not let you destroy the throne room again."': the splitter cannot end a
    sentence inside an open quote, so the repeat arrived as one sentence, and half the summary's room went
    to it). A run of REPEAT_WORDS words said twice is a repeat; prose of one sentence hardly ever does that."""
    words = list(_TOKEN.finditer(sentence))
    lower = [w.group().lower() for w in words]
    first: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - REPEAT_WORDS + 1):
        run = tuple(lower[i:i + REPEAT_WORDS])
        # A repeat says again, to the sentence's end, what it said from the run's first place on: a phrase said
        # twice with other words after it ("the train from Lisbon to Porto leaves at 9 and the train from Lisbon
        # to Porto returns at 17") is a sentence, not a repeat.
        if (run in first and first[run] + REPEAT_WORDS <= i
                and lower[i:] == lower[first[run]:first[run] + len(words) - i]):
            cut = words[i].start()
            # Starting over inside a word ("get_log_access_log_access..."): a loop, with nothing whole to keep.
            return sentence[:cut].rstrip(" ,;:") if not cut or sentence[cut - 1].isspace() else ""
        first.setdefault(run, i)
    return sentence


REPEAT_WORDS = 6


def _loops(sentence: str) -> bool:
    """A sentence that repeats itself inside ("get_log_access_log_access_log_access..."): a model stuck in a
    loop. Its words are the sources' own, so only their variety gives it away: a sentence of twelve or more
    words of which fewer than half are different (prose of that length has about three in four)."""
    words = [w.lower() for w in _TOKEN.findall(sentence)]
    return len(words) >= 12 and len(set(words)) * 2 < len(words)


_TOKEN = re.compile(r"[^\W_]+")  # underscores split too: a looping identifier is many words
# Scripts written without spaces: a run of their characters is a phrase, not a word to look up.
_UNSPACED = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\u0e00-\u0e7f]")


def _words(text: str) -> set[str]:
    return {w for w in content_words(text) if not _UNSPACED.search(w)}
