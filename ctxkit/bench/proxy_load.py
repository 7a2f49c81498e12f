"""`ctxkit bench proxy-load`: many concurrent OpenAI clients against the proxy over loopback HTTP.

Starts `ctxkit serve`'s app under uvicorn on 127.0.0.1, then N client threads (each its own `openai`
client, released together by a barrier) make M calls each; every fourth call streams. Each call carries
a conversation id, so afterwards every answered call can be found in the ledger. Prints requests,
errors, requests that got no answer at all (lost), p50/p95 latency, and ledger lines against answered
calls. Prompts come from a data file in the formats of the evaluation data (records with `messages`,
`a` as in cache pairs, or `question`; the last user message is sent), or a built-in handful.
"""

from __future__ import annotations

import argparse
import collections
import secrets
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from ..ledger import Ledger, read_ledger
from ..pipeline import Pipeline
from ..response import message_text
from .common import (
    add_backend_arguments,
    backend_from_args,
    check_messages,
    emit,
    median,
    percentile,
    positive_int,
    read_jsonl,
)

BUILTIN_PROMPTS = [
    "Say hello.", "Name a colour.", "What is two plus two?", "Give me one word that rhymes with cat.",
    "Name a fruit.", "Which day comes after Monday?",
]


def load_prompts(path: str | Path | None, limit: int = 200) -> list[list[dict[str, Any]]]:
    """One-message conversations: the last user message of each record (short prompts keep the
    benchmark about the proxy, not the model's prompt processing)."""
    if path is None:
        return [[{"role": "user", "content": text}] for text in BUILTIN_PROMPTS]
    prompts = []
    for number, record in read_jsonl(path):
        field = "messages" if "messages" in record else "a" if "a" in record else None
        if field is not None:
            where = f"{path}:{number}" + (": a" if field == "a" else "")  # the check names "messages..." itself
            messages = check_messages(record[field], where)
        elif isinstance(record.get("question"), str):
            messages = [{"role": "user", "content": record["question"]}]
        else:
            messages = []
        # Content given as a list of parts is text too: skipping it sent an earlier user message instead.
        users = [text for m in messages if m.get("role") == "user" for text in [message_text(dict(m))] if text.strip()]
        if users:
            prompts.append([{"role": "user", "content": users[-1][:400]}])
        if len(prompts) >= limit:
            break
    if not prompts:
        raise ConfigurationError(f"{path}: no record with a user message")
    return prompts


