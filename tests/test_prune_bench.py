"""`ctxkit bench prune` on small fixture files: both input forms, the pooled corpus, the JSON it prints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ctxkit.cli.main import main

FIXTURES = Path(__file__).parent / "fixtures" / "prune"


def _run(capsys, *args: str) -> dict:
    assert main(["bench", "prune", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_reads_a_shared_corpus_for_questions_without_documents(capsys):
    result = _run(capsys, "--questions", str(FIXTURES / "questions.jsonl"), "--documents",
                  str(FIXTURES / "corpus.jsonl"), "--budget", "0.25", "--lexical-only")
    for key in ("questions", "gold_recall", "answer_recall", "kept_token_ratio", "latency_ms_p50"):
        assert key in result, key
    assert result["questions"] == 6
    assert result["kept_token_ratio"] <= 0.25
    assert result["gold_recall"] >= 5 / 6
    assert result["mode"] == "shared corpus"  # it said "own documents"


def test_bench_with_inline_documents_hybrid_and_limit(capsys):
    result = _run(capsys, "--questions", str(FIXTURES / "questions_inline.jsonl"), "--budget", "0.2",
                  "--limit", "4", "--embed-precision", "float32")
    assert result["questions"] == 4 and result["dense"] is True and result["embed_precision"] == "float32"
    assert result["gold_recall"] == 1.0 and result["answer_recall"] == 1.0
    assert result["mode"] == "own documents"


def test_pool_tokens_grows_each_question_corpus_up_to_the_cap(capsys, tmp_path):
    corpus = [json.loads(line) for line in (FIXTURES / "corpus.jsonl").read_text().splitlines()]
    by_id = {d["id"]: d for d in corpus}
    questions = tmp_path / "questions.jsonl"
    with open(questions, "w") as f:
        for line in (FIXTURES / "questions.jsonl").read_text().splitlines():
            q = json.loads(line)
            f.write(json.dumps({**q, "documents": [by_id[g] for g in q["gold_documents"]]}) + "\n")
    own = _run(capsys, "--questions", str(questions), "--lexical-only")
    # 15%: at 10% of a 200-token pool (21 tokens) the 21-token answer passage no longer fits with the "…"
    # that marks the text cut before it, now that the marks count against the budget.
    pooled = _run(capsys, "--questions", str(questions), "--pool-tokens", "200", "--lexical-only", "--budget", "0.15")
    everything = _run(capsys, "--questions", str(questions), "--pool-all", "--lexical-only")
    assert own["corpus_tokens_max"] < 80
    assert 200 <= pooled["corpus_tokens_p50"] < 300, "the pool should stop once it passes the cap"
    assert pooled["corpus_tokens_p50"] < everything["corpus_tokens_p50"]
    assert pooled["gold_recall"] == 1.0


def test_bench_rejects_a_bad_budget(capsys):
    assert main(["bench", "prune", "--questions", str(FIXTURES / "questions.jsonl"), "--budget", "2"]) == 2


def test_the_embedding_cache_keeps_each_precision_apart(tmp_path):
    from ctxkit.bench.prune import DiskCachedEmbedder
    from ctxkit.embed import Embedder

    texts = ["The Normans gave their name to Normandy.", "a second, different passage"]
    plain, half = Embedder(precision="float32"), Embedder(precision="bfloat16")
    first = DiskCachedEmbedder(plain, tmp_path).embed(texts)
    second = DiskCachedEmbedder(half, tmp_path).embed(texts)  # same directory, other precision
    np.testing.assert_array_equal(first, plain.embed(texts))
    np.testing.assert_array_equal(second, half.embed(texts))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(DiskCachedEmbedder(plain, tmp_path).embed(texts), first)  # read back


def test_numbered_document_ids_and_a_gold_document_outside_the_window_are_scored_fairly(capsys, tmp_path):
    """Documents numbered {"id": 17} never matched the gold id "17" in --window-tokens (the window was built
    around document 0 and scored a miss), and a second gold document outside the window counted as a miss."""
    corpus = [json.loads(line) for line in (FIXTURES / "corpus.jsonl").read_text().splitlines()]
    numbered = [{"id": i, "text": d["text"]} for i, d in enumerate(corpus)]
    gold = next(json.loads(line) for line in (FIXTURES / "questions.jsonl").read_text().splitlines())
    position = next(i for i, d in enumerate(corpus) if d["id"] == gold["gold_documents"][0])
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": gold["question"], "documents": numbered,
                                     "gold_documents": [position, (position + len(corpus) // 2) % len(corpus)],
                                     "answers": gold.get("answers") or []}) + "\n")
    result = _run(capsys, "--questions", str(questions), "--window-tokens", "60", "--budget", "1.0",
                  "--lexical-only")
    assert result["gold_recall"] == 1.0 and result["gold_outside_corpus"] == 1


def test_a_question_without_documents_and_no_corpus_file_is_named(capsys, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Who?", "answers": ["Ann"]}) + "\n")
    assert main(["bench", "prune", "--questions", str(questions), "--json"]) == 2
    assert f"question '{questions}:1' has no documents" in capsys.readouterr().err


def test_a_gold_document_without_text_is_refused_naming_the_line(tmp_path, capsys):
    """An empty gold document can never be kept: it was scored as a miss (gold_recall 0.0), silently."""
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({"question": "q?", "gold_documents": ["a"],
                                "documents": [{"id": "a", "text": " "}, {"id": "b", "text": "words"}]}) + "\n")
    assert main(["bench", "prune", "--questions", str(path), "--lexical-only"]) == 2
    assert "questions.jsonl:1: gold_documents: ['a'] name documents" in capsys.readouterr().err


def test_documents_numbered_per_question_are_all_embedded_before_timing(tmp_path):
    """The warm-up embedded one text per document id: questions numbering their own documents 0, 1, 2 (a
    common shape of recorded RAG traffic) shared ids, so every question after the first embedded its
    documents inside the timed call, and latency_ms_p50 was 17 times the warm number."""
    from ctxkit.bench.prune import run
    from ctxkit.embed import Embedder
    from ctxkit.stages.pruning.documents import DocumentPruningStage, DocumentRanker

    class Counting:
        def __init__(self) -> None:
            self.inner, self.texts, self.timed = Embedder(), 0, False
            self.precision = self.inner.precision

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def embed(self, texts):
            self.texts += sum(not t.startswith("What is the code") for t in texts) if self.timed else 0
            return self.inner.embed(texts)

    questions, corpora = [], []
    for q in range(3):
        docs = [{"id": d, "text": f"Passage {d} of question {q}: the code of item {q * 10 + d} is Z{q * 10 + d}."}
                for d in range(3)]
        questions.append({"id": f"q{q}", "question": f"What is the code of item {q * 10 + 1}?",
                          "gold_documents": ["1"]})
        corpora.append(docs)
    embedder = Counting()
    ranker = DocumentRanker(embedder)
    original_warm = ranker.warm

    def warm(texts):
        original_warm(texts)
        embedder.timed = True

    ranker.warm = warm
    result = run(questions, corpora, DocumentPruningStage(budget_fraction=0.5, ranker=ranker, render=False))
    assert result["gold_recall"] == 1.0
    assert embedder.texts == 0  # only the questions are embedded once timing starts


def test_gold_ids_may_mix_numbers_and_strings_as_document_ids_do(capsys, tmp_path):
    """Documents may mix numbered and named ids; gold_documents [1, "x4"] was refused as "expected a list of
    strings" although [1] and ["x4"] were each accepted."""
    corpus, questions = tmp_path / "corpus.jsonl", tmp_path / "questions.jsonl"
    corpus.write_text(json.dumps({"id": 1, "text": "The Eiffel Tower was completed in 1889."}) + "\n"
                      + json.dumps({"id": "x4", "text": "It was built for the World's Fair in Paris."}) + "\n")
    questions.write_text(json.dumps({"id": "q", "question": "When was the Eiffel Tower completed?",
                                     "gold_documents": [1, "x4"]}) + "\n")
    assert main(["bench", "prune", "--questions", str(questions), "--documents", str(corpus), "--budget", "1",
                 "--lexical-only", "--json"]) in (0, None)
    assert json.loads(capsys.readouterr().out)["gold_recall"] == 1.0


