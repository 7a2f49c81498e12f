"""Text helpers shared by the pruning stages: word splitting, BM25 and token counting."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# Chinese, Japanese and Korean are written without spaces: a whole clause, digits and all, is one [^\W_]+ run,
# and a question shares no such run with the passage that answers it. Their characters are terms of their own
# (and the pairs of neighbouring ones, which carry most words), and digits and Latin letters between them are
# split off ("第37号" -> "第", "37", "号").
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK_RUN = re.compile(f"[{_CJK}]+")
_SPLIT_CJK = re.compile(f"[{_CJK}]+|[^\\W_{_CJK}]+", re.UNICODE)
# Function words carry no topic: BM25 gives them a low idf anyway, but on a one-page corpus idf is noisy.
STOPWORDS = frozenset(
    """a an the and or but if then else of to in on at by for with from as is are was were be been being
    it its this that these those there here what which who whom whose when where why how do does did done
    not no nor so than too very can could should would will shall may might must has have had having i you
    he she we they them his her our their your my me us him about into over under after before during
    between through up down out off again further once all any both each few more most other some such only
    own same just also""".split()
)


def words(text: str) -> list[str]:
    """Lower-cased word tokens, stop words dropped (the unit BM25 and the shingles use); Chinese, Japanese
    and Korean text as single characters and pairs of neighbouring characters."""
    out: list[str] = []
    for word in _WORD.findall(text.lower()):
        if not _CJK_RUN.search(word):
            if word not in STOPWORDS:
                out.append(word)
            continue
        for piece in _SPLIT_CJK.findall(word):
            if not _CJK_RUN.fullmatch(piece):
                out.append(piece)
                continue
            out.extend(piece)
            out.extend(piece[i:i + 2] for i in range(len(piece) - 1))
    return out


class BM25:
    """Okapi BM25 over a fixed list of token lists (k1=1.2, b=0.75, Lucene's non-negative idf)."""

    def __init__(self, corpus: Sequence[Sequence[str]], k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.freqs = [Counter(doc) for doc in corpus]
        self.lengths = np.array([len(doc) for doc in corpus], dtype=np.float64)
        self.avg_length = float(self.lengths.mean()) if len(corpus) else 0.0
        df: Counter[str] = Counter()
        for freq in self.freqs:
            df.update(freq.keys())
        n = len(corpus)
        self.idf = {term: math.log(1 + (n - d + 0.5) / (d + 0.5)) for term, d in df.items()}
        # Inverted index: scoring touches only documents that share a term with the query.
        self.postings: dict[str, list[tuple[int, int]]] = {}
        for i, freq in enumerate(self.freqs):
            for term, count in freq.items():
                self.postings.setdefault(term, []).append((i, count))

    def scores(self, query: Sequence[str]) -> np.ndarray:
        out = np.zeros(len(self.freqs), dtype=np.float64)
        if not self.freqs:
            return out
        norm = self.k1 * (1 - self.b + self.b * self.lengths / max(self.avg_length, 1e-9))
        for term in set(query):
            idf = self.idf.get(term)
            if idf is None:
                continue
            for i, tf in self.postings[term]:
                out[i] += idf * tf * (self.k1 + 1) / (tf + norm[i])
        return out


