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


def test_bench_with_inline_documents_hybrid_and_limit(capsys):
    result = _run(capsys, "--questions", str(FIXTURES / "questions_inline.jsonl"), "--budget", "0.2",
                  "--limit", "4", "--embed-precision", "float32")
    assert result["questions"] == 4 and result["dense"] is True and result["embed_precision"] == "float32"
    assert result["gold_recall"] == 1.0 and result["answer_recall"] == 1.0


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
