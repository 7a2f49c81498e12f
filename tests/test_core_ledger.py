"""The ledger file: concurrent appends from many processes lose and tear nothing; reads are strict."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import re
import time
import tracemalloc

import pytest

from ctxkit import ConfigurationError, Ledger, LedgerError, LedgerRecord, Price, read_ledger
from ctxkit.cli.main import main
from ctxkit.ledger import PriceTable
from ctxkit.report import format_summary, summarize

from .forks import exit_code, start_in_fork

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


def test_a_record_after_a_crash_mid_line_is_kept_and_bad_lines_are_named(tmp_path):
    """A writer killed mid-line leaves a partial line, maybe cut inside a character; the next record must
    not be glued to it, and readers name (or skip) every kind of bad line instead of crashing."""
    path = tmp_path / "l.jsonl"
    ledger = Ledger(path)
    ledger.write(make_record(0, 0))
    whole = json.dumps({**make_record(0, 1).to_dict(), "model": "北京"}, ensure_ascii=False).encode()
    with open(path, "ab") as f:
        f.write(whole[: whole.index("北".encode()) + 1])  # torn inside a three-byte character, no newline
    ledger.write(make_record(0, 2))
    with open(path, "a") as f:
        f.write("123\n")  # JSON, but not a record
        f.write(json.dumps({**make_record(0, 3).to_dict(), "tokens_sent": "60"}) + "\n")  # a field mistyped
    ledger.write(make_record(0, 4))
    assert [r.id for r in read_ledger(path, strict=False)] == ["w0-0", "w0-2", "w0-4"]
    with pytest.raises(LedgerError, match=r"l.jsonl:2: not a ledger record"):
        list(read_ledger(path))
    with pytest.raises(ValueError, match="expected a JSON object, got int"):
        LedgerRecord.from_dict(123)
    with pytest.raises(ValueError, match="'tokens_sent' is str, expected int"):
        LedgerRecord.from_dict({**make_record(0, 3).to_dict(), "tokens_sent": "60"})
    with pytest.raises(ValueError, match="'stream' is int"):
        LedgerRecord.from_dict({**make_record(0, 3).to_dict(), "stream": 1})


def test_odd_strings_and_unwritable_files_never_cost_an_answered_call_its_answer(tmp_path, caplog):
    path = tmp_path / "l.jsonl"
    ledger = Ledger(path)
    record = make_record(0, 0)
    record.conversation_id = "\ud800 half a surrogate pair, as a client may send"
    ledger.write(record)
    [back] = read_ledger(path)
    assert back.conversation_id == record.conversation_id

    path.unlink()
    path.mkdir()  # the ledger file is now a directory: every append fails
    ledger.write(make_record(0, 1))
    assert ledger.write_errors == 1 and [r.id for r in ledger.records] == ["w0-0", "w0-1"]
    assert any("not written" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    with pytest.raises(LedgerError, match="cannot open ledger"):
        Ledger(path)  # found when the ledger is made, not after the first answer


def test_a_note_with_keys_json_has_no_type_for_never_costs_a_call_its_answer_or_its_record(tmp_path):
    # A stage's record_event of a Counter of pairs: json.dumps raised TypeError out of Ledger.write, the caller
    # lost the answer, and the call had no record.
    from collections import Counter

    path = tmp_path / "l.jsonl"
    ledger = Ledger(path)
    record = make_record(0, 0)
    record.events = [{"stage": "a", "kind": "pairs", "top": dict(Counter([("a", "b"), ("a", "b"), ("b", "c")])),
                      "mixed": {1: "one", None: "none", 2.5: "x"}, "odd": {"n": float("nan")}}]
    ledger.write(record)
    [back] = read_ledger(path)
    assert back.events[0]["top"] == {"('a', 'b')": 2, "('b', 'c')": 1}
    assert back.events[0]["mixed"] == {"1": "one", "null": "none", "2.5": "x"}  # json.dumps's own names for such keys
    assert back.events[0]["odd"] == {"n": None}


def test_report_prints_a_name_holding_a_lone_surrogate_instead_of_a_traceback(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "l.jsonl"
    record = make_record(0, 0)
    record.model = "m\udcff"
    Ledger(path).write(record)
    done = subprocess.run([sys.executable, "-m", "ctxkit.cli.main", "report", str(path)], capture_output=True)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"m\\udcff" in done.stdout


def test_every_record_field_has_a_json_type_to_check():
    import dataclasses

    from ctxkit.ledger.record import _FIELD_TYPES

    assert set(_FIELD_TYPES) == {f.name for f in dataclasses.fields(LedgerRecord)}


def test_openai_models_without_a_price_are_priced_or_warned_about(caplog):
    from ctxkit.ledger import PriceTable

    prices = PriceTable()
    for model in ("gpt-4-turbo", "gpt-4", "gpt-3.5-turbo", "o1", "o1-mini", "o3-mini", "gpt-4.5-preview"):
        assert prices.price(model).input > 0, model
    assert prices.price("o3-mini").input < prices.price("o3").input
    with caplog.at_level("WARNING", logger="ctxkit"):
        assert prices.price("text-embedding-3-small").input == 0
    assert "no price for model 'text-embedding-3-small'" in caplog.text


def test_gpt_4_variants_are_priced_as_themselves_not_as_gpt_4():
    from ctxkit.ledger import PriceTable

    prices = PriceTable()
    assert prices.price("gpt-4-0125-preview").input == prices.price("gpt-4-turbo").input < prices.price("gpt-4").input
    assert prices.price("gpt-4-32k").input == 2 * prices.price("gpt-4").input


def _big_writer(path: str, writer: int, count: int) -> None:
    ledger = Ledger(path, keep_in_memory=1)
    for n in range(count):  # ~20 KB a line: a call whose events list many tools
        record = make_record(writer, n)
        ledger.write(dataclasses.replace(record, events=[{"stage": "tools", "kind": "selected",
                                                          "sent": [f"tool_{k}" for k in range(1500)]}]))


def test_a_report_read_beside_live_writers_never_sees_half_a_record(tmp_path):
    """`ctxkit report` on the ledger of a running service failed with "not a ledger record (Unterminated
    string ...)": writers append under a lock, and the reader read to the end of a line half written."""
    path = tmp_path / "live.jsonl"
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_big_writer, args=(str(path), w, 800)) for w in range(2)]
    for writer in writers:
        writer.start()
    reads = 0
    try:
        while any(w.is_alive() for w in writers) or reads == 0:
            if path.exists():
                list(read_ledger(path))  # strict: a torn line would raise LedgerError
                reads += 1
    finally:
        for writer in writers:
            writer.join(120)
    assert all(w.exitcode == 0 for w in writers) and reads > 5
    assert len(list(read_ledger(path))) == 1600


