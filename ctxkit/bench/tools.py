"""`ctxkit bench tools`: recall@k of tool retrieval over a whole catalog, tokens saved, selection latency.

Every query selects from the whole catalog (not from its own few tools). A query counts as recalled only
when all of its gold tools are among the k sent. Queries are also scored by halves (even and odd
positions in the file): the fusion defaults were calibrated on the even half, so the odd half is the
honest number, and a large gap between them means the defaults were fitted to this file.

Tool tokens are counted the way the OpenAI API renders tool schemas into its prompt (the cookbook
recipe in `TiktokenCounter._count_tools`, o200k_base as for gpt-4o), so `tool_tokens_full` is what
sending the whole catalog would cost per call and `tool_tokens_sent` what the selection costs.
Latency is the wall time of one selection (query embedding, both retrievers, fusion, ordering), with
the query cache off, so a repeated query is not answered from memory; `cpu_ms_p50` is the CPU time of
the selecting thread, which a busy machine inflates far less than wall time (with --torch-threads 1
the embedding runs on that thread, so it is all counted). Several --top-k values run in one pass: the
greedy selection's top k is a prefix of its top max(k).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from ..validation import lone_surrogate_at
from .common import (
    add_embedding_arguments,
    check_messages,
    check_strings,
    embedder_from_args,
    emit,
    median,
    percentile,
    positive_int,
    progress,
    read_jsonl,
    require_records,
    set_torch_threads,
)


def load_catalog(path: str | Path) -> list[dict[str, Any]]:
    try:
        catalog = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # a byte-order mark is no part of the JSON
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 text
        raise ConfigurationError(f"cannot read the tool catalog {path}: {exc}") from None
    except RecursionError:  # '[[[[...' thousands deep: the parser's own limit
        raise ConfigurationError(f"cannot read the tool catalog {path}: not JSON (nested too deeply)") from None
    if not isinstance(catalog, list) or not all(isinstance(t, dict) and "function" in t for t in catalog):
        raise ConfigurationError(f"{path}: expected a JSON list of OpenAI tool schemas")
    if not catalog:
        raise ConfigurationError(f"{path}: no tools")
    first: dict[str, int] = {}
    for i, tool in enumerate(catalog):
        name = tool["function"].get("name") if isinstance(tool["function"], dict) else None
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"{path}: tools[{i}].function.name: a tool needs a name")
        if name in first:
            raise ConfigurationError(f"{path}: tools[{i}].function.name: duplicate tool name {name!r} "
                                     f"(first at tools[{first[name]}])")
        first[name] = i
        # A lone surrogate ("\ud83d", a cut emoji) failed the UTF-8 encode of the tool's index hash as a
        # UnicodeEncodeError traceback, after the embedder was loaded.
        found = lone_surrogate_at(tool, f"tools[{i}]")
        if found is not None:
            raise ConfigurationError(f"{path}: {found}: holds a lone surrogate, which is not valid Unicode")
        # Counted and indexed before anything else reads them: a description that is no string or parameters that
        # are no object (a schema pasted as a JSON string) failed as an AttributeError deep in the token count,
        # after the embedder and the index were loaded. Other schema faults are reported as tools_refused_by_stage.
        function = tool["function"]
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise ConfigurationError(f"{path}: tools[{i}].function.description: must be a string, "
                                     f"got {type(function['description']).__name__}")
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise ConfigurationError(f"{path}: tools[{i}].function.parameters: must be a JSON Schema object, "
                                     f"got {type(function['parameters']).__name__}")
    return catalog


def refused_tools(catalog: list[dict[str, Any]]) -> list[str]:
    """Tools that ToolRetrievalStage(catalog=...) and a request's `tools` refuse (invalid JSON Schema such as
    `"type": "float"`, bad names): recall measured with them in is not what the stage can deliver."""
    from ..errors import RequestError
    from ..request import ChatRequest
    from ..validation import validate_request

    refused = []
    for tool in catalog:
        try:
            validate_request(ChatRequest(messages=[{"role": "user", "content": "-"}], tools=[tool]))
        except RequestError as exc:
            refused.append(f"{(tool.get('function') or {}).get('name')}: {exc}")
    return refused


def load_queries(path: str | Path, catalog: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The queries file; with `catalog`, a gold name the catalog lacks is refused, naming the line: the query
    could only ever be scored as a miss (as `bench prune` refuses gold ids that name no document)."""
    names = {t["function"]["name"] for t in catalog} if catalog is not None else None
    queries = []
    for number, record in read_jsonl(path):
        check_messages(record.get("messages"), f"{path}:{number}")
        check_strings(record.get("gold"), f"{path}:{number}: gold (tool names)")
        missing = [g for g in record["gold"] if names is not None and g not in names]
        if missing:
            raise ConfigurationError(f"{path}:{number}: gold: {missing[:5]} not among the catalog's tool names "
                                     "(recall would count the query as a miss)")
        queries.append(record)
    return require_records(queries, path)


