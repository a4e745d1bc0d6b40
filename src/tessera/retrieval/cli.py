"""``tessera retrieval index | search | eval``.

- ``index CORPUS --out DIR``: BM25 and/or dense index over a corpus (a collection
  spec such as ``cranfield``/``beir:PATH``, ``python-docs``, or a file/folder of
  documents), written atomically; dense encoding resumes if interrupted and shards
  across ranks under torchrun.
- ``search DIR QUERY``: ranked doc ids, titles and scores (``--json``).
- ``eval --collection C --retriever R --out DIR``: a TREC run file (``run.trec``)
  and ``metrics.json`` (nDCG@10, Recall@100, MRR@10 in 0..1, per query too).
- ``synth --corpus C --out data.jsonl``: ReasonIR's synthetic training rows (HQ / VL
  queries from documents, BM25 rank>=20 hard negatives), resumable and shardable.

``search`` and ``eval`` take ReasonIR's test-time compute as flags: ``--rewrite reason``
(retrieve with the LM's reasoning and expanded query) and ``--rerank N`` (rerank the
top N with the LM's P("Yes"), fused 0.5/0.5 with the retriever after min-max).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from tessera import ui
from tessera.errors import InputError

retrieval_app = typer.Typer(help="Dense, BM25 and hybrid retrieval: build indexes, search them, evaluate on IR collections.",
                            no_args_is_help=True)

_INDEX_FORMAT = 1
_COLLECTION_OPT = "cranfield | vaswani | scifact | NAME:PATH | beir:PATH | bright:PATH (default folders: ../shared/data/ir/...)"


def _check_choice(value: str, choices, what: str) -> str:
    if value not in choices:
        raise InputError(f"unknown {what} {value!r}; use one of {', '.join(choices)}")
    return value


def _check_positive(value: int, what: str) -> None:
    if value < 1:
        raise InputError(f"{what} must be at least 1, got {value}")


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; pass a folder")


def _load_encoder(spec: str):
    from tessera.hub import load_encoder

    with ui.status(f"loading encoder {spec}"):
        return load_encoder(spec)


_LM_HELP = "LM for --rewrite/--rerank: 'default' (embedded SmolLM2), a folder, or the model name served at --lm-url."
_LM_URL_HELP = "OpenAI-compatible server (vLLM, llama.cpp) base URL, e.g. http://127.0.0.1:8000/v1."


def _load_lm(lm: str, lm_url: str | None, batch_size: int = 8, repetition_penalty: float = 1.0):
    from tessera.lm import load_backend

    with ui.status(f"loading {lm}"):
        return load_backend(lm, url=lm_url, batch_size=batch_size, repetition_penalty=repetition_penalty)


def _check_tto(rewrite: str, rerank: int) -> None:
    from tessera.retrieval.rewrite import REWRITE_MODES

    _check_choice(rewrite, REWRITE_MODES, "--rewrite mode")
    if rerank < 0:
        raise InputError(f"--rerank must be 0 (off) or a number of documents, got {rerank}")


def _maybe_init_distributed() -> tuple[int, int]:
    """Under torchrun (``WORLD_SIZE`` > 1 and ``MASTER_ADDR`` set) join a gloo process group."""
    import os

    from tessera.retrieval.dense_index import dist_rank_world

    rank, world = dist_rank_world()
    if world > 1 and os.environ.get("MASTER_ADDR"):
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
    return rank, world


@retrieval_app.command("index")
def index_cmd(
    corpus: str = typer.Argument(..., help=f"{_COLLECTION_OPT}, 'python-docs', or a file/folder of .txt/.md/.jsonl documents."),
    out: Path = typer.Option(..., "--out", "-o", help="Index folder to write (replaced atomically if it is a tessera index)."),
    retriever: str = typer.Option("bm25", "--retriever", "-r", help="bm25 | dense | hybrid (hybrid builds both)."),
    encoder: str = typer.Option("default-encoder", "--encoder", "-e", help="Encoder spec for dense: 'default-encoder', a trained retriever's name (tessera models), a folder or a cached hub id."),
    batch_size: int = typer.Option(32, "--batch-size", help="Documents per encoder batch."),
    kind: str = typer.Option("auto", "--kind", help="Dense index: auto (exact up to 100k docs, HNSW above) | flat | hnsw | ivf."),
    split: str = typer.Option(None, "--split", help="Qrels split for BEIR/SciFact (only affects which queries are read)."),
    task: str = typer.Option(None, "--task", help="BRIGHT task (documents/<task>.jsonl)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip malformed rows instead of stopping."),
):
    """Build a BM25 and/or dense index for a corpus into a folder."""
    from tessera.config import atomic_dir, atomic_write_text
    from tessera.data.jsonl import write_jsonl_atomic
    from tessera.retrieval.corpus_index import corpus_documents
    from tessera.retrieval.dense_index import KINDS, DenseIndex, encode_corpus, encoder_name
    from tessera.retrieval.bm25 import BM25Index
    from tessera.retrieval.search import RETRIEVERS, is_collection_spec, open_collection

    _check_choice(retriever, RETRIEVERS, "retriever")
    _check_choice(kind, KINDS, "index kind")
    _check_positive(batch_size, "--batch-size")
    _check_out_dir(out)
    if out.is_dir() and any(out.iterdir()) and not (out / "index.json").is_file():
        raise InputError(f"--out {out} is a non-empty folder that is not a tessera index; pass a new or empty folder")
    if is_collection_spec(corpus):
        collection = open_collection(corpus, split=split, task=task, skip_bad=skip_bad)
        name, docs = collection.name, collection.docs
    else:
        name, docs = corpus_documents(corpus, skip_bad=skip_bad)
    if not docs:
        raise InputError(f"corpus {corpus} has no documents; pass a corpus with text")
    seen: set[str] = set()
    for d in docs:
        if d.id in seen:
            raise InputError(f"corpus {corpus} has two documents with id {d.id!r}; document ids must be unique")
        seen.add(d.id)
    model = _load_encoder(encoder) if retriever != "bm25" else None
    rank, world = _maybe_init_distributed() if model is not None else (0, 1)

    t0 = time.perf_counter()
    embs = None
    if model is not None:
        work = out.parent / f".{out.name}.encode-work"
        embs = encode_corpus(model, [d.full_text for d in docs], batch_size=batch_size, work_dir=work, rank=rank, world_size=world)
        if rank != 0:
            return
    with atomic_dir(out) as tmp:
        built = []
        if retriever in ("bm25", "hybrid"):
            with ui.status("building the BM25 index"):
                BM25Index.build([d.full_text for d in docs]).save(tmp / "bm25")
            built.append("bm25")
        if embs is not None:
            info = {"spec": encoder, "name": encoder_name(model), "max_seq_length": getattr(model, "max_seq_length", None)}
            DenseIndex.build(embs, [d.id for d in docs], encoder=info, kind=kind).save(tmp / "dense")
            built.append("dense")
        write_jsonl_atomic(tmp / "docs.jsonl", ({"id": d.id, "title": d.title, "text": d.text} for d in docs))
        meta = {"format": _INDEX_FORMAT, "corpus": corpus, "name": name, "n_docs": len(docs), "indexes": built,
                "encoder": encoder if embs is not None else None, "build_s": round(time.perf_counter() - t0, 3)}
        atomic_write_text(tmp / "index.json", json.dumps(meta, indent=2))
    ui.out.print(f"indexed {len(docs)} documents of {name} ({' + '.join(built)}) into {out}")


def _read_index_dir(folder: Path) -> dict:
    meta_path = folder / "index.json"
    if not meta_path.is_file():
        raise InputError(f"{folder} is not a tessera index (no index.json); build one with `tessera retrieval index CORPUS --out {folder}`")
    return json.loads(meta_path.read_text(encoding="utf-8"))


def _check_search_options(index_dir: Path, have: list[str], query: str, k: int, retriever: str, fusion: str,
                          rewrite: str, rerank: int) -> tuple[str, list[str]]:
    """Validate ``search``'s options against the index: ``(retriever, indexes it needs)``."""
    from tessera.retrieval.hybrid import FUSIONS

    if retriever == "auto":
        retriever = "hybrid" if len(have) == 2 else (have[0] if have else "bm25")
    _check_choice(retriever, ("bm25", "dense", "hybrid"), "retriever")
    _check_choice(fusion, FUSIONS, "fusion")
    _check_positive(k, "--k")
    if not query.strip():
        raise InputError("the query is empty; pass a query")
    _check_tto(rewrite, rerank)
    need = ["bm25", "dense"] if retriever == "hybrid" else [retriever]
    missing = [n for n in need if n not in have]
    if missing:
        raise InputError(f"{index_dir} has no {' or '.join(missing)} index (it has {', '.join(have) or 'none'}); "
                         f"rebuild with `tessera retrieval index ... --retriever {retriever}` or pick --retriever {' or '.join(have)}")
    return retriever, need


