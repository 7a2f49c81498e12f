"""DedupStage: near-duplicate messages and documents are collapsed (MinHash over word shingles).

Why shingles and not embeddings: two texts that differ in one number ("order 1182 shipped" / "order 1183
shipped") are near neighbours for a sentence embedding but different facts. Shingle overlap measures
shared wording, and a collapsed copy keeps every sentence that is not word-for-word in the original, so
a changed number survives even when the rest of the text is dropped.

What is sent:
- Messages: the first copy stays; a later near-duplicate (Jaccard >= `threshold` on word 3-shingles,
  at least `min_tokens` long) becomes `[near-duplicate of the earlier result of read_log({"day": 3})
  (96% same wording), collapsed by ctxkit; what differs:] <its sentences not found in that one>` (and
  `[not in this copy:] <the earlier one's sentences it lacks>`; the earlier one named by its tool call, or
  by its role and first words, not by its position, which later stages shift by inserting documents),
  compared with runs of spaces inside a line ignored; case, indentation, signs and operators not: "-18"
  is not "18", `Config` is not `config`), when that is shorter; messages with image or audio parts are
  never collapsed. Later copies are edited, not earlier ones, so the cached prompt prefix stays intact. The newest user message (the request itself),
  system messages and assistant messages with tool calls are never edited, and no message is removed,
  so tool calls and results stay paired.
- Documents in `request.metadata["documents"]` (`[{"id", "text"}]`): a later near-duplicate is dropped
  and `metadata["ctxkit.duplicate_documents"]` maps its id to the id kept, so the app can still cite it;
  one with sentences of its own (a changed number) keeps its id and only those sentences, after a note naming
  the document that holds the rest (and what of it this one lacks).
"""

from __future__ import annotations

import difflib
import heapq
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ...errors import ConfigurationError
from ...quarantine_marks import PLACEHOLDER_PREFIX as WITHHELD_PREFIX
from ...quarantine_marks import carry
from ...request import ChatRequest, call_answered
from ...response import message_text
from ...sentences import split_sentences
from ...settings import fraction, whole_number
from ...stage import Stage
from ...tokens import TokenCounter
from ..prefix import default_counter, previous_prompt_end, record_prefix_invalidated
from .documents import COLLAPSED_PREFIX, DUPLICATES_KEY, MISSING_MARK, checked_documents
from .tool_results import PLACEHOLDER_PREFIX as CLEARED_PREFIX

_PRIME = (1 << 61) - 1
_TOKEN = re.compile(r"[^\W_]+", re.UNICODE)


class MinHasher:
    """MinHash signatures of word-shingle sets, with LSH banding to find candidate pairs fast.

    Hashes are crc32-based and the permutations come from a fixed seed, so the same text gets the same
    signature in every process (Python's own `hash` is salted per process).
    """

    def __init__(self, num_perm: int = 128, bands: int = 32, shingle: int = 3, seed: int = 7) -> None:
        if num_perm % bands:
            raise ConfigurationError("num_perm must be a multiple of bands")
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, _PRIME, num_perm, dtype=np.uint64)
        self.b = rng.integers(0, _PRIME, num_perm, dtype=np.uint64)
        self.bands, self.rows, self.shingle = bands, num_perm // bands, shingle

    def shingles(self, text: str) -> set[int]:
        tokens = _TOKEN.findall(text.lower())
        n = self.shingle
        grams = [" ".join(tokens[i : i + n]) for i in range(max(len(tokens) - n + 1, 1))] if tokens else []
        return {zlib.crc32(g.encode()) for g in grams}

    def signature(self, shingles: set[int]) -> np.ndarray:
        if not shingles:
            return np.full(len(self.a), np.iinfo(np.uint64).max, dtype=np.uint64)
        x = np.fromiter(shingles, dtype=np.uint64)
        # a*x wraps modulo 2**64 before the Mersenne modulus (as datasketch does): still a fixed, well-mixed
        # hash family, which is all MinHash needs; exact Jaccard confirms every candidate pair anyway.
        hashed = (np.multiply.outer(self.a, x) + self.b[:, None]) % np.uint64(_PRIME)
        return hashed.min(axis=1)

    def earliest_matches(self, signatures: Sequence[np.ndarray], matches: Any) -> dict[int, int]:
        """{later: earliest earlier} for each signature, the earliest one that shares a band with it (an LSH
        candidate) and for which `matches(earlier, later)` holds. Candidates are tried earliest first and the
        first that matches ends the search: listing every pair of a bucket first made n^2 of them for n
        near-copies (a thousand polls of a job's status took seconds)."""
        buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        found: dict[int, int] = {}
        for later, sig in enumerate(signatures):
            keys = [sig[band * self.rows : (band + 1) * self.rows].tobytes() for band in range(self.bands)]
            earlier_lists = [members for band, key in enumerate(keys) if (members := buckets[band].get(key))]
            tried: set[int] = set()
            for earlier in heapq.merge(*earlier_lists):  # each list is in index order
                if earlier in tried:
                    continue
                tried.add(earlier)
                if matches(earlier, later):
                    found[later] = earlier
                    break
            for band, key in enumerate(keys):
                buckets[band].setdefault(key, []).append(later)
        return found



