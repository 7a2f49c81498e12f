"""Fork safety: what a forked child must renew before its first use of an object made in its parent.

os.fork copies one thread, but every lock as it was: a lock another thread of the parent held at that moment
(a call waiting on the database, a writer waiting on a file lock) stays held in the child, and the child's first
call that takes it waits forever. Objects that hold such locks renew them in the child through this hook.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

_T = TypeVar("_T")

# Fork hooks are the process's and cannot be unregistered: one hook per kind of renewal, over the live objects
# that need it, so a process that makes many such objects (a ledger per job) does not add a hook for each.
_OWNERS: dict[Callable[[Any], None], weakref.WeakSet[Any]] = {}
_REGISTERING = threading.Lock()


def _unlock_registering() -> None:
    global _REGISTERING  # a thread of the parent registering at the fork held it: held for ever in the child
    _REGISTERING = threading.Lock()


os.register_at_fork(after_in_child=_unlock_registering)


def renew_after_fork(owner: _T, renew: Callable[[_T], None]) -> None:
    """Run `renew(owner)` in every child forked from now on (os.fork, multiprocessing's fork, gunicorn --preload).

    `renew` is a function of the owner's class (the same object for every owner); owners are held weakly, so an
    object dropped in the parent is collected and never renewed."""
    with _REGISTERING:
        owners = _OWNERS.get(renew)
        if owners is None:
            owners = _OWNERS[renew] = weakref.WeakSet()
            os.register_at_fork(after_in_child=partial(_renew_all, owners, renew))
        owners.add(owner)


def _renew_all(owners: weakref.WeakSet[Any], renew: Callable[[Any], None]) -> None:
    for owner in list(owners):
        renew(owner)
