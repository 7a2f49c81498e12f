"""The `ctxkit` command as a user runs it: demo, report, bench."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ctxkit import ChatRequest, ConfigurationError, Pipeline, read_ledger
from tests.test_core_pipeline import CONVERSATION, DropOldestTurn


def ctxkit(*args: str, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("ctxkit")
    assert exe, "the ctxkit console script is not installed"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def ledger_with_calls(llama_backend, ledger):
    pipeline = Pipeline(llama_backend, stages=[DropOldestTurn()], ledger=ledger)
    for _ in range(3):
        pipeline.call(ChatRequest(messages=CONVERSATION, params={"max_tokens": 4, "temperature": 0}))
    return ledger.path


def test_report_json_totals_and_savings_by_stage(ledger_with_calls):
    out = ctxkit("report", str(ledger_with_calls), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    records = list(read_ledger(ledger_with_calls))
    assert summary["calls"] == summary["ok"] == 3
    assert summary["tokens_naive"] == sum(r.tokens_naive for r in records)
    assert summary["tokens_saved"] == summary["saved_by_stage"]["drop_oldest_turn"] > 0
    assert summary["count_exact_calls"] == summary["count_checked_calls"] == 3


def test_report_table_and_plot(ledger_with_calls, tmp_path):
    png = tmp_path / "report.png"
    out = ctxkit("report", str(ledger_with_calls), "--plot", str(png))
    assert out.returncode == 0, out.stderr
    assert "drop_oldest_turn" in out.stdout and "tokens saved" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_on_a_missing_file_is_a_clear_error(tmp_path):
    out = ctxkit("report", str(tmp_path / "nope.jsonl"))
    assert out.returncode == 2 and "cannot read ledger" in out.stderr


def test_report_on_an_empty_ledger_says_it_holds_no_calls(tmp_path):
    empty = tmp_path / "calls.jsonl"
    empty.write_text("")
    out = ctxkit("report", str(empty))
    assert out.returncode == 0 and f"{empty} holds no calls" in out.stderr


def test_report_plot_paths_and_mistyped_records(ledger_with_calls, tmp_path):
    nested = tmp_path / "new" / "dir" / "report.png"
    assert ctxkit("report", str(ledger_with_calls), "--plot", str(nested)).returncode == 0 and nested.exists()
    out = ctxkit("report", str(ledger_with_calls), "--plot", str(tmp_path / "report.xyz"))
    assert out.returncode == 2 and "not an image format" in out.stderr
    record = json.loads(ledger_with_calls.read_text().splitlines()[0])
    with open(ledger_with_calls, "a") as f:  # a nested value of the wrong type, as a hand edit may leave
        f.write(json.dumps({**record, "id": "bad", "saved_by_stage": {"x": None}}) + "\n")
    out = ctxkit("report", str(ledger_with_calls), "--json", "--skip-bad-lines")
    assert out.returncode == 0 and json.loads(out.stdout)["calls"] == 3, out.stderr


def test_bench_overhead_json(tmp_path):
    out = ctxkit("bench", "overhead", "--calls", "3", "--json", "--n-threads", "2")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert {"overhead_ms_p50", "backend_ms_p50", "overhead_ratio"} <= set(result)
    assert 0 < result["overhead_ms_p50"] < result["backend_ms_p50"]


def test_demo_runs_the_agent_loop_on_the_embedded_model(tmp_path):
    log = tmp_path / "demo.jsonl"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = ctxkit("demo", "--ledger", str(log), "--n-threads", "2", env={"TMPDIR": str(scratch)})
    assert out.returncode == 0, out.stderr
    left = [p.name for p in scratch.glob("ctxkit-*")]  # torch and tiktoken keep their own caches there
    assert not left, f"the demo left its cache or notes folder behind: {left}"
    assert "[ledger]" in out.stdout and "totals" in out.stdout
    records = list(read_ledger(log))
    assert len(records) >= 4 and all(r.status == "ok" for r in records)
    sent = [r for r in records if r.tokens_sent]
    assert sent and all(r.count_delta == 0 for r in sent), "local counts must equal llama.cpp's usage"
    assert "  tool " in out.stdout, "the model made no tool call with tool_choice=required"
    assert all(r.saved_by_stage["tool_retrieval"] > 0 for r in sent), "8 tools offered, 3 must be sent"
    assert sum(r.tokens_saved for r in records) == sum(sum(r.saved_by_stage.values()) for r in records)
    # A changed tool block un-caches at most what the previous call sent less what llama.cpp reused of it (the
    # quarantine rewrote the history between calls, and the stage counted it unsummarized: 694 of 682 sent).
    for previous, record in zip(records, records[1:], strict=False):
        for event in record.events:
            if event["kind"] == "prefix_invalidated" and event["stage"] == "tool_retrieval":
                assert event["tokens"] <= previous.tokens_sent - record.tokens_cached, (event, previous.tokens_sent)


def test_demo_says_why_a_step_has_no_answer():
    from ctxkit.demo import _shown

    assert _shown("42", "stop") == "42"
    assert "max_tokens" in _shown(None, "length"), "a tool call cut off at max_tokens printed 'None'"
    assert "None" not in _shown("", "stop")


@pytest.mark.parametrize("args,where", [
    (["bench", "cache", "--pairs"], ":2: not a cache pair"),  # line 2 lacks the format's fields
    (["bench", "memory", "--conversations"], ":2: messages: must be a non-empty list"),
    (["bench", "prune", "--questions"], ":2: question must be a non-empty string"),
])
def test_bench_data_that_is_not_json_lines_is_a_clear_error_naming_the_line(args, where, tmp_path, capsys):
    from ctxkit.cli.main import main

    data = tmp_path / "data.jsonl"
    data.write_text('\n{"id": 1}\nnot json\n')
    assert main([*args, str(data)]) == 2
    error = capsys.readouterr().err
    assert f"{data}{where}" in error, error


HELLO = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.mark.parametrize("args,record,where", [
    # A bare string used to be scored letter by letter: retention or recall 1.0 on anything.
    (["bench", "memory", "--conversations"], {"messages": HELLO, "answers": "Rex the dog"},
     ':1: answers: expected a non-empty list of strings, got "Rex the dog"'),
    (["bench", "prune", "--questions"], {"question": "Highest?", "documents": [{"id": "d", "text": "t"}],
                                         "answers": "Kilimanjaro"}, ":1: answers: expected a non-empty list"),
    (["bench", "prune", "--questions"], {"question": "Highest?", "documents": [{"text": "no id"}],
                                         "answers": ["x"]}, ':1: documents[0]: must be an object with "id" and "text"'),
    (["bench", "cache", "--pairs"], {"a": HELLO, "b": HELLO, "same_answer": "false"},
     ":1: same_answer must be true or false, got 'false'"),
    (["bench", "cache", "--pairs"], {"a": ["hi"], "b": HELLO, "same_answer": False},
     ":1: a: messages[0]: must be an object, got str"),
    (["bench", "tools", "--catalog", "tests/fixtures/tools/catalog.json", "--queries"],
     {"messages": HELLO, "gold": [["get_weather"]]}, ":1: gold (tool names): expected a non-empty list"),
])
def test_bench_records_of_the_wrong_shape_are_refused_naming_line_and_field(args, record, where, tmp_path, capsys):
    from ctxkit.cli.main import main

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(record) + "\n")
    assert main([*args, str(data)]) == 2
    error = capsys.readouterr().err
    assert f"{data}{where}" in error, error


def test_an_empty_bench_file_or_a_zero_limit_is_refused(tmp_path, capsys):
    from ctxkit.cli.main import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["bench", "memory", "--conversations", str(empty)]) == 2
    assert f"{empty}: no records" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "tools", "--catalog", "x.json", "--queries", str(empty), "--limit", "0"])
    assert "--limit: must be at least 1" in capsys.readouterr().err


# -- found in review: bad options and data that ended in a traceback or a meaningless number --------------

@pytest.mark.parametrize("args,message", [
    (["bench", "tools", "--catalog", "c.json", "--queries", "q.jsonl", "--top-k", "0"], "--top-k: must be at least 1"),
    (["bench", "cache", "--similarity", "1.5"], "--similarity: must be between 0 and 1"),
    (["bench", "cache", "--scale", "-5"], "--scale: must be at least 1"),
    (["bench", "overhead", "--calls", "0"], "--calls: must be at least 1"),
    (["bench", "proxy-load", "--clients", "0"], "--clients: must be at least 1"),
    (["bench", "prune", "--questions", "q.jsonl", "--window-tokens", "-5"], "--window-tokens: must be at least 1"),
    (["serve", "--port", "70000"], "--port: a port is 0-65535"),
])
def test_numeric_options_out_of_range_are_refused_before_anything_runs(args, message, capsys):
    from ctxkit.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_report_reads_a_ledger_with_null_latencies(tmp_path, capsys):
    """The record reader accepts null inside latency_ms; the summary then took the median of None."""
    from ctxkit.cli.main import main

    record = {"id": "c", "ts": 1.0, "backend": "b", "model": "m", "namespace": "default", "conversation_id": None,
              "stream": False, "tokens_naive": 10, "tokens_sent": 8, "tokens_out": 2, "saved_by_stage": {"s": 2},
              "latency_ms": {"total": None}}
    good = {**record, "id": "d", "latency_ms": {"total": 6.0, "backend": 5.0}}
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(json.dumps(record) + "\n" + json.dumps(good) + "\n")
    assert main(["report", str(ledger), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["calls"] == 2 and summary["latency_ms_p50"] == 6.0


def test_a_cache_directory_that_cannot_be_created_is_a_clear_error(tmp_path):
    from ctxkit.errors import ConfigurationError
    from ctxkit.stages.cache.local_store import LocalStore

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigurationError, match="cannot create the cache directory"):
        LocalStore(blocker / "cache")


def test_bench_prune_refuses_gold_ids_that_name_no_document(tmp_path, capsys):
    from ctxkit.cli.main import main

    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "Highest?", "documents": [{"id": "d1", "text": "Everest."}],
                                "gold_documents": ["d2"]}) + "\n")
    assert main(["bench", "prune", "--questions", str(data)]) == 2
    assert f"{data}:1: gold_documents: ['d2'] not among the line's documents ids" in capsys.readouterr().err


@pytest.mark.parametrize("catalog,message", [
    ([], ": no tools"),
    ([{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}],
     ": tools[1].function.name: duplicate tool name 'a' (first at tools[0])"),
])
def test_bench_tools_refuses_an_empty_catalog_or_a_repeated_name(catalog, message, tmp_path, capsys):
    from ctxkit.cli.main import main

    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(catalog))
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"messages": HELLO, "gold": ["a"]}) + "\n")
    assert main(["bench", "tools", "--catalog", str(path), "--queries", str(queries)]) == 2
    assert f"{path}{message}" in capsys.readouterr().err


def test_bench_proxy_load_checks_its_data_records(tmp_path, capsys):
    from ctxkit.cli.main import main

    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"messages": HELLO}) + "\n" + json.dumps({"messages": ["hi"]}) + "\n")
    assert main(["bench", "proxy-load", "--data", str(data), "--clients", "1"]) == 2
    assert f"{data}:2: messages[0]: must be an object, got str" in capsys.readouterr().err


def test_report_says_how_many_malformed_lines_it_skipped(ledger_with_calls):
    """--skip-bad-lines left lines out of the totals without a word: the totals were quietly smaller."""
    record = json.loads(ledger_with_calls.read_text().splitlines()[0])
    with open(ledger_with_calls, "a") as f:
        f.write(json.dumps({**record, "id": "bad", "events": ["tool_retrieval selected 3"]}) + "\n")
    out = ctxkit("report", str(ledger_with_calls), "--json", "--skip-bad-lines")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["skipped_lines"] == 1 and "skipped 1 malformed line" in out.stderr
    assert ctxkit("report", str(ledger_with_calls)).returncode == 2, "strict by default: the line is named"


def test_report_gives_a_summarizing_model_its_own_row():
    """The summarizer's calls (gpt-4o-mini) were billed to the main model's row (gpt-4o) in by_model."""
    from ctxkit import LedgerRecord
    from ctxkit.report import summarize

    record = LedgerRecord(id="c1", ts=0.0, backend="openai", model="gpt-4o", namespace="n", conversation_id=None,
                          stream=False, tokens_naive=100, tokens_sent=60, tokens_out=5, saved_by_stage={"s": 40},
                          cost_usd=0.0005, events=[{"stage": "summarization", "kind": "summarizer_call",
                                                    "model": "gpt-4o-mini", "cost_usd": 0.0001}])
    rows = summarize([record])["by_model"]
    assert rows["gpt-4o"]["cost_usd"] == pytest.approx(0.0004)
    assert rows["gpt-4o-mini"]["cost_usd"] == pytest.approx(0.0001) and rows["gpt-4o-mini"]["summarizer_calls"] == 1


def test_bench_proxy_load_reads_a_question_given_as_content_parts(tmp_path):
    """A user message given as a list of parts was skipped: the load sent an earlier message instead."""
    from ctxkit.bench.proxy_load import load_prompts

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": "1", "messages": [
        {"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of Norway?"}]}]}) + "\n")
    assert load_prompts(path) == [[{"role": "user", "content": "What is the capital of Norway?"}]]


def test_report_reads_a_ledger_from_a_pipe(ledger_with_calls):
    """`zcat ledger.gz | ctxkit report /dev/stdin` printed 0 calls: a pipe's size is 0."""
    done = subprocess.run([sys.executable, "-m", "ctxkit.cli.main", "report", "/dev/stdin", "--json"],
                          input=ledger_with_calls.read_text(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout)["calls"] == 3, done.stderr


def test_report_says_how_much_prefix_the_stages_edits_took_out_of_the_cache(tmp_path):
    """The stages record prefix_invalidated so the savings report is honest about provider caching, but the
    report never read it. One call's events overlap (each runs from its stage's first edit to the end)."""
    from ctxkit import LedgerRecord
    from ctxkit.report import format_summary, summarize

    def record(id_, events):
        return LedgerRecord(id=id_, ts=0.0, backend="llama.cpp", model="m", namespace="n", conversation_id="c",
                            stream=False, tokens_naive=500, tokens_sent=300, tokens_out=5, saved_by_stage={"s": 200},
                            events=events)

    records = [record("a", [{"stage": "summarization", "kind": "prefix_invalidated", "tokens": 120, "refolded": True},
                            {"stage": "tool_results", "kind": "prefix_invalidated", "tokens": 80}]),
               record("b", [{"stage": "summarization", "kind": "prefix_invalidated", "tokens": 0, "refolded": False}])]
    summary = summarize(records)
    assert summary["prefix_invalidated"] == 120
    assert summary["prefix_invalidated_by_stage"] == {"summarization": 120, "tool_results": 80}
    assert "prefix un-cached 120" in format_summary(summary)


def test_bench_data_with_a_byte_order_mark_is_read_and_text_that_is_not_utf8_is_named(tmp_path):
    from ctxkit.bench.common import read_jsonl
    from ctxkit.bench.tools import load_catalog
    from ctxkit.errors import ConfigurationError

    record = {"messages": HELLO, "gold": ["get_weather"]}
    data = tmp_path / "bom.jsonl"
    data.write_text(json.dumps(record) + "\r\n\r\n" + json.dumps(record) + "\r\n", encoding="utf-8-sig")
    assert [n for n, _ in read_jsonl(data)] == [1, 3]
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps([{"type": "function", "function": {"name": "f", "description": "d"}}]),
                       encoding="utf-8-sig")
    assert load_catalog(catalog)[0]["function"]["name"] == "f"
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps(record).encode() + b"\n" + '{"x": "café"}\n'.encode("latin-1"))
    with pytest.raises(ConfigurationError, match=r"latin1.jsonl:2: not UTF-8"):
        list(read_jsonl(latin1))
    catalog.write_bytes('[{"type": "function", "function": {"name": "café"}}]'.encode("latin-1"))
    with pytest.raises(ConfigurationError, match="cannot read the tool catalog"):
        load_catalog(catalog)


