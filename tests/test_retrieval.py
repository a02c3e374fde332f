"""BM25 retrieval: obvious matches come first, and scores equal a brute-force Okapi BM25 (Lucene idf)."""

import math
import random
import re

import pytest
from conftest import DATA  # $LORALAG_TEST_DATA, else ../shared/data

from loralag.errors import LoralagError
from loralag.evaluation.retrieval import BM25Index

DOCS = {
    "beatles": "The Beatles were an English rock band formed in Liverpool in 1960.",
    "everest": "Mount Everest is Earth's highest mountain above sea level, in the Himalayas.",
    "python": "Python is a high-level programming language created by Guido van Rossum.",
    "amazon": "The Amazon river in South America is the largest river by discharge volume of water.",
    "curie": "Marie Curie was a physicist and chemist who conducted research on radioactivity.",
}


@pytest.fixture(scope="module")
def index():
    return BM25Index(list(DOCS.values()), list(DOCS))


def test_obvious_document_is_top_1(index):
    queries = {
        "Which band came from Liverpool?": "beatles",
        "What is the highest mountain in the Himalayas?": "everest",
        "Who created the Python programming language?": "python",
        "Which river has the largest discharge?": "amazon",
        "who researched RADIOACTIVITY": "curie",
    }
    hits = index.search(list(queries), k=1)
    assert [h[0][0] for h in hits] == list(queries.values())
    assert all(len(h) == 1 and h[0][1] > 0 for h in hits)
    assert index.text(hits[0][0][0]) == DOCS["beatles"]


def test_k_order_ties_and_edge_cases(index):
    res = index.search(["river mountain band"], k=3)[0]
    assert len(res) == 3 and [s for _, s in res] == sorted((s for _, s in res), reverse=True)
    assert len(index.search(["band"], k=50)[0]) == len(DOCS)  # k beyond the corpus: every document
    # no known word: every score 0.0, ties broken by document order
    assert index.search(["zebra xylophone", ""], k=2) == [[("beatles", 0.0), ("everest", 0.0)]] * 2
    # stopwords ("the", "is", "in") do not count
    assert index.search(["the is in"], k=1)[0][0][1] == 0.0
    assert index.tokenize("The Beatles, in 1960!") == ["beatles", "1960"]
    assert index.search([], k=1) == []
    with pytest.raises(LoralagError):
        index.search("a single string", k=1)
    with pytest.raises(LoralagError):
        index.search(["band"], k=0)
    with pytest.raises(LoralagError):
        index.text("nope")


def test_bad_corpus():
    with pytest.raises(LoralagError):
        BM25Index([])
    with pytest.raises(LoralagError):
        BM25Index(["a doc", "b doc"], ["x"])
    with pytest.raises(LoralagError, match="unique"):
        BM25Index(["a doc", "b doc"], ["x", "x"])
    with pytest.raises(LoralagError):
        BM25Index(["a doc", 3])
    assert BM25Index(["alpha beta", "gamma"]).search(["gamma"])[0][0][0] == "1"  # default ids
    # no document has a token (punctuation, one-letter words, stopwords): every score 0, no crash
    assert BM25Index(["!!", "x y z", "the of"]).search(["x the"], k=2) == [[("0", 0.0), ("1", 0.0)]]


# ------------------------------------------------------------------------------------------------ brute force

TOKEN = re.compile(r"(?u)\b\w\w+\b")  # bm25s's default token pattern


def brute_force_bm25(docs, query, k1=1.5, b=0.75):
    """Okapi BM25, Lucene's: idf = ln(1 + (N - df + 0.5) / (df + 0.5)), tf part tf / (tf + k1 (1 - b + b dl/avgdl)),
    summed over the query's tokens (repeats count), no stopwords."""
    toks = [TOKEN.findall(d.lower()) for d in docs]
    n = len(toks)
    avgdl = sum(len(t) for t in toks) / n
    scores = []
    for t in toks:
        s = 0.0
        for term in TOKEN.findall(query.lower()):
            df = sum(term in other for other in toks)
            if df == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = t.count(term)
            s += idf * tf / (tf + k1 * (1 - b + b * len(t) / avgdl))
        scores.append(s)
    return scores


def _corpus():
    lama = DATA / "lama-trex" / "P19.jsonl"
    if lama.exists():  # real Wikipedia sentences when the shared data is there
        import json

        with open(lama, encoding="utf-8") as fh:
            recs = [json.loads(next(fh)) for _ in range(40)]
        return [
            " ".join(e["masked_sentence"].replace("[MASK]", e["obj_surface"]) for e in r["evidences"]) for r in recs
        ]
    rng = random.Random(1)
    words = [f"w{i}" for i in range(30)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 25))) for _ in range(40)]


def test_scores_equal_brute_force_bm25():
    docs = _corpus() + ["", "!!"]  # documents with no token count with length 0
    index = BM25Index(docs, stopwords=None)
    rng = random.Random(0)
    vocab = sorted({w for d in docs for w in TOKEN.findall(d.lower())})
    queries = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 6))) for _ in range(30)]
    queries += [docs[3][:60], "unknownword " + vocab[0] + " " + vocab[0]]
    results = index.search(queries, k=len(docs))
    for q, res in zip(queries, results):
        expected = brute_force_bm25(docs, q)
        got = dict(res)
        for i, e in enumerate(expected):
            assert got[str(i)] == pytest.approx(e, rel=1e-9, abs=1e-12), (q, i)
        best = max(range(len(docs)), key=lambda i: (expected[i], -i))
        assert res[0][0] == str(best)


def test_custom_k1_b():
    docs = ["apple banana apple", "banana cherry", "cherry cherry cherry date", "apple"]
    index = BM25Index(docs, k1=0.9, b=0.4, stopwords=None)
    got = dict(index.search(["apple cherry"], k=4)[0])
    exp = brute_force_bm25(docs, "apple cherry", k1=0.9, b=0.4)
    assert [got[str(i)] for i in range(4)] == pytest.approx(exp, rel=1e-9)
