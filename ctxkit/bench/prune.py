"""`ctxkit bench prune`: how much of a document set DocumentPruningStage can drop and still keep what answers
the question.

Input: `--questions FILE`, JSON lines `{"id", "question", "documents": [{"id","text"}], "gold_documents": [ids],
"answers": [str]}`; a question without `documents` is pruned against the shared corpus `--documents FILE`
(`{"id","text"}` lines). `--pool-all` ranks every question against all documents of the file at once (a
large corpus: the SQuAD set pools to ~330k tokens), `--pool-tokens N` caps that pool at N tokens (the
question's own documents first, then the others in file order), for corpora between one page and many.

Each question goes through the real stage (`request.metadata["documents"]`, the question as the user
message) with a budget of `--budget` times the corpus's tokens. Measured: gold_recall (share of gold
documents kept), answer_recall (share of questions with an answer string in the kept text),
kept_token_ratio (kept document tokens / corpus tokens) and the stage's latency per question. The
corpus is embedded once before timing (as a RAG deployment embeds its corpus once); that one-off cost is
reported as `embed_warmup_s`. `--embed-cache DIR` keeps embeddings on disk between runs. The stage reuses
the index of a corpus it has already seen (the same pool, or the same article for several questions);
`--cold-index` rebuilds it inside every timed call, which is what new documents on every call cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError, RequestError
from ..request import ChatRequest
from ..stages.pruning.documents import (
    REPORT_KEY,
    DocumentPruningStage,
    DocumentRanker,
    RankingWeights,
    checked_documents,
)
from ..validation import lone_surrogate_at
from .common import (
    add_embedding_arguments,
    check_strings,
    embedder_from_args,
    emit,
    median,
    percentile,
    positive_int,
    progress,
    read_jsonl,
    require_records,
    unit_interval,
)


def load_questions(path: Path) -> list[dict[str, Any]]:
    """A questions file: `question`, optional inline `documents`, and `gold_documents` and/or `answers`."""
    questions = []
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise ConfigurationError(f"{where}: question must be a non-empty string")
        if lone_surrogate_at(row["question"], "question") is not None:
            raise ConfigurationError(f"{where}: question: holds a lone surrogate, which is not valid Unicode")
        if row.get("documents") is not None:
            check_documents(row["documents"], where)
        gold = row.get("gold_documents")
        if isinstance(gold, list) and all(isinstance(g, (str, int)) and not isinstance(g, bool) for g in gold):
            # documents may number their ids ({"id": 17}), some or all of them, as checked_documents allows
            row["gold_documents"] = [str(g) for g in gold]
        for field in ("gold_documents", "answers"):
            if row.get(field) is not None:
                check_strings(row[field], f"{where}: {field}")
        if row.get("documents") and row.get("gold_documents"):
            _check_gold(row["gold_documents"], row["documents"], f"{where}: gold_documents", "the line's documents")
        if not row.get("gold_documents") and not row.get("answers"):
            raise ConfigurationError(f"{where}: needs gold_documents or answers to score against")
        row.setdefault("id", f"{path}:{number}")  # named in later errors (a question without documents)
        questions.append(row)
    return require_records(questions, path)


def _check_gold(gold: list[str], documents: list[dict[str, Any]], where: str, corpus: str) -> None:
    """A gold id that names no document could only ever be scored as a miss: refuse it."""
    ids = {str(d["id"]) for d in documents}
    missing = [g for g in gold if g not in ids]
    if missing:
        raise ConfigurationError(f"{where}: {missing[:5]} not among {corpus} ids (gold recall would count them as misses)")
    empty = [str(d["id"]) for d in documents if str(d["id"]) in set(gold) and not str(d["text"]).strip()]
    if empty:
        raise ConfigurationError(f"{where}: {empty[:5]} name documents of {corpus} with no text (a document with "
                                 f"nothing to keep is never kept: gold recall would count them as misses)")


def load_documents(path: Path) -> list[dict[str, Any]]:
    """A shared corpus file: one `{"id", "text"}` document a line."""
    documents = []
    first: dict[str, int] = {}  # id (as text: 17 and "17" are one id) -> the line that gave it first
    for number, row in read_jsonl(path):
        documents.append(check_documents([row], f"{path}:{number}", "document")[0])
        key = str(row["id"])
        if key in first:
            # else the pruning stage refused the corpus mid-run, naming metadata["documents"][k], no file or line
            raise ConfigurationError(f"{path}:{number}: document id {row['id']!r} is already used at line {first[key]}")
        first[key] = number
    return require_records(documents, path)


def check_documents(value: Any, line: str, field: str = "documents") -> list[dict[str, Any]]:
    """The documents as the pruning stage checks them, the error naming the file and line."""
    try:
        documents = [dict(d) for d in checked_documents(value, field)]
    except RequestError as exc:
        raise ConfigurationError(f"{line}: {exc}") from None
    # As a request's metadata is checked: a lone surrogate ("\ud83d", a cut emoji) failed the UTF-8 encode of
    # the embedding cache's key as a UnicodeEncodeError traceback, after the models were loaded.
    found = lone_surrogate_at(documents, field)
    if found is not None:
        raise ConfigurationError(f"{line}: {found}: holds a lone surrogate, which is not valid Unicode")
    return documents


class DiskCachedEmbedder:
    """An embedder whose vectors persist in a diskcache directory, keyed by the text's hash and the
    embedder's `vectors_id` (a float32 run does not reuse bfloat16 vectors)."""

    def __init__(self, embedder: Any, directory: Path) -> None:
        import diskcache

        self.embedder = embedder
        self.precision = getattr(embedder, "precision", None)
        self._salt = f"{getattr(embedder, 'vectors_id', '')}\0"
        self.cache = diskcache.Cache(str(directory))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return self.embedder.embed([])
        keys = [hashlib.blake2b((self._salt + t).encode(), digest_size=16).hexdigest() for t in texts]
        found = {k: self.cache.get(k) for k in set(keys)}
        missing = sorted({k: t for k, t in zip(keys, texts, strict=True) if found[k] is None}.items())
        if missing:
            vectors = self.embedder.embed([t for _, t in missing])
            for (k, _), v in zip(missing, vectors, strict=True):
                self.cache.set(k, np.asarray(v, dtype=np.float32).tobytes())
                found[k] = self.cache.get(k)
        return np.stack([np.frombuffer(found[k], dtype=np.float32) for k in keys])


