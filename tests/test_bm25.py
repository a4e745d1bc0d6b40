from tessera.errors import EmptyCorpusError
from tessera.retrieval.bm25 import BM25Index

import pytest

TEXTS = [
    "The cat sat on the mat.",
    "Dogs are running in the park.",
    "Python functions can have default argument values.",
    "Lists are mutable sequences in Python.",
]


def test_ranking_stemming_and_roundtrip(tmp_path):
    idx = BM25Index.build(TEXTS)
    assert len(idx) == 4
    assert idx.search("default values of function arguments", 2)[0][0] == 2
    assert idx.search("a dog runs", 1)[0][0] == 1  # stems: dogs->dog, running->run
    idx.save(tmp_path / "bm25")
    again = BM25Index.load(tmp_path / "bm25")
    assert again.search("mutable python lists", 4) == idx.search("mutable python lists", 4)


def test_no_matching_terms_and_k_larger_than_corpus():
    idx = BM25Index.build(TEXTS)
    assert idx.search("zzzz qqqq", 3) == []
    hits = idx.search("python", 50)
    assert sorted(i for i, _ in hits) == [2, 3]
    scores = [s for _, s in hits]
    assert scores == sorted(scores, reverse=True)


def test_empty_corpus():
    with pytest.raises(EmptyCorpusError):
        BM25Index.build([])
