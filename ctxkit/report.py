"""Reading a ledger: totals, savings by stage, cost by model, and plots (`ctxkit report`)."""

from __future__ import annotations

import statistics
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ConfigurationError
from .ledger import LedgerRecord


def summarize(records: Iterable[LedgerRecord]) -> dict[str, Any]:
    """Totals over successful calls; failed calls are counted apart and never add to savings. One pass over
    `records`, keeping none of them: a ledger of millions of calls is summarized in little memory."""
    calls = 0
    ok_calls = 0
    naive = sent = tokens_out = out_saved = tokens_cached = 0
    cost_ok: float = 0
    cost_naive: float = 0
    sent_failed = 0
    cost_failed: float = 0
    by_stage: Counter[str] = Counter()
    error_types: Counter[Any] = Counter()
    answered_by: Counter[str] = Counter()
    by_model: dict[str, dict[str, Any]] = defaultdict(lambda: Counter())
    deltas: list[int] = []
    totals: list[float] = []
    backend: list[float] = []
    # Running sums, not the events: a ledger of millions of calls keeps none of its records in memory.
    summarizer: Counter[str] = Counter()  # calls and tokens
    summarizer_cost = {"": 0.0, "_failed": 0.0}
    # Prompt tokens a stage's edit took out of the provider's (or llama.cpp's) prefix cache. Each stage notes
    # the previous prompt from its first new edit to the end: one call's stages overlap, so a call counts the
    # widest of them, not their sum.
    invalidated_by_stage: Counter[str] = Counter()
    invalidated = 0
    for r in records:
        calls += 1
        # A summarizing model's own calls are no call the app made: their tokens are shown beside the savings,
        # their cost is in each record's cost_usd: in the cost of ok calls, or of failed ones (counted apart,
        # or "summarizer $X (in the cost)" read more than the cost it is part of).
        failed = "_failed" if r.status != "ok" else ""
        for e in r.events:
            if e.get("kind") == "summarizer_call":
                summarizer["calls" + failed] += 1
                summarizer["prompt" + failed] += int(sum(_numbers([e.get("prompt_tokens")])))
                summarizer["completion" + failed] += int(sum(_numbers([e.get("completion_tokens")])))
                summarizer_cost[failed] += sum(_numbers([e.get("cost_usd")]))
        if r.status != "ok":
            error_types[r.error_type] += 1
            # Failed calls save nothing, but what they sent was paid for (an abandoned stream too).
            sent_failed += r.tokens_sent
            cost_failed += r.cost_usd
            continue
        ok_calls += 1
        naive += r.tokens_naive
        sent += r.tokens_sent
        tokens_out += r.tokens_out
        out_saved += r.out_saved
        tokens_cached += r.tokens_cached
        cost_ok += r.cost_usd
        cost_naive += r.cost_naive_usd
        by_stage.update(r.saved_by_stage)
        if r.answered_by:
            answered_by[r.answered_by] += 1
        m = by_model[r.model]
        m["calls"] += 1
        m["tokens_naive"] += r.tokens_naive
        m["tokens_sent"] += r.tokens_sent
        m["tokens_out"] += r.tokens_out
        m["cost_naive_usd"] += r.cost_naive_usd
        own = r.cost_usd
        # A summarizing model's calls are in the record's cost_usd, but were that model's: its row pays them.
        for e in r.events:
            if e.get("kind") not in ("summarizer_call", "backend_retry") or not isinstance(e.get("model"), str):
                continue
            cost = sum(_numbers([e.get("cost_usd")]))
            own -= cost
            s = by_model[e["model"]]
            s["summarizer_calls"] += e.get("kind") == "summarizer_call"
            s["cost_usd"] += cost
        m["cost_usd"] += own
        if r.count_delta is not None and r.usage_reported:
            deltas.append(r.count_delta)
        # latency_ms may hold null or nested values (the record reader accepts them): only numbers count.
        totals += _numbers([r.latency_ms.get("total")])
        if r.tokens_sent:
            backend += _numbers([r.latency_ms.get("backend")])
        notes = [e for e in r.events if e.get("kind") == "prefix_invalidated"]
        for e in notes:
            invalidated_by_stage[str(e.get("stage"))] += int(sum(_numbers([e.get("tokens")])))
        invalidated += int(max(_numbers(e.get("tokens") for e in notes), default=0))
    for m in by_model.values():  # every row has every column (a summarizer-only model made no app call)
        for key in ("calls", "tokens_naive", "tokens_sent", "tokens_out", "cost_usd", "cost_naive_usd"):
            m[key] += 0
    return {
        "calls": calls,
        "ok": ok_calls,
        "errors": calls - ok_calls,
        "error_types": dict(error_types),
        "tokens_naive": naive,
        "tokens_sent": sent,
        "tokens_saved": naive - sent,
        "saved_ratio": round((naive - sent) / naive, 4) if naive else 0.0,
        "tokens_out": tokens_out,
        "out_saved": out_saved,
        "tokens_cached": tokens_cached,
        "prefix_invalidated": invalidated,
        "prefix_invalidated_by_stage": dict(invalidated_by_stage),
        "answered_by_stage": dict(answered_by),
        "saved_by_stage": dict(by_stage),
        "by_model": {model: dict(m) for model, m in sorted(by_model.items())},
        # Not rounded: at a few cents per million tokens, six decimals read $0.000000 either way.
        "cost_usd": cost_ok,
        "cost_naive_usd": cost_naive,
        "tokens_sent_failed": sent_failed,
        "cost_failed_usd": cost_failed,
        "summarizer_calls": summarizer["calls"],
        "summarizer_prompt_tokens": summarizer["prompt"],
        "summarizer_completion_tokens": summarizer["completion"],
        "summarizer_cost_usd": summarizer_cost[""],
        # made for calls that then failed: in cost_failed_usd
        "summarizer_calls_failed": summarizer["calls_failed"],
        "summarizer_cost_failed_usd": summarizer_cost["_failed"],
        "count_exact_calls": sum(1 for d in deltas if d == 0),
        "count_checked_calls": len(deltas),
        "latency_ms_p50": round(statistics.median(totals), 2) if totals else None,
        "backend_ms_p50": round(statistics.median(backend), 2) if backend else None,
    }


