"""English word lists that more than one stage reads text with (the cache's self-corrections, the fact
keeper's salience and answer types). One copy each, so the stages agree on what a number word is."""

from __future__ import annotations

import unicodedata

CARDINAL_WORDS = frozenset(
    "one two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty hundred thousand "
    "million billion".split()
)
CALENDAR_WORDS = frozenset(
    "january february march april may june july august september october november december monday tuesday "
    "wednesday thursday friday saturday sunday today tomorrow yesterday".split()
)


def alternation(words: frozenset[str] | set[str]) -> str:
    """`words` as a regular-expression alternation, longest first, in a stable order."""
    return "|".join(sorted(words, key=lambda w: (-len(w), w)))


def _mark_ranges() -> str:
    ranges: list[str] = []
    start = None
    # Every combining mark lies in these two runs (U+0300-U+1E94A, and the variation selectors from U+E0100):
    # scanning only them keeps the import fast (20 ms, not 200 ms for the whole of Unicode).
    for run in (range(0x300, 0x1F000), range(0xE0100, 0xE01F1)):
        for c in run:
            is_mark = unicodedata.category(chr(c))[0] == "M"
            if is_mark and start is None:
                start = c
            elif not is_mark and start is not None:
                ranges.append(f"{chr(start)}-{chr(c - 1)}")
                start = None
        if start is not None:
            ranges.append(f"{chr(start)}-{chr(run[-1])}")
            start = None
    return "".join(ranges)


# The combining marks (Unicode M*), as the inside of a regular-expression character class: Devanagari's
# vowel signs and virama, Thai's vowels, Arabic's harakat, a decomposed accent. They belong to the word
# they sit in, but \w does not match most of them.
COMBINING_MARKS = _mark_ranges()