def run(catalog: list[dict[str, Any]], queries: list[dict[str, Any]], *, top_k: int | Sequence[int] = 5,
        embedder: Any = None, index_dir: str | Path | None = None, compact: bool = False,
        limit: int | None = None) -> list[dict[str, Any]]:
    """One result per k. Selection is greedy, so the top k is a prefix of the top max(k): one pass serves all."""
    from ..stages.tools.compaction import compact_tool
    from ..stages.tools.index import ToolIndex
    from ..stages.tools.selector import ToolSelector
    from ..tokens.tiktoken_counter import TiktokenCounter

    ks = sorted({top_k} if isinstance(top_k, int) else set(top_k))
    if embedder is None:
        from ..embed import Embedder

        embedder = Embedder()
    t0 = time.perf_counter()
    index = ToolIndex(catalog, embedder, directory=index_dir, query_cache_size=0)
    build_s = time.perf_counter() - t0
    selector = ToolSelector(index, top_k=max(ks), keep_used=False)
    counter = TiktokenCounter("gpt-4o")
    full_tokens = counter._count_tools(catalog)
    queries = queries[:limit] if limit else queries  # before naming missing gold: only the queries scored
    unknown = sorted({g for q in queries for g in q["gold"] if g not in index})
    refused = refused_tools(catalog)
    wall_ms: list[float] = []
    cpu_ms: list[float] = []
    sent_tokens: dict[int, list[int]] = defaultdict(list)
    hits: dict[int, list[bool]] = defaultdict(list)
    halves: dict[tuple[int, str], list[bool]] = defaultdict(list)
    by_gold: dict[tuple[int, int], list[bool]] = defaultdict(list)
    selector.select([{"role": "user", "content": "warm up"}])  # first call pays one-off lazy imports
    for i, query in enumerate(progress(queries, total=len(queries), desc="tools")):
        t1, c1 = time.perf_counter(), time.thread_time()
        selection = selector.select(query["messages"])
        cpu_ms.append((time.thread_time() - c1) * 1000)
        wall_ms.append((time.perf_counter() - t1) * 1000)
        for k in ks:
            names = set(selection.retrieved[:k])
            sent = [t for t in selection.tools if t["function"]["name"] in names]  # catalog order
            sent = [compact_tool(t) for t in sent] if compact else sent
            sent_tokens[k].append(counter._count_tools(sent) if sent else 0)
            hit = set(query["gold"]) <= names
            hits[k].append(hit)
            halves[(k, "even" if i % 2 == 0 else "odd")].append(hit)
            by_gold[(k, len(query["gold"]))].append(hit)
    results = []
    for k in ks:
        mean_sent = sum(sent_tokens[k]) / max(len(sent_tokens[k]), 1)
        results.append({
            "top_k": k,
            "catalog_size": len(catalog),
            "queries": len(queries),
            "recall_at_k": _rate(hits[k]),
            "recall_at_k_even_half_tuning": _rate(halves[(k, "even")]),
            "recall_at_k_odd_half_check": _rate(halves[(k, "odd")]),
            "recall_at_k_by_gold_count": {
                str(n): {"queries": len(v), "recall": _rate(v)} for (kk, n), v in sorted(by_gold.items()) if kk == k
            },
            "tool_tokens_full": full_tokens,
            "tool_tokens_sent": round(mean_sent, 1),
            "tool_tokens_saved_pct": round(100 * (1 - mean_sent / full_tokens), 2) if full_tokens else None,
            "compact": compact,
            "latency_ms_p50": round(median(wall_ms), 3),
            "latency_ms_p95": round(percentile(wall_ms, 95), 3),
            "cpu_ms_p50": round(median(cpu_ms), 3),
            "torch_threads": _torch_threads(),
            "embed_precision": getattr(embedder, "precision", None),
            "index_build_s": round(build_s, 2),
            "index_loaded_from_disk": index.loaded_from_disk,
            "gold_not_in_catalog": unknown,
            "tools_refused_by_stage": len(refused),
            "tools_refused_examples": refused[:5],
            "token_counting": "OpenAI tool rendering (TiktokenCounter._count_tools), o200k_base (gpt-4o)",
        })
    return results


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return int(torch.get_num_threads())


