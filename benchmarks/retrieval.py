"""Retrieval benchmark: BM25, the embedded MiniLM and hybrid on Cranfield, Vaswani and SciFact.

Measures, in one run on this machine:
- nDCG@10, Recall@100 and MRR@10 (pytrec_eval; 0..1 scale, x100 = the papers'
  points) of BM25 (bm25s), dense all-MiniLM-L6-v2 (tessera's corpus encoder +
  faiss IndexFlatIP) and hybrid (reciprocal-rank fusion, k=60, of the two top-100
  runs; min-max score fusion too) on Cranfield (225 queries), Vaswani (93) and
  SciFact (the 809 train claims; the test claims are not in the shared data);
- parity: the same MiniLM figures computed the plain way, ``SentenceTransformer.encode``
  on documents and queries plus cosine similarity and a numpy top-100, in the same
  run; the difference must stay within 0.1 point (0.001 on the 0..1 scale);
- encoding throughput (documents/s) of tessera's ``encode_corpus`` (batches sorted
  by exact token length) against ``SentenceTransformer.encode`` (which sorts by
  character length) on the full corpora, same model, batch size and max length,
  as a ratio.  The machine is shared, so each corpus is cut into random chunks of
  1,024 documents and every chunk is encoded by both, alternating which goes
  first; the padded tokens each batching feeds the model are counted too
  (a noise-free measure of the lever).  The embeddings timed are the ones scored.
  A second, controlled check runs both on one torch thread over a seeded sample
  of each corpus for a few alternating rounds and compares process CPU time,
  which the other processes on a shared machine barely disturb.

Writes benchmarks/results/retrieval.json.  Usage:
    python benchmarks/retrieval.py [--batch-size 32] [--chunk 1024] [--max-docs N] [--collections cranfield,vaswani,scifact]
    python benchmarks/retrieval.py --only-controlled   # just the one-thread check, added to the existing JSON
``--max-docs`` subsamples a corpus (all judged documents kept, then a seeded random
sample of the rest); it is off by default and the JSON records it when used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tessera import __version__
from tessera.data.types import Collection
from tessera.hub import load_encoder
from tessera.retrieval.dense_index import DenseIndex, encode_corpus, encode_queries, token_lengths
from tessera.retrieval.hybrid import fuse
from tessera.retrieval.metrics import evaluate
from tessera.retrieval.search import bm25_run, dense_run, open_collection

from _common import package_versions

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("ndcg@10", "recall@100", "mrr@10")
K = 100


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def subsample(coll: Collection, max_docs: int | None, seed: int = 0) -> tuple[Collection, dict | None]:
    if not max_docs or len(coll.docs) <= max_docs:
        return coll, None
    judged = {d for rels in coll.qrels.values() for d in rels}
    keep = [d for d in coll.docs if d.id in judged]
    rest = [d for d in coll.docs if d.id not in judged]
    random.Random(seed).shuffle(rest)
    keep_ids = {d.id for d in keep + rest[: max(0, max_docs - len(keep))]}
    docs = [d for d in coll.docs if d.id in keep_ids]
    note = {"docs_total": len(coll.docs), "docs_used": len(docs), "rule": "all judged documents + seeded random sample of the rest"}
    return Collection(docs, coll.queries, coll.qrels, coll.name, coll.n_skipped), note


def headline(res: dict) -> dict:
    return {m: round(res[m], 6) for m in METRICS}


def padded_tokens(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> int:
    return int(sum(lengths[order[s : s + batch_size]].max() * len(order[s : s + batch_size]) for s in range(0, len(order), batch_size)))


def plain_st_run(model, coll: Collection, doc_embs: np.ndarray, batch_size: int) -> dict:
    """The peer's way: ``encode`` queries, cosine similarity against the documents, numpy top-k."""
    q = model.encode([x.text for x in coll.queries], batch_size=batch_size, convert_to_numpy=True)
    d = doc_embs / np.linalg.norm(doc_embs, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = q @ d.T
    ids = [x.id for x in coll.docs]
    run = {}
    for qi, qq in enumerate(coll.queries):
        top = np.argsort(-sims[qi], kind="stable")[:K]
        run[qq.id] = {ids[j]: float(sims[qi, j]) for j in top}
    return run


def controlled_throughput(model, names: list[str], sample: int, rounds: int, batch_size: int) -> dict:
    """tessera vs SentenceTransformer.encode on one thread, by process CPU time, alternating rounds.

    On a shared 2-core machine wall time with two torch threads mostly measures the
    other processes; one thread and CPU time measure the work itself.  A seeded
    sample of ``sample`` documents per collection, ``rounds`` rounds, the order of
    the two flipping every round.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict = {"threads": 1, "sample_docs_per_collection": sample, "rounds": rounds, "collections": {}}
    tot = {"tessera": [0.0, 0.0, 0], "st": [0.0, 0.0, 0]}
    try:
        for ci, name in enumerate(names):
            docs = open_collection(name).docs
            pick = np.random.default_rng(100 + ci).permutation(len(docs))[:sample]
            texts = [docs[i].full_text for i in pick]
            fns = {"tessera": lambda: encode_corpus(model, texts, batch_size=batch_size, rank=0, world_size=1),
                   "st": lambda: model.encode(texts, batch_size=batch_size, convert_to_numpy=True)}
            per = {"tessera": [], "st": []}
            for r in range(rounds):
                for who in (("tessera", "st") if (ci + r) % 2 == 0 else ("st", "tessera")):
                    _, wall, cpu = timed(fns[who])
                    per[who].append((round(cpu, 2), round(wall, 2)))
                    tot[who][0] += cpu
                    tot[who][1] += wall
                    tot[who][2] += len(texts)
            c_t, c_s = sum(c for c, _ in per["tessera"]), sum(c for c, _ in per["st"])
            out["collections"][name] = {"tessera_cpu_s": [c for c, _ in per["tessera"]], "st_cpu_s": [c for c, _ in per["st"]],
                                        "ratio_cpu_time": round(c_s / c_t, 3)}
            log(f"  controlled {name}: ratio (CPU time) {c_s / c_t:.3f}")
    finally:
        torch.set_num_threads(threads)
    out["tessera_docs_per_cpu_s"] = round(tot["tessera"][2] / tot["tessera"][0], 2)
    out["sentence_transformers_docs_per_cpu_s"] = round(tot["st"][2] / tot["st"][0], 2)
    out["ratio_cpu_time"] = round(tot["st"][0] / tot["tessera"][0], 3)
    out["ratio_wall"] = round(tot["st"][1] / tot["tessera"][1], 3)
    return out


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-docs", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=1024, help="documents per interleaved timing chunk")
    ap.add_argument("--controlled-sample", type=int, default=384, help="documents per collection for the one-thread throughput check")
    ap.add_argument("--controlled-rounds", type=int, default=3)
    ap.add_argument("--only-controlled", action="store_true",
                    help="run only the one-thread throughput check and add it to the existing JSON at --out")
    ap.add_argument("--collections", default="cranfield,vaswani,scifact")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "retrieval.json"))
    args = ap.parse_args()
    t_start = time.perf_counter()
    results_load = [round(x, 2) for x in os.getloadavg()]

    model = load_encoder("default-encoder", device="cpu")
    dim = model.get_embedding_dimension()
    names = args.collections.split(",")
    if args.only_controlled:
        results = json.loads(Path(args.out).read_text())
        log("one-thread throughput check only")
        results["throughput_controlled"] = controlled_throughput(model, names, args.controlled_sample, args.controlled_rounds, args.batch_size)
        results["throughput_controlled"]["run"] = {"separate_run": True, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                   "load_average_start": results_load, "wall_s": round(time.perf_counter() - t_start, 1)}
        results["summary"]["throughput_ratio_controlled_cpu_time"] = results["throughput_controlled"]["ratio_cpu_time"]
        write(results, args.out, complete=results.get("complete", True))
        print(json.dumps(results["summary"], indent=2))
        return
    cpu_model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    versions = {"tessera": __version__, "python": platform.python_version(),
                **package_versions("torch", "transformers", "sentence-transformers", "faiss-cpu", "bm25s", "pytrec-eval-terrier",
                                   "numpy")}
    results: dict = {
        "benchmark": "retrieval",
        "machine": {"platform": platform.platform(), "cpu": cpu_model, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": "cpu", "load_average_start": [round(x, 2) for x in os.getloadavg()]},
        "versions": versions,
        "config": {"encoder": "default-encoder (all-MiniLM-L6-v2, embedded)", "max_seq_length": model.max_seq_length,
                   "batch_size": args.batch_size, "k": K, "dense_index": "faiss IndexFlatIP (exact) over L2-normalized embeddings",
                   "bm25": "bm25s Lucene variant, k1=1.5, b=0.75, English stemming (PyStemmer) and stopwords",
                   "hybrid": "reciprocal-rank fusion k=60 of the BM25 and dense top-100 (hybrid_score: min-max score fusion, equal weights)",
                   "documents": "title + text (Document.full_text)", "scale": "0..1 (x100 = the papers' points)",
                   "max_docs": args.max_docs},
        "collections": {},
    }
    totals = {"tessera": [0, 0.0, 0.0], "st": [0, 0.0, 0.0]}  # docs, wall s, cpu s
    all_ratios: list[float] = []
    for ci, name in enumerate(names):
        coll, note = subsample(open_collection(name), args.max_docs)
        texts = [d.full_text for d in coll.docs]
        log(f"{coll.name}: {len(texts)} documents, {len(coll.queries)} queries")
        entry: dict = {"name": coll.name, "n_docs": len(texts), "n_queries": len(coll.queries)}
        if note:
            entry["subsampled"] = note

        # BM25
        bm25, t_bm25, _ = timed(lambda: bm25_run(coll, K))
        entry["bm25"] = headline(evaluate(bm25, coll.qrels))
        entry["bm25"]["index_and_search_s"] = round(t_bm25, 2)

        # Encode the corpus both ways, interleaved: the documents are cut into seeded random chunks of
        # --chunk documents; each chunk is encoded by both, alternating which goes first, so load from
        # other processes on this shared machine falls on both alike.
        perm = np.random.default_rng(ci).permutation(len(texts))
        chunks = [perm[s : s + args.chunk] for s in range(0, len(perm), args.chunk)]
        embs = {"tessera": np.zeros((len(texts), dim), np.float32), "st": np.zeros((len(texts), dim), np.float32)}
        enc = {"tessera": [0.0, 0.0], "st": [0.0, 0.0]}
        chunk_ratios = []
        for j, idx in enumerate(chunks):
            part = [texts[i] for i in idx]
            fns = {"tessera": lambda: encode_corpus(model, part, batch_size=args.batch_size, rank=0, world_size=1),
                   "st": lambda: model.encode(part, batch_size=args.batch_size, convert_to_numpy=True)}
            walls = {}
            for who in (("tessera", "st") if (ci + j) % 2 == 0 else ("st", "tessera")):
                out, wall, cpu = timed(fns[who])
                embs[who][idx] = out
                enc[who][0] += wall
                enc[who][1] += cpu
                walls[who] = wall
            chunk_ratios.append(walls["st"] / walls["tessera"])
            log(f"  chunk {j + 1}/{len(chunks)}: tessera {len(idx) / walls['tessera']:.1f} docs/s, "
                f"ST {len(idx) / walls['st']:.1f} docs/s")
        for who in enc:
            totals[who][0] += len(texts)
            totals[who][1] += enc[who][0]
            totals[who][2] += enc[who][1]
        all_ratios.extend(chunk_ratios)
        lengths = token_lengths(model, texts)
        pad_ours = sum(padded_tokens(lengths[idx], np.argsort(-lengths[idx], kind="stable"), args.batch_size) for idx in chunks)
        pad_st = sum(padded_tokens(lengths[idx], np.argsort([-len(texts[i]) for i in idx], kind="stable"), args.batch_size) for idx in chunks)
        entry["encoding"] = {
            "tessera": {"wall_s": round(enc["tessera"][0], 2), "cpu_s": round(enc["tessera"][1], 2),
                        "docs_per_s": round(len(texts) / enc["tessera"][0], 2)},
            "sentence_transformers": {"wall_s": round(enc["st"][0], 2), "cpu_s": round(enc["st"][1], 2),
                                      "docs_per_s": round(len(texts) / enc["st"][0], 2)},
            "ratio_docs_per_s": round(enc["st"][0] / enc["tessera"][0], 3),
            "chunks": len(chunks), "chunk_ratios": [round(r, 3) for r in chunk_ratios],
            "real_tokens": int(lengths.sum()),
            "padded_tokens_tessera": pad_ours,  # batches by exact token length
            "padded_tokens_sentence_transformers": pad_st,  # batches by character length
            "max_abs_embedding_diff": float(np.abs(embs["tessera"] - embs["st"]).max()),
        }

        # Dense: tessera (DenseIndex + encode_query) vs plain SentenceTransformer + cosine
        index = DenseIndex.build(embs["tessera"], [d.id for d in coll.docs], encoder="default-encoder")
        dense = dense_run(model, coll, K, batch_size=args.batch_size, index=index)
        entry["minilm"] = headline(evaluate(dense, coll.qrels))
        plain = plain_st_run(model, coll, embs["st"], args.batch_size)
        entry["minilm_plain_st"] = headline(evaluate(plain, coll.qrels))
        entry["parity_delta_points"] = {m: round(100 * (entry["minilm"][m] - entry["minilm_plain_st"][m]), 4) for m in METRICS}
        entry["parity_ok"] = all(abs(v) <= 0.1 for v in entry["parity_delta_points"].values())

        # Hybrid
        entry["hybrid"] = headline(evaluate(fuse([bm25, dense], "rrf", depth=K), coll.qrels))
        entry["hybrid_score"] = headline(evaluate(fuse([bm25, dense], "score", depth=K), coll.qrels))
        results["collections"][name] = entry
        write(results, args.out, complete=False)  # partial results survive an interrupted run
        log(f"  nDCG@10 bm25 {entry['bm25']['ndcg@10']:.4f} minilm {entry['minilm']['ndcg@10']:.4f} "
            f"(plain ST {entry['minilm_plain_st']['ndcg@10']:.4f}) hybrid {entry['hybrid']['ndcg@10']:.4f}; "
            f"encode ratio {entry['encoding']['ratio_docs_per_s']:.3f}")

    t, s = totals["tessera"], totals["st"]
    results["throughput"] = {
        "tessera_docs_per_s": round(t[0] / t[1], 2), "sentence_transformers_docs_per_s": round(s[0] / s[1], 2),
        "ratio": round(s[1] / t[1], 3), "ratio_cpu_time": round(s[2] / t[2], 3),
        "median_chunk_ratio": round(float(np.median(all_ratios)), 3), "goal": ">= 1.0",
        "note": "all corpora together, same process, same model, batch size and max_seq_length, timed on interleaved chunks "
                "(order alternating); ratio = ST wall time / tessera wall time",
    }
    log("one-thread throughput check")
    results["throughput_controlled"] = controlled_throughput(model, names, args.controlled_sample, args.controlled_rounds, args.batch_size)
    results["summary"] = {
        "ndcg@10": {n: {r: e[r]["ndcg@10"] for r in ("bm25", "minilm", "minilm_plain_st", "hybrid", "hybrid_score")}
                    for n, e in results["collections"].items()},
        "parity_max_abs_delta_points": max(abs(v) for e in results["collections"].values() for v in e["parity_delta_points"].values()),
        "parity_ok": all(e["parity_ok"] for e in results["collections"].values()),
        "throughput_ratio": results["throughput"]["ratio"],
        "throughput_ratio_controlled_cpu_time": results["throughput_controlled"]["ratio_cpu_time"],
    }
    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    write(results, args.out, complete=True)
    print(json.dumps(results["summary"], indent=2))
    log(f"wrote {args.out} in {results['wall_s']} s")


def write(results: dict, path: str, complete: bool) -> None:
    from tessera.config import atomic_write_text

    atomic_write_text(Path(path), json.dumps({**results, "complete": complete}, indent=2) + "\n")


if __name__ == "__main__":
    main()
