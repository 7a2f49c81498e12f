"""The extractive fact keeper: the sentences of folded turns that carry facts, chosen verbatim within a budget.

A small model's summary drops names and numbers; a sentence copied word for word cannot. Folded messages
are split into units (a sentence of a long message, or a whole short message), each embedded once when
it is folded. When a summary is (re)built, units are ranked for the conversation as it stands:

- relevance: MiniLM similarity to the newest user message and to the recent turns kept verbatim, plus
  word overlap with them (rare words count more);
- focus: conversations walk through material in order (a document read step by step, a log, a plan), so
  the units that recent turns point at, and the ones right after them, rank higher;
- salience: units with numbers, dates, names or decisions rank a little higher than chit-chat.

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
from ...tokens import TokenCounter

SHORT_MESSAGE_CHARS = 200  # a message shorter than this is one unit: splitting "Walt Disney." helps nobody
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=\S)|\n\s*\n|\n(?=\S)")
_WORD = re.compile(r"[a-z0-9]+")
_MONTHS = ("january|february|march|april|may|june|july|august|september|october|november|december|"
           "monday|tuesday|wednesday|thursday|friday|saturday|sunday|today|tomorrow|yesterday")
_SALIENT = re.compile(
    rf"\d|\$|€|£|%|\b(?:{_MONTHS})\b|\b(?:decid|agree|prefer|must|deadline|todo|need|plan|will|won't|never|always)",
    re.IGNORECASE,
)
_NAME = re.compile(r"(?<![.!?]\s)(?<!^)\b[A-Z][a-z]+")
_STOP = frozenset(
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

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _words(text: str) -> set[str]:
    # Five-letter prefixes: a cheap stemmer that matches "created"/"creates"/"creator" well enough.
    return {w[:5] for w in _WORD.findall(text.lower()) if w not in _STOP}


def _salience(text: str) -> float:
    score = 0.0
    if _SALIENT.search(text):
        score += 0.5
    score += min(len(_NAME.findall(text)), 3) / 6
    return score


def message_units(message: Mapping[str, Any]) -> tuple[str, list[tuple[int, int]]]:
    """The text a message is summarized from, and the (start, end) spans of its units."""
    text = message_text(dict(message)) if not message.get("tool_calls") else _tool_call_text(message)
    if not text.strip():
        return text, []
    if len(text) < SHORT_MESSAGE_CHARS:
        return text, [(0, len(text))]
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _SENTENCE_BREAK.finditer(text):
        if text[start:match.start()].strip():
            spans.append((start, match.start()))
        start = match.end()
    if text[start:].strip():
        spans.append((start, len(text)))
    return text, spans


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


def extract(message: Mapping[str, Any], index: int, fingerprint: str) -> list[Fact]:
    text, spans = message_units(message)
    role = str(message.get("role") or "user")
    return [Fact(text=text[a:b], role=role, message=index, fingerprint=fingerprint, start=a, end=b,
                 salience=_salience(text[a:b])) for a, b in spans]


@dataclasses.dataclass(frozen=True)
class Weights:
    """How the ranking mixes its signals; tuned on half of the CoQA set, checked on the other half."""

    question: float = 1.0  # similarity to the newest user message
    recent: float = 0.5  # similarity to the recent turns together
    overlap: float = 0.6  # shared rare words with the newest message (recent turns count half)
    focus: float = 0.6  # pointed at by recent turns, or right after such a unit
    salience: float = 0.15


def rank(
    facts: Sequence[Fact],
    vectors: np.ndarray,
    recent: Sequence[str],
    recent_vectors: np.ndarray,
    weights: Weights | None = None,
) -> np.ndarray:
    """A score per fact; `recent` are the texts of the turns kept verbatim, the newest user message last."""
    weights = weights or Weights()
    if not facts:
        return np.zeros(0, dtype=np.float32)
    question_vec = recent_vectors[-1]
    context_vec = recent_vectors.mean(axis=0)
    context_vec = context_vec / (np.linalg.norm(context_vec) + 1e-9)
    score = weights.question * (vectors @ question_vec) + weights.recent * (vectors @ context_vec)

    # Word overlap, idf-weighted over the folded units.
    fact_words = [_words(f.text) for f in facts]
    df: dict[str, int] = {}
    for ws in fact_words:
        for w in ws:
            df[w] = df.get(w, 0) + 1
    n = len(facts)
    question_words = _words(recent[-1])
    context_words = set().union(*(_words(t) for t in recent[:-1])) - question_words if len(recent) > 1 else set()
    overlap = np.array([
        sum(math.log(1 + n / df[w]) for w in ws & question_words)
        + 0.5 * sum(math.log(1 + n / df[w]) for w in ws & context_words)
        for ws in fact_words
    ], dtype=np.float32)
    if overlap.max() > 0:
        score += weights.overlap * overlap / overlap.max()

    # Focus: for each recent turn (newest counts most), the unit it quotes or resembles most, and what follows.
    focus = np.zeros(n, dtype=np.float32)
    lowered = [f.text.lower() for f in facts]
    for age, (text, vec) in enumerate(zip(reversed(recent), reversed(recent_vectors), strict=True)):
        needle = text.lower().strip(" .!?\n")
        quoted = [i for i, t in enumerate(lowered) if len(needle) > 3 and needle in t]
        anchor = quoted[0] if quoted else int(np.argmax(vectors @ vec))
        for step, weight in ((0, 1.0), (1, 0.8), (2, 0.5), (3, 0.3), (-1, 0.3)):
            j = anchor + step
            if 0 <= j < n and facts[j].message == facts[anchor].message:
                focus[j] = max(focus[j], weight * 0.6**age)
    score += weights.focus * focus
    score += weights.salience * np.array([f.salience for f in facts], dtype=np.float32)
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


def select(
    facts: Sequence[Fact],
    scores: np.ndarray,
    budget: int,
    counter: TokenCounter,
) -> list[Fact]:
    """The best-scored facts whose text fits `budget` tokens (a unit too big is skipped, not cut)."""
    chosen: list[Fact] = []
    used = 0
    for i in np.argsort(-scores, kind="stable"):
        fact = facts[int(i)]
        cost = counter.count_text(fact.text) + 2  # separator and line overhead
        if used + cost > budget:
            continue
        chosen.append(fact)
        used += cost
    return chosen
