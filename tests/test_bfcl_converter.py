"""examples/bfcl_to_tools_bench.py: BFCL's own format becomes a catalog and queries that ctxkit accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ctxkit import ChatRequest
from ctxkit.bench.tools import load_catalog, load_queries, run
from ctxkit.validation import validate_request

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "fixtures" / "tools" / "bfcl_sample"


def _types(schema):
    if isinstance(schema, dict):
        yield from ([schema["type"]] if isinstance(schema.get("type"), str) else [])
        for value in schema.values():
            yield from _types(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from _types(item)


def test_bfcl_rows_become_a_valid_catalog_and_queries_with_their_gold_tools(tmp_path, embedder):
    base = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    (tmp_path / "base.json").write_text(json.dumps(base))
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "bfcl_to_tools_bench.py"), "--bfcl-data", str(SAMPLE),
                           "--categories", "live_multiple", "--out", str(tmp_path / "out"),
                           "--base-catalog", str(tmp_path / "base.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    catalog = load_catalog(tmp_path / "out" / "catalog.json")
    queries = load_queries(tmp_path / "out" / "queries.jsonl")
    names = [t["function"]["name"] for t in catalog]
    assert names[0] == "get_weather" and len(names) == len(set(names)), "the base catalog first, each name once"
    assert not {"dict", "float", "tuple", "any"} & set(_types(catalog)), "BFCL type names must become JSON Schema"
    validate_request(ChatRequest(messages=[{"role": "user", "content": "hi"}], tools=catalog))
    assert [q["id"] for q in queries] == [json.loads(line)["id"] for line in
                                          (SAMPLE / "BFCL_v4_live_multiple.json").read_text().splitlines()]
    assert all(q["gold"] and set(q["gold"]) <= set(names) for q in queries)
    assert queries[0]["gold"] == ["ChaDri.change_drink"] and queries[0]["messages"][0]["role"] == "user"
    assert f"{len(names)} tools (1 from the base catalog), {len(queries)} queries" in done.stdout
    result = run(catalog, queries, top_k=5, embedder=embedder)[0]
    assert result["catalog_size"] == len(names) and result["queries"] == len(queries)
    assert result["recall_at_k"] == 1.0, "each request's gold tool is among the 5 of 10 the selector sends"


def test_the_bench_reports_catalog_tools_that_the_stage_would_refuse(embedder):
    """BFCL's own files write "type": "float": a catalog with such a tool is refused by ToolRetrievalStage and
    by request validation, so recall measured over it is not what the stage can deliver. It is reported."""
    good = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    bad = {"type": "function", "function": {"name": "area", "description": "Area of a circle.",
                                            "parameters": {"type": "object", "properties": {"r": {"type": "float"}}}}}
    queries = [{"id": "q", "messages": [{"role": "user", "content": "Weather in Oslo?"}], "gold": ["get_weather"]}]
    result = run([good, bad], queries, top_k=1, embedder=embedder)[0]
    assert result["tools_refused_by_stage"] == 1 and "area" in result["tools_refused_examples"][0]
    assert run([good], queries, top_k=1, embedder=embedder)[0]["tools_refused_by_stage"] == 0