def test_bench_data_nested_or_numbered_past_the_parsers_limits_is_named_not_a_traceback(tmp_path):
    """A line '[[[[...' thousands deep (RecursionError) or with an integer of 5,000 digits (a plain ValueError, not
    a JSONDecodeError) got past read_jsonl as a traceback, not the file and line."""
    from ctxkit.bench.common import read_jsonl
    from ctxkit.bench.tools import load_catalog
    from ctxkit.errors import ConfigurationError

    for name, line in (("deep", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"), ("long", '{"a": ' + "1" * 5000 + "}")):
        data = tmp_path / f"{name}.jsonl"
        data.write_text('{"ok": 1}\n' + line + "\n")
        with pytest.raises(ConfigurationError, match=rf"{name}.jsonl:2: not JSON"):
            list(read_jsonl(data))
    catalog = tmp_path / "catalog.json"
    catalog.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigurationError, match="cannot read the tool catalog.*nested too deeply"):
        load_catalog(catalog)


def test_bench_prune_pools_refuse_one_id_naming_two_documents(tmp_path, capsys):
    from ctxkit.cli.main import main

    data = tmp_path / "questions.jsonl"
    data.write_text("\n".join(json.dumps(q) for q in [
        {"question": "When was the Eiffel Tower built?", "gold_documents": ["1"], "answers": ["1889"],
         "documents": [{"id": "1", "text": "The Eiffel Tower was built in 1889."}, {"id": "2", "text": "Bananas."}]},
        {"question": "Which river flows through Brazil?", "gold_documents": ["1"], "answers": ["Amazon"],
         "documents": [{"id": "1", "text": "The Amazon flows through Brazil."}, {"id": "2", "text": "Everest."}]},
    ]) + "\n")
    for pool in (["--pool-all"], ["--pool-tokens", "30"]):
        assert main(["bench", "prune", "--questions", str(data), "--lexical-only", "--budget", "0.5", *pool]) == 2
        assert "document id '1' names different texts" in capsys.readouterr().err


