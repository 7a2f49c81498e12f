"""Assistant claims contradicted by the tool results they rest on: a number given for a field that differs
from what the tool returned for it, a yes/no field stated the other way, a price that is not the one returned."""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from ...lru import memoized_by_digest
from .finding import Finding, parse_json, shorten

_NUMBER = r"-?(?<!\d)(?<!\d,)\d[\d,]*(?:\.\d+)?"  # starts a run of digits (and commas), never inside one: linear time
_TEXT_FIELD = re.compile(rf"\b([A-Za-z][A-Za-z _-]{{1,30}}?)\s*[:=]\s*\$?({_NUMBER})\b")


def numeric_fields(text: str) -> dict[str, float]:
    """{field name: number} from a tool result: JSON leaves, or `name: number` pairs in text."""
    return dict(_numeric_fields(text))


# What each tool result holds (its numbers and yes/no fields, not its parsed JSON, which can be large), read
# once: every assistant message of an agent's turn is checked against all the turn's tool results, so a loop
# of n steps read each result n times (18 s for 600 steps, quadratic). Pure functions of the text, memoized
# by a digest of it: functools.lru_cache keyed by the text kept the last 1,024 tool results alive (a 200 KB
# page each: 200 MB held after the requests that sent them had ended).
_READ_RESULTS = 1024


@memoized_by_digest(_READ_RESULTS)
def _numeric_fields(text: str) -> tuple[tuple[str, float], ...]:
    data = parse_json(text)
    fields: dict[str, float] = {}
    if data is not None:
        _walk(data, "", fields)
    else:
        for name, value in _TEXT_FIELD.findall(text):
            number = _to_number(value)
            if number is not None:
                fields.setdefault(name.strip().lower(), number)
        for match in re.finditer(rf"({_NUMBER})\s*°\s*[CF]?\b", text):  # "Weather in Lisbon: 23°C"
            number = _to_number(match.group(1))
            if number is not None:
                fields.setdefault("temperature", number)
    return tuple(fields.items())


_CLAIM_NUMBER = re.compile(rf"(?<![\w.]){_NUMBER}")
_DEGREES = re.compile(rf"({_NUMBER})\s*(?:°|degrees?\b)", re.I)
_CHANGE = re.compile(r"\b(?:warmer|colder|cooler|hotter|higher|lower|more|less|by|drops?|dropp\w*|rises?|rising|"
                     r"below|above|off|cheaper|saving|save[sd]?|discount\w*|each|per|"
                     r"fall\w*|climb\w*|difference|than|up|down)\b")


def checkable(claim: str) -> bool:
    """Whether the claim states anything find_contradiction compares: a number or a yes/no state. Most steps of an
    agent loop ("Checking the job again.") state neither, and need not be read against the turn's results."""
    claim_l = claim.lower()
    return _CLAIM_NUMBER.search(claim_l) is not None or _ANY_YES_NO.search(claim_l) is not None


