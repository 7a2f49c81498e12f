"""Spoken-style self-corrections, repaired before a query is compared: "what year did X... no wait, Y".

Users correct themselves mid-sentence ("the Scottish, no, make that the Edinburgh tram"). Compared as
they stand, the corrected-away words (the reparandum) drag the embedding and the precision guards
towards the wrong question. We cut the reparandum with the classic reparandum / interregnum / repair
reading:

1. Find the interregnum: a run of editing terms, fillers and commas ("no , I mean", "or uh rather").
2. Line the repair (the words after it) up with the words before it, in this order of preference:
   - "tell me", "I want to know", "first" + a question word: a fresh question, keep only it;
   - a repair that names what it replaces ("Normandy not Norse") goes where the replaced words are;
   - a question word aligns with the last question word before it ("located in what, or rather which
     city" -> "located in which city");
   - the same first word(s) ("the Scottish, no, the Edinburgh" -> "the Edinburgh");
   - the same kind of word: a name with the last name, a number with the last number ("Article 33 ...
     no sorry 34" -> "Article 34 ...", "Boulton's partner no Watt's" -> "Watt's partner");
   - a single word at the very end replaces the earlier word with the longest shared ending (at least
     four letters: "how unprofitable was it, no, profitable");
   - a question word with none before it: the speaker started over; after a strong editing term, the
     repair replaces the one word before it ("a Belgian, sorry, German law").
3. A short repair at the very end replaces the aligned words and keeps what followed them ("what can
   attract a magnetic effect, no can produce?" -> "what can produce a magnetic effect?"); otherwise the
   repair replaces everything from the aligned word on.

Ambiguous editing words ("no", "instead", "actually", "make that", "or uh") are treated as corrections
only when one of these alignments confirms it or when two of them come together ("wait, no"); everyday
words that also edit ("sorry", "correction", "hold on", "better yet") need more than a shared function
word to confirm them ("do I need to say sorry to my manager" is left alone), unless a comma sets them
off ("to Paris, sorry, to Rome"); and a
"no" right after be/have/there or a preposition is the determiner ("pizza with no onions", "rooms that
have no windows"), never a correction. A run of fillers alone ("tea or uh coffee") only loses the fillers.

The editing terms were read off the even-numbered lines of data/cache/pairs.jsonl (Disfl-QA rewrites;
the words right before the part a rewrite shares with its original question) and checked on the odd
lines; tests/test_cache_disfluency.py and tests/test_cache_keys_guards.py hold examples written by hand,
repaired and left alone, and tests/fixtures/cache/traps_disfluent.jsonl pairs written for the benchmark.
"""

from __future__ import annotations

import os
import re

from ...vocabulary import CARDINAL_WORDS, COMBINING_MARKS

# Lowercased word sequences; matched longest first, so "no wait" wins over "no".
_STRONG = [
    "that is not right sorry", "that's not right", "that is not right", "i ' m a liar", "i'm a liar",
    "or no make that", "no make that", "wait no make that", "no not that", "oh not that", "not that but",
    "scratch that", "let me rephrase that", "let me rephrase", "i meant to say", "i mean to say", "meant to say",
    "mean to say", "i meant", "i mean", "no wait", "oh wait", "wait no", "no no", "oh no", "no sorry", "sorry no",
    "or rather", "or instead", "or actually", "or better", "or i guess", "or sorry", "or wait",
    "or no", "oops", "sory", "never mind", "nevermind", "no stop", "cancel that",
    "or make that", "actually make that", "no actually", "no rather", "that should be", "i want to know is",
    "whoops", "nope", "wait a minute", "no scratch that", "change that to", "scrap that", "that's wrong", "dang it", "or more generally",
    "not him but", "not her but", "not it but", "not them but", "not this but",
]
# Corrections only when an alignment confirms them: "make that" is also a verb phrase ("what did they make
# that could ..."), "no" a determiner, "or uh" may join two real alternatives ("tea or uh coffee").
# Everyday words that also edit ("say sorry to", "a correction for", "hold on to"): weak, and a shared
# function word alone does not confirm them as a correction.
_ORDINARY = ["sorry", "correction", "my bad", "hold on", "better yet", "or like", "let me ask", "pardon me"]
_WEAK = [*_ORDINARY, "make that", "i guess", "no", "instead", "actually", "wait", "oh", "rather", "or", "huh", "yeah", "better", "shoot", "oof"]
_FILLERS = {"um", "umm", "uh", "uhh", "uhm", "er", "erm", "err", "hmm", "ah", "ahh", "ugh"}
# Right after an editing term these announce a fresh question: "no, tell me when they declined".
_RESTART_PHRASES = [
    "what i want to know is", "or first tell me", "or tell me", "first tell me", "and tell me", "actually tell me", "tell me", "i want to know",
    "i wanted to know", "first clarify", "let me know",
]
# "no" after these is the determiner ("with no onions", "there is no fee", "charge no fees" is left to
# the alignment, which finds nothing to replace).
_NO_DETERMINER_AFTER = {
    "is", "are", "was", "were", "be", "been", "being", "'s", "has", "have", "had", "having", "there", "with",
    "of", "for", "in", "on", "at", "by", "to", "from", "into", "about", "under", "and", "or", "but", "if",
    "need", "needs", "get", "gets", "got", "want", "wants", "take", "takes", "make", "makes", "show", "shows",
}
_QUESTION = {"what", "which", "who", "whom", "whose", "when", "where", "why", "how"}
_PREPOSITIONS = {"in", "on", "at", "by", "for", "from", "to", "of", "with", "after", "before", "during", "since",
                 "until", "into", "about", "above", "below", "under", "over", "between", "among"}
