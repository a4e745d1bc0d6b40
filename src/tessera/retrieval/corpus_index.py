"""A corpus on disk: its documents chunked into passages plus their indexes, cached.

``CorpusIndex.open("python-docs")`` (or a path) reads the documents, chunks them
into passages (sentence-aware, with overlap) and builds a BM25 index, then caches
both under ``$TESSERA_HOME/indexes/<name>-<key>`` where the key hashes the
documents' content and the chunking and index parameters: a changed corpus gets
a new entry, an unchanged one loads in well under a second.  Entries are built
under a temporary name and renamed, so an interrupted build leaves nothing that a
later run could mistake for a finished index.

Dense retrieval (``search(..., retriever="dense"|"hybrid", encoder=SPEC)``) adds a
faiss index over the same passages, built on first use and cached inside the
entry as ``dense-<encoder key>/`` (also written under a temporary name and
renamed); the encoder key hashes the resolved encoder (its folder's file names,
sizes and modification times, or its hub id), so a retrained encoder gets a new
index.  Hybrid is reciprocal-rank fusion (k=60) of BM25 and dense.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tessera.data.chunking import Passage, chunk_documents
from tessera.config import atomic_dir
from tessera.data.types import Document
from tessera.errors import EmptyCorpusError, InputError
from tessera.hub import tessera_home
from tessera.retrieval.bm25 import BM25Index

RETRIEVERS = ("bm25", "dense", "hybrid")

PYTHON_DOCS = "python-docs"
_FORMAT = 2  # bump when the on-disk layout or the chunker changes


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


def encoder_key(spec: str) -> str:
    """A short hash naming an encoder: its resolved folder's files (name, size, mtime) or its hub id."""
    from tessera.hub import resolve_encoder

    resolved = resolve_encoder(spec)
    h = hashlib.sha256(resolved.encode())
    root = Path(resolved)
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(root)}\x00{st.st_size}\x00{st.st_mtime_ns}\x00".encode())
    return h.hexdigest()[:12]


def passage_text(p: Passage) -> str:
    """What the retrievers index for a passage: its document title, then its text."""
    return p.title + "\n" + p.text if p.title else p.text


class CorpusIndex:
    """Passages of a corpus with a BM25 index and, on demand, dense indexes over them."""

    def __init__(self, name: str, passages: list[Passage], bm25: BM25Index, path: Path | None = None, built: bool = False):
        self.name, self.passages, self.bm25, self.path, self.built = name, passages, bm25, path, built
        self._dense: dict[str, object] = {}  # encoder spec -> DenseIndex
        self._encoders: dict[str, object] = {}  # encoder spec -> SentenceTransformer

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
        index = cls(name, passages, BM25Index.build([passage_text(p) for p in passages]), built=True)
        if cache:
            index.save(folder)
        return index

    def save(self, folder: Path) -> None:
        """Write under a temporary name, mark complete, then rename into place."""
        with atomic_dir(folder, keep_existing=True) as tmp:  # another process may have written it meanwhile
            with open(tmp / "passages.jsonl", "w", encoding="utf-8") as f:
                for p in self.passages:
                    f.write(json.dumps(dataclasses.asdict(p), ensure_ascii=False) + "\n")
            self.bm25.save(tmp / "bm25")
            (tmp / "done").write_text(json.dumps({"name": self.name, "passages": len(self.passages)}))
        self.path = folder

    @classmethod
    def load(cls, folder: Path, name: str) -> "CorpusIndex":
        with open(folder / "passages.jsonl", encoding="utf-8") as f:
            passages = [Passage(**json.loads(line)) for line in f]
        return cls(name, passages, BM25Index.load(folder / "bm25"), path=folder)

    def encoder(self, spec: str = "default-encoder"):
        """The loaded encoder for ``spec`` (loaded once per index object)."""
        if spec not in self._encoders:
            from tessera import ui
            from tessera.hub import load_encoder

            with ui.status(f"loading encoder {spec}"):
                self._encoders[spec] = load_encoder(spec)
        return self._encoders[spec]

    def dense(self, spec: str = "default-encoder", batch_size: int = 32):
        """The dense index of the passages under encoder ``spec``: loaded from the cache, or built (and cached)."""
        from tessera.retrieval.dense_index import DenseIndex, encode_corpus, encoder_name

        if spec in self._dense:
            return self._dense[spec]
        folder = self.path / f"dense-{encoder_key(spec)}" if self.path is not None else None
        index = None
        if folder is not None and (folder / "meta.json").is_file():
            index = DenseIndex.load(folder)
            if index.doc_ids != [p.id for p in self.passages]:  # stale or foreign: rebuild
                index = None
        if index is None:
            model = self.encoder(spec)
            work = self.path.parent / f".{self.path.name}.{folder.name}.work" if folder is not None else None
            embs = encode_corpus(model, [passage_text(p) for p in self.passages], batch_size=batch_size, work_dir=work,
                                 rank=0, world_size=1, desc=f"encoding {self.name} passages")
            info = {"spec": spec, "name": encoder_name(model), "max_seq_length": getattr(model, "max_seq_length", None)}
            index = DenseIndex.build(embs, [p.id for p in self.passages], encoder=info)
            if folder is not None:
                index.save(folder)
        self._dense[spec] = index
        return index

    def search(self, query: str, k: int = 5, retriever: str = "bm25", encoder: str = "default-encoder") -> list[Hit]:
        """Top ``k`` passages by BM25, dense retrieval (``encoder``) or their reciprocal-rank fusion."""
        if retriever not in RETRIEVERS:
            raise InputError(f"unknown retriever {retriever!r}; use one of {', '.join(RETRIEVERS)}")
        if k <= 0:
            return []
        if retriever == "bm25":
            return [Hit(self.passages[i], s, r + 1) for r, (i, s) in enumerate(self.bm25.search(query, k))]
        from tessera.retrieval.dense_index import encode_queries
        from tessera.retrieval.hybrid import reciprocal_rank_fusion
        from tessera.retrieval.metrics import ranked

        by_id = {p.id: p for p in self.passages}
        depth = k if retriever == "dense" else max(4 * k, 20)
        dense = self.dense(encoder)
        dense_hits = dense.search(encode_queries(self.encoder(encoder), [query]), depth)[0]
        if retriever == "dense":
            scored = dense_hits
        else:
            bm25_hits = {self.passages[i].id: s for i, s in self.bm25.search(query, depth)}
            scored = ranked(reciprocal_rank_fusion([{"q": bm25_hits}, {"q": dict(dense_hits)}])["q"], k)
        return [Hit(by_id[pid], s, r + 1) for r, (pid, s) in enumerate(scored[:k])]