def test_a_lone_surrogate_in_a_document_or_question_is_named_not_a_traceback(tmp_path, capsys):
    """A cut emoji ("\\ud83d" in an export) failed the embedding cache's UTF-8 encode: a UnicodeEncodeError traceback."""
    docs = [{"id": 1, "text": "Oslo is the capital \ud83d of Norway."}, {"id": 2, "text": "Paris is in France."}]
    for row, where in (({"question": "Capital of Norway?", "documents": docs, "answers": ["Oslo"]}, "documents[0].text"),
                       ({"question": "Capital \ud83d?", "documents": docs[1:], "answers": ["Paris"]}, "question")):
        path = tmp_path / "q.jsonl"
        path.write_text(json.dumps(row) + "\n")
        assert main(["bench", "prune", "--questions", str(path), "--json"]) == 2
        assert f"q.jsonl:1: {where}: holds a lone surrogate" in capsys.readouterr().err
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(json.dumps(docs[1]) + "\n" + json.dumps({"id": 3, "text": "cut \udc00"}) + "\n")
    path.write_text(json.dumps({"question": "Where is Paris?", "answers": ["France"]}) + "\n")
    assert main(["bench", "prune", "--questions", str(path), "--documents", str(corpus), "--json"]) == 2
    assert "docs.jsonl:2: document[0].text: holds a lone surrogate" in capsys.readouterr().err


def test_ranking_weights_outside_zero_to_one_are_refused(capsys):
    """--lexical-weight nan ranked arbitrarily and printed "lexical": NaN, which no JSON parser reads."""
    import pytest

    for flag, value in (("--lexical-weight", "nan"), ("--document-weight", "-0.5"), ("--lexical-weight", "2")):
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "prune", "--questions", str(FIXTURES / "questions_inline.jsonl"), flag, value, "--json"])
        assert exit_.value.code == 2
        assert f"argument {flag}: must be between 0 and 1" in capsys.readouterr().err


def test_a_split_that_leaves_no_question_is_named(tmp_path, capsys):
    """--split odd on a one-question file raised a ValueError traceback (int of the median of nothing)."""
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "Who?", "documents": [{"id": 1, "text": "Ann."}], "answers": ["Ann"]}) + "\n")
    assert main(["bench", "prune", "--questions", str(path), "--split", "odd", "--lexical-only", "--json"]) == 2
    assert "q.jsonl: --split odd leaves none of its 1 question(s)" in capsys.readouterr().err
    assert _run(capsys, "--questions", str(path), "--split", "even", "--lexical-only")["questions"] == 1
