"""`ctxkit bench memory`: how much of a long conversation survives summarization to a token budget.

Each conversation (`{"id", "messages", "answers"}` lines; the last message is the question) goes through
the history stage (SummarizationStage) with its trigger and target at `--budget` times the conversation's
own prompt tokens. Retention: some answer string (case-insensitive) is still in what would be sent.
For comparison the same budget is given to LangChain's `trim_messages` (keep the newest messages that
fit), the usual baseline.

Conversations are split in two halves by a hash of their id; the weights of the fact ranking were tuned on
the first half only, so the second half's retention is the honest number (both are printed).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from ..request import ChatRequest, Message
from ..response import message_text
from ..validation import replace_malformed_arguments
from .common import (
    add_backend_arguments,
    add_embedding_arguments,
    backend_from_args,
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
)


def load_conversations(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for number, row in read_jsonl(path):
        if limit is not None and len(rows) >= limit:
            break
        check_messages(row.get("messages"), f"{path}:{number}")
        check_strings(row.get("answers"), f"{path}:{number}: answers")
        # As the pipeline does before anything counts or renders the prompt: recorded agent traffic replays
        # tool calls whose arguments a model broke ('{"city": "Oslo"'), which the chat template cannot parse.
        row["messages"] = list(replace_malformed_arguments(ChatRequest(messages=row["messages"]))[0].messages)
        # Scored as `retained` scores it, on the whole history: an answer the history never held (a typo, "1,007"
        # for "1007") could only ever be counted as a miss, for ctxkit and the baseline alike.
        history = "\n".join(message_text(dict(m)) for m in row["messages"][:-1]).lower()
        if not any(str(answer).lower() in history for answer in row["answers"]):
            raise ConfigurationError(f"{path}:{number}: answers: none of {row['answers'][:5]} appears in the "
                                     "conversation before its final message (retention would count it as a miss)")
        row.setdefault("id", f"line-{number}")
        rows.append(row)
    return require_records(rows, path)


def tuning_half(conversation_id: str) -> bool:
    """The half the ranking weights were tuned on (the other half checks them)."""
    return int(hashlib.md5(conversation_id.encode()).hexdigest(), 16) % 2 == 0


def retained(messages: Sequence[Message], answers: Sequence[str], question: Message | None = None) -> bool:
    """Some answer string (case-insensitive) in what would be sent, the final question left out: it is
    always kept verbatim, so an answer it names ("Paris or Rome?") says nothing about what the history kept."""
    kept = list(messages)
    if question is not None and kept and kept[-1].get("role") == question.get("role") \
            and message_text(dict(kept[-1])) == message_text(dict(question)):  # LangChain flattens content parts
        kept = kept[:-1]
    text = "\n".join(message_text(dict(m)) for m in kept).lower()
    return any(str(answer).lower() in text for answer in answers)


def trim_baseline(messages: Sequence[Message], budget: int, counter: Any) -> list[Message]:
    """LangChain's trim_messages(strategy="last", start_on="human", include_system=True) at `budget` tokens."""
    from langchain_core.messages import convert_to_messages, convert_to_openai_messages, trim_messages

    # trim_messages counts the leading system message on its own and the rest (newest first) apart: summed,
    # a chat template's framing (SmolLM2's default system prompt for a list without one) was counted twice,
    # and at --budget 1.0 the baseline dropped messages of a conversation that fits. Count the rest as the
    # tokens it adds behind the system message, so the parts add up to count_prompt of what is kept.
    converted = convert_to_messages(list(messages))
    system = [dict(messages[0])] if messages and messages[0].get("role") == "system" else []
    base = counter.count_prompt(system) if system else 0

    def count(batch: list[Any]) -> int:
        if not system or (len(batch) == 1 and batch[0] is converted[0]):
            return int(counter.count_prompt(convert_to_openai_messages(batch)))
        return int(counter.count_prompt([*system, *convert_to_openai_messages(batch[::-1])])) - base

    kept = trim_messages(converted, max_tokens=budget, token_counter=count,
                         strategy="last", start_on="human", include_system=True, allow_partial=False)
    # The kept messages as they were recorded: LangChain's round trip joins content parts with "\n", and a
    # final question so rewritten was not recognised (and left out) by `retained`, which then credited the
    # baseline with an answer that only the question names.
    position = {id(m): i for i, m in enumerate(converted)}
    return [dict(messages[position[id(m)]]) if id(m) in position else convert_to_openai_messages([m])[0]
            for m in kept]


def _check_budget(budget: float) -> None:
    if not 0 < budget <= 1:
        raise ConfigurationError(f"--budget is a fraction of the original tokens in (0, 1], got {budget}")


