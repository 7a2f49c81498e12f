"""`ctxkit bench overhead`: what the pipeline itself costs per call (validation, token counting at each
hand-over, the ledger append) against the backend call, measured side by side in one run.

Each round makes the same request twice, once straight to the backend and once through a pipeline with
no stages and a real ledger file; the order alternates so neither side gets the warmer caches.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from ..backends.base import Backend
from ..ledger import Ledger
from ..pipeline import Pipeline
from ..request import ChatRequest
from .common import add_backend_arguments, backend_from_args, emit, median, percentile, positive_int, progress

PROMPT = [
    {"role": "system", "content": "You are a concise assistant for an online bookshop."},
    {"role": "user", "content": "Do you ship to Norway?"},
    {"role": "assistant", "content": "Yes, we ship to Norway; delivery takes 3 to 5 working days."},
    {"role": "user", "content": "And how much does shipping cost for two paperbacks?"},
]


def run(backend: Backend, calls: int = 20, max_tokens: int = 16) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = Pipeline(backend, ledger=Ledger(Path(tmp) / "ledger.jsonl"))
        direct_ms: list[float] = []
        overhead_ms: list[float] = []
        through_backend_ms: list[float] = []
        counting_ms: list[float] = []
        # One untimed call first: the model's first evaluation (cold weights, an empty KV cache) would
        # otherwise be one of the direct side's timings only, and with few --calls the median with it.
        backend.complete(ChatRequest(messages=PROMPT, params={"max_tokens": max_tokens, "temperature": 0, "seed": 1}))
        for i in progress(range(calls), total=calls, desc="overhead"):
            request = ChatRequest(messages=PROMPT, params={"max_tokens": max_tokens, "temperature": 0, "seed": 1})
            order = ("direct", "pipeline") if i % 2 == 0 else ("pipeline", "direct")
            for side in order:
                if side == "direct":
                    t0 = time.perf_counter()
                    backend.complete(request)
                    direct_ms.append((time.perf_counter() - t0) * 1000)
                else:
                    pipeline.call(request)
                    latency = pipeline.ledger.records[-1].latency_ms
                    overhead_ms.append(latency["total"] - latency["backend"])
                    through_backend_ms.append(latency["backend"])
                    counting_ms.append(latency["counting"])
    backend_p50 = median(direct_ms)
    return {
        "backend": backend.name,
        "model": backend.model,
        "calls": calls,
        "overhead_ms_p50": round(median(overhead_ms), 3),
        "overhead_ms_p95": round(percentile(overhead_ms, 95), 3),
        "counting_ms_p50": round(median(counting_ms), 3),
        "backend_ms_p50": round(backend_p50, 3),
        "backend_in_pipeline_ms_p50": round(median(through_backend_ms), 3),
        "overhead_ratio": round(median(overhead_ms) / backend_p50, 5) if backend_p50 else None,
    }


def table(result: dict[str, Any]) -> str:
    return "\n".join([
        f"pipeline overhead on {result['backend']} / {result['model']}, {result['calls']} calls each side",
        f"  overhead p50    {result['overhead_ms_p50']:>10.3f} ms   (p95 {result['overhead_ms_p95']:.3f} ms)",
        f"    of which counting {result['counting_ms_p50']:>6.3f} ms",
        f"  backend p50     {result['backend_ms_p50']:>10.3f} ms   (direct calls)",
        f"  overhead ratio  {result['overhead_ratio']:>10.5f}",
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=positive_int, default=20, help="rounds to run (default 20)")
    add_backend_arguments(parser)


def run_cli(args: argparse.Namespace) -> None:
    backend = backend_from_args(args)
    result = run(backend, args.calls)
    emit(result, args.json, table(result))
