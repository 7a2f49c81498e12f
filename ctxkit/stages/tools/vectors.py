"""Where tool vectors are kept between embeddings: in memory for the process (VectorMemo), and on disk
for every process that uses the same directory (VectorStore).

Both are keyed by a hash of the tool's schema, so a catalog that gains or loses a tool embeds only the new
tool, and a schema that comes back (a pool that changes a little from call to call) is never embedded twice.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterable, Set
from pathlib import Path

import numpy as np

from ...lru import LRUMemo
from ...temp_files import remove_stale

LEGACY_FILE = "vectors.npz"  # before batches: one member per tool, rewritten whole on every addition
# Vectors a store keeps when it merges its batches (1.5 kB each with MiniLM: about 150 MB): catalogs that change
# (MCP servers coming and going, each release re-describing its tools) stored a vector per version, forever.
MAX_STORED_VECTORS = 100_000


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
    merges them into one, keeping the `max_vectors` most recently used and every vector a caller still
    needs. A file that cannot be read is skipped: its tools are embedded again.

    Recency is by batch file (its mtime: written, or last read for a catalog, see `read`) and, within
    a merged file, by position (the least recently used first), so no process has to rewrite a file to
    note a use. Between merges up to `max_batches - 1` batches more may wait.
    """

    def __init__(self, folder: Path, *, max_batches: int = 32, max_vectors: int | None = None) -> None:
        self.folder = folder
        self.max_batches = max_batches
        self.max_vectors = MAX_STORED_VECTORS if max_vectors is None else max_vectors
        remove_stale(folder, "*.tmp")

    def read(self, used: Set[str] = frozenset()) -> dict[str, np.ndarray]:
        """Every stored vector, by tool hash; the batches holding any of `used` (the tool hashes a catalog
        takes from here) are marked used now, the last a merge evicts from."""
        self._move_legacy_file()
        found: dict[str, np.ndarray] = {}
        for _ in range(3):  # a batch listed but gone was merged by another process meanwhile: list again
            found, gone = {}, False
            for path in self._batches():
                batch = _read_batch(path)
                gone = gone or batch is None
                found.update(batch or {})
                if batch and not used.isdisjoint(batch):
                    with contextlib.suppress(OSError):  # a read-only directory: no merge evicts there either
                        os.utime(path)
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

    def append(self, vectors: dict[str, np.ndarray], keep: Callable[[], Set[str]] = frozenset) -> None:
        """Store these vectors (merging the batch files first when there are too many).
        keep: the tool hashes whose vectors a merge must not evict (those of the catalogs in use); asked for
        only when a merge has more than `max_vectors`."""
        if not vectors:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        batches = self._batches()
        if len(batches) >= self.max_batches:
            merged: dict[str, np.ndarray] = {}
            for batch in [*(_read_batch(path) or {} for path in sorted(batches, key=_last_used)), vectors]:
                for h, v in batch.items():  # least recently used first: a later copy moves it to the end
                    merged.pop(h, None)
                    merged[h] = v
            if len(merged) > self.max_vectors:
                merged = _evicted(merged, self.max_vectors, vectors.keys() | keep())
            self._write(merged)
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


def _evicted(vectors: dict[str, np.ndarray], most: int, keep: Set[str]) -> dict[str, np.ndarray]:
    """`vectors` (least recently used first) without the oldest past `most`, never one named in `keep`."""
    excess = len(vectors) - most
    drop: set[str] = set()
    for h in vectors:
        if len(drop) == excess:
            break
        if h not in keep:
            drop.add(h)
    return {h: v for h, v in vectors.items() if h not in drop}


def _last_used(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # merged away by another process: read as empty anyway
        return 0.0


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
