"""Small helpers shared by the benchmarks: percentiles, progress bars, output."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigurationError

T = TypeVar("T")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; values need not be sorted."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterator[T]:
    """A progress bar on stderr (so --json output on stdout stays clean); silent when stderr is no tty."""
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=desc, file=sys.stderr, disable=None, leave=False)


def emit(result: dict[str, Any], as_json: bool, table: str) -> None:
    print(json.dumps(result, indent=2) if as_json else table)


def add_backend_arguments(parser: Any) -> None:
    parser.add_argument("--model", help="GGUF file for the local backend (default: the embedded SmolLM2-135M)")
    parser.add_argument("--n-threads", type=int, default=None,
                        help="llama.cpp threads (default: llama-cpp-python's: half the cores to generate, "
                             "every core to read the prompt)")
    parser.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload to a GPU (-1: all)")


def add_embedding_arguments(parser: Any) -> None:
    from ..embed import PRECISIONS

    parser.add_argument("--embed-precision", choices=PRECISIONS, default="auto",
                        help="MiniLM's precision (default auto: bfloat16 where the CPU computes it natively)")


def embedder_from_args(args: Any) -> Any:
    from ..embed import Embedder

    return Embedder(precision=args.embed_precision)


def backend_from_args(args: Any) -> Any:
    from ..backends.llama_cpp import LlamaCppBackend

    return LlamaCppBackend(args.model, n_threads=args.n_threads, n_gpu_layers=args.n_gpu_layers)


def set_torch_threads(count: int) -> None:
    """--torch-threads: a count torch cannot hold (above 2**31 - 1) is the option's error, not a ValueError
    traceback ("Overflow when unpacking long")."""
    import torch

    try:
        torch.set_num_threads(count)
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise ConfigurationError(f"--torch-threads {count}: torch refuses it ({exc})") from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line of a JSON-lines data file. An unreadable file, a
    line that is not JSON or not an object raises ConfigurationError naming the file and line."""
    try:
        handle = open(path, "rb")  # decoded line by line: a line that is not UTF-8 is named, not a traceback
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            try:
                # utf-8-sig: a byte-order mark (Notepad, PowerShell's Out-File) is no part of the first record
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigurationError(f"{path}:{number}: not UTF-8 text (byte {exc.start}: "
                                         f"{raw[exc.start:exc.start + 1]!r})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigurationError(f"{path}:{number}: not JSON ({exc.msg})") from None
            except RecursionError:  # '[[[[...' thousands deep: the parser's own limit
                raise ConfigurationError(f"{path}:{number}: not JSON (nested too deeply)") from None
            except ValueError as exc:  # an integer past Python's 4300 digits
                raise ConfigurationError(f"{path}:{number}: not JSON ({exc})") from None
            if not isinstance(record, dict):
                raise ConfigurationError(f"{path}:{number}: expected a JSON object")
            yield number, record


def positive_int(text: str) -> int:
    """An argparse type for counts such as --limit: 0 would silently mean "everything" or "nothing"."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def unit_interval(text: str) -> float:
    """An argparse type for similarity thresholds: a number from 0 to 1 (above 1 nothing would ever match)."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value) or not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def check_messages(value: Any, where: str) -> list[dict[str, Any]]:
    """`value` if it is a conversation ctxkit accepts (as a request would check it); ConfigurationError
    naming `where` (file:line and field) and what is wrong otherwise."""
    from ..errors import RequestError
    from ..request import ChatRequest
    from ..validation import validate_request

    try:
        validate_request(ChatRequest(messages=value))
    except RequestError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None
    return list(value)


def check_strings(value: Any, where: str) -> list[str]:
    """`value` if it is a non-empty list of non-empty strings. A bare string is refused: iterated, it would
    be scored letter by letter."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigurationError(f"{where}: expected a non-empty list of strings, got {json.dumps(value)[:80]}")
    return value


def require_records(rows: list[T], path: str | Path) -> list[T]:
    if not rows:
        raise ConfigurationError(f"{path}: no records")
    return rows

