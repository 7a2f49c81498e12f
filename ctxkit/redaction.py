"""Secrets out of anything ctxkit writes down (ledger records, log lines, quarantine records).

Tool output and error texts can quote API keys and request headers; the ledger and the logs are read by
more people than the keys are meant for. Known key shapes keep a short prefix, so a reader can still tell
which key it was.
"""

from __future__ import annotations

import re

_SECRET = re.compile(
    r"\b((?:sk|pk|rk)-[A-Za-z0-9_\-]{4})[A-Za-z0-9_\-]{8,}"  # OpenAI-style keys
    r"|\b(AKIA[A-Z0-9]{4})[A-Z0-9]{12}\b"  # AWS access key ids
    r"|\b((?:Bearer|Basic|Token)\s+)[A-Za-z0-9._~+/=\-]{8,}"  # Authorization headers
    r"|\b((?:api[_-]?key|access[_-]?token|auth[_-]?token|secret|password|passwd)[\"']?\s*[:=]\s*[\"']?)[^\s\"',;&]{4,}",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with API keys, bearer tokens and `password=...`-style values replaced by `…`."""
    return _SECRET.sub(lambda m: next(g for g in m.groups() if g is not None) + "…", text)