def find_contradiction(claim: str, tool_results: Sequence[tuple[str, str]] | TurnResults) -> Finding | None:
    """A number the assistant states for a field that differs from every value the tools returned.

    `tool_results`: the turn's (tool name, text), newest first, or the TurnResults read from them.
    Precise on purpose: a field's name (its longest word, e.g. `stars` for `stargazer_stars`) must appear in
    the claim (or its stem), the number nearest to it in the same clause is what the claim says about it ("gate 22",
    "0 stops"), and it must match none of the numbers the tools returned (rounding allowed). A
    temperature is also recognised by its unit ("18°C"), since answers rarely repeat the field name.
    """
    if not checkable(claim):
        return None
    turn = tool_results if isinstance(tool_results, TurnResults) else TurnResults.of(tool_results)
    claim_l = claim.lower()
    numbers = [(m.start(), m.end(), m.group(0)) for m in _CLAIM_NUMBER.finditer(claim_l)]
    # Every number any tool of the turn returned: an answer about two parallel calls (two cities, two
    # quotes) or about the second item of a list states values that one result's first fields do not hold.
    values = turn.values
    for field, (tool, value, stem) in turn.fields.items():
        if stem is None:
            continue
        stated: list[tuple[str, int]] = []
        for match in re.finditer(rf"\b{re.escape(stem)}\w*", claim_l):
            nearest = _nearest_in_clause(claim_l, numbers, match.start(), match.end())
            if nearest is not None:
                stated.append(nearest)
        if "temp" in field:  # "3 degrees warmer", "drop by 5 degrees" are changes, not the temperature
            stated.extend((m.group(1), m.start()) for m in _DEGREES.finditer(claim_l)
                          if not _CHANGE.search(claim_l[max(m.start() - 15, 0):m.end() + 25]))
        for text, position in stated:
            number = _to_number(text)
            if number is None or values.holds_same(number):
                continue
            if _restated(number, claim_l[position + len(text):], values):
                continue
            return Finding(
                "contradiction",
                f"the answer says {field} is {text} but {tool} returned {_fmt(value)}",
                shorten(claim[max(position - 40, 0) : position + 40]),
            )
    return _money_contradiction(claim_l, claim, turn) or _yes_no_contradiction(claim_l, claim, turn)


class _Field(NamedTuple):
    tool: str  # the newest result that has the field
    value: float  # what that result says
    stem: str | None  # what a claim about it says: its longest word, cut to a stem; None: no word to look for


def _stem(field: str) -> str | None:
    words = [w for w in re.split(r"[\W_]+", field) if len(w) > 2 and not w.isdigit()]
    if not words:
        return None
    head = max(words, key=len)
    return head[: max(4, len(head) - 2)]  # "weight" also matches "weighs", "stars" "star"


class TurnResults:
    """What the tool results of one turn hold, each read once, when a claim is first checked after it came: the
    stage checks every assistant message of an agent loop against all of its turn's results so far, and reading
    them all again for each one made the first call on a long loop quadratic (2.3 s of CPU at 600 steps). A
    call whose verdicts are all remembered reads none."""

    def __init__(self) -> None:
        self._unread: list[tuple[str, str]] = []  # (tool, text), oldest first
        # {field: what the newest result that has it says}, the newest result's fields first: a claim is read
        # against the fields in this order, and the first one it contradicts is the finding.
        self._fields: dict[str, _Field] = {}
        self._values = _Numbers()  # every number any result returned (_result_numbers)
        # {field: (the yes/no values the results gave it, the newest result's tool)}, newest fields first
        self._bools: dict[str, tuple[frozenset[bool], str]] = {}
        self._money_fields: dict[tuple[str, str], float] = {}  # {(tool, field): the oldest result's value}

    @classmethod
    def of(cls, tool_results: Sequence[tuple[str, str]]) -> TurnResults:
        """The reading of (tool name, text) pairs given newest first (as a turn's are found, from the answer back)."""
        turn = cls()
        for tool, result in reversed(tool_results):
            turn.add(tool, result)
        return turn

    def add(self, tool: str, result: str) -> None:
        """A tool result newer than those added so far."""
        self._unread.append((tool, result))

    @property
    def fields(self) -> Mapping[str, _Field]:
        self._read()
        return self._fields

    @property
    def values(self) -> _Numbers:
        self._read()
        return self._values

    @property
    def bools(self) -> Mapping[str, tuple[frozenset[bool], str]]:
        self._read()
        return self._bools

    @property
    def money_fields(self) -> Mapping[tuple[str, str], float]:
        self._read()
        return self._money_fields

    def _read(self) -> None:
        """Read the results added since: each costs its size plus the turn's distinct fields."""
        for tool, result in self._unread:
            numeric = _numeric_fields(result)
            fields = {field: _Field(tool, value, _stem(field)) for field, value in numeric}
            for field, seen in self._fields.items():
                fields.setdefault(field, seen)
            self._fields = fields
            self._values.add(_result_numbers(result))
            bools = {field: (seen | self._bools[field][0] if field in self._bools else seen, tool)
                     for field, seen in _result_bools(result).items()}
            for field, known in self._bools.items():
                bools.setdefault(field, known)
            self._bools = bools
            for field, value in numeric:
                self._money_fields.setdefault((tool, field), value)
        self._unread.clear()