def build_corpora(
    questions: list[dict[str, Any]], shared: list[dict[str, Any]], pool_all: bool, pool_tokens: int | None,
    count: Any, pool_from: list[dict[str, Any]] | None = None, window_tokens: int | None = None,
) -> list[list[dict[str, Any]]]:
    """The documents each question is pruned against. The pool is built from `pool_from` (the whole
    questions file), so --split and --limit choose questions, not the size of the corpus."""
    pool: list[dict[str, Any]] = []
    if pool_all or pool_tokens:
        # One pool, one id space: a document is pooled once under its id, and gold ids are scored against it.
        # Ids that name different texts in different questions (each numbering its own documents 1, 2, 3)
        # would pool only the first and score another question's gold against it: refuse them.
        seen: dict[str, tuple[str, str]] = {}  # id (as text: 17 and "17" are one id) -> (text, where)
        sources = [(d, f"question {q.get('id')!r}") for q in (pool_from if pool_from is not None else questions)
                   for d in q.get("documents") or []]
        for d, where in [*sources, *((d, "the --documents file") for d in shared)]:
            key = str(d["id"])
            if key not in seen:
                seen[key] = (d["text"], where)
                pool.append(d)
            elif seen[key][0] != d["text"]:
                raise ConfigurationError(
                    f"document id {d['id']!r} names different texts in {seen[key][1]} and {where}: "
                    "--pool-all and --pool-tokens need ids that are unique across the file")
    corpora: list[list[dict[str, Any]]] = []
    for q in questions:
        own = q.get("documents") or shared
        if window_tokens:
            own = _window(own, q.get("gold_documents") or [], window_tokens, count)
        if not own:
            raise ConfigurationError(f"question {q.get('id')!r} has no documents and no --documents file was given")
        if pool_tokens:
            own_ids = {str(d["id"]) for d in own}
            corpus = list(own)
            total = sum(count(d["text"]) for d in corpus)
            for d in pool:
                if total >= pool_tokens:
                    break
                if str(d["id"]) not in own_ids:
                    corpus.append(d)
                    total += count(d["text"])
            corpora.append(corpus)
        else:
            corpora.append(pool if pool_all else list(own))
    return corpora


