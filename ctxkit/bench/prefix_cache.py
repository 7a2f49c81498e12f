"""`ctxkit bench prefix-cache`: how much llama.cpp's KV prefix cache saves when calls share a prefix.

Each round opens a new conversation whose long system prompt differs from the previous round's in its
first line (cold: llama.cpp evaluates the whole prompt), then asks a second question in the same
conversation (warm: only the tokens after the shared prefix are evaluated). Same prompt length, same
machine, one run.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..backends.base import Backend
from ..request import ChatRequest
from .common import add_backend_arguments, backend_from_args, emit, median, positive_int, progress

POLICY = " ".join(
    f"Rule {i}: orders over {i * 10} EUR ship free to zone {i % 7}, returns within {14 + i % 16} days."
    for i in range(40)
)


def _request(first_line: str, question: str) -> ChatRequest:
    return ChatRequest(
        messages=[{"role": "system", "content": f"{first_line}\n{POLICY}"}, {"role": "user", "content": question}],
        params={"max_tokens": 1, "temperature": 0},
    )


def run(backend: Backend, calls: int = 10) -> dict[str, Any]:
    warm_ms: list[float] = []
    cold_ms: list[float] = []
    warm_cached: list[int] = []
    prompt_tokens = 0
    for i in progress(range(calls), total=calls, desc="prefix-cache"):
        first_line = f"Shop policy, edition {i}."
        t0 = time.perf_counter()
        backend.complete(_request(first_line, f"Question A{i}: what is the return window in zone {i % 7}?"))
        cold_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        response = backend.complete(_request(first_line, f"Question B{i}: do orders over 90 EUR ship free?"))
        warm_ms.append((time.perf_counter() - t0) * 1000)
        warm_cached.append(response.usage.cached_tokens)
        prompt_tokens = response.usage.prompt_tokens
    return {
        "backend": backend.name,
        "calls": calls,
        "prompt_tokens": prompt_tokens,
        "cached_tokens_p50": median(warm_cached),
        "warm_ms_p50": round(median(warm_ms), 2),
        "cold_ms_p50": round(median(cold_ms), 2),
        "speedup": round(median(cold_ms) / median(warm_ms), 2),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=positive_int, default=10, help="rounds to run (default 10)")
    add_backend_arguments(parser)


def run_cli(args: argparse.Namespace) -> None:
    backend = backend_from_args(args)
    result = run(backend, args.calls)
    emit(result, args.json, "\n".join(f"{k:<18} {v}" for k, v in result.items()))