def test_bench_memory_reads_conversations_that_replay_broken_tool_call_arguments(tmp_path):
    from ctxkit.backends.tool_format import messages_for_plain_template
    from ctxkit.bench.memory import load_conversations

    call = {"id": "c", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"'}}
    data = tmp_path / "conversations.jsonl"
    data.write_text(json.dumps({"messages": [*HELLO, {"role": "assistant", "content": None, "tool_calls": [call]},
                                             {"role": "tool", "tool_call_id": "c", "content": "bad arguments"},
                                             {"role": "user", "content": "And Bergen?"}],
                                "answers": ["Oslo"]}) + "\n")
    messages = load_conversations(data)[0]["messages"]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == "{}"  # as the pipeline sends it
    messages_for_plain_template(messages, [])  # what counting the prompt renders: no JSONDecodeError


def test_report_totals_keep_no_record_in_memory():
    """`ctxkit report` on a multi-GB ledger held every record at once (100k calls: ~190 MB)."""
    import weakref

    from ctxkit.ledger import LedgerRecord
    from ctxkit.report import summarize

    held = []

    def records():
        refs = []
        for i in range(50):
            if len(refs) >= 2:  # the loop's variable may still hold the last one
                held.append(refs[-2]() is not None)
            record = LedgerRecord(id=f"c{i}", ts=1.0, backend="b", model="m", namespace="n", conversation_id=None,
                                  stream=False, tokens_naive=10, tokens_sent=6, tokens_out=1, saved_by_stage={"s": 4},
                                  latency_ms={"total": 1.0})
            refs.append(weakref.ref(record))
            yield record

    summary = summarize(records())
    assert summary["calls"] == 50 and summary["tokens_saved"] == 200 and summary["saved_by_stage"] == {"s": 200}
    assert not any(held), "summarize must not keep the records it has read"


# The command cut short by its user: Ctrl-C, or a reader of its output that leaves (`| head`).
def _ctxkit(*args: str, **kwargs) -> subprocess.Popen:
    # SIGINT at its default, as in a terminal (a background job of a non-interactive shell ignores it).
    return subprocess.Popen([sys.executable, "-c", "import sys; from ctxkit.cli.main import main; sys.exit(main())",
                             *args], stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def test_report_to_a_reader_that_left_is_no_error(tmp_path):
    ledger = tmp_path / "calls.jsonl"
    ledger.write_text("")
    read_end, write_end = os.pipe()
    os.close(read_end)  # `ctxkit report calls.jsonl --json | true`
    process = _ctxkit("report", str(ledger), "--json", stdout=write_end)
    os.close(write_end)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 141, err
    assert b"error" not in err and b"Traceback" not in err


def test_ctrl_c_is_a_clear_line_and_exit_130():
    read_end, write_end = os.pipe()  # `producer | ctxkit report /dev/stdin`, the producer still running
    process = _ctxkit("report", "/dev/stdin", stdin=read_end, stdout=subprocess.DEVNULL)
    os.close(read_end)
    try:
        time.sleep(5)  # imported and waiting for the ledger's lines
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        os.close(write_end)
    assert process.returncode == 130, err
    assert err.decode().strip() == "ctxkit: interrupted"


def test_a_torn_line_names_skip_bad_lines(tmp_path):
    ledger = tmp_path / "calls.jsonl"
    ledger.write_text('{"id": "call-1", "ts": 1\n')  # a writer killed mid-line
    process = _ctxkit("report", str(ledger), stdout=subprocess.DEVNULL)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    assert b"calls.jsonl:1: not a ledger record" in err and b"--skip-bad-lines" in err


def test_a_model_path_that_is_a_directory_is_named_as_one(tmp_path):
    from ctxkit import ConfigurationError, LlamaCppBackend

    with pytest.raises(ConfigurationError, match="is a directory, not a GGUF model file"):
        LlamaCppBackend(tmp_path)  # it said "GGUF model file not found" of a folder that is there


def test_demo_without_the_local_extra_is_one_error_line_naming_it(monkeypatch, capsys, tmp_path):
    """Without llama-cpp-python, `ctxkit demo` (and LlamaCppBackend, GGUFPrompt.from_gguf) died on a
    ModuleNotFoundError traceback with exit 1, where the docs promise one `ctxkit: error:` line and exit 2."""
    from ctxkit import GGUFPrompt, LlamaCppBackend, default_model_path
    from ctxkit.cli.main import main

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `from llama_cpp import Llama` fails
    assert main(["demo", "--ledger", str(tmp_path / "demo.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "ctxkit: error:" in err and "(llama_cpp is missing): pip install 'ctxkit[local]'" in err
    for load in (LlamaCppBackend, lambda: GGUFPrompt.from_gguf(default_model_path())):
        with pytest.raises(ConfigurationError, match=r"pip install 'ctxkit\[local\]'"):
            load()


@pytest.mark.parametrize("n_threads", [0, -2, 1.5, True])
def test_a_thread_count_llama_cpp_cannot_use_is_refused_before_loading(n_threads):
    from ctxkit import ConfigurationError, LlamaCppBackend

    with pytest.raises(ConfigurationError, match=r"n_threads \(None: llama.cpp.s default\) must be (a whole number|at least 1)"):
        LlamaCppBackend(n_threads=n_threads)


def test_bench_tools_catalog_refuses_parameters_and_descriptions_of_the_wrong_type(tmp_path):
    from ctxkit.bench.tools import load_catalog

    catalog = tmp_path / "catalog.json"
    for function, where in (({"name": "f", "parameters": '{"type": "object"}'}, "tools[0].function.parameters"),
                            ({"name": "f", "parameters": [1]}, "tools[0].function.parameters"),
                            ({"name": "f", "description": 5}, "tools[0].function.description")):
        catalog.write_text(json.dumps([{"type": "function", "function": function}]))
        with pytest.raises(ConfigurationError, match="catalog.json: " + re.escape(where)):
            load_catalog(catalog)


def test_bench_tools_catalog_refuses_a_lone_surrogate_naming_the_tool(tmp_path, capsys):
    """A cut emoji ("\\ud83d") in a description failed the tool index's UTF-8 hash: a UnicodeEncodeError traceback."""
    from ctxkit.cli.main import main

    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps([{"type": "function", "function": {"name": "f", "description": "ok"}},
                                   {"type": "function", "function": {"name": "g", "description": "cut \ud83d"}}]))
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"messages": HELLO, "gold": ["f"]}) + "\n")
    assert main(["bench", "tools", "--catalog", str(catalog), "--queries", str(queries), "--json"]) == 2
    assert "catalog.json: tools[1].function.description: holds a lone surrogate" in capsys.readouterr().err


def test_bench_memory_refuses_a_bad_budget_before_loading_anything(tmp_path, capsys, monkeypatch):
    """--budget 0 was refused only after the whole file was read and SmolLM2 and MiniLM were loaded (14 s on the
    shared file); --keep-last 0 likewise, as the stage's error."""
    from ctxkit.bench import memory
    from ctxkit.cli.main import main

    def no_model(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the budget was checked")

    monkeypatch.setattr(memory, "backend_from_args", no_model)
    monkeypatch.setattr(memory, "embedder_from_args", no_model)
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Ann is 7."}, {"role": "user", "content": "Age?"}],
                                "answers": ["7"]}) + "\n")
    assert main(["bench", "memory", "--conversations", str(data), "--budget", "0", "--json"]) == 2
    assert "--budget is a fraction of the original tokens in (0, 1], got 0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "memory", "--conversations", str(data), "--keep-last", "0", "--json"])
    assert "argument --keep-last: must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("bench", ["tools", "cache"])
