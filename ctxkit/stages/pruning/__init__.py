"""Pruning stages: send less of what the model has already seen or does not need.

- ToolResultClearingStage: old tool results become placeholders that say how to fetch them again.
- DocumentPruningStage: documents and long tool results cut to their best passages within a budget.
- DedupStage: near-duplicate messages and documents collapsed.

Each prefers edits at the end of the context and records in the ledger how many tokens of the previous
prompt an edit un-cached (`prefix_invalidated` events).
"""

from .dedup import DedupStage
from .documents import DocumentPruningStage, DocumentRanker, PruneResult, RankingWeights
from .tool_results import ToolResultClearingStage

__all__ = [
    "DedupStage", "DocumentPruningStage", "DocumentRanker", "PruneResult", "RankingWeights",
    "ToolResultClearingStage",
]
