"""Benchmark of NEST decoding against its peers, same model, same harness, same run.

Task 1 (WikiText-2): datastore = the WikiText-2 test articles (read-only from
``../shared/data/wikitext2``), chunked into passages and indexed with BM25; prompts
are article openings (``--prompt-tokens``, 48 by default) and every method continues
``--new-tokens`` (128) tokens greedily.  Methods:

- ``greedy``: plain greedy decoding of the embedded SmolLM2-135M-Instruct;
- ``knn-lm``: kNN-LM on NEST's token datastore (kNN weight 0.25, k 1024, no spans);
- ``rag``: in-context RAG, the NEST passages in the prompt, greedy;
- ``prompt-lookup``: transformers' prompt-lookup decoding on the RAG prompt;
- ``nest``: NEST with the paper's defaults (``passage_k`` scaled down for CPU).

Per prompt the methods run interleaved (the order rotates) so that load from other
jobs on this shared machine hits them alike; speed-ups are ratios within this run.
Figures: tokens/s (generated tokens / (prefill + decoding) time; retrieval and key
building are reported apart), speed-up over greedy, ROUGE-1/2/L F1 against the
article's true continuation (``rouge-score``), attribution ratio, accepted span lengths.

Task 2 (Python docs): ``tessera ask`` prompts (3 BM25 sources in the prompt) for a
few questions; the datastore is the same 3 sources.  There is no reference answer,
so ROUGE-L is measured against the in-context RAG greedy answer (agreement), next to
speed and attribution.  NEST runs with the default alpha 0.3 and with alpha 0.1.

Writes benchmarks/results/nest.json.  Usage: python benchmarks/nest.py [--prompts 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from tessera import __version__
from tessera.attribution import nest as N
from tessera.attribution import nest_baselines as B
from tessera.attribution import nest_store as S
from tessera.data.paths import shared_data_dir
from tessera.data.text import read_wikitext
from tessera.lm import LocalLM
from tessera.retrieval.corpus_index import CorpusIndex
from _common import machine, write_json

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What does the with statement do?",
    "How do I give a function parameter a default value?",
    "What is a lambda expression?",
    "How are exceptions raised and caught?",
    "What does the global statement do?",
    "How do decorators work?",
]


def rouge_scorer():
    try:
        from rouge_score import rouge_scorer as rs
    except ImportError:
        raise SystemExit("this benchmark needs rouge-score: pip install rouge-score") from None
    return rs.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)


def rouge(scorer, pred: str, ref: str) -> dict:
    s = scorer.score(ref, pred)
    return {"rouge1": s["rouge1"].fmeasure, "rouge2": s["rouge2"].fmeasure, "rougeL": s["rougeL"].fmeasure}


def record(res: S.NestResult, extra: dict | None = None) -> dict:
    s = res.stats
    copied_docs = sorted({t.source.doc_id for t in res.tokens if t.source is not None})
    return {"new_tokens": s.new_tokens, "generate_s": round(s.generate_s, 4), "prefill_s": round(s.prefill_s, 4),
            "tokens_per_s": round(s.tokens_per_s, 3), "attribution_ratio": round(s.attribution_ratio, 4),
            "forward_passes": s.forward_passes, "accepted_span_lengths": s.accepted_span_lengths,
            "copied_docs": copied_docs, "stop_reason": s.stop_reason, "text": res.text, **(extra or {})}


def summarize(rows: list[dict], methods: list[str], base: str) -> dict:
    out = {}
    for m in methods:
        rs = [r["methods"][m] for r in rows if m in r["methods"]]
        if not rs:
            continue
        tokens = sum(r["new_tokens"] for r in rs)
        secs = sum(r["generate_s"] for r in rs)
        spans = [x for r in rs for x in r["accepted_span_lengths"]]
        d = {"prompts": len(rs), "tokens": tokens, "seconds": round(secs, 2), "tokens_per_s": round(tokens / secs, 3) if secs else 0.0,
             "attribution_ratio_mean": round(statistics.mean(r["attribution_ratio"] for r in rs), 4),
             "forward_passes_per_token": round(sum(r["forward_passes"] for r in rs) / max(tokens, 1), 4)}
        for key in ("rouge1", "rouge2", "rougeL", "rougeL_vs_rag"):
            if key in rs[0]:
                d[key] = round(statistics.mean(r[key] for r in rs), 4)
        if spans:
            d["accepted_span_lengths"] = {"count": len(spans), "mean": round(statistics.mean(spans), 2),
                                          "median": statistics.median(spans), "max": max(spans),
                                          "zero_share": round(sum(x == 0 for x in spans) / len(spans), 3)}
        out[m] = d
    if base in out:
        for m, d in out.items():
            d["speedup_over_" + base] = round(d["tokens_per_s"] / out[base]["tokens_per_s"], 3)
            per = [r["methods"][m]["tokens_per_s"] / r["methods"][base]["tokens_per_s"] for r in rows
                   if m in r["methods"] and r["methods"][base]["tokens_per_s"] > 0]
            d["speedup_over_" + base + "_median_per_prompt"] = round(statistics.median(per), 3) if per else None
    return out


def wikitext_task(args, lm, cfg, scorer, results, out_path) -> None:
    data = shared_data_dir()
    if data is None or not (data / "wikitext2").is_dir():
        results["wikitext"] = {"skipped": "../shared/data/wikitext2 not found"}
        return
    src = data / "wikitext2" / "wiki.test.raw"
    src = src if src.is_file() else data / "wikitext2" / "test.txt"
    docs = read_wikitext(src)
    t = time.perf_counter()
    index = CorpusIndex.from_documents(docs, name="wikitext2-test", max_tokens=args.chunk_tokens)
    index_s = time.perf_counter() - t
    tok = lm.tokenizer
    need = args.prompt_tokens + args.new_tokens
    eligible = [d for d in docs if len(d.text) > 6 * need]
    step = max(1, len(eligible) // args.prompts)
    chosen = eligible[::step][: args.prompts]
    methods = ["greedy", "knn-lm", "rag", "prompt-lookup", "nest"]
    rows = []
    section = {"source": str(src.relative_to(data.parent)) if data else str(src), "articles": len(docs),
               "passages": len(index.passages), "chunk_max_tokens": args.chunk_tokens, "index_s": round(index_s, 2),
               "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "methods": methods, "prompts": rows}
    results["wikitext"] = section
    lm_warm = N.encode_prompt(lm, "Warm up")
    B.greedy_generate(lm, lm_warm, 2)
    for pi, doc in enumerate(chosen):
        ids_all = tok(doc.text, add_special_tokens=False)["input_ids"]
        prompt = tok.decode(ids_all[: args.prompt_tokens])
        truth = tok.decode(ids_all[args.prompt_tokens: need])
        passages, retrieval_s = N.retrieve(index, prompt, cfg)
        ds, info = S.build_datastore(lm, passages, cache=True, progress=False)
        _, warm = S.build_datastore(lm, passages, cache=True, progress=False)
        ids = N.encode_prompt(lm, prompt)
        rag_ids = N.encode_prompt(lm, B.rag_prompt(passages, prompt))
        runners = {
            "greedy": lambda: B.greedy_generate(lm, ids, args.new_tokens),
            "knn-lm": lambda: B.knn_lm_generate(lm, ds, ids, args.new_tokens, config=cfg),
            "rag": lambda: B.greedy_generate(lm, rag_ids, args.new_tokens, method="rag"),
            "prompt-lookup": lambda: B.prompt_lookup_generate(lm, rag_ids, args.new_tokens, num_tokens=args.lookup_tokens),
            "nest": lambda: N.nest_decode(lm, ds, ids, cfg, max_new_tokens=args.new_tokens),
        }
        order = methods[pi % len(methods):] + methods[: pi % len(methods)]
        row = {"doc_id": doc.id, "title": doc.title, "prompt": prompt, "truth": truth, "retrieval_s": round(retrieval_s, 4),
               "passages": [p.id for p in passages], "source_article_retrieved": any(p.doc_id == doc.id for p in passages),
               "datastore_tokens": len(ds), "rag_prompt_tokens": int(rag_ids.shape[1]),
               "keys": {"built": info.built, "cached": info.cached, "seconds": round(info.seconds, 3),
                        "warm_load_s": round(warm.seconds, 4)}, "methods": {}}
        for m in order:
            res = runners[m]()
            rec = record(res, rouge(scorer, res.text, truth))
            rec["copied_from_source_article"] = (sum(1 for t in res.tokens if t.source is not None and t.source.doc_id == doc.id)
                                                 / max(1, res.stats.copied_tokens)) if res.stats.copied_tokens else None
            row["methods"][m] = rec
        rows.append(row)
        g, n = row["methods"]["greedy"], row["methods"]["nest"]
        print(f"[wikitext {pi + 1}/{len(chosen)}] {doc.title[:40]!r}: greedy {g['tokens_per_s']:.1f} tok/s R-L {g['rougeL']:.3f} | "
              f"nest {n['tokens_per_s']:.1f} tok/s R-L {n['rougeL']:.3f} attr {n['attribution_ratio']:.2f} spans {n['accepted_span_lengths']}",
              flush=True)
        section["summary"] = summarize(rows, methods, "greedy")
        built = [r["keys"] for r in rows if r["keys"]["built"] == len(r["passages"])]
        section["key_cache"] = {
            "cold_build_s_mean": round(statistics.mean(k["seconds"] for k in built), 3) if built else None,
            "cold_builds": len(built),
            "warm_load_s_mean": round(statistics.mean(r["keys"]["warm_load_s"] for r in rows), 4),
            "datastore_tokens_mean": round(statistics.mean(r["datastore_tokens"] for r in rows), 1),
        }
        write_json(results, out_path, ensure_ascii=False)


def python_docs_task(args, lm, cfg, scorer, results, out_path) -> None:
    from tessera.ask import Source, fit_sources

    index = CorpusIndex.open("python-docs")
    cfg_tuned = N.NestConfig(**{**cfg.__dict__, "alpha": args.qa_alpha})
    methods = ["rag", "knn-lm", "prompt-lookup", "nest", f"nest-alpha{args.qa_alpha:g}"]
    rows = []
    section = {"corpus": "python-docs", "passages_in_prompt": 3, "new_tokens": args.qa_new_tokens, "methods": methods,
               "note": "rag = tessera ask's default decoding (greedy with the sources in the prompt); rougeL_vs_rag measures "
                       "agreement with it, there is no reference answer", "prompts": rows}
    results["python_docs"] = section
    for qi, q in enumerate(QUESTIONS[: args.questions]):
        hits = index.search(q, 3)
        sources = [Source(h.rank, h.passage.doc_id, h.passage.title, h.passage.id, h.score, h.passage.text, h.passage.start,
                          h.passage.end) for h in hits]
        sources, ids = fit_sources(lm, q, sources, 2048 - args.qa_new_tokens)
        ds, info = S.build_datastore(lm, sources, cache=True, progress=False)
        runners = {
            "rag": lambda: B.greedy_generate(lm, ids, args.qa_new_tokens, method="rag"),
            "knn-lm": lambda: B.knn_lm_generate(lm, ds, ids, args.qa_new_tokens, config=cfg),
            "prompt-lookup": lambda: B.prompt_lookup_generate(lm, ids, args.qa_new_tokens, num_tokens=args.lookup_tokens),
            "nest": lambda: N.nest_decode(lm, ds, ids, cfg, max_new_tokens=args.qa_new_tokens),
            methods[-1]: lambda: N.nest_decode(lm, ds, ids, cfg_tuned, max_new_tokens=args.qa_new_tokens),
        }
        order = methods[qi % len(methods):] + methods[: qi % len(methods)]
        got = {m: runners[m]() for m in order}
        row = {"question": q, "sources": [s.passage_id for s in sources], "prompt_tokens": int(ids.shape[1]),
               "keys": {"built": info.built, "cached": info.cached, "seconds": round(info.seconds, 3)}, "methods": {}}
        for m in methods:
            row["methods"][m] = record(got[m], {"rougeL_vs_rag": rouge(scorer, got[m].text, got["rag"].text)["rougeL"],
                                                "rendered": got[m].render() if m.startswith("nest") else None})
        rows.append(row)
        r, n = row["methods"]["rag"], row["methods"]["nest"]
        print(f"[python-docs {qi + 1}] {q!r}: rag {r['tokens_per_s']:.1f} tok/s | nest {n['tokens_per_s']:.1f} tok/s "
              f"attr {n['attribution_ratio']:.2f} agree {n['rougeL_vs_rag']:.2f}", flush=True)
        section["summary"] = summarize(rows, methods, "rag")
        write_json(results, out_path, ensure_ascii=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--passage-k", type=int, default=4, help="passages per prompt (the paper: 40; NestConfig default: 8)")
    ap.add_argument("--chunk-tokens", type=int, default=256, help="passage size for chunking WikiText articles")
    ap.add_argument("--lookup-tokens", type=int, default=10, help="prompt_lookup_num_tokens")
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--qa-new-tokens", type=int, default=96)
    ap.add_argument("--qa-alpha", type=float, default=0.1)
    ap.add_argument("--skip-wikitext", action="store_true")
    ap.add_argument("--skip-python-docs", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 by default: on this shared 2-core machine two threads under load from other jobs "
                         "ran 5-10x slower per token (OpenMP oversubscription) and made timings noisy")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "nest.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    cfg = N.NestConfig(passage_k=args.passage_k)
    out_path = Path(args.out)
    results: dict = {
        "benchmark": "nest",
        "machine": machine(),
        "versions": {"tessera": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "config": {"lm": "default (SmolLM2-135M-Instruct, fp32, CPU)", "nest": cfg.__dict__, "knn_lm_lambda": B.KNN_LM_LAMBDA,
                   "args": vars(args), "command": " ".join(sys.argv)},
    }
    t0 = time.perf_counter()
    lm = LocalLM.load("default", device="cpu")
    scorer = rouge_scorer()
    if not args.skip_wikitext:
        wikitext_task(args, lm, cfg, scorer, results, out_path)
    if not args.skip_python_docs:
        python_docs_task(args, lm, cfg, scorer, results, out_path)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    write_json(results, out_path, ensure_ascii=False)
    for task in ("wikitext", "python_docs"):
        if "summary" in results.get(task, {}):
            print(task, json.dumps(results[task]["summary"], indent=1))


if __name__ == "__main__":
    main()
