"""Retrieval over whole test collections: BM25, dense and hybrid runs ``{qid: {docid: score}}``.

Documents are indexed by :attr:`Document.full_text` (title and text).  BRIGHT-style
``Query.excluded_ids`` are removed from each ranking before it is cut to ``k``
(each retriever fetches ``k`` plus the largest number of excluded ids first), so a
query still gets ``k`` documents after the removal.
"""

from __future__ import annotations

import os

from tessera.data.types import Collection
from tessera.errors import EmptyCorpusError, InputError
from tessera.retrieval.bm25 import BM25Index
from tessera.retrieval.dense_index import DenseIndex, encode_corpus, encode_queries, encoder_name
from tessera.retrieval.hybrid import FUSIONS, fuse
from tessera.retrieval.metrics import Run, remove_excluded, truncate_run

RETRIEVERS = ("bm25", "dense", "hybrid")


def _check(collection: Collection, k: int) -> None:
    if not collection.docs:
        raise EmptyCorpusError(f"collection {collection.name or ''} has no documents; check the collection path")
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")


def _extra(collection: Collection) -> int:
    return max((len(q.excluded_ids) for q in collection.queries), default=0)


def _finish(run: Run, collection: Collection, k: int) -> Run:
    if _extra(collection):
        run = remove_excluded(run, collection.queries)
    return truncate_run(run, k)


def bm25_index(collection: Collection) -> BM25Index:
    """BM25 (bm25s, Lucene variant, k1=1.5, b=0.75, English stemming and stopwords) over the documents."""
    return BM25Index.build([d.full_text for d in collection.docs])


def bm25_run(collection: Collection, k: int = 100, index: BM25Index | None = None) -> Run:
    """BM25 (Robertson & Zaragoza 2009) top ``k`` per query."""
    _check(collection, k)
    index = index or bm25_index(collection)
    ids = [d.id for d in collection.docs]
    hits = index.search_many([q.text for q in collection.queries], k + _extra(collection))
    run = {q.id: {ids[i]: s for i, s in h} for q, h in zip(collection.queries, hits)}
    return _finish(run, collection, k)


def dense_index(model, collection: Collection, batch_size: int = 32, spec: str | None = None,
                work_dir: str | os.PathLike | None = None, kind: str = "auto") -> DenseIndex:
    """Encode the documents (:func:`encode_corpus`: length-sorted, resumable with ``work_dir``) into a :class:`DenseIndex`."""
    if not collection.docs:
        raise EmptyCorpusError(f"collection {collection.name or ''} has no documents; check the collection path")
    embs = encode_corpus(model, [d.full_text for d in collection.docs], batch_size=batch_size, work_dir=work_dir,
                         rank=0, world_size=1)
    info = {"spec": spec, "name": encoder_name(model), "max_seq_length": getattr(model, "max_seq_length", None)}
    return DenseIndex.build(embs, [d.id for d in collection.docs], encoder=info, kind=kind)


def dense_run(model, collection: Collection, k: int = 100, batch_size: int = 32, index: DenseIndex | None = None,
              spec: str | None = None, work_dir: str | os.PathLike | None = None) -> Run:
    """Dense retrieval: ``encode_query`` vs ``encode_document`` embeddings, inner product of unit vectors."""
    _check(collection, k)
    index = index or dense_index(model, collection, batch_size=batch_size, spec=spec, work_dir=work_dir)
    q = encode_queries(model, [q.text for q in collection.queries], batch_size=batch_size)
    hits = index.search(q, k + _extra(collection))
    run = {qq.id: dict(h) for qq, h in zip(collection.queries, hits)}
    return _finish(run, collection, k)


def hybrid_run(model, collection: Collection, k: int = 100, batch_size: int = 32, fusion: str = "rrf",
               weights: list[float] | None = None, depth: int | None = None, runs: tuple[Run, Run] | None = None,
               spec: str | None = None, work_dir: str | os.PathLike | None = None) -> Run:
    """BM25 and dense fused (:func:`tessera.retrieval.hybrid.fuse`), top ``k``.

    Each run contributes its top ``depth`` documents (default ``max(k, 100)``);
    ``runs=(bm25_run, dense_run)`` reuses runs already computed at that depth.
    """
    _check(collection, k)
    if fusion not in FUSIONS:
        raise InputError(f"unknown fusion {fusion!r}; use one of {', '.join(FUSIONS)}")
    depth = depth or max(k, 100)
    if runs is None:
        runs = (bm25_run(collection, depth), dense_run(model, collection, depth, batch_size=batch_size, spec=spec, work_dir=work_dir))
    return truncate_run(fuse(list(runs), method=fusion, weights=weights, depth=depth), k)


