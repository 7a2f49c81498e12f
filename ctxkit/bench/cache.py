"""`ctxkit bench cache`: precision and recall of the semantic cache on labelled pairs, or its lookup latency
and memory at scale.

Pairs mode (`--pairs FILE`, the format of data/cache/pairs.jsonl: `{"id", "category", "a": messages,
"b": messages, "same_answer": bool}`): for each pair, in a fresh namespace, look `a` up and store an
answer for it, then look `b` up through the real stage (exact layer, MiniLM embedding, FAISS search in a
LocalStore, precision guards). A hit is correct only when `same_answer` is true. Lookup time is the
whole `b` lookup, embedding included. `--sweep` adds precision and recall at other similarity thresholds
(the guards unchanged): that is how the default threshold was calibrated (see `calibration` below).

Scale mode (`--scale N`): N synthetic entries (clustered random unit vectors, one scope) in a LocalStore
with a flat and/or an HNSW index; then real lookups (a sentence embedded, searched, candidates fetched
from diskcache). Reports build time, lookup p50/p95, search-only p50, process memory and disk use.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from ..request import ChatRequest
from ..response import ChatResponse, Usage
from .common import (
    add_embedding_arguments,
    check_messages,
    emit,
    median,
    percentile,
    positive_int,
    progress,
    read_jsonl,
    require_records,
    set_torch_threads,
    unit_interval,
)

SWEEP = (0.30, 0.40, 0.50, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90)


def load_pairs(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read a pairs file; a malformed line is a ConfigurationError naming the line."""
    pairs = []
    for n, pair in read_jsonl(path):
        missing = [field for field in ("a", "b", "same_answer") if field not in pair]
        if missing:
            raise ConfigurationError(f"{path}:{n}: not a cache pair: missing field {missing[0]!r}")
        check_messages(pair["a"], f"{path}:{n}: a")
        check_messages(pair["b"], f"{path}:{n}: b")
        if not isinstance(pair["same_answer"], bool):  # "false" is a true string
            raise ConfigurationError(f"{path}:{n}: same_answer must be true or false, got {pair['same_answer']!r}")
        pair.setdefault("category", "all")
        pairs.append(pair)
        if limit is not None and len(pairs) >= limit:
            break
    return require_records(pairs, path)


