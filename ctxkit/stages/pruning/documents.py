"""DocumentPruningStage: documents and long tool results are ranked against the request and cut to a
token budget, passage by passage; kept documents keep their ids so the app can cite or restore them.

Where documents come from (all three can be used at once):
1. `request.metadata["documents"] = [{"id", "text", ...}]`: ranked against the newest user message; the
   kept ones replace the list (texts cut to their best passages, the other keys kept), the ids of all
   of them go to `metadata["ctxkit.pruned_documents"]`, and with `render=True` (the default) they are
   sent as one user message of `<document id="...">` blocks just before the newest user message: the
   end of the prompt, so the cached prefix before it is untouched during a turn. A new turn moves them to
   its own question, which un-caches the previous prompt from its question on (a `prefix_invalidated` event).
2. `<document id="...">...</document>` blocks inside user messages (the same format): cut in place.
3. Tool results longer than `long_message_tokens`: cut in place, with a note saying how to get the
   full text again (the tool call); a result of a call the model made again with the same arguments is
   sent whole. `long_message_tokens=None` leaves tool results whole.

A rendered message that carries a document QuarantineStage flagged (`metadata["ctxkit.quarantined_documents"]`)
is itself marked quarantined, so summaries, caches and memory leave it out.

Every document is ranked against the user request of its own turn (the newest user message before it),
not the newest one. So an older tool result is cut the same way on every call, and the prompt prefix
stays byte-identical from call to call; only content of the current turn is ever newly edited.

Ranking is hybrid: a text is split into passages (sentences, and lines for structured text); each gets
BM25 (lexical: names, numbers, rare words) and MiniLM cosine (meaning: paraphrases) scores, min-max
normalised and mixed, plus a share of its document's own score (a sentence of the right page beats a
look-alike from the wrong one). Passages are kept best first until the budget is full, each with its
neighbours when they still fit, because an answer often sits next to the sentence that matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from ...errors import ConfigurationError, RequestError
from ...lru import LRUMemo
from ...pipeline import record_event
from ...quarantine_marks import DOCUMENTS_KEY as QUARANTINED_DOCUMENTS
from ...quarantine_marks import carry, mark
from ...request import ChatRequest, call_answered
from ...response import message_text
from ...sentences import split_sentences
from ...settings import fraction, whole_number
from ...stage import Stage
from ...tokens import TokenCounter
from ..prefix import default_counter, invalidated_tokens, previous_prompt_end, record_prefix_invalidated
from ._text import BM25, words

DOCUMENTS_KEY = "documents"
REPORT_KEY = "ctxkit.pruned_documents"
DUPLICATES_KEY = "ctxkit.duplicate_documents"  # written by DedupStage
DOCUMENT_BLOCK = re.compile(r'<document id="([^"]*)">\n?(.*?)\n?</document>', re.S)
_CLAUSE_BREAK = re.compile(r"(?<=[;,])\s+")
# Hindi/Bengali ends a sentence with a danda (।, ॥), Arabic and Urdu ask with ؟ and end with ۔.
_ANY_BREAK = re.compile(r"(?<=[;,:。！？；，、：।॥؟۔])\s*")
_WIDE = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")


class TextEmbedder(Protocol):
    """What the ranker needs from an embedder (ctxkit.embed.Embedder fits): normalised vectors."""

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class RankingWeights:
    """How the scores mix. Tuned on half of SQuAD-based questions, checked on the other half."""

    lexical: float = 0.3  # BM25's share against MiniLM's in a passage's own score
    document: float = 0.5  # share of the document's score in each of its passages' score
    neighbours: int = 0  # sentences kept on each side of a chosen one, while they fit


@dataclasses.dataclass(frozen=True)
class PruneResult:
    """What `DocumentRanker.prune` kept: documents in their original order, texts cut to kept passages."""

    documents: list[dict[str, Any]]
    kept_ids: list[str]
    dropped_ids: list[str]
    tokens_before: int
    tokens_after: int


@dataclasses.dataclass(frozen=True)
class _Index:
    units: list[str]
    owner: np.ndarray
    tokens: np.ndarray
    vectors: np.ndarray | None
    unit_bm25: BM25
    doc_bm25: BM25
    heads: np.ndarray  # per passage: the header row of the table it is a row of, or -1


class DocumentRanker:
    """Hybrid BM25 + MiniLM passage ranking under a token budget. Safe to share between threads."""

    def __init__(
        self,
        embedder: TextEmbedder | None = None,
        counter: TokenCounter | None = None,
        weights: RankingWeights = RankingWeights(),
        *,
        max_passage_tokens: int = 96,
        cache_size: int = 50_000,
    ) -> None:
        self.embedder = embedder
        self.counter = counter if counter is not None else default_counter()
        self.weights = weights
        self.max_passage_tokens = max_passage_tokens
        # Texts repeat across calls (a corpus, a tool result resent every turn): embed and count each once.
        # Vectors and token counts by text digest. One memo serves a ranker and the finer rankers it makes: a
        # text is the same text whatever passage size cut it.
        self._texts: LRUMemo[str, tuple[np.ndarray | None, int]] = LRUMemo(cache_size)
        self._indexes: OrderedDict[str, _Index] = OrderedDict()
        self._lock = threading.Lock()
        self._finer_rankers: dict[int, DocumentRanker] = {}

    # -- splitting, counting, embedding -----------------------------------------------------------
    def passages(self, text: str) -> list[str]:
        """Sentences; a sentence over `max_passage_tokens` is split by lines (a table, JSON, code), or at its
        ; and , into pieces of about that size (a long list of names): a budget must be able to keep part of it.

        A copy DedupStage collapsed keeps its note whole, as one passage, and its "[not in this copy:]" marker
        as another: cut at the note's commas, "… ] Opened software is final sale." told the model the very
        sentence this copy lacks."""
        note = _collapse_note(text)
        if note is not None:
            head, differs, missing = note
            out = [head, *self._passages(differs)]
            if missing is not None:
                out += [MISSING_MARK, *self._passages(missing)]
            return out
        return self._passages(text)

    def _passages(self, text: str) -> list[str]:
        out: list[str] = []
        for sentence in split_sentences(text):
            # In characters: about four to a token, but about one for Chinese, Japanese and Korean.
            limit = (1 if len(_WIDE.findall(sentence)) * 3 > len(sentence) else 4) * self.max_passage_tokens
            if len(sentence) <= limit:
                out.append(sentence)
                continue
            if "\n" in sentence:
                pieces = [line for line in sentence.splitlines() if line.strip()]
            else:
                pieces = _pack(_CLAUSE_BREAK.split(sentence), limit)
            # Still too long (a CJK paragraph without spaces, minified JSON, a long line): cut at any
            # punctuation, and at the limit as a last resort. Whole, it would cost more than a budget holds.
            out.extend(cut for piece in pieces for cut in _chop(piece, limit))
        return out

    def _lookup(self, texts: Sequence[str], with_vectors: bool) -> tuple[np.ndarray | None, np.ndarray]:
        keys = [hashlib.blake2b(t.encode(), digest_size=16).hexdigest() for t in texts]
        found = self._texts.get(keys)
        missing = {k: t for k, t in zip(keys, texts, strict=False) if k not in found or (with_vectors and found[k][0] is None)}
        if missing:
            miss_keys = list(missing)
            vectors = (
                self.embedder.embed([missing[k] for k in miss_keys]) if with_vectors and self.embedder else None
            )
            for j, k in enumerate(miss_keys):
                count = found[k][1] if k in found else self.counter.count_text(missing[k])
                found[k] = (vectors[j] if vectors is not None else None, count)
            self._texts.put({k: found[k] for k in miss_keys})
        tokens = np.array([found[k][1] for k in keys], dtype=np.int64)
        if not with_vectors or self.embedder is None:
            return None, tokens
        rows = [found[k][0] for k in keys]
        return (np.stack([r for r in rows if r is not None]) if keys else np.zeros((0, 1), np.float32)), tokens

    def count(self, texts: Sequence[str]) -> int:
        """Tokens of these texts' passages (what the budget is measured in)."""
        return int(self._lookup([p for t in texts for p in self.passages(t)], with_vectors=False)[1].sum())

    def warm(self, texts: Sequence[str]) -> None:
        """Embed and count a corpus ahead of time (passages and whole documents), in one batch."""
        self._lookup([p for t in texts for p in self.passages(t)], with_vectors=True)

    def _index(self, texts: Sequence[str], use_dense: bool) -> _Index:
        """Passages, token counts, vectors and BM25 indexes of a corpus; the last few corpora are kept, so a
        corpus sent with every call (a RAG store, a resent history) is indexed once."""
        key = hashlib.blake2b(digest_size=16)
        for text in texts:
            key.update(hashlib.blake2b(text.encode(), digest_size=16).digest())
        key.update(b"dense" if use_dense else b"lexical")
        digest = key.hexdigest()
        with self._lock:
            index = self._indexes.get(digest)
            if index is not None:
                self._indexes.move_to_end(digest)
                return index
        units: list[str] = []
        owner: list[int] = []
        for k, text in enumerate(texts):
            for passage in self.passages(text):
                units.append(passage)
                owner.append(k)
        vectors, unit_tokens = self._lookup(units, with_vectors=use_dense)
        index = _Index(
            units=units, owner=np.array(owner, dtype=np.int64), tokens=unit_tokens, vectors=vectors,
            unit_bm25=BM25([words(u) for u in units]), doc_bm25=BM25([words(t) for t in texts]),
            heads=_note_heads(units, owner, _table_heads(units, owner)),
        )
        with self._lock:
            self._indexes[digest] = index
            while len(self._indexes) > 8:
                self._indexes.popitem(last=False)
        return index

    def _finer(self, max_passage_tokens: int) -> DocumentRanker:
        """A ranker cutting smaller passages, sharing this one's embeddings and counts (kept per size)."""
        with self._lock:
            finer = self._finer_rankers.get(max_passage_tokens)
            if finer is None:
                finer = DocumentRanker(self.embedder, self.counter, self.weights,
                                       max_passage_tokens=max_passage_tokens, cache_size=self._texts.size)
                finer._texts = self._texts
                self._finer_rankers[max_passage_tokens] = finer
        return finer

    def clear_indexes(self) -> None:
        """Forget the indexed corpora (embeddings and token counts stay cached)."""
        with self._lock:
            self._indexes.clear()
            finer = list(self._finer_rankers.values())
        for ranker in finer:
            ranker.clear_indexes()

    # -- ranking -----------------------------------------------------------------------------------
    def prune(self, query: str, documents: Sequence[Mapping[str, Any]], budget_tokens: int) -> PruneResult:
        """Keep the passages that best answer `query`, at most `budget_tokens` tokens of document text."""
        texts = [str(d["text"]) for d in documents]
        ids = [str(d["id"]) for d in documents]
        use_dense = self.embedder is not None and self.weights.lexical < 1.0
        index = self._index(texts, use_dense)
        units, own, unit_tokens, vectors = index.units, index.owner, index.tokens, index.vectors
        heads = index.heads
        if not units:
            return PruneResult([dict(d) for d in documents], ids, [], 0, 0)
        tokens_before = int(unit_tokens.sum())
        q_words = words(query)
        unit_score = _normalise(index.unit_bm25.scores(q_words))
        doc_score = _normalise(index.doc_bm25.scores(q_words))
        if use_dense:
            assert self.embedder is not None and vectors is not None
            q = self.embedder.embed([query])[0]
            w = self.weights.lexical
            unit_cos = vectors @ q
            # A document's meaning score is its best passage's: MiniLM reads 256 word pieces at most, so
            # embedding a whole page would see only its start, and this costs no second embedding pass.
            doc_cos = np.full(len(texts), -1.0)
            np.maximum.at(doc_cos, own, unit_cos)
            unit_score = w * unit_score + (1 - w) * _normalise(unit_cos)
            doc_score = w * doc_score + (1 - w) * _normalise(doc_cos)
        score = (1 - self.weights.document) * unit_score + self.weights.document * doc_score[own]

        if unit_tokens[int(np.argmax(score))] > budget_tokens and self.max_passage_tokens > 8:
            # The best passage does not fit (minified JSON or CJK pieces run past max_passage_tokens): its
            # document was dropped for small look-alikes, or, when nothing fitted, a tool result was sent
            # whole. Rank smaller pieces.
            finer = self._finer(max(min(budget_tokens, self.max_passage_tokens) // 2, 8))
            return dataclasses.replace(finer.prune(query, documents, budget_tokens), tokens_before=tokens_before)

        chosen = np.zeros(len(units), dtype=bool)
        used = 0
        smallest = int(unit_tokens.min())
        for i in np.argsort(-score, kind="stable"):
            if budget_tokens - used < smallest:
                break
            # A table row goes with its header row: "| 1137 | widget 137 | 19.57 | 85 |" alone does not say
            # which number is the stock and which the price.
            head = int(heads[i])
            extra = int(unit_tokens[head]) if head >= 0 and not chosen[head] else 0
            if chosen[i] or used + unit_tokens[i] + extra > budget_tokens:
                continue
            chosen[i] = True
            used += int(unit_tokens[i])
            if extra:
                chosen[head] = True
                used += extra
            for step in range(1, self.weights.neighbours + 1):
                for j in (i - step, i + step):
                    if (0 <= j < len(units) and own[j] == own[i] and not chosen[j]
                            and used + unit_tokens[j] <= budget_tokens):
                        chosen[j] = True
                        used += int(unit_tokens[j])
        # Passages of a document are contiguous: its range is [starts[k], starts[k + 1]).
        starts = np.searchsorted(own, np.arange(len(texts) + 1))
        # Dropping the weakest passage until the marks fit keeps the best ones: choosing passages at their
        # cost with marks instead measured worse on one page (gold recall 0.965 against 0.972).
        mark_tokens = self.counter.count_text(" …")
        notes = [i for i, unit in enumerate(units) if unit == MISSING_MARK and (heads == i).any()]
        while True:
            for i in notes:  # "[not in this copy:]" with none of its sentences says nothing
                if chosen[i] and not chosen[heads == i].any():
                    chosen[i] = False
            kept_docs, kept_ids, marks, gaps = _assemble(documents, texts, ids, units, starts, chosen, own)
            # The budget holds for what is sent: the "…" marks between kept passages count too, and so do
            # the line breaks and indentation kept between neighbouring passages.
            tokens_after = (int(unit_tokens[chosen].sum()) + marks * mark_tokens
                            + sum(self.counter.count_text(gap) for gap in gaps))
            if tokens_after <= budget_tokens:
                # Passages counted apart are not the text sent: a tokenizer merges across their joins (a CSV's
                # "\n" and digits), which ran 5% past the budget. The kept text is about a budget long: count it.
                tokens_after = sum(self.counter.count_text(str(d["text"])) for d in kept_docs)
            if tokens_after <= budget_tokens or not chosen.any():
                break
            # The weakest passages whose tokens cover half the overshoot go at once (a dropped passage can
            # take its marks with it, so the whole overshoot would often drop too much): one at a time, with
            # every document re-assembled after each, took seconds on a 200,000-token corpus (470 rounds).
            kept = np.flatnonzero(chosen)
            # A header row goes last, while a row of its table is still kept.
            needed = {int(heads[j]) for j in kept if heads[j] >= 0 and heads[j] != j}
            target, freed = max((tokens_after - budget_tokens + 1) // 2, 1), 0
            order = np.argsort(score[kept], kind="stable")
            order = np.concatenate([[o for o in order if int(kept[o]) not in needed],
                                    [o for o in order if int(kept[o]) in needed]]).astype(np.int64)
            for i in kept[order]:
                chosen[i] = False
                freed += int(unit_tokens[i])
                if freed >= target:
                    break
        kept_set = set(kept_ids)
        dropped = [ids[k] for k in range(len(texts)) if ids[k] not in kept_set]
        return PruneResult(kept_docs, kept_ids, dropped, tokens_before, tokens_after)


# How a sentence (or a piece of one cut at its commas) ends, in any script: a CSV line does not end so.
_PROSE_ENDS = (".", "!", "?", ",", ";", "\u0964", "\u0965", "\u061f", "\u06d4", "\u3002", "\uff01", "\uff1f")


def _row_shape(unit: str) -> tuple[str, int] | None:
    """A line's delimiter and how many it has, when it looks like a row of a table (|, tab, ; or ,)."""
    if "\n" in unit:
        return None
    # Prose sentences with as many commas in a row are no table: a CSV line does not end like a sentence (in
    # Hindi, Arabic and Chinese either).
    # Nor is a piece of a long list sentence cut at its commas (it ends with the comma it was cut after): cut
    # from a roster into equal pieces, every piece was kept only with the first, and one alone no longer fit.
    delimiters = ("|", "\t") if unit.rstrip().endswith(_PROSE_ENDS) else ("|", "\t", ";", ",")
    for delimiter in delimiters:
        n = unit.count(delimiter)
        if n >= 2:
            return delimiter, n
    return None


def _table_heads(units: Sequence[str], owner: Sequence[int]) -> np.ndarray:
    """For each passage, the index of its table's header row (the first of at least three consecutive rows
    of one document with the same delimiters), or -1."""
    heads = np.full(len(units), -1, dtype=np.int64)
    shapes = [_row_shape(u) for u in units]
    start = 0
    for i in range(1, len(units) + 1):
        if i < len(units) and owner[i] == owner[start] and shapes[i] is not None and shapes[i] == shapes[start]:
            continue
        if i - start >= 3 and shapes[start] is not None:
            heads[start + 1:i] = start
        start = i
    return heads


# How DedupStage marks a collapsed copy (ctxkit.stages.pruning.dedup writes them; this module must read them).
COLLAPSED_PREFIX = "[near-duplicate of the earlier"
MISSING_MARK = "[not in this copy:]"
_NOTE_ENDS = ("what differs:]", "collapsed by ctxkit]")


def _collapse_note(text: str) -> tuple[str, str, str | None] | None:
    """(the note, the sentences that differ, the sentences this copy lacks or None) of a collapsed copy."""
    if not text.startswith(COLLAPSED_PREFIX):
        return None
    ends = [(at, end) for end in _NOTE_ENDS if (at := text.find(end)) >= 0]
    if not ends:
        return None
    at, end = min(ends)
    head, rest = text[: at + len(end)], text[at + len(end):]
    differs, mark, missing = rest.partition(f" {MISSING_MARK} ")
    if not mark and rest.startswith(f" {MISSING_MARK} "):
        differs, missing, mark = "", rest[len(MISSING_MARK) + 2:], MISSING_MARK
    return head, differs, (missing if mark else None)


def _note_heads(units: Sequence[str], owner: Sequence[int], heads: np.ndarray) -> np.ndarray:
    """A sentence after a "[not in this copy:]" marker goes with the marker: alone, it states for this
    document what the note says this document lacks."""
    for i, unit in enumerate(units):
        if unit != MISSING_MARK:
            continue
        j = i + 1
        while j < len(units) and owner[j] == owner[i]:
            heads[j] = i
            j += 1
    return heads


def _assemble(documents: Sequence[Mapping[str, Any]], texts: Sequence[str], ids: Sequence[str], units: Sequence[str],
              starts: np.ndarray, chosen: np.ndarray, own: np.ndarray
              ) -> tuple[list[dict[str, Any]], list[str], int, list[str]]:
    """The kept documents, each its chosen passages in order with "…" where passages were left out, how
    many "…" marks that took, and the separators other than one space kept between neighbouring passages
    (the text's own line breaks and indentation: lines of code, a table or JSON stay lines)."""
    kept_by_doc: dict[int, list[int]] = {}
    for unit in np.flatnonzero(chosen):
        kept_by_doc.setdefault(int(own[unit]), []).append(int(unit))
    kept_docs: list[dict[str, Any]] = []
    kept_ids: list[str] = []
    marks = 0
    gaps: list[str] = []
    for k in sorted(kept_by_doc):
        if not texts[k].strip():
            continue  # an empty or blank document has nothing to keep: an empty block is no document
        keep = kept_by_doc[k]
        first, last = int(starts[k]), int(starts[k + 1]) - 1
        if len(keep) == last - first + 1:
            text = texts[k]
            # Whole, it still carries the line breaks and indentation between its passages (code: 2% more
            # tokens than its passages alone), and they count against the budget as a cut one's do.
            spans = _spans(text, units[first:last + 1])
            gaps.extend(g for a, b in zip(spans, spans[1:], strict=False) if a and b and (g := text[a[1]:b[0]]) != " ")
        else:
            spans = _spans(texts[k], units[first:last + 1])
            runs: list[str] = []
            for n, i in enumerate(keep):
                here, before = spans[i - first], spans[i - first - 1] if i > first else None
                if n and i == keep[n - 1] + 1:
                    gap = texts[k][before[1]:here[0]] if here and before else " "
                    if gap != " ":
                        gaps.append(gap)
                    runs[-1] += gap + units[i]
                else:
                    runs.append(units[i])
            text = " … ".join(runs)
            marks += len(runs) - 1
            if keep[0] != first:
                text, marks = "… " + text, marks + 1
            if keep[-1] != last:
                text, marks = text + " …", marks + 1
        kept_docs.append({**documents[k], "text": text})
        kept_ids.append(ids[k])
    return kept_docs, kept_ids, marks, gaps


def _spans(text: str, passages: Sequence[str]) -> list[tuple[int, int] | None]:
    """Where each passage sits in `text` (None where it is not found verbatim: a packed clause list)."""
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    for passage in passages:
        at = text.find(passage, cursor)
        if at < 0:
            spans.append(None)
            continue
        spans.append((at, at + len(passage)))
        cursor = at + len(passage)
    return spans


class DocumentPruningStage(Stage):
    """Rank documents and long tool results against the request; keep the best passages within a budget.

    budget_tokens:   at most this many tokens of document text per turn (per long tool result).
    budget_fraction: at most this share of the documents' tokens (0.1 keeps a tenth).
    Give one or both (both: the smaller wins).
    """

    name = "document_pruning"

    def __init__(
        self,
        budget_tokens: int | None = None,
        budget_fraction: float | None = None,
        *,
        embedder: TextEmbedder | None = None,
        counter: TokenCounter | None = None,
        weights: RankingWeights = RankingWeights(),
        long_message_tokens: int | None = 2000,
        render: bool = True,
        ranker: DocumentRanker | None = None,
    ) -> None:
        if budget_tokens is None and budget_fraction is None:
            raise ConfigurationError("give budget_tokens, budget_fraction or both")
        if budget_tokens is not None:
            budget_tokens = whole_number(budget_tokens, "budget_tokens", minimum=1)
        if budget_fraction is not None:
            fraction(budget_fraction, "budget_fraction")
        self.budget_tokens = budget_tokens
        self.budget_fraction = budget_fraction
        self.long_message_tokens = (None if long_message_tokens is None
                                    else whole_number(long_message_tokens, "long_message_tokens", minimum=1))
        self.render = render
        self.ranker = ranker if ranker is not None else DocumentRanker(embedder, counter, weights)
        self.counter = self.ranker.counter
        # The documents as each recent turn ranked them: a new turn's prefix claim rebuilds the previous call's
        # documents message, which this stage ranked then; ranking it again doubled the stage's time per call.
        self._ranked: LRUMemo[tuple[str, int, str], PruneResult] = LRUMemo(64)

    def _prune(self, query: str, documents: Sequence[Mapping[str, Any]], budget: int) -> PruneResult:
        digest = hashlib.sha256()  # the documents by hash, not held: a 200,000-token pool 64 times over is 50 MB
        for d in documents:
            digest.update(json.dumps([str(d["id"]), str(d["text"])]).encode("utf-8", "surrogatepass"))
        key = (query, budget, digest.hexdigest())
        if not (found := self._ranked.get([key])):
            found = {key: self.ranker.prune(query, documents, budget)}
            self._ranked.put(found)
        kept = found[key]  # a copy: the request's metadata gets these lists, and an app may change them
        # The key holds ids and texts only: a document's other keys (a signed URL, a score) are this call's
        by_id = {str(d["id"]): d for d in documents}
        return PruneResult([{**by_id[str(d["id"])], "text": d["text"]} for d in kept.documents],
                           list(kept.kept_ids), list(kept.dropped_ids), kept.tokens_before, kept.tokens_after)

    def budget_for(self, tokens: int) -> int:
        limits = [tokens]
        if self.budget_tokens is not None:
            limits.append(self.budget_tokens)
        if self.budget_fraction is not None:
            limits.append(max(int(tokens * self.budget_fraction), 1))
        return min(limits)

    def naive_request(self, request: ChatRequest) -> ChatRequest:
        """Without this stage the app would have put its `metadata["documents"]` in the prompt whole (they
        reach the model only through this stage): that is what the naive count holds, and what it cuts."""
        docs = request.metadata.get(DOCUMENTS_KEY)
        if not self.render or not docs or not isinstance(docs, (list, tuple)):
            return request
        try:
            documents = checked_documents(docs)
        except RequestError:
            return request  # before_model names the fault
        messages = list(request.messages)
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages))
        messages.insert(last_user, {"role": "user", "content": render_documents(documents)})
        return request.override(messages=messages)

    def before_model(self, request: ChatRequest) -> ChatRequest:
        messages = list(request.messages)
        out = list(messages)
        edited: list[int] = []
        for index, _message in enumerate(messages):
            new = self._prune_message(messages, index)
            if new is not None:
                out[index] = new
                edited.append(index)
        request = carry(request, [(messages[i], out[i]) for i in edited])
        changes: dict[str, Any] = {}
        docs = request.metadata.get(DOCUMENTS_KEY)
        if docs is not None:
            documents = checked_documents(docs)
            query = _turn_query(messages, len(messages))
            # <document> blocks of the newest user message are documents of this turn too: what they keep
            # comes out of the same budget (each had all of it, and a turn sent twice its budget).
            last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
            inline_before = _block_texts(messages[last]) if last is not None else []
            inline_after = _block_texts(out[last]) if last is not None else []
            tokens = self._tokens(documents)
            budget = self.budget_for(tokens + (self.ranker.count(inline_before) if inline_before else 0))
            budget -= self.ranker.count(inline_after) if inline_after else 0
            if budget >= 1:
                result = self._prune(query, documents, budget)
            else:
                result = PruneResult([], [], [str(d["id"]) for d in documents], tokens, 0)
            # Documents DedupStage dropped as copies of others go where their copy went: the report names all
            # of the app's documents (an id in neither list was neither sent nor reported dropped).
            kept_ids, dropped_ids = list(result.kept_ids), list(result.dropped_ids)
            copies = request.metadata.get(DUPLICATES_KEY)
            for copy, original in (copies.items() if isinstance(copies, Mapping) else ()):
                if str(copy) not in kept_ids and str(copy) not in dropped_ids:
                    (kept_ids if str(original) in kept_ids else dropped_ids).append(str(copy))
            changes["metadata"] = {
                **request.metadata,
                DOCUMENTS_KEY: result.documents,
                REPORT_KEY: {"kept": kept_ids, "dropped": dropped_ids,
                             "tokens_before": result.tokens_before, "tokens_after": result.tokens_after},
            }
            if self.render and result.documents:
                last_user = max((i for i, m in enumerate(out) if m.get("role") == "user"), default=len(out))
                rendered = {"role": "user", "content": render_documents(result.documents)}
                out.insert(last_user, rendered)
                # A document the quarantine stage flagged taints the message that carries it.
                flagged = request.metadata.get(QUARANTINED_DOCUMENTS, {})
                reasons = [f"document {i}: {flagged[i]}" for i in result.kept_ids if i in flagged]
                if reasons:
                    marked = mark(request.override(metadata=changes["metadata"]), [(rendered, "; ".join(reasons))])
                    changes["metadata"] = dict(marked.metadata)
        step = previous_prompt_end(messages)
        new_edits = [i for i in edited if i >= step]  # older ones are cut the same way every call
        if self.render and docs is not None:
            # The previous call (an app sends its documents with every call) had them right before its newest
            # user message. A new turn renders them before a newer one: the previous prompt stops matching
            # where they were, and everything after that point is no longer a cached prefix.
            previous_user = max((i for i, m in enumerate(messages[:step]) if m.get("role") == "user"), default=None)
            if previous_user is not None and any(m.get("role") == "user" for m in messages[step:]):
                # The previous prompt had its own documents message right before `previous_user`: that message
                # and everything after it is what the cache loses, not just the previous question on. It is
                # rebuilt as the previous call rendered it: the same documents ranked against its question.
                budget_then = self.budget_for(tokens)  # the documents and their tokens, as counted above
                then = (self._prune(_turn_query(messages, previous_user + 1), documents, budget_then)
                        if budget_then >= 1 else None)
                if then is not None and then.documents:
                    shown = {"role": "user", "content": render_documents(then.documents)}
                    previous = [*messages[:previous_user], shown, *messages[previous_user:step + 1]]
                    lost = invalidated_tokens(self.counter, previous, previous_user)
                    if lost > 0:
                        record_event(self.name, "prefix_invalidated", tokens=lost, first_message=previous_user)
                    new_edits = []  # edits at or after `step` lie after the point where the cache already stops
                else:
                    new_edits.append(previous_user)
        record_prefix_invalidated(self.name, self.counter, messages, min(new_edits) if new_edits else None)
        if edited or len(out) != len(messages):
            changes["messages"] = out
        return request.override(**changes) if changes else request

    def _tokens(self, documents: Sequence[Mapping[str, Any]]) -> int:
        return self.ranker.count([str(d["text"]) for d in documents])

    def _prune_message(self, messages: Sequence[Mapping[str, Any]], index: int) -> dict[str, Any] | None:
        message = messages[index]
        content = message.get("content")
        role = message.get("role")
        texts = _texts(content)
        if role == "user" and any("<document id=" in t for t in texts):
            # Ranked by position, not by the id written in the block: two blocks may carry the same id. The
            # content may be a string or a list of parts (the OpenAI SDK's other shape): blocks of every text
            # part share the budget.
            blocks = [{"id": str(n), "text": m.group(2)}
                      for n, m in enumerate(m for t in texts for m in DOCUMENT_BLOCK.finditer(t))]
            if not blocks:
                return None
            query = " ".join(DOCUMENT_BLOCK.sub(" ", t) for t in texts).strip() or _turn_query(messages, index)
            result = self.ranker.prune(query, blocks, self.budget_for(self._tokens(blocks)))
            if result.tokens_after >= result.tokens_before:
                return None
            kept = {d["id"]: d["text"] for d in result.documents}
            position = itertools.count()

            def cut(match: re.Match[str]) -> str:
                n = str(next(position))
                return f'<document id="{match.group(1)}">{kept[n]}</document>' if n in kept else ""

            cuts = iter([re.sub(r"\n{3,}", "\n\n", DOCUMENT_BLOCK.sub(cut, t)) for t in texts])
            if isinstance(content, str):
                return {**message, "content": next(cuts)}
            parts: list[Any] = content if isinstance(content, list) else []
            return {**message, "content": [{**part, "text": next(cuts)} if _is_text_part(part) else part
                                           for part in parts]}
        if role == "tool" and isinstance(content, list) and texts and all(_is_text_part(part) for part in content):
            # The OpenAI SDK's other shape (a list of text parts) is the same result: cut it as its joined text.
            content = "".join(texts)
        if not isinstance(content, str):
            return None
        if role == "tool" and self.long_message_tokens is not None:
            tokens = self.counter.count_text(content)
            budget = self.budget_for(tokens)
            if tokens <= self.long_message_tokens or budget >= tokens:
                return None  # short, or the budget holds all of it: a note would only make it longer
            if _repeats_an_earlier_call(messages, index):
                return None  # the model called again for the full text, as the note tells it to
            query = _turn_query(messages, index)
            result = self.ranker.prune(query, [{"id": "result", "text": content}], budget)
            if not result.documents:
                return None
            call = _call_for(messages, index)
            note = (f"[ctxkit kept {result.tokens_after} of {tokens} tokens of this result, the passages that "
                    f"match the request; call {call} again for the full text]")
            return {**message, "content": f"{result.documents[0]['text']}\n{note}"}
        return None


def _is_text_part(part: Any) -> bool:
    return isinstance(part, Mapping) and part.get("type", "text") == "text" and isinstance(part.get("text"), str)


def _texts(content: Any) -> list[str]:
    """The texts of a message's content: the string, or its text parts in order."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [part["text"] for part in content if _is_text_part(part)]
    return []


def _block_texts(message: Mapping[str, Any]) -> list[str]:
    return [m.group(2) for t in _texts(message.get("content")) for m in DOCUMENT_BLOCK.finditer(t)]


def render_documents(documents: Sequence[Mapping[str, Any]]) -> str:
    """Documents as `<document id="...">` blocks: the format this stage also reads back from messages."""
    return "\n\n".join(f'<document id="{d["id"]}">\n{d["text"]}\n</document>' for d in documents)


def _normalise(x: np.ndarray) -> np.ndarray:
    if x.size == 0:
        return x
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x, dtype=np.float64)


def checked_documents(docs: Any, where: str = f'metadata["{DOCUMENTS_KEY}"]') -> list[Mapping[str, Any]]:
    """`docs` if it is a list of `{"id", "text"}` objects with distinct ids; a RequestError naming the
    document (under `where`) otherwise. The stages that read documents, and the prune bench, all check this."""
    if not isinstance(docs, (list, tuple)):
        raise RequestError('must be a list of {"id", "text"} objects', where)
    seen: set[str] = set()
    for k, doc in enumerate(docs):
        if not isinstance(doc, Mapping) or not isinstance(doc.get("text"), str) or doc.get("id") is None:
            raise RequestError('must be an object with "id" and "text" (a string)', f"{where}[{k}]")
        if not isinstance(doc["id"], (str, int)) or isinstance(doc["id"], bool):  # ids are cited back to the app
            raise RequestError(f"must be a string or an integer, got {type(doc['id']).__name__}", f"{where}[{k}].id")
        if str(doc["id"]) in seen:
            raise RequestError(f"duplicate document id {doc['id']!r}", f"{where}[{k}].id")
        seen.add(str(doc["id"]))
    return list(docs)


def _turn_query(messages: Sequence[Mapping[str, Any]], index: int) -> str:
    """The user request a message at `index` answers: the newest user message before it."""
    for k in range(index - 1, -1, -1):
        if messages[k].get("role") == "user":
            return DOCUMENT_BLOCK.sub(" ", message_text(dict(messages[k]))).strip()
    return ""


def _repeats_an_earlier_call(messages: Sequence[Mapping[str, Any]], index: int) -> bool:
    """Whether the tool result at `index` answers a call made before with the same arguments, whose result
    came earlier: cut the same way again, the note's "call again for the full text" would loop. Each result
    is matched with the newest call before it with its id: some providers number calls per response
    ("call_0" on every step), so the same id can name a call repeated on a later step."""
    this = call_answered(messages, index)
    if this is None:
        return False
    wanted = (this[0], _canonical(this[1]))
    latest: dict[str, tuple[str, str]] = {}
    for message in messages[:index]:
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            latest[call.get("id", "")] = (str(function.get("name", "tool")),
                                          _canonical(str(function.get("arguments", "{}"))))
        if message.get("role") == "tool" and latest.get(message.get("tool_call_id", "")) == wanted:
            return True
    return False


def _canonical(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), sort_keys=True)
    except (TypeError, ValueError):
        return str(arguments)


def _call_for(messages: Sequence[Mapping[str, Any]], index: int) -> str:
    call = call_answered(messages, index)
    return f"{call[0]}({call[1]})" if call is not None else "the tool"


def _chop(text: str, limit: int) -> list[str]:
    """`text` in pieces of at most `limit` characters, cut after punctuation where it can be, each piece
    the original characters (no space added: "1,000" stays "1,000" when kept whole)."""
    if len(text) <= limit:
        return [text]
    bounds = [0, *(m.end() for m in _ANY_BREAK.finditer(text) if 0 < m.end() < len(text)), len(text)]
    out: list[str] = []
    start = end = 0
    for b in bounds[1:]:
        if b - start > limit and end > start:
            out.append(text[start:end])
            start = end
        while b - start > limit:  # no punctuation for `limit` characters: cut at a space there, else at the limit
            space = text.rfind(" ", start + 1, start + limit + 1)  # never inside a word or a number ("18037")
            stop = space if space > start + limit // 2 else start + limit
            out.append(text[start:stop])
            start = stop
        end = b
    out.append(text[start:end])
    return [piece.strip() for piece in out if piece.strip()]


def _pack(pieces: Sequence[str], limit: int) -> list[str]:
    """Consecutive pieces joined by a space into passages of at most `limit` characters (a longer piece alone)."""
    packed: list[str] = []
    for piece in pieces:
        if packed and len(packed[-1]) + 1 + len(piece) <= limit:
            packed[-1] += " " + piece
        else:
            packed.append(piece)
    return packed


__all__ = [
    "DOCUMENT_BLOCK", "DocumentPruningStage", "DocumentRanker", "PruneResult", "REPORT_KEY", "RankingWeights",
    "TextEmbedder", "render_documents",
]