def _window(documents: list[dict[str, Any]], gold: list[str], tokens: int, count: Any) -> list[dict[str, Any]]:
    """A one-page corpus: consecutive documents around the first gold one, growing both ways to `tokens`."""
    ids = [str(d["id"]) for d in documents]  # gold ids are strings; documents may number theirs (17)
    centre = next((ids.index(g) for g in gold if g in ids), 0)
    lo = hi = centre
    total = count(documents[centre]["text"])
    while total < tokens and (lo > 0 or hi < len(documents) - 1):
        # alternate sides so the gold document is not always first or last
        if hi < len(documents) - 1 and (hi - centre <= centre - lo or lo == 0):
            hi += 1
            total += count(documents[hi]["text"])
        else:
            lo -= 1
            total += count(documents[lo]["text"])
    return documents[lo : hi + 1]


def run(
    questions: list[dict[str, Any]],
    corpora: list[list[dict[str, Any]]],
    stage: DocumentPruningStage,
    cold_index: bool = False,
) -> dict[str, Any]:
    ranker = stage.ranker
    t0 = time.perf_counter()
    # By text, not id: questions that number their own documents (1, 2, 3 in each) share ids, not texts,
    # and all but the first question's documents were embedded inside the timed calls.
    ranker.warm(list(dict.fromkeys(d["text"] for corpus in corpora for d in corpus)))
    warmup_s = time.perf_counter() - t0
    gold_recall: list[float] = []
    answer_hits: list[float] = []
    ratios: list[float] = []
    latencies: list[float] = []
    corpus_tokens: list[int] = []
    kept_docs: list[int] = []
    gold_outside = 0
    for q, corpus in progress(list(zip(questions, corpora, strict=True)), total=len(questions), desc="prune"):
        request = ChatRequest(messages=[{"role": "user", "content": q["question"]}], metadata={"documents": corpus})
        if cold_index:
            ranker.clear_indexes()  # split and BM25-index the corpus inside the timed call, as for new documents
        t = time.perf_counter()
        out = stage.before_model(request)
        latencies.append((time.perf_counter() - t) * 1000)
        report = out.metadata[REPORT_KEY]
        kept = set(report["kept"])
        # Only gold documents the question was pruned against can be kept: one that --window-tokens left out
        # is not the stage's miss (it is counted apart, as gold_outside_corpus).
        in_corpus = {str(d["id"]) for d in corpus}
        gold = [g for g in q.get("gold_documents") or [] if g in in_corpus]
        gold_outside += len(q.get("gold_documents") or []) - len(gold)
        if gold:
            gold_recall.append(sum(g in kept for g in gold) / len(gold))
        answers = [a.lower() for a in q.get("answers") or []]
        if answers:
            text = " ".join(d["text"] for d in out.metadata["documents"]).lower()
            answer_hits.append(float(any(a in text for a in answers)))
        ratios.append(report["tokens_after"] / max(report["tokens_before"], 1))
        corpus_tokens.append(report["tokens_before"])
        kept_docs.append(len(kept))
    return {
        "questions": len(questions),
        "gold_recall": round(float(np.mean(gold_recall)), 4) if gold_recall else None,
        "gold_outside_corpus": gold_outside,
        "answer_recall": round(float(np.mean(answer_hits)), 4) if answer_hits else None,
        "kept_token_ratio": round(float(np.mean(ratios)), 4),
        "latency_ms_p50": round(median(latencies), 2),
        "latency_ms_p95": round(percentile(latencies, 95), 2),
        "corpus_tokens_p50": int(median([float(c) for c in corpus_tokens])),
        "corpus_tokens_max": max(corpus_tokens),
        "documents_kept_p50": median([float(k) for k in kept_docs]),
        "embed_warmup_s": round(warmup_s, 1),
        "cold_index": cold_index,
        "dense": ranker.embedder is not None,
        "embed_precision": getattr(ranker.embedder, "precision", None),
        "weights": dataclasses.asdict(ranker.weights),
    }