def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class DedupStage(Stage):
    """Collapse later near-duplicates of earlier messages and documents."""

    name = "dedup"

    def __init__(
        self,
        threshold: float = 0.6,
        *,
        min_tokens: int = 30,
        documents: bool = True,
        messages: bool = True,
        counter: TokenCounter | None = None,
    ) -> None:
        self.threshold = fraction(threshold, "threshold")
        self.min_tokens = whole_number(min_tokens, "min_tokens")
        self.dedup_documents = documents
        self.dedup_messages = messages
        self.counter = counter if counter is not None else default_counter()
        self.hasher = MinHasher()

    # -- the hook -------------------------------------------------------------------------------------
    def before_model(self, request: ChatRequest) -> ChatRequest:
        changes: dict[str, Any] = {}
        if self.dedup_messages:
            messages = self._collapse_messages(request.messages)
            if messages is not None:
                changes["messages"] = messages
                request = carry(request, zip(request.messages, messages, strict=True))
        if self.dedup_documents and "documents" in request.metadata:
            documents, duplicates = self.collapse_documents(request.metadata["documents"])
            if duplicates or documents != list(request.metadata["documents"]):
                merged = {**request.metadata.get(DUPLICATES_KEY, {}), **duplicates}
                changes["metadata"] = {**request.metadata, "documents": documents, DUPLICATES_KEY: merged}
        return request.override(**changes) if changes else request

    # -- documents ------------------------------------------------------------------------------------
    def collapse_documents(self, documents: Any) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """(documents without later near-duplicates, {dropped id: kept id})."""
        documents = checked_documents(documents)
        texts = [doc["text"] for doc in documents]
        pairs = self._near_duplicates(texts, eligible=[True] * len(texts))
        duplicates: dict[str, str] = {}
        dropped: set[int] = set()
        cut: dict[int, str] = {}
        for later, earlier in sorted(pairs.items()):
            while earlier in pairs:  # a copy of a copy points at the first one
                earlier = pairs[earlier]
            if not _same_sequence(texts[earlier], texts[later]):
                continue  # reordered or repeated sentences: kept whole
            differs = _differs(texts[earlier], texts[later])
            if differs and not self._shorter(differs, texts[later]):
                continue  # nearly every sentence changed (a re-polled log, a table of new numbers): kept whole
            if differs:  # sentences of its own (a new number, a negation): keep those, under its own id
                # ... saying where the rest is: "Refund policy for US customers." alone says the US policy
                # has no terms, when it has the EU one's (and say what it lacks of them).
                missing = _unmatched(_differs(texts[later], texts[earlier]), differs)
                text = (f'{COLLAPSED_PREFIX} document "{documents[earlier]["id"]}", collapsed by ctxkit; '
                        f"the rest is the same; what differs:] {_join(differs, texts[later])}")
                text += f" {MISSING_MARK} {_join(missing, texts[earlier])}" if missing else ""
                if self.counter.count_text(text) < self.counter.count_text(texts[later]):
                    cut[later] = text  # else the "collapsed" copy would be longer than the document itself
                continue
            dropped.add(later)
            duplicates[str(documents[later]["id"])] = str(documents[earlier]["id"])
        kept = [{**doc, "text": cut[k]} if k in cut else dict(doc) for k, doc in enumerate(documents) if k not in dropped]
        return kept, duplicates

    # -- messages -------------------------------------------------------------------------------------
    def _message_pairs(self, messages: Sequence[Mapping[str, Any]]) -> dict[int, int]:
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        texts = [message_text(dict(m)) for m in messages]
        eligible = [
            m.get("role") in ("user", "tool", "assistant")
            and not m.get("tool_calls")
            and _text_only(m)  # an image or audio part is not in the text: collapsing would drop it
            and i != last_user
            # A note standing for a result (cleared: "call it again with these arguments"; withheld by the
            # quarantine) is not its content: two notes of calls with long, alike arguments are near-duplicates,
            # and collapsed, the later one lost the arguments it says to call again with.
            and not texts[i].startswith((COLLAPSED_PREFIX, CLEARED_PREFIX, WITHHELD_PREFIX))
            for i, m in enumerate(messages)
        ]
        return self._near_duplicates(texts, eligible)

    def _collapsed(self, messages: Sequence[Mapping[str, Any]]) -> dict[int, str]:
        """{message index: collapsed text} for the later near-duplicates worth collapsing."""
        pairs = self._message_pairs(messages)
        texts = [message_text(dict(m)) for m in messages]
        collapsed: dict[int, str] = {}
        for later, earlier in sorted(pairs.items()):
            while earlier in pairs:
                earlier = pairs[earlier]
            similarity = jaccard(self.hasher.shingles(texts[earlier]), self.hasher.shingles(texts[later]))
            if not _same_sequence(texts[earlier], texts[later]):
                continue  # the same sentences in another order or number: only the whole copy says so
            differs = _differs(texts[earlier], texts[later])
            if differs and not self._shorter(differs, texts[later]):
                continue  # the collapsed text could not be shorter: skip the pairing of changed sentences too
            # A copy that drops a sentence says less than the original (a ticket closed, a line of code
            # deleted): "near-duplicate" alone would tell the model the dropped sentence still holds.
            # A sentence that was changed, not dropped, is already among what differs.
            missing = _unmatched(_differs(texts[later], texts[earlier]), differs)
            head = f"{COLLAPSED_PREFIX} {_describe(messages, earlier)} ({similarity:.0%} same wording), collapsed by ctxkit"
            text = f"{head}; what differs:] {_join(differs, texts[later])}" if differs else f"{head}]"
            if missing:
                text += f" {MISSING_MARK} {_join(missing, texts[earlier])}"
            if self.counter.count_text(text) < self.counter.count_text(texts[later]):
                collapsed[later] = text  # else it saves nothing: leave the message (and the prefix) alone
        return collapsed

    def _shorter(self, differs: Sequence[str], text: str) -> bool:
        """Whether the sentences that differ are fewer tokens than the whole text: a collapsed copy carries
        all of them (and a note), so otherwise collapsing saves nothing. Checked before pairing changed
        sentences with the ones they replace, which is quadratic: two 400-line logs with a number changed on
        every line took a minute."""
        return self.counter.count_text(" ".join(differs)) < self.counter.count_text(text)

    def _collapse_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
        collapsed = self._collapsed(messages)
        if not collapsed:
            return None
        out = [dict(m) for m in messages]
        for later, text in collapsed.items():
            out[later]["content"] = text
        # Collapses the previous call already made (same history up to its end) cost no cached prefix now.
        before = self._collapsed(messages[: previous_prompt_end(messages)])
        new_edits = [i for i in collapsed if before.get(i) != collapsed[i]]
        record_prefix_invalidated(self.name, self.counter, messages, min(new_edits) if new_edits else None)
        return out

    def _near_duplicates(self, texts: Sequence[str], eligible: Sequence[bool]) -> dict[int, int]:
        """{later index: earlier index} for texts whose shingle Jaccard reaches the threshold."""
        index = [i for i, text in enumerate(texts) if eligible[i] and self.counter.count_text(text) >= self.min_tokens]
        if len(index) < 2:
            return {}
        shingles = [self.hasher.shingles(texts[i]) for i in index]
        signatures = [self.hasher.signature(s) for s in shingles]
        # LSH gives candidates; Jaccard confirms them exactly
        found = self.hasher.earliest_matches(
            signatures, lambda a, b: jaccard(shingles[a], shingles[b]) >= self.threshold)
        return {index[b]: index[a] for b, a in found.items()}


