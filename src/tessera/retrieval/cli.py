"""``tessera retrieval index | search | eval``.

- ``index CORPUS --out DIR``: BM25 and/or dense index over a corpus (a collection
  spec such as ``cranfield``/``beir:PATH``, ``python-docs``, or a file/folder of
  documents), written atomically; dense encoding resumes if interrupted and shards
  across ranks under torchrun.
- ``search DIR QUERY``: ranked doc ids, titles and scores (``--json``).
- ``eval --collection C --retriever R --out DIR``: a TREC run file (``run.trec``)
  and ``metrics.json`` (nDCG@10, Recall@100, MRR@10 in 0..1, per query too).
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
    encoder: str = typer.Option("default-encoder", "--encoder", "-e", help="Encoder spec for dense: 'default-encoder', a folder or a cached hub id."),
    batch_size: int = typer.Option(32, "--batch-size", help="Documents per encoder batch."),
    kind: str = typer.Option("auto", "--kind", help="Dense index: auto (exact up to 100k docs, HNSW above) | flat | hnsw | ivf."),
    split: str = typer.Option(None, "--split", help="Qrels split for BEIR/SciFact (only affects which queries are read)."),
    task: str = typer.Option(None, "--task", help="BRIGHT task (documents/<task>.jsonl)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip malformed rows instead of stopping."),
):
    """Build a BM25 and/or dense index for a corpus into a folder."""
    import shutil
    import tempfile

    from tessera.config import atomic_write_text
    from tessera.data.jsonl import write_jsonl_atomic
    from tessera.retrieval.corpus_index import corpus_documents
    from tessera.retrieval.dense_index import KINDS, DenseIndex, encode_corpus, encoder_name, replace_dir
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
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
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ui.out.print(f"indexed {len(docs)} documents of {name} ({' + '.join(built)}) into {out}")


def _read_index_dir(folder: Path) -> dict:
    meta_path = folder / "index.json"
    if not meta_path.is_file():
        raise InputError(f"{folder} is not a tessera index (no index.json); build one with `tessera retrieval index CORPUS --out {folder}`")
    return json.loads(meta_path.read_text(encoding="utf-8"))


@retrieval_app.command("search")
def search_cmd(
    index_dir: Path = typer.Argument(..., help="A folder written by `tessera retrieval index`."),
    query: str = typer.Argument(..., help="The query."),
    k: int = typer.Option(10, "--k", "-k", help="Number of documents to return."),
    retriever: str = typer.Option("auto", "--retriever", "-r", help="auto (hybrid when both indexes exist) | bm25 | dense | hybrid."),
    encoder: str = typer.Option(None, "--encoder", "-e", help="Query encoder (default: the one the index was built with)."),
    fusion: str = typer.Option("rrf", "--fusion", help="Hybrid fusion: rrf (reciprocal rank, k=60) | score (min-max, summed)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
):
    """Query an index: ranked doc ids, titles and scores."""
    from tessera.data.jsonl import read_jsonl
    from tessera.retrieval.bm25 import BM25Index
    from tessera.retrieval.dense_index import DenseIndex, encode_queries
    from tessera.retrieval.hybrid import FUSIONS, fuse
    from tessera.retrieval.metrics import ranked

    meta = _read_index_dir(index_dir)
    have = meta.get("indexes", [])
    if retriever == "auto":
        retriever = "hybrid" if len(have) == 2 else (have[0] if have else "bm25")
    _check_choice(retriever, ("bm25", "dense", "hybrid"), "retriever")
    _check_choice(fusion, FUSIONS, "fusion")
    _check_positive(k, "--k")
    if not query.strip():
        raise InputError("the query is empty; pass a query")
    need = ["bm25", "dense"] if retriever == "hybrid" else [retriever]
    missing = [n for n in need if n not in have]
    if missing:
        raise InputError(f"{index_dir} has no {' or '.join(missing)} index (it has {', '.join(have) or 'none'}); "
                         f"rebuild with `tessera retrieval index ... --retriever {retriever}` or pick --retriever {' or '.join(have)}")
    rows = read_jsonl(index_dir / "docs.jsonl")
    ids = [r["id"] for r in rows]
    docs = {r["id"]: r for r in rows}
    depth = max(k, 100) if retriever == "hybrid" else k
    runs = []
    if "bm25" in need:
        hits = BM25Index.load(index_dir / "bm25").search(query, depth)
        runs.append({ids[i]: s for i, s in hits})
    if "dense" in need:
        dense = DenseIndex.load(index_dir / "dense")
        spec = encoder or dense.encoder.get("spec") or "default-encoder"
        model = _load_encoder(spec)
        runs.append(dict(dense.search(encode_queries(model, [query]), depth)[0]))
    scores = runs[0] if len(runs) == 1 else fuse([{"q": r} for r in runs], method=fusion, depth=depth)["q"]
    results = [{"rank": r, "doc_id": d, "title": docs.get(d, {}).get("title", ""), "score": s}
               for r, (d, s) in enumerate(ranked(scores, k), 1)]
    if as_json:
        print(json.dumps(results, ensure_ascii=False, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{retriever}: {query}", title_justify="left")
    for col, just in (("#", "right"), ("doc id", "left"), ("title", "left"), ("score", "right")):
        table.add_column(col, justify=just, overflow="fold")
    for r in results:
        table.add_row(str(r["rank"]), r["doc_id"], r["title"] or " ".join(docs.get(r["doc_id"], {}).get("text", "").split())[:80], f"{r['score']:.4f}")
    if results:
        ui.out.print(table)
    else:
        ui.out.print("no documents matched")


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
):
    """Evaluate a retriever on a collection: writes a TREC run file and a metrics JSON, prints nDCG@10/Recall@100/MRR@10."""
    from tessera import __version__
    from tessera.config import atomic_write_text
    from tessera.retrieval.hybrid import FUSIONS
    from tessera.retrieval.metrics import evaluate, write_trec_run
    from tessera.retrieval.search import RETRIEVERS, open_collection, retrieve

    _check_choice(retriever, RETRIEVERS, "retriever")
    _check_choice(fusion, FUSIONS, "fusion")
    _check_positive(k, "--k")
    _check_positive(batch_size, "--batch-size")
    _check_out_dir(out)
    t = time.perf_counter()
    coll = open_collection(collection, split=split, task=task, skip_bad=skip_bad)
    if not coll.queries:
        raise InputError(f"collection {collection} has no judged queries; check its qrels (and --split)")
    timings = {"load_collection_s": time.perf_counter() - t}
    model = _load_encoder(encoder) if retriever != "bm25" else None
    t = time.perf_counter()
    run = retrieve(coll, retriever, k=k, model=model, batch_size=batch_size, fusion=fusion, spec=encoder)
    timings["retrieve_s"] = time.perf_counter() - t
    res = evaluate(run, coll.qrels)
    metrics = {m: res[m] for m in ("ndcg@10", "recall@100", "mrr@10")}
    tag = f"tessera-{retriever}"
    doc = {"collection": coll.name, "collection_spec": collection, "retriever": retriever,
           "encoder": encoder if model is not None else None, "fusion": fusion if retriever == "hybrid" else None,
           "k": k, "n_docs": len(coll.docs), "n_queries": res["n_queries"], "n_skipped_rows": coll.n_skipped,
           "scale": "0..1 (x100 for the papers' points)", "metrics": metrics, "timings": {n: round(v, 3) for n, v in timings.items()},
           "tessera_version": __version__, "per_query": res["per_query"]}
    out.mkdir(parents=True, exist_ok=True)
    run_path = write_trec_run(out / "run.trec", run, tag=tag)
    atomic_write_text(out / "metrics.json", json.dumps(doc, indent=2))
    ui.out.print(f"{coll.name} {retriever}{f' ({encoder})' if model is not None else ''}: "
                 f"nDCG@10 {metrics['ndcg@10']:.4f}  Recall@100 {metrics['recall@100']:.4f}  MRR@10 {metrics['mrr@10']:.4f}  "
                 f"({res['n_queries']} queries, 0..1 scale)")
    ui.out.print(f"wrote {run_path} and {out / 'metrics.json'}")