_FUNCTION_WORDS = _PREPOSITIONS | {"the", "a", "an", "and", "or", "is", "are", "was", "were", "it", "that", "this"}
_TAIL_WORDS = {"instead", "rather", "please", "then"}  # "... no sorry Berlin's population rather?"
# Editing words that are also plain words of a sentence, and the words before which they are just that:
# "Should I wait for ...", "a correction notice", "to say sorry", "I actually want".
_ALSO_PLAIN = {"sorry", "correction", "wait", "better", "shoot", "actually", "instead", "hold", "pardon"}
# Of those, the ones that are ordinary adverbs too: "sleep better at night", "is it actually safe".
_ALSO_ADVERBS = {"better", "actually"}
_PLAIN_BEFORE = {
    "a", "an", "the", "my", "your", "his", "her", "our", "their", "this", "that", "i", "you", "we", "they", "he",
    "she", "it", "to", "not", "and", "should", "can", "could", "would", "will", "must", "may", "might", "do",
    "does", "did", "be", "been", "am", "is", "are", "was", "were", "say", "feel", "felt",
}
# After an "or" these say the speaker is correcting, not offering a choice: "1882 or maybe 1564".
_OR_HEDGES = {"maybe", "perhaps", "let", "like", "rather", "make", "well", "i", "actually", "sorry", "no", "wait"}
_PUNCT = {",", "-", "...", ".", ";", ":"}
# A combining mark (Unicode M*: Devanagari's vowel signs and virama, Thai's vowels, Arabic's harakat, a
# decomposed accent) is part of the word it sits in: \w does not match most of them, and "फ्रांस" (France)
# fell apart into one- and two-letter pieces that no check reads, so "the capital of France" and "of
# Germany" in Hindi had the same words.
_LETTER = rf"(?:[^\W_]|[{COMBINING_MARKS}])"
_TOKEN = re.compile(rf"{_LETTER}+(?:['’\-]{_LETTER}+)*|_+|[^\w\s{COMBINING_MARKS}]")
_MAX_REACH = 12  # how far back a repair may reach for its anchor word
_SAME_ENDING = 4  # letters a one-word repair shares with the word it replaces ("-cessful", "-eased")
_MAX_TAIL = 3  # a repair of at most this many words at the very end replaces words in place


def tokenize(text: str) -> list[str]:
    """Words and single punctuation marks; "Bailleul ' s" and "Bailleul's" give the same words."""
    # (from where a run of spaces starts only: tried from each space of a long run, it was quadratic)
    text = re.sub(r"(?<!\s)\s*(['’])\s*(s|t|re|ve|ll|d|m)\b", r"'\2", text)
    text = re.sub(r"(\w)\s+-\s+(\w)", r"\1-\2", text)
    return _TOKEN.findall(text)


