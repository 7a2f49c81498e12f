"""The OpenAI-compatible proxy (`ctxkit serve`): ctxkit for any app that speaks the OpenAI API.

Needs the `serve` extra (starlette, uvicorn, prometheus-client); imported lazily, so the `ctxkit`
command works without it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ApiKeys": ".auth", "ProxyMetrics": ".metrics", "create_app": ".app", "error_for": ".app",
    "serve_in_thread": ".background",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(name)
