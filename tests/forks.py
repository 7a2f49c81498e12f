"""Running a function in a forked child, as gunicorn --preload and multiprocessing's fork do, for fork-safety tests."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any


def start_in_fork(target: Callable[..., Any], *args: Any) -> Any:
    """A forked child running `target(*args)`, started; finish it with exit_code."""
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    return child


def exit_code(child: Any, timeout: float) -> int | None:
    """The child's exit code, or None when it is still running after `timeout` seconds (hung: then it is killed)."""
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        return None
    return int(child.exitcode)


def exit_code_in_fork(target: Callable[..., Any], *args: Any, timeout: float = 60) -> int | None:
    """Run `target(*args)` in a forked child: its exit code, or None when it hung."""
    return exit_code(start_in_fork(target, *args), timeout)
