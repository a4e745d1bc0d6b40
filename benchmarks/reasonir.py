"""ReasonIR's claim at this machine's scale: training data written from documents alone makes a retriever better.

Stages (each cached in ``--work``, default ``$TESSERA_HOME/bench/reasonir-data``; a rerun resumes):

1. ``synth``: ``tessera.retrieval.synth`` on a seeded sample of ``--synth-docs`` SciFact *documents*
   (never the claims) with the embedded SmolLM2, HQ queries, BM25 rank>=20 hard negatives, kept only
   when BM25 ranks the source document in the top ``--filter-top-k`` of the whole corpus (round-trip
   filtering, as Promptagator and InPars do for weak generators).  One invocation spends at most
   ``--synth-minutes``; run again to continue (rows append by id).
2. ``pairs``: Contriever crops of the SciFact corpus (``tessera.retrieval.pairs``), BM25 negatives.
3. ``baselines``: BM25 and all-MiniLM-L6-v2 on the held-out claims (the full 5,183-document corpus),
   Cranfield and Vaswani.  SciFact's claims are split by a hash of the claim id, about 80/20.
4. ``finetune``: MiniLM fine-tuned (``retrieval-train``: InfoNCE over in-batch and hard negatives) on
   (a) the training claims, (b) (a) plus the filtered synthetic rows, (c) (b) plus crops, one epoch each,
   ``--seeds`` seeds; the curve of held-out nDCG@10 against synthetic rows used (seed 0).  Nothing is
   trained on Cranfield's or Vaswani's queries.

Usage: python benchmarks/reasonir.py [--quick] [--stages synth,pairs,baselines,finetune] [--fresh]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TESSERA_QUIET", "1")

from _common import package_versions  # noqa: E402

STAGES = ("synth", "pairs", "baselines", "finetune")
OPTIONAL_STAGES = ("llm",)  # run only when named: --stages llm
CONFIGS = ("a_claims", "b_claims_synthetic", "c_claims_synthetic_crops", "d_synthetic_then_claims")
DEFAULT_CONFIGS = CONFIGS[:3]  # (d), a curriculum, runs when named: --configs a_claims,...,d_synthetic_then_claims


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def held_out(claim_id: str) -> bool:
    """The held-out fifth of SciFact's claims: a hash of the id, so the split never depends on order."""
    return int(hashlib.sha1(f"scifact-claim:{claim_id}".encode()).hexdigest(), 16) % 5 == 0


class Work:
    """Stage results cached as ``<stage>.json`` in the work folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def get(self, name: str):
        p = self.folder / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def put(self, name: str, value) -> None:
        from tessera.config import atomic_write_text

        atomic_write_text(self.folder / f"{name}.json", json.dumps(value, indent=2, ensure_ascii=False))


# ------------------------------------------------------------------------------------------------ data

def scifact():
    from tessera.retrieval.search import open_collection

    return open_collection("scifact")


def stage_synth(args, work: Work) -> dict:
    """Filtered synthetic rows from SciFact documents, within this invocation's time budget."""
    from tessera.lm import load_backend
    from tessera.retrieval.synth import SynthConfig, seed_documents, select_documents, synth_stats, synthesize

    docs = scifact().docs
    seeds, counts = seed_documents(docs, min_words=30, max_words=5000)
    chosen = select_documents(seeds, args.synth_docs, seed=args.seed)
    out = work.folder / "synth.jsonl"
    cfg = SynthConfig(stages=("hq",), seed=args.seed, filter_top_k=args.filter_top_k, chunk_size=2 * args.batch_size)
    backend = load_backend("default", device="cpu", batch_size=args.batch_size, repetition_penalty=1.1)
    t0, runs = time.perf_counter(), []
    step = 4 * cfg.chunk_size
    for start in range(0, len(chosen), step):
        if time.perf_counter() - t0 > 60 * args.synth_minutes:
            log(f"synth: time budget of {args.synth_minutes} min spent; run again to continue")
            break
        runs.append(synthesize(chosen[start:start + step], backend, out, cfg, corpus=seeds))
        log(f"synth: {start + step}/{len(chosen)} documents, {sum(r['written'] for r in runs)} kept, "
            f"{sum(r['rejected'] for r in runs)} rejected this run")
    run = {k: sum(r[k] for r in runs) for k in ("written", "rejected", "failed", "new_tokens")}
    run["seconds"] = round(time.perf_counter() - t0, 1)
    run["rows_per_hour"] = round(3600 * run["written"] / max(run["seconds"], 1e-9), 1)
    stats = synth_stats(out, run, extra={"seed_documents": counts, "documents_chosen": len(chosen)})
    stats["complete"] = stats["rows"] + stats["rejected"] + stats["failures"] >= len(chosen)
    return stats