class _Numbers:
    """Distinct numbers, kept in sorted runs that are merged as they grow (as a binomial heap merges trees):
    asking whether any is near a value reads the few in a window around it, not all of them."""

    def __init__(self) -> None:
        self._seen: set[float] = set()
        self._runs: list[list[float]] = []  # sorted, finite; each at least twice the size of the next
        # nan and the infinities, by name (one nan is not equal to another): no window holds them
        self._unordered: dict[str, float] = {}

    def add(self, numbers: Iterable[float]) -> None:
        new = set()
        for n in numbers:
            if not math.isfinite(n):
                self._unordered.setdefault(repr(n), n)
            elif n not in self._seen:
                new.add(n)
        self._seen |= new
        run = sorted(new)
        while run and self._runs and len(self._runs[-1]) <= 2 * len(run):
            run = sorted(self._runs.pop() + run)  # two sorted runs: Timsort merges them in linear time
        if run:
            self._runs.append(run)

    def holds_same(self, number: float) -> bool:
        """Whether one of them is `number`, rounding allowed (_same)."""
        return self.any(lambda v: _same(number, v), *_window(number))

    def any(self, test: Callable[[float], bool], low: float, high: float) -> bool:
        """Whether `test` holds for one of them; it holds for none outside [low, high]."""
        if any(test(v) for v in self._unordered.values()):
            return True
        if not (math.isfinite(low) and math.isfinite(high)):
            return any(test(v) for run in self._runs for v in run)
        for run in self._runs:
            for i in range(bisect_left(run, low), len(run)):
                if run[i] > high:
                    break
                if test(run[i]):
                    return True
        return False


def _window(number: float) -> tuple[float, float]:
    """Where every value _same(number, value) holds for lies: within 1 (rounding to the same integer) or 1%
    of the value (at most 1.02% of `number`), with room to spare for floating-point error."""
    reach = 2 + 0.02 * abs(number)
    return number - reach, number + reach


