"""The `ctxkit` command: demo, report, bench."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import select
import sys
import tempfile
from pathlib import Path

from ..bench.common import positive_int
from ..errors import CtxkitError
from ..server import cli as serve_cli

# Benchmarks: name -> (module with add_arguments(parser) and run_cli(args), one-line help). A module is
# imported only when its benchmark runs, so `ctxkit demo` does not pay for torch or FAISS imports.
BENCHMARKS = {
    "overhead": ("ctxkit.bench.overhead", "the pipeline's own cost per call against the backend call"),
    "prefix-cache": ("ctxkit.bench.prefix_cache", "llama.cpp KV prefix reuse: cold vs warm prompts"),
    "cache": ("ctxkit.bench.cache", "semantic cache precision/recall on request pairs, or lookup at scale"),
    "cache-pg": ("ctxkit.bench.cache_pg", "the PostgreSQL cache store: lookup latency and pairs"),
    "tools": ("ctxkit.bench.tools", "tool retrieval recall@k and tool tokens sent"),
    "memory": ("ctxkit.bench.memory", "history summarization: retention at a token budget"),
    "prune": ("ctxkit.bench.prune", "document pruning: gold recall at a token budget"),
    "proxy-load": ("ctxkit.bench.proxy_load", "concurrent clients against `ctxkit serve`"),
}


def _demo(args: argparse.Namespace) -> None:
    from ..backends.llama_cpp import LlamaCppBackend
    from ..demo import TURNS, NoteTools, ledger_line, make_notes_folder, run_agent
    from ..ledger import Ledger
    from ..pipeline import Pipeline
    from ..report import format_summary, summarize
    from ..stages import default_stages
    from ..stages.cache import LocalStore

    ledger = Ledger(args.ledger)
    backend = LlamaCppBackend(args.model, n_threads=args.n_threads, n_gpu_layers=args.n_gpu_layers)
    # Folders the demo makes for itself go when it ends; a --cache-dir the user names is theirs to keep.
    with contextlib.ExitStack() as scratch:
        cache_dir = args.cache_dir or scratch.enter_context(tempfile.TemporaryDirectory(prefix="ctxkit-demo-cache-"))
        notes = make_notes_folder(Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="ctxkit-demo-notes-"))))
        cache = scratch.enter_context(LocalStore(cache_dir))  # closed before its folder goes: counts are saved
        stages = default_stages(backend, cache_store=cache, tools_top_k=3, summarize_at_tokens=args.summarize_at)
        pipeline = Pipeline(backend, stages=stages, ledger=ledger)
        print(f"ctxkit demo: {backend.model} through llama.cpp; stages: {[s.name for s in pipeline.stages]}")
        print(f"ledger: {ledger.path}")
        seen = 0

        def on_step(line: str) -> None:
            nonlocal seen
            for record in list(ledger.records)[seen:]:
                print(ledger_line(record))
            seen = len(ledger.records)
            print(line)

        tools = NoteTools(notes)
        run_agent(pipeline.openai(), tools, TURNS, on_step=on_step)
        on_step("\n-- a second user starts a new conversation with the first question --")
        run_agent(pipeline.openai(), tools, TURNS[:1], conversation_id="demo-2", on_step=on_step)
        on_step("")
    print("totals")
    print(format_summary(summarize(ledger.records)))


def _report(args: argparse.Namespace) -> None:
    from ..errors import LedgerError, MalformedLedgerLine
    from ..ledger import read_ledger
    from ..report import PlotPoints, check_plot_path, format_summary, plot, summarize

    if args.plot:  # a --plot that cannot be written fails before a huge ledger is read and its report printed
        check_plot_path(args.plot)
    skipped: list[str] = []
    read = read_ledger(args.log, strict=not args.skip_bad_lines, skipped=skipped)
    points = PlotPoints()
    try:
        # One pass, keeping no record in memory: a plot keeps two numbers a call, not every record and its events.
        summary = summarize(points.tap(read) if args.plot else read)
    except MalformedLedgerLine as exc:
        # A writer killed mid-line leaves one torn record: say how to total the rest.
        raise LedgerError(f"{exc}; pass --skip-bad-lines to leave malformed lines out of the totals") from None
    summary["skipped_lines"] = len(skipped)
    if skipped:  # the totals leave these lines out: say so, never a quietly smaller total
        print(f"ctxkit: warning: skipped {len(skipped)} malformed line(s), left out of the totals; "
              f"first: {skipped[0]}", file=sys.stderr)
    if not summary["calls"]:  # a wrong path to an app's ledger reads like an app that saved nothing
        print(f"ctxkit: warning: {args.log} holds no calls", file=sys.stderr)
    # A name read back from the ledger may hold a lone surrogate (the writer keeps it as its JSON escape): printed
    # as that escape, not a UnicodeEncodeError traceback after the work is done.
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    if args.plot:
        path = plot((), args.plot, points=points, summary=summary)
        print(f"plot written to {path}", file=sys.stderr)


def build_parser(selected_benchmark: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctxkit", description="Context-engineering middleware for LLM calls.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run a short agent loop on the embedded local model")
    demo.add_argument("--ledger", type=Path, default=Path("ctxkit-demo.jsonl"),
                      help="ledger file to append to (default ctxkit-demo.jsonl in the current directory)")
    demo.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    demo.add_argument("--n-threads", type=int, default=None)
    demo.add_argument("--n-gpu-layers", type=int, default=0)
    demo.add_argument("--cache-dir", type=Path, help="semantic cache directory (default: a new temporary one)")
    demo.add_argument("--summarize-at", type=positive_int, default=700,
                      help="fold old history once a request passes this many tokens (default 700)")
    demo.set_defaults(func=_demo)

    report = commands.add_parser("report", help="totals, savings by stage and cost from a ledger")
    report.add_argument("log", type=Path, help="a ledger file (JSON lines)")
    report.add_argument("--json", action="store_true", help="print one JSON object")
    report.add_argument("--plot", type=Path, help="write a PNG: tokens naive vs sent per call, savings by stage")
    report.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines instead of failing")
    report.set_defaults(func=_report)

    serve_cli.add_parser(commands)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="benchmark", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        sub = bench.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", help="print one JSON object")
        if selected_benchmark == name:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(func=module.run_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = argv[1] if len(argv) > 1 and argv[0] == "bench" else None
    args = build_parser(selected).parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: a clear line and the shell's code for it, not a traceback
        print("ctxkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_gone():
            print("ctxkit: error: broken pipe", file=sys.stderr)
            return 2
        # The reader of our output left (`ctxkit report calls.jsonl --json | head`): no error of ctxkit's.
        # stdout goes to /dev/null so the interpreter's last flush does not fail again; 141 = 128 + SIGPIPE,
        # what any other tool cut off by its reader exits with.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except CtxkitError as exc:
        print(f"ctxkit: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path from the command line that cannot be read or created (names the path)
        print(f"ctxkit: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _stdout_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader has gone (a write would fail with EPIPE)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _fd, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