def run(pipeline: Pipeline, prompts: list[list[dict[str, Any]]], *, clients: int = 50, calls_per_client: int = 2,
        max_tokens: int = 8, stream_every: int = 4, max_concurrency: int | None = None) -> dict[str, Any]:
    """Drive the proxy over `pipeline` with `clients` threads; the pipeline's ledger must have a path."""
    import openai

    from ..server import ApiKeys, create_app, serve_in_thread

    if pipeline.ledger.path is None:
        raise ValueError("the pipeline's ledger needs a file: the benchmark reads it back")
    keys = {f"bench-{secrets.token_hex(8)}": f"tenant{i}" for i in range(2)}
    run_tag = secrets.token_hex(4)
    latencies: list[float] = []
    answered: set[str] = set()
    errors: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    active = 0
    peak = 0
    barrier = threading.Barrier(clients)

    def client_thread(index: int, base_url: str) -> None:
        nonlocal active, peak
        key = list(keys)[index % len(keys)]
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=600)
        barrier.wait()
        for call in range(calls_per_client):
            number = index * calls_per_client + call
            conversation = f"load-{run_tag}-{number}"
            stream = stream_every > 0 and number % stream_every == stream_every - 1
            with lock:
                active += 1
                peak = max(peak, active)
            t0 = time.perf_counter()
            try:
                messages: Any = prompts[number % len(prompts)]
                result = client.chat.completions.create(
                    model="default", messages=messages, max_tokens=max_tokens,
                    temperature=0, stream=stream, extra_body={"ctxkit": {"conversation_id": conversation}},
                )
                if stream:
                    for _ in result:
                        pass
                outcome = None
            except openai.APIStatusError as exc:
                outcome = f"http_{exc.status_code}"
            except openai.APIError as exc:
                outcome = type(exc).__name__
            elapsed = (time.perf_counter() - t0) * 1000
            with lock:
                active -= 1
                latencies.append(elapsed)
                if outcome is None:
                    answered.add(conversation)
                else:
                    errors[outcome] += 1
        client.close()

    app = create_app(pipeline, ApiKeys(keys), max_concurrency=max_concurrency)
    wall0 = time.perf_counter()
    with serve_in_thread(app) as base_url:
        threads = [threading.Thread(target=client_thread, args=(i, base_url)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    wall_s = time.perf_counter() - wall0
    requests = clients * calls_per_client
    mine = [r for r in read_ledger(pipeline.ledger.path) if (r.conversation_id or "").startswith(f"load-{run_tag}-")]
    in_ledger = {r.conversation_id for r in mine if r.status == "ok"}
    backend_ms = [float(r.latency_ms.get("backend", 0.0)) for r in mine]
    overhead_ms = [float(r.latency_ms.get("total", 0.0)) - b for r, b in zip(mine, backend_ms, strict=True)]
    return {
        "backend": pipeline.backend.name,
        "model": pipeline.backend.model,
        "clients": clients,
        "calls_per_client": calls_per_client,
        "max_tokens": max_tokens,
        "requests": requests,
        "answered": len(answered),
        "errors": sum(errors.values()),
        "errors_by_type": dict(errors),
        "lost": requests - len(answered) - sum(errors.values()),
        "peak_concurrent_requests": peak,
        "latency_ms_p50": round(median(latencies), 1),
        "latency_ms_p95": round(percentile(latencies, 95), 1),
        "latency_ms_max": round(max(latencies), 1) if latencies else None,
        "backend_ms_p50": round(median(backend_ms), 1),
        "pipeline_overhead_ms_p50": round(median(overhead_ms), 2),
        "pipeline_overhead_ms_p95": round(percentile(overhead_ms, 95), 2),
        "wall_s": round(wall_s, 2),
        "requests_per_s": round(requests / wall_s, 2),
        "ledger_lines": len(mine),
        "ledger_ok_lines": len(in_ledger),
        "answered_missing_from_ledger": len(answered - in_ledger),
        "tokens_naive": sum(r.tokens_naive for r in mine),
        "tokens_sent": sum(r.tokens_sent for r in mine),
        "tokens_out": sum(r.tokens_out for r in mine),
    }


def table(result: dict[str, Any]) -> str:
    errors = ", ".join(f"{k} {v}" for k, v in result["errors_by_type"].items()) or "none"
    return "\n".join([
        f"proxy load on {result['backend']} / {result['model']}: {result['clients']} clients x "
        f"{result['calls_per_client']} calls, max_tokens {result['max_tokens']}",
        f"  requests        {result['requests']:>8}   answered {result['answered']}, lost {result['lost']}",
        f"  errors          {result['errors']:>8}   ({errors})",
        f"  latency p50     {result['latency_ms_p50']:>8.1f} ms   p95 {result['latency_ms_p95']:.1f} ms, "
        f"max {result['latency_ms_max']:.1f} ms",
        f"  in the ledger   backend p50 {result['backend_ms_p50']:.1f} ms, ctxkit overhead p50 "
        f"{result['pipeline_overhead_ms_p50']:.2f} ms (p95 {result['pipeline_overhead_ms_p95']:.2f} ms); the rest is queueing",
        f"  wall            {result['wall_s']:>8.2f} s    {result['requests_per_s']:.2f} req/s, "
        f"peak {result['peak_concurrent_requests']} concurrent",
        f"  ledger lines    {result['ledger_lines']:>8}   answered calls missing from it: "
        f"{result['answered_missing_from_ledger']}",
        f"  tokens          naive {result['tokens_naive']}, sent {result['tokens_sent']}, out {result['tokens_out']}",
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=positive_int, default=50, help="concurrent client threads (default 50)")
    parser.add_argument("--calls-per-client", type=positive_int, default=2)
    parser.add_argument("--max-tokens", type=positive_int, default=8)
    parser.add_argument("--stream-every", type=int, default=4, help="every n-th call streams (0: none)")
    parser.add_argument("--data", type=Path, help="JSON lines with `messages` (or `a`): prompts to send")
    parser.add_argument("--ledger", type=Path, help="ledger file (default: a temporary one)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="the proxy's in-flight limit")
    parser.add_argument("--upstream", metavar="URL", help="benchmark over an OpenAI-compatible upstream instead")
    parser.add_argument("--upstream-model", help="model name the upstream serves")
    parser.add_argument("--upstream-gguf", type=Path, help="count tokens with this GGUF's tokenizer")
    add_backend_arguments(parser)


def run_cli(args: argparse.Namespace) -> None:
    from ..stages import default_stages

    if args.upstream:
        if not args.upstream_model:
            raise ConfigurationError("--upstream needs --upstream-model")
        from ..backends.gguf_prompt import GGUFPrompt
        from ..backends.openai_compat import OpenAIBackend

        counter = GGUFPrompt.from_gguf(args.upstream_gguf) if args.upstream_gguf else None
        backend: Any = OpenAIBackend(args.upstream_model, base_url=args.upstream, counter=counter)
    else:
        backend = backend_from_args(args)
    prompts = load_prompts(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(args.ledger or Path(tmp) / "ledger.jsonl")
        pipeline = Pipeline(backend, default_stages(backend), ledger=ledger)
        result = run(pipeline, prompts, clients=args.clients, calls_per_client=args.calls_per_client,
                     max_tokens=args.max_tokens, stream_every=args.stream_every, max_concurrency=args.max_concurrency)
    result["data"] = str(args.data) if args.data else "built-in prompts"
    emit(result, args.json, table(result))
