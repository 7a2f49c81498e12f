"""Spoken-style self-corrections, repaired before a query is compared: "what year did X... no wait, Y".

Users correct themselves mid-sentence ("the Scottish, no, make that the Edinburgh tram"). Compared as
they stand, the corrected-away words (the reparandum) drag the embedding and the precision guards
towards the wrong question. We cut the reparandum with the classic reparandum / interregnum / repair
reading: find an editing term ("I mean", "no wait", "sorry", "make that"...), then line the first words
after it up with the words before it ("the Scottish, no, the Edinburgh" -> "the Edinburgh"), or, when
the part after it starts a new question ("How... I mean when did"), keep only that.

Ambiguous editing words ("no", "instead", "actually") are treated as corrections only when the
alignment or the restart confirms it, so "pizza with no onions" keeps its "no".
"""

from __future__ import annotations

import re

# Longest first, so "no wait" wins over "no". Lowercased word sequences.
_STRONG = [
    "that is not right sorry", "that's not right", "that is not right", "i ' m a liar", "i'm a liar",
    "or no make that", "no make that", "wait no make that", "no not that", "oh not that", "scratch that",
    "let me rephrase", "i meant", "i mean", "no wait", "oh wait", "wait no", "no no", "oh no", "no sorry",
    "sorry no", "or rather", "oops", "sorry", "correction", "never mind", "nevermind", "no stop", "cancel that",
    "or make that", "actually make that", "no actually", "i want to know is", "whoops", "my bad", "no rather",
]
_WEAK = ["no", "instead", "actually", "wait", "oh", "rather"]  # corrections only when the alignment confirms
_FILLERS = {"um", "umm", "uh", "uhh", "uhm", "er", "erm", "hmm", "ah"}  # hesitations: drop when nothing aligns

# Words that open a fresh question: after an editing term they mean the speaker started over.
_RESTART = {"what", "which", "who", "whom", "whose", "when", "where", "why", "how"}
_TOKEN = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*|_+|[^\w\s]")
_MAX_REACH = 12  # how far back a repair may reach for its anchor word


def tokenize(text: str) -> list[str]:
    """Words and single punctuation marks; "Bailleul ' s" and "Bailleul's" give the same words."""
    text = re.sub(r"\s*(['’])\s*(s|t|re|ve|ll|d|m)\b", r"'\2", text)
    text = re.sub(r"(\w)\s+-\s+(\w)", r"\1-\2", text)
    return _TOKEN.findall(text)


def detokenize(tokens: list[str]) -> str:
    text = " ".join(tokens)
    text = re.sub(r"\s+([,.;:?!)%])", r"\1", text)
    return re.sub(r"([($€£¥#])\s+", r"\1", text)


def _match(lower: list[str], i: int, term: list[str]) -> bool:
    return lower[i : i + len(term)] == term


def _split_terms() -> tuple[list[list[str]], list[list[str]]]:
    strong = sorted((t.split() for t in _STRONG), key=len, reverse=True)
    weak = [t.split() for t in _WEAK]
    return strong, weak


_STRONG_TERMS, _WEAK_TERMS = _split_terms()


def _editing_term_at(lower: list[str], i: int) -> tuple[int, bool] | None:
    """(length, strong) of an editing term starting at i, if any."""
    for term in _STRONG_TERMS:
        if _match(lower, i, term):
            return len(term), True
    if lower[i] in _FILLERS:
        return 1, False
    for term in _WEAK_TERMS:
        if _match(lower, i, term):
            return len(term), False
    return None


def _skip_interregnum(lower: list[str], j: int) -> tuple[int, bool]:
    """Past a run of punctuation, fillers and further editing terms ("no , I mean"); and whether a strong one."""
    strong = False
    while j < len(lower):
        if lower[j] in {",", "-", "...", ".", ";", ":"} or lower[j] in _FILLERS:
            j += 1
            continue
        found = _editing_term_at(lower, j)
        if found is not None and found[1]:
            j += found[0]
            strong = True
            continue
        break
    return j, strong


def _anchor(prefix: list[str], repair: list[str]) -> int | None:
    """Where in the prefix the repair starts over: the last position (within reach) matching its first words."""
    words = [w for w in prefix]
    start = max(0, len(words) - _MAX_REACH)
    for width in (2, 1):
        if len(repair) < width:
            continue
        for p in range(len(words) - width, start - 1, -1):
            if words[p : p + width] == repair[:width]:
                return p
    return None


def repair(text: str) -> str:
    """The question the speaker meant, with self-corrections applied; fluent text comes back unchanged."""
    tokens = tokenize(text)
    edited = False
    for _ in range(4):  # a sentence rarely holds more than a couple of corrections
        lower = [t.lower() for t in tokens]
        changed = False
        for i in range(1, len(tokens)):
            found = _editing_term_at(lower, i)
            if found is None:
                continue
            length, strong = found
            if lower[i] in ("instead", "rather") and lower[i + 1 : i + 2] in (["of"], ["than"]):
                continue
            j, strong_after = _skip_interregnum(lower, i + length)
            strong = strong or strong_after
            if j >= len(tokens) or not re.match(r"\w", tokens[j]):
                continue
            prefix = [t for t in lower[:i] if t not in {",", "-"}]
            keep = [t for t in tokens[:i] if t not in {",", "-"}]
            after = lower[j:]
            anchor = _anchor(prefix, after)
            if anchor is not None:
                tokens = keep[:anchor] + tokens[j:]
            elif after[0] in _RESTART:
                tokens = tokens[j:]
            elif strong:
                tokens = keep[:-1] + tokens[j:]  # a one-word substitution: "a Belgian sorry German law"
            elif lower[i] in _FILLERS:
                tokens = tokens[:i] + tokens[j:]
            else:
                continue
            changed = edited = True
            break
        if not changed:
            break
    return detokenize(tokens) if edited else text


def correction_zone(text: str, window: int = 4) -> str:
    """The words just before each editing term of `text` (where a reparandum would be), as text.

    The guards forgive a detail that only appears here when the other question lacks it: in "the
    Scottish, no, the Edinburgh tram" the word "Scottish" is a correction, not a different question.
    """
    tokens = tokenize(text)
    lower = [t.lower() for t in tokens]
    zone: list[str] = []
    for i in range(1, len(tokens)):
        if _editing_term_at(lower, i) is not None:
            zone.extend(t for t in tokens[max(0, i - window) : i] if re.match(r"\w", t))
            zone.append(",")
    return " ".join(zone)
