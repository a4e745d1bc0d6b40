"""SelfCite benchmark on HotpotQA with the embedded SmolLM2-135M-Instruct.

Citation precision/recall/F1 against HotpotQA's gold supporting facts for
- direct prompting (SelfCite format, citation decoded greedily under the grammar),
- SelfCite best-of-N (N=10, temperature 1.2, top-p 0.9, reranked by the reward),
- the reward-only span search,
- ContextCite (64 ablations, Lasso; top-3 positively attributed sentences),
all citing the same statements (the direct response's), with the compute each method
adds on top of generating the response: forward passes (sequences run through the
model), model calls, tokens actually run (SelfCite reuses the prompt's KV cache) and
wall time.  Then a short SimPO run on pairs built from *other* examples (the first
half of the file; evaluation uses the second half) and its effect on direct-prompting F1.

Scaled down for this 2-core shared CPU (and recorded in the JSON): contexts are the
gold paragraphs + 1 distractor paragraph, each cut to its first 4 sentences (gold
sentences always kept); answers keep their first 2 statements; 8 evaluation and 8
training examples by default.  Per-example rows go to a JSONL next to the output
while the run lasts, so an interrupted run resumes (deleted once the JSON is written).

Usage: python benchmarks/selfcite.py [--eval-n 8] [--train-n 8] [--out benchmarks/results/selfcite.json]
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

from _common import package_versions

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def versions() -> dict:
    return package_versions("torch", "transformers", "trl", "peft", "context-cite", "pysbd", "tessera")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="")
    ap.add_argument("--eval-start", type=int, default=20)
    ap.add_argument("--eval-n", type=int, default=8)
    ap.add_argument("--train-start", type=int, default=0)
    ap.add_argument("--train-n", type=int, default=8)
    ap.add_argument("--max-distractors", type=int, default=1)
    ap.add_argument("--max-sentences", type=int, default=4)
    ap.add_argument("--max-statements", type=int, default=2)
    ap.add_argument("--best-of", type=int, default=10)
    ap.add_argument("--search-top-k", type=int, default=3)
    ap.add_argument("--cc-ablations", type=int, default=64)
    ap.add_argument("--cc-top-k", type=int, default=3)
    ap.add_argument("--simpo-lr", type=float, default=5e-6)
    ap.add_argument("--simpo-epochs", type=float, default=2.0)
    ap.add_argument("--no-simpo", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is several times faster on a loaded 2-core machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "selfcite.json"))
    args = ap.parse_args()

    import torch

    from tessera.attribution.constrained import generate_cited
    from tessera.attribution.contextcite import contextcite_citations
    from tessera.attribution.format import CitePrompt
    from tessera.attribution.hotpot import direct_eval, hotpot_context, score_example
    from tessera.attribution.metrics import mean_scores
    from tessera.attribution.selfcite import SelfCiteScorer, best_of_n, reward_search, score_statements
    from tessera.attribution.simpo import train_simpo
    from tessera.config import atomic_write_text
    from tessera.data.qa import read_hotpotqa
    from tessera.lm import LocalLM
    from tessera.recipes.selfcite_simpo import Config, _data_path, build_pair

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_all = time.perf_counter()
    load_start = os.getloadavg()
    cfg = Config(data=args.data, max_distractors=args.max_distractors, max_sentences_per_paragraph=args.max_sentences,
                 max_statements=args.max_statements, best_of=args.best_of, seed=args.seed)
    examples = read_hotpotqa(_data_path(cfg))
    evals = examples[args.eval_start:args.eval_start + args.eval_n]
    train = examples[args.train_start:args.train_start + args.train_n]
    assert not {e.id for e in evals} & {e.id for e in train}, "train and eval examples overlap"
    lm = LocalLM.load("default", device="cpu")
    out_path = Path(args.out)
    rows_path = out_path.with_suffix(".rows.jsonl")
    done = {}
    if rows_path.is_file():
        for line in rows_path.read_text().splitlines():
            try:
                r = json.loads(line)
                done[r["id"]] = r
            except (json.JSONDecodeError, KeyError):
                pass
    methods = ("direct", "best_of_n", "reward_search", "contextcite")

    for k, ex in enumerate(evals):
        if ex.id in done:
            continue
        ctx = hotpot_context(ex, args.max_distractors, args.max_sentences)
        prompt = CitePrompt(lm.tokenizer, ctx, ex.question)
        t = time.perf_counter()
        resp = generate_cited(lm, prompt, max_statements=args.max_statements)
        gen_s = time.perf_counter() - t
        row = {"id": ex.id, "question": ex.question, "answer": ex.answer, "sentences": len(ctx), "prompt_tokens": len(prompt),
               "gold": sorted(s.number for s in ctx.sentences if s.key in {tuple(x) for x in ex.supporting_facts}),
               "response": resp.text, "generation": dict(resp.stats, seconds=gen_s), "methods": {}}
        # direct: the response's own citations (no extra model work); scored for the record only
        direct = score_statements(lm, prompt, resp, SelfCiteScorer(lm, prompt, resp))
        row["methods"]["direct"] = dict(score_example(ex, direct), forward_passes=0, forward_calls=0, tokens=0, seconds=0.0,
                                        citations=[s.cite_text for s in direct], rewards=[s.reward for s in direct])
        t = time.perf_counter()
        bon = best_of_n(lm, prompt, resp, n=args.best_of, seed=args.seed)
        s_, c_ = bon.stats["sampling"], bon.stats["scoring"]
        row["methods"]["best_of_n"] = dict(
            score_example(ex, bon.statements), forward_passes=c_["sequences"], sampling_rows=s_["sequences"],
            forward_calls=s_["forward_calls"] + c_["forward_calls"], tokens=s_["tokens"] + c_["tokens"],
            seconds=time.perf_counter() - t, citations=[s.cite_text for s in bon.statements],
            rewards=[s.reward for s in bon.statements], candidates=[len(c) for c in bon.candidates])
        t = time.perf_counter()
        rs = reward_search(lm, prompt, resp, top_k=args.search_top_k)
        c_ = rs.stats["scoring"]
        row["methods"]["reward_search"] = dict(
            score_example(ex, rs.statements), forward_passes=c_["sequences"], forward_calls=c_["forward_calls"],
            tokens=c_["tokens"], seconds=time.perf_counter() - t, citations=[s.cite_text for s in rs.statements],
            rewards=[s.reward for s in rs.statements])
        t = time.perf_counter()
        cc, cs = contextcite_citations(lm, ctx, ex.question, [s.text for s in resp.statements],
                                       num_ablations=args.cc_ablations, top_k=args.cc_top_k)
        row["methods"]["contextcite"] = dict(score_example(ex, cc), forward_passes=cs["sequences"],
                                             forward_calls=cs["forward_calls"], tokens=cs["tokens"],
                                             seconds=time.perf_counter() - t, citations=[s.cite_text for s in cc])
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        done[ex.id] = row
        m = row["methods"]
        print(f"[{k + 1}/{len(evals)}] {ex.id} gold={row['gold']} " + " ".join(
            f"{name}={m[name]['f1']:.2f}/{m[name]['seconds']:.0f}s" for name in methods), flush=True)

    rows = [done[e.id] for e in evals]
    summary = {}
    for name in methods:
        agg = mean_scores([r["methods"][name] for r in rows])
        summary[name] = {k: agg.get(k) for k in ("precision", "recall", "f1", "statement_precision", "statement_recall",
                                                 "statement_f1", "answer_em", "answer_f1", "answer_contains",
                                                 "forward_passes", "forward_calls", "tokens", "seconds", "sampling_rows")
                         if k in agg}
    gen = mean_scores([r["generation"] for r in rows])
    results: dict = {
        "benchmark": "selfcite",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "torch_threads": args.threads, "load_average_start": load_start, "device": "cpu"},
        "versions": versions(),
        "config": vars(args),
        "setup": {
            "model": "SmolLM2-135M-Instruct (embedded, fp32, CPU)",
            "data": "HotpotQA dev distractor, first 40 (../shared/data/hotpotqa)",
            "eval_examples": [e.id for e in evals], "train_examples": [e.id for e in train],
            "split": f"evaluation: examples {args.eval_start}..{args.eval_start + len(evals) - 1}; SimPO pairs: examples "
                     f"{args.train_start}..{args.train_start + len(train) - 1} (disjoint)",
            "scaled_down_for_cpu": (f"gold paragraphs + {args.max_distractors} distractor paragraph(s), <= {args.max_sentences} "
                                    f"sentences each (gold kept); <= {args.max_statements} statements per answer; "
                                    f"{len(evals)} of the 20 held-out examples and {len(train)} of the 20 training ones"),
            "statements": "every method cites the same statements: the direct response's (answer-first generation)",
            "costs": "per example, on top of generating the response (shared): forward_passes = sequences run through the "
                     "model for scoring (ContextCite: ablations); sampling_rows = one-token cached decode steps x rows "
                     "(best-of-N sampling); tokens = tokens actually run (KV-cached prefixes not counted); seconds = wall",
        },
        "generation_per_example": gen,
        "methods": summary,
    }
    d, b, s, c = (summary[k]["f1"] * 100 for k in methods)
    results["goals"] = {
        "best_of_n_minus_direct_f1_points": b - d,
        "best_of_n_improves_f1_by_5_points": b - d >= 5.0,
        "best_of_n_matches_or_beats_contextcite_f1": b >= c,
        "best_of_n_fewer_forward_passes_than_contextcite": summary["best_of_n"]["forward_passes"] < summary["contextcite"]["forward_passes"],
        "reward_search_minus_direct_f1_points": s - d,
        "reward_search_matches_or_beats_contextcite_f1": s >= c,
    }

    if not args.no_simpo:
        rng = random.Random(args.seed)
        t = time.perf_counter()
        pairs, infos = [], []
        for ex in train:
            pair, info = build_pair(lm, ex, cfg, rng)
            infos.append(info)
            if pair is not None:
                pairs.append(pair)
        pairs_s = time.perf_counter() - t
        print(f"SimPO: {len(pairs)} pairs from {len(train)} training examples in {pairs_s:.0f}s", flush=True)
        before = mean_scores([r["methods"]["direct"] for r in rows])
        t = time.perf_counter()
        model, history = train_simpo(lm.model, lm.tokenizer, pairs, str(out_path.parent / ".simpo-tmp"),
                                     learning_rate=args.simpo_lr, epochs=args.simpo_epochs, seed=args.seed)
        train_s = time.perf_counter() - t
        tuned = LocalLM(model, lm.tokenizer, name="smollm2+selfcite-simpo")
        t = time.perf_counter()
        after_rows = direct_eval(tuned, evals, args.max_distractors, args.max_sentences, args.max_statements)
        after = mean_scores(after_rows)
        results["simpo"] = {
            "pairs": len(pairs), "train_examples": len(train), "balanced_pairs": sum(p.balanced for p in pairs),
            "mean_reward_gain": sum(p.reward_gain for p in pairs) / max(len(pairs), 1),
            "settings": {"loss": "SimPO via TRL CPOTrainer (loss_type=simpo, cpo_alpha=0)", "beta": 10.0, "gamma_beta_ratio": 0.3,
                         "learning_rate": args.simpo_lr, "epochs": args.simpo_epochs, "full_fine_tune": True,
                         "note": "paper lr is 3e-7 over ~2k pairs for 8B models; a handful of CPU steps needs a larger lr to move a 135M model"},
            "steps": max((h.get("step", 0) for h in history), default=0),
            "train_loss": next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None),
            "log": [h for h in history if "loss" in h],
            "seconds": {"pairs": pairs_s, "train": train_s, "eval_after": time.perf_counter() - t},
            "direct_before": {k: before.get(k) for k in ("precision", "recall", "f1", "answer_contains")},
            "direct_after": {k: after.get(k) for k in ("precision", "recall", "f1", "answer_contains")},
            "direct_f1_change_points": (after["f1"] - before["f1"]) * 100,
            "after_rows": [{"id": r["id"], "f1": r["f1"], "response": r["response"]} for r in after_rows],
        }
        import shutil

        shutil.rmtree(out_path.parent / ".simpo-tmp", ignore_errors=True)

    results["rows"] = rows
    results["machine"]["load_average_end"] = os.getloadavg()
    results["total_seconds"] = time.perf_counter() - t_all
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, json.dumps(results, indent=2))
    rows_path.unlink(missing_ok=True)  # the rows are in the JSON now; the JSONL only serves an interrupted run
    print(json.dumps({"methods": summary, "goals": results["goals"], "simpo": {k: v for k, v in results.get("simpo", {}).items()
                                                                               if k in ("pairs", "direct_f1_change_points", "train_loss")},
                      "total_seconds": results["total_seconds"]}, indent=2))
    print(f"wrote {out_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
