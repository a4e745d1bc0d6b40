"""Retrieval training pairs from documents alone: no queries, no labels, no generator.

Two unsupervised sources of (query, positive) pairs, written in the ReasonIR row format that
``tessera retrieval train`` reads (:mod:`tessera.retrieval.train`):

- **Independent cropping** (Contriever, Izacard et al. 2022, section 3.2): a document is cut into
  chunks of ``chunk_words`` words; from a chunk two spans are drawn *independently*, each of a
  length uniform in ``[min_ratio, max_ratio]`` of the chunk, and each loses every word with
  probability ``word_dropout`` (Contriever's token deletion).  One span is the query, the other
  the positive; they may overlap, which is what makes the task learnable early on.
- **Title / first-sentence pairing** (the pretraining pairs of E5 and GTR: title -> body): the
  document's title is the query and its text the positive; a document without a title gives its
  first sentence as the query and the rest as the positive.

Each row may get a hard negative as ReasonIR mines them: BM25 (or, with ``negatives="minilm"``, the
embedded all-MiniLM-L6-v2) ranks the source's documents for the query and the first document at rank
``min_neg_rank`` (20) or lower that is not the source document is the negative
(:func:`tessera.retrieval.synth.bm25_hard_negative`).

Everything is seeded per (seed, source, document, kind), so a row does not depend on which other
documents or sources are in the run.  The rows of each source are written atomically to
``OUT.parts/``; a killed run resumes from the sources that finished, and the final file is
written atomically from the parts.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tessera.data.types import Document
from tessera.errors import EmptyCorpusError, InputError

PAIR_KINDS = ("crop", "title")
NEGATIVE_MODES = ("bm25", "minilm", "none")
WIKITEXT = "wikitext2"


@dataclass(frozen=True)
class PairSettings:
    kinds: tuple[str, ...] = PAIR_KINDS
    crops_per_chunk: int = 1
    chunk_words: int = 256  # Contriever crops from 256-token chunks
    min_ratio: float = 0.1  # span length as a fraction of the chunk (Contriever: 0.1 .. 0.5)
    max_ratio: float = 0.5
    word_dropout: float = 0.1  # Contriever's token deletion probability
    min_span_words: int = 5
    max_chunks_per_doc: int = 4  # long documents (WikiText articles) give at most this many chunks
    max_pos_words: int = 200  # positives and negatives are cut to this many words
    negatives: str = "bm25"
    min_neg_rank: int = 20  # ReasonIR: the first non-positive at BM25 rank >= 20
    instruction: str = ""
    seed: int = 0

    def check(self) -> None:
        bad = [k for k in self.kinds if k not in PAIR_KINDS]
        if bad or not self.kinds:
            raise InputError(f"unknown pair kind(s) {bad or '(none)'}; use {', '.join(PAIR_KINDS)} (comma-separated)")
        if self.negatives not in NEGATIVE_MODES:
            raise InputError(f"unknown --negatives {self.negatives!r}; use {' or '.join(NEGATIVE_MODES)}")
        if not 0 < self.min_ratio <= self.max_ratio <= 1:
            raise InputError(f"crop ratios must satisfy 0 < min <= max <= 1, got {self.min_ratio}..{self.max_ratio}")
        if not 0 <= self.word_dropout < 1:
            raise InputError(f"--word-dropout must be in [0, 1), got {self.word_dropout}")
        if min(self.crops_per_chunk, self.chunk_words, self.min_span_words, self.max_pos_words, self.min_neg_rank,
               self.max_chunks_per_doc) < 1:
            raise InputError("--crops-per-chunk, --chunk-words, --min-span-words, --max-pos-words, --min-neg-rank and "
                             "--max-chunks must be at least 1")


# -- the two pair makers ---------------------------------------------------------------------------------------------

def crop_span(words: list[str], rng: random.Random, s: PairSettings) -> str:
    """One independent crop of ``words``: a random span of ``min_ratio..max_ratio`` of them, words dropped."""
    n = len(words)
    length = max(s.min_span_words, round(rng.uniform(s.min_ratio, s.max_ratio) * n))
    length = min(length, n)
    start = rng.randint(0, n - length)
    kept = [w for w in words[start:start + length] if rng.random() >= s.word_dropout]
    return " ".join(kept or words[start:start + 1])


def crop_pairs(doc: Document, rng: random.Random, s: PairSettings) -> list[tuple[str, str]]:
    """(query, positive) pairs by independent cropping of each chunk of the document."""
    words = doc.full_text.split()
    chunks = [words[i:i + s.chunk_words] for i in range(0, len(words), s.chunk_words)][:s.max_chunks_per_doc]
    pairs = []
    for chunk in chunks:
        if len(chunk) < 2 * s.min_span_words:
            continue
        for _ in range(s.crops_per_chunk):
            pairs.append((crop_span(chunk, rng, s), crop_span(chunk, rng, s)))
    return pairs


def title_pair(doc: Document, s: PairSettings) -> tuple[str, str] | None:
    """(title, text), or (first sentence, rest) for a document without a title; ``None`` when too short."""
    from tessera.data.chunking import split_sentences

    text = " ".join(doc.text.split())
    if doc.title.strip() and len(text.split()) >= s.min_span_words:
        return " ".join(doc.title.split()), _cut(text, s.max_pos_words)
    cuts = split_sentences(text, method="regex")
    if len(cuts) < 2:
        return None
    first, rest = text[cuts[0][0]:cuts[0][1]], text[cuts[1][0]:]
    if len(first.split()) < 3 or len(rest.split()) < s.min_span_words:
        return None
    return first, _cut(rest, s.max_pos_words)


def _cut(text: str, max_words: int) -> str:
    words = text.split()
    return " ".join(words[:max_words])


def doc_rows(source: str, doc: Document, s: PairSettings) -> list[dict]:
    """The rows of one document, seeded by (seed, source, document id, kind) alone."""
    rows = []
    for kind in s.kinds:
        rng = random.Random(f"{s.seed}:{source}:{doc.id}:{kind}")
        pairs = crop_pairs(doc, rng, s) if kind == "crop" else [p for p in [title_pair(doc, s)] if p]
        for k, (query, pos) in enumerate(pairs):
            rows.append({"id": f"{source}:{doc.id}:{kind}:{k}", "query": [s.instruction, query], "pos": [["", pos]],
                         "neg": [], "source": {"corpus": source, "doc_id": doc.id, "kind": kind}})
    return rows


# -- hard negatives --------------------------------------------------------------------------------------------------

def bm25_hits(queries: list[str], docs: list[Document], k: int) -> list[list[tuple[int, float]]]:
    from tessera.retrieval.bm25 import BM25Index

    return BM25Index.build([d.full_text for d in docs]).search_many(queries, k=k)


def dense_hits(queries: list[str], docs: list[Document], k: int, encoder: str = "default-encoder") -> list[list[tuple[int, float]]]:
    """``[(document row, score)]`` best first per query from a sentence-transformers encoder (default MiniLM)."""
    from tessera.data.types import Collection, Query
    from tessera.hub import load_encoder
    from tessera.retrieval.search import dense_run

    run = dense_run(load_encoder(encoder, device="cpu"), Collection(docs, [Query(str(i), q) for i, q in enumerate(queries)]),
                    k=k, batch_size=64)
    row_of = {d.id: i for i, d in enumerate(docs)}
    return [sorted(((row_of[d], sc) for d, sc in run.get(str(i), {}).items()), key=lambda x: -x[1])
            for i in range(len(queries))]


def add_negatives(rows: list[dict], docs: list[Document], s: PairSettings) -> dict:
    """Give every row ReasonIR's hard negative from ``docs`` (the row's own document never), ranked by BM25 or
    MiniLM (``s.negatives``); returns counts."""
    from tessera.retrieval.synth import bm25_hard_negative

    counts = {"ranked": 0, "low_rank": 0, "random": 0, "ranks": []}  # at rank >= min_neg_rank / fallbacks
    if not rows:
        return counts
    if len(docs) < 2:
        raise EmptyCorpusError("a hard negative needs a second document; pass --negatives none for a one-document corpus")
    texts = [d.full_text for d in docs]
    row_of = {d.id: i for i, d in enumerate(docs)}
    ranker = dense_hits if s.negatives == "minilm" else bm25_hits
    hits_all = ranker([r["query"][1] for r in rows], docs, min(len(docs), s.min_neg_rank + 10))
    for row, hits in zip(rows, hits_all):
        rng = random.Random(f"{s.seed}:neg:{row['id']}")
        neg, rank, how = bm25_hard_negative(hits, row_of[row["source"]["doc_id"]], texts, s.min_neg_rank, rng)
        row["neg"] = [["", _cut(texts[neg], s.max_pos_words)]]
        row["source"]["neg_doc_id"], row["source"]["neg_rank"] = docs[neg].id, rank
        row["source"]["neg_by"] = s.negatives
        counts["ranked" if how == "bm25" else how] += 1
        if rank is not None:
            counts["ranks"].append(rank)
    return counts


# -- sources and the whole run ---------------------------------------------------------------------------------------

def source_documents(spec: str) -> tuple[str, list[Document]]:
    """``scifact`` | ``cranfield`` | ``vaswani`` (their documents, never their queries), ``beir:PATH``,
    ``wikitext2`` (the shared WikiText-2 articles), ``python-docs`` or a file/folder -> (name, documents)."""
    from tessera.retrieval.corpus_index import corpus_documents
    from tessera.retrieval.search import is_collection_spec, open_collection

    spec = spec.strip()
    if spec.lower() == WIKITEXT:
        return WIKITEXT, _wikitext_documents()
    if is_collection_spec(spec):
        coll = open_collection(spec)
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", coll.name or spec)[:40], coll.docs
    return corpus_documents(spec)


def _wikitext_documents() -> list[Document]:
    from tessera.data.paths import shared_data_dir
    from tessera.data.text import read_wikitext

    root = shared_data_dir()
    folder = root / WIKITEXT if root else None
    files = [folder / n for n in ("valid.txt", "test.txt")] if folder else []
    if not files or not all(f.is_file() for f in files):
        raise InputError("wikitext2 not found under ../shared/data/wikitext2 (valid.txt, test.txt); pass a path instead "
                         "(or set TESSERA_SHARED_DATA)")
    return [Document(f"{f.stem}-{d.id}", d.title, d.text) for f in files for d in read_wikitext(f)]


def _fingerprint(source: str, docs: list[Document], s: PairSettings) -> str:
    h = hashlib.sha256(json.dumps({"source": source, "settings": asdict(s), "format": 1}, sort_keys=True).encode())
    for d in docs:
        h.update(f"{d.id}\x00{d.title}\x00{d.text}\x00".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def source_rows(source: str, docs: list[Document], s: PairSettings) -> tuple[list[dict], dict]:
    """Every row of one source, negatives attached; with the source's counts."""
    rows = [r for d in docs for r in doc_rows(source, d, s)]
    stats = {"documents": len(docs), "rows": len(rows),
             "rows_by_kind": {k: sum(r["source"]["kind"] == k for r in rows) for k in s.kinds},
             "documents_without_rows": len({d.id for d in docs} - {r["source"]["doc_id"] for r in rows})}
    if s.negatives != "none":
        counts = add_negatives(rows, docs, s)
        ranks = counts.pop("ranks")
        stats["negatives"] = {**counts, "median_rank": sorted(ranks)[len(ranks) // 2] if ranks else None}
    return rows, stats


def build_pairs(specs: list[str], out: str | Path, s: PairSettings, progress=None) -> dict:
    """Write the rows of every source to ``out`` (JSONL) and ``OUT.stats.json``; returns the stats."""
    from tessera.config import atomic_write_text
    from tessera.data.jsonl import read_jsonl, write_jsonl_atomic
    from tessera.retrieval.synth import stats_path

    s.check()
    out = Path(out)
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; pass a .jsonl file")
    if not specs:
        raise InputError("no source given; pass e.g. scifact, cranfield, vaswani, wikitext2, python-docs or a path")
    t0, parts, per_source = time.perf_counter(), out.with_name(out.name + ".parts"), {}
    for spec in specs:
        name, docs = source_documents(spec)
        if not docs:
            raise EmptyCorpusError(f"source {spec} has no documents; pass a corpus with text")
        if name in per_source:
            raise InputError(f"two sources are both named {name!r}; pass each source once (or rename a folder)")
        part = parts / f"{name}-{_fingerprint(name, docs, s)}.jsonl"
        meta = part.with_suffix(".stats.json")
        if part.is_file() and meta.is_file():
            per_source[name] = {**json.loads(meta.read_text()), "resumed": True}
        else:
            rows, per_source[name] = source_rows(name, docs, s)
            write_jsonl_atomic(part, rows)
            atomic_write_text(meta, json.dumps(per_source[name], indent=2))
        per_source[name]["part"] = part.name
        if progress:
            progress(name, per_source[name])
    rows = [r for name in per_source for r in read_jsonl(parts / per_source[name]["part"])]
    write_jsonl_atomic(out, rows)
    stats = {"rows": len(rows), "sources": per_source, "settings": asdict(s), "wall_s": round(time.perf_counter() - t0, 1)}
    atomic_write_text(stats_path(out), json.dumps(stats, indent=2) + "\n")
    return stats