@pytest.mark.parametrize("change", [{"events": ["tool_retrieval selected 3"]}, {"events": [None]},
                                    {"cost_usd": float("inf")}, {"latency_ms": {"total": float("nan")}}])
def test_events_that_are_not_objects_and_non_numbers_are_bad_lines_named_or_counted(tmp_path, change):
    """An `events` item that is a string crashed `ctxkit report` with an AttributeError (even with
    --skip-bad-lines); NaN and Infinity made its --json output something no JSON parser reads."""
    path = tmp_path / "l.jsonl"
    Ledger(path).write(make_record(0, 0))
    with open(path, "a") as f:
        f.write(json.dumps({**make_record(0, 1).to_dict(), **change}) + "\n")
    with pytest.raises(LedgerError, match=r"l.jsonl:2"):
        list(read_ledger(path))
    skipped: list[str] = []
    assert [r.id for r in read_ledger(path, strict=False, skipped=skipped)] == ["w0-0"] and len(skipped) == 1


def test_a_fine_tuned_openai_model_is_counted_as_its_base_and_its_missing_price_is_warned_about(caplog):
    from ctxkit.ledger import PriceTable
    from ctxkit.tokens.tiktoken_counter import encoding_name_for_model

    fine_tuned = "ft:gpt-4o-mini-2024-07-18:my-org::abc123"
    assert encoding_name_for_model(fine_tuned) == "o200k_base"  # as tiktoken's own table has it
    with caplog.at_level("WARNING", logger="ctxkit"):
        assert PriceTable().price(fine_tuned).input == 0
    assert f"no price for model {fine_tuned!r}" in caplog.text  # never silently free
    own = PriceTable.__new__(PriceTable)
    PriceTable.__init__(own, {"ft:gpt-4o-mini": PriceTable().price("gpt-4o-mini")})
    assert own.price(fine_tuned).input > 0  # a price file can name fine-tuned models by prefix


