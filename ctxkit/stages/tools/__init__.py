"""Tool retrieval: send each call only the tool schemas it needs, selected from catalogs of thousands."""

from __future__ import annotations

from .compaction import compact_schema, compact_tool
from .index import FusionConfig, ToolIndex, catalog_hash, tool_hash
from .selector import QueryPart, Selection, ToolSelector, conversation_query, used_tool_names
from .stage import FIND_TOOLS, ToolRetrievalStage

__all__ = [
    "FIND_TOOLS", "FusionConfig", "QueryPart", "Selection", "ToolIndex", "ToolRetrievalStage", "ToolSelector",
    "catalog_hash", "compact_schema", "compact_tool", "conversation_query", "tool_hash", "used_tool_names",
]