def retrieve(collection: Collection, retriever: str = "bm25", k: int = 100, model=None, batch_size: int = 32,
             fusion: str = "rrf", spec: str | None = None, work_dir: str | os.PathLike | None = None) -> Run:
    """One entry point for ``retriever`` in :data:`RETRIEVERS` (``model`` is needed for dense and hybrid)."""
    if retriever not in RETRIEVERS:
        raise InputError(f"unknown retriever {retriever!r}; use one of {', '.join(RETRIEVERS)}")
    if retriever == "bm25":
        return bm25_run(collection, k)
    if model is None:
        raise InputError(f"the {retriever} retriever needs an encoder; pass --encoder (e.g. default-encoder)")
    if retriever == "dense":
        return dense_run(model, collection, k, batch_size=batch_size, spec=spec, work_dir=work_dir)
    return hybrid_run(model, collection, k, batch_size=batch_size, fusion=fusion, spec=spec, work_dir=work_dir)


# ------------------------------------------------------------------ collections

#: Named collections and their folders under the shared data (``../shared/data``).
SHARED_COLLECTIONS = {"cranfield": "ir/cranfield", "vaswani": "ir/vaswani", "scifact": "ir/scifact"}
COLLECTION_HELP = "cranfield, vaswani, scifact (train claims), NAME:PATH for those at another path, beir:PATH or bright:PATH"


def open_collection(spec: str, split: str | None = None, task: str | None = None, skip_bad: bool = False) -> Collection:
    """A collection spec -> :class:`Collection`.

    ``cranfield`` | ``vaswani`` | ``scifact`` read ``../shared/data/ir/<name>`` (see
    :func:`tessera.data.paths.shared_data_dir`); ``cranfield:PATH`` etc. read another
    folder; ``beir:PATH`` a BEIR folder (``split``, default ``test``); ``bright:PATH`` a
    BRIGHT folder (``task`` picks ``documents/<task>.jsonl``).  SciFact's ``split``
    defaults to ``train`` (the only split shipped in the shared data).
    """
    from tessera.data import ir
    from tessera.data.paths import shared_data_dir

    spec = (spec or "").strip()
    kind, _, path = spec.partition(":")
    kind = kind.lower()
    if kind in ("beir", "bright") and not path:
        raise InputError(f"--collection {kind} needs a folder: pass {kind}:PATH")
    if kind not in (*SHARED_COLLECTIONS, "beir", "bright"):
        raise InputError(f"unknown collection {spec!r}; pass {COLLECTION_HELP}")
    if not path:
        root = shared_data_dir()
        folder = root / SHARED_COLLECTIONS[kind] if root else None
        if folder is None or not folder.is_dir():
            raise InputError(f"{kind} not found under ../shared/data/{SHARED_COLLECTIONS[kind]}; pass --collection {kind}:PATH "
                             "(or set TESSERA_SHARED_DATA to the shared data folder)")
        path = str(folder)
    if kind == "cranfield":
        return ir.read_cranfield(path, skip_bad=skip_bad)
    if kind == "vaswani":
        return ir.read_vaswani(path, skip_bad=skip_bad)
    if kind == "scifact":
        return ir.read_scifact(path, split=split or "train", skip_bad=skip_bad)
    if kind == "beir":
        return ir.read_beir(path, split=split or "test", skip_bad=skip_bad)
    return ir.read_bright(path, task=task, skip_bad=skip_bad)


def is_collection_spec(spec: str) -> bool:
    kind = spec.partition(":")[0].lower()
    return kind in (*SHARED_COLLECTIONS, "beir", "bright") and (":" in spec or kind in SHARED_COLLECTIONS)
