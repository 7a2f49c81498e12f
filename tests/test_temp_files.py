"""Temporary files a killed writer left behind are swept when a store opens, and a live writer's are not."""

from __future__ import annotations

import os
import time

from ctxkit.stages.cache.local_store import LocalStore
from ctxkit.stages.summarize.state import SummaryStore
from ctxkit.stages.tools.vectors import VectorStore
from ctxkit.temp_files import STALE_AFTER_S


def _left_behind(path, *, age_s: float):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half written")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_each_store_sweeps_the_temporary_files_of_a_killed_writer(tmp_path):
    old = STALE_AFTER_S + 60
    summaries = _left_behind(tmp_path / "summaries" / "tmpab12.tmp", age_s=old)
    live = _left_behind(tmp_path / "summaries" / "tmpcd34.tmp", age_s=5)  # another process is writing it
    vectors = _left_behind(tmp_path / "vectors" / "0a1b2c.tmp", age_s=old)
    snapshot = _left_behind(tmp_path / "cache" / "faiss" / ".snapshot-flat.npz.123.456.tmp", age_s=old)
    SummaryStore(tmp_path / "summaries")
    VectorStore(tmp_path / "vectors")
    LocalStore(tmp_path / "cache").close()
    assert not summaries.exists() and not vectors.exists() and not snapshot.exists()
    assert live.exists()