# Yes/no fields and how an answer states them: {concept: (words of the field's name, "true" phrases, "false"
# phrases)}. Only these: a yes/no field is compared with what the answer says about that very state.
_YES_NO = {
    "delayed": ({"delayed", "delay", "late"}, r"delayed|running late|late", r"on time|on schedule|not delayed"),
    "on_time": ({"ontime"}, r"on time|on schedule", r"delayed|running late"),
    "cancelled": ({"cancelled", "canceled"}, r"cancell?ed", r"still (?:on|scheduled|going ahead)|going ahead as planned"),
    "in_stock": ({"instock", "available", "availability"}, r"in stock|available",
                 r"out of stock|sold out|unavailable|not available|not in stock"),
    "open": ({"open", "isopen", "opennow"}, r"(?:is|are|it's|they're|currently|still|now) open|open (?:now|today|right now)",
             r"closed"),
    "refundable": ({"refundable"}, r"refundable", r"non-?refundable|not refundable"),
    "paid": ({"paid", "ispaid"}, r"paid", r"unpaid|not (?:been |yet )?paid|outstanding|overdue"),
    "online": ({"online"}, r"online|up and running", r"offline|down"),
    "verified": ({"verified"}, r"verified", r"unverified|not verified"),
    "approved": ({"approved"}, r"approved", r"rejected|declined|denied|not approved"),
    "shipped": ({"shipped"}, r"shipped|on its way", r"not (?:yet )?shipped|hasn't shipped|has not shipped|not (?:yet )?been shipped"),
    "expired": ({"expired"}, r"expired", r"still valid|not expired|hasn't expired|valid until"),
    # States an agent reports after acting ("Your booking is confirmed."), stated with a verb of being, so that
    # "I confirmed that the payment failed" is no claim about a `confirmed` field.
    # (not "will be confirmed for Friday", "will be delivered on Monday": the future of a false flag)
    "confirmed": ({"confirmed"}, r"(?:is|are|was|were|been|now) confirmed|(?<!\bbe )confirmed for",
                  r"unconfirmed|not (?:yet |been )?confirmed|pending confirmation|awaiting confirmation"),
    "delivered": ({"delivered"}, r"(?:is|are|was|were|been) delivered|(?<!\bbe )delivered (?:on|to|yesterday|today)",
                  r"undelivered|not (?:yet |been )?delivered|hasn't been delivered|has not been delivered"),
    "completed": ({"completed", "complete", "done", "finished"},
                  r"(?:is|are|was|were|been|now) (?:completed|complete|done|finished)",
                  r"incomplete|not (?:yet )?(?:completed|complete|done|finished)|still (?:running|in progress)"),
    "active": ({"active", "enabled"}, r"(?:is|are|was|now|still) (?:active|enabled)",
               # a state, not an action the agent took on something else ("I've disabled two-factor authentication")
               r"inactive|(?:is|are|was|were|been|now) (?:disabled|deactivated|suspended)|not (?:active|enabled)"),
}
_ANY_YES_NO = re.compile("|".join(rf"(?<![\w-])(?:{phrase})\b" for _, yes, no in _YES_NO.values() for phrase in (yes, no)))
_NEGATION = re.compile(r"\b(?:not|no|never|isn't|aren't|wasn't|weren't|hasn't|haven't|won't|no longer|nothing)\s+(?:\w+\s+){0,2}$")
# a clause that wonders, or that is about something else ("other sizes are available")
_HEDGE = re.compile(r"\b(?:whether|if|might|may|could|would|check(?:ing)?|ask(?:ed)?|unless|expect\w*|likely|possibly|"
                    r"other|another|different|instead|alternatives?|similar|elsewhere|usually|normally|generally)\b|\?")


def _bool_fields(data: Any, out: dict[str, set[bool]], depth: int = 0) -> None:
    if isinstance(data, Mapping) and depth < 8:
        for key, value in data.items():
            if isinstance(value, bool):
                out.setdefault(re.sub(r"[\W_]+", "", re.sub(r"^(?:is|has)_?(?=[a-z])", "", str(key).lower())), set()).add(value)
            else:
                _bool_fields(value, out, depth + 1)
    elif isinstance(data, list) and depth < 8:
        for item in data[:200]:
            _bool_fields(item, out, depth + 1)


@memoized_by_digest(_READ_RESULTS)
def _result_bools(result: str) -> dict[str, frozenset[bool]]:
    """The yes/no fields of one tool result (read-only: it is shared by every call that asks)."""
    out: dict[str, set[bool]] = {}
    data = parse_json(result)
    if data is not None:
        _bool_fields(data, out)
    return {field: frozenset(values) for field, values in out.items()}


