"""Stages: the middleware a call passes through. Each module holds one stage with one job."""

from __future__ import annotations

from ..backends.base import Backend
from ..stage import Stage


def default_stages(backend: Backend) -> list[Stage]:
    """The stages `ctxkit demo` and `ctxkit serve` run, most request-shrinking first."""
    del backend
    return []


__all__ = ["Stage", "default_stages"]