def test_bench_torch_threads_torch_cannot_hold_is_the_option_s_error(bench, tmp_path, capsys):
    """--torch-threads 99999999999 was a ValueError traceback ("Overflow when unpacking long") from torch."""
    from ctxkit.cli.main import main

    data = tmp_path / "data.jsonl"
    data.write_text("")
    files = ["--catalog", str(data), "--queries", str(data)] if bench == "tools" else ["--pairs", str(data)]
    assert main(["bench", bench, *files, "--torch-threads", "99999999999", "--json"]) == 2
    assert "--torch-threads 99999999999: torch refuses it" in capsys.readouterr().err


def test_bench_tools_refuses_gold_names_the_catalog_lacks(tmp_path):
    from ctxkit.bench.tools import load_queries

    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "gold": ["f"]}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "hi"}], "gold": ["nope"]}) + "\n")
    catalog = [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(ConfigurationError, match=r"queries.jsonl:2: gold: \['nope'\] not among"):
        load_queries(queries, catalog)
    assert len(load_queries(queries)) == 2  # without a catalog, as before


def test_bench_prune_documents_file_names_the_line_of_a_repeated_id(tmp_path):
    from ctxkit.bench.prune import load_documents

    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps(d) for d in [{"id": "d1", "text": "a"}, {"id": 2, "text": "b"},
                                                       {"id": "2", "text": "c"}]) + "\n")
    with pytest.raises(ConfigurationError, match=r"docs.jsonl:3: document id '2' is already used at line 2"):
        load_documents(docs)