def detokenize(tokens: list[str]) -> str:
    text = " ".join(tokens)
    text = re.sub(r"\s+([,.;:?!)%])", r"\1", text)
    return re.sub(r"([($€£¥#])\s+", r"\1", text)


def _split_terms() -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
    strong = sorted((t.split() for t in _STRONG), key=len, reverse=True)
    weak = sorted((t.split() for t in _WEAK), key=len, reverse=True)
    restart = sorted((t.split() for t in _RESTART_PHRASES), key=len, reverse=True)
    return strong, weak, restart


_STRONG_TERMS, _WEAK_TERMS, _RESTART_TERMS = _split_terms()
_ORDINARY_TERMS = [t.split() for t in _ORDINARY]


def _match(lower: list[str], i: int, term: list[str]) -> bool:
    return lower[i : i + len(term)] == term


def _editing_term_at(lower: list[str], i: int) -> tuple[int, bool] | None:
    """(length, strong) of an editing term starting at i, if any."""
    if (lower[i - 1 : i + 2] == ["yes", "or", "no"]) or (i >= 2 and lower[i - 2 : i + 1] == ["yes", "or", "no"]):
        return None  # "Answer yes or no: ..." asks for a yes/no answer; it takes nothing back
    for term in _STRONG_TERMS:
        if _match(lower, i, term):
            return len(term), True
    if lower[i] in _FILLERS:
        return 1, False
    for term in _WEAK_TERMS:
        if _match(lower, i, term):
            return len(term), False
    return None


def _interregnum(lower: list[str], i: int,
                 memo: dict[int, tuple[int, bool, int]] | None = None) -> tuple[int, bool, bool] | None:
    """The run of editing terms, fillers and commas starting at i: (end, strong, only fillers).

    A run is strong when it holds a strong term or two editing words ("wait, no", "no, actually"):
    together they leave no other reading.

    `memo` (one per token list): once a run has begun, where it goes from a position depends on the position
    alone, so (end, strong, words up to 2) of the rest of each run is kept for every position it passed:
    without it a long run ("uh um I mean no wait ..." spoken for minutes) was read again from each of its
    words, quadratic in its length.
    """
    j, strong, fillers, words = i, False, 0, 0
    path: list[tuple[int, bool, int]] = []  # (position, strong, words) of each step taken once the run began
    rest: tuple[int, bool, int] | None = None
    while j < len(lower):
        if memo is not None and (fillers or words) and j in memo:
            rest = memo[j]
            break
        if lower[j] in _PUNCT and (fillers or words):
            path.append((j, False, 0))
            j += 1
            continue
        found = _editing_term_at(lower, j)
        if found is None:
            break
        if lower[j] == "or" and found[0] == 1 and (j + 1 >= len(lower) or _editing_term_at(lower, j + 1) is None):
            break  # a bare "or" joins alternatives; it only belongs to a run that goes on ("or uh, rather")
        began = bool(fillers or words)
        strong = strong or found[1]
        word = 0
        if lower[j] in _FILLERS:
            fillers += 1
        elif lower[j : j + found[0]] != ["or"]:
            words += 1
            word = 1
        if began:
            path.append((j, found[1], word))
        j += found[0]
    if rest is None:
        rest = (j, False, 0)
    if memo is not None:
        end, rest_strong, rest_words = rest
        for position, step_strong, step_word in reversed(path):
            rest_strong, rest_words = rest_strong or step_strong, min(2, rest_words + step_word)
            memo[position] = (end, rest_strong, rest_words)
    j, strong, words = rest[0], strong or rest[1], words + rest[2]  # with the steps the memo stood for
    if not (fillers or words):
        if _restart_phrase(lower, j) and lower[j] in ("first", "or"):
            return j, True, False  # "how is income, first what can ..." / "who runs first tell me what ..."
        return None
    return j, strong or words > 1, not words


def _restart_phrase(lower: list[str], j: int) -> int:
    """Length of a "tell me" / "I want to know" / "first <question word>" phrase at j (0 if none)."""
    for lead in (["or", "first"], ["first"]):
        if _match(lower, j, lead) and _asks(lower[j + len(lead) :]):
            return len(lead)
    for term in _RESTART_TERMS:
        if _match(lower, j, term):
            return len(term)
    return 0


