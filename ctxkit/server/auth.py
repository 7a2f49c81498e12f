"""API keys for the proxy: each key maps to a namespace, so tenants never share cache entries or memory.

Keys come from `CTXKIT_API_KEYS="key1:namespace1,key2:namespace2"` or a file of `key namespace` lines
(`#` starts a comment). Only SHA-256 digests are kept in memory, compared in constant time, and a key is
never written to a log, a ledger or an error message. There is no key-less mode: an empty key set is a
configuration error, so the proxy can never run as an open relay.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import ConfigurationError

NAMESPACE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MIN_KEY_LENGTH = 8


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The accepted keys and the namespace each one maps to."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        if not keys:
            raise ConfigurationError("no API keys configured: the proxy refuses to run as an open relay "
                                     "(set CTXKIT_API_KEYS or pass --api-keys-file)")
        self._entries: list[tuple[bytes, str]] = []
        for number, (key, namespace) in enumerate(keys.items(), 1):
            if len(key) < MIN_KEY_LENGTH or not key.isascii() or any(c.isspace() or not c.isprintable() for c in key):
                # not printable: a control or invisible character (a BOM, a zero-width space) that no client sends;
                # not ASCII: an HTTP client cannot send it (httpx refuses), and raw UTF-8 arrives latin-1 decoded
                raise ConfigurationError(f"API key #{number}: at least {MIN_KEY_LENGTH} ASCII characters, no spaces "
                                         "or invisible characters")
            if not NAMESPACE.match(namespace):
                raise ConfigurationError(f"API key #{number}: invalid namespace {namespace!r} "
                                         "(letters, digits, _ . -; at most 64)")
            self._entries.append((_digest(key), namespace))

    def __repr__(self) -> str:  # never show a key
        return f"ApiKeys({len(self._entries)} keys, namespaces={sorted(self.namespaces)})"

    @property
    def namespaces(self) -> set[str]:
        return {namespace for _, namespace in self._entries}

    def namespace_for(self, key: str) -> str | None:
        """The namespace of `key`, or None when it is not a known key."""
        digest = _digest(key)
        found = None
        for known, namespace in self._entries:  # no early exit: the time taken says nothing about the key
            if hmac.compare_digest(known, digest):
                found = namespace
        return found

    @classmethod
    def parse(cls, text: str, *, source: str = "CTXKIT_API_KEYS") -> ApiKeys:
        """`key:namespace` pairs separated by commas or newlines (a file may use `key namespace`)."""
        pairs: dict[str, str] = {}
        items: Iterable[str] = (part for line in text.splitlines() for part in line.split("#", 1)[0].split(","))
        for number, item in enumerate((i.strip() for i in items if i.strip()), 1):
            # A key has no whitespace, so 'key namespace' (a file line) splits on it first: the key may contain
            # ':' ('sk-a:b team-a' would otherwise name namespace 'b team-a' and print half the key in the
            # error). Else 'key:namespace', with rpartition: a key may contain ':', a namespace may not.
            words = item.split()
            if len(words) == 2 and not words[0].endswith(":") and not words[1].startswith(":"):
                key, sep, namespace = words[0], " ", words[1]
            else:
                key, sep, namespace = item.rpartition(":") if ":" in item else item.rpartition(" ")
            key, namespace = key.strip(), namespace.strip()
            if not sep or not key or not namespace:
                raise ConfigurationError(f"{source}: entry #{number} is not 'key:namespace'")
            if key in pairs:
                raise ConfigurationError(f"{source}: entry #{number} repeats an earlier key")
            pairs[key] = namespace
        return cls(pairs)

    @classmethod
    def from_env(cls, variable: str = "CTXKIT_API_KEYS") -> ApiKeys:
        return cls.parse(os.environ.get(variable, ""), source=variable)

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeys:
        try:
            # utf-8-sig: a file saved with a byte-order mark (Windows Notepad, PowerShell's Out-File) would
            # otherwise put an invisible U+FEFF in front of its first key, which then never matches.
            text = Path(path).read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise ConfigurationError(f"cannot read API keys file {path}: {exc.strerror}") from None
        return cls.parse(text, source=str(path))
