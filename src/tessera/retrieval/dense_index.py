"""Dense retrieval index on faiss, and corpus encoding that is fast, resumable and sharded.

A retriever is a ``sentence_transformers.SentenceTransformer``: documents are
encoded with ``model.encode_document`` and queries with ``model.encode_query``
(sentence-transformers >= 5; query/document prompts live in the model's
``prompts``), embeddings are L2-normalized and scored by inner product (= cosine),
as in DPR (Karpukhin et al. 2020) and every retriever in this package.

Index kinds (``DenseIndex.build(..., kind="auto")``):

- ``flat``: ``faiss.IndexFlatIP``, exact inner product.  ``auto`` uses it up to
  :data:`EXACT_MAX_DOCS` vectors (100k); on this 2-core machine exact search over
  100k x 384 floats costs about 10-20 ms per query, so approximate search buys
  nothing below that size.
- ``hnsw``: ``faiss.IndexHNSWFlat`` with inner-product metric (Malkov & Yashunin
  2018), ``M=32``, ``efConstruction=200``, ``efSearch=128``; needs no training and
  is what ``auto`` picks above the threshold.
- ``ivf``: ``faiss.IndexIVFFlat`` (inverted lists over k-means cells, Jégou et al.
  2011), ``nlist = 4 * sqrt(n)`` cells (at most ``n / 39``, faiss's training rule
  of thumb), ``nprobe = 16``; on request only.

:func:`encode_corpus` encodes documents in batches sorted by their exact token
length (after truncation to the model's ``max_seq_length``): each batch is padded
only to its own longest text, which is where the time goes on CPU.
sentence-transformers sorts by *character* length, a cruder proxy; the benchmark
``benchmarks/retrieval.py`` measures the difference.  With a ``work_dir`` the
embeddings are written in shards (``shard-00000.npy`` ...) as they finish, so an
interrupted run skips finished shards when rerun; under torchrun (``RANK`` /
``WORLD_SIZE``) each rank encodes every ``WORLD_SIZE``-th shard and rank 0 merges.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from tessera.config import atomic_dir, atomic_file
from tessera.errors import EmptyCorpusError, InputError

EXACT_MAX_DOCS = 100_000
KINDS = ("auto", "flat", "hnsw", "ivf")
_FORMAT = 1


# ---------------------------------------------------------------------- encoders


def encoder_name(model) -> str:
    """The model's folder or hub id, as its first module's config records it."""
    for get in (lambda: model[0].auto_model.config._name_or_path, lambda: model.model_card_data.base_model,
                lambda: model.__class__.__name__):
        try:
            name = get()
        except Exception:
            continue
        if name:
            return str(name)
    return "unknown"


def embedding_dim(model) -> int | None:
    for attr in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
        fn = getattr(model, attr, None)
        if fn is not None:
            try:
                return fn()
            except Exception:
                return None
    return None


def encode_queries(model, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Query embeddings (``model.encode_query``: the model's query prompt applies), L2-normalized, float32."""
    if not texts:
        return np.zeros((0, embedding_dim(model) or 0), dtype=np.float32)
    embs = model.encode_query(list(texts), batch_size=batch_size, normalize_embeddings=True,
                              convert_to_numpy=True, show_progress_bar=False)
    return np.ascontiguousarray(embs, dtype=np.float32)


def token_lengths(model, texts: list[str], chunk: int = 8192) -> np.ndarray:
    """Each text's length in the model's tokens after truncation to ``max_seq_length``.

    Falls back to character counts for models without a Hugging Face tokenizer.
    """
    tok = getattr(model, "tokenizer", None)
    max_len = getattr(model, "max_seq_length", None)
    try:
        out = []
        for s in range(0, len(texts), chunk):
            enc = tok(list(texts[s : s + chunk]), add_special_tokens=True, truncation=max_len is not None, max_length=max_len,
                      return_attention_mask=False, return_token_type_ids=False)
            out.extend(len(ids) for ids in enc["input_ids"])
        return np.asarray(out, dtype=np.int64)
    except Exception:
        return np.asarray([len(t) for t in texts], dtype=np.int64)


def _model_signature(model) -> str:
    """Cheap fingerprint of a model's identity and weights (name, layout, parameter sums)."""
    h = hashlib.sha256(encoder_name(model).encode())
    h.update(repr(model).encode())
    h.update(str(getattr(model, "max_seq_length", None)).encode())
    h.update(json.dumps(getattr(model, "prompts", {}) or {}, sort_keys=True).encode())
    try:
        import torch

        with torch.no_grad():
            for p in model.parameters():
                h.update(np.float64(p.detach().double().sum().item()).tobytes())
                h.update(np.float64(p.detach().double().abs().sum().item()).tobytes())
    except Exception:
        pass
    return h.hexdigest()


