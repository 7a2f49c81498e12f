"""The extractive fact keeper: the sentences of folded turns that carry facts, chosen verbatim within a budget.

A small model's summary drops names and numbers; a sentence copied word for word cannot. Folded messages
are split into units (a sentence of a long message, a clause of a long sentence, or a whole short
message), each embedded once when it is folded. When a summary is (re)built, units are ranked for the conversation as it stands:

- relevance: MiniLM similarity and rare-word overlap with the newest turns (folded ones included), the
  newest informative turn counting most: after "Does it have other uses?" / "yes" / "What?", the question
  is about uses, and a turn without content words steers nothing;
- focus: conversations walk through material in order (a document read step by step, a log, a plan), so
  the units that recent turns point at, and the ones right after them, rank higher;
- salience: units with numbers, dates, names or decisions rank a little higher than chit-chat; a question
  ranks lower than any statement (it asks for a fact, its answer carries it);
- standing facts: what a user says about themselves in a chat turn ("I am vegetarian", "my budget is 800
  euros") ranks higher: later turns rely on it without repeating it ("suggest a restaurant");
- answer type: a unit of the kind the newest question asks for ("how many": a number, "when": a date,
  "who": a name, "where": a place) ranks a little higher (answer_type.py);
- neighbours: a clause takes a share of its sentence neighbour's score, and a sentence a smaller share of
  the sentence next to it, since answers often span clauses ("the Smithsonian Institution," / "often
  dubbed 'America's Attic'") and sentences;
- no repeats: a unit contained in a chosen one ("a family tree" after the sentence that says it) is not
  sent again, so its room goes to another fact.

On CoQA (../shared/data/memory) at 25% of the tokens these changes took retention from 0.775 to 0.801;
a summary header on its own line, clause units and a steeper age decay then took it to 0.846 (tuning
half 0.844, check half 0.848); clause neighbours sharing their score (0.7, chosen on the tuning half
among 0.5-1.0), answer types and ctxkit.sentences (no break after "U.S." or an initial, closing quotes
kept) took it to 0.872 (tuning half 0.886, check half 0.857); sentences sharing 0.45 of their
neighbour's score (the middle of the tuning half's plateau, 0.4-0.5) to 0.878 (0.892 / 0.863). The rest
is the reader: at this budget about 5 of 20 story sentences fit, and the misses left are questions such
as "Did it work?" or "What kind?", which a sentence embedding cannot resolve, and answers longer than the
units it keeps.

The chosen units are rendered in conversation order; neighbouring sentences of one message are joined
with the original text between them, so quotes that span sentences survive.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ...response import message_text
from ...sentences import sentence_spans
from ...tokens import TokenCounter
from ...vocabulary import CALENDAR_WORDS, COMBINING_MARKS, alternation
from .answer_type import NAME as _NAME
from .answer_type import asked_kind

# A message shorter than this is one unit: splitting "Walt Disney." helps nobody. A user's message is split
# anyway: "Hi! My name is Ada. ... I am vegetarian." holds several facts, and one 45-token unit did not fit.
SHORT_MESSAGE_CHARS = 200
# A user message of at most this many sentences is a chat turn; a longer one is a pasted text, whose "I" is
# its author's, not the user's.
CHAT_TURN_SENTENCES = 4
STANDING_SHARE = 0.3  # the share of an excerpt budget kept for standing facts before the ranking fills the rest
# A sentence longer than this is split at its clause breaks into pieces of at least CLAUSE_MIN_CHARS, so a
# tight budget can hold the clause that carries the fact (CoQA at 25%: 0.813 -> 0.823, chosen on the
# tuning half among 80/110/150/200 characters; the check half went 0.806 -> 0.818). Chosen neighbours
# are joined again with the original text between them, so a whole sentence still reads whole.
LONG_SENTENCE_CHARS = 150
CLAUSE_MIN_CHARS = 40
# Clause breaks: "," ";" ":" before a space; after a CJK sentence or clause mark (those scripts put no space after
# them: a long Chinese message was one unit, too big for any budget, and left the summary whole); and after a
# comma that opens the next JSON member or element (compact JSON, as most APIs return it, has no spaces).
# A JSON member comma follows a value's end (a string's quote, a bracket, a digit, true/false/null): English prose's
# closing quote after a comma ('"I am moving to Berlin," she said') is not one, and split there a quotation
# lost its closing mark and read as the user's own words.
_CLAUSE_BREAK = re.compile(r"(?<=[,;:])\s+|(?<=[\u3002\uff01\uff1f\uff1b\uff0c\u3001\uff1a])(?=\S)"
                           r"|(?:(?<=[\"}\]0-9],)|(?<=true,)|(?<=false,)|(?<=null,))(?=[\"{\[])")
# letters and digits of any alphabet ("вегетарианка" is a word too), with their combining marks: "दिल्ली"
# (Delhi) read without them was "द", "ल", "ल", letters every Hindi turn has, and a summary sentence that
# named another city or person passed as grounded
_WORD = re.compile(rf"(?:[^\W_]|[{COMBINING_MARKS}])+")
# How much the units after (and just before) the one a recent turn points at share its focus.
FOCUS_STEPS = ((0, 1.0), (1, 0.8), (2, 0.5), (3, 0.3), (-1, 0.3))
_SALIENT = re.compile(
    rf"\d|\$|€|£|%|\b(?:{alternation(CALENDAR_WORDS)})\b|\b(?:decid|agree|prefer|must|deadline|todo|need|plan|will|won't|never|always)",
    re.IGNORECASE,
)
# What a user says about themselves ("I am vegetarian", "my budget is 800 euros", "I'd rather fly", "I'll be
# in Oslo on Monday"):
# standing facts that later turns rely on without repeating them ("suggest a restaurant").
_SELF_DISCLOSURE = re.compile(
    r"\b(?:[Ii](?:'m|’m|'ve|’ve|'d|’d|'ll|’ll| am| would| will| was| have| live| work| study| prefer| like| love| hate| need| want| use| own"
    r"| can't| can’t| cannot| don't| don’t| do not| never| always| usually| only| decided| agreed| chose)|[Mm]y \w+(?: \w+)? (?:is|are|was|were)"
    # The user speaking for a group they belong to ("we are vegetarian", "our flight is on 22 October"):
    r"|[Ww]e(?:'re|’re|'ve|’ve|'ll|’ll| are| will| have| live| prefer| like| need| want| can't| cannot| don't| never| decided| agreed| chose)"
    r"|[Oo]ur \w+(?: \w+)? (?:is|are|was|were)"
    r"|[Cc]all me)\b"
)
STOPWORDS = frozenset(
    "a an the of to in on at for and or but is are was were be been being do does did what who whom whose "
    "which when where why how that this these those it its he she they them his her their him i you we me "
    "my your our with as by from about into than then so not no yes if there here have has had can could "
    "would should will may might just also very please tell me ask".split()
)


@dataclasses.dataclass(frozen=True)
class Fact:
    """One unit of a folded message. `start`/`end` index into that message's text."""

    text: str
    role: str
    message: int  # index of the source message in the conversation (after leading system messages)
    fingerprint: str  # quarantine fingerprint of the source message
    start: int
    end: int
    salience: float
    # Said by the user about themselves in a chat turn ("I am vegetarian", "my budget is 800 euros"): a
    # preference or constraint meant for the rest of the conversation, which later turns rely on unsaid.
    standing: bool = False
    asks: bool = False  # a question (ends with "?", or a chat turn opening like one: "did he go")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def content_words(text: str) -> set[str]:
    """The text's content words as five-letter prefixes: a cheap stemmer that matches "created"/"creates"/
    "creator" well enough."""
    return {w[:5] for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def _salience(text: str) -> float:
    score = 0.0
    if _SALIENT.search(text):
        score += 0.5
    score += min(len(_NAME.findall(text)), 3) / 6
    return score


# Quoted speech is someone else's "I" ('My boss said "I am leaving"'); chat users often type "i am".
_QUOTED = re.compile(r'"[^"]*"|“[^”]*”|«[^»]*»|„[^“”]*[“”]')


def _is_standing(text: str) -> bool:
    return not text.rstrip().endswith("?") and bool(_SELF_DISCLOSURE.search(_QUOTED.sub(" ", text)))


def message_units(message: Mapping[str, Any]) -> tuple[str, list[tuple[int, int]]]:
    """The text a message is summarized from, and the (start, end) spans of its units."""
    text = message_text(dict(message)) if not message.get("tool_calls") else _tool_call_text(message)
    if not text.strip():
        return text, []
    if len(text) < SHORT_MESSAGE_CHARS and message.get("role") != "user":
        return text, [(0, len(text))]
    spans = sentence_spans(text)
    return text, [piece for span in spans for piece in _clauses(text, *span)]


def _clauses(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """A long sentence as its clauses (split after , ; : where both sides keep CLAUSE_MIN_CHARS)."""
    if end - start <= LONG_SENTENCE_CHARS:
        return [(start, end)]
    pieces = []
    for match in _CLAUSE_BREAK.finditer(text, start, end):
        if match.start() - start >= CLAUSE_MIN_CHARS and end - match.end() >= CLAUSE_MIN_CHARS:
            pieces.append((start, match.start()))
            start = match.end()
    return [*pieces, (start, end)]


def _tool_call_text(message: Mapping[str, Any]) -> str:
    parts = [str(message.get("content") or "").strip()]
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        arguments = function.get("arguments") or "{}"
        try:  # sorted keys: the same call always reads the same
            arguments = json.dumps(json.loads(arguments), sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError):
            pass
        parts.append(f"called {function.get('name')}({arguments})")
    return " ".join(p for p in parts if p)


def speaker(message: Mapping[str, Any]) -> str:
    """Who said it: the role, and the participant's `name` when the message has one ("user (alice)"), so a
    fact said by one of several users (or returned by one of several tools) keeps its author."""
    role = str(message.get("role") or "user")
    name = message.get("name")
    return f"{role} ({name})" if isinstance(name, str) and name.strip() else role


def extract(message: Mapping[str, Any], index: int, fingerprint: str) -> list[Fact]:
    text, spans = message_units(message)
    role = speaker(message)
    chat_turn = message.get("role") == "user" and len(sentence_spans(text)) <= CHAT_TURN_SENTENCES
    return [Fact(text=text[a:b], role=role, message=index, fingerprint=fingerprint, start=a, end=b,
                 salience=_salience(text[a:b]), standing=chat_turn and _is_standing(text[a:b]),
                 asks=_asks(text[a:b], chat_turn)) for a, b in spans]


# How a question opens. Chat users often leave out the "?" ("did he go to the store", "what happened next"):
# CoQA's folded questions without one ranked as statements and took a summary's room from the story
# (retention at 25% 0.8766 -> 0.8781; check half 0.8632 -> 0.8663). Not a statement that opens with the same
# words, which the question weight pushed out of the summary: "When I travel I need a seat with a table", "What I
# need is a quiet coach" (a question word and then its subject: no question's word order), "Do not book ..."
# (none of CoQA's 26,455 user units reads otherwise).
_INTERROGATIVE = re.compile(r"^\W*(?:(?:and|so|but|ok|okay|then|also)\W+)?"
                            r"(?:(?:who|whom|whose|what|when|where|why|how|which)\b(?!\W+(?:i|we|you|he|she|it|they)\b)"
                            r"|(?:did|does|do|is|are|was|were|can|could|would|will|should|has|have|had)\b"
                            r"(?!\W+(?:not|and|or)\b))",
                            re.IGNORECASE)


def _asks(text: str, chat_turn: bool) -> bool:
    """A question: it ends with "?", or it is a chat turn's unit that opens like one and ends without a stop (a
    pasted text's "What I feared was ..." is a statement)."""
    stripped = text.rstrip()
    return stripped.endswith("?") or (chat_turn and stripped[-1:] not in ".!"
                                      and _INTERROGATIVE.search(stripped) is not None)


@dataclasses.dataclass(frozen=True)
class Weights:
    """How the ranking mixes its signals; tuned on half of the CoQA set, checked on the other half."""

    similarity: float = 1.3  # MiniLM similarity to the recent turns, newest counting most
    overlap: float = 0.5  # shared rare words with the recent turns, newest counting most
    focus: float = 0.6  # pointed at by a recent turn, or right after such a unit
    salience: float = 0.15
    # Each informative turn further back counts this much less: the newest question and the answer before
    # it steer; older turns only break ties (0.6 -> 0.3 with clause units: 0.823 -> 0.846, both halves up).
    age_decay: float = 0.3
    empty_question: float = 0.3  # weight of a newest message without content words ("What?")
    question: float = -1.0  # a question asks for a fact, it does not carry one: statements go first
    # A unit of the kind the newest question asks for (answer_type.py); 0.2 of 0.1-0.4 on the tuning half.
    answer_type: float = 0.2
    # A user's statement about themselves in a chat turn (Fact.standing). Not tuned: CoQA has no such turns
    # (its retention is the same with it); enough for "I am vegetarian" to outrank a train booking's details
    # when the newest turn asks for a restaurant (tests/test_memory_summarization.py).
    standing: float = 0.4
    # The share of a neighbouring clause's score that a clause of the same sentence takes (0.5-1.0 tried),
    # and of a neighbouring sentence's score that a sentence of the same message takes (0.3-0.75 tried).
    clause_sibling: float = 0.7
    sentence_neighbour: float = 0.45


def rank(
    facts: Sequence[Fact],
    vectors: np.ndarray,
    recent: Sequence[str],
    recent_vectors: np.ndarray,
    weights: Weights | None = None,
) -> np.ndarray:
    """A score per fact. `recent` are the texts of the newest turns, the newest user message last; they
    may include turns already folded: "What?" means nothing alone, the turns before it say what about."""
    weights = weights or Weights()
    n = len(facts)
    if not n:
        return np.zeros(0, dtype=np.float32)
    recent_words = [content_words(t) for t in recent]
    # A turn without content words ("yes", "What?") steers nothing, except that the newest one counts a
    # little, so a conversation of such turns still ranks by something. Age counts informative turns only:
    # after "Does it have other uses?" / "yes" / "What?", the question about uses is the newest one.
    turn_weights = np.zeros(len(recent), dtype=np.float32)
    age = 0
    for j in range(len(recent) - 1, -1, -1):
        if recent_words[j]:
            turn_weights[j] = weights.age_decay ** age
            age += 1
        elif j == len(recent) - 1:
            turn_weights[j] = weights.empty_question
    total = float(turn_weights.sum()) or 1.0
    score = weights.similarity * (vectors @ recent_vectors.T) @ turn_weights / total

    # Word overlap, idf-weighted over the folded units; a word counts with the weight of the newest turn using it.
    fact_words = [content_words(f.text) for f in facts]
    df: dict[str, int] = {}
    for ws in fact_words:
        for w in ws:
            df[w] = df.get(w, 0) + 1
    word_weight: dict[str, float] = {}
    for words, weight in zip(recent_words, turn_weights, strict=True):
        for w in words:
            word_weight[w] = max(word_weight.get(w, 0.0), float(weight))
    overlap = np.array([sum(word_weight[w] * math.log(1 + n / df[w]) for w in ws if w in word_weight)
                        for ws in fact_words], dtype=np.float32)
    if overlap.max() > 0:
        score += weights.overlap * overlap / overlap.max()

    # Focus: conversations walk through material in order, so the unit a recent turn quotes or resembles
    # most, and the units right after it, are where the next question is likely to point.
    focus = np.zeros(n, dtype=np.float32)
    lowered = [f.text.lower() for f in facts]
    for text, vec, weight in zip(recent, recent_vectors, turn_weights, strict=True):
        if weight <= 0:
            continue
        needle = text.lower().strip(" .!?\n")
        quoted = [i for i, t in enumerate(lowered) if len(needle) > 3 and needle in t and t != needle]
        anchor = quoted[0] if quoted else int(np.argmax(vectors @ vec))
        for step, near in FOCUS_STEPS:
            j = anchor + step
            if 0 <= j < n and facts[j].message == facts[anchor].message:
                focus[j] = max(focus[j], near * float(weight))
    score += weights.focus * focus
    score += weights.salience * np.array([f.salience for f in facts], dtype=np.float32)
    score += weights.standing * np.array([f.standing for f in facts], dtype=np.float32)
    kind = asked_kind(recent[-1]) if recent else None
    if kind is not None:
        score += weights.answer_type * np.array([bool(kind.search(f.text)) for f in facts], dtype=np.float32)
    # Answers often span neighbouring units of one message: a clause takes a share of the score of the clause
    # next to it (so a sentence one of whose clauses matches tends to be kept whole), a sentence a smaller
    # share of its neighbour's. A penalty is not shared.
    positive = np.where(score > 0, score, -np.inf)
    for i in range(n - 1):
        if facts[i].message != facts[i + 1].message:
            continue
        share = weights.clause_sibling if facts[i].text.rstrip()[-1:] in ",;:" else weights.sentence_neighbour
        score[i], score[i + 1] = max(score[i], share * positive[i + 1]), max(score[i + 1], share * positive[i])
    # After the sharing: a question next to the answer lifts it, but is not lifted itself.
    # (the "?" as well: a state saved before Fact.asks existed reads it as False)
    score += weights.question * np.array([f.asks or f.text.rstrip().endswith("?") for f in facts], dtype=np.float32)
    # A unit without a content word ("yes", "What?") is kept only when nothing else fits.
    score[[i for i, ws in enumerate(fact_words) if not ws]] -= 10.0
    return score


def render(facts: Sequence[Fact], texts: Mapping[int, str]) -> list[str]:
    """One line per source message, in order; neighbouring units joined by their original text."""
    by_message: dict[int, list[Fact]] = {}
    for fact in sorted(facts, key=lambda f: (f.message, f.start)):
        by_message.setdefault(fact.message, []).append(fact)
    lines = []
    for index, group in by_message.items():
        source = texts.get(index)
        runs: list[str] = []
        run_start, run_end, previous = group[0].start, group[0].end, group[0]
        for fact in group[1:]:
            between = source[previous.end:fact.start] if source is not None else None
            if between is not None and not between.strip():
                run_end = fact.end  # adjacent: keep the original spacing between the two sentences
            else:
                runs.append(_span(source, run_start, run_end, previous))
                run_start, run_end = fact.start, fact.end
            previous = fact
        runs.append(_span(source, run_start, run_end, previous))
        lines.append(f"{group[0].role}: " + " … ".join(r.strip() for r in runs))
    return lines


def _span(source: str | None, start: int, end: int, last: Fact) -> str:
    return source[start:end] if source is not None else last.text


def _contains(outer: str, inner: str) -> bool:
    """Whether `inner` occurs in `outer` as whole words: "booked room 1" is not in "booked room 12"."""
    return inner in outer and re.search(rf"(?<![^\W_]){re.escape(inner)}(?![^\W_])", outer) is not None


def select(
    facts: Sequence[Fact],
    scores: np.ndarray,
    budget: int,
    counter: TokenCounter,
) -> list[Fact]:
    """The best-scored facts whose text fits `budget` tokens (a unit too big is skipped, not cut).

    A unit whose words another chosen unit already contains ("a family tree" after the sentence that says
    it) is not sent twice: it is skipped, or dropped when its container comes later, and its room reused."""
    chosen: dict[int, int] = {}  # fact index -> token cost
    lowered = [" ".join(f.text.lower().split()).strip(" .,!?;:") for f in facts]
    used = 0
    order = [int(j) for j in np.argsort(-scores, kind="stable")]
    # Standing facts first, within a share of the budget: in a long agent loop hundreds of status turns
    # resemble the newest one more than "I'm Dana, the release is due on 3 June" does, and outranked it.
    standing = [i for i in order if facts[i].standing and scores[i] > -5]
    for limit, candidates in ((int(budget * STANDING_SHARE), standing), (budget, order)):
        for i in candidates:
            if i in chosen or not lowered[i] or any(_contains(lowered[k], lowered[i]) for k in chosen):
                continue
            contained = [k for k in chosen if _contains(lowered[i], lowered[k])]
            cost = counter.count_text(facts[i].text) + 2  # separator and line overhead
            refund = sum(chosen[k] for k in contained)
            if used - refund + cost > limit:
                continue
            for k in contained:
                del chosen[k]
            chosen[i] = cost
            used += cost - refund
    return [facts[i] for i in chosen]
