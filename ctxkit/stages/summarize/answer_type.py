"""What kind of fact a question asks for, and whether a unit of text has one.

"How many ...?" is answered by a number, "When ...?" by a date or a time, "Who ...?" by a name, "Where ...?"
by a place. Similarity alone ranks every sentence that mentions the question's topic alike; of those, the
one with a number in it is the likelier answer to "how many". English only, and only a tie-breaker: the
ranking adds a small weight (Weights.answer_type) to units of the asked-for kind.
"""

from __future__ import annotations

import re

from ...vocabulary import CALENDAR_WORDS, CARDINAL_WORDS, alternation

_LEAD = r"^\W*(?:(?:and|so|but|ok|okay|then)\W+)?"
_NUMBER_WORDS = alternation(CARDINAL_WORDS | {"dozen", "half", "once", "twice"})
_TIME_WORDS = alternation(CALENDAR_WORDS | set(
    "year years century morning evening night noon week weekend day days ago after before later spring summer "
    "autumn fall winter".split()))
_PLACE_NOUNS = ("room|house|home|school|city|town|park|street|store|shop|office|church|river|lake|sea|ocean|"
                "forest|village|country|island|kitchen|garden|yard|car|bed|table|door|window|hospital|library|"
                "station|airport|building")

# A capitalized word that does not open a sentence: a name.
NAME = re.compile(r"(?<![.!?]\s)(?<!^)\b[A-Z][a-z]+")

# (question opening, what a unit answering it contains), first match wins.
_KINDS: tuple[tuple[re.Pattern[str], re.Pattern[str]], ...] = (
    (re.compile(_LEAD + r"(?:how (?:many|much|old|far|long|often)|what (?:number|percent|age))\b", re.I),
     re.compile(rf"\d|\b(?:{_NUMBER_WORDS})\b", re.I)),
    (re.compile(_LEAD + r"(?:when|what (?:year|time|day|month|date|century))\b", re.I),
     re.compile(rf"\d|\b(?:{_TIME_WORDS})\b", re.I)),
    (re.compile(_LEAD + r"(?:who|whom|whose)\b", re.I), NAME),
    (re.compile(_LEAD + r"where\b", re.I),
     re.compile(rf"\b(?:in|at|to|from|near|on|into|inside|under|behind|across|outside)\s+(?:the\s+)?"
                rf"(?:[A-Z]|\w*(?:{_PLACE_NOUNS})\b)")),
)


def asked_kind(question: str) -> re.Pattern[str] | None:
    """The pattern a unit answering `question` matches, or None when the question asks for no one kind."""
    for opening, answer in _KINDS:
        if opening.search(question.strip()):
            return answer
    return None