def table(result: dict[str, Any]) -> str:
    return "\n".join([
        f"prune: {result['questions']} questions, budget {result['budget']}, {result['mode']} "
        f"(corpus p50 {result['corpus_tokens_p50']} tokens, max {result['corpus_tokens_max']})",
        f"  gold_recall       {result['gold_recall']}",
        f"  answer_recall     {result['answer_recall']}",
        f"  kept_token_ratio  {result['kept_token_ratio']}",
        f"  latency_ms_p50    {result['latency_ms_p50']}   (p95 {result['latency_ms_p95']}; "
        f"corpus embedded once in {result['embed_warmup_s']} s)",
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--questions", type=Path, required=True, help="questions JSON lines (see module doc)")
    parser.add_argument("--documents", type=Path, help="shared corpus, {id,text} lines, for questions without documents")
    parser.add_argument("--budget", type=float, default=0.10, help="share of the corpus tokens to keep (default 0.10)")
    parser.add_argument("--limit", type=positive_int, help="only the first N questions (after --split)")
    parser.add_argument("--split", choices=("all", "even", "odd"), default="all",
                        help="every question, or every other one (tune on one half, check on the other)")
    parser.add_argument("--pool-all", action="store_true",
                        help="prune every question against all documents of the file (a large corpus)")
    parser.add_argument("--pool-tokens", type=positive_int, help="like --pool-all, capped at this many corpus tokens")
    parser.add_argument("--window-tokens", type=positive_int,
                        help="a small corpus: only consecutive documents around the gold one, up to this many tokens")
    parser.add_argument("--lexical-only", action="store_true", help="BM25 only, no MiniLM")
    # Shares that mix two scores (w * a + (1 - w) * b): outside [0, 1] a score counts against a passage, and NaN
    # made every score NaN (an arbitrary ranking) and printed "lexical": NaN, which is no JSON.
    parser.add_argument("--lexical-weight", type=unit_interval, default=RankingWeights.lexical,
                        help=f"BM25's share against MiniLM's, 0 to 1 (default {RankingWeights.lexical})")
    parser.add_argument("--document-weight", type=unit_interval, default=RankingWeights.document,
                        help=f"the document's share in its passages' score, 0 to 1 (default {RankingWeights.document})")
    parser.add_argument("--neighbours", type=int, default=RankingWeights.neighbours)
    parser.add_argument("--cold-index", action="store_true",
                        help="re-split and re-index each question's corpus inside the timed call (the stage "
                             "otherwise reuses the index of a corpus it has seen; embeddings stay warm)")
    parser.add_argument("--embed-cache", type=Path, help="directory keeping embeddings between runs (diskcache)")
    add_embedding_arguments(parser)


def run_cli(args: argparse.Namespace) -> None:
    if not 0 < args.budget <= 1:
        raise ConfigurationError(f"--budget must be in (0, 1], got {args.budget}")
    questions = everything = load_questions(args.questions)
    if args.split != "all":
        questions = [q for i, q in enumerate(questions) if i % 2 == (0 if args.split == "even" else 1)]
        if not questions:  # else a ValueError traceback (the median of no corpus sizes) after the models loaded
            raise ConfigurationError(f"{args.questions}: --split {args.split} leaves none of its "
                                     f"{len(everything)} question(s)")
    if args.limit:
        questions = questions[: args.limit]
    shared = load_documents(args.documents) if args.documents else []
    if not shared:
        without = [q["id"] for q in questions if not q.get("documents")]
        if without:
            raise ConfigurationError(f"{args.questions}: question {without[0]!r} has no documents of its own "
                                     f"(\"documents\" missing or empty) and no --documents FILE was given")
    for q in questions:
        if shared and not q.get("documents") and q.get("gold_documents"):
            _check_gold(q["gold_documents"], shared, f"{args.questions}: question {q.get('id')!r}: gold_documents",
                        f"the documents of {args.documents}")
    embedder: Any = None
    if not args.lexical_only:
        embedder = embedder_from_args(args)
        if args.embed_cache:
            embedder = DiskCachedEmbedder(embedder, args.embed_cache)
    weights = RankingWeights(args.lexical_weight, args.document_weight, args.neighbours)
    ranker = DocumentRanker(embedder, weights=weights)
    stage = DocumentPruningStage(budget_fraction=args.budget, ranker=ranker, render=False)
    corpora = build_corpora(questions, shared, args.pool_all, args.pool_tokens, ranker.counter.count_text,
                            pool_from=everything, window_tokens=args.window_tokens)
    result = run(questions, corpora, stage, cold_index=args.cold_index)
    own = sum(bool(q.get("documents")) for q in questions)
    mode = ("pool-all" if args.pool_all else f"pool {args.pool_tokens} tokens" if args.pool_tokens
            else f"window {args.window_tokens} tokens" if args.window_tokens
            else "own documents" if own == len(questions) else "shared corpus" if not own
            else "own documents, else the shared corpus")
    result = {"budget": args.budget, "mode": mode, "split": args.split, **result}
    emit(result, args.json, table(result))