def _asks(words: list[str]) -> bool:
    """Whether the words open a question: a question word, or a preposition and one ("in what year")."""
    return bool(words) and (words[0] in _QUESTION or (words[0] in _PREPOSITIONS and words[1:2] != []
                                                       and words[1] in _QUESTION))


def _kind(token: str) -> str | None:
    """The word class a repair may align on when no word repeats: a name, a number or a question word."""
    low = token.lower()
    if low in _QUESTION:
        return "question"
    if re.fullmatch(r"\d[\d,.]*(?:st|nd|rd|th|s)?", low) or low in CARDINAL_WORDS:
        return "number"
    if token[:1].isupper() and token != "I":
        return "name"
    return None


def _possessive(token: str) -> bool:
    return token.lower().endswith(("'s", "’s"))


def _run(tokens: list[str], start: int, kind: str) -> int:
    """Length of the name or number starting at `start` ("J . A . Hobson", "Kong Duanyou")."""
    end = start + 1
    while end < len(tokens) and (_kind(tokens[end]) == kind or (kind == "name" and tokens[end] == "."
                                                                 and end + 1 < len(tokens)
                                                                 and _kind(tokens[end + 1]) == "name")):
        end += 1
    return end - start


def _anchor(prefix: list[str], repair: list[str], prefix_tokens: list[str], repair_tokens: list[str]
            ) -> tuple[int, str] | None:
    """Where in the prefix the repair starts over, and how it was found ("question", "word", "name"...)."""
    start = max(0, len(prefix) - _MAX_REACH)
    if _asks(repair):
        for p in range(len(prefix) - 1, start - 1, -1):
            if prefix[p] in _QUESTION:
                return p, "question"
    for width in (2, 1):
        if len(repair) < width:
            continue
        for p in range(len(prefix) - width, start - 1, -1):
            if prefix[p : p + width] == repair[:width]:
                return p, "word"
    # The same last word: "raw eggs? No, I mean cooked eggs" replaces as many words as the repair has, ending
    # at the word they share (the question kept "raw eggs cooked eggs", and was answered as the raw one).
    words = [w for w in repair if re.match(r"\w", w)]
    if 1 < len(words) <= _MAX_TAIL and words[-1] not in _FUNCTION_WORDS:
        for p in range(len(prefix) - 1, max(start, len(words) - 1) - 1, -1):
            if prefix[p] == words[-1]:
                if prefix[p - len(words) + 1 : p + 1] != words:
                    return p - len(words) + 1, "word"
                break
    first = 1 if repair[0] in ("the", "a", "an") and len(repair_tokens) > 1 else 0  # "no, the French"
    kind = _kind(repair_tokens[first])
    if kind in ("name", "number"):
        found = [p for p in range(len(prefix) - 1, start - 1, -1) if _kind(prefix_tokens[p]) == kind]
        if kind == "name":  # the start of the last name; prefer one that is possessive like the repair
            # (the first word of a sentence is capitalized anyway: a name there only if it runs on)
            found = [p for p in found if (p > 0 and _kind(prefix_tokens[p - 1]) != "name"
                                          and prefix_tokens[p - 1] != ".") or (p == 0 and _run(prefix_tokens, 0, kind) > 1)]
            same = [p for p in found if _possessive(prefix_tokens[p + _run(prefix_tokens, p, kind) - 1])
                    == _possessive(repair_tokens[first + _run(repair_tokens, first, kind) - 1])]
            found = same or found
            size = _run(repair_tokens, first, kind)  # "not him but Elie Prioleau": the two-word name
            found = [p for p in found if _run(prefix_tokens, p, kind) == size] or found
        if found:
            if first and prefix[found[0] - 1 : found[0]] == [repair[0]]:
                return found[0] - 1, "word"
            return found[0], kind if not first else "word"
    return None


