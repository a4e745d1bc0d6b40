"""BM25 over passages with bm25s (sparse matrices, stemming with PyStemmer, English stopwords)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tessera.errors import EmptyCorpusError


def _stemmer(language: str | None):
    if not language:
        return None
    import Stemmer

    return Stemmer.Stemmer(language)


class BM25Index:
    """``BM25Index.build(texts)`` then ``search(query, k)`` -> ``[(row, score)]``.

    Rows are positions in the list of texts the index was built from; bm25s'
    defaults (Lucene variant, k1=1.5, b=0.75) apply.
    """

    def __init__(self, retriever, stemmer: str | None = "english", stopwords: str | None = "en"):
        self.retriever = retriever
        self.stemmer_language = stemmer
        self.stopwords = stopwords
        self._stem = _stemmer(stemmer)

    @classmethod
    def build(cls, texts: list[str], stemmer: str | None = "english", stopwords: str | None = "en", k1: float = 1.5, b: float = 0.75) -> "BM25Index":
        import bm25s

        if not texts:
            raise EmptyCorpusError("cannot build a BM25 index over an empty corpus; give a corpus with at least one document")
        tokens = bm25s.tokenize(list(texts), stopwords=stopwords or [], stemmer=_stemmer(stemmer), show_progress=False)
        if not tokens.vocab:  # bm25s itself fails here with "max() arg is an empty sequence"
            raise EmptyCorpusError("cannot build a BM25 index: the corpus has no searchable words (only stopwords such as "
                                   "'a' or 'the', or no words at all); give documents with text")
        retriever = bm25s.BM25(k1=k1, b=b)
        retriever.index(tokens, show_progress=False)
        return cls(retriever, stemmer=stemmer, stopwords=stopwords)

    def __len__(self) -> int:
        return int(self.retriever.scores["num_docs"])

    def search_many(self, queries: list[str], k: int = 10) -> list[list[tuple[int, float]]]:
        import bm25s

        k = min(k, len(self))
        tokens = bm25s.tokenize(list(queries), stopwords=self.stopwords or [], stemmer=self._stem, return_ids=False, show_progress=False)
        vocab = self.retriever.vocab_dict
        ids = [[vocab[t] for t in q if t in vocab] for q in tokens]
        results = []
        for q_ids in ids:
            if not q_ids:  # no query term is in the vocabulary: nothing matches
                results.append([])
                continue
            scores = self.retriever.get_scores(q_ids)
            top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
            top = top[np.argsort(-scores[top], kind="stable")]
            results.append([(int(i), float(scores[i])) for i in top if scores[i] > 0])
        return results

    def search(self, query: str, k: int = 10) -> list[tuple[int, float]]:
        return self.search_many([query], k)[0]

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.retriever.save(str(folder), show_progress=False)
        (folder / "tessera_bm25.json").write_text(json.dumps({"stemmer": self.stemmer_language, "stopwords": self.stopwords}))

    @classmethod
    def load(cls, folder: str | Path) -> "BM25Index":
        import bm25s

        folder = Path(folder)
        meta = json.loads((folder / "tessera_bm25.json").read_text())
        retriever = bm25s.BM25.load(str(folder), show_progress=False, verbosity=0)
        return cls(retriever, stemmer=meta["stemmer"], stopwords=meta["stopwords"])