def _first_stage_scores(index_dir: Path, need: list[str], ids: list[str], query: str, depth: int, encoder: str | None,
                        fusion: str) -> dict:
    """``{doc id: score}`` from the BM25 and/or dense index (fused when both)."""
    from tessera.retrieval.bm25 import BM25Index
    from tessera.retrieval.dense_index import DenseIndex, encode_queries
    from tessera.retrieval.hybrid import fuse

    runs = []
    if "bm25" in need:
        hits = BM25Index.load(index_dir / "bm25").search(query, depth)
        runs.append({ids[i]: s for i, s in hits})
    if "dense" in need:
        dense = DenseIndex.load(index_dir / "dense")
        spec = encoder or dense.encoder.get("spec") or "default-encoder"
        model = _load_encoder(spec)
        runs.append(dict(dense.search(encode_queries(model, [query]), depth)[0]))
    return runs[0] if len(runs) == 1 else fuse([{"q": r} for r in runs], method=fusion, depth=depth)["q"]


def _rerank_scores(scores: dict, query: str, docs: dict, backend, rerank: int) -> tuple[dict, dict]:
    """Rerank the top ``rerank`` documents with the LM: ``(fused scores, the reranker's P(Yes))``."""
    from tessera.retrieval.rerank import rerank_run

    def full(d):
        r = docs.get(d, {})
        return f"{r.get('title', '')}\n{r.get('text', '')}" if r.get("title") else r.get("text", "")

    new, llm = rerank_run({"q": scores}, {"q": query}, {d: full(d) for d in scores}, backend, top_n=rerank)
    return new["q"], llm.get("q", {})