def test_bench_memory_refuses_answers_the_history_never_holds(tmp_path):
    from ctxkit.bench.memory import load_conversations

    data = tmp_path / "conversations.jsonl"
    messages = [{"role": "user", "content": "My locker code is 1007."}, {"role": "assistant", "content": "Noted."},
                {"role": "user", "content": "What is my locker code?"}]
    data.write_text(json.dumps({"messages": messages, "answers": ["1007"]}) + "\n"
                    + json.dumps({"messages": messages, "answers": ["1,007"]}) + "\n")
    with pytest.raises(ConfigurationError, match=r"conversations.jsonl:2: answers: none of \['1,007'\]"):
        load_conversations(data)


def test_report_with_an_unwritable_plot_format_fails_before_printing_a_report(tmp_path, capsys):
    """`--json --plot calls.txt` printed the whole JSON report (after reading all of a huge ledger), then exited 2:
    a script saw a complete report on stdout beside the error."""
    from ctxkit.cli.main import main

    log = tmp_path / "calls.jsonl"
    log.write_text("")
    assert main(["report", str(log), "--json", "--plot", str(tmp_path / "calls.txt")]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "not an image format" in out.err


@pytest.mark.parametrize("where", ["folder.png", "calls.jsonl/plot.png", "calls.jsonl/sub/plot.png"])
def test_report_with_an_unwritable_plot_path_fails_before_printing_a_report(tmp_path, capsys, where):
    """A --plot naming a folder, or a path under a file, printed the whole report, then exited 2 on a bare
    OSError ("[Errno 17] File exists: 'calls.jsonl'") that did not name --plot."""
    from ctxkit.cli.main import main

    log = tmp_path / "calls.jsonl"
    log.write_text("")
    (tmp_path / "folder.png").mkdir()
    assert main(["report", str(log), "--plot", str(tmp_path / where)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "ctxkit: error: --plot" in out.err


def test_demo_summarize_at_out_of_range_is_refused_by_flag_before_any_model_loads(capsys):
    """`ctxkit demo --summarize-at -5` loaded the model and MiniLM, then failed naming `trigger_tokens`."""
    from ctxkit.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["demo", "--summarize-at", "-5"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --summarize-at: must be at least 1, got -5" in err and "trigger_tokens" not in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="runs the CLI as `nobody` via runuser")
def test_a_plot_in_a_folder_the_user_cannot_write_fails_before_the_report():
    import pathlib
    import tempfile

    tmp_path = pathlib.Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp_path is root's alone
    try:
        folder = tmp_path / "ro"
        folder.mkdir()
        os.chmod(tmp_path, 0o755)
        os.chmod(folder, 0o755)  # root's; `nobody` may read it, not write it
        ledger = tmp_path / "ledger.jsonl"
        ledger.write_text("")
        os.chmod(ledger, 0o644)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["runuser", "-u", "nobody", "--", "env", f"PYTHONPATH={root}", "MPLCONFIGDIR=/tmp/mpl-nobody",
                              sys.executable, "-c", "import sys; from ctxkit.cli.main import main; sys.exit(main())",
                              "report", "--plot", str(folder / "x.png"), str(ledger)], capture_output=True, text=True)
        assert out.returncode != 0
        assert "not writable" in out.stderr and "tokens saved" not in out.stdout, (out.stdout, out.stderr)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)