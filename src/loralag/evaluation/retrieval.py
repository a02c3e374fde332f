"""BM25 retrieval over a list of documents, for RAG (the retrieved text goes in the prompt) and PRAG (the
retrieved document's adapter is applied).

Built on `bm25s` with its own tokenizer: lower case, words of two or more word characters
(`(?u)\\b\\w\\w+\\b`), optional English stopwords, no stemming. Scoring is bm25s's "lucene" variant:

    score(q, d) = sum over query tokens t (repeats count) of
                  ln(1 + (N - df_t + 0.5) / (df_t + 0.5)) * tf_td / (tf_td + k1 * (1 - b + b * |d| / avg|d|))

with k1 = 1.5 and b = 0.75 by default. Query words absent from every document are ignored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from loralag.errors import LoralagError

__all__ = ["BM25Index"]


class BM25Index:
    """A BM25 index over `docs`, each known by its id in `ids` (default: "0", "1", ...).

    stopwords: "en" (bm25s's English list) or None / a list of words.
    """

    def __init__(
        self,
        docs: Sequence[str],
        ids: Sequence[str] | None = None,
        *,
        k1: float = 1.5,
        b: float = 0.75,
        stopwords: str | list[str] | None = "en",
    ):
        import bm25s
        from bm25s.tokenization import Tokenizer

        if isinstance(docs, str) or not isinstance(docs, Sequence):
            raise LoralagError("docs must be a list of strings")
        if not docs:
            raise LoralagError("cannot build a BM25 index over no documents")
        for i, d in enumerate(docs):
            if not isinstance(d, str):
                raise LoralagError(f"document {i} is a {type(d).__name__}, not a string")
        if ids is None:
            ids = [str(i) for i in range(len(docs))]
        if isinstance(ids, str) or len(ids) != len(docs):
            raise LoralagError(f"{len(docs)} documents but {1 if isinstance(ids, str) else len(ids)} ids")
        ids = [str(i) for i in ids]
        if len(set(ids)) != len(ids):
            dup = next(i for i, c in Counter(ids).items() if c > 1)
            raise LoralagError(f"document ids must be unique; {dup!r} appears more than once")
        if not (k1 >= 0 and 0 <= b <= 1):
            raise LoralagError(f"need k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")

        self.docs = list(docs)
        self.ids = ids
        self.k1, self.b = float(k1), float(b)
        self._pos = {d: i for i, d in enumerate(ids)}
        self._tokenizer = Tokenizer(lower=True, stopwords=stopwords if stopwords else [])
        self._stop = set(self._tokenizer.stopwords or ())
        # allow_empty=False: a document with no word is empty (length 0), not one "" token
        doc_tokens = self._tokenizer.tokenize(
            self.docs, update_vocab=True, return_as="ids", show_progress=False, allow_empty=False
        )
        self._bm25 = None  # stays None when no document has a single token: every score is then 0
        if any(doc_tokens):
            self._bm25 = bm25s.BM25(k1=self.k1, b=self.b, method="lucene", dtype="float64")
            self._bm25.index(doc_tokens, show_progress=False)

    def __len__(self) -> int:
        return len(self.docs)

    def text(self, doc_id: str) -> str:
        """The text of the document with this id."""
        try:
            return self.docs[self._pos[str(doc_id)]]
        except KeyError:
            raise LoralagError(f"no document with id {doc_id!r}") from None

    def tokenize(self, text: str) -> list[str]:
        """The tokens the index sees in `text`: lower-cased words of 2+ word characters, stopwords dropped."""
        return [w for w in self._tokenizer.splitter(text.lower()) if w not in self._stop]

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for one query (in document order)."""
        if not isinstance(query, str):
            raise LoralagError(f"a query must be a string, got {type(query).__name__}")
        # unknown words are dropped by the tokenizer (update_vocab=False); they would add nothing anyway
        ids = self._tokenizer.tokenize(
            [query], update_vocab=False, return_as="ids", show_progress=False, allow_empty=False
        )[0]
        if not ids or self._bm25 is None:
            return np.zeros(len(self.docs), dtype=np.float64)
        return np.asarray(self._bm25.get_scores_from_ids(ids), dtype=np.float64)

    def search(self, queries: Sequence[str], k: int = 1) -> list[list[tuple[str, float]]]:
        """The k best (id, score) of each query, best first; ties go to the earlier document.

        k larger than the corpus returns every document. A query sharing no word with the corpus scores 0.0
        on every document (its results are then the first k documents).
        """
        if isinstance(queries, str):
            raise LoralagError("queries must be a list of strings (wrap a single query in a list)")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise LoralagError(f"k must be a positive int, got {k!r}")
        k = min(int(k), len(self.docs))
        out = []
        for q in queries:
            s = self.scores(q)
            if k < len(s):
                kth = np.partition(s, len(s) - k)[len(s) - k]  # the k-th largest score
                cand = np.flatnonzero(s >= kth)
            else:
                cand = np.arange(len(s))
            order = cand[np.lexsort((cand, -s[cand]))][:k]
            out.append([(self.ids[i], float(s[i])) for i in order])
        return out
