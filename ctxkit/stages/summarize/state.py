"""The running summary of each conversation, kept by the stage between calls.

Keyed by (namespace, conversation_id): namespaces never share a summary. In memory behind a lock, and
optionally written to a directory (one JSON file per conversation) so a restart resumes where it was.
Embeddings are not persisted: they are recomputed from the stored fact texts when first needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigurationError
from ...forking import renew_after_fork
from ...settings import whole_number
from ...temp_files import remove_stale
from .facts import Fact

logger = logging.getLogger("ctxkit")

# Unreadable files set aside to look at (".damaged"), newest kept: a recurring fault (a full disk cutting files
# short, another version's format) set one aside per conversation, never removed, each holding user text.
KEEP_DAMAGED = 10


def digest(fingerprints: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()[:32]


@dataclasses.dataclass
class ConversationState:
    """What one conversation has folded so far.

    folded:        how many messages after the leading system messages are folded into the summary.
    folded_digest: digest of those messages' fingerprints: a request whose history differs starts over.
    included:      fingerprints of the folded messages that went into the summary (not quarantined ones),
                   to notice a later quarantine of one of them.
    model_summary: the rolling abstractive summary ("" when the stage is extractive only).
    facts:         every fact unit of the folded messages (the pool the extractive keeper chooses from).
    texts:         the folded messages' texts by index, for rendering neighbouring sentences verbatim.
    summary:       the summary message last sent: reused unchanged until the next fold (stable prefix).
    pinned:        the folded user message sent verbatim after the summary until the next fold (its index
                   after the leading system messages; -1: none; None: a state saved before this was kept).
    unsummarized:  indices of folded messages the model summarized into nothing (model mode adds their excerpts).
    """

    folded: int = 0
    folded_digest: str = ""
    included: list[str] = dataclasses.field(default_factory=list)
    model_summary: str = ""
    facts: list[Fact] = dataclasses.field(default_factory=list)
    texts: dict[int, str] = dataclasses.field(default_factory=dict)
    summary: str = ""
    pinned: int | None = -1
    unsummarized: list[int] = dataclasses.field(default_factory=list)  # folded messages the model summary lost
    vectors: np.ndarray | None = None  # embeddings of `facts`, in order; not persisted
    # Fingerprints of the messages this stage passed on last time, not the messages: 10,000 conversations'
    # histories were kept whole in memory for this (22 MB per 1,000 of 4,500 tokens). Not persisted.
    last_sent: tuple[str, ...] = ()
    last_sent_tokens: int = 0
    last_tools: tuple[Any, ...] = ()  # the tools sent with last_sent (they lead the prompt); not persisted

    def to_json(self) -> dict[str, Any]:
        return {
            "folded": self.folded, "folded_digest": self.folded_digest, "included": self.included,
            "model_summary": self.model_summary, "facts": [f.to_json() for f in self.facts],
            "texts": {str(k): v for k, v in self.texts.items()}, "summary": self.summary, "pinned": self.pinned,
            "unsummarized": self.unsummarized,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConversationState:
        return cls(
            folded=int(data["folded"]), folded_digest=str(data["folded_digest"]), included=list(data["included"]),
            model_summary=str(data["model_summary"]), facts=[Fact(**f) for f in data["facts"]],
            texts={int(k): v for k, v in data["texts"].items()}, summary=str(data["summary"]),
            pinned=int(data["pinned"]) if data.get("pinned") is not None else None,
            unsummarized=[int(i) for i in data.get("unsummarized") or []],
        )


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells one version of a file from another without reading it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class SummaryStore:
    """Conversation states by (namespace, conversation_id); thread-safe; optionally persisted."""

    def __init__(self, directory: str | Path | None = None, *, max_conversations: int = 10_000,
                 max_files: int = 100_000) -> None:
        """max_files: the most conversation files kept in `directory`; past it the least recently written go
        (those conversations are summarized anew from the history the app sends, as after a damaged file)."""
        self._lock = threading.Lock()
        renew_after_fork(self, SummaryStore._after_fork_in_child)
        # Least recently used first: memory stays bounded; a persisted state is simply reloaded later.
        self._states: OrderedDict[tuple[str, str], ConversationState] = OrderedDict()
        self.max_conversations = max_conversations
        self.max_files = whole_number(max_files, "max_files", minimum=1)
        self.directory = Path(directory) if directory is not None else None
        self._files = 0
        self._seen: dict[tuple[str, str], tuple[int, int, int] | None] = {}  # each file as this process last read or wrote it
        self._written = 0  # new files written since the directory was last counted
        self._damaged = 0  # files set aside as damaged since they were last counted
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a read-only volume, a file in the way: a configuration error naming the folder
                raise ConfigurationError(f"cannot create the summaries directory {self.directory}: {exc}") from exc
            remove_stale(self.directory, "*.tmp")
            self._files = sum(1 for _ in self.directory.glob("*.json"))
            self._prune_files()
            self._damaged = self._prune_damaged()

    def _after_fork_in_child(self) -> None:
        """In a forked child: a write of the parent's (a file written and renamed) held the lock, held for ever here."""
        self._lock = threading.Lock()

    def _path(self, key: tuple[str, str]) -> Path:
        assert self.directory is not None
        name = hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()[:40]
        return self.directory / f"{name}.json"

    def get(self, key: tuple[str, str]) -> ConversationState | None:
        with self._lock:
            state = self._states.get(key)
            if state is not None and self.directory is not None and self._changed_on_disk(key):
                # Another process sharing the directory (a replica) folded this conversation since: its file
                # is newer than what this one holds. Kept, the old state refolded turns the other had folded
                # (summarizer calls paid twice) and sent a different summary, un-caching the prompt.
                held, state = state, None
            else:
                held = None
            if state is not None:
                self._states.move_to_end(key)
            elif self.directory is not None:
                path = self._path(key)
                self._seen.pop(key, None)
                if path.is_file():
                    stamp = _stamp(path)  # before the read: a file replaced in between is read again next time
                    try:
                        state = ConversationState.from_json(json.loads(path.read_text("utf-8")))
                    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                        # A damaged file (truncated by a full disk or a crash, edited by hand): the state is only
                        # what this stage derived from the history the app resends, so the conversation starts
                        # over instead of failing every one of its calls. The file is kept aside to look at.
                        logger.warning("ctxkit summaries: %s is unreadable (%s); the conversation is summarized anew",
                                       path, exc)
                        self._set_aside(path)
                        return None
                    if held is not None:  # what this process passed on last: its prefix accounting goes on
                        state.last_sent, state.last_sent_tokens, state.last_tools = \
                            held.last_sent, held.last_sent_tokens, held.last_tools
                    self._states[key] = state
                    self._seen[key] = stamp
            return state

    def _changed_on_disk(self, key: tuple[str, str]) -> bool:
        stamp = _stamp(self._path(key))
        return stamp is not None and stamp != self._seen.get(key)

    def put(self, key: tuple[str, str], state: ConversationState) -> None:
        with self._lock:
            self._states[key] = state
            self._states.move_to_end(key)
            while len(self._states) > self.max_conversations:
                self._seen.pop(self._states.popitem(last=False)[0], None)
            if self.directory is not None and not state.folded:
                # Started over (the app edited or deleted folded messages): the file must not keep what the
                # app removed until the next fold overwrites it, nor hand it back after a restart.
                try:
                    self._path(key).unlink(missing_ok=True)
                except OSError as exc:  # a read-only directory: the state in memory serves this process
                    logger.error("ctxkit summaries: %s not removed (%s)", self._path(key), exc)
                    self._seen[key] = _stamp(self._path(key))  # the old file must not replace the new state
            elif self.directory is not None:
                # Write then rename: a crash never leaves half a summary behind.
                tmp = None
                try:
                    fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
                    with os.fdopen(fd, "w", encoding="utf-8") as handle:
                        json.dump(state.to_json(), handle, sort_keys=True, ensure_ascii=False)
                        handle.flush()
                        os.fsync(handle.fileno())  # renamed only once the data is on disk
                    path = self._path(key)
                    new = not path.exists()
                    os.replace(tmp, path)
                    self._seen[key] = _stamp(path)
                except BaseException as exc:
                    if tmp is not None:
                        with contextlib.suppress(OSError):
                            os.unlink(tmp)
                    if not isinstance(exc, OSError):
                        raise
                    # A full disk or a read-only directory: the summary is only derived from the history the app
                    # sends, so the call goes on with the state in memory (as the cache and the tool index do);
                    # the previous file, if any, stays whole (it was never touched: write then rename).
                    logger.error("ctxkit summaries: state of a conversation not saved in %s (%s); kept in memory "
                                 "only", self.directory, exc)
                    self._seen[key] = _stamp(self._path(key))  # the older file must not replace this state
                    return
                if new:
                    self._files += 1
                    self._written += 1
                    if self._written >= max(1, self.max_files // 100):
                        # Other processes sharing the directory write files this one never counted: count
                        # them all again now and then (every 1% of max_files), or N replicas kept N x max_files.
                        self._written = 0
                        self._files = sum(1 for _ in self.directory.glob("*.json"))
                    self._prune_files()

    def _set_aside(self, path: Path) -> None:
        damaged = path.with_suffix(".damaged")
        with contextlib.suppress(OSError):
            path.replace(damaged)
            os.utime(damaged)  # when it was set aside, not when it was written: the newest are kept
            self._damaged += 1
        if self._damaged > 2 * KEEP_DAMAGED:  # a scan per KEEP_DAMAGED set aside, not one per file
            self._damaged = self._prune_damaged()

    def _prune_damaged(self) -> int:
        """Keep the KEEP_DAMAGED most recently set aside damaged files; how many are left."""
        assert self.directory is not None
        found = []
        for path in self.directory.glob("*.damaged"):
            with contextlib.suppress(OSError):  # another process removed it meanwhile
                found.append((path.stat().st_mtime, path))
        found.sort(reverse=True)
        for _, path in found[KEEP_DAMAGED:]:
            with contextlib.suppress(OSError):
                path.unlink()
        return min(len(found), KEEP_DAMAGED)

    def _prune_files(self) -> None:
        """Past max_files, drop the least recently written files down to 90% of it (a scan per 10% written)."""
        if self.directory is None or self._files <= self.max_files:
            return
        files = []
        for path in self.directory.glob("*.json"):
            with contextlib.suppress(OSError):  # another process removed it meanwhile
                files.append((path.stat().st_mtime, path))
        files.sort()
        excess = max(0, len(files) - max(1, self.max_files * 9 // 10))  # never the file just written
        for _, path in files[:excess]:
            path.unlink(missing_ok=True)
        self._files = len(files) - excess

    def forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._states.pop(key, None)
            if self.directory is not None:
                self._path(key).unlink(missing_ok=True)
                self._path(key).with_suffix(".damaged").unlink(missing_ok=True)  # it holds the conversation too

    def __len__(self) -> int:
        with self._lock:
            return len(self._states)