def _restated(prefix: list[str], after: list[str]) -> tuple[int, int, list[str]] | None:
    """A repair that names what it replaces: "Normandy not Norse" -> (where "Norse" is, its length, the
    words that replace it). The replaced words must be in the prefix."""
    words = [t for t in after if re.match(r"\w", t)]
    lower = [re.sub(r"['’]s$", "", w.lower()) for w in words]
    if "not" not in lower[1:]:
        return None
    cut = len(lower) - 1 - lower[::-1].index("not")
    new, old = words[:cut], lower[cut + 1 :]
    if not new or not 1 <= len(old) <= 3 or (old and old[-1] == "ones"):
        return None
    while len(new) > 1 and [w.lower() for w in new[:2]] in (["that", "was"], ["it", "was"], ["it", "is"]):
        new = new[2:]  # "no wait, that was Isaac not Richard"
    old = [w.rstrip("s") for w in old]
    bare = [re.sub(r"['’]s$", "", w).rstrip("s") for w in prefix]
    for p in range(len(bare) - len(old), -1, -1):
        if bare[p : p + len(old)] == old:
            if new[0].lower() in _QUESTION and p > 0 and prefix[p - 1] in _QUESTION:
                return p - 1, len(old) + 1, new  # "what engineer ... no, which chemist not engineer"
            return p, len(old), new
    return None


def _same_form(prefix: list[str], after: list[str]) -> int | None:
    """Where a one-word repair at the end goes when no word repeats: the nearest earlier word with the same
    ending ("how unsuccessful was it, no, successful", "the decreased rates ... I mean increased")."""
    words = [t.lower() for t in after if re.match(r"\w", t)]
    if len(words) != 1 or re.match(r"\w", after[-1]) or len(words[0]) < 5:
        return None
    word, best, where = words[0], _SAME_ENDING - 1, None
    for p in range(len(prefix) - 1, max(0, len(prefix) - _MAX_REACH) - 1, -1):
        other = prefix[p]
        shared = len(os.path.commonprefix([other[::-1], word[::-1]]))
        if other != word and len(other) >= 5 and shared > best:  # the longest shared ending, then the nearest
            best, where = shared, p
    return where


def _apply(keep: list[str], anchor: int, how: str, after: list[str]) -> list[str]:
    """The prefix up to the anchor, then the repair; a short repair at the end replaces words in place."""
    words = [t for t in after if re.match(r"\w", t)]
    while len(words) > 1 and words[-1].lower() in _TAIL_WORDS:
        words.pop()
    ending = after[-1:] if not re.match(r"\w", after[-1]) else []
    tail = len(words) <= _MAX_TAIL
    if how in ("word", "name", "number") and tail and words:
        if how == "word":
            span = len(words)
        else:
            span = _run(keep, anchor, how) + len(words) - _run(words, 0, how)
        if anchor + span < len(keep):
            return keep[:anchor] + words + keep[anchor + span :] + ending
    return keep[:anchor] + after


