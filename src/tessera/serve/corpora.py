"""Corpora by id: the server's configured ones and uploads, each indexed by a background job.

A request names a corpus only by its id; the paths behind ids come from the server's
config (``--corpus``) or from uploads the server stored itself under
``upload_dir/<id>/`` (file names reduced to a safe base name).  An upload's id is a
slug of its name plus a hash of its content, so uploading the same files twice
gives the same corpus.  Uploads found in ``upload_dir`` at start are served again.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from tessera.config import atomic_dir
from tessera.data.text import CORPUS_SUFFIXES
from tessera.errors import TesseraError
from tessera.retrieval.corpus_index import PYTHON_DOCS, CorpusIndex
from tessera.serve.engine import ApiError, Job, JobManager

_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")


def slug(text: str, limit: int = 32) -> str:
    s = _SLUG.sub("-", text).strip("-.")[:limit].strip("-.")
    return s or "corpus"


def safe_filename(name: str) -> str:
    """The base name of an uploaded file, reduced to ``[A-Za-z0-9_.-]`` (no folders, no leading dots)."""
    base = re.split(r"[\\/]", name or "")[-1]
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    clean = slug(stem, 80)
    return f"{clean}.{ext.lower()}" if ext else clean


@dataclass
class CorpusEntry:
    id: str
    name: str
    kind: str  # config | upload
    spec: str  # python-docs or a server-side path (never shown)
    status: str = "indexing"
    index: CorpusIndex | None = None
    documents: int | None = None
    dense: str = "unavailable"
    job_id: str | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "kind": self.kind, "status": self.status, "documents": self.documents,
                "passages": len(self.index.passages) if self.index is not None else None, "dense": self.dense,
                "job_id": self.job_id, "error": self.error}


class CorpusRegistry:
    """The corpora a server answers from, by id (thread-safe)."""

    def __init__(self, config, jobs: JobManager):
        self.config, self.jobs = config, jobs
        self.entries: dict[str, CorpusEntry] = {}
        self.default_id: str | None = None
        self._lock = threading.Lock()
        self.upload_root = config.uploads_path()

    # -- configured corpora ----------------------------------------------------------
    def add_configured(self, spec: str) -> CorpusEntry:
        """Open (build or load the cached BM25 index of) a corpus from the server's config, now."""
        from tessera.retrieval.corpus_index import corpus_documents

        name, docs = corpus_documents(spec)
        index = CorpusIndex.from_documents(docs, name=name)
        cid = self._unique(slug(name) if spec != PYTHON_DOCS else PYTHON_DOCS)
        entry = CorpusEntry(cid, name, "config", spec, status="ready", index=index, documents=len(docs))
        entry.dense = "not built" if self.config.encoder else "unavailable"
        with self._lock:
            self.entries[cid] = entry
            self.default_id = self.default_id or cid
        if self.config.encoder and self.config.prebuild_dense:
            self._submit_dense(entry)
        return entry

    def restore_uploads(self) -> None:
        """Serve again the uploads a previous run stored (indexes load from the cache)."""
        if not self.upload_root.is_dir():
            return
        for folder in sorted(p for p in self.upload_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if folder.name in self.entries or len(self.uploads()) >= self.config.max_uploaded_corpora:
                continue
            entry = CorpusEntry(folder.name, folder.name.rsplit("-", 1)[0], "upload", str(folder))
            with self._lock:
                self.entries[entry.id] = entry
            self._submit_index(entry)

    def _unique(self, cid: str) -> str:
        with self._lock:
            base, n = cid, 2
            while cid in self.entries:
                cid, n = f"{base}-{n}", n + 1
            return cid

    # -- lookups ---------------------------------------------------------------------
    def list(self) -> list[dict]:
        with self._lock:
            return [e.to_dict() for e in self.entries.values()]

    def uploads(self) -> list[CorpusEntry]:
        with self._lock:
            return [e for e in self.entries.values() if e.kind == "upload"]

    def get(self, cid: str) -> CorpusEntry:
        with self._lock:
            entry = self.entries.get(cid)
        if entry is None:
            raise ApiError(400, "unknown_corpus", f"no corpus with id {cid!r}; use an id from GET /v1/corpora", field="corpus")
        return entry

    def for_ask(self, cid: str | None, retriever: str) -> CorpusEntry:
        """The entry to answer from, ready for ``retriever``; API errors name the field at fault."""
        entry = self.get(cid or self.default_id)
        if entry.status == "indexing":
            raise ApiError(409, "corpus_indexing", f"corpus {entry.id!r} is still being indexed (job {entry.job_id}); "
                           "poll GET /v1/jobs/{id} and ask when it is done", field="corpus")
        if entry.status == "failed":
            raise ApiError(409, "corpus_failed", f"corpus {entry.id!r} could not be indexed: {entry.error}", field="corpus")
        if retriever != "bm25":
            if not self.config.encoder:
                raise ApiError(400, "no_encoder", f"this server has no encoder for {retriever} retrieval; use retriever bm25",
                               field="retriever")
            with self._lock:  # one build per corpus, however many requests ask for it at once
                start = entry.dense in ("not built", "failed")
                if start:
                    entry.dense = "building"
            if start:
                self._submit_dense(entry)
            if entry.dense != "ready":
                raise ApiError(409, "dense_indexing", f"the dense index of corpus {entry.id!r} is being built (job "
                               f"{entry.job_id}); use retriever bm25 meanwhile or ask when the job is done", field="retriever")
        return entry

    # -- uploads ---------------------------------------------------------------------
    def upload(self, files: list[tuple[str, bytes]], name: str | None) -> tuple[CorpusEntry, Job | None]:
        """Store uploaded files as a new corpus and start indexing it; validation errors are 400s naming ``files``."""
        from tessera.data.text import load_corpus

        cfg = self.config
        if not files:
            raise ApiError(400, "no_files", "upload at least one .jsonl, .txt, .md or .rst file", field="files")
        if len(files) > cfg.max_upload_files:
            raise ApiError(400, "too_many_files", f"{len(files)} files uploaded; at most {cfg.max_upload_files} per corpus",
                           field="files")
        total = sum(len(data) for _, data in files)
        if total > cfg.max_upload_bytes:
            raise ApiError(413, "upload_too_large", f"the files hold {total} bytes; at most {cfg.max_upload_bytes} per upload",
                           field="files")
        named: dict[str, bytes] = {}
        for original, data in files:
            fname = safe_filename(original)
            if not fname.lower().endswith(CORPUS_SUFFIXES):
                raise ApiError(400, "bad_file_type", f"{original!r} is not a .jsonl, .txt, .md or .rst file", field="files")
            if not data.strip():
                raise ApiError(400, "empty_file", f"{original!r} is empty; upload files with text", field="files")
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ApiError(400, "bad_encoding", f"{original!r} is not UTF-8 text (byte {e.start}); save it as UTF-8",
                               field="files") from None
            stem, _, ext = fname.rpartition(".")
            n = 2
            while fname in named:
                fname, n = f"{stem}-{n}.{ext}", n + 1
            named[fname] = data
        h = hashlib.sha256()
        for fname in sorted(named):
            h.update(fname.encode() + b"\x00" + named[fname] + b"\x00")
        base = slug(name or Path(next(iter(named))).stem, 24)
        cid = f"{base}-{h.hexdigest()[:8]}"
        with self._lock:
            existing = self.entries.get(cid)
        if existing is not None:
            return existing, self.jobs.get(existing.job_id) if existing.job_id else None
        if len(self.uploads()) >= cfg.max_uploaded_corpora:
            raise ApiError(409, "too_many_corpora", f"the server keeps at most {cfg.max_uploaded_corpora} uploaded corpora; "
                           "delete one with DELETE /v1/corpora/{id}", field="files")
        final = self.upload_root / cid
        with atomic_dir(final) as tmp:
            for fname, data in named.items():
                (tmp / fname).write_bytes(data)
            try:
                docs = load_corpus(tmp)
            except TesseraError as e:  # name the uploaded file, not the server's folder
                raise ApiError(400, "bad_corpus", str(e).replace(str(tmp) + "/", "").replace(str(tmp), "upload"),
                               field="files") from None
        entry = CorpusEntry(cid, name or base, "upload", str(final), documents=len(docs))
        with self._lock:
            self.entries[cid] = entry
        try:
            job = self._submit_index(entry)
        except ApiError:
            self.delete(cid)
            raise
        return entry, job

    def delete(self, cid: str) -> None:
        with self._lock:
            entry = self.entries.get(cid)
            if entry is None:
                raise ApiError(404, "unknown_corpus", f"no corpus with id {cid!r}; see GET /v1/corpora", field="corpus_id")
            if entry.kind != "upload":
                raise ApiError(403, "not_deletable", f"corpus {cid!r} comes from the server's config; only uploads can be deleted",
                               field="corpus_id")
            if entry.status == "indexing" or entry.dense == "building":
                raise ApiError(409, "corpus_indexing", f"corpus {cid!r} is being indexed; delete it when job {entry.job_id} is done",
                               field="corpus_id")
            self.entries.pop(cid)
            index_dir = getattr(entry.index, "path", None)
            shared = any(getattr(e.index, "path", None) == index_dir for e in self.entries.values())
        shutil.rmtree(self.upload_root / cid, ignore_errors=True)
        if index_dir is not None and not shared:
            # its cached passages, BM25 and dense indexes: an ask already holding the index keeps what it loaded
            shutil.rmtree(index_dir, ignore_errors=True)

    # -- jobs ------------------------------------------------------------------------
    def _submit_index(self, entry: CorpusEntry) -> Job:
        def run(job: Job) -> None:
            job.update("chunking passages and building the BM25 index", 0.1)
            try:
                index = CorpusIndex.open(entry.spec)
            except Exception as e:
                entry.status, entry.error = "failed", str(e).replace(entry.spec + "/", "").replace(entry.spec, entry.id)
                raise TesseraError(entry.error) from None
            entry.index, entry.status = index, "ready"
            entry.documents = entry.documents or len({p.doc_id for p in index.passages})
            job.update("BM25 index ready", 0.4 if self._dense_wanted() else 1.0)
            if self._dense_wanted():
                self._build_dense(entry, job, 0.4)

        job = self.jobs.submit("index", run, corpus_id=entry.id)
        entry.job_id = job.id
        entry.dense = "not built" if self.config.encoder else "unavailable"
        return job

    def _dense_wanted(self) -> bool:
        return bool(self.config.encoder and self.config.prebuild_dense)

    def _submit_dense(self, entry: CorpusEntry) -> Job:
        entry.dense = "building"
        try:
            job = self.jobs.submit("dense-index", lambda job: self._build_dense(entry, job, 0.0), corpus_id=entry.id)
        except ApiError:
            entry.dense = "not built"
            raise
        entry.job_id = job.id
        return job

    def _build_dense(self, entry: CorpusEntry, job: Job, start: float) -> None:
        entry.dense = "building"
        job.update(f"encoding {len(entry.index.passages)} passages for dense retrieval", start + 0.05 * (1 - start))
        try:
            entry.index.dense(self.config.encoder)
            entry.index.encoder(self.config.encoder)
        except Exception:
            entry.dense = "failed"
            raise
        entry.dense = "ready"