def stage_pairs(args, work: Work) -> dict:
    from tessera.retrieval.pairs import PairSettings, build_pairs

    stats = build_pairs(["scifact"], work.folder / "crops-all.jsonl", PairSettings(kinds=("crop",), seed=args.seed))
    rows = [json.loads(line) for line in (work.folder / "crops-all.jsonl").read_text().splitlines()]
    rows = random.Random(args.seed).sample(rows, min(args.crop_rows, len(rows)))
    _write_rows(work.folder / "crops.jsonl", rows)
    return {"rows_available": stats["rows"], "rows_used": len(rows), "wall_s": stats["wall_s"]}


def claim_rows(limit: int = 0) -> tuple[list[dict], dict]:
    from tessera.retrieval.train import mine_bm25_negatives

    coll = scifact()
    train_ids = [q.id for q in coll.queries if not held_out(q.id)]
    rows, stats = mine_bm25_negatives(coll, n_negatives=1, query_ids=train_ids)
    if limit:
        rows = random.Random(0).sample(rows, min(limit, len(rows)))
    return rows, {"train_claims": len(train_ids), "rows": len(rows), "no_positive": stats["no_positive_in_corpus"]}


def _write_rows(path: Path, rows: list[dict]) -> Path:
    from tessera.data.jsonl import write_jsonl_atomic

    return write_jsonl_atomic(path, _plain(rows))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# ------------------------------------------------------------------------------------------------ evaluation

def heldout_claims(reduced: bool = False):
    """The held-out claims over the full corpus, or (``reduced``) over their judged documents and 1,000 others."""
    from tessera.data.types import Collection

    sf = scifact()
    queries = [q for q in sf.queries if held_out(q.id)]
    docs = sf.docs
    if reduced:
        judged = {d for q in queries for d in sf.qrels.get(q.id, {})}
        others = random.Random(0).sample([d for d in docs if d.id not in judged], 1000)
        keep = judged | {d.id for d in others}
        docs = [d for d in docs if d.id in keep]
    name = "scifact_heldout_reduced" if reduced else "scifact_heldout"
    return Collection(docs, queries, {q.id: sf.qrels[q.id] for q in queries if q.id in sf.qrels}, name)


def eval_collections(quick: bool) -> dict:
    """Held-out claims over the full SciFact corpus, Cranfield and Vaswani (``--quick``: SciFact only, on the
    judged documents plus 1,000 others, for iterating)."""
    from tessera.retrieval.search import open_collection

    colls = {"scifact_heldout": heldout_claims(reduced=quick)}
    if not quick:
        colls["cranfield"] = open_collection("cranfield")
        colls["vaswani"] = open_collection("vaswani")
    return colls


def evaluate_run(run, coll, seconds: float) -> dict:
    from tessera.retrieval.metrics import evaluate

    m = evaluate(run, coll.qrels)
    return {"ndcg@10": round(m["ndcg@10"], 5), "recall@100": round(m["recall@100"], 5), "n_queries": m["n_queries"],
            "n_docs": len(coll.docs), "seconds": round(seconds, 1)}