def _numbers(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"calls            {summary['calls']} ({summary['ok']} ok, {summary['errors']} failed)"
        + (f"; {summary['skipped_lines']} malformed line(s) skipped" if summary.get("skipped_lines") else ""),
        f"tokens naive     {summary['tokens_naive']}",
        f"tokens sent      {summary['tokens_sent']}",
        f"tokens saved     {summary['tokens_saved']} ({summary['saved_ratio']:.1%})",
        f"tokens out       {summary['tokens_out']} (+{summary['out_saved']} answered by stages)",
        f"prefix-cached    {summary['tokens_cached']}",
        f"prefix un-cached {summary.get('prefix_invalidated', 0)} (by stages' edits of earlier content"
        + "".join(f"; {k} {v}" for k, v in (summary.get("prefix_invalidated_by_stage") or {}).items()) + ")",
        f"summarizer       {summary['summarizer_calls']} calls, {summary['summarizer_prompt_tokens']} prompt + "
        f"{summary['summarizer_completion_tokens']} completion tokens, ${summary['summarizer_cost_usd']:.4g} "
        "(in the cost, not in the tokens sent)"
        + (f"; {summary['summarizer_calls_failed']} more for failed calls, ${summary['summarizer_cost_failed_usd']:.4g} "
           "(in their cost)" if summary.get("summarizer_calls_failed") else ""),
        f"exact counts     {summary['count_exact_calls']}/{summary['count_checked_calls']} calls match the backend's usage",
        f"cost             ${summary['cost_usd']:.4g} (without ctxkit ${summary['cost_naive_usd']:.4g}); "
        f"failed calls ${summary['cost_failed_usd']:.4g} for {summary['tokens_sent_failed']} tokens sent",
        "",
        "saved by stage",
    ]
    stages = summary["saved_by_stage"] or {"(no stages)": 0}
    lines += [f"  {name:<24} {tokens:>10}" for name, tokens in stages.items()]
    lines += ["", f"{'model':<32} {'calls':>6} {'naive':>9} {'sent':>9} {'out':>7} {'cost $':>10}"]
    for model, m in summary["by_model"].items():
        lines.append(
            f"{model[:32]:<32} {m['calls']:>6} {m['tokens_naive']:>9} {m['tokens_sent']:>9} "
            f"{m['tokens_out']:>7} {m['cost_usd']:>10.4g}"
        )
    return "\n".join(lines)


class PlotPoints:
    """Tokens naive and sent of each successful call, gathered while the records stream past `summarize`:
    16 bytes a call, where a list of the records themselves held every event of a huge ledger in memory."""

    def __init__(self) -> None:
        self.naive = array("q")
        self.sent = array("q")

    def tap(self, records: Iterable[LedgerRecord]) -> Iterable[LedgerRecord]:
        for r in records:
            if r.status == "ok":
                self.naive.append(r.tokens_naive)
                self.sent.append(r.tokens_sent)
            yield r


def check_plot_path(path: str | Path) -> Path:
    path = Path(path)
    try:
        import matplotlib
    except ImportError:
        raise ConfigurationError("--plot needs matplotlib: pip install 'ctxkit[report]'") from None
    import matplotlib.figure

    if path.suffix.lstrip(".").lower() not in matplotlib.figure.Figure().canvas.get_supported_filetypes():
        raise ConfigurationError(f"--plot {path}: not an image format matplotlib writes (use .png, .svg, .pdf)")
    # A path that cannot be written (a folder, or a file where a folder must go) fails here too, before a report
    # is printed beside the error; plot() creates the missing folders.
    if path.is_dir():
        raise ConfigurationError(f"--plot {path}: is a directory; name an image file")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigurationError(f"--plot {path}: {existing} is a file, not a directory")
    import os

    target = path if path.exists() else existing
    if not os.access(target, os.W_OK | (0 if target is path else os.X_OK)):  # a read-only folder or file
        raise ConfigurationError(f"--plot {path}: {target} is not writable")
    return path


def plot(records: Iterable[LedgerRecord], path: str | Path, *, points: PlotPoints | None = None,
         summary: dict[str, Any] | None = None) -> Path:
    """Two panels: tokens naive vs sent per call, and tokens saved by stage. One pass over `records`, or none
    when `points` and `summary` were gathered already (`summarize(points.tap(records))`)."""
    path = check_plot_path(path)
    if points is None or summary is None:
        points = PlotPoints()
        summary = summarize(points.tap(records))  # savings are totalled over successful calls only
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    calls = range(1, len(points.naive) + 1)
    left.plot(calls, points.naive, marker="o", label="naive (as the app asked)")
    left.plot(calls, points.sent, marker="o", label="sent (after ctxkit)")
    left.set_xlabel("call")
    left.set_ylabel("prompt tokens")
    left.set_title("Prompt tokens per call")
    left.legend()
    stages = summary["saved_by_stage"] or {"(no stages)": 0}
    right.bar(list(stages), list(stages.values()), color="tab:green")
    right.set_ylabel("tokens saved")
    right.set_title(f"Saved by stage (total {summary['tokens_saved']}, {summary['saved_ratio']:.0%})")
    right.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
