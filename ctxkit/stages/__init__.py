"""Stages: the middleware a call passes through. Each module holds one stage with one job.

- quarantine.QuarantineStage        marks erroneous, failed or untrusted content before it becomes durable
- cache.SemanticCacheStage          answers from an earlier equivalent request (exact + semantic layers)
- tools.ToolRetrievalStage          sends only the tool schemas the call needs
- pruning.ToolResultClearingStage   old tool results become placeholders
- pruning.DedupStage                near-duplicate messages collapsed
- pruning.DocumentPruningStage      documents cut to their best passages within a budget
- summarize.SummarizationStage      old history folded into a rolling summary
- templates.TemplateStage           prompts rendered from named, versioned templates
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..backends.base import Backend
from ..stage import Stage


def default_stages(
    backend: Backend,
    *,
    cache_dir: str | Path | None = None,
    embedder: Any = None,
    tools_top_k: int = 5,
    summarize_at_tokens: int | None = None,
    cache_store: Any = None,
    documents_budget_tokens: int | None = None,
    state_dir: str | Path | None = None,
    quarantine_store: str | None = None,
) -> list[Stage]:
    """The stages `ctxkit demo` and `ctxkit serve` run, in the order that keeps them correct:

    quarantine first (nothing it marks reaches the cache or a summary), the cache next (a hit saves
    everything after it), then the stages that shrink what is sent, summarization before the ones that
    rewrite single messages.

    cache_dir:           where the local cache store lives (None: no cache unless cache_store is given).
    cache_store:         a CacheStore to use instead (PostgresStore for replicas).
    state_dir:           where quarantine records and releases (state_dir/quarantine) and conversation
                         summaries (state_dir/summaries) are kept, so they outlive a restart (None: memory).
    quarantine_store:    a postgresql:// URL: quarantine records and releases are kept there instead, shared by
                         replicas on every host (summaries stay under state_dir).
    summarize_at_tokens: fold old history once a request passes this many tokens
                         (default: 60% of the backend's context window).
    documents_budget_tokens: the call's documents (`metadata["documents"]`, `<document>` blocks) are cut to
                         their best passages past this many tokens (default: 4000, and at most a quarter
                         of the backend's window, beside the history summarization keeps under 60% of it);
                         tool results are left whole (what a tool returns is the app's choice; a
                         DocumentPruningStage of your own can cut them).
    """
    from ..embed import Embedder
    from .cache import LocalStore, SemanticCacheStage
    from .pruning import DedupStage, DocumentPruningStage, ToolResultClearingStage
    from .quarantine import QuarantineStage
    from .summarize import SummarizationStage
    from .tools import ToolRetrievalStage

    embedder = embedder or Embedder()
    if documents_budget_tokens is None:
        documents_budget_tokens = max(1, min(4000, backend.context_window // 4))
    state = Path(state_dir) if state_dir is not None else None
    stages: list[Stage] = [QuarantineStage(
        counter=backend.counter, store=quarantine_store,
        directory=state / "quarantine" if state is not None and quarantine_store is None else None)]
    if cache_store is None and cache_dir is not None:
        cache_store = LocalStore(cache_dir)
    if cache_store is not None:
        stages.append(SemanticCacheStage(cache_store, embedder, default_model=backend.model))
    # Summarization before clearing and dedup: it folds the history as the app sends it, the same on
    # every call. After them, a folded tool result cleared one call later changed the folded history, and
    # each such change threw the rolling summary away and re-read everything.
    stages += [
        ToolRetrievalStage(top_k=tools_top_k, embedder=embedder, counter=backend.counter),
        SummarizationStage(
            backend,
            trigger_tokens=summarize_at_tokens,
            trigger_fraction=None if summarize_at_tokens else 0.6,
            keep_last=4,
            mode="extractive",  # measured: the 135M model's summaries lose facts the extractive keeper holds
            embedder=embedder,
            state_dir=state / "summaries" if state is not None else None,
        ),
        # Each clearing step un-caches the prompt after the oldest result it clears, and what it saves would
        # have been cheap cached tokens on later calls: steps worth 1/64 of the window (64 tokens for the
        # local model's 4096, 2000 for a 128k API model) break the cache rarely enough to pay for it.
        ToolResultClearingStage(keep_last=2, clear_at_least=max(64, backend.context_window // 64),
                                counter=backend.counter),
        DedupStage(counter=backend.counter),  # the ledger's prefix tokens in the backend's own tokens
        # Last: it ranks the documents dedup left, and sends them at the end of the prompt. Without it the
        # request's metadata documents would reach no model at all.
        DocumentPruningStage(budget_tokens=documents_budget_tokens, embedder=embedder, counter=backend.counter,
                             long_message_tokens=None),
    ]
    return stages


__all__ = ["Stage", "default_stages"]