def _rates(hits: int, correct: int, positives: int) -> tuple[float | None, float | None]:
    precision = correct / hits if hits else None
    recall = correct / positives if positives else None
    return precision, recall


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def run_pairs(pairs: list[dict[str, Any]], *, similarity: float | None = None,
              context_similarity: float | None = None, added_detail_similarity: float | None = None,
              sweep: bool = False, embed_precision: str = "auto") -> dict[str, Any]:
    from ..embed import Embedder
    from ..stages.cache.guards import Thresholds
    from ..stages.cache.local_store import LocalStore
    from ..stages.cache.stage import SemanticCacheStage

    overrides = {"similarity": similarity, "context_similarity": context_similarity,
                 "added_detail_similarity": added_detail_similarity}
    thresholds = dataclasses.replace(Thresholds(), **{k: v for k, v in overrides.items() if v is not None})
    guards_only = dataclasses.replace(thresholds, similarity=-1.0)  # the sweep applies its own threshold
    embedder = Embedder(precision=embed_precision)
    embedder.embed(["warm up"])
    lookup_ms: list[float] = []
    rest_ms: list[float] = []  # the lookup without the embedding: exact get, FAISS search, guards
    per_cat: dict[str, Counter[str]] = defaultdict(Counter)
    reasons: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    scored: list[tuple[float, bool, bool, str]] = []  # (similarity, guards pass, same_answer, category)
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "store", dimension=embedder.dimension)
        stage = SemanticCacheStage(store, embedder, thresholds=thresholds, candidates=4)
        # The sweep's guards are the stage's own (scope, layout, earlier facts and tool results, then judge),
        # applied at every similarity: a second stage on the same store whose similarity threshold is off.
        guards_stage = SemanticCacheStage(store, embedder, thresholds=guards_only, candidates=4) if sweep else None
        for i, pair in enumerate(progress(pairs, total=len(pairs), desc="cache pairs")):
            namespace = f"bench-{i}"
            params = {"temperature": 0}
            a = ChatRequest(messages=pair["a"], params=params, namespace=namespace)
            b = ChatRequest(messages=pair["b"], params=params, namespace=namespace)
            found_a = stage.lookup(a)
            answer = ChatResponse(message={"role": "assistant", "content": f"answer {pair.get('id', i)}"},
                                  finish_reason="stop", usage=Usage(40, 10), model="bench", backend="bench")
            stage.remember(a, answer, found_a)
            t0 = time.perf_counter()
            found_b = stage.lookup(b)
            lookup_ms.append((time.perf_counter() - t0) * 1000)
            rest_ms.append(lookup_ms[-1] - found_b.embed_ms)
            same = bool(pair["same_answer"])
            cat = per_cat[str(pair["category"])]
            cat["pairs"] += 1
            cat["positives"] += same
            if found_b.response is not None:
                cat["hits"] += 1
                cat["correct"] += same
                layers[found_b.layer or "?"] += 1
            else:
                reasons[found_b.reason or "?"] += 1
            probe = guards_stage.lookup(b) if guards_stage is not None and found_b.layer != "exact" else None
            if probe is not None and found_a.vector is not None and found_b.vector is not None \
                    and probe.reason != "no_candidate":  # no candidate: `a` is not stored, or in another scope
                sim = float(np.dot(found_a.vector, found_b.vector))
                scored.append((sim, probe.response is not None, same, str(pair["category"])))
            elif sweep:
                scored.append((1.0 if found_b.layer == "exact" else -1.0, found_b.response is not None, same,
                               str(pair["category"])))
        store.close()
    total: Counter[str] = Counter()
    for counts in per_cat.values():
        total.update(counts)
    precision, recall = _rates(total["hits"], total["correct"], total["positives"])
    by_category = {}
    for name, counts in sorted(per_cat.items()):
        p, r = _rates(counts["hits"], counts["correct"], counts["positives"])
        by_category[name] = {"pairs": counts["pairs"], "precision": _round(p), "recall": _round(r),
                             "false_hits": counts["hits"] - counts["correct"]}
    result: dict[str, Any] = {
        "pairs": len(pairs),
        "precision": _round(precision),
        "recall": _round(recall),
        "false_hits": total["hits"] - total["correct"],
        "hits": total["hits"],
        "positives": total["positives"],
        "by_category": by_category,
        "lookup_ms_p50": round(median(lookup_ms), 3),
        "lookup_ms_p95": round(percentile(lookup_ms, 95), 3),
        "lookup_ms_p50_without_embedding": round(median(rest_ms), 3),
        "embed_precision": embedder.precision,
        "thresholds": dataclasses.asdict(thresholds),
        "hits_by_layer": dict(layers),
        "misses_by_reason": dict(reasons.most_common()),
    }
    if sweep:
        rows = []
        positives = sum(1 for s in scored if s[2])
        for t in sorted(set(SWEEP) | {thresholds.similarity}):
            for guarded in (False, True):
                hits = [s for s in scored if s[0] >= t and (s[1] or not guarded)]
                correct = sum(1 for s in hits if s[2])
                p, r = _rates(len(hits), correct, positives)
                rows.append({"similarity": t, "guards": guarded, "precision": _round(p), "recall": _round(r),
                             "false_hits": len(hits) - correct})
        result["sweep"] = rows
    return result


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _scale_texts(queries: int) -> list[str]:
    return [f"How do I change the delivery address of order {i} to {i % 17} Main Street?" for i in range(queries)]


