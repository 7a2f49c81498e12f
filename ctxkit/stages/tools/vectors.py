"""Where tool vectors are kept between embeddings: in memory for the process (VectorMemo), and on disk
for every process that uses the same directory (VectorStore).

Both are keyed by a hash of the tool's schema, so a catalog that gains or loses a tool embeds only the new
tool, and a schema that comes back (a pool that changes a little from call to call) is never embedded twice.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ...lru import LRUMemo
from ...temp_files import remove_stale

LEGACY_FILE = "vectors.npz"  # before batches: one member per tool, rewritten whole on every addition


class VectorMemo:
    """Tool vectors this process has embedded or read, by (embedding model and precision, tool hash); the
    least recently used go past `max_vectors`. Shared by the indexes of one ToolRetrievalStage: an app that
    sends its tools with each request, a little different from call to call, makes a new pool each time,
    and each pool embedded every schema again (1,500 tools: about 30 s) or re-read the vector store."""

    def __init__(self, max_vectors: int = 50_000) -> None:
        self._memo: LRUMemo[tuple[str, str], np.ndarray] = LRUMemo(max_vectors)

    def get(self, space: str, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        return {h: vector for (_, h), vector in self._memo.get((space, h) for h in hashes).items()}

    def put(self, space: str, vectors: dict[str, np.ndarray]) -> None:
        self._memo.put({(space, h): vector for h, vector in vectors.items()})


class VectorStore:
    """Tool vectors of one embedding model and precision in a folder, as append-only batch files.

    Each embedding writes one new file (`<random>.npz`: the schema hashes and their vectors), atomically,
    so several processes can add at once without losing each other's vectors, and adding one tool to a
    catalog of ten thousand writes one small file instead of rewriting them all (that took 0.7 s, and
    reading a file of one member per tool another second). Past `max_batches` files, the next addition
    merges them into one. A file that cannot be read is skipped: its tools are embedded again.
    """

    def __init__(self, folder: Path, *, max_batches: int = 32) -> None:
        self.folder = folder
        self.max_batches = max_batches
        remove_stale(folder, "*.tmp")

    def read(self) -> dict[str, np.ndarray]:
        """Every stored vector, by tool hash."""
        self._move_legacy_file()
        found: dict[str, np.ndarray] = {}
        for _ in range(3):  # a batch listed but gone was merged by another process meanwhile: list again
            found, gone = {}, False
            for path in self._batches():
                batch = _read_batch(path)
                gone = gone or batch is None
                found.update(batch or {})
            if not gone:
                break
        return found

    def _move_legacy_file(self) -> None:
        """The one file of an earlier version, moved into a batch once: read whole on every addition, it
        kept an upgraded directory as slow as the layout it replaces."""
        legacy = self.folder.parent / LEGACY_FILE
        if not legacy.exists():
            return
        old = _read_legacy(legacy)
        if old:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write(old)
        legacy.unlink(missing_ok=True)

    def append(self, vectors: dict[str, np.ndarray]) -> None:
        """Store these vectors (merging the batch files first when there are too many)."""
        if not vectors:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        batches = self._batches()
        if len(batches) >= self.max_batches:
            merged = {h: v for path in batches for h, v in (_read_batch(path) or {}).items()}
            self._write({**merged, **vectors})
            for path in batches:  # the merged file holds them now; a reader that listed them lists again
                path.unlink(missing_ok=True)
        else:
            self._write(vectors)

    def _batches(self) -> list[Path]:
        return sorted(self.folder.glob("*.npz")) if self.folder.is_dir() else []

    def _write(self, vectors: dict[str, np.ndarray]) -> None:
        name = uuid.uuid4().hex
        tmp = self.folder / f"{name}.tmp"
        with open(tmp, "wb") as out:
            np.savez(out, hashes=np.array(list(vectors), dtype=str),
                     vectors=np.stack(list(vectors.values())).astype(np.float32))
        os.replace(tmp, self.folder / f"{name}.npz")  # readers see a whole batch or none


def _read_batch(path: Path) -> dict[str, np.ndarray] | None:
    """The batch's vectors; None when the file is gone (merged by another process since it was listed)."""
    try:
        with np.load(path) as data:
            hashes, vectors = data["hashes"].tolist(), data["vectors"]
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - truncated or empty: re-embed only
        return {}
    if vectors.ndim != 2 or len(hashes) != len(vectors):
        return {}
    return dict(zip(hashes, vectors, strict=True))


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            return {key: data[key] for key in data.files}
    except Exception:  # noqa: BLE001 - truncated or empty: re-embed only
        return {}
