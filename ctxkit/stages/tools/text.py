"""What a tool and a query look like to the retrievers: identifier splitting, light stemming, tool documents.

Tool names and parameter names are identifiers (`get_current_weather`, `numOfPlayers`, `math.hypot`);
users write words ("current weather", "number of players"). Splitting identifiers into words and
folding inflections ("roots"/"root", "calculating"/"calculate") is what lets lexical matching see that
they are the same thing, and it is where plain embedding retrieval loses most of its misses.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

_CAMEL_LOWER_UPPER = re.compile(r"([a-z0-9])([A-Z])")
_CAMEL_ACRONYM = re.compile(r"([A-Z]+)([A-Z][a-z])")
_WORD = re.compile(r"[A-Za-z]+|[0-9]+")

STOPWORDS = frozenset(
    """a an the of to in on for and or by with from at as is are be been was were it its this that these those
    what which who whom whose how when where why i me my we our you your he she they them their his her
    do does did can could would should will shall may might must please find get give tell show
    some any all also then than there here into about over under between after before up down out
    if not no yes so such very just only want need like using use used given let us am 's e g eg etc
    many much know help few first second third lastly finally next now able kindly could
    default optional parameter required value""".split()
)

# Longest first; a suffix is stripped only when a stem of at least 3 letters remains. Crude next to
# Porter, but queries and tools go through the same function, so what matters is that both sides fold
# the same way.
_SUFFIXES = tuple(sorted(
    """ational ations ation ators ator ities ity ements ement ments ment ness ings ing ically ical ally ies
    ied ers er ed es s ly ic al ate ive ize ise e""".split(),
    key=len, reverse=True,
))


def split_identifier(text: str) -> list[str]:
    """`get_current_weather` -> get current weather; `numOfPlayers` -> num of players; `HTTPServer` -> http server."""
    text = _CAMEL_ACRONYM.sub(r"\1 \2", _CAMEL_LOWER_UPPER.sub(r"\1 \2", text))
    return [w.lower() for w in _WORD.findall(text)]


def stem(word: str) -> str:
    if len(word) <= 3 or word.isdigit():
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            if word.endswith("at") and len(word) >= 6:
                word = word[:-2]  # "calculating" -> "calculat" -> "calcul", as "calculate" -> "calcul"
            break
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiouls":
        word = word[:-1]  # "running" -> "runn" -> "run"
    return word


def terms(text: str) -> list[str]:
    """Index terms of free text or identifiers: split, lowercased, stopwords and bare numbers dropped, stemmed."""
    return [stem(w) for w in split_identifier(text) if len(w) > 1 and not w.isdigit() and w not in STOPWORDS]


@dataclasses.dataclass(frozen=True)
class ToolDocument:
    """The searchable parts of one tool schema."""

    name: str
    description: str
    param_names: tuple[str, ...]
    param_descriptions: tuple[str, ...]

    @classmethod
    def from_tool(cls, tool: dict[str, Any]) -> ToolDocument:
        function = tool.get("function") or {}
        names: list[str] = []
        descriptions: list[str] = []
        _collect_params(function.get("parameters") or {}, names, descriptions, depth=0)
        return cls(str(function.get("name", "")), str(function.get("description") or ""),
                   tuple(names), tuple(descriptions))

    @functools.cached_property
    def action(self) -> str | None:
        """The description's first word as an index term, when it is not a stopword: descriptions open
        with the verb of what the tool does ("Calculate ...", "Send ...")."""
        words = split_identifier(self.description)[:1]
        found = terms(words[0]) if words else []
        return found[0] if found else None

    def dense_text(self) -> str:
        """One passage for the sentence embedder: words first, since MiniLM reads at most 256 word pieces."""
        params = ", ".join(" ".join(split_identifier(p)) for p in self.param_names)
        head = " ".join(split_identifier(self.name))
        return f"{head}: {self.description} Parameters: {params}."

    def fields(self) -> dict[str, list[str]]:
        """Terms by field, for the lexical index's per-field weights (worked out once: stemming a catalog of
        ten thousand tools takes seconds, and the index is rebuilt whenever the catalog changes)."""
        return self._fields

    @functools.cached_property
    def _fields(self) -> dict[str, list[str]]:
        return {
            "name": terms(self.name),
            "description": terms(self.description),
            "param_names": [t for p in self.param_names for t in terms(p)],
            "param_descriptions": [t for d in self.param_descriptions for t in terms(d)],
        }


def _collect_params(schema: Any, names: list[str], descriptions: list[str], depth: int) -> None:
    # Nested objects and arrays of objects carry parameter names too; two levels are enough in practice
    # and keep a pathological schema from blowing up the document.
    if not isinstance(schema, dict) or depth > 2:
        return
    for key, spec in (schema.get("properties") or {}).items():
        names.append(str(key))
        if isinstance(spec, dict):
            if spec.get("description"):
                descriptions.append(str(spec["description"]))
            if isinstance(spec.get("enum"), list):
                descriptions.append(" ".join(str(v) for v in spec["enum"][:20]))
            _collect_params(spec, names, descriptions, depth + 1)
            _collect_params(spec.get("items"), names, descriptions, depth + 1)
