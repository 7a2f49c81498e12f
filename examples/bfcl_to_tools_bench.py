"""Turn Berkeley Function Calling Leaderboard data into `ctxkit bench tools` input: a catalog and queries.

    pip download bfcl-eval==2026.3.23 --no-deps && unzip -q bfcl_eval-2026.3.23-py3-none-any.whl -d bfcl
    python examples/bfcl_to_tools_bench.py --bfcl-data bfcl/bfcl_eval/data --out live \\
        --base-catalog ../shared/data/tools/catalog.json
    ctxkit bench tools --catalog live/catalog.json --queries live/queries.jsonl --top-k 1 3 5 10 --json

The default categories are BFCL's "live" ones: functions and requests that users contributed, which the
tool selector was never tuned on (its development set came from simple_python, multiple and
parallel_multiple). With --base-catalog the new tools join an existing catalog, so the selector chooses
from both. Each query's gold tools are the function names of its ground-truth calls.

BFCL writes some types its own way; they become JSON Schema ("dict" -> "object", "float" -> "number",
"tuple" -> "array", "any" -> no type). When rows ship different schemas under one name, the first is kept
(the count is printed): mostly rows of one category (BFCL's live rows give one function name different
descriptions and parameters per request), fewer across categories or against the base catalog. The gold is
a name, so the query still has its tool, though not always the schema the request was written against.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

LIVE = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
_TYPES = {"dict": "object", "float": "number", "tuple": "array"}


def json_schema(schema: Any) -> Any:
    """A BFCL parameter schema with its non-standard type names rewritten as JSON Schema."""
    if isinstance(schema, list):
        return [json_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "type" and isinstance(value, str):
            if value != "any":
                out[key] = _TYPES.get(value, value)
        else:
            out[key] = json_schema(value)
    return out


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def convert(data: Path, categories: list[str], base: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(catalog, queries, schemas dropped because another schema already had their name)."""
    # The base catalog may carry BFCL's own types too (the shared tools/catalog.json keeps "float"): rewrite
    # them as well, or ToolRetrievalStage(catalog=...) refuses the joined catalog.
    catalog = {tool["function"]["name"]: {**tool, "function": json_schema(tool["function"])} for tool in base}
    dropped = 0
    queries = []
    for category in categories:
        answers = {row["id"]: row for row in read_lines(data / "possible_answer" / f"BFCL_v4_{category}.json")}
        for row in read_lines(data / f"BFCL_v4_{category}.json"):
            for function in row["function"]:
                tool = {"type": "function", "function": json_schema(function)}
                known = catalog.setdefault(function["name"], tool)
                dropped += known is not tool and known != tool
            gold = sorted({name for call in answers[row["id"]]["ground_truth"] for name in call})
            messages = [message for turn in row["question"] for message in turn]
            queries.append({"id": row["id"], "messages": messages, "gold": gold})
    return list(catalog.values()), queries, dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bfcl-data", type=Path, required=True, help="the bfcl_eval/data folder of the bfcl-eval wheel")
    parser.add_argument("--out", type=Path, required=True, help="folder for catalog.json and queries.jsonl")
    parser.add_argument("--categories", nargs="+", default=list(LIVE), help=f"BFCL categories (default: {' '.join(LIVE)})")
    parser.add_argument("--base-catalog", type=Path, help="a catalog.json the new tools join")
    args = parser.parse_args()
    base = json.loads(args.base_catalog.read_text(encoding="utf-8")) if args.base_catalog else []
    catalog, queries, dropped = convert(args.bfcl_data, args.categories, base)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "catalog.json").write_text(json.dumps(catalog, ensure_ascii=False), encoding="utf-8")
    (args.out / "queries.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in queries),
                                            encoding="utf-8")
    print(f"{len(catalog)} tools ({len(base)} from the base catalog), {len(queries)} queries, "
          f"{dropped} schemas dropped for a name already taken")


if __name__ == "__main__":
    main()