def _print_search_results(results: list[dict], docs: dict, title: str, as_json: bool) -> None:
    """A JSON list or a table of the ranked documents."""
    if as_json:
        print(json.dumps(results, ensure_ascii=False, indent=2))
        return
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, just in (("#", "right"), ("doc id", "left"), ("title", "left"), ("score", "right")):
        table.add_column(col, justify=just, overflow="fold")
    for r in results:
        table.add_row(str(r["rank"]), r["doc_id"], r["title"] or " ".join(docs.get(r["doc_id"], {}).get("text", "").split())[:80], f"{r['score']:.4f}")
    if results:
        ui.out.print(table)
    else:
        ui.out.print("no documents matched")


@retrieval_app.command("search")
def search_cmd(
    index_dir: Path = typer.Argument(..., help="A folder written by `tessera retrieval index`."),
    query: str = typer.Argument(..., help="The query."),
    k: int = typer.Option(10, "--k", "-k", help="Number of documents to return."),
    retriever: str = typer.Option("auto", "--retriever", "-r", help="auto (hybrid when both indexes exist) | bm25 | dense | hybrid."),
    encoder: str = typer.Option(None, "--encoder", "-e", help="Query encoder (default: the one the index was built with)."),
    fusion: str = typer.Option("rrf", "--fusion", help="Hybrid fusion: rrf (reciprocal rank, k=60) | score (min-max, summed)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
    rewrite: str = typer.Option("none", "--rewrite", help="none | reason (ReasonIR: retrieve with the LM's reasoning + expanded query)."),
    rerank: int = typer.Option(0, "--rerank", help="Rerank the top N with the LM (P(Yes), 0.5 retriever + 0.5 reranker); 0 = off."),
    rewrite_tokens: int = typer.Option(128, "--rewrite-tokens", help="Longest rewrite, in tokens (longer rewrites help more)."),
    lm: str = typer.Option("default", "--lm", help=_LM_HELP),
    lm_url: str = typer.Option(None, "--lm-url", help=_LM_URL_HELP),
):
    """Query an index: ranked doc ids, titles and scores."""
    from tessera.data.jsonl import read_jsonl
    from tessera.retrieval.metrics import ranked

    meta = _read_index_dir(index_dir)
    retriever, need = _check_search_options(index_dir, meta.get("indexes", []), query, k, retriever, fusion, rewrite, rerank)
    rows = read_jsonl(index_dir / "docs.jsonl")
    docs = {r["id"]: r for r in rows}
    depth = max(k, 100) if retriever == "hybrid" else max(k, rerank)
    original = query
    backend = _load_lm(lm, lm_url) if rewrite != "none" or rerank else None
    rewritten = None
    if rewrite != "none":
        from tessera.retrieval.rewrite import rewrite_queries

        rewritten = rewrite_queries(backend, [query], rewrite, rewrite_tokens)[0]
        query = rewritten.text
    scores = _first_stage_scores(index_dir, need, [r["id"] for r in rows], query, depth, encoder, fusion)
    llm_scores = {}
    if rerank:
        scores, llm_scores = _rerank_scores(scores, original, docs, backend, rerank)
    results = [{"rank": r, "doc_id": d, "title": docs.get(d, {}).get("title", ""), "score": s}
               for r, (d, s) in enumerate(ranked(scores, k), 1)]
    for r in results:
        if r["doc_id"] in llm_scores:
            r["reranker_p_yes"] = llm_scores[r["doc_id"]]
    if rewritten is not None:  # on stderr, so --json output stays a plain list
        ui.info(f"[dim]rewritten query:[/dim] {rewritten.text}")
    _print_search_results(results, docs, f"{retriever}{' + rerank' if rerank else ''}: {original}", as_json)


def _check_eval_options(retriever: str, fusion: str, k: int, batch_size: int, out: Path, rewrite: str, rerank: int,
                        limit: int) -> None:
    """Validate ``eval``'s options before anything is loaded."""
    from tessera.retrieval.hybrid import FUSIONS
    from tessera.retrieval.search import RETRIEVERS

    _check_choice(retriever, RETRIEVERS, "retriever")
    _check_choice(fusion, FUSIONS, "fusion")
    _check_positive(k, "--k")
    _check_positive(batch_size, "--batch-size")
    _check_out_dir(out)
    _check_tto(rewrite, rerank)
    if limit < 0:
        raise InputError(f"--limit must be 0 (all) or a number of queries, got {limit}")


def _open_eval_collection(collection: str, split: str | None, task: str | None, skip_bad: bool, limit: int):
    """The collection with judged queries, cut to the first ``limit`` of them when ``limit`` > 0."""
    from tessera.retrieval.search import open_collection

    coll = open_collection(collection, split=split, task=task, skip_bad=skip_bad)
    if not coll.queries:
        raise InputError(f"collection {collection} has no judged queries; check its qrels (and --split)")
    if limit:
        import dataclasses

        kept = coll.queries[:limit]
        coll = dataclasses.replace(coll, queries=kept, qrels={q.id: coll.qrels[q.id] for q in kept})
    return coll


def _rewrite_collection(coll, backend, out: Path, rewrite: str, rewrite_tokens: int):
    """The collection with its queries rewritten by the LM (cached in ``out/rewrites.jsonl``), and rewrite stats."""
    import dataclasses

    from tessera.data.types import Query
    from tessera.retrieval.rewrite import RewriteCache, rewrite_stats

    out.mkdir(parents=True, exist_ok=True)
    cache = RewriteCache(out / "rewrites.jsonl", backend.name, rewrite, rewrite_tokens)
    rws = cache.rewrite(backend, [q.text for q in coll.queries], rewrite, rewrite_tokens)
    coll = dataclasses.replace(coll, queries=[Query(q.id, r.text, q.excluded_ids) for q, r in zip(coll.queries, rws)])
    return coll, {"mode": rewrite, "max_new_tokens": rewrite_tokens, **rewrite_stats(rws)}


def _rerank_eval_run(run: dict, originals: dict, coll, backend, rerank: int, k: int) -> dict:
    """Rerank each query's top ``rerank`` documents with the LM (against the original queries), then keep ``k``."""
    from tessera.retrieval.metrics import truncate_run
    from tessera.retrieval.rerank import rerank_run

    texts = {d.id: d.full_text for d in coll.docs}
    run, _ = rerank_run(run, originals, texts, backend, top_n=rerank)
    return truncate_run(run, k)


def _write_eval_outputs(out: Path, run: dict, doc: dict, tag: str, summary: str) -> None:
    """``run.trec`` and ``metrics.json`` in ``out``, and the summary lines."""
    from tessera.config import atomic_write_text
    from tessera.retrieval.metrics import write_trec_run

    out.mkdir(parents=True, exist_ok=True)
    run_path = write_trec_run(out / "run.trec", run, tag=tag)
    atomic_write_text(out / "metrics.json", json.dumps(doc, indent=2))
    ui.out.print(summary)
    ui.out.print(f"wrote {run_path} and {out / 'metrics.json'}")


@retrieval_app.command("eval")
def eval_cmd(
    collection: str = typer.Option(..., "--collection", "-c", help=_COLLECTION_OPT),
    retriever: str = typer.Option("bm25", "--retriever", "-r", help="bm25 | dense | hybrid."),
    encoder: str = typer.Option("default-encoder", "--encoder", "-e", help="Encoder spec for dense/hybrid."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for run.trec and metrics.json."),
    k: int = typer.Option(100, "--k", "-k", help="Documents retrieved per query (Recall@100 needs 100)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Encoder batch size."),
    fusion: str = typer.Option("rrf", "--fusion", help="Hybrid fusion: rrf | score."),
    split: str = typer.Option(None, "--split", help="Qrels split (BEIR default test; SciFact default train)."),
    task: str = typer.Option(None, "--task", help="BRIGHT task."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip malformed rows instead of stopping."),
    rewrite: str = typer.Option("none", "--rewrite", help="none | reason (ReasonIR: retrieve with the LM's reasoning + expanded query; cached in OUT/rewrites.jsonl)."),
    rerank: int = typer.Option(0, "--rerank", help="Rerank each query's top N with the LM (P(Yes), 0.5 retriever + 0.5 reranker); 0 = off."),
    rewrite_tokens: int = typer.Option(128, "--rewrite-tokens", help="Longest rewrite, in tokens."),
    lm: str = typer.Option("default", "--lm", help=_LM_HELP),
    lm_url: str = typer.Option(None, "--lm-url", help=_LM_URL_HELP),
    limit: int = typer.Option(0, "--limit", help="Evaluate only the first N judged queries (0 = all); handy with --rewrite/--rerank on CPU."),
):
    """Evaluate a retriever on a collection: writes a TREC run file and a metrics JSON, prints nDCG@10/Recall@100/MRR@10."""
    from tessera import __version__
    from tessera.retrieval.metrics import evaluate
    from tessera.retrieval.search import retrieve

    _check_eval_options(retriever, fusion, k, batch_size, out, rewrite, rerank, limit)
    t = time.perf_counter()
    coll = _open_eval_collection(collection, split, task, skip_bad, limit)
    timings = {"load_collection_s": time.perf_counter() - t}
    model = _load_encoder(encoder) if retriever != "bm25" else None
    backend = _load_lm(lm, lm_url) if rewrite != "none" or rerank else None
    originals = {q.id: q.text for q in coll.queries}
    tto: dict = {}
    if rewrite != "none":
        t = time.perf_counter()
        coll, tto["rewrite"] = _rewrite_collection(coll, backend, out, rewrite, rewrite_tokens)
        timings["rewrite_s"] = time.perf_counter() - t
    t = time.perf_counter()
    run = retrieve(coll, retriever, k=max(k, rerank), model=model, batch_size=batch_size, fusion=fusion, spec=encoder)
    timings["retrieve_s"] = time.perf_counter() - t
    if rerank:
        t = time.perf_counter()
        run = _rerank_eval_run(run, originals, coll, backend, rerank, k)
        timings["rerank_s"] = time.perf_counter() - t
        tto["rerank"] = {"top_n": rerank, "weight_retriever": 0.5, "score": "P(Yes) / (P(Yes) + P(No)), min-max normalised"}
    res = evaluate(run, coll.qrels)
    metrics = {m: res[m] for m in ("ndcg@10", "recall@100", "mrr@10")}
    tag = f"tessera-{retriever}" + (f"-rewrite-{rewrite}" if rewrite != "none" else "") + ("-rerank" if rerank else "")
    doc = {"collection": coll.name, "collection_spec": collection, "retriever": retriever, **tto,
           "lm": (lm_url and f"{lm}@{lm_url}" or lm) if backend is not None else None,
           "encoder": encoder if model is not None else None, "fusion": fusion if retriever == "hybrid" else None,
           "k": k, "n_docs": len(coll.docs), "n_queries": res["n_queries"], "n_skipped_rows": coll.n_skipped,
           "scale": "0..1 (x100 for the papers' points)", "metrics": metrics, "timings": {n: round(v, 3) for n, v in timings.items()},
           "tessera_version": __version__, "per_query": res["per_query"]}
    summary = (f"{coll.name} {retriever}{f' ({encoder})' if model is not None else ''}: "
               f"nDCG@10 {metrics['ndcg@10']:.4f}  Recall@100 {metrics['recall@100']:.4f}  MRR@10 {metrics['mrr@10']:.4f}  "
               f"({res['n_queries']} queries, 0..1 scale)")
    _write_eval_outputs(out, run, doc, tag, summary)


@retrieval_app.command("synth")
def synth_cmd(
    corpus: str = typer.Option(..., "--corpus", "-c", help=f"Documents to generate from: {_COLLECTION_OPT} (documents only, never queries), 'python-docs', or a file/folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Training rows (JSONL, appended; ids already there are skipped). Also writes OUT.failures.jsonl and OUT.stats.json."),
    stages: str = typer.Option("hq", "--stages", help="Comma-separated: hq (hard reasoning queries) and/or vl (varied-length queries)."),
    limit: int = typer.Option(0, "--limit", help="A seeded random sample of this many documents (0 = all)."),
    shard: str = typer.Option("0/1", "--shard", help="i/n: this process takes every n-th document from the i-th (run n processes, one --out each)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the document sample, VL lengths and retry sampling."),
    lm: str = typer.Option("default", "--lm", help="Generator: 'default' (embedded SmolLM2), a folder, or the model name served at --lm-url."),
    lm_url: str = typer.Option(None, "--lm-url", help=_LM_URL_HELP),
    concurrency: int = typer.Option(8, "--concurrency", help="Requests in flight to --lm-url."),
    batch_size: int = typer.Option(8, "--batch-size", help="Local LM batch size (left-padded)."),
    repetition_penalty: float = typer.Option(1.1, "--repetition-penalty", help="Local LM repetition penalty (keeps small models out of loops)."),
    llm_negative: bool = typer.Option(False, "--llm-negative", help="Also ask the LM for a hard negative that shares the query's surface but does not help."),
    min_neg_rank: int = typer.Option(20, "--min-neg-rank", help="BM25 hard negative: the first non-positive at this rank or lower (ReasonIR: 20)."),
    filter_top_k: int = typer.Option(0, "--filter-top-k", help="Round-trip filter: keep a query only if BM25 ranks its source document in this top k of the corpus (0 = keep all); dropped queries go to OUT.rejected.jsonl."),
    min_words: int = typer.Option(30, "--min-words", help="Seed filter: drop documents shorter than this."),
    max_words: int = typer.Option(5000, "--max-words", help="Seed filter: drop documents longer than this."),
    max_doc_words: int = typer.Option(150, "--max-doc-words", help="Document words shown to the generator."),
    hq_tokens: int = typer.Option(160, "--hq-tokens", help="Longest HQ reply, in tokens."),
    vl_tokens: int = typer.Option(256, "--vl-tokens", help="Longest VL reply, in tokens (VL target lengths are scaled to it)."),
    instruction: str = typer.Option(None, "--instruction", help="Query instruction stored in the rows (default: ReasonIR's generic one)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Try ids recorded in OUT.failures.jsonl again."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip malformed corpus rows instead of stopping."),
):
    """ReasonIR synthetic data: a reasoning-intensive query per document plus hard negatives, as training rows."""
    from tessera.retrieval.corpus_index import corpus_documents
    from tessera.retrieval.search import is_collection_spec, open_collection
    from tessera.retrieval.synth import (SynthConfig, config_dict, failures_path, parse_shard, seed_documents,
                                         select_documents, stats_path, synth_stats, synthesize)

    from tessera.retrieval.synth import STAGES

    i, n = parse_shard(shard)
    stage_list = tuple(s.strip() for s in stages.split(",") if s.strip())
    if not stage_list or any(s not in STAGES for s in stage_list):
        raise InputError(f"unknown synthesis stage(s) in --stages {stages!r}; use {', '.join(STAGES)} (comma-separated)")
    if limit < 0:
        raise InputError(f"--limit must be 0 (all) or a number of documents, got {limit}")
    if min_neg_rank < 1:
        raise InputError(f"--min-neg-rank must be at least 1, got {min_neg_rank}")
    if filter_top_k < 0:
        raise InputError(f"--filter-top-k must be 0 (off) or a rank, got {filter_top_k}")
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; pass a .jsonl file")
    if is_collection_spec(corpus):
        docs = open_collection(corpus, skip_bad=skip_bad).docs
    else:
        docs = corpus_documents(corpus, skip_bad=skip_bad)[1]
    if not docs:
        raise InputError(f"corpus {corpus} has no documents; pass a corpus with text")
    seeds, counts = seed_documents(docs, min_words=min_words, max_words=max_words)
    if not seeds:
        raise InputError(f"no document of {corpus} passes the length filter ({min_words}..{max_words} words); change --min-words/--max-words")
    chosen = select_documents(seeds, limit or None, (i, n), seed)
    cfg = SynthConfig(stages=stage_list, seed=seed, llm_negative=llm_negative, min_neg_rank=min_neg_rank, filter_top_k=filter_top_k,
                      max_doc_words=max_doc_words, hq_max_new_tokens=hq_tokens, vl_max_new_tokens=vl_tokens,
                      chunk_size=max(1, 2 * (concurrency if lm_url else batch_size)))
    if instruction is not None:
        cfg.instruction = instruction
    if retry_failed and failures_path(out).is_file():
        failures_path(out).unlink()
    from tessera.lm import load_backend

    with ui.status(f"loading {lm}"):
        backend = load_backend(lm, url=lm_url, batch_size=batch_size, concurrency=concurrency, repetition_penalty=repetition_penalty)
    with ui.progress() as bar:
        task = bar.add_task(f"synthesizing ({', '.join(stage_list)})", total=len(chosen) * len(stage_list))
        run = synthesize(chosen, backend, out, cfg, corpus=seeds, progress=lambda d, t: bar.update(task, completed=d, total=t))
    stats = synth_stats(out, run, extra={"corpus": corpus, "shard": f"{i}/{n}", "limit": limit or None,
                                         "seed_documents": counts, "lm": lm if not lm_url else f"{lm}@{lm_url}",
                                         "config": config_dict(cfg), "backend": backend.stats.to_dict()})
    ui.out.print(f"{run['written']} rows written, {run['rejected']} rejected by the round-trip filter, {run['failed']} failed, "
                 f"{run['skipped_finished']} already done; "
                 f"{stats['rows']} rows in {out} ({stats['failures']} failures recorded); "
                 f"{run.get('tokens_per_s', 0):.1f} generated tokens/s")
    ui.out.print(f"stats: {stats_path(out)}")


@retrieval_app.command("pairs")
def pairs_cmd(
    sources: list[str] = typer.Argument(..., help=f"Document sources: {_COLLECTION_OPT} (documents only, never queries), 'wikitext2', 'python-docs', or a file/folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Training rows (JSONL, ReasonIR format). Also writes OUT.stats.json and OUT.parts/ (finished sources; a rerun resumes from them)."),
    kinds: str = typer.Option("crop,title", "--kinds", help="Comma-separated: crop (Contriever's independent cropping) and/or title (title or first sentence -> text)."),
    negatives: str = typer.Option("bm25", "--negatives", help="bm25 or minilm: ReasonIR's hard negative, the first non-positive at that retriever's rank >= --min-neg-rank; none."),
    min_neg_rank: int = typer.Option(20, "--min-neg-rank", help="BM25 hard negative rank (ReasonIR: 20)."),
    crops_per_chunk: int = typer.Option(1, "--crops-per-chunk", help="Crop pairs drawn from each chunk of a document."),
    chunk_words: int = typer.Option(256, "--chunk-words", help="Documents are cut into chunks of this many words before cropping."),
    max_chunks: int = typer.Option(4, "--max-chunks", help="At most this many chunks of one document are cropped."),
    word_dropout: float = typer.Option(0.1, "--word-dropout", help="Probability of deleting each word of a crop (Contriever: 0.1)."),
    max_pos_words: int = typer.Option(200, "--max-pos-words", help="Positives and negatives are cut to this many words."),
    instruction: str = typer.Option("", "--instruction", help="Query instruction stored in the rows."),
    seed: int = typer.Option(0, "--seed", help="Seeds every crop and fallback negative (per source, document and kind)."),
):
    """Training pairs from documents alone: Contriever crops and title pairs, with BM25 hard negatives."""
    from tessera.retrieval.pairs import PairSettings, build_pairs

    settings = PairSettings(kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()), crops_per_chunk=crops_per_chunk,
                            chunk_words=chunk_words, max_chunks_per_doc=max_chunks, word_dropout=word_dropout,
                            max_pos_words=max_pos_words, negatives=negatives, min_neg_rank=min_neg_rank,
                            instruction=instruction, seed=seed)

    def report(name: str, st: dict) -> None:
        neg = st.get("negatives") or {}
        ui.info(f"{name}: {st['rows']} rows from {st['documents']} documents {st['rows_by_kind']}"
                + (f"; {negatives} negatives {neg.get('ranked', 0)} at rank >= {min_neg_rank}" if neg else "")
                + (" (resumed)" if st.get("resumed") else ""))

    stats = build_pairs(sources, out, settings, progress=report)
    ui.out.print(f"{stats['rows']} rows in {out} ({stats['wall_s']} s)")
