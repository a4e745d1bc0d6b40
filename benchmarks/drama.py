"""DRAMA trade-off benchmark: retrievers pruned from SmolLM2-135M to about 1/2 and 1/5 of the
non-embedding parameters, and the unpruned model, all trained the same way.

In one run on this machine:
1. prune the embedded SmolLM2-135M-Instruct to 50% and 20% of its non-embedding
   parameters (``tessera.retrieval.prune``: block-influence layer dropping, then FFN
   channels and GQA groups by activation; calibration on WikiText-2);
   then, with ``--cpt-steps N``, continue pretraining each pruned model for N steps on
   WikiText-2 while distilling the unpruned model's final hidden states into it
   (``tessera.retrieval.recover``: the recovery stage of Sheared-LLaMA-style pruning);
2. train each of the three backbones as a bidirectional, mean-pooled retriever with
   the same data, steps, batch and learning rate (``tessera.retrieval.train``): SciFact
   train claims, positives from the qrels, one BM25 hard negative per claim (the first
   non-positive document at BM25 rank >= 20, ReasonIR's rule), InfoNCE at temperature
   0.02 with in-batch negatives, ReasonIR's prompt format;
3. evaluate zero-shot nDCG@10 (pytrec_eval) with exact cosine search on Cranfield
   (all 1,400 documents) and Vaswani (a seeded random sample of its 11,429 documents,
   see ``--vaswani-docs``; the JSON says so), with BM25 on the same documents for
   reference;
4. measure encoding throughput of the three retrievers on the same Cranfield
   documents, interleaved in rounds so that load from other processes hits all of
   them alike; the speed-up is computed from documents per CPU-second of this
   process (median round), because wall time on this shared machine varied several
   fold between rounds; wall-clock docs/s are reported too.

Goal (issue 3): the 1/5 model keeps >= 85% of the unpruned model's nDCG@10 while
encoding >= 3x faster.

Everything is scaled down for a shared 2-core CPU (see ``config`` in the JSON):
short training (``--steps`` x ``--batch-size`` claims, documents cut to
``--train-max-len`` tokens), evaluation documents cut to ``--eval-max-len`` tokens.
Intermediate results (pruned checkpoints, trained retrievers, per-model figures)
are kept under ``$TESSERA_HOME/bench/drama`` so an interrupted run resumes.

Writes benchmarks/results/drama.json.  Usage: python benchmarks/drama.py [--steps 20] [--fresh];
the recorded run: ``--steps 60 --batch-size 16 --cpt-steps 120 --cpt-lr 1e-3 --threads 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "drama.json"
VARIANTS = {"unpruned": None, "pruned-1/2": 0.5, "pruned-1/5": 0.2}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    import sentence_transformers
    import transformers

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sentence_transformers": sentence_transformers.__version__},
        "load_average_at_start": list(os.getloadavg()),
    }


def subsample(collection, n_docs: int, seed: int):
    """A seeded random sample of the documents; qrels restricted to them, unjudged queries dropped."""
    from tessera.data.types import Collection

    if n_docs <= 0 or n_docs >= len(collection.docs):
        return collection
    rng = random.Random(seed)
    docs = rng.sample(collection.docs, n_docs)
    keep = {d.id for d in docs}
    qrels = {q: {d: g for d, g in rel.items() if d in keep} for q, rel in collection.qrels.items()}
    qrels = {q: rel for q, rel in qrels.items() if any(g > 0 for g in rel.values())}
    queries = [q for q in collection.queries if q.id in qrels]
    return Collection(docs=docs, queries=queries, qrels=qrels, name=collection.name + f"-sample{n_docs}")


# Bump when evaluation changes so that cached per-model figures are recomputed.
# (Vaswani v2: queries lower-cased.)
EVAL_VERSION = {"cranfield": {"eval_version": 1}, "vaswani": {"eval_version": 2}}


def is_current(entry: dict, cname: str) -> bool:
    got = entry.get(cname)
    return got is not None and got.get("eval_version", 1) == EVAL_VERSION[cname]["eval_version"]


def bm25_eval(collection) -> dict:
    from tessera.retrieval.metrics import evaluate
    from tessera.retrieval.search import bm25_run

    m = evaluate(bm25_run(collection, k=100), collection.qrels)
    return {"ndcg@10": m["ndcg@10"], "recall@100": m["recall@100"], "queries": m["n_queries"]}


def dense_eval(model, collection, batch_size: int) -> dict:
    """tessera's own path: length-sorted ``encode_corpus`` into an exact faiss index, pytrec_eval."""
    from tessera.retrieval.metrics import evaluate
    from tessera.retrieval.search import dense_index, dense_run

    t0 = time.perf_counter()
    index = dense_index(model, collection, batch_size=batch_size, kind="flat")
    enc_s = time.perf_counter() - t0
    m = evaluate(dense_run(model, collection, k=100, batch_size=batch_size, index=index), collection.qrels)
    return {"ndcg@10": m["ndcg@10"], "recall@100": m["recall@100"], "queries": m["n_queries"], "docs": len(collection.docs),
            "doc_encode_s": round(enc_s, 1), "docs_per_s_during_eval": round(len(collection.docs) / enc_s, 2)}


