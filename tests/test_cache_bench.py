"""The disfluent and added-detail trap sets through the stage (real MiniLM, real LocalStore), the gaps they
document, and the index-only scale run of `ctxkit bench cache --scale N --index-only` on a small N."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctxkit.request import ChatRequest
from ctxkit.response import ChatResponse, Usage
from ctxkit.stages.cache.disfluency import repair
from ctxkit.stages.cache.guards import Thresholds, judge
from ctxkit.stages.cache.local_store import LocalStore
from ctxkit.stages.cache.stage import SemanticCacheStage

FIXTURES = Path(__file__).parent / "fixtures" / "cache"
PARAMS = {"temperature": 0}
# A known false hit, not a disfluency gap: "or uh" between two options reads as a correction in Disfl-QA
# ("1882 or uh 1564"), so "tea or uh coffee" is taken for "coffee" (see the xfail below).
KNOWN_GAPS = {"disfluent-027"}
# Paraphrases the guards still refuse (a miss costs one backend call, never a wrong answer): an added
# detail below the added-detail threshold ("the abbreviation HTTP", "the Louvre museum located", "at sea
# level"), "year" read as a unit against "when", "painted"/"painter", "world"/"Earth", "go about".
KNOWN_PARAPHRASE_MISSES = {"paraphrase-005", "paraphrase-007", "paraphrase-008", "paraphrase-010",
                           "paraphrase-011", "paraphrase-012", "paraphrase-013", "paraphrase-holdout-003",
                           "paraphrase-holdout-004", "paraphrase-holdout-005"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _false_hits_and_misses(tmp_path: Path, embedder, fixture: str) -> tuple[list[str], list[str]]:
    """Store `a` of each pair in a namespace of its own, look up `b` through the stage."""
    store = LocalStore(tmp_path / "cache")
    stage = SemanticCacheStage(store, embedder)
    false_hits, misses = [], []
    for i, line in enumerate((FIXTURES / fixture).read_text().splitlines()):
        pair = json.loads(line)
        a = ChatRequest(messages=pair["a"], params=PARAMS, namespace=f"d-{i}")
        b = ChatRequest(messages=pair["b"], params=PARAMS, namespace=f"d-{i}")
        stage.remember(a, ChatResponse(message={"role": "assistant", "content": f"answer {i}"}, finish_reason="stop",
                                       usage=Usage(20, 5), model="m", backend="test"))
        hit = stage.lookup(b).response is not None
        if hit and not pair["same_answer"]:
            false_hits.append(pair["id"])
        if not hit and pair["same_answer"]:
            misses.append(pair["id"])
    store.close()
    return false_hits, misses


def test_disfluent_trap_fixture_hits_what_was_meant_and_misses_what_was_taken_back(tmp_path, embedder):
    false_hits, misses = _false_hits_and_misses(tmp_path, embedder, "traps_disfluent.jsonl")
    assert [h for h in false_hits if h not in KNOWN_GAPS] == [], f"false hits on disfluent traps: {false_hits}"
    assert misses == [], f"self-corrections not recognized: {misses}"


@pytest.mark.parametrize("fixture", ["traps_qualifier.jsonl", "traps_qualifier_holdout.jsonl"])
def test_a_question_that_adds_a_detail_misses_and_paraphrases_that_add_words_still_hit(tmp_path, embedder, fixture):
    """"express shipping" is not "shipping", "the capital city of Austria" is "the capital of Austria".
    Without the added-detail rule 18 of the first set's 20 traps hit; the holdout was written after the
    rule was frozen (9 of its 10 traps hit without it, none with it)."""
    false_hits, misses = _false_hits_and_misses(tmp_path, embedder, fixture)
    assert false_hits == [], f"a question with an added detail hit the general one: {false_hits}"
    assert set(misses) <= KNOWN_PARAPHRASE_MISSES, f"paraphrases newly refused: {set(misses) - KNOWN_PARAPHRASE_MISSES}"


@pytest.mark.xfail(strict=True, reason="alternatives ('tea or coffee') are not yet told from one option")
def test_a_question_offering_alternatives_does_not_hit_one_about_a_single_option():
    spoken = "Do you serve tea or uh coffee?"
    assert judge(repair(spoken), "", "Do you serve coffee?", "", 0.99, None, Thresholds(), query_raw=spoken)


def test_index_only_scale_run_reports_latency_memory_and_hnsw_agreement():
    from ctxkit.bench.cache import run_index_scale

    flat = run_index_scale(3000, index="flat", queries=5)
    hnsw = run_index_scale(3000, index="hnsw", queries=5)
    assert flat["entries"] == hnsw["entries"] == 3000
    assert flat["search_ms_p50"] > 0 and flat["rss_mb_added"] >= 0 and flat["vector_mb"] == pytest.approx(4.4, 0.1)
    assert hnsw["top1_agrees_with_exact"] >= 0.8  # efSearch 64 finds the true nearest neighbour
    assert flat["paraphrase_found"] == 1.0 and hnsw["paraphrase_found"] >= 0.9
    assert "synthetic" in hnsw["vectors"]


def test_the_sweep_at_the_default_threshold_agrees_with_the_stage_on_pairs_it_can_never_match():
    """The sweep judged every pair by the question guards alone: a pair the stage keeps apart (another user's
    name, so another scope) counted as a false hit at every threshold, and the guarded row at the default
    threshold disagreed with the run it was printed beside."""
    from ctxkit.bench.cache import run_pairs

    pairs = [{"id": "names", "category": "names", "same_answer": False,
              "a": [{"role": "user", "name": "alice", "content": "What is my account balance?"}],
              "b": [{"role": "user", "name": "bob", "content": "What is my account balance?"}]},
             {"id": "same", "category": "same", "same_answer": True,
              "a": [{"role": "user", "content": "How do I reset my password?"}],
              "b": [{"role": "user", "content": "How can I reset my password?"}]}]
    result = run_pairs(pairs, sweep=True)
    row = next(r for r in result["sweep"] if r["guards"] and r["similarity"] == result["thresholds"]["similarity"])
    assert (row["false_hits"], row["recall"]) == (result["false_hits"], result["recall"]) == (0, 1.0)