def _texts_signature(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def dist_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the arguments, else torch.distributed's, else ``RANK``/``WORLD_SIZE`` env, else (0, 1)."""
    if rank is None or world_size is None:
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank() if rank is None else rank
                world_size = dist.get_world_size() if world_size is None else world_size
        except Exception:
            pass
    try:
        rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    except ValueError:
        raise InputError("RANK and WORLD_SIZE must be integers (set by torchrun)") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size})")
    return rank, world_size


def shard_plan(lengths: np.ndarray, shard_size: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``(order, shards)``: document positions longest first, and ``[(start, end)]`` slices of ``order``."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    n = len(order)
    return order, [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def rank_shards(n_shards: int, rank: int, world_size: int) -> list[int]:
    """Shards a rank encodes: every ``world_size``-th, starting at ``rank`` (round robin keeps the
    long and the short documents evenly spread over ranks)."""
    return list(range(rank, n_shards, world_size))


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _load_shard(path: Path, rows: int) -> np.ndarray | None:
    try:
        arr = np.load(path)
    except (OSError, ValueError, EOFError):
        return None
    return arr if arr.ndim == 2 and arr.shape[0] == rows else None


def _check_encode_args(texts, batch_size: int, work_dir, shard_size: int | None, rank: int | None,
                       world_size: int | None) -> tuple[list[str], int, int, int]:
    """Validate :func:`encode_corpus`'s inputs: ``(texts as str, shard size, rank, world size)``."""
    texts = [str(t) for t in texts]
    if not texts:
        raise EmptyCorpusError("no documents to encode; give a corpus with at least one document")
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    rank, world_size = dist_rank_world(rank, world_size)
    if world_size > 1 and work_dir is None:
        raise InputError("encoding across several ranks needs a work_dir that every rank can see")
    shard_size = int(shard_size or 32 * batch_size)
    if shard_size < 1:
        raise InputError(f"shard size must be at least 1, got {shard_size}")
    return texts, shard_size, rank, world_size


def _shard_folder(model, texts: list[str], work_dir, shard_size: int, n_shards: int, normalize: bool) -> Path:
    """``work_dir/<fingerprint>``: the shard folder of this model, corpus and shard size, with its manifest."""
    key = hashlib.sha256(
        json.dumps({"model": _model_signature(model), "texts": _texts_signature(texts), "n": len(texts),
                    "shard_size": shard_size, "normalize": normalize, "format": _FORMAT}).encode()
    ).hexdigest()[:16]
    folder = Path(work_dir) / key
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.json"
    if not manifest.exists():
        from tessera.config import atomic_write_text

        atomic_write_text(manifest, json.dumps({"encoder": encoder_name(model), "n_texts": len(texts), "shard_size": shard_size,
                                                "n_shards": n_shards, "normalize": normalize}))
    return folder


class _ShardEncoder:
    """Encodes shards of length-sorted documents; kept on disk in ``folder`` (resumable) or in memory."""

    def __init__(self, model, texts: list[str], order: np.ndarray, shards: list[tuple[int, int]], batch_size: int,
                 normalize: bool, folder: Path | None):
        self.model, self.texts, self.order, self.shards = model, texts, order, shards
        self.batch_size, self.normalize, self.folder = batch_size, normalize, folder
        self.done: dict[int, np.ndarray] = {}

    def shard_path(self, i: int) -> Path:
        return self.folder / f"shard-{i:05d}.npy"

    def rows(self, ids: list[int]) -> int:
        return sum(self.shards[i][1] - self.shards[i][0] for i in ids)

    def encode(self, ids: list[int], progress, task) -> None:
        """Encode shards ``ids``, skipping those already on disk."""
        for i in ids:
            start, end = self.shards[i]
            if self.folder is not None:
                arr = _load_shard(self.shard_path(i), end - start)
                if arr is not None:
                    progress.advance(task, end - start)
                    continue
            parts = []
            for s in range(start, end, self.batch_size):
                idx = self.order[s : min(s + self.batch_size, end)]
                emb = self.model.encode_document([self.texts[j] for j in idx], batch_size=self.batch_size,
                                                 normalize_embeddings=self.normalize, convert_to_numpy=True,
                                                 show_progress_bar=False)
                parts.append(np.asarray(emb, dtype=np.float32))
                progress.advance(task, len(idx))
            arr = np.concatenate(parts, axis=0)
            if self.folder is not None:
                _save_npy_atomic(self.shard_path(i), arr)
            else:
                self.done[i] = arr

    def merge(self) -> np.ndarray:
        """All shards' embeddings in input order (a shard lost since it was written is encoded again)."""
        out = None
        for i, (start, end) in enumerate(self.shards):
            arr = self.done[i] if self.folder is None else _load_shard(self.shard_path(i), end - start)
            if arr is None:  # a shard file vanished or was corrupted between writing and merging: redo it
                self.encode([i], _NullProgress(), None)
                arr = _load_shard(self.shard_path(i), end - start)
            if out is None:
                out = np.empty((len(self.texts), arr.shape[1]), dtype=np.float32)
            out[self.order[start:end]] = arr
        return out


def _dist_barrier() -> None:
    """Wait for every rank, if a torch.distributed process group is initialized."""
    try:
        import torch.distributed as dist

        group = dist.is_available() and dist.is_initialized()
    except Exception:
        group = False
    if group:
        dist.barrier()


def _encode_rank(enc: _ShardEncoder, rank: int, world_size: int, desc: str) -> bool:
    """Encode this rank's shards; on rank 0 also any other rank's shard still missing.  ``False`` on ranks > 0."""
    from tessera import ui

    mine = rank_shards(len(enc.shards), rank, world_size)
    with ui.progress() as progress:
        total = enc.rows(mine)
        task = progress.add_task(desc if world_size == 1 else f"{desc} (rank {rank}/{world_size})", total=total)
        enc.encode(mine, progress, task)
        if world_size > 1:
            _dist_barrier()
            if rank != 0:
                return False
            missing = [i for i in range(len(enc.shards)) if i not in mine and not enc.shard_path(i).exists()]
            if missing:
                progress.update(task, total=total + enc.rows(missing))
                enc.encode(missing, progress, task)
    return True


def _remove_shards(folder: Path, work_dir) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    try:
        Path(work_dir).rmdir()  # only if now empty
    except OSError:
        pass


def encode_corpus(
    model,
    texts: list[str],
    batch_size: int = 32,
    *,
    work_dir: str | os.PathLike | None = None,
    shard_size: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    normalize: bool = True,
    cleanup: bool = True,
    desc: str = "encoding documents",
) -> np.ndarray | None:
    """Document embeddings ``(len(texts), dim)`` float32 in input order (``None`` on ranks > 0).

    Length-sorted batching: texts are ordered by exact token length, longest first,
    and cut into batches of ``batch_size``, each passed to ``model.encode_document``;
    padding is then as small as fixed-size batches allow.

    Resumable: with ``work_dir``, the sorted texts are grouped into shards of
    ``shard_size`` texts (default ``32 * batch_size``), each saved to
    ``work_dir/<fingerprint>/shard-NNNNN.npy`` (written under a temporary name and
    renamed) as soon as it is done; a rerun with the same model, texts and shard
    size skips the shards already on disk.  ``cleanup`` deletes the shards once
    rank 0 has merged them.

    Sharded across ranks: ``rank``/``world_size`` (default: torch.distributed's, or
    the ``RANK``/``WORLD_SIZE`` variables torchrun sets) pick this process's shards
    (:func:`rank_shards`).  ``work_dir`` must then be a folder all ranks see.  With
    an initialized process group, ranks meet at a barrier and rank 0 merges; without
    one, rank 0 encodes any shard still missing itself, so its result never depends
    on the other processes having finished.
    """
    texts, shard_size, rank, world_size = _check_encode_args(texts, batch_size, work_dir, shard_size, rank, world_size)
    order, shards = shard_plan(token_lengths(model, texts), shard_size)
    folder = None if work_dir is None else _shard_folder(model, texts, work_dir, shard_size, len(shards), normalize)
    enc = _ShardEncoder(model, texts, order, shards, batch_size, normalize, folder)
    if not _encode_rank(enc, rank, world_size, desc):
        return None
    out = enc.merge()
    if folder is not None and cleanup:
        _remove_shards(folder, work_dir)
    return out


class _NullProgress:
    def advance(self, *args, **kwargs) -> None:
        pass


# ------------------------------------------------------------------------- index


def _faiss():
    import faiss

    return faiss


class DenseIndex:
    """Document embeddings in a faiss inner-product index, with their ids and the encoder that made them.

    ``DenseIndex.build(embeddings, doc_ids, encoder={"spec": ..})`` then
    ``search(query_embeddings, k)`` -> per query ``[(doc_id, score)]`` best first.
    ``save(folder)`` / ``DenseIndex.load(folder)`` round-trip the index, ids and
    metadata (``index.faiss``, ``doc_ids.json``, ``meta.json``).
    """

    def __init__(self, index, doc_ids: list[str], encoder: dict | None = None, kind: str = "flat", params: dict | None = None):
        self.index, self.doc_ids, self.kind = index, list(doc_ids), kind
        self.encoder = dict(encoder or {})
        self.params = dict(params or {})

    @classmethod
    def build(cls, embeddings: np.ndarray, doc_ids: list[str], encoder: dict | str | None = None, kind: str = "auto",
              hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 128, nlist: int | None = None,
              nprobe: int = 16) -> "DenseIndex":
        faiss = _faiss()
        emb = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
        doc_ids = [str(d) for d in doc_ids]
        if emb.ndim != 2 or emb.shape[0] == 0:
            raise EmptyCorpusError("cannot build a dense index without embeddings; give a corpus with at least one document")
        if emb.shape[0] != len(doc_ids):
            raise InputError(f"{emb.shape[0]} embeddings but {len(doc_ids)} document ids; give one id per embedding")
        if len(set(doc_ids)) != len(doc_ids):
            dup = next(d for i, d in enumerate(doc_ids) if d in doc_ids[:i])
            raise InputError(f"duplicate document id {dup!r}; document ids must be unique")
        if kind not in KINDS:
            raise InputError(f"unknown index kind {kind!r}; use one of {', '.join(KINDS)}")
        n, d = emb.shape
        if kind == "auto":
            kind = "flat" if n <= EXACT_MAX_DOCS else "hnsw"
        params: dict = {}
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.hnsw.efSearch = ef_search
            params = {"M": hnsw_m, "efConstruction": ef_construction, "efSearch": ef_search}
        else:
            nlist = int(nlist or max(1, min(int(4 * np.sqrt(n)), n // 39)))
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(emb)
            index.nprobe = min(nprobe, nlist)
            params = {"nlist": nlist, "nprobe": index.nprobe}
        index.add(emb)
        if isinstance(encoder, str):
            encoder = {"spec": encoder}
        return cls(index, doc_ids, {**(encoder or {}), "dim": d}, kind, params)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, query_embs: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
        """Top ``k`` documents per query row, ``[(doc_id, inner product)]`` best first."""
        q = np.ascontiguousarray(np.asarray(query_embs, dtype=np.float32))
        if q.ndim == 1:
            q = q[None, :]
        if q.shape[0] == 0:
            return []
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InputError(f"query embeddings have dimension {q.shape[-1]} but the index holds {self.dim}-d vectors; "
                             f"encode queries with the index's encoder ({self.encoder.get('spec') or self.encoder.get('name', '?')})")
        k = min(int(k), len(self))
        if k < 1:
            return [[] for _ in range(q.shape[0])]
        scores, ids = self.index.search(q, k)
        return [[(self.doc_ids[i], float(s)) for s, i in zip(srow, irow) if i >= 0] for srow, irow in zip(scores, ids)]

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``index.faiss``, ``doc_ids.json`` and ``meta.json`` to a temporary folder, then rename it into place."""
        faiss = _faiss()
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            (tmp / "doc_ids.json").write_text(json.dumps(self.doc_ids, ensure_ascii=False), encoding="utf-8")
            meta = {"format": _FORMAT, "kind": self.kind, "n": len(self), "dim": self.dim, "encoder": self.encoder, "params": self.params}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "DenseIndex":
        faiss = _faiss()
        folder = Path(folder)
        files = [folder / n for n in ("index.faiss", "doc_ids.json", "meta.json")]
        if not all(f.is_file() for f in files):
            raise InputError(f"{folder} is not a dense index folder (needs index.faiss, doc_ids.json, meta.json); build one with `tessera retrieval index`")
        meta = json.loads(files[2].read_text(encoding="utf-8"))
        doc_ids = json.loads(files[1].read_text(encoding="utf-8"))
        index = faiss.read_index(str(files[0]))
        if meta.get("kind") == "hnsw" and "efSearch" in meta.get("params", {}):
            index.hnsw.efSearch = meta["params"]["efSearch"]
        if meta.get("kind") == "ivf" and "nprobe" in meta.get("params", {}):
            index.nprobe = meta["params"]["nprobe"]
        if index.ntotal != len(doc_ids):
            raise InputError(f"{folder}: the index holds {index.ntotal} vectors but doc_ids.json {len(doc_ids)} ids; rebuild the index")
        return cls(index, doc_ids, meta.get("encoder"), meta.get("kind", "flat"), meta.get("params"))