def run(
    conversations: Sequence[dict[str, Any]],
    backend: Any,
    *,
    budget: float,
    mode: str = "extractive",
    keep_last: int = 3,
    baseline: bool = True,
    embedder: Any = None,
) -> dict[str, Any]:
    from ..stages.summarize import SummarizationStage

    _check_budget(budget)
    if baseline:
        try:
            import langchain_core  # noqa: F401  (the baseline is LangChain's own trim_messages)
        except ImportError:
            raise ConfigurationError("the trim_messages baseline needs pip install 'ctxkit[langchain]' "
                                     "(or pass --no-baseline)") from None
    if embedder is None and mode != "model":
        from ..embed import Embedder

        embedder = Embedder()
    counter = backend.counter
    hits: list[bool] = []
    halves: dict[str, list[bool]] = {"tune": [], "check": []}
    ratios: list[float] = []
    latencies: list[float] = []
    base_hits: list[bool] = []
    base_ratios: list[float] = []
    over = 0
    originals: list[int] = []
    for row in progress(conversations, total=len(conversations), desc=f"memory/{mode}"):
        messages = row["messages"]
        original = counter.count_prompt(messages)
        originals.append(original)
        limit = max(1, int(budget * original))
        stage = SummarizationStage(backend, trigger_tokens=limit, target_tokens=limit, keep_last=keep_last,
                                   mode=mode, embedder=embedder)
        request = ChatRequest(messages=messages, conversation_id=str(row["id"]))
        t0 = time.perf_counter()
        sent = stage.before_model(request).messages
        latencies.append((time.perf_counter() - t0) * 1000)
        tokens = counter.count_prompt(list(sent))
        over += tokens > limit
        ratios.append(tokens / original)
        hit = retained(sent, row["answers"], messages[-1])
        hits.append(hit)
        halves["tune" if tuning_half(str(row["id"])) else "check"].append(hit)
        if baseline:
            trimmed = trim_baseline(messages, limit, counter)
            base_hits.append(retained(trimmed, row["answers"], messages[-1]))
            base_ratios.append(counter.count_prompt(trimmed) / original)
    n = len(conversations)

    def mean(values: Sequence[float]) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    result: dict[str, Any] = {
        "conversations": n,
        "budget": budget,
        "summarizer": mode,
        "keep_last": keep_last,
        "retention": mean([float(h) for h in hits]),
        "retention_tuning_half": mean([float(h) for h in halves["tune"]]),
        "retention_check_half": mean([float(h) for h in halves["check"]]),
        "kept_token_ratio": mean(ratios),
        "kept_token_ratio_max": round(max(ratios), 4) if ratios else None,
        "over_budget": over,
        "original_tokens_p50": median([float(o) for o in originals]),
        "latency_ms_p50": round(median(latencies), 2),
        "latency_ms_p95": round(percentile(latencies, 95), 2),
        "embed_precision": getattr(embedder, "precision", None),
    }
    if baseline:
        result["baseline"] = "langchain trim_messages (newest messages that fit)"
        result["baseline_retention"] = mean([float(h) for h in base_hits])
        result["baseline_kept_token_ratio"] = mean(base_ratios)
    return result


def table(r: dict[str, Any]) -> str:
    lines = [
        f"memory retention at {r['budget']:.0%} of the original tokens, {r['conversations']} conversations, "
        f"summarizer {r['summarizer']}",
        f"  retention          {r['retention']:.4f}   (tuning half {r['retention_tuning_half']}, "
        f"check half {r['retention_check_half']})",
        f"  kept token ratio   {r['kept_token_ratio']:.4f}   (max {r['kept_token_ratio_max']}, "
        f"over budget {r['over_budget']})",
        f"  latency p50        {r['latency_ms_p50']:.1f} ms  (p95 {r['latency_ms_p95']:.1f} ms)",
    ]
    if "baseline_retention" in r:
        lines.append(f"  baseline retention {r['baseline_retention']:.4f}   ({r['baseline']}, "
                     f"kept {r['baseline_kept_token_ratio']:.4f})")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conversations", type=Path, required=True,
                        help='JSON lines {"id", "messages", "answers"}; the last message is the question')
    parser.add_argument("--budget", type=float, default=0.25, help="fraction of each conversation's tokens")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N conversations")
    parser.add_argument("--summarizer", choices=("extractive", "model", "hybrid"), default="extractive",
                        help="extractive (fast), model (the backend's summary alone, slow), hybrid (both)")
    parser.add_argument("--keep-last", type=positive_int, default=3, help="newest messages kept verbatim (default 3)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the trim_messages baseline")
    add_backend_arguments(parser)
    add_embedding_arguments(parser)


def run_cli(args: argparse.Namespace) -> None:
    _check_budget(args.budget)  # before the file is read and both models are loaded, not after
    conversations = load_conversations(args.conversations, args.limit)
    backend = backend_from_args(args)
    embedder = embedder_from_args(args) if args.summarizer != "model" else None
    result = run(conversations, backend, budget=args.budget, mode=args.summarizer, keep_last=args.keep_last,
                 baseline=not args.no_baseline, embedder=embedder)
    result["data"] = str(args.conversations)
    emit(result, args.json, table(result))