def _yes_no_contradiction(claim_l: str, claim: str, turn: TurnResults) -> Finding | None:
    """An answer that states the opposite of a yes/no field the tool returned: "Yes, the flight is on time."
    when the tool said {"delayed": true}. Only when every result of the turn gives that field one value, and
    the answer states it one way only, plainly (not "check whether it is delayed")."""
    fields = {field: seen for field, (seen, _tool) in turn.bools.items()}
    tools = {field: tool for field, (_seen, tool) in turn.bools.items()}
    for concept, (names, yes, no) in _YES_NO.items():
        values: frozenset[bool] = frozenset().union(*(fields[f] for f in names if f in fields))
        if len(values) != 1:
            continue
        (value,) = values
        stated: set[bool] = set()
        evidence = ""
        for phrase, polarity in ((yes, True), (no, False)):
            for match in re.finditer(rf"(?<![\w-])(?:{phrase})\b", claim_l):  # "refundable" is not in "non-refundable"
                # the clause, at most 200 characters either side (a long answer is not scanned once per phrase)
                low, high = max(0, match.start() - 200), min(len(claim_l), match.end() + 200)
                clause_start = max([low - 1] + [claim_l.rfind(c, low, match.start()) for c in ".;!?\n,"]) + 1
                clause_end = min([i for i in (claim_l.find(c, match.end(), high) for c in ".;!?\n") if i >= 0] or [high])
                if _HEDGE.search(claim_l[clause_start:clause_end + 1]):
                    continue
                negated = _NEGATION.search(claim_l[clause_start:match.start()]) is not None
                stated.add(polarity != negated)
                evidence = evidence or claim[max(0, match.start() - 40): match.end() + 40]
        if len(stated) == 1 and value not in stated:
            field = next(f for f in fields if f in names)
            return Finding("contradiction", f"the answer says {concept} is {'yes' if not value else 'no'} but "
                           f"{tools.get(field, 'the tool')} returned {str(value).lower()}", shorten(evidence))
    return None


_SCALE = {"thousand": 1e3, "k": 1e3, "million": 1e6, "m": 1e6, "mn": 1e6, "billion": 1e9, "bn": 1e9, "b": 1e9,
          "trillion": 1e12}
_MONEY_FIELD = re.compile(r"price|cost|amount|total|balance|fare|fee|charge")
# An amount the answer worked out from the price (a total, with tax, in another currency) is no restatement.
_DERIVED = re.compile(r"\b(?:total\w*|sum|tax\w*|vat|tips?|shipping|plus|including|incl|altogether|in all|combined|"
                      r"comes? to|works? out|convert\w*|exchange\w*|equivalent|in (?:us |u\.s\. |american )?"
                      r"(?:dollars|euros|pounds|usd|eur|gbp))\b")
_MONEY_CLAIM = re.compile(rf"(?:[$€£]\s?({_NUMBER})|(?<![\w.])({_NUMBER})\s?(?:usd|eur|gbp|dollars?|euros?|pounds?)\b)")


def _restated(number: float, after: str, values: _Numbers) -> bool:
    """Whether `number`, followed by `after` in the claim, is a tool value put another way: a share as a
    percentage (0.82 as 82%), a scaled count (8,799,800 as 8.8 million), a temperature in the other unit."""
    unit = re.match(r"\s*(%|percent\b|per cent\b|°\s*[cf]?|degrees?\b|(thousand|million|billion|trillion|mn|bn|k|m|b)\b)",
                    after)
    if unit is None:
        return False
    if unit.group(2):
        return values.holds_same(number * _SCALE[unit.group(2)])
    if unit.group(1).startswith(("%", "per")):
        share = number / 100
        return values.any(lambda v: 0 < abs(v) <= 1 and _same(share, v), *_window(share))

    def other_unit(v: float) -> bool:
        return _same(number, v * 9 / 5 + 32) or _same(number, (v - 32) * 5 / 9)

    low, high = _window(number)  # where v * 9 / 5 + 32, or (v - 32) * 5 / 9, must lie
    return (values.any(other_unit, (low - 32) * 5 / 9, (high - 32) * 5 / 9)
            or values.any(other_unit, low * 9 / 5 + 32, high * 9 / 5 + 32))


@memoized_by_digest(_READ_RESULTS)
def _result_numbers(result: str) -> tuple[float, ...]:
    """All the values a tool result holds: every JSON leaf (every item of a list), or the `name: number` values
    of a text result. Not every number of a text: a flight number, a date or a room number in it ("Flight UA
    1234 ..., price: $320") would excuse an answer that gives it as the price."""
    out: list[float] = []
    data = parse_json(result)
    if data is not None:
        _all_leaves(data, out)
    else:
        out.extend(value for _field, value in _numeric_fields(result))
    return tuple(out)