def _describe(messages: Sequence[Mapping[str, Any]], index: int) -> str:
    """The earlier copy as the model can find it: its tool call, or its role and first words. Not its position:
    a stage after this one (documents rendered before the newest question, a template) shifts positions."""
    message = messages[index]
    if message.get("role") == "tool":
        call = call_answered(messages, index)
        if call is not None:
            # the arguments cut short: a long query or code would be sent again in every collapsed copy
            arguments = call[1] if len(call[1]) <= 80 else call[1][:80].rstrip() + "…"
            return f"result of {call[0]}({arguments})"
    opening = " ".join(message_text(dict(message)).split()[:6])
    return f'{message.get("role")} message "{opening}…"'


def _alike(a: str, b: str) -> bool:
    """Two versions of one sentence ("revenue of 4.2 million" / "4.3 million"), not two sentences."""
    if 1.4 * min(len(a), len(b)) < 0.6 * max(len(a), len(b)):
        return False  # ratio() is at most 2*min/(len(a)+len(b)): it cannot reach 0.6
    return _likeness(a, b) >= 0.6


def _unmatched(missing: Sequence[str], differs: Sequence[str]) -> list[str]:
    """The sentences of `missing` that are not an earlier version of one in `differs`. Each changed sentence
    stands for one earlier sentence at most: "Ticket 11 is closed." replaces "Ticket 11 is open.", and a
    "Ticket 12 is open." dropped beside it is still reported missing."""
    taken: set[int] = set()
    for d in differs:
        alike = [k for k, m in enumerate(missing) if k not in taken and _alike(m, d)]
        if alike:
            taken.add(max(alike, key=lambda k: _likeness(missing[k], d)))
    return [m for k, m in enumerate(missing) if k not in taken]