# -- the report: prices of variants, summarizer costs of failed calls, --plot in one pass ----------------
@pytest.mark.parametrize("model, published", [
    ("gpt-4o-2024-05-13", (5.00, 5.00, 15.00)), ("gpt-4o-realtime-preview", (5.00, 2.50, 20.00)),
    ("gpt-4o-mini-realtime-preview-2024-12-17", (0.60, 0.30, 2.40)), ("o3-deep-research", (10.00, 2.50, 40.00)),
    ("o4-mini-deep-research", (2.00, 0.50, 8.00)), ("gpt-3.5-turbo-instruct", (1.50, 1.50, 2.00)),
    ("gpt-4o", (2.50, 1.25, 10.00)), ("gpt-4o-2024-08-06", (2.50, 1.25, 10.00)), ("o3", (2.00, 0.50, 8.00)),
])
def test_a_variant_priced_apart_from_its_family_is_not_billed_at_the_familys_price(model, published):
    p = PriceTable().price(model)
    assert (p.input, p.cached_input, p.output) == published


def _report_record(i, status="ok", events=(), cost=0.0):
    return LedgerRecord(id=f"c{i}", ts=0.0, backend="openai", model="gpt-4o-mini", namespace="n",
                        conversation_id=None, stream=False, tokens_naive=100, tokens_sent=60 if status == "ok" else 0,
                        tokens_out=5, saved_by_stage={"s": 40} if status == "ok" else {"s": 0}, cost_usd=cost,
                        status=status, error_type=None if status == "ok" else "BackendConnectionError",
                        events=list(events))


@pytest.mark.parametrize("entry", [
    {"input": -1, "output": 1},  # a negative cost in every record
    {"input": True, "output": 1},  # float(True): a price of $1
    {"input": "NaN", "output": 1}, {"input": 1, "output": "inf"}, {"input": None, "output": 1},
    {"input": 1, "cached_input": -0.5, "output": 1},
])
def test_a_price_file_with_a_price_that_is_no_price_is_refused_naming_it(tmp_path, entry):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"my-model": entry}))
    with pytest.raises(ConfigurationError, match=r"prices\.json: my-model\.\w+ must be a price in USD per million"):
        PriceTable.from_file(path)


def test_a_price_file_with_numbers_in_strings_and_no_cached_price_is_read(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"my-model": {"input": "0.25", "output": 2}}))
    assert PriceTable.from_file(path).price("my-model") == Price(0.25, 0.25, 2.0)


@pytest.mark.parametrize("prices, named", [
    ({"my-model": (1.0, 0.5, 2.0)}, r"prices\['my-model'\] must be a Price"),  # an AttributeError on the first call
    ({"my-model": Price(-1.0, 0.0, 1.0)}, r"prices\['my-model'\]\.input"),
    ({"my-model": Price(1.0, 1.0, float("nan"))}, r"prices\['my-model'\]\.output"),
    (["my-model"], "prices must be a mapping"),
])
def test_a_price_table_built_in_code_refuses_what_is_no_price(prices, named):
    with pytest.raises(ConfigurationError, match=named):
        PriceTable(prices)


@pytest.mark.parametrize("keep", [-1, 5.0, "10", True])
def test_a_ledger_keeping_a_number_of_records_that_is_no_count_is_refused(keep):
    with pytest.raises(ConfigurationError, match=f"keep_in_memory.*got {re.escape(repr(keep))}"):
        Ledger(keep_in_memory=keep)


