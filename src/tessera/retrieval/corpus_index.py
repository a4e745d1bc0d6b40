"""A corpus on disk: its documents chunked into passages plus their indexes, cached.

``CorpusIndex.open("python-docs")`` (or a path) reads the documents, chunks them
into passages (sentence-aware, with overlap) and builds a BM25 index, then caches
both under ``$TESSERA_HOME/indexes/<name>-<key>`` where the key hashes the
documents' content and the chunking and index parameters: a changed corpus gets
a new entry, an unchanged one loads in well under a second.  Entries are built
under a temporary name and renamed, so an interrupted build leaves nothing that a
later run could mistake for a finished index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tessera.data.chunking import Passage, chunk_documents
from tessera.data.types import Document
from tessera.errors import EmptyCorpusError, InputError
from tessera.hub import tessera_home
from tessera.retrieval.bm25 import BM25Index

PYTHON_DOCS = "python-docs"
_FORMAT = 1  # bump when the on-disk layout or the chunker changes


def corpus_documents(spec: str, skip_bad: bool = False) -> tuple[str, list[Document]]:
    """``python-docs`` (Python's own documentation topics) or a path -> (name, documents)."""
    from tessera.data.text import load_corpus, python_docs_corpus

    if spec == PYTHON_DOCS:
        return PYTHON_DOCS, python_docs_corpus()
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"corpus {spec} not found; pass a file or folder of .txt/.md/.jsonl documents, or 'python-docs'")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.resolve().name or "corpus")[:40]
    return name, load_corpus(path, skip_bad=skip_bad)


def content_key(docs: list[Document], params: dict) -> str:
    h = hashlib.sha256(json.dumps({"format": _FORMAT, **params}, sort_keys=True).encode())
    for d in docs:
        for part in (d.id, d.title, d.text):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
    return h.hexdigest()[:16]


def dedupe_passages(passages: list[Passage]) -> list[Passage]:
    """Keep the first of passages whose whitespace-normalized text is identical.

    Collections repeat text (Python's docs topics have a "compound" topic that
    contains the "function", "if", ... topics verbatim); duplicates would fill the
    top-k with the same words twice.
    """
    seen: set[str] = set()
    kept = []
    for p in passages:
        key = " ".join(p.text.split())
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return kept


@dataclass
class Hit:
    passage: Passage
    score: float
    rank: int


class CorpusIndex:
    """Passages of a corpus with a BM25 index (and, later, dense indexes) over them."""

    def __init__(self, name: str, passages: list[Passage], bm25: BM25Index, path: Path | None = None, built: bool = False):
        self.name, self.passages, self.bm25, self.path, self.built = name, passages, bm25, path, built

    @classmethod
    def open(cls, spec: str = PYTHON_DOCS, max_tokens: int = 160, overlap_sentences: int = 1,
             cache: bool = True, skip_bad: bool = False) -> "CorpusIndex":
        name, docs = corpus_documents(spec, skip_bad=skip_bad)
        return cls.from_documents(docs, name=name, max_tokens=max_tokens, overlap_sentences=overlap_sentences, cache=cache)

    @classmethod
    def from_documents(cls, docs: list[Document], name: str = "corpus", max_tokens: int = 160, overlap_sentences: int = 1,
                       cache: bool = True) -> "CorpusIndex":
        if not docs:
            raise EmptyCorpusError(f"corpus {name} has no documents; add .txt/.md/.jsonl files with text")
        params = {"max_tokens": max_tokens, "overlap_sentences": overlap_sentences, "bm25": "bm25s-lucene-en-stem"}
        folder = tessera_home() / "indexes" / f"{name}-{content_key(docs, params)}"
        if cache and (folder / "done").is_file():
            return cls.load(folder, name)
        passages = dedupe_passages(chunk_documents(docs, max_tokens=max_tokens, overlap_sentences=overlap_sentences))
        if not passages:
            raise EmptyCorpusError(f"corpus {name} has no text to index; add documents with text")
        index = cls(name, passages, BM25Index.build([p.title + "\n" + p.text if p.title else p.text for p in passages]), built=True)
        if cache:
            index.save(folder)
        return index

    def save(self, folder: Path) -> None:
        """Write under a temporary name, mark complete, then rename into place."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            with open(tmp / "passages.jsonl", "w", encoding="utf-8") as f:
                for p in self.passages:
                    f.write(json.dumps(dataclasses.asdict(p), ensure_ascii=False) + "\n")
            self.bm25.save(tmp / "bm25")
            (tmp / "done").write_text(json.dumps({"name": self.name, "passages": len(self.passages)}))
            if folder.exists():
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = folder

    @classmethod
    def load(cls, folder: Path, name: str) -> "CorpusIndex":
        with open(folder / "passages.jsonl", encoding="utf-8") as f:
            passages = [Passage(**json.loads(line)) for line in f]
        return cls(name, passages, BM25Index.load(folder / "bm25"), path=folder)

    def search(self, query: str, k: int = 5) -> list[Hit]:
        return [Hit(self.passages[i], s, r + 1) for r, (i, s) in enumerate(self.bm25.search(query, k))]
