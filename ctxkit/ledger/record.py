"""One ledger record per call: what the app asked to send, what was sent, and which stage saved what."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class LedgerRecord:
    """A call, as written to the JSON-lines ledger.

    tokens_naive:   prompt tokens of the request as the app made it (all its messages, all its tools).
    tokens_sent:    prompt tokens the backend received after every stage (0 when a stage answered).
    tokens_out:     completion tokens generated, over every backend call of the call (0 when a stage
                    answered: a cache hit's answer is counted in out_saved instead).
    saved_by_stage: prompt tokens each stage removed; they add up to tokens_naive - tokens_sent.
    out_saved:      completion tokens not generated because a stage answered (a cache hit).
    tokens_cached:  prompt tokens the backend served from its prefix cache.
    tokens_reported / count_delta: the backend's own prompt count, and reported minus ctxkit's count.
    latency_ms:     time spent in each stage (excluding the rest of the pipeline) and in the backend.
    cost_usd / cost_naive_usd: estimated cost of this call (a summarizing model's calls made for it included),
                    and of the call without ctxkit.
    status:         "ok", or "error" with error_type/error (a failed call is never recorded as a success).
    """

    id: str
    ts: float
    backend: str
    model: str
    namespace: str
    conversation_id: str | None
    stream: bool
    tokens_naive: int
    tokens_sent: int
    tokens_out: int
    saved_by_stage: dict[str, int]
    out_saved: int = 0
    tokens_cached: int = 0
    tokens_reported: int | None = None
    count_delta: int | None = None
    usage_reported: bool = True
    answered_by: str | None = None
    latency_ms: dict[str, Any] = dataclasses.field(default_factory=dict)
    cost_usd: float = 0.0
    cost_naive_usd: float = 0.0
    status: str = "ok"
    error_type: str | None = None
    error: str | None = None
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def tokens_saved(self) -> int:
        return self.tokens_naive - self.tokens_sent

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> LedgerRecord:
        """A record from its JSON form; ValueError naming the field when something is the wrong type."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        for name, value in values.items():
            expected = _FIELD_TYPES[name]  # every field has an entry (tests/test_core_ledger.py holds to it)
            if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
                raise ValueError(f"field {name!r} is {type(value).__name__}, expected "
                                 f"{' or '.join(t.__name__ for t in expected)}")
        for i, event in enumerate(values.get("events") or []):
            if not isinstance(event, dict):  # the report reads each event's fields
                raise ValueError(f"field 'events'[{i}] is {type(event).__name__}, expected dict")
        for name, kinds in (("saved_by_stage", (int,)), ("latency_ms", (int, float, dict, type(None)))):
            for key, value in (values.get(name) or {}).items():
                if not isinstance(value, kinds) or isinstance(value, bool):
                    raise ValueError(f"field {name!r}[{key!r}] is {type(value).__name__}")
        try:
            return cls(**values)
        except TypeError as exc:  # a required field missing
            raise ValueError(str(exc)) from None


# What each field may hold in JSON (None where the field is optional); numbers are never booleans.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,), "ts": (int, float), "backend": (str,), "model": (str,), "namespace": (str,),
    "conversation_id": (str, type(None)), "stream": (bool,), "tokens_naive": (int,), "tokens_sent": (int,),
    "tokens_out": (int,), "saved_by_stage": (dict,), "out_saved": (int,), "tokens_cached": (int,),
    "tokens_reported": (int, type(None)), "count_delta": (int, type(None)), "usage_reported": (bool,),
    "answered_by": (str, type(None)), "latency_ms": (dict,), "cost_usd": (int, float),
    "cost_naive_usd": (int, float), "status": (str,), "error_type": (str, type(None)),
    "error": (str, type(None)), "events": (list,),
}
