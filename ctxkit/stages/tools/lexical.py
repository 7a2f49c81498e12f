"""BM25 over tool documents, with per-field weights (a tool's name counts more than its parameter notes).

Small and exact: an inverted index of numpy arrays, scored per query term. A catalog of ten thousand
tools scores in well under a millisecond, so there is nothing to approximate.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from .text import ToolDocument, terms

DEFAULT_FIELD_WEIGHTS: Mapping[str, float] = {
    "name": 3.0, "description": 1.0, "param_names": 1.5, "param_descriptions": 0.5,
}


class LexicalIndex:
    """BM25F-style scores: term frequencies are summed across fields with each field's weight."""

    def __init__(self, documents: Sequence[ToolDocument], *, k1: float = 1.2, b: float = 0.75,
                 field_weights: Mapping[str, float] = DEFAULT_FIELD_WEIGHTS) -> None:
        self.size = len(documents)
        self.k1 = k1
        self.b = b
        frequencies: list[dict[str, float]] = []
        lengths = np.zeros(self.size, dtype=np.float32)
        for i, document in enumerate(documents):
            tf: dict[str, float] = defaultdict(float)
            for field, words in document.fields().items():
                weight = field_weights.get(field, 1.0)
                for word in words:
                    tf[word] += weight
            frequencies.append(tf)
            lengths[i] = sum(tf.values())
        average = float(lengths.mean()) if self.size else 1.0
        norm = k1 * (1 - b + b * lengths / max(average, 1e-9))
        postings: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for i, tf in enumerate(frequencies):
            for word, f in tf.items():
                postings[word].append((i, f))
        self._postings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for word, items in postings.items():
            ids = np.fromiter((i for i, _ in items), dtype=np.int64, count=len(items))
            tf_arr = np.fromiter((f for _, f in items), dtype=np.float32, count=len(items))
            idf = math.log(1 + (self.size - len(items) + 0.5) / (len(items) + 0.5))
            self._postings[word] = (ids, idf * tf_arr * (k1 + 1) / (tf_arr + norm[ids]))

    def scores(self, query: str | Sequence[str]) -> np.ndarray:
        """BM25 score of every document for the query's terms (a repeated query term counts once)."""
        words = terms(query) if isinstance(query, str) else list(query)
        out = np.zeros(self.size, dtype=np.float32)
        for word in set(words):
            hit = self._postings.get(word)
            if hit is not None:
                out[hit[0]] += hit[1]
        return out