def _all_leaves(data: Any, out: list[float], depth: int = 0) -> None:
    if isinstance(data, Mapping) and depth < 16:
        for value in data.values():
            _all_leaves(value, out, depth + 1)
    elif isinstance(data, list) and depth < 16:
        for item in data[:500]:
            _all_leaves(item, out, depth + 1)
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        out.append(float(data))
    elif isinstance(data, str) and re.fullmatch(_NUMBER, data.strip()):
        number = _to_number(data.strip())
        if number is not None:
            out.append(number)


def _money_contradiction(claim_l: str, claim: str, turn: TurnResults) -> Finding | None:
    """The one amount of money an answer states, when the tools returned one price and not that amount."""
    fields = turn.money_fields
    if len(fields) != 1:
        return None  # other numbers came back too (a quantity, a rate): the amount may be computed from them
    money = [(tool, f, v) for (tool, f), v in fields.items() if _MONEY_FIELD.search(f)]
    amounts = [m for m in _MONEY_CLAIM.finditer(claim_l)
               if not _CHANGE.search(claim_l[max(m.start() - 15, 0):m.end() + 20])]
    if len(money) != 1 or len(amounts) != 1 or len(fields) != 1:
        return None  # other numbers came back too (a quantity, a rate): the amount may be computed from them
    if len(_CLAIM_NUMBER.findall(claim_l)) > 1 or _DERIVED.search(claim_l):
        return None  # "3 tickets ... $45", "with 8% tax, $108", "about $108 in US dollars"
    text = amounts[0].group(1) or amounts[0].group(2)
    number = _to_number(text)
    if number is None or turn.values.holds_same(number):
        return None
    tool, field, value = money[0]
    return Finding("contradiction", f"the answer says {field} is {text} but {tool} returned {_fmt(value)}",
                   shorten(claim[max(amounts[0].start() - 40, 0) : amounts[0].end() + 40]))


def _nearest_in_clause(
    text: str, numbers: Sequence[tuple[int, int, str]], start: int, end: int, reach: int = 30
) -> tuple[str, int] | None:
    best: tuple[int, str, int] | None = None
    for n_start, n_end, number in numbers:
        if n_end <= start:
            gap = text[n_end:start]
        elif n_start >= end:
            gap = text[end:n_start]
        else:
            continue
        if len(gap) > reach or re.search(r"[;:!?()]|\.\s|\band\b|\bbut\b", gap):
            continue  # another clause: the number is about something else
        if best is None or len(gap) < best[0]:
            best = (len(gap), number, n_start)
    return (best[1], best[2]) if best else None


def _walk(data: Any, prefix: str, out: dict[str, float]) -> None:
    if isinstance(data, Mapping):
        for key, value in data.items():
            _walk(value, f"{prefix}_{key}" if prefix and isinstance(value, (int, float)) else str(key), out)
    elif isinstance(data, list):
        for item in data[:50]:
            _walk(item, prefix, out)
    elif isinstance(data, (int, float)) and not isinstance(data, bool) and prefix:
        out.setdefault(prefix.lower(), float(data))
    elif isinstance(data, str) and prefix and re.fullmatch(_NUMBER, data.strip()):
        number = _to_number(data.strip())
        if number is not None:
            out.setdefault(prefix.lower(), number)


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _same(a: float, b: float) -> bool:
    # An answer may round: 12.4 stated as 12 is not a contradiction, 12 stated as 15 is.
    if not (math.isfinite(a) and math.isfinite(b)):
        return a == b  # round() of NaN (which json.loads reads, and Python's json.dumps writes) raises
    return abs(a - b) <= max(0.5, 0.01 * abs(b)) or round(a) == round(b)


def _fmt(value: float) -> str:
    return str(int(value)) if math.isfinite(value) and value == int(value) else str(value)
