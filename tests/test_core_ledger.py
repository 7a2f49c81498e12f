"""The ledger file: concurrent appends from many processes lose and tear nothing; reads are strict."""

from __future__ import annotations

import json
import multiprocessing
import time

import pytest

from ctxkit import Ledger, LedgerError, LedgerRecord, read_ledger

WRITERS, RECORDS_EACH = 4, 150


def make_record(writer: int, n: int) -> LedgerRecord:
    # ~6 KB per line: larger than PIPE_BUF, so only the lock keeps lines whole
    return LedgerRecord(
        id=f"w{writer}-{n}", ts=time.time(), backend="test", model="m", namespace="ns", conversation_id=None,
        stream=False, tokens_naive=100, tokens_sent=60, tokens_out=5, saved_by_stage={"a": 30, "b": 10},
        events=[{"stage": "a", "kind": "pad", "text": "x" * 6000}],
    )


def _writer(path: str, writer: int) -> None:
    ledger = Ledger(path)
    for n in range(RECORDS_EACH):
        ledger.write(make_record(writer, n))


def test_concurrent_appends_from_processes_lose_and_tear_nothing(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ctx = multiprocessing.get_context("spawn")
    processes = [ctx.Process(target=_writer, args=(str(path), w)) for w in range(WRITERS)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
        assert p.exitcode == 0
    lines = path.read_text().splitlines()
    assert len(lines) == WRITERS * RECORDS_EACH
    ids = {json.loads(line)["id"] for line in lines}  # every line parses: none torn
    assert ids == {f"w{w}-{n}" for w in range(WRITERS) for n in range(RECORDS_EACH)}


def test_concurrent_appends_from_threads(tmp_path):
    import threading

    ledger = Ledger(tmp_path / "l.jsonl")
    threads = [threading.Thread(target=lambda w=w: [ledger.write(make_record(w, n)) for n in range(50)])
               for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(list(read_ledger(ledger.path))) == 400


def test_read_rejects_a_torn_line_naming_it_unless_told_to_skip(tmp_path):
    path = tmp_path / "l.jsonl"
    Ledger(path).write(make_record(0, 0))
    with open(path, "a") as f:
        f.write('{"id": "half a rec')
    with pytest.raises(LedgerError, match=r"l.jsonl:2"):
        list(read_ledger(path))
    assert [r.id for r in read_ledger(path, strict=False)] == ["w0-0"]


def test_records_are_mirrored_to_the_ctxkit_logger(tmp_path, caplog):
    caplog.set_level("INFO", logger="ctxkit")
    Ledger(tmp_path / "l.jsonl").write(make_record(1, 2))
    assert any('"id":"w1-2"' in r.getMessage() for r in caplog.records if r.name == "ctxkit")
