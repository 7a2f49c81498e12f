"""Temporary files that a killed writer left behind.

Every store writes a temporary file and renames it into place, so a reader never sees half a file; but a
process killed between the two leaves the temporary file, and nothing else would ever delete it (a cache
snapshot's is as large as the whole index). Each store sweeps its own when it opens. A file younger than
an hour may belong to a writer at work in another process, and is left alone.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

STALE_AFTER_S = 3600.0


def remove_stale(folder: Path, pattern: str, *, older_than_s: float = STALE_AFTER_S) -> int:
    """Delete the files in `folder` matching `pattern` not modified for `older_than_s`; how many went."""
    removed = 0
    cutoff = time.time() - older_than_s
    with contextlib.suppress(OSError):
        for path in folder.glob(pattern):
            with contextlib.suppress(OSError):
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
    return removed