def eval_dense(spec: str, colls: dict, names=None, max_seq_length: int = 128) -> dict:
    """A symmetric model: every collection's documents encoded again (``--tower both``)."""
    from tessera.hub import load_encoder
    from tessera.retrieval.search import dense_run

    model = load_encoder(spec, device="cpu")
    model.max_seq_length = max_seq_length
    out = {}
    for name in names or colls:
        t = time.perf_counter()
        out[name] = evaluate_run(dense_run(model, colls[name], k=100, batch_size=64), colls[name], time.perf_counter() - t)
        log(f"  {Path(spec).name} {name}: nDCG@10 {out[name]['ndcg@10']:.4f} ({out[name]['seconds']} s)")
    return out


def base_encoder(args):
    from tessera.hub import load_encoder

    model = load_encoder("default-encoder", device="cpu")
    model.max_seq_length = args.max_seq_length
    return model


def doc_embeddings(args, work: Work, colls: dict) -> dict:
    """Each collection's documents encoded once by the base MiniLM (the frozen document side), cached as .npy."""
    import numpy as np

    from tessera.retrieval.dense_index import encode_corpus

    out, model = {}, None
    for name, coll in colls.items():
        path = work.folder / f"docs-{name}-L{args.max_seq_length}.npy"
        if not path.is_file():
            model = model or base_encoder(args)
            t = time.perf_counter()
            embs = encode_corpus(model, [d.full_text for d in coll.docs], batch_size=64, work_dir=work.folder / "shards",
                                 rank=0, world_size=1)
            from tessera.config import atomic_file

            with atomic_file(path) as tmp, open(tmp, "wb") as f:
                np.save(f, embs)
            log(f"  encoded {len(coll.docs)} {name} documents at {args.max_seq_length} tokens ({time.perf_counter() - t:.0f} s)")
        out[name] = np.load(path)
        if len(out[name]) != len(coll.docs):
            raise SystemExit(f"{path} holds {len(out[name])} rows for {len(coll.docs)} documents; delete it and rerun")
    return out


def eval_queries(model, colls: dict, embs: dict, label: str) -> dict:
    """Judge a query encoder against the cached document embeddings: only the queries are encoded."""
    from tessera.retrieval.dense_index import DenseIndex
    from tessera.retrieval.search import dense_run

    out = {}
    for name, coll in colls.items():
        t = time.perf_counter()
        index = DenseIndex.build(embs[name], [d.id for d in coll.docs], kind="flat")
        out[name] = evaluate_run(dense_run(model, coll, k=100, batch_size=64, index=index), coll, time.perf_counter() - t)
        log(f"  {label} {name}: nDCG@10 {out[name]['ndcg@10']:.4f}")
    return out


def stage_baselines(args, work: Work, colls: dict) -> dict:
    from tessera.retrieval.search import bm25_run

    bm25 = {}
    for name, c in colls.items():
        t = time.perf_counter()
        bm25[name] = evaluate_run(bm25_run(c, k=100), c, time.perf_counter() - t)
    return {"bm25": bm25, "minilm": eval_queries(base_encoder(args), colls, doc_embeddings(args, work, colls), "MiniLM"),
            "max_seq_length": args.max_seq_length}


# ------------------------------------------------------------------------------------------------ training

