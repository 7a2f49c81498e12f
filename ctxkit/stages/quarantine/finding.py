"""A Finding: why one piece of content is quarantined; small helpers the detectors share."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ...redaction import redact


@dataclasses.dataclass(frozen=True)
class Finding:
    """Why one piece of content is quarantined. kind: tool_error | schema | injection | contradiction."""

    kind: str
    reason: str  # generic: safe to show the model in a placeholder
    evidence: str = ""  # the offending text, for logs and `list()`, never sent back to the model

    @property
    def detail(self) -> str:
        return f"{self.reason}: {self.evidence}" if self.evidence else self.reason


def parse_json(text: str) -> Any:
    stripped = text.strip()
    if not stripped or stripped[0] not in "[{\"-tfn" and not stripped[0].isdigit():
        return None
    try:
        return json.loads(stripped)
    except (json.JSONDecodeError, ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        return None


def shorten(value: Any, limit: int = 120) -> str:
    """`value` on one line, redacted before it is cut: a key cut in two escapes redaction (its first 19
    characters of a ghp_ token, say), so evidence cut first kept more of a key than the ledger ever shows."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    text = redact(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def line_at(text: str, position: int) -> str:
    start = text.rfind("\n", 0, position) + 1
    end = text.find("\n", position)
    return text[start : end if end >= 0 else len(text)]