def _clustered(rng: np.random.Generator, centers: np.ndarray, count: int) -> np.ndarray:
    """`count` synthetic unit vectors around random `centers`: stored questions cluster by topic."""
    vecs = centers[rng.integers(0, len(centers), count)] + 0.35 * rng.normal(size=(count, centers.shape[1])).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def run_scale(n: int, *, index: str = "flat", queries: int = 100, seed: int = 0,
              embed_precision: str = "auto") -> dict[str, Any]:
    """Lookup latency and memory with n entries in one scope."""
    from ..embed import Embedder
    from ..stages.cache.local_store import LocalStore
    from ..stages.cache.store import CacheEntry

    embedder = Embedder(precision=embed_precision)
    dim = embedder.dimension
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(1, n // 100), dim)).astype(np.float32)
    texts = _scale_texts(queries)
    query_vectors = embedder.embed(texts)
    with tempfile.TemporaryDirectory() as tmp:
        rss0 = _rss_mb()
        t0 = time.perf_counter()
        store = LocalStore(Path(tmp) / "store", dimension=dim, index=index, size_bytes=1 << 40)
        batch = 5000
        now = time.time()
        for start in progress(range(0, n, batch), total=(n + batch - 1) // batch, desc=f"scale {index}"):
            count = min(batch, n - start)
            vecs = _clustered(rng, centers, count)
            entries = [
                CacheEntry(key=f"k{start + j}", scope="scale", namespace="scale", query_text=f"synthetic {start + j}",
                           response={"choices": [{"message": {"role": "assistant", "content": "x" * 200}}]},
                           created_at=now, features={"query": f"synthetic {start + j}", "context": ""})
                for j in range(count)
            ]
            store.put_many(entries, vecs)
        store.search("scale", query_vectors[0], 4, time.time())  # loads the new vectors into the index
        build_s = time.perf_counter() - t0
        rss1 = _rss_mb()
        lookup, search = [], []
        for i in range(queries):
            t1 = time.perf_counter()
            vec = embedder.embed([texts[i]])[0]
            t2 = time.perf_counter()
            store.search("scale", vec, 4, time.time())
            t3 = time.perf_counter()
            lookup.append((t3 - t1) * 1000)
            search.append((t3 - t2) * 1000)
        disk = _dir_mb(Path(tmp) / "store")
        stats = store.stats()
        store.close()
    return {
        "entries": n,
        "index": index,
        "build_s": round(build_s, 2),
        "lookup_ms_p50": round(median(lookup), 3),
        "lookup_ms_p95": round(percentile(lookup, 95), 3),
        "search_ms_p50": round(median(search), 3),
        "search_ms_p95": round(percentile(search, 95), 3),
        "rss_mb_added": round(rss1 - rss0, 1),
        "vector_mb": round(n * dim * 4 / 2**20, 1),
        "disk_mb": round(disk, 1),
        "vectors_indexed": stats["vectors"],
    }


def run_index_scale(n: int, *, index: str = "flat", queries: int = 100, seed: int = 0,
                    build_threads: int = 1) -> dict[str, Any]:
    """FAISS alone at n vectors (the part of a lookup that grows with the store), without diskcache.

    Filling the real store through diskcache takes 0.2 ms per entry at 20,000 entries and slows as its
    SQLite file grows (a 1,000,000-entry fill, ~5 GB, had written a third after 25 minutes on this shared
    2-core machine), and embedding a million real questions with MiniLM here takes over an hour.
    So the index holds synthetic vectors (clusters of unit vectors: n/100 random centres plus noise,
    as in run_scale) with the same index settings as LocalStore, and each query is a stored vector
    slightly moved (a paraphrase whose original is in the store, cosine ~0.96). The real embedding cost
    is measured separately, on real sentences, and reported beside the search: a lookup costs
    embed + search + the candidate fetch that run_scale measures with the real store at smaller n.
    `build_threads` only speeds up building; searches run on one thread, as a lookup does.
    """
    import faiss

    from ..embed import Embedder
    from ..stages.cache.local_store import HNSW_EF_SEARCH, new_index

    embedder = Embedder()
    dim = embedder.dimension
    embed_ms = []
    for text in _scale_texts(queries):
        t0 = time.perf_counter()
        embedder.embed([text])
        embed_ms.append((time.perf_counter() - t0) * 1000)
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(1, n // 100), dim)).astype(np.float32)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    store = new_index(dim, index)  # exactly what a LocalStore scope holds
    base: Any = faiss.downcast_index(store.index)  # the HNSW (or flat) index inside the id map
    exact = faiss.IndexFlatIP(dim) if index == "hnsw" else None  # ground truth for the recall of HNSW
    batch = 50_000
    faiss.omp_set_num_threads(build_threads)
    for start in progress(range(0, n, batch), total=(n + batch - 1) // batch, desc=f"index {index}"):
        vecs = _clustered(rng, centers, min(batch, n - start))
        store.add_with_ids(vecs, np.arange(start, start + len(vecs), dtype=np.int64))
        if exact is not None:
            exact.add(vecs)
    # Each lookup's paraphrase is stored (cosine ~0.96 to the query; cluster mates sit at ~0.89), so the
    # search has a right answer to find, as a cache hit does.
    stored = _clustered(rng, centers, queries)
    store.add_with_ids(stored, np.arange(n, n + queries, dtype=np.int64))
    if exact is not None:
        exact.add(stored)
    asked = stored + 0.015 * rng.normal(size=stored.shape).astype(np.float32)
    asked /= np.linalg.norm(asked, axis=1, keepdims=True)
    build_s = time.perf_counter() - t0
    rss1 = _rss_mb()
    faiss.omp_set_num_threads(1)  # a lookup is one query: timed on one thread, as the stage runs it

    def measure() -> dict[str, Any]:
        search_ms, agree, found = [], 0, 0
        for q, vec in enumerate(asked):
            t1 = time.perf_counter()
            _, ids = store.search(vec[None, :], 16)  # LocalStore asks for max(4 * k, 16) candidates
            search_ms.append((time.perf_counter() - t1) * 1000)
            found += int(n + q in ids[0])
            if exact is not None:
                agree += int(exact.search(vec[None, :], 1)[1][0, 0] == ids[0, 0])
        row: dict[str, Any] = {
            "search_ms_p50": round(median(search_ms), 3), "search_ms_p95": round(percentile(search_ms, 95), 3),
            "lookup_ms_p50_estimate": round(median(embed_ms) + median(search_ms), 3),
            "paraphrase_found": round(found / queries, 3),
        }
        if exact is not None:
            row["top1_agrees_with_exact"] = round(agree / queries, 3)
        return row

    result: dict[str, Any] = {
        "entries": n, "index": index, "vectors": "synthetic (clustered unit vectors); embedding timed on real sentences",
        "build_s": round(build_s, 2),
        "embed_ms_p50": round(median(embed_ms), 3),
        **measure(),
        "rss_mb_added": round(rss1 - rss0 - (exact.ntotal * dim * 4 / 2**20 if exact is not None else 0), 1),
        "vector_mb": round(n * dim * 4 / 2**20, 1),
    }
    if index == "hnsw":  # LocalStore's search breadth, and others: recall against time
        result["ef_search"] = HNSW_EF_SEARCH
        result["by_ef_search"] = []
        for ef in sorted({64, 128, 256, 512} - {HNSW_EF_SEARCH}):
            base.hnsw.efSearch = ef
            result["by_ef_search"].append({"ef_search": ef, **measure()})
    return result


def table(result: dict[str, Any]) -> str:
    if "runs" in result:
        lines = ["cache lookup at scale (embedding included in lookup; search = FAISS + candidate fetch)"]
        for r in result["runs"]:
            if "lookup_ms_p50_estimate" in r:
                lines.append(
                    f"  {r['index']:>5} n={r['entries']:>8}  index only: search p50 {r['search_ms_p50']:8.2f} ms  p95 "
                    f"{r['search_ms_p95']:8.2f} ms  embed p50 {r['embed_ms_p50']:6.2f} ms  build {r['build_s']:7.1f} s"
                    f"  rss +{r['rss_mb_added']:.0f} MB  paraphrase found {r['paraphrase_found']}"
                )
                continue
            lines.append(
                f"  {r['index']:>5} n={r['entries']:>8}  lookup p50 {r['lookup_ms_p50']:8.2f} ms  p95 "
                f"{r['lookup_ms_p95']:8.2f} ms  search p50 {r['search_ms_p50']:8.2f} ms  build {r['build_s']:7.1f} s  "
                f"rss +{r['rss_mb_added']:.0f} MB  disk {r['disk_mb']:.0f} MB"
            )
        return "\n".join(lines)
    lines = [
        f"semantic cache on {result['pairs']} pairs (thresholds {result['thresholds']})",
        f"  precision {result['precision']}  recall {result['recall']}  false hits {result['false_hits']}"
        f"  (hits {result['hits']} of {result['positives']} positives)",
        f"  lookup p50 {result['lookup_ms_p50']} ms  p95 {result['lookup_ms_p95']} ms"
        f"  (p50 without the embedding {result['lookup_ms_p50_without_embedding']} ms)",
        "  by category:",
    ]
    for name, c in result["by_category"].items():
        lines.append(f"    {name:<28} pairs {c['pairs']:>6}  precision {c['precision']}  recall {c['recall']}"
                     f"  false hits {c['false_hits']}")
    lines.append(f"  misses by reason: {result['misses_by_reason']}")
    for row in result.get("sweep", []):
        lines.append(f"    sweep t={row['similarity']:.2f} guards={row['guards']!s:<5} precision {row['precision']}"
                     f"  recall {row['recall']}  false hits {row['false_hits']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=Path, help="pairs file (JSON lines: id, category, a, b, same_answer)")
    parser.add_argument("--limit", type=positive_int, default=None, help="use only the first N pairs")
    parser.add_argument("--similarity", type=unit_interval, default=None, help="override the similarity threshold")
    parser.add_argument("--context-similarity", type=unit_interval, default=None, help="override the context threshold")
    parser.add_argument("--added-detail-similarity", type=unit_interval, default=None,
                        help="override the threshold for two questions of which one adds a detail")
    parser.add_argument("--sweep", action="store_true", help="also report precision/recall at other thresholds")
    parser.add_argument("--scale", type=positive_int, nargs="+", default=None, help="entry counts for the scale run")
    parser.add_argument("--index", choices=["flat", "hnsw", "both"], default="both", help="index type(s) at scale")
    parser.add_argument("--queries", type=positive_int, default=100, help="lookups per scale run")
    parser.add_argument("--index-only", action="store_true",
                        help="at scale, time FAISS alone on synthetic vectors (no diskcache), for 1,000,000 entries")
    parser.add_argument("--build-threads", type=positive_int, default=1, help="FAISS threads while building (--index-only)")
    parser.add_argument("--torch-threads", type=positive_int, default=1,
                        help="torch threads for the embedder (default 1: one sentence per lookup gains nothing "
                             "from more, and on a busy machine extra threads made each embedding 40x slower)")
    add_embedding_arguments(parser)


def run_cli(args: argparse.Namespace) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.torch_threads:
        set_torch_threads(args.torch_threads)
    if args.scale:
        kinds = ["flat", "hnsw"] if args.index == "both" else [args.index]
        if args.index_only:
            runs = [run_index_scale(n, index=kind, queries=args.queries, build_threads=args.build_threads)
                    for n in args.scale for kind in kinds]
        else:
            runs = [run_scale(n, index=kind, queries=args.queries, embed_precision=args.embed_precision)
                    for n in args.scale for kind in kinds]
        result: dict[str, Any] = {"runs": runs}
    elif args.pairs:
        pairs = load_pairs(args.pairs, args.limit)
        result = run_pairs(pairs, similarity=args.similarity, context_similarity=args.context_similarity,
                           added_detail_similarity=args.added_detail_similarity, sweep=args.sweep,
                           embed_precision=args.embed_precision)
        result["file"] = str(args.pairs)
    else:
        raise ConfigurationError("ctxkit bench cache needs --pairs FILE or --scale N")
    emit(result, args.json, table(result))
