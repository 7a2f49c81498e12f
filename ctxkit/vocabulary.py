"""English word lists that more than one stage reads text with (the cache's self-corrections, the fact
keeper's salience and answer types). One copy each, so the stages agree on what a number word is."""

from __future__ import annotations

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
