"""Cost estimates: USD per million tokens for input, cached input and output, per model.

The defaults are list prices published by OpenAI (checked 2026-11); local models cost nothing per token.
Load your own with `PriceTable.from_file("prices.json")`: `{"model-prefix": {"input": ..,
"cached_input": .., "output": ..}}`. The longest matching model-name prefix wins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import numbers
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
    # Models the tokenizer and context tables know: without a price they were silently free.
    "o3-mini": Price(1.10, 0.55, 4.40),
    "o3-pro": Price(20.00, 20.00, 80.00),
    "o1": Price(15.00, 7.50, 60.00),
    "o1-mini": Price(1.10, 0.55, 4.40),
    "o1-pro": Price(150.00, 150.00, 600.00),
    "gpt-5-pro": Price(15.00, 15.00, 120.00),
    "gpt-4.5": Price(75.00, 37.50, 150.00),
    "chatgpt-4o": Price(5.00, 5.00, 15.00),
    "gpt-4-turbo": Price(10.00, 10.00, 30.00),
    "gpt-4": Price(30.00, 30.00, 60.00),
    # "gpt-4" is a prefix of these, whose prices are not gpt-4's:
    "gpt-4-32k": Price(60.00, 60.00, 120.00),
    "gpt-4-0125-preview": Price(10.00, 10.00, 30.00),
    "gpt-4-1106-preview": Price(10.00, 10.00, 30.00),
    "gpt-4-vision": Price(10.00, 10.00, 30.00),
    "gpt-3.5-turbo": Price(0.50, 0.50, 1.50),
    # The longest prefix wins, so a variant priced apart from its family needs its own entry, or it is billed
    # at the family's price (gpt-4o-2024-05-13 at gpt-4o's, o3-deep-research at o3's: a fifth of its price).
    "gpt-4o-2024-05-13": Price(5.00, 5.00, 15.00),
    "gpt-4o-realtime": Price(5.00, 2.50, 20.00),
    "gpt-4o-mini-realtime": Price(0.60, 0.30, 2.40),
    "o3-deep-research": Price(10.00, 2.50, 40.00),
    "o4-mini-deep-research": Price(2.00, 0.50, 8.00),
    "gpt-3.5-turbo-instruct": Price(1.50, 1.50, 2.00),
}

FREE = Price(0.0, 0.0, 0.0)
logger = logging.getLogger("ctxkit")


class PriceTable:
    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        if prices is not None and not isinstance(prices, Mapping):
            raise ConfigurationError(f"prices must be a mapping of model-name prefix to Price, got {type(prices).__name__}")
        self._prices = dict(DEFAULT_PRICES if prices is None else prices)
        for model, price in self._prices.items():
            # A wrong one was taken without a word and failed or lied on a later call: a tuple was an
            # AttributeError in the ledger's cost, a negative or NaN price a negative or NaN cost in every record.
            if not isinstance(price, Price):
                raise ConfigurationError(f"prices[{model!r}] must be a Price(input, cached_input, output), "
                                         f"got {type(price).__name__}")
            for field in ("input", "cached_input", "output"):
                _usd_per_million(getattr(price, field), f"prices[{model!r}].{field}")
        self._unpriced: set[str] = set()

    @classmethod
    def from_file(cls, path: str | Path) -> PriceTable:
        try:
            raw = json.loads(Path(path).read_text())
            return cls({model: _price_in_file(model, entry) for model, entry in raw.items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise ConfigurationError(f"price table {path}: {exc}") from exc

    def price(self, model: str) -> Price:
        """The price of `model`; models not in the table (local ones) cost nothing."""
        name = model.split("/")[-1].lower()
        for prefix in sorted(self._prices, key=len, reverse=True):
            if name.startswith(prefix.lower()):
                return self._prices[prefix]
        from ..tokens.tiktoken_counter import encoding_name_for_model

        if encoding_name_for_model(name) is not None and not name.startswith("gpt-oss") and name not in self._unpriced:
            self._unpriced.add(name)  # an OpenAI model that is not free: say so once, rather than record $0 silently
            logger.warning("ctxkit: no price for model %r; its calls are recorded as costing $0 "
                           "(add it with PriceTable.from_file)", model)
        return FREE


def _price_in_file(model: str, entry: Mapping[str, object]) -> Price:
    """One model's entry of a price file; `cached_input` defaults to `input` (no discount for cached tokens)."""
    given = {"cached_input": entry["input"], **entry}
    return Price(*(_usd_per_million(_read_number(given[field]), f"{model}.{field}")
                   for field in ("input", "cached_input", "output")))


def _read_number(value: object) -> object:
    """A number written as a string ("0.25") read as one; anything else as it is."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def _usd_per_million(value: object, where: str) -> float:
    """A price: a finite number of USD per million tokens, 0 or more (`true` is no price of 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and float(value) >= 0):
        raise ConfigurationError(f"{where} must be a price in USD per million tokens, a finite number >= 0, "
                                 f"got {value!r}")
    return float(value)