def throughput(models: dict, texts: list[str], batch_size: int, rounds: int) -> dict:
    """Docs/s per model from interleaved rounds, by wall time and by this process's CPU time.

    On a shared machine wall time swings with other processes' load (up to 6x between
    rounds here), so the speed-up is computed from CPU time (``time.process_time``, all
    threads), which other processes disturb far less; the best wall-clock round is
    reported alongside.
    """
    wall = {name: [] for name in models}
    cpu = {name: [] for name in models}
    for r in range(rounds):
        for name, model in models.items():
            model.encode_document(texts[:batch_size], batch_size=batch_size)  # warm-up
            w0, c0 = time.perf_counter(), time.process_time()
            model.encode_document(texts, batch_size=batch_size)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
            log(f"throughput round {r + 1}: {name} {len(texts) / wall[name][-1]:.2f} docs/s wall, "
                f"{len(texts) / cpu[name][-1]:.2f} docs per CPU-second")
    n = len(texts)
    return {name: {"docs_per_cpu_s": round(n / float(np.median(cpu[name])), 3),
                   "docs_per_s_best_wall": round(n / min(wall[name]), 3),
                   "docs_per_s_median_wall": round(n / float(np.median(wall[name])), 3),
                   "cpu_s": [round(x, 2) for x in cpu[name]], "wall_s": [round(x, 2) for x in wall[name]]}
            for name in models}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="training steps (the same for every model)")
    ap.add_argument("--batch-size", type=int, default=8, help="claims per step (each with a positive and a hard negative)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--train-max-len", type=int, default=48, help="max tokens per text during training")
    ap.add_argument("--eval-max-len", type=int, default=64, help="max tokens per text at evaluation")
    ap.add_argument("--vaswani-docs", type=int, default=1500, help="random Vaswani documents to evaluate on (0 = all 11,429)")
    ap.add_argument("--cranfield-docs", type=int, default=0, help="random Cranfield documents (0 = all 1,400; for smoke runs)")
    ap.add_argument("--min-neg-rank", type=int, default=20, help="BM25 rank from which hard negatives are taken (ReasonIR: 20)")
    ap.add_argument("--depth-share", type=float, default=0.5)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--cpt-steps", type=int, default=0, help="continued pretraining steps after pruning (0 = off)")
    ap.add_argument("--cpt-distill", default="hidden", choices=["hidden", "logits", "none"],
                    help="distillation from the unpruned model during continued pretraining")
    ap.add_argument("--cpt-text", default="wikitext2", help="text for continued pretraining (see retrieval-prune's calibration)")
    ap.add_argument("--cpt-batch-size", type=int, default=8)
    ap.add_argument("--cpt-seq-len", type=int, default=128)
    ap.add_argument("--cpt-lr", type=float, default=2e-4)
    ap.add_argument("--throughput-docs", type=int, default=64)
    ap.add_argument("--throughput-rounds", type=int, default=5)
    ap.add_argument("--encode-batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--only", default="", help="comma-separated variants to run (default: all)")
    ap.add_argument("--fresh", action="store_true", help="ignore cached intermediate results")
    ap.add_argument("--work", default="", help="folder for intermediate results (default $TESSERA_HOME/bench/drama)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--previous", default="", help="an earlier drama.json (e.g. a smaller training budget) to summarise under previous_runs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tessera import hub
    from tessera.data.ir import read_cranfield, read_scifact, read_vaswani
    from tessera.data.paths import shared_data_dir
    from tessera.recipes.retrieval_train import save_model
    from tessera.retrieval import train as T
    from tessera.retrieval.encoder import DEFAULT_INSTRUCTION, build_retriever
    from tessera.retrieval.prune import non_embedding_params, prune, save_pruned

    root = shared_data_dir()
    if root is None or not (root / "ir" / "scifact").is_dir():
        sys.exit("error: ../shared/data/ir (SciFact, Cranfield, Vaswani) not found; this benchmark needs the shared data")
    work = Path(args.work) if args.work else hub.tessera_home() / "bench" / "drama"
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    info = machine()
    variants = [v for v in VARIANTS if not args.only or v in args.only.split(",")]

    # ---------------------------------------------------------------- data
    scifact = read_scifact(root / "ir" / "scifact", split="train")
    cranfield = subsample(read_cranfield(root / "ir" / "cranfield"), args.cranfield_docs, args.seed)
    vaswani_full = read_vaswani(root / "ir" / "vaswani")
    vaswani = subsample(vaswani_full, args.vaswani_docs, args.seed)  # queries lower-cased by read_vaswani
    rows, neg_stats = T.mine_bm25_negatives(scifact, n_negatives=1, min_rank=args.min_neg_rank,
                                            query_instruction=DEFAULT_INSTRUCTION, seed=args.seed)
    examples = T.examples_from_rows(rows, n_negatives=1)
    train_ds, prompts = T.build_datasets(examples, "reasonir")
    log(f"SciFact: {len(rows)} claims -> {len(examples)} training examples; negatives {neg_stats}")
    bm25 = {"cranfield": bm25_eval(cranfield), "vaswani": bm25_eval(vaswani)}
    log(f"BM25: {bm25}")

    # ---------------------------------------------------------------- prune, recover, train, evaluate
    base_dir = hub.resolve_lm("default")
    cpt_tag = f"-cpt{args.cpt_steps}-{args.cpt_distill}" if args.cpt_steps else ""

    def run_tag(name: str) -> str:  # names the trained retriever and its cached figures
        return name.replace("/", "of") + (cpt_tag if VARIANTS[name] is not None else "")

    per_model: dict[str, dict] = {}
    for name in variants:
        ratio = VARIANTS[name]
        tag = name.replace("/", "of")
        cached = work / f"{run_tag(name)}.json"
        entry: dict = json.loads(cached.read_text()) if cached.is_file() else {}
        if all(is_current(entry, c) for c in ("cranfield", "vaswani")):
            per_model[name] = entry
            log(f"{name}: cached figures {cached}")
            continue
        backbone = base_dir
        if ratio is not None:
            ckpt = work / f"{tag}-backbone"
            if not (ckpt / "config.json").is_file():
                log(f"{name}: pruning to {ratio:.0%} of the non-embedding parameters")
                model, tok, report = prune("default", target_ratio=ratio, depth_share=args.depth_share,
                                           n_samples=args.calib_samples, seq_len=256, eval_samples=8, seed=args.seed)
                shutil.rmtree(ckpt, ignore_errors=True)
                save_pruned(model, tok, ckpt, report)
                del model
            report = json.loads((ckpt / "tessera_pruning.json").read_text())
            entry["pruning"] = {k: report[k] for k in ("target", "plan", "params_before", "params_after", "kept_layers",
                                                       "config_after", "lm_loss_before", "lm_loss_after", "times")}
            backbone = str(ckpt)
            if args.cpt_steps:
                rec = work / f"{tag}-backbone{cpt_tag}"
                if not (rec / "config.json").is_file():
                    from tessera.retrieval.prune import calibration_texts, load_causal_lm
                    from tessera.retrieval.recover import continued_pretraining

                    log(f"{name}: continued pretraining {args.cpt_steps} steps x {args.cpt_batch_size} x {args.cpt_seq_len} "
                        f"tokens, {args.cpt_distill} distillation from the unpruned model")
                    student, tok, _ = load_causal_lm(str(ckpt))
                    teacher = load_causal_lm("default")[0] if args.cpt_distill != "none" else None
                    rep = continued_pretraining(
                        student, tok, calibration_texts(args.cpt_text), teacher=teacher, distill=args.cpt_distill,
                        steps=args.cpt_steps, batch_size=args.cpt_batch_size, seq_len=args.cpt_seq_len, lr=args.cpt_lr,
                        seed=args.seed, log_every=max(1, args.cpt_steps // 20),
                        on_log=lambda step, loss: log(f"{name}: cpt step {step} loss {loss:.4f}"))
                    shutil.rmtree(rec, ignore_errors=True)
                    save_pruned(student, tok, rec)
                    (rec / "tessera_recovery.json").write_text(json.dumps(rep.to_dict(), indent=2))
                    del student, teacher
                entry["recovery"] = json.loads((rec / "tessera_recovery.json").read_text())
                log(f"{name}: recovery {entry['recovery']}")
                backbone = str(rec)
        trained = work / f"{run_tag(name)}-retriever"
        if not (trained / "modules.json").is_file():
            torch.manual_seed(args.seed)
            model = build_retriever(backbone, prompt_style="reasonir", max_seq_length=args.train_max_len, device="cpu")
            loss = T.make_loss(model, temperature=T.REASONIR_TEMPERATURE)
            log(f"{name}: training {args.steps} steps x {args.batch_size} claims")
            stats = T.train_retriever(model, train_ds, prompts, loss, work / "scratch", steps=args.steps,
                                      batch_size=args.batch_size, lr=args.lr, warmup_ratio=0.06, seed=args.seed,
                                      logging_steps=4, quiet=True)
            shutil.rmtree(work / "scratch", ignore_errors=True)
            save_model(model, trained)
            (work / f"{run_tag(name)}-train.json").write_text(json.dumps(stats))
            del model
        stats = json.loads((work / f"{run_tag(name)}-train.json").read_text())
        entry["training"] = {k: stats[k] for k in ("steps", "train_s", "loss_first", "loss_last", "train_loss_mean")}
        entry["training"]["loss_curve"] = [(h["step"], round(h["loss"], 4)) for h in stats["history"] if "loss" in h]
        model = build_retriever(str(trained), max_seq_length=args.eval_max_len, device="cpu")
        entry["non_embedding_params"] = non_embedding_params(model[0].model)
        entry["total_params"] = sum(p.numel() for p in model.parameters())
        for cname, coll in (("cranfield", cranfield), ("vaswani", vaswani)):
            if is_current(entry, cname):
                continue  # evaluated by an earlier run with the same settings
            log(f"{name}: encoding {cname} ({len(coll.docs)} docs)")
            entry[cname] = {**dense_eval(model, coll, args.encode_batch), **EVAL_VERSION[cname]}
            log(f"{name}: {cname} {entry[cname]}")
            cached.write_text(json.dumps(entry))
        cached.write_text(json.dumps(entry))
        per_model[name] = entry
        del model

    # ---------------------------------------------------------------- throughput, interleaved
    models = {name: build_retriever(str(work / f"{run_tag(name)}-retriever"), max_seq_length=args.eval_max_len,
                                    device="cpu") for name in per_model}
    texts = [d.full_text for d in cranfield.docs[: args.throughput_docs]]
    speed = throughput(models, texts, args.encode_batch, args.throughput_rounds)

    # ---------------------------------------------------------------- summary
    summary = {}
    if "unpruned" in per_model:
        ref = per_model["unpruned"]
        for name, e in per_model.items():
            s = {"non_embedding_ratio": e["non_embedding_params"] / ref["non_embedding_params"],
                 "speedup": speed[name]["docs_per_cpu_s"] / speed["unpruned"]["docs_per_cpu_s"],
                 "speedup_best_wall": speed[name]["docs_per_s_best_wall"] / speed["unpruned"]["docs_per_s_best_wall"]}
            for c in ("cranfield", "vaswani"):
                s[f"{c}_ndcg_retained"] = e[c]["ndcg@10"] / ref[c]["ndcg@10"] if ref[c]["ndcg@10"] else None
            s["mean_ndcg_retained"] = float(np.mean([s["cranfield_ndcg_retained"], s["vaswani_ndcg_retained"]]))
            summary[name] = s
        if "pruned-1/5" in summary:
            s = summary["pruned-1/5"]
            summary["goal"] = {"target": "pruned-1/5 keeps >= 85% of the unpruned nDCG@10 and encodes >= 3x faster",
                               "ndcg_retained_cranfield": s["cranfield_ndcg_retained"],
                               "ndcg_retained_vaswani": s["vaswani_ndcg_retained"], "speedup": s["speedup"],
                               "met": bool(min(s["cranfield_ndcg_retained"], s["vaswani_ndcg_retained"]) >= 0.85 and s["speedup"] >= 3)}
    info["load_average_at_end"] = list(os.getloadavg())
    out = {
        "benchmark": "drama",
        "machine": info,
        "config": {**vars(args), "base_model": "SmolLM2-135M-Instruct (embedded)", "prompt_style": "reasonir",
                   "prompts": {"query": prompts["query"], "document": prompts["positive"]},
                   "pooling": "mean (prompt excluded)", "attention": "bidirectional",
                   "recovery": ({"steps": args.cpt_steps, "distill": args.cpt_distill, "text": args.cpt_text,
                                 "tokens": args.cpt_steps * args.cpt_batch_size * args.cpt_seq_len,
                                 "teacher": "the unpruned SmolLM2-135M-Instruct"} if args.cpt_steps else None),
                   "temperature": T.REASONIR_TEMPERATURE, "train_group_size": 2,
                   "training_data": {"source": "SciFact train claims (all 809; none are used for reported figures)",
                                     "claims": len(rows), "examples": len(examples),
                                     "examples_seen": args.steps * args.batch_size, "hard_negatives": neg_stats},
                   "eval_data": {"cranfield": {"docs": len(cranfield.docs), "queries": len(cranfield.queries)},
                                 "vaswani": {"docs": len(vaswani.docs), "of_docs": len(vaswani_full.docs),
                                             "queries": len(vaswani.queries),
                                             "note": f"seeded random sample of {len(vaswani.docs)} of {len(vaswani_full.docs)} documents "
                                                     "(CPU time); qrels restricted to them, queries left without a relevant document dropped; "
                                                     "queries lower-cased (the topics are upper case, the documents lower case)"}}},
        "bm25": bm25,
        "models": per_model,
        "throughput": {"docs": len(texts), "batch_size": args.encode_batch, "max_seq_length": args.eval_max_len,
                       "rounds": args.throughput_rounds, **speed},
        "summary": summary,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if args.previous:
        prev = json.loads(Path(args.previous).read_text())
        out["previous_runs"] = [{
            "config": {k: prev["config"][k] for k in ("steps", "batch_size", "lr", "train_max_len", "eval_max_len", "vaswani_docs")},
            "models": {n: {"cranfield_ndcg@10": e["cranfield"]["ndcg@10"], "vaswani_ndcg@10": e["vaswani"]["ndcg@10"],
                           "loss_first": e["training"]["loss_first"], "loss_last": e["training"]["loss_last"]}
                       for n, e in prev["models"].items()},
            "summary": prev["summary"],
        }]
    out_path = Path(args.out)
    from tessera.config import atomic_write_text

    atomic_write_text(out_path, json.dumps(out, indent=2))
    log(f"wrote {out_path}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