def repair(text: str) -> str:
    """The question the speaker meant, with self-corrections applied; fluent text comes back unchanged."""
    tokens = tokenize(text)
    edited = False
    for _ in range(4):  # a sentence rarely holds more than a couple of corrections
        lower = [t.lower() for t in tokens]
        changed = False
        memo: dict[int, tuple[int, bool, int]] = {}
        for i in range(1, len(tokens)):
            found = _interregnum(lower, i, memo)
            if found is None:
                continue
            j, strong, fillers_only = found
            if lower[i] in ("instead", "rather") and lower[i + 1 : i + 2] in (["of"], ["than"]):
                continue
            restart = _restart_phrase(lower, j) if j < len(tokens) else 0
            j += restart
            if j >= len(tokens) or not re.match(r"\w", tokens[j]):
                continue
            if not strong and lower[i] == "no" and lower[i - 1] in _NO_DETERMINER_AFTER and not restart \
                    and not _asks(lower[j:]):
                continue  # "with no onions"; but "where was, no, who was ..." starts over
            keep = [t for t in tokens[:i] if t not in {",", "-"}]
            while keep and keep[-1] in ("?", "!", "."):  # "... raw eggs? No, I mean ...": the repair ends it
                keep.pop()
            prefix = [t.lower() for t in keep]
            after = tokens[j:]
            anchor = None if restart else _anchor(prefix, lower[j:], keep, after)  # "tell me ...": a new question
            if anchor is not None and anchor[1] == "word" and not strong and tokens[i - 1] != "," \
                    and any(_match(lower, i, term) for term in _ORDINARY_TERMS) and prefix[anchor[0]] in _FUNCTION_WORDS and prefix[anchor[0] + 1 : anchor[0] + 2] != lower[j + 1 : j + 2]:
                anchor = None  # "do I need to say sorry to my manager": one shared "to" confirms no correction
            restated = None if restart else _restated(prefix, after)
            if restated is not None:
                at, length, words = restated
                rest = keep[at + length :]
                echo = [w.lower() for w in words[1:]]
                while rest and echo and rest[0].lower() == echo[0]:  # "three layers of cells ... two layers of cells"
                    rest, echo = rest[1:], echo[1:]
                tokens = keep[:at] + words + rest + (after[-1:] if not re.match(r"\w", after[-1]) else [])
            elif anchor is not None:
                tokens = _apply(keep, anchor[0], anchor[1], after)
            elif (form := _same_form(prefix, after)) is not None:
                tokens = keep[:form] + [t for t in after if re.match(r"\w", t)][:1] + keep[form + 1 :] + after[-1:]
            elif restart or _asks(lower[j:]):
                tokens = after  # the speaker started the question over
            elif strong:
                tokens = keep[:-1] + after  # a one-word substitution: "a Belgian sorry German law"
            elif fillers_only:  # drop the hesitations, keep the words ("tea or uh coffee" -> "tea or coffee")
                tokens = tokens[:i] + [t for t in tokens[i:j] if t.lower() not in _FILLERS and t not in _PUNCT] + after
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
    # Worked out once, so each editing term costs the same however long the text (this runs on every cache
    # lookup): the last word's position, commas before each position, a tail word after each position.
    last_word = max((j for j, t in enumerate(tokens) if re.match(r"\w", t)), default=-1)
    punct_before = [0]
    for t in tokens:
        punct_before.append(punct_before[-1] + (t in _PUNCT))
    tail_after = [False] * (len(lower) + 1)
    for j in range(len(lower) - 1, -1, -1):
        tail_after[j] = tail_after[j + 1] or lower[j] in _TAIL_WORDS
    memo: dict[int, tuple[int, bool, int]] = {}
    zone: list[str] = []
    confirmed: bool | None = None  # whether repair() takes anything back (computed when first needed)
    for i in range(1, len(tokens)):
        term = _editing_term_at(lower, i)
        if term is not None and not _plain_use(tokens, lower, i, tail_after):
            run = _interregnum(lower, i, memo)
            if (run[0] if run else i + term[0]) > last_word:
                # nothing after it to be the repair: the word ends the question ("tips for sleeping
                # better", "can I take 2 ibuprofen instead?", "or no?"), it takes nothing back
                continue
            if (run is not None and not run[1] and lower[i] in _ALSO_ADVERBS and tokens[i - 1] not in _PUNCT
                    and punct_before[run[0]] == punct_before[i]):
                # an ordinary adverb that also edits, alone and with no punctuation setting it off, is a correction
                # only where repair() confirms it: "is 2 mg of melatonin actually safe" takes nothing back ("Plants
                # have sorry lack ...", "universities rather libraries" are corrections repair() cannot undo)
                if confirmed is None:
                    confirmed = tokenize(repair(text)) != tokens
                if not confirmed:
                    continue
            zone.extend(t for t in tokens[max(0, i - window) : i] if re.match(r"\w", t))
            zone.append(",")
    return " ".join(zone)


def _plain_use(tokens: list[str], lower: list[str], i: int, tail_after: list[bool]) -> bool:
    """Whether the editing word at i is just a word of the sentence, so no correction zone opens there.

    "Should I wait for the refund or call the bank?" offers a choice and asks to wait; forgiving "wait
    for the refund" as a reparandum let it hit "Should I call the bank?". `tail_after[j]`: whether a tail
    word stands at j or after it.
    """
    if lower[i : i + 2] in (["instead", "of"], ["rather", "than"]):  # "2 ibuprofen instead of paracetamol"
        return True
    if lower[i] == "or":  # a bare "or" offers alternatives unless a hedge, a question or a tail word follows
        return not (any(w in _QUESTION or w in _OR_HEDGES or w in _FILLERS for w in lower[i + 1 : i + 3])
                    or tail_after[i + 1])
    return (lower[i] in _ALSO_PLAIN and tokens[i - 1] not in _PUNCT and lower[i - 1] in _PLAIN_BEFORE
            and lower[i + 1 : i + 2] != [","])