def _likeness(a: str, b: str) -> float:
    """How alike two sentences are, 0 to 1: difflib's ratio, or for long ones the overlap of their character
    4-grams (difflib is quadratic in the length: a one-line JSON result of 80 KB, changed in one value, took a
    minute)."""
    if len(a) + len(b) > 2000:
        grams_a = {a[i : i + 4] for i in range(len(a) - 3)}
        grams_b = {b[i : i + 4] for i in range(len(b) - 3)}
        return len(grams_a & grams_b) / max(len(grams_a | grams_b), 1)
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def _join(sentences: Sequence[str], text: str) -> str:
    """Sentences of `text` as one string: one a line when `text` is lines (rows of a CSV or a log), so two
    changed rows do not run together into one ("...,22.5,10 1017,widget..." read as a stock of "10 1017")."""
    return ("\n" if "\n" in text.strip() else " ").join(sentences)


def _norm(sentence: str) -> str:
    # Runs of spaces inside a line only: signs, operators and decimal points are facts ("-18" is not "18",
    # ">" is not ">="), and so are a line's indentation (Python's blocks) and letter case (identifiers,
    # paths, SQL strings).
    lines = []
    for line in sentence.strip().splitlines():
        body = line.lstrip()
        lines.append(line[: len(line) - len(body)] + " ".join(body.split()))
    return "\n".join(lines)


def _differs(earlier: str, later: str) -> list[str]:
    """The sentences of `later` that are not, character for character (white space aside), in `earlier`."""
    seen = {_norm(s) for s in split_sentences(earlier)}
    return [s for s in split_sentences(later) if _norm(s) not in seen]


def _same_sequence(earlier: str, later: str) -> bool:
    """Whether the sentences both texts share come in the same order and number. "What differs" lists only
    new sentences: a line repeated (a charge made twice) or items reordered (a queue, a ranking) would be
    collapsed as "100% the same"."""
    a = [_norm(s) for s in split_sentences(earlier)]
    b = [_norm(s) for s in split_sentences(later)]
    shared = set(a) & set(b)
    return [s for s in a if s in shared] == [s for s in b if s in shared]


def _text_only(message: Mapping[str, Any]) -> bool:
    content = message.get("content")
    return not isinstance(content, list) or all(
        isinstance(part, Mapping) and part.get("type", "text") == "text" for part in content
    )


__all__ = ["COLLAPSED_PREFIX", "DUPLICATES_KEY", "DedupStage", "MinHasher", "jaccard"]
