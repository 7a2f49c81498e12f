"""History summarization: fold the oldest turns into a rolling summary that keeps facts verbatim.

See stage.py for the stage, facts.py for the extractive fact keeper, model.py for the model summarizer,
turns.py for where a conversation may be cut, state.py for the per-conversation running state.
"""

from __future__ import annotations

from .facts import Fact, Weights
from .model import ModelSummarizer
from .stage import MODES, SummarizationStage, SummaryResult
from .state import ConversationState, SummaryStore
from .turns import tail_start, turn_starts, valid_cuts

__all__ = [
    "MODES", "ConversationState", "Fact", "ModelSummarizer", "SummarizationStage", "SummaryResult",
    "SummaryStore", "Weights", "tail_start", "turn_starts", "valid_cuts",
]
