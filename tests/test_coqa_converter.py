"""examples/coqa_to_memory_bench.py: CoQA's own format becomes `ctxkit bench memory` input, asked at a chosen turn."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ctxkit.bench.memory import load_conversations

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "fixtures" / "memory" / "coqa_sample.json"


def _convert(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "coqa_to_memory_bench.py"), "--coqa", str(SAMPLE),
                           "--out", str(out), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_the_last_turn_asks_the_last_question_after_all_the_earlier_ones_answered(tmp_path):
    rows = _convert(tmp_path, "--turn", "last")
    # story 2's last answer is "no" with no span in the story: a kept sentence cannot show it, so it is left out
    assert [row["id"] for row in rows] == ["coqa-s1-t4"]
    messages = rows[0]["messages"]
    assert messages[0]["content"].endswith("Her notes were published in a journal.")
    assert [m["content"] for m in messages[2:]] == ["Who wrote the first program?", "Ada Lovelace", "When?", "1843",
                                                    "With whom did she work?", "Charles Babbage",
                                                    "Were her notes published?"]
    assert rows[0]["answers"] == ["Her notes were published"], "the span, not the yes/no the story cannot show"
    assert load_conversations(tmp_path / "out.jsonl"), "the benchmark reads what the converter writes"


def test_a_middle_turn_is_from_the_second_half_and_an_excluded_conversation_is_not_repeated(tmp_path):
    rows = _convert(tmp_path, "--turn", "middle")
    # from the middle of the chain to the question before the last one (the last is the development set's)
    assert [row["id"] for row in rows] in (["coqa-s1-t2", "coqa-s2-t1"], ["coqa-s1-t3", "coqa-s2-t1"])
    for row in rows:
        turn = int(row["id"].rsplit("-t", 1)[1])
        assert sum(m["role"] == "user" for m in row["messages"]) == turn + 1, "the story, then one message a question"
        assert row["messages"][-1]["role"] == "user" and row["answers"]
    (tmp_path / "dev.jsonl").write_text((tmp_path / "out.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    again = _convert(tmp_path, "--turn", "middle", "--exclude", str(tmp_path / "dev.jsonl"))
    assert [row["id"] for row in again if row["id"] == rows[0]["id"]] == [], "an excluded conversation came back"
