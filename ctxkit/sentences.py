"""Where prose breaks into sentences, for every stage that keeps or drops text a sentence at a time.

A sentence ends at . ! or ? (optionally closed by quotes or brackets) followed by white space, and at a
line break. It does not end after a title, an initial or a dotted abbreviation: cut after "U.S." or
"W. B.", the fact "U.S. President-elect Barack Obama" lands in two pieces, and a budget that keeps one
of them loses it.
"""

from __future__ import annotations

import re

from .tokens import TokenCounter

# The closing quote or bracket stays with its sentence: (?<=...) must be fixed-width, hence two branches.
_CLOSERS = "\"'”’)]"
_CJK_CLOSERS = "」』）】”’\""
# Chinese and Japanese end a sentence at 。！？ with no space after it: without these, a summary in either
# language was one sentence, and a memory budget it did not fit whole sent none of it.
# Other scripts' full stops and question marks, written with a space after them as . and ? are: Hindi's
# danda "।" (and "॥"), Arabic's "؟" and Urdu's "۔", Armenian "։", Ethiopic "።" "፧", Burmese "။". Without
# them a Hindi or Arabic document was one sentence: a budget that could not keep it whole cut it blind.
_ENDS = ".!?।॥؟۔։።፧။"
_BREAK = re.compile(
    rf"(?:(?<=[{_ENDS}])|(?<=[{_ENDS}][{re.escape(_CLOSERS)}]))\s+(?=\S)|\n\s*\n|\n(?=\S)"
    # A run of ends ("真的吗？！", "什么！！！") is one end: the break comes after its last mark or closer.
    rf"|(?<=[。！？])[^\S\n]*(?=[^\s{re.escape(_CJK_CLOSERS)}。！？])"
    rf"|(?<=[。！？][{re.escape(_CJK_CLOSERS)}])[^\S\n]*(?=[^\s{re.escape(_CJK_CLOSERS)}])"
)
_ABBREVIATION = re.compile(
    r"\b(?:(?:[A-Za-z]\.)+[A-Za-z]|Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|Gen|Col|Lt|Capt|Sgt|Rev|Gov|Sen|Rep|Mt|Ft|vs|Inc|Ltd|"
    r"Co|Corp|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)\.$"
)
# A capital letter and a period is an initial after a name or another initial ("Franklin D.", "W. B.") or
# before another initial ("J. K. Rowling"); after a number or a symbol it is a unit ("300 K.", "1.5 J/K.").
_INITIAL_AFTER_NAME = re.compile(r"(?:^|[A-Z][a-z]*\.?\s+)[A-Z]\.$")
_SINGLE_CAPITAL = re.compile(r"(?<![\w/.])[A-Z]\.$")
_INITIAL_AHEAD = re.compile(r"[A-Z]\.\s")
_LOOK_BACK = 24  # characters: enough for the longest abbreviation and the name before an initial


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence of `text`, without the white space around it; [] for blank text."""
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _BREAK.finditer(text):
        if _no_end(text, match.start(), match.end()):
            continue
        spans.append((start, match.start()))
        start = match.end()
    spans.append((start, len(text)))
    return [_strip(text, a, b) for a, b in spans if text[a:b].strip()]


def _no_end(text: str, stop: int, next_start: int) -> bool:
    """Whether the period just before `stop` belongs to an abbreviation or an initial, not a sentence end."""
    if text[stop - 1] in _CLOSERS:
        stop -= 1  # "Apple Inc.' in" : the quote closes a name, the period is the abbreviation's
    back = max(0, stop - _LOOK_BACK)
    if _ABBREVIATION.search(text, back, stop):
        return True
    if not _SINGLE_CAPITAL.search(text, back, stop):
        return False
    return bool(_INITIAL_AFTER_NAME.search(text, back, stop) or _INITIAL_AHEAD.match(text, next_start))


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    piece = text[start:end]
    return start + len(piece) - len(piece.lstrip()), end - len(piece) + len(piece.rstrip())


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, stripped; a text without a sentence end comes back whole."""
    return [text[a:b] for a, b in sentence_spans(text)] or [text]


def leading_sentences(text: str, budget: int, counter: TokenCounter) -> str:
    """The longest run of `text`'s first whole sentences that fits `budget` tokens ("" if none does)."""
    if budget <= 0:
        return ""
    if counter.count_text(text) <= budget:
        return text
    spans = sentence_spans(text)
    kept = ""
    for _, end in spans:
        candidate = text[spans[0][0]:end].strip()  # the original text between sentences, newlines included
        if counter.count_text(candidate) > budget:
            break
        kept = candidate
    return kept
