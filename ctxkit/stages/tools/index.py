"""The tool index: dense MiniLM vectors in FAISS plus BM25 over split identifiers, fused into one score.

Dense retrieval knows that "how much is 500 USD in CAD" is about currency conversion; lexical matching
knows that `get_current_weather` is about the current weather and that a query naming `numOfPlayers`
wants the tool with that parameter. On the BFCL-derived set in ../shared/data/tools (716 tools), recall@5
is 0.82 for dense alone, 0.87 for lexical alone, 0.89 fused, 0.91 with the selector's per-sentence
query parts, 0.92 with its task grouping (`ctxkit bench tools`). Retuning the fusion does not move it:
over dense_weight 0.5-0.7, lexical_floor 0.8-1.8, coverage_decay 0.6-0.8 and BM25F field weights,
recall@5 stays within 0.903-0.928; nor do separate dense vectors for name+description and parameters.

Persistence: vectors are stored per tool (keyed by a hash of its schema) in a VectorStore per embedding
model and precision, so a catalog that gains or loses a tool embeds only the new tool; the catalog's
vectors, ids and tool hashes are saved together in one file, in a folder named by the hash of the whole
catalog, so a process that sees the same catalog again loads it instead of rebuilding. The FAISS index
and the lexical index are rebuilt from it in memory (milliseconds). Within a process, the indexes of one
stage also share the vectors they have (VectorMemo), with or without a directory.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...embed import DEFAULT_MODEL_ID, embedding_fingerprint, vectors_id
from ...errors import ConfigurationError, InvalidToolError
from ...forking import renew_after_fork
from ...lru import LRUMemo
from ...temp_files import remove_stale
from .lexical import LexicalIndex
from .text import ToolDocument
from .vectors import VectorMemo, VectorStore

DOCUMENT_MEMO_SIZE = 50_000  # tool documents a stage keeps for its pools, as VectorMemo keeps vectors

Tool = dict[str, Any]
INDEX_FILE = "index.npz"
# Saved catalog versions kept per embedding model: every add or remove of a tool saves a version of its own,
# and a catalog that changes all day (MCP servers coming and going) filled the disk with full copies.
KEEP_CATALOGS = 8
# A tool named in the request as the identifier it is ("use get_current_time", "call sculptor_info.get"): one
# with an underscore, a dot or a camelCase hump, so a tool named by an ordinary word ("derivative") is not.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:[.-][A-Za-z_][A-Za-z0-9_]*)*")
_LOOKS_LIKE_IDENTIFIER = re.compile(r"[_.-]|[a-z0-9][A-Z]")
logger = logging.getLogger("ctxkit")


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """How dense and lexical scores combine. Defaults calibrated on the even half of the BFCL-derived
    queries in ../shared/data/tools and checked on the odd half (`ctxkit bench tools` reports both).

    dense_weight:       weight of the dense cosine; the lexical score gets the rest.
    lexical_floor:      BM25 is divided by max(best BM25 for this query part, floor), the floor counted in
                        perfect matches of one rare term: a part that matches nothing well (a greeting,
                        "can you help me with a few things?") must not get full lexical confidence.
    coverage_decay:     once a query part's best tool is chosen, that part's scores are multiplied by this
                        for later picks, so a request with three tasks gets a tool for each before
                        a second near-duplicate for the first.
    candidates:         how many tools each retriever proposes per query part before fusion.
    """

    dense_weight: float = 0.6
    lexical_floor: float = 1.2
    coverage_decay: float = 0.8
    candidates: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= self.dense_weight <= 1.0:
            raise ConfigurationError(f"dense_weight must be in [0, 1], got {self.dense_weight}")
        if not 0.0 < self.coverage_decay <= 1.0:
            raise ConfigurationError(f"coverage_decay must be in (0, 1], got {self.coverage_decay}")
        if self.candidates < 1:
            raise ConfigurationError(f"candidates must be positive, got {self.candidates}")


def tool_hash(tool: Tool) -> str:
    """A stable hash of one tool schema (key order and whitespace do not matter)."""
    canonical = json.dumps(tool, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def catalog_hash(tools: Iterable[Tool]) -> str:
    """A hash of a whole catalog, order included (the order is the order tools are sent in)."""
    return _hash_of_hashes(tool_hash(tool) for tool in tools)


def _hash_of_hashes(hashes: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for h in hashes:
        digest.update(h.encode())
    return digest.hexdigest()[:20]


def tool_name(tool: Tool, index: int = 0) -> str:
    function = tool.get("function") if isinstance(tool, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise InvalidToolError("a tool needs function.name", index, "function.name")
    return name


class ToolIndex:
    """A searchable catalog. Thread-safe; `add` and `remove` update it in place."""

    def __init__(
        self,
        tools: Sequence[Tool],
        embedder: Any,
        *,
        directory: str | Path | None = None,
        model_id: str | None = None,
        fusion: FusionConfig | None = None,
        query_cache_size: int = 512,
        vector_memo: VectorMemo | None = None,
        save_index: bool = True,
        document_memo: LRUMemo[str, ToolDocument] | None = None,
    ) -> None:
        """embedder: a `ctxkit.embed.Embedder` (anything with `embed(texts) -> (n, d) float32 unit vectors`).
        directory: where vectors and saved indexes persist; None keeps everything in memory.
        model_id: names the stored vectors; default: the embedder's `model_id` (all-MiniLM-L6-v2).
        vector_memo: tool vectors shared with other indexes of this process (see VectorMemo).
        save_index: also save this catalog's index (a copy of all its vectors) under `directory`; False for
        pools that come and go, whose tools' vectors are stored anyway and which would each leave a copy."""
        self.embedder = embedder
        self.model_id: str = model_id or str(getattr(embedder, "model_id", DEFAULT_MODEL_ID))
        self.fusion = fusion or FusionConfig()
        stored_as = vectors_id(self.model_id, getattr(embedder, "precision", None))
        if self.dimension != 384 and self.model_id == DEFAULT_MODEL_ID:
            # An embedder that does not name its model is filed under MiniLM's: another dimension must not
            # share MiniLM's folder (its stored vectors would be stacked with these, and the build fails). One
            # that names its model keeps its own folder: renamed, its stored vectors were all embedded again.
            stored_as = f"{stored_as}-{self.dimension}d"
        elif model_id is None and self.model_id != DEFAULT_MODEL_ID:
            # A model loaded from a path is named by its folder ("final", "model", "checkpoint"): two models
            # in folders of one name, or one retrained in place, shared one store, and the second ranked
            # its queries against the first's tool vectors. What the model embeds tells them apart.
            stored_as = f"{stored_as}-{embedding_fingerprint(embedder)}"
        self._root = Path(directory) / _safe(stored_as) if directory is not None else None
        self._store = VectorStore(self._root / "vectors") if self._root is not None else None
        self._memo = vector_memo if vector_memo is not None else VectorMemo()
        self._space = stored_as
        self._lock = threading.RLock()
        renew_after_fork(self, ToolIndex._after_fork_in_child)
        self._query_cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._query_cache_size = query_cache_size
        self._tools: list[Tool] = []
        self._names: list[str] = []
        self._hashes: list[str] = []
        self._ids: list[int] = []
        self._position: dict[str, int] = {}
        self._next_id = 0
        self._faiss: Any = None
        self._vectors = np.zeros((0, 0), dtype=np.float32)
        self._documents: dict[str, ToolDocument] = {}  # by tool hash: the catalog's stemmed terms, kept
        # Tool documents (split, stemmed terms) by tool hash, shared with the other indexes of a stage.
        self._document_memo = document_memo if document_memo is not None else LRUMemo(DOCUMENT_MEMO_SIZE)
        self.loaded_from_disk = False
        self._on_disk: str | None = None  # the catalog hash whose saved index matches this one
        self._save = save_index
        self.embedded_tools = 0  # how many tool schemas this index had to embed (0 when all were stored)
        self._build(list(tools))

    def _after_fork_in_child(self) -> None:
        """In a forked child (gunicorn --preload, multiprocessing's fork): an add of the parent's held the lock while
        it embedded the new tools, and a search while it embedded the query: held for ever here."""
        self._lock = threading.RLock()

    # -- the catalog --------------------------------------------------------------------------------
    @property
    def tools(self) -> list[Tool]:
        return list(self._tools)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def catalog_hash(self) -> str:
        return _hash_of_hashes(self._hashes)

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def actions(self) -> frozenset[str]:
        """Stemmed verbs the tools' descriptions open with ("Send an email", "Calculate the area"): the
        words that start a command in a request to this catalog."""
        return self._actions

    def __contains__(self, name: object) -> bool:
        return name in self._position

    def position(self, name: str) -> int:
        """The tool's place in catalog order."""
        return self._position[name]

    def name_at(self, position: int) -> str:
        return self._names[position]

    def tool(self, name: str) -> Tool:
        return self._tools[self._position[name]]

    def add(self, tools: Sequence[Tool]) -> None:
        """Append tools, embedding only schemas never seen before. A tool whose name is already in the
        catalog replaces that tool in its place (catalog order is send order: keep it stable)."""
        tools = list(tools)
        with self._lock:
            # Everything that can fail (a bad or duplicate name, the embedder) happens before the catalog
            # changes: a failed add leaves the index as it was.
            names = _unique_names(tools)
            vectors = self._vectors_for(tools)
            order = self._names + [n for n in names if n not in self._position]
            self._remove([n for n in names if n in self._position])
            self._insert(tools, names, vectors)
            self._reorder(order)
            self._refresh()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[ToolIndex]:
        """Hold the catalog still while several reads must agree (scores, then the names at their
        positions): a concurrent `add` or `remove` waits until the block ends."""
        with self._lock:
            yield self

    def remove(self, names: Iterable[str]) -> None:
        """Drop tools by name; names not in the catalog are ignored."""
        with self._lock:
            self._remove([n for n in names if n in self._position])
            self._refresh()

    # -- search -------------------------------------------------------------------------------------
    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Query vectors, remembered: an agent loop asks about the same user message at every step."""
        with self._lock:
            known = {t: self._query_cache[t] for t in texts if t in self._query_cache}
            for text in known:
                self._query_cache.move_to_end(text)
        missing = [t for t in dict.fromkeys(texts) if t not in known]
        if missing:
            known.update(zip(missing, self.embedder.embed(missing), strict=False))
            with self._lock:
                for text in missing:
                    self._query_cache[text] = known[text]
                while len(self._query_cache) > self._query_cache_size:
                    self._query_cache.popitem(last=False)
        if not texts:
            return np.zeros((0, self.dimension), np.float32)
        return np.stack([known[t] for t in texts]).astype(np.float32)

    @property
    def dimension(self) -> int:
        return int(getattr(self.embedder, "dimension", 384))

    def score(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Fused scores of candidate tools for each query part.

        Returns (candidates, scores): catalog positions of the tools either retriever proposed for any
        part, and a (parts, candidates) matrix of fused scores. Tools outside the candidates are not
        considered at all: that is what keeps a catalog of thousands fast. A tool whose exact name a part
        writes out as an identifier ("use get_current_time", "call museum.get_hours") is a candidate and
        scores 1.0, the most fusion gives: the user chose it over its near-twins, which rank as high on meaning.
        """
        fusion = self.fusion
        with self._lock:
            if not self._tools or not texts:
                return np.zeros(0, np.int64), np.zeros((len(texts), 0), np.float32)
            queries = self.embed_queries(texts)
            n = min(fusion.candidates, len(self._tools))
            _, dense_ids = self._faiss.search(queries, n)
            lexical = np.stack([self._lexical.scores(t) for t in texts])
            lexical_top = np.argpartition(-lexical, n - 1, axis=1)[:, :n] if n < len(self._tools) else None
            positions = {self._id_position[int(i)] for i in dense_ids.ravel() if i >= 0}
            named = [self._named_in(t) for t in texts]
            positions.update(p for found in named for p in found)
            if lexical_top is None:
                positions = set(range(len(self._tools)))
            else:
                rows, cols = np.nonzero(lexical[np.arange(len(texts))[:, None], lexical_top] > 0)
                positions.update(int(lexical_top[r, c]) for r, c in zip(rows, cols, strict=False))
            candidates = np.array(sorted(positions), dtype=np.int64)
            dense = queries @ self._vectors[candidates].T
            best = lexical.max(axis=1, keepdims=True)
            lexical_c = lexical[:, candidates] / np.maximum(best, fusion.lexical_floor * self._perfect_match)
            scores = fusion.dense_weight * dense + (1 - fusion.dense_weight) * lexical_c
            column = {int(p): c for c, p in enumerate(candidates)}
            for row, found in enumerate(named):
                for position in found:
                    # The user named it: a perfect match for this part (fused scores are at most 1).
                    scores[row, column[position]] = max(float(scores[row, column[position]]), 1.0)
            return candidates, scores.astype(np.float32)

    def _named_in(self, text: str) -> set[int]:
        """Positions of the tools whose exact name the text writes out as an identifier."""
        return {self._position[word] for word in _IDENTIFIER.findall(text)
                if word in self._position and _LOOKS_LIKE_IDENTIFIER.search(word)}

    def search(self, text: str, k: int) -> list[str]:
        """The k best tool names for one query text, best first."""
        with self._lock:
            candidates, scores = self.score([text])
            order = np.argsort(-scores[0], kind="stable")[:k]
            return [self._names[int(candidates[i])] for i in order]

    # -- building and persistence -------------------------------------------------------------------
    def _build(self, tools: list[Tool]) -> None:
        import faiss

        self._faiss = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimension))
        if self._root is not None and self._load(tools):
            self.loaded_from_disk = True
        else:
            self._append(tools)
        self._refresh()

    def _append(self, tools: list[Tool]) -> None:
        names = _unique_names(tools)
        self._insert(tools, names, self._vectors_for(tools))

    def _vectors_for(self, tools: list[Tool]) -> np.ndarray:
        """The tools' vectors, embedding only schemas never stored before (and storing those)."""
        hashes = [tool_hash(t) for t in tools]
        found = self._memo.get(self._space, hashes)
        if len(found) < len(hashes):  # only then is the vector store read
            stored = self._store.read(used=set(hashes) - found.keys()) if self._store is not None else {}
            found.update({h: stored[h] for h in hashes  # a vector of another shape is another model's: re-embed
                          if h in stored and h not in found and stored[h].shape == (self.dimension,)})
            missing = list(dict.fromkeys(h for h in hashes if h not in found))
            if missing:
                schemas = {h: t for h, t in zip(hashes, tools, strict=True)}
                fresh = self.embedder.embed([ToolDocument.from_tool(schemas[h]).dense_text() for h in missing])
                self.embedded_tools += len(missing)
                found.update(zip(missing, fresh, strict=True))
                if self._store is not None:
                    try:
                        self._store.append(dict(zip(missing, fresh, strict=True)),
                                           keep=lambda: {*hashes, *self._hashes, *self._saved_hashes()})
                    except OSError as exc:  # a read-only or full directory: the vectors serve this process anyway
                        logger.warning("tool vectors not stored in %s (%s); they are embedded again by the next "
                                       "process", self._store.folder, exc)
            self._memo.put(self._space, {h: found[h] for h in hashes})
        if not tools:
            return np.zeros((0, self.dimension), np.float32)
        return np.stack([found[h] for h in hashes]).astype(np.float32)

    def _insert(self, tools: list[Tool], names: list[str], vectors: np.ndarray) -> None:
        """Append checked tools (unique names, none in the catalog) with their vectors."""
        if not tools:
            return
        ids = np.arange(self._next_id, self._next_id + len(tools), dtype=np.int64)
        self._next_id += len(tools)
        self._faiss.add_with_ids(vectors, ids)
        self._tools.extend(tools)
        self._names.extend(names)
        self._hashes.extend(tool_hash(t) for t in tools)
        self._ids.extend(int(i) for i in ids)
        self._vectors = vectors if self._vectors.size == 0 else np.vstack([self._vectors, vectors])
        self._reindex()

    def _remove(self, names: list[str]) -> None:
        if not names:
            return
        drop = {self._position[n] for n in names}
        self._faiss.remove_ids(np.array([self._ids[p] for p in sorted(drop)], dtype=np.int64))
        keep = [p for p in range(len(self._tools)) if p not in drop]
        self._tools = [self._tools[p] for p in keep]
        self._names = [self._names[p] for p in keep]
        self._hashes = [self._hashes[p] for p in keep]
        self._ids = [self._ids[p] for p in keep]
        self._vectors = self._vectors[keep] if keep else np.zeros((0, self.dimension), np.float32)
        self._reindex()

    def _reorder(self, names: list[str]) -> None:
        self._reindex()
        permutation = [self._position[n] for n in names]
        self._tools = [self._tools[p] for p in permutation]
        self._names = [self._names[p] for p in permutation]
        self._hashes = [self._hashes[p] for p in permutation]
        self._ids = [self._ids[p] for p in permutation]
        self._vectors = self._vectors[permutation] if permutation else self._vectors
        self._reindex()

    def _reindex(self) -> None:
        self._position = {name: i for i, name in enumerate(self._names)}
        self._id_position = {tool_id: i for i, tool_id in enumerate(self._ids)}

    def _refresh(self) -> None:
        self._reindex()
        known = self._documents
        # Stemming a schema's words is most of building an index: a pool that differs by one tool from one
        # this stage already indexed (a per-user tool, a proxy's tenants past max_indexes) stems only that tool.
        shared = self._document_memo.get([h for h in self._hashes if h not in known])
        self._documents = {h: known.get(h) or shared.get(h) or ToolDocument.from_tool(t)
                           for h, t in zip(self._hashes, self._tools, strict=True)}
        self._document_memo.put(self._documents)
        documents = [self._documents[h] for h in self._hashes]
        self._lexical = LexicalIndex(documents)
        self._actions = frozenset(d.action for d in documents if d.action)
        # BM25 of one rare term matched with a saturated frequency: the unit of FusionConfig.lexical_floor.
        n = max(len(self._tools), 1)
        self._perfect_match = math.log(1 + (n - 0.5) / 1.5) * (self._lexical.k1 + 1)
        self._save_index()

    def _catalog_dir(self) -> Path | None:
        return self._root / self.catalog_hash if self._root is not None else None

    def _saved_hashes(self) -> set[str]:
        """The tools of the catalog versions saved under this model's folder: their vectors stay stored."""
        assert self._root is not None
        saved: set[str] = set()
        for path in self._root.glob(f"*/{INDEX_FILE}"):
            with contextlib.suppress(Exception), np.load(path) as data:  # unreadable: rebuilt when next used
                saved.update(data["hashes"].tolist())
        return saved

    def _load(self, tools: list[Tool]) -> bool:
        import faiss

        assert self._root is not None
        try:
            with np.load(self._root / catalog_hash(tools) / INDEX_FILE) as saved:
                hashes, ids, vectors = saved["hashes"].tolist(), saved["ids"].astype(np.int64), saved["vectors"]
        except Exception:  # noqa: BLE001 - absent or unreadable (OSError, BadZipFile, EOFError, ...): rebuild
            return False
        expected = [tool_hash(t) for t in tools]
        if hashes != expected or ids.shape != (len(tools),) or vectors.shape != (len(tools), self.dimension):
            return False
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimension))
        if len(tools):
            index.add_with_ids(vectors.astype(np.float32), ids)
        self._faiss = index
        self._tools = list(tools)
        self._names = [tool_name(t, i) for i, t in enumerate(tools)]
        self._hashes = expected
        self._ids = [int(i) for i in ids]
        self._next_id = max(self._ids, default=-1) + 1
        self._vectors = vectors.astype(np.float32)
        self._on_disk = catalog_hash(tools)
        with contextlib.suppress(OSError):  # used now: the sweep keeps the most recently used versions
            os.utime(self._root / self._on_disk / INDEX_FILE)
        return True

    def _save_index(self) -> None:
        """The catalog's vectors, their ids and the tools' hashes, in one file written atomically: a
        reader sees a whole index or none, even with several processes saving the same catalog (a flat
        FAISS index is rebuilt from the vectors in about a millisecond)."""
        folder = self._catalog_dir()
        if folder is None or not self._save or self.catalog_hash == self._on_disk:
            return
        tmp = folder / f"index.{uuid.uuid4().hex}.tmp.npz"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale(folder, "index.*.tmp.npz")
            np.savez(tmp, hashes=np.array(self._hashes, dtype=str), ids=np.array(self._ids, dtype=np.int64),
                     vectors=self._vectors.astype(np.float32))
            os.replace(tmp, folder / INDEX_FILE)
            self._sweep_catalogs(keep=folder)
        except OSError as exc:  # a read-only or full directory: the index in memory serves this process
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            logger.warning("tool index not saved in %s (%s); the next process builds it again", folder, exc)
        self._on_disk = self.catalog_hash  # tried once per catalog version, not on every call

    def _sweep_catalogs(self, keep: Path) -> None:
        """Remove all but the KEEP_CATALOGS most recently used catalog versions (a load marks its version used).
        A process still on an older version has it in memory; the next one to need it rebuilds it from the
        stored vectors, which are kept, without embedding anything."""
        assert self._root is not None
        folders = [f for f in self._root.iterdir() if f != keep and f.is_dir()]
        for folder in folders:
            if not (folder / INDEX_FILE).exists() and remove_stale(folder, "index.*.tmp.npz"):
                # A version whose first save was killed: only its temporary file, which no later save of that
                # version (it may never come again) would clear.
                with contextlib.suppress(OSError):
                    folder.rmdir()
        saved = [(f / INDEX_FILE, f) for f in folders if (f / INDEX_FILE).is_file()]
        if len(saved) < KEEP_CATALOGS:
            return
        saved.sort(key=lambda pair: _last_used(pair[0]), reverse=True)
        for _, folder in saved[KEEP_CATALOGS - 1:]:
            shutil.rmtree(folder, ignore_errors=True)


def _last_used(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile by another process's sweep
        return 0.0


def _unique_names(tools: Sequence[Tool]) -> list[str]:
    """The tools' names; a missing or repeated one is an InvalidToolError that names its place."""
    names = [tool_name(t, i) for i, t in enumerate(tools)]
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise InvalidToolError(f"duplicate tool name {name!r} in the catalog", i, "function.name")
        seen.add(name)
    return names


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
