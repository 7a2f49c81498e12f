"""Turn CoQA conversations into `ctxkit bench memory` input, asked at a turn of your choice.

    pip download bigbench==1.0.0 --no-deps --no-binary :all: && tar xzf bigbench-1.0.0.tar.gz \\
        bigbench-1.0.0/bigbench/benchmark_tasks/coqa_conversational_question_answering
    python examples/coqa_to_memory_bench.py \\
        --coqa bigbench-1.0.0/bigbench/benchmark_tasks/coqa_conversational_question_answering/coqa.test.json \\
        --turn middle --exclude ../shared/data/memory/conversations.jsonl --out coqa_middle.jsonl
    ctxkit bench memory --conversations coqa_middle.jsonl --budget 0.25 --json

The development set in ../shared/data/memory asks each story's last question after all the earlier ones.
`--turn middle` asks one question from the second half of the chain instead (a different question of the
same story: the summarizer was never tuned on it), `--turn last` rebuilds the development shape. Stories
in `--exclude` that are asked at the same turn there are skipped, so the output never repeats one of its
conversations.

Shape: the story is the first user message (after a line asking to read it), the assistant acknowledges,
earlier questions and CoQA's answers alternate, and the last user message is the question. Its answers are
the answer's span in the story and the short answer when the story contains it (yes/no/unknown are left
out: they are no span of the story, so a kept story sentence cannot show them).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

INTRO = "Please read this text; I will ask questions about it.\n\n"
ACKNOWLEDGED = "I have read it. Ask away."


def answers_in_story(story: str, answer: dict[str, Any]) -> list[str]:
    """The answer strings a kept part of the story can show: its span, and its short form when the story has it."""
    found: list[str] = []
    for text in (answer.get("span_text", ""), answer.get("input_text", "")):
        text = text.strip().strip(".").strip()
        if text and text.lower() not in ("yes", "no", "unknown") and text.lower() in story.lower() and text not in found:
            found.append(text)
    return found


def conversation(story: dict[str, Any], turn: int) -> dict[str, Any] | None:
    """Question `turn` (1-based) of a story, with the turns before it answered; None when it has no answer span."""
    answers = answers_in_story(story["story"], story["answers"][turn - 1])
    if not answers:
        return None
    messages = [{"role": "user", "content": INTRO + story["story"]}, {"role": "assistant", "content": ACKNOWLEDGED}]
    for question, answer in zip(story["questions"][: turn - 1], story["answers"][: turn - 1], strict=True):
        messages += [{"role": "user", "content": question["input_text"]},
                     {"role": "assistant", "content": answer["input_text"]}]
    messages.append({"role": "user", "content": story["questions"][turn - 1]["input_text"]})
    return {"id": f"coqa-{story['id']}-t{turn}", "messages": messages, "answers": answers}


def excluded(path: Path | None) -> set[tuple[str, int]]:
    """(story text, number of questions asked) of every conversation in an existing memory set."""
    if path is None:
        return set()
    out = set()
    for line in path.open(encoding="utf-8"):  # not splitlines(): a story may hold U+2028, which JSON leaves as is
        if not line.strip():
            continue
        row = json.loads(line)
        story = row["messages"][0]["content"].removeprefix(INTRO).strip()
        out.add((story, sum(m["role"] == "user" for m in row["messages"]) - 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coqa", type=Path, required=True, help="CoQA JSON (bigbench's coqa.test.json)")
    parser.add_argument("--turn", choices=("last", "middle"), default="middle")
    parser.add_argument("--exclude", type=Path, help="a memory set whose conversations must not be repeated")
    parser.add_argument("--limit", type=int, help="at most this many conversations (a seeded sample)")
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    seen = excluded(args.exclude)
    rows = []
    for story in json.loads(args.coqa.read_text(encoding="utf-8"))["data"]:
        n = len(story["questions"])
        turns = [n] if args.turn == "last" else rng.sample(range(math.ceil(n / 2), n), n - math.ceil(n / 2))
        for turn in turns:  # the first of them whose answer is a span of the story
            row = conversation(story, turn)
            if row is not None and (story["story"].strip(), turn) not in seen:
                rows.append(row)
                break
    if args.limit is not None and len(rows) > args.limit:
        rows = rng.sample(rows, args.limit)
    args.out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"{len(rows)} conversations -> {args.out}")


if __name__ == "__main__":
    main()
