"""Cost estimates: USD per million tokens for input, cached input and output, per model.

The defaults are list prices published by OpenAI (checked 2026-11); local models cost nothing per token.
Load your own with `PriceTable.from_file("prices.json")`: `{"model-prefix": {"input": ..,
"cached_input": .., "output": ..}}`. The longest matching model-name prefix wins.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

from ..errors import ConfigurationError


@dataclasses.dataclass(frozen=True)
class Price:
    input: float
    cached_input: float
    output: float

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        uncached = max(prompt_tokens - cached_tokens, 0)
        return (uncached * self.input + cached_tokens * self.cached_input + completion_tokens * self.output) / 1e6


DEFAULT_PRICES: Mapping[str, Price] = {
    "gpt-4o-mini": Price(0.15, 0.075, 0.60),
    "gpt-4o": Price(2.50, 1.25, 10.00),
    "gpt-4.1-nano": Price(0.10, 0.025, 0.40),
    "gpt-4.1-mini": Price(0.40, 0.10, 1.60),
    "gpt-4.1": Price(2.00, 0.50, 8.00),
    "gpt-5-nano": Price(0.05, 0.005, 0.40),
    "gpt-5-mini": Price(0.25, 0.025, 2.00),
    "gpt-5": Price(1.25, 0.125, 10.00),
    "o4-mini": Price(1.10, 0.275, 4.40),
    "o3": Price(2.00, 0.50, 8.00),
}

FREE = Price(0.0, 0.0, 0.0)


class PriceTable:
    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        self._prices = dict(DEFAULT_PRICES if prices is None else prices)

    @classmethod
    def from_file(cls, path: str | Path) -> PriceTable:
        try:
            raw = json.loads(Path(path).read_text())
            return cls({model: Price(float(p["input"]), float(p.get("cached_input", p["input"])), float(p["output"]))
                        for model, p in raw.items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigurationError(f"price table {path}: {exc}") from exc

    def price(self, model: str) -> Price:
        """The price of `model`; models not in the table (local ones) cost nothing."""
        name = model.split("/")[-1].lower()
        for prefix in sorted(self._prices, key=len, reverse=True):
            if name.startswith(prefix.lower()):
                return self._prices[prefix]
        return FREE