def train_symmetric(args, work: Work, name: str, rows: list[dict], seed: int) -> tuple[str, dict]:
    """``--tower both``: fine-tune all of MiniLM (``retrieval-train``, in-batch and hard negatives)."""
    from tessera.recipes.retrieval_train import Config, main

    data = _write_rows(work.folder / "train" / f"{name}-s{seed}.jsonl", rows)
    dump = work.folder / "train" / f"{name}-s{seed}"
    if dump.exists():
        shutil.rmtree(dump)
    steps = max(1, args.epochs * len(rows) // args.train_batch)
    main(Config(data=str(data), backbone="default-encoder", dump_dir=str(dump), seed=seed, steps=steps,
                batch_size=args.train_batch, lr=args.lr, temperature=args.temperature, max_seq_length=args.max_seq_length,
                logging_steps=max(1, steps // 10)))
    res = json.loads((dump / "results.json").read_text())
    return str(dump / "model"), {k: res.get(k) for k in ("rows", "examples", "steps", "train_s", "loss_first", "loss_last")}


class Trainer:
    """Trains (or reuses) one fine-tuned MiniLM per (rows, seed) and judges it.

    ``--tower query`` (default): only the query encoder trains, against the base MiniLM's document
    embeddings of the whole SciFact corpus (:mod:`tessera.retrieval.query_tower`); every collection's
    index is encoded once and a model is judged on all three by encoding its queries.
    ``--tower both``: the whole model trains; each judgement re-encodes the documents.
    """

    def __init__(self, args, work: Work, colls: dict):
        self.args, self.work, self.colls = args, work, colls
        self.embs = doc_embeddings(args, work, colls) if args.tower == "query" else None
        self._base = None

    def key(self, name: str, rows: list[dict], seed: int, then: list[dict] | None = None) -> str:
        """The cache of one run: its rows (by id) and every training setting are in the name."""
        ids = [[r.get("id") or r["query"][1] for r in part] for part in ([rows, then] if then else [rows])]
        return f"ft-{self.args.tower}-{name}-s{seed}-{digest(train_settings(self.args), *ids)}"

    def __call__(self, name: str, rows: list[dict], seed: int, then: list[dict] | None = None) -> dict:
        cache = self.key(name, rows, seed, then)
        cached = self.work.get(cache)
        if cached is None:
            log(f"finetune {cache}: {len(rows)} rows" + (f", then {len(then)}" if then else ""))
            if self.args.tower == "query":
                cached = self._query(cache, rows, seed, then)
            elif then:
                raise SystemExit("a curriculum (then=...) needs --tower query")
            else:
                cached = self._both(name, rows, seed)
            self.work.put(cache, cached)
        return cached

    def _query(self, cache: str, rows: list[dict], seed: int, then: list[dict] | None = None) -> dict:
        from tessera.retrieval.query_tower import Candidates, QueryTowerSettings, train_query_tower

        a = self.args
        self._base = self._base or base_encoder(a)
        held = self.colls["scifact_heldout"]  # the full corpus (--quick: the judged documents and 1,000 others)
        cands = Candidates.from_corpus(self._base, held.docs, embeddings=self.embs["scifact_heldout"])
        model, figures = train_query_tower(self._base, _plain(rows), cands, QueryTowerSettings(
            epochs=a.epochs, batch_size=a.train_batch, lr=a.lr, temperature=a.temperature,
            query_length=a.query_length, seed=seed), then=_plain(then) if then else None)
        folder = self.work.folder / "train" / cache
        model.save(str(folder))
        return {"model": str(folder), "train": figures, "eval": eval_queries(model, self.colls, self.embs, cache)}

    def _both(self, name: str, rows: list[dict], seed: int) -> dict:
        model, figures = train_symmetric(self.args, self.work, name, rows, seed)
        return {"model": model, "train": figures, "eval": eval_dense(model, self.colls, None, self.args.max_seq_length)}


def _plain(rows: list[dict]) -> list[dict]:
    """MiniLM has no instructions: every query is plain text."""
    return [{**r, "query": ["", r["query"][1]]} for r in rows]


def stage_finetune(args, work: Work, colls: dict) -> dict:
    """(a), (b), (c) (and (d), the synthetic rows first and then the claims, when named) per seed, judged on the
    held-out claims, Cranfield and Vaswani; then the curve of held-out nDCG@10 over synthetic rows used."""
    claims, claim_stats = claim_rows(args.claim_rows)
    synthetic = _read(work.folder / "synth.jsonl")
    crops = _read(work.folder / "crops.jsonl")
    sets = {"a_claims": (claims, None), "b_claims_synthetic": (claims + synthetic, None),
            "c_claims_synthetic_crops": (claims + synthetic + crops, None),
            "d_synthetic_then_claims": (synthetic, claims)}
    out = {"tower": args.tower, "data": {**claim_stats, "synthetic_rows": len(synthetic), "crop_rows": len(crops)},
           "runs": {}, "curve": {}}
    trainer = Trainer(args, work, colls)
    for seed in args.seeds:
        for name in args.configs:
            rows, then = sets[name]
            out["runs"][f"{name}/s{seed}"] = trainer(name, rows, seed, then)
    for n in args.curve:
        if 0 < n < len(synthetic):
            for seed in args.seeds[:args.curve_seeds]:
                used = random.Random(seed).sample(synthetic, n)
                out["curve"][f"{n}/s{seed}"] = trainer(f"curve{n}", claims + used, seed)
    return out


def stage_llm(args, work: Work) -> dict:
    """The bidirectional SmolLM2 retriever by DRAMA's recipe (mean pooling, LoRA): contrastive pretraining on
    crops, then fine-tuning on the claims and the synthetic rows.  Encoding SciFact's 5,183 documents with a
    135M model takes most of an hour here, so it is judged, with BM25 and MiniLM beside it, on the held-out
    claims over their judged documents plus 1,000 others."""
    from tessera.data.jsonl import write_jsonl_atomic
    from tessera.hub import load_encoder
    from tessera.recipes.retrieval_train import Config, main
    from tessera.retrieval.search import bm25_run, dense_run

    coll = heldout_claims(reduced=True)
    claims, _ = claim_rows(args.claim_rows)
    stages = {"pretrain_crops": (_read(work.folder / "crops.jsonl"), args.llm_steps // 3, "default"),
              "finetune": (claims + _read(work.folder / "synth.jsonl"), args.llm_steps, None)}
    out, backbone, t0 = {"corpus_docs": len(coll.docs), "queries": len(coll.queries), "training": {}}, "default", time.perf_counter()
    for name, (rows, steps, start) in stages.items():
        backbone = start or backbone
        dump = work.folder / "train" / f"llm-{name}-{args.llm_steps}"
        if not (dump / "model" / "modules.json").is_file():
            data = work.folder / "train" / f"llm-{name}.jsonl"
            write_jsonl_atomic(data, rows)  # SmolLM2 keeps the rows' instructions (ReasonIR's prompt format)
            log(f"llm {name}: {len(rows)} rows, {steps} steps of {args.llm_batch}")
            main(Config(data=str(data), backbone=backbone, dump_dir=str(dump), seed=args.seed, steps=steps,
                        batch_size=args.llm_batch, lr=1e-4, lora=True, max_seq_length=args.llm_length,
                        temperature=args.temperature, logging_steps=max(1, steps // 5)))
        res = json.loads((dump / "results.json").read_text())
        out["training"][name] = {k: res.get(k) for k in ("rows", "steps", "train_s", "loss_first", "loss_last")}
        backbone = str(dump / "model")
    t = time.perf_counter()
    out["bm25"] = evaluate_run(bm25_run(coll, k=100), coll, time.perf_counter() - t)
    for label, spec, length in (("minilm", "default-encoder", args.max_seq_length), ("smollm2_retriever", backbone,
                                                                                     args.llm_length)):
        model = load_encoder(spec, device="cpu")
        model.max_seq_length = length
        t = time.perf_counter()
        out[label] = evaluate_run(dense_run(model, coll, k=100, batch_size=16), coll, time.perf_counter() - t)
        log(f"  {label} on the reduced corpus: nDCG@10 {out[label]['ndcg@10']:.4f}")
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


# ------------------------------------------------------------------------------------------------ report

def _mean_std(xs: list[float]) -> dict:
    return {"mean": round(statistics.fmean(xs), 5), "std": round(statistics.pstdev(xs), 5) if len(xs) > 1 else 0.0,
            "n": len(xs)}


def summarise(ft: dict, seeds: list[int]) -> dict:
    """Mean and std over seeds of nDCG@10 per configuration and collection."""
    out = {}
    for name in CONFIGS:
        runs = [ft["runs"].get(f"{name}/s{s}") for s in seeds]
        runs = [r for r in runs if r]
        if runs:
            out[name] = {c: _mean_std([r["eval"][c]["ndcg@10"] for r in runs]) for c in runs[0]["eval"]}
    return out


def goals(base: dict, summary: dict, synth: dict | None, llm: dict | None = None) -> dict:
    def goal(target, measured, ok, **extra):
        return {"target": target, "measured": measured, "met": bool(measured is not None and ok(measured)), **extra}

    sf = "scifact_heldout"
    kept = (synth or {}).get("rows")
    a, b = summary.get("a_claims", {}).get(sf), summary.get("b_claims_synthetic", {}).get(sf)
    gain = round(100 * (b["mean"] - a["mean"]), 2) if a and b else None
    best = max(summary, key=lambda k: summary[k][sf]["mean"]) if summary else None
    vs_bm25 = round(100 * (summary[best][sf]["mean"] - base["bm25"][sf]["ndcg@10"]), 2) if best else None
    losses = [round(100 * (base["minilm"][c]["ndcg@10"] - summary[best][c]["mean"]), 2)
              for c in ("cranfield", "vaswani") if best and c in summary[best]]
    return {
        "synthetic_rows": goal(1000, kept, lambda m: m >= 1000),
        "reasonir_synthetic_gain_points": goal(2, gain, lambda m: m >= 2, **_best_synthetic(summary, a)),
        "finetuned_minus_bm25_scifact": goal(0, vs_bm25, lambda m: m >= 0, best_config=best),
        "cranfield_vaswani_loss_points": goal(0.5, max(losses) if losses else None, lambda m: m <= 0.5, best_config=best),
        "llm_retriever_minus_bm25_scifact": _llm_goal(goal, llm),
    }


def _best_synthetic(summary: dict, a: dict | None) -> dict:
    """Information beside (b) - (a): the best configuration that uses synthetic rows, and its gain over (a)."""
    sf = "scifact_heldout"
    with_synth = {k: v for k, v in summary.items() if k != "a_claims" and sf in v}
    if not a or not with_synth:
        return {}
    best = max(with_synth, key=lambda k: with_synth[k][sf]["mean"])
    return {"best_with_synthetic": best, "best_with_synthetic_gain": round(100 * (with_synth[best][sf]["mean"] - a["mean"]), 2)}


def _previous_runs(out: Path) -> list:
    """Earlier recorded runs kept in the results file (their figures and settings), carried over on a rewrite."""
    try:
        return json.loads(out.read_text()).get("previous_runs", [])
    except (OSError, ValueError):
        return []


def _llm_goal(goal, llm: dict | None) -> dict:
    if not llm:
        return goal(0, None, lambda m: m >= 0, information=True,
                    note="the SmolLM2 retriever is trained only by --stages llm (about 20 minutes here)")
    gap = round(100 * (llm["smollm2_retriever"]["ndcg@10"] - llm["bm25"]["ndcg@10"]), 2)
    return goal(0, gap, lambda m: m >= 0, information=True,
                minilm_minus_bm25=round(100 * (llm["minilm"]["ndcg@10"] - llm["bm25"]["ndcg@10"]), 2),
                note=f"held-out claims over their judged documents and 1,000 others ({llm['corpus_docs']} documents)")


def write_results(args, work: Work, t0: float, load_start) -> dict:
    from tessera.config import atomic_write_text

    synth, base, ft = work.get("synth"), work.get(stage_key("baselines", args)), work.get(stage_key("finetune", args, work))
    llm = work.get(stage_key("llm", args))
    invocations = (work.get("invocations") or []) + [{
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": args.stages, "configs": args.configs,
        "seeds": args.seeds, "curve": args.curve, "curve_seeds": args.curve_seeds, "wall_s": round(time.perf_counter() - t0, 1),
        "load_average_start": load_start, "load_average_end": os.getloadavg()}]
    work.put("invocations", invocations)
    summary = summarise(ft, args.seeds) if ft else {}
    done = sorted({int(k.rsplit("/s", 1)[1]) for k in (ft or {}).get("runs", {})})
    partial = [why for why, missing in (
        (f"seeds {done} of the three (0, 1, 2): rerun with --seeds 0,1,2 to add the others", len(done) < 3),
        ("synthesis stopped at its time budget: rerun to continue", bool(synth) and not synth.get("complete")),
        ("no curve points: rerun with --curve 250,500,1000", not args.curve)) if missing]
    res = {"benchmark": "reasonir", "quick": args.quick, "partial_run": partial,
           "config": {k: v for k, v in vars(args).items() if k not in ("out", "fresh", "work")},
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_start": load_start,
                       "load_average_end": os.getloadavg()},
           "versions": {"python": platform.python_version(),
                        **package_versions("tessera", "torch", "transformers", "sentence-transformers", "bm25s")},
           "wall_s": round(time.perf_counter() - t0, 1), "work_dir": str(work.folder),
           "invocations": invocations,  # every run of the script that this folder's results come from
           "split": "SciFact train claims split by sha1('scifact-claim:' + id) % 5 == 0 -> held out (about 20%)",
           "synthesis": synth, "pairs": work.get("pairs"), "baselines": base,
           "gates": {"minilm_minus_bm25_scifact_points": round(100 * (base["minilm"]["scifact_heldout"]["ndcg@10"]
                                                                      - base["bm25"]["scifact_heldout"]["ndcg@10"]), 2)}
           if base else {},
           "finetune": ft, "ndcg@10_mean_over_seeds": summary,
           "curve_ndcg@10_scifact_heldout": _curve(ft, args.seeds) if ft else {},
           "saved_retriever": save_best(args, ft, summary) if ft else None,
           "llm_retriever": llm,
           "previous_runs": _previous_runs(Path(args.out)),
           "goals": goals(base, summary, synth, llm) if base else {}}
    atomic_write_text(Path(args.out), json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    log(f"wrote {args.out}")
    return res


def _curve(ft: dict, seeds: list[int]) -> dict:
    """Held-out nDCG@10 (mean over seeds) against synthetic rows used: 0 is (a), "all" is (b)."""
    points = {"0": [ft["runs"].get(f"a_claims/s{s}") for s in seeds]}
    for key in sorted({k.split("/")[0] for k in ft.get("curve", {})}, key=int):
        points[key] = [ft["curve"].get(f"{key}/s{s}") for s in seeds]
    points["all"] = [ft["runs"].get(f"b_claims_synthetic/s{s}") for s in seeds]
    return {k: _mean_std([r["eval"]["scifact_heldout"]["ndcg@10"] for r in runs if r])
            for k, runs in points.items() if any(runs)}


def save_best(args, ft: dict, summary: dict) -> dict | None:
    """Copy the best configuration's first-seed model to ``$TESSERA_HOME/bench/retrieval/``."""
    from tessera.hub import tessera_home

    if not summary:
        return None
    best = max(summary, key=lambda k: summary[k]["scifact_heldout"]["mean"])
    run = ft["runs"].get(f"{best}/s{args.seeds[0]}")
    if not run or not Path(run["model"]).is_dir():
        return None
    dest = tessera_home() / "bench" / "retrieval" / f"minilm-reasonir-{args.tower}{'-quick' if args.quick else ''}"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(run["model"], dest)
    cmd = (f"python benchmarks/reasonir.py --stages pairs,baselines,finetune --seeds {args.seeds[0]} --curve '' "
           + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in {**train_settings(args), "claim_rows": args.claim_rows}.items())
           + (" --quick" if args.quick else ""))
    log(f"best retriever ({best}, seed {args.seeds[0]}) saved to {dest}; rebuild: {cmd}")
    return {"config": best, "seed": args.seeds[0], "folder": str(dest), "rebuild": cmd,
            "use": f"tessera ask --retriever dense --encoder {dest.name} ..."}


def train_settings(args) -> dict:
    return {k: getattr(args, k) for k in ("tower", "max_seq_length", "query_length", "epochs", "train_batch", "lr",
                                          "temperature")}


def digest(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def stage_key(stage: str, args, work: Work | None = None) -> str:
    """Cached stage results: evaluation depends on the document length; fine-tuning on every training setting,
    the seeds, the curve and the synthetic rows there are (it is recomputed on each run from per-run caches)."""
    if stage == "baselines":
        return f"baselines-L{args.max_seq_length}"
    if stage == "finetune":
        n_synth = len(_read(work.folder / "synth.jsonl")) if work else 0
        return (f"finetune-{digest(train_settings(args), args.configs, args.seeds, args.curve, args.curve_seeds, args.claim_rows, n_synth)}")
    if stage == "llm":
        return f"llm-{args.llm_steps}x{args.llm_batch}-L{args.llm_length}"
    return stage


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few documents, one seed, SciFact only: minutes, for iterating")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--synth-docs", type=int, default=1700, help="about 60%% pass the filter: 1,700 for 1,000 rows")
    ap.add_argument("--synth-minutes", type=float, default=40.0, help="synthesis time budget of one invocation")
    ap.add_argument("--filter-top-k", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8, help="generator batch size")
    ap.add_argument("--crop-rows", type=int, default=500)
    ap.add_argument("--tower", choices=("query", "both"), default="query",
                    help="query: train the query encoder against the frozen base document encoder (the index stays "
                    "valid, a corpus is encoded once); both: fine-tune the whole model (every judgement re-encodes)")
    ap.add_argument("--max-seq-length", type=int, default=256, help="document tokens (all-MiniLM-L6-v2's own setting)")
    ap.add_argument("--query-length", type=int, default=64, help="query tokens (--tower query)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--curve", default="250,500,1000", help="synthetic rows used, on top of the claims")
    ap.add_argument("--curve-seeds", type=int, default=1, help="how many of --seeds the curve runs (each point costs "
                    "about a minute per seed)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--temperature", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0, help="document sample and crop sample")
    ap.add_argument("--llm-steps", type=int, default=60, help="--stages llm: fine-tuning steps (a third as many on crops first)")
    ap.add_argument("--llm-batch", type=int, default=16)
    ap.add_argument("--llm-length", type=int, default=128, help="--stages llm: tokens per text")
    ap.add_argument("--claim-rows", type=int, default=0, help="use only this many training claims (0 = all; --quick: 64)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--work", default="")
    ap.add_argument("--fresh", action="store_true", help="discard the cached stages")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reasonir.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.synth_docs, args.synth_minutes, args.crop_rows = min(args.synth_docs, 16), min(args.synth_minutes, 5), 32
        args.seeds, args.curve, args.train_batch, args.claim_rows = "0", "8", 16, 64
        if args.out == ap.get_default("out"):
            args.out = ""  # a quick run's JSON stays in its work folder, not among the recorded results
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    args.configs = [c.strip() for c in str(args.configs).split(",") if c.strip()]
    if unknown := [c for c in args.configs if c not in CONFIGS]:
        ap.error(f"unknown configuration {', '.join(unknown)}; use {', '.join(CONFIGS)}")
    args.curve = [int(s) for s in str(args.curve).split(",") if s.strip()]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from tessera.hub import tessera_home

    folder = Path(args.work) if args.work else tessera_home() / "bench" / ("reasonir-quick" if args.quick else "reasonir-data")
    if args.fresh and folder.exists():
        shutil.rmtree(folder)
    work, t0, load_start = Work(folder), time.perf_counter(), os.getloadavg()
    args.out = args.out or str(folder / "reasonir_quick.json")
    colls = None
    for stage in [s for s in args.stages.split(",") if s]:
        if stage not in STAGES + OPTIONAL_STAGES:
            raise SystemExit(f"unknown stage {stage}; use {', '.join(STAGES + OPTIONAL_STAGES)}")
        cached = work.get(stage_key(stage, args, work))
        if cached is not None and stage != "finetune" and (stage != "synth" or cached.get("complete")):
            log(f"{stage}: cached")
            continue
        log(f"{stage}: running")
        if stage == "llm":
            work.put(stage_key(stage, args), stage_llm(args, work))
            continue
        if stage in ("baselines", "finetune"):
            colls = colls or eval_collections(args.quick)
        res = {"synth": lambda: stage_synth(args, work), "pairs": lambda: stage_pairs(args, work),
               "baselines": lambda: stage_baselines(args, work, colls),
               "finetune": lambda: stage_finetune(args, work, colls)}[stage]()
        work.put(stage_key(stage, args, work), res)
    return write_results(args, work, t0, load_start)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