def test_a_ledger_told_to_keep_none_keeps_every_record_as_a_deque_does():
    ledger = Ledger(keep_in_memory=None)
    assert ledger.records.maxlen is None


def test_a_failed_calls_summarizer_is_not_said_to_be_in_the_cost_of_the_successful_ones():
    summ = {"stage": "summarization", "kind": "summarizer_call", "model": "gpt-4o-mini", "prompt_tokens": 700,
            "cached_tokens": 0, "completion_tokens": 90, "cost_usd": 0.00016}
    s = summarize([_report_record(1, events=[summ], cost=0.0002), _report_record(2, "error", events=[summ], cost=0.00016)])
    # what the summary line says is "in the cost" is in the cost
    assert s["summarizer_calls"] == s["by_model"]["gpt-4o-mini"]["summarizer_calls"] == 1
    assert s["summarizer_cost_usd"] <= s["cost_usd"]
    assert s["summarizer_calls_failed"] == 1 and s["summarizer_cost_failed_usd"] == pytest.approx(0.00016)
    assert "1 more for failed calls" in format_summary(s)


def test_plot_reads_the_ledger_in_one_pass_without_keeping_its_records(tmp_path):
    log = tmp_path / "calls.jsonl"
    ledger = Ledger(log, keep_in_memory=1)
    for i in range(3000):  # each record carries a 20 KB note: 60 MB of records if they are all kept
        ledger.write(_report_record(i, events=[{"stage": "s", "kind": "note", "text": "x" * 20_000}]))
    main(["report", str(log), "--plot", str(tmp_path / "p.png")])  # warm matplotlib's imports
    tracemalloc.start()
    try:
        assert main(["report", str(log), "--plot", str(tmp_path / "p.png")]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 30e6, f"--plot peaked at {peak / 1e6:.0f} MB"


@pytest.mark.parametrize("lines", [0, 1])
def test_plot_of_an_empty_or_one_record_ledger(tmp_path, lines, capsys):
    log = tmp_path / "calls.jsonl"
    log.write_text("".join(json.dumps(_report_record(i).to_dict()) + "\n" for i in range(lines)))
    assert main(["report", str(log), "--plot", str(tmp_path / "p.png")]) == 0 and (tmp_path / "p.png").exists()


@pytest.mark.timeout(60)
def test_a_child_forked_while_a_thread_writes_can_write(tmp_path):
    """A thread writing when the process forked (waiting on the file's lock, held by a reader) held the ledger's
    lock, and a descriptor whose flock the child's copy kept: the child's first record hung for ever (and so did
    every other writer's while the child lived)."""
    import fcntl
    import os
    import threading

    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    reader = os.open(path, os.O_RDONLY)
    fcntl.flock(reader, fcntl.LOCK_SH)  # a report being read
    writing = threading.Thread(target=ledger.write, args=(make_record(0, 0),))
    writing.start()
    time.sleep(0.3)  # the thread now waits on the file's lock, holding the ledger's lock
    child = start_in_fork(ledger.write, make_record(1, 0))
    fcntl.flock(reader, fcntl.LOCK_UN)
    os.close(reader)
    writing.join()
    assert exit_code(child, 10) == 0
    assert sorted(r.id for r in read_ledger(path)) == sorted([make_record(0, 0).id, make_record(1, 0).id])


def test_a_garbled_line_nested_past_the_parsers_limit_is_a_malformed_line_not_a_crash(tmp_path):
    """'[[[[...' thousands deep is past json's own limit: a RecursionError traceback from `ctxkit report`, with
    --skip-bad-lines too, instead of the line named (or skipped)."""
    path = tmp_path / "l.jsonl"
    Ledger(path).write(make_record(0, 0))
    with open(path, "a") as f:
        f.write("[" * 100_000 + "\n")
    with pytest.raises(LedgerError, match=r"l.jsonl:2"):
        list(read_ledger(path))
    assert [r.id for r in read_ledger(path, strict=False)] == ["w0-0"]
