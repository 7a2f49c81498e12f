"""`ctxkit bench cache-pg`: lookup latency of the shared PostgreSQL + pgvector cache store with N entries.

Loads N entries into fresh tables (through `PostgresStore.put_many`) and runs ANALYZE, as autovacuum
would. Then, one call at a time as a replica makes them, it times `search` for each `--ef-search` value
(with `--pairs`, also the MiniLM embedding that precedes it), `get`, and single `put`s.
`search_cpu_ms_mean` is the client's plus the server backend's CPU time per search: a busy shared machine
inflates wall-clock latency, not CPU time. `recall_at_1` compares each search's top hit with the exact
nearest neighbour of its scope (numpy, brute force), so a faster index setting is not taken for free.

Vectors: with `--pairs FILE` (the cache pairs format of ctxkit's data README) the entries are the embedded
last user message of each `a`, and the queries the embedded `b`; without it, random unit vectors, and
queries near stored ones. Without `--dsn` a throwaway PostgreSQL is started with `pgserver` (durable
commits, as in production); with `--dsn` the benchmark's tables are dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from ..stages.cache.pg_store import PostgresStore
from ..stages.cache.store import CacheEntry
from .common import add_embedding_arguments, emit, median, percentile, progress

_BATCH = 500


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"]
    return json.dumps(messages)


def _load_pairs(path: Path, limit: int) -> tuple[list[str], list[str]]:
    from .cache import load_pairs  # the same checks as `ctxkit bench cache --pairs`: file, line and field

    pairs = load_pairs(path, limit)
    return [_last_user_text(p["a"]) for p in pairs], [_last_user_text(p["b"]) for p in pairs]


def _cpu_seconds(store: PostgresStore) -> float | None:
    """CPU seconds used so far by this process and by the server process behind the store's connection.

    Wall-clock latency on a shared machine measures the neighbours too; CPU time per search does not.
    Only known when the server runs on this machine (None otherwise)."""
    try:
        import psutil

        with store._pool.connection() as conn:  # one thread: the pool hands out this same connection again
            pid = conn.info.backend_pid
        server = psutil.Process(pid).cpu_times()
        here = time.process_time()
        return float(server.user + server.system + here)
    except Exception:  # noqa: BLE001 - a remote server, or no permission: report wall clock only
        return None


def run(
    dsn: str | None = None,
    *,
    entries: int = 10_000,
    scopes: int = 1,
    queries: int = 500,
    pairs: Path | None = None,
    ef_searches: tuple[int, ...] = (100, 40),
    seed: int = 0,
    embed_precision: str = "auto",
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    embedder = None
    if pairs is not None:
        from ..embed import Embedder

        embedder = Embedder(precision=embed_precision)
        texts, asked = _load_pairs(pairs, entries)
        entries = len(texts)
        vectors = np.concatenate([
            embedder.embed(texts[i:i + _BATCH]) for i in progress(range(0, entries, _BATCH), desc="embed")
        ])
        query_texts = asked[:queries]
    else:
        texts = [f"synthetic question {i}" for i in range(entries)]
        vectors = rng.standard_normal((entries, 384)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        query_texts = []
    dimension = int(vectors.shape[1])
    scope_of = [f"scope-{i % scopes}" for i in range(entries)]

    server = None
    tmp = None
    if dsn is None:
        try:
            import pgserver
        except ImportError:
            raise ConfigurationError("without --dsn this benchmark starts PostgreSQL with: pip install 'ctxkit[postgres]'") from None
        tmp = tempfile.mkdtemp(prefix="ctxkit-bench-pg-")
        server = pgserver.get_server(tmp, cleanup_mode="delete")
        dsn = server.get_uri()
    prefix = f"bench_{uuid.uuid4().hex[:10]}"
    store = PostgresStore(dsn, table_prefix=prefix, dimension=dimension, size_bytes=1 << 40)
    try:
        now = time.time()
        t0 = time.perf_counter()
        for start in progress(range(0, entries, _BATCH), desc="load"):
            stop = min(start + _BATCH, entries)
            batch = [
                CacheEntry(
                    key=f"k{i}", scope=scope_of[i], namespace="bench", query_text=texts[i],
                    response={"choices": [{"message": {"role": "assistant", "content": f"answer {i}"}}]},
                    created_at=now,
                )
                for i in range(start, stop)
            ]
            store.put_many(batch, vectors[start:stop])
        load_s = time.perf_counter() - t0
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"ANALYZE {prefix}_entries")
            conn.execute(f"ANALYZE {prefix}_access")
            table_bytes, index_bytes = conn.execute(
                f"SELECT pg_total_relation_size('{prefix}_entries'), pg_relation_size('{prefix}_entries_hnsw')"
            ).fetchone() or (0, 0)

        picks = rng.integers(0, entries, size=queries)
        if embedder is not None:
            embed_ms: list[float] = []
            query_vectors = []
            for text in query_texts:
                t = time.perf_counter()
                query_vectors.append(embedder.embed_one(text))
                embed_ms.append((time.perf_counter() - t) * 1000)
            q = np.stack(query_vectors)
            picks = np.arange(len(q))
        else:
            embed_ms = []
            q = vectors[picks] + 0.05 * rng.standard_normal((queries, dimension)).astype(np.float32)
            q /= np.linalg.norm(q, axis=1, keepdims=True)

        scope_ids = np.array([i % scopes for i in range(entries)])
        exact_sim = np.empty(len(q))
        for i in range(len(q)):
            members = np.flatnonzero(scope_ids == int(picks[i]) % scopes)
            exact_sim[i] = float(np.max(vectors[members] @ (q[i] / np.linalg.norm(q[i]))))
        by_ef: list[dict[str, Any]] = []
        search_ms: list[float] = []
        for ef in ef_searches:
            searcher = PostgresStore(dsn, table_prefix=prefix, dimension=dimension, ef_search=ef, size_bytes=1 << 40)
            try:
                for i in range(min(20, len(q))):  # warm the connections and the index pages
                    searcher.search(scope_of[int(picks[i])], q[i], 5, now)
                timings: list[float] = []
                agree = 0
                cpu_before = _cpu_seconds(searcher)
                for i in progress(range(len(q)), desc=f"search ef={ef}"):
                    t = time.perf_counter()
                    hits = searcher.search(scope_of[int(picks[i])], q[i], 5, now)
                    timings.append((time.perf_counter() - t) * 1000)
                    # by similarity, not key: a data set may store the same question twice
                    agree += bool(hits) and hits[0].similarity >= exact_sim[i] - 1e-4
                cpu_after = _cpu_seconds(searcher)
            finally:
                searcher.close()
            by_ef.append({"ef_search": ef, "search_ms_p50": round(median(timings), 3),
                          "search_ms_p95": round(percentile(timings, 95), 3),
                          "search_cpu_ms_mean": (round((cpu_after - cpu_before) * 1000 / len(q), 3)
                                                 if cpu_before is not None and cpu_after is not None else None),
                          "recall_at_1": round(agree / len(q), 4)})
            if not search_ms:
                search_ms = timings
        get_ms: list[float] = []
        for i in range(len(q)):
            t = time.perf_counter()
            store.get(f"k{int(picks[i])}", now)
            get_ms.append((time.perf_counter() - t) * 1000)
        put_ms: list[float] = []
        for i in range(50):
            entry = CacheEntry(key=f"extra{i}", scope="scope-0", namespace="bench", query_text="extra",
                               response={"choices": []}, created_at=now)
            t = time.perf_counter()
            store.put(entry, q[i % len(q)])
            put_ms.append((time.perf_counter() - t) * 1000)
        lookup_ms = [e + s for e, s in zip(embed_ms, search_ms, strict=True)] if embed_ms else []
        result: dict[str, Any] = {
            "entries": entries,
            "scopes": scopes,
            "queries": len(q),
            "vectors": "minilm" if embedder is not None else "random",
            "embed_precision": embedder.precision if embedder is not None else None,
            "index": "hnsw (m=16, ef_construction=64)",
            "server": "pgserver (local socket)" if server is not None else "dsn",
            "ef_search": by_ef[0]["ef_search"],
            "search_ms_p50": by_ef[0]["search_ms_p50"],
            "search_ms_p95": by_ef[0]["search_ms_p95"],
            "search_cpu_ms_mean": by_ef[0]["search_cpu_ms_mean"],
            "recall_at_1": by_ef[0]["recall_at_1"],
            "by_ef_search": by_ef,
            "get_ms_p50": round(median(get_ms), 3),
            "get_ms_p95": round(percentile(get_ms, 95), 3),
            "put_ms_p50": round(median(put_ms), 3),
            "put_ms_p95": round(percentile(put_ms, 95), 3),
            "load_s": round(load_s, 2),
            "table_mb": round(table_bytes / 2**20, 1),
            "hnsw_index_mb": round(index_bytes / 2**20, 1),
        }
        if lookup_ms:
            result.update(
                embed_ms_p50=round(median(embed_ms), 3),
                lookup_ms_p50=round(median(lookup_ms), 3),
                lookup_ms_p95=round(percentile(lookup_ms, 95), 3),
            )
        return result
    finally:
        store.close()
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as conn:
            for name in ("access", "stats", "meta", "entries"):
                conn.execute(f"DROP TABLE IF EXISTS {prefix}_{name}")
        if server is not None:
            server.cleanup()


def table(result: dict[str, Any]) -> str:
    lines = [
        f"PostgresStore: {result['entries']} entries in {result['scopes']} scope(s), {result['queries']} queries, "
        f"{result['vectors']} vectors, {result['index']}",
        *(
            f"  search   p50 {row['search_ms_p50']:>8.3f} ms   p95 {row['search_ms_p95']:>8.3f} ms   "
            f"cpu {row['search_cpu_ms_mean']} ms/search   "
            f"ef_search {row['ef_search']:>4}: top-1 = exact top-1 for {row['recall_at_1']:.2%}"
            for row in result["by_ef_search"]
        ),
        f"  get      p50 {result['get_ms_p50']:>8.3f} ms   p95 {result['get_ms_p95']:>8.3f} ms",
        f"  put      p50 {result['put_ms_p50']:>8.3f} ms   p95 {result['put_ms_p95']:>8.3f} ms",
    ]
    if "lookup_ms_p50" in result:
        lines.append(
            f"  embed+search p50 {result['lookup_ms_p50']:>8.3f} ms   p95 {result['lookup_ms_p95']:>8.3f} ms "
            f"(embedding p50 {result['embed_ms_p50']:.3f} ms)"
        )
    lines.append(f"  load {result['load_s']} s, table {result['table_mb']} MB (HNSW index {result['hnsw_index_mb']} MB)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", help="PostgreSQL with pgvector (default: start a throwaway one with pgserver)")
    parser.add_argument("--entries", type=int, default=10_000, help="entries to store (default 10000)")
    parser.add_argument("--scopes", type=int, default=1, help="scopes the entries are spread over (default 1)")
    parser.add_argument("--queries", type=int, default=500, help="timed lookups (default 500)")
    parser.add_argument("--pairs", type=Path, help="cache pairs JSONL: embed real questions with MiniLM")
    add_embedding_arguments(parser)
    parser.add_argument("--ef-search", default="100,40",
                        help="HNSW ef_search values to compare, comma-separated; the first is reported at top level")


def run_cli(args: argparse.Namespace) -> None:
    if args.entries < 1 or args.queries < 1 or args.scopes < 1:
        raise ConfigurationError("--entries, --queries and --scopes must be at least 1")
    try:
        ef_searches = tuple(int(v) for v in str(args.ef_search).split(","))
    except ValueError:
        raise ConfigurationError(f"--ef-search takes comma-separated integers, got {args.ef_search!r}") from None
    result = run(args.dsn, entries=args.entries, scopes=args.scopes, queries=args.queries, pairs=args.pairs,
                 ef_searches=ef_searches, embed_precision=args.embed_precision)
    emit(result, args.json, table(result))
