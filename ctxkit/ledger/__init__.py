"""The ledger beside the pipeline: a record per call of tokens naive/sent/saved, latency and cost."""

from .prices import DEFAULT_PRICES, Price, PriceTable
from .record import LedgerRecord
from .writer import Ledger, read_ledger

__all__ = ["DEFAULT_PRICES", "Ledger", "LedgerRecord", "Price", "PriceTable", "read_ledger"]