def _rate(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def table(result: dict[str, Any]) -> str:
    lines = [
        f"tool retrieval, top {result['top_k']} of {result['catalog_size']} tools, {result['queries']} queries",
        f"  recall@{result['top_k']}        {result['recall_at_k']:.4f}   "
        f"(even half {result['recall_at_k_even_half_tuning']}, odd half {result['recall_at_k_odd_half_check']})",
    ]
    for n, row in result["recall_at_k_by_gold_count"].items():
        lines.append(f"    {n} gold tool(s)   {row['recall']:.4f}   ({row['queries']} queries)")
    lines += [
        f"  tool tokens     {result['tool_tokens_sent']:.1f} sent of {result['tool_tokens_full']} "
        f"({result['tool_tokens_saved_pct']}% fewer)",
        f"  selection       p50 {result['latency_ms_p50']:.2f} ms, p95 {result['latency_ms_p95']:.2f} ms "
        f"(CPU time p50 {result['cpu_ms_p50']:.2f} ms, {result['torch_threads']} torch thread(s), "
        f"{result['embed_precision']} embeddings)",
    ]
    if result.get("tools_refused_by_stage"):
        lines.append(f"  warning: {result['tools_refused_by_stage']} catalog tools are refused by ToolRetrievalStage "
                     f"and by request validation, e.g. {result['tools_refused_examples'][:1]}")
    if result["gold_not_in_catalog"]:
        lines.append(f"  warning: gold tools missing from the catalog: {result['gold_not_in_catalog'][:10]}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--catalog", required=True, type=Path, help="JSON list of OpenAI tool schemas")
    parser.add_argument("--queries", required=True, type=Path, help='JSON lines {"messages": [...], "gold": [names]}')
    parser.add_argument("--top-k", type=positive_int, nargs="+", default=[5],
                        help="tools sent per call (default 5); several values are measured in one pass")
    parser.add_argument("--torch-threads", type=positive_int, default=None,
                        help="torch CPU threads for the query embedding (default: torch's own choice)")
    parser.add_argument("--compact", action="store_true", help="count the sent schemas after compaction")
    parser.add_argument("--index-dir", type=Path, default=None, help="persist the index here (default: memory)")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N queries")
    add_embedding_arguments(parser)


def run_cli(args: argparse.Namespace) -> None:
    if min(args.top_k) < 1:
        raise ConfigurationError("--top-k must be at least 1")
    if args.torch_threads:
        set_torch_threads(args.torch_threads)
    catalog = load_catalog(args.catalog)
    results = run(catalog, load_queries(args.queries, catalog), top_k=args.top_k,
                  embedder=embedder_from_args(args), index_dir=args.index_dir,
                  compact=args.compact, limit=args.limit)
    if len(results) == 1:
        emit(results[0], args.json, table(results[0]))
    else:
        emit({"results": results}, args.json, "\n\n".join(table(r) for r in results))
