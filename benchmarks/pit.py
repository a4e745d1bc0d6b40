"""PIT benchmark: standard instruction-tuning vs PIT on a testbed where the knowledge is stored first.

1. From-scratch study (default): a Llama of hidden 256 and 4 layers (about 4.4M parameters, a BPE of 2,048
   tokens trained on the run's documents) learns 80 synthetic people (40 train / 40 test) from five
   augmented biographies each (permuted sentences, full names: bioS "multi5+permute+fullname", which
   Physics of Language Models 3.1 shows a model needs to store facts extractably), 30 document epochs,
   schedules 2 (standard), 7 (PIT) and 8 (PIT++) at equal token budgets, three seeds (a seed changes the
   people, the split, the initial weights and the shuffling).  Every schedule first passes the storage
   gate: after its last stage with test documents, the model completes each attribute value inside the
   test people's own biographies (``tessera.knowledge.storage_gate``); QA exact match then measures only
   whether questions can extract what was stored.
2. Real model (``--with-real``): the embedded SmolLM2-135M-Instruct learns new people, standard (2)
   against PIT (7), one seed, with closed-book and open-book references.

Goals (issue 24), in ``goals``: ``pit_storage_gate`` >= 90 (the lowest mean gate accuracy among the
compared schedules), ``pit_minus_standard_em`` >= 15 and ``pitpp_minus_standard_em`` >= 15 (test EM,
mean of 3 seeds; the paper: +15.1 and +17.8 with Llama-2 7B).

Runs resume: every schedule's result is appended under ``--work`` as it finishes.  ``--quick`` runs
the same code on 24 people and a 128x2 model, one seed, schedules 2 and 7 (under a minute here;
written to ``--work``/pit_quick.json).  ``--candidates 256x4,...`` only measures training tokens/s of
testbed sizes.  The paper-sized real run on a GPU is ``python benchmarks/pit.py --skip-tiny --with-real
--real lm=default n_people=300 doc_epochs=10 qa_epochs=3 doc_lr=3e-5 qa_lr=5e-6 trainable_top_layers=0
batch_size=16 keep_qa=64``.

``--pitpp`` (schedule 8 only, ``--seeds``, 3 minutes per variant and seed): experiments on PIT++'s gap - its
QA-first stage at lr 3e-4 / 1e-4 / 1e-5 and without the budget scale - merged as ``pitpp_experiments``.

``--extras`` (one seed, about 30 minutes, merged into the JSON): schedules 1, 4, 5, 6; the augmentation
axis (2, 7, 8 at one biography per person with the same exposures per fact); standard (2) with 4x the QA
epochs; each with the gate's curve against test-document epochs (``pit_curve.png``).  ``--full`` = the
default run, then ``--extras`` (about 60 minutes).

Usage: python benchmarks/pit.py [--quick] [--extras|--full] [--threads 2] [--seeds 0,1,2] [--schedules 2,7,8] [--with-real]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TESSERA_QUIET", "1")

GOAL_POINTS = 15.0
PAPER = {"llama2_7b_wiki2023_em": {"2": 30.3, "4": 39.4, "7": 45.4, "8": 48.1}, "pit_plus_plus_gain": 17.8,
         "bioS_continued_pretraining_vs_pit": [29.6, 58.1]}


TRIED = ("QA-only stages at the document lr (1e-3, `tiny_qa_lr_1e-3`): PIT +17.2 (met) but standard's QA stage then "
         "erases what questions could extract (5.6 EM) and PIT++'s QA-first stage costs it (+4.2); QA lr 3e-4 (the paper "
         "keeps QA lr under the document lr; chosen on seed 0 among 1e-3/3e-4/1e-4/1e-5, `pitpp_experiments`) lifts "
         "standard to 15.7 and PIT++ to 26.0; more QA epochs for standard, schedules 1/4/5/6 and the augmentation axis "
         "in `tiny_one_seed`, `standard_more_qa`, `augmentation`")


def write(results: dict, path: Path) -> None:
    from tessera.config import atomic_write_text

    atomic_write_text(path, json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def run(overrides: list[str]) -> dict:
    from tessera.config import load_config
    from tessera.recipes import pit

    cfg = load_config(pit.Config, None, overrides)
    out = pit.main(cfg)
    return json.loads((out / "results.json").read_text())


def spread(xs: list[float]) -> dict:
    return {"mean": round(statistics.fmean(xs), 2), "std": round(statistics.stdev(xs), 2) if len(xs) > 1 else 0.0,
            "min": round(min(xs), 2), "max": round(max(xs), 2), "values": [round(x, 2) for x in xs]}


def aggregate(per_seed: list[dict]) -> dict:
    out = {}
    for number in [r["schedule"] for r in per_seed[0]["schedules"]]:
        rows = [next(r for r in res["schedules"] if r["schedule"] == number) for res in per_seed]
        attrs = sorted(rows[0]["test"]["per_attribute"])
        out[str(number)] = {
            "name": rows[0]["name"], "test_em": spread([r["test"]["em"] for r in rows]),
            "test_recall": spread([r["test"]["recall"] for r in rows]),
            "train_qa_em": spread([r["train_qa"]["em"] for r in rows]) if rows[0]["train_qa"] else None,
            "per_attribute_em": {a: round(statistics.fmean(r["test"]["per_attribute"][a]["em"] for r in rows), 2) for a in attrs},
            "storage_gate": spread([r["storage_gate"]["accuracy"] for r in rows])
            if all(r.get("storage_gate") for r in rows) else None,
            "tokens": [r["plan"]["tokens"] for r in rows], "seconds": [round(r["seconds"], 1) for r in rows],
            "stages": rows[0]["plan"]["stages"],
        }
    return out


def candidates(specs: list[str], threads: int, n_people: int = 200, batch: int = 64, steps: int = 6) -> list[dict]:
    """Training tokens/s of from-scratch Llama candidates on this CPU (bioS biographies, batch ``batch``,
    AdamW, fp32): the testbed is sized from these before any schedule runs.  ``specs``: ``HIDDENxLAYERS``."""
    import torch

    from tessera.data.bios import build_bios
    from tessera.knowledge.format import KnowledgeCollator, encode_document
    from tessera.knowledge.vocab import tiny_llama

    torch.set_num_threads(threads)
    ks = build_bios(n_people, seed=0, bios_per_person=5, permute=True, fullname=True)
    texts = [d.text for d in ks.documents]
    out = []
    for spec in specs:
        hidden, layers = (int(v) for v in spec.split("x"))
        model, tok = tiny_llama(texts, vocab_size=2048, hidden_size=hidden, num_layers=layers, num_heads=max(4, hidden // 64),
                                num_kv_heads=max(2, hidden // 128), seed=0)
        rows = [encode_document(tok, t) for t in texts[:batch]]
        batch_t = KnowledgeCollator(tok.pad_token_id)(rows)
        n_tok = int(batch_t["attention_mask"].sum())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        times = []
        for i in range(steps):
            t = time.perf_counter()
            loss = model(**batch_t).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:  # the first step allocates
                times.append(time.perf_counter() - t)
        n_params = sum(p.numel() for p in model.parameters())
        out.append({"hidden": hidden, "layers": layers, "parameters": n_params,
                    "non_embedding_parameters": n_params - model.get_input_embeddings().weight.numel(),
                    "batch": batch, "tokens_per_batch": n_tok, "tokens_per_s": round(n_tok / statistics.median(times), 1)})
        print(f"candidate {spec}: {out[-1]}", flush=True)
    return out


def _set(overrides: list[str], **kv) -> list[str]:
    """``overrides`` with the given keys replaced."""
    return [o for o in overrides if o.split("=", 1)[0] not in kv] + [f"{k}={v}" for k, v in kv.items()]


def _one(res: dict) -> dict:
    """One seed's schedules: EM, train-QA EM, gate and its curve."""
    out = {}
    for r in res["schedules"]:
        g = r.get("storage_gate") or {}
        out[str(r["schedule"])] = {
            "name": r["name"], "test_em": round(r["test"]["em"], 2), "test_recall": round(r["test"]["recall"], 2),
            "train_qa_em": round(r["train_qa"]["em"], 2) if r["train_qa"] else None,
            "storage_gate": round(g["accuracy"], 2) if g else None, "gate_curve": g.get("curve"),
            "per_attribute_em": {a: round(v["em"], 2) for a, v in sorted(r["test"]["per_attribute"].items())},
            "tokens": r["plan"]["tokens"], "seconds": round(r["seconds"], 1), "stages": r["plan"]["stages"]}
    return out


def extras(results: dict, args, common: list[str], out_path: Path, seed: int = 0, curve_points: int = 6) -> None:
    """One-seed parts of issue 24 beside the three-seed comparison: the remaining schedules, the
    augmentation axis, a standard baseline with more QA training, each with the gate's curve."""
    base = [*args.tiny, *common, f"seed={seed}", f"gate_curve={curve_points}"]
    t = time.perf_counter()
    res = run([*base, "schedules=[1,4,5,6]", f"dump_dir={args.work}/extra-schedules"])
    results["tiny_one_seed"] = {"seed": seed, "overrides": args.tiny, "schedules": _one(res),
                                "majority_answer": round(res["references"]["majority_answer"]["em"], 2),
                                "seconds": round(time.perf_counter() - t, 1)}
    write(results, out_path)
    print("schedules 1,4,5,6: " + ", ".join(f"({k}) {v['test_em']}" for k, v in results["tiny_one_seed"]["schedules"].items()), flush=True)

    t = time.perf_counter()
    epochs = float(next(o for o in args.tiny if o.startswith("doc_epochs=")).split("=")[1])
    bios = int(next(o for o in args.tiny if o.startswith("bios_per_person=")).split("=")[1])
    one = _set(base, bios_per_person=1, permute="false", fullname="false", doc_epochs=f"{epochs * bios:g}")
    res1 = run([*one, "schedules=[2,7,8]", f"dump_dir={args.work}/augmentation-1bio"])
    five = results.get("tiny", {}).get("schedules", {})
    seed_i = results.get("tiny", {}).get("seeds", []).index(seed) if seed in results.get("tiny", {}).get("seeds", []) else None
    results["augmentation"] = {
        "seed": seed, "note": f"one biography per person, no permutation, first names, {epochs * bios:g} document epochs "
                              f"(the same exposures per fact and tokens as {bios} biographies x {epochs:g} epochs)",
        "one_bio": _one(res1), "one_bio_majority_answer": round(res1["references"]["majority_answer"]["em"], 2),
        "five_bios_same_seed": {k: {"test_em": v["test_em"]["values"][seed_i], "storage_gate": v["storage_gate"]["values"][seed_i],
                                    "train_qa_em": v["train_qa_em"]["values"][seed_i] if v.get("train_qa_em") else None}
                                for k, v in five.items()} if seed_i is not None else None,
        "seconds": round(time.perf_counter() - t, 1)}
    write(results, out_path)
    print("one biography: " + ", ".join(f"({k}) {v['test_em']} gate {v['storage_gate']}"
                                        for k, v in results["augmentation"]["one_bio"].items()), flush=True)

    t = time.perf_counter()
    qa_epochs = float(next(o for o in args.tiny if o.startswith("qa_epochs=")).split("=")[1])
    res2 = run([*_set(base, qa_epochs=f"{4 * qa_epochs:g}"), "schedules=[2]", f"dump_dir={args.work}/standard-more-qa"])
    results["standard_more_qa"] = {
        "seed": seed, "qa_epochs": 4 * qa_epochs,
        "note": "does standard instruction-tuning extract more once its QA stage fits the train people? (its own budget)",
        "schedules": _one(res2), "seconds": round(time.perf_counter() - t, 1)}
    write(results, out_path)
    print("standard, 4x QA epochs: " + str(results["standard_more_qa"]["schedules"]["2"]["test_em"]), flush=True)


PITPP_VARIANTS = {
    # qa_lr applies only to QA-only stages: in schedule 8 that is its first stage and nothing else
    "qa_first_lr_3e-4": ["qa_lr=3e-4"],
    "qa_first_lr_1e-4": ["qa_lr=1e-4"],
    "qa_first_lr_1e-5": ["qa_lr=1e-5"],
    "no_budget_scale": ["equal_budget=false"],
}


def pitpp(results: dict, args, common: list[str], out_path: Path, seeds: list[int],
          variants: dict[str, list[str]] = PITPP_VARIANTS) -> None:
    """Experiments on PIT++'s gap: schedule 8 with its QA-only first stage at a lower learning rate (as the
    paper's QA lr is 6x under its document lr) and without the shared token-budget scale, each against
    schedule 8 as in the default run and PIT (7) on the same seeds.  A small first-stage lr turns PIT++
    into PIT with a short QA warm-up: if EM climbs toward PIT's as it falls, the QA-first stage is what
    costs EM on this testbed."""
    tiny = results.get("tiny", {})
    done = results.get("pitpp_experiments", {}).get("variants", {})
    out = {"seeds": seeds, "note": " ".join(pitpp.__doc__.split()), "variants": dict(done)}
    t = time.perf_counter()
    for name, extra in variants.items():
        if name in done and done[name]["seeds"] == seeds:
            continue
        per_seed = [run([*args.tiny, *common, *extra, f"seed={s}", "schedules=[8]",
                         f"dump_dir={args.work}/pitpp-{name}-seed{s}"]) for s in seeds]
        row = aggregate(per_seed)["8"]
        out["variants"][name] = {"overrides": extra, "seeds": seeds, "test_em": row["test_em"], "train_qa_em": row["train_qa_em"],
                                 "storage_gate": row["storage_gate"], "per_attribute_em": row["per_attribute_em"],
                                 "stages": row["stages"], "seconds": row["seconds"]}
        print(f"PIT++ {name}: test EM {row['test_em']['mean']} (seeds {row['test_em']['values']}), "
              f"gate {row['storage_gate']['mean'] if row['storage_gate'] else None}", flush=True)
        out["seconds"] = round(time.perf_counter() - t, 1)
        results["pitpp_experiments"] = out
        write(results, out_path)
    if tiny.get("seeds"):
        idx = [tiny["seeds"].index(s) for s in seeds if s in tiny["seeds"]]
        if len(idx) == len(seeds):
            for k in ("2", "7", "8"):
                if k in tiny["schedules"]:
                    vals = [tiny["schedules"][k]["test_em"]["values"][i] for i in idx]
                    out[f"default_run_schedule_{k}_same_seeds"] = spread(vals)
    best = max(out["variants"].items(), key=lambda kv: kv[1]["test_em"]["mean"]) if out["variants"] else None
    if best and "2" in tiny.get("schedules", {}):
        out["best"] = {"variant": best[0], "test_em": best[1]["test_em"]["mean"],
                       "minus_standard_em": round(best[1]["test_em"]["mean"] - tiny["schedules"]["2"]["test_em"]["mean"], 2)}
    results["pitpp_experiments"] = out
    write(results, out_path)


def above_floor(schedules: dict, floor: float, margin: float = 2.0) -> list[str]:
    """Schedules whose mean test EM beats always answering the most frequent train answer by ``margin`` points."""
    return [k for k, v in schedules.items() if v["test_em"]["mean"] > floor + margin]


def plot(results: dict, path: Path) -> None:
    """``path``: test EM beside the storage gate per schedule (error bars over seeds), the augmentation axis
    and the SmolLM2 tables; ``path``-``curve``: the gate and test EM against test-document epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in results if (p == "tiny" or p.startswith("real")) and "schedules" in results[p]]
    if results.get("augmentation", {}).get("five_bios_same_seed"):
        panels.insert(1 if "tiny" in panels else 0, "augmentation")
    if panels:
        _bars(results, panels, path, plt)
    _curves(results, path, plt)


def _bars(results: dict, panels: list[str], path: Path, plt) -> None:
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels) + 1, 3.9), squeeze=False,
                             gridspec_kw={"width_ratios": [3 if p == "tiny" else 1.6 for p in panels]})
    for ax, p in zip(axes[0], panels):
        if p == "augmentation":
            aug = results[p]
            keys = list(aug["one_bio"])
            x = range(len(keys))
            ax.bar([i - 0.2 for i in x], [aug["one_bio"][k]["test_em"] for k in keys], 0.4, color="tab:gray", label="1 bio")
            ax.bar([i + 0.2 for i in x], [aug["five_bios_same_seed"][k]["test_em"] for k in keys], 0.4, color="tab:orange",
                   label="5 bios (permuted, full names)")
            ax.set_xticks(list(x), [f"({k}) {aug['one_bio'][k]['name']}" for k in keys], rotation=30, ha="right", fontsize=7)
            ax.set_ylabel("test EM (%)")
            ax.legend(fontsize=7)
            ax.set_title(f"augmentation axis, seed {aug['seed']} (gate: "
                         + ", ".join(f"{aug['one_bio'][k]['storage_gate']:.0f}" for k in keys) + " / "
                         + ", ".join(f"{aug['five_bios_same_seed'][k]['storage_gate']:.0f}" for k in keys) + ")", fontsize=8)
            continue
        sch = results[p]["schedules"]
        keys = list(sch)
        means = [sch[k]["test_em"]["mean"] for k in keys]
        errs = [sch[k]["test_em"]["std"] for k in keys]
        colors = ["tab:orange" if k in ("7", "8") else "tab:gray" if k == "2" else "tab:blue" for k in keys]
        gated = all(sch[k].get("storage_gate") for k in keys)
        w = 0.4 if gated else 0.8
        ax.bar([i + (0.2 if gated else 0) for i in range(len(keys))], means, w, yerr=errs, capsize=3, color=colors,
               label="test QA EM")
        if gated:
            ax.bar([i - 0.2 for i in range(len(keys))], [sch[k]["storage_gate"]["mean"] for k in keys], w,
                   yerr=[sch[k]["storage_gate"]["std"] for k in keys], capsize=3, color="tab:green", alpha=0.35,
                   label="storage gate (completion)")
        ax.set_xticks(range(len(keys)), [f"({k}) {sch[k]['name']}" for k in keys], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("accuracy (%)" if gated else "test EM (%)")
        refs = results[p].get("references", {})
        if refs.get("open_book") is not None:
            ax.axhline(refs["open_book"], ls="--", color="tab:green", lw=1, label=f"open-book ref. {refs['open_book']:.1f}")
        maj = refs.get("majority_answer")
        if maj is not None:
            maj = maj["mean"] if isinstance(maj, dict) else maj
            ax.axhline(maj, ls=":", color="tab:red", lw=1, label=f"majority answer {maj:.1f}")
        ax.legend(fontsize=7)
        ax.set_title(results[p]["title"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _curves(results: dict, path: Path, plt) -> None:
    curves = []
    for part, label in (("tiny_one_seed", "5 bios"), ("augmentation", "1 bio"), ("standard_more_qa", "5 bios, 4x QA")):
        sch = results.get(part, {}).get("one_bio" if part == "augmentation" else "schedules", {})
        curves += [(f"({k}) {v['name']}, {label}", v["gate_curve"]) for k, v in sch.items() if v.get("gate_curve")]
    if not curves:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.9))
    for name, c in curves:
        xs = [r["test_doc_epochs"] for r in c]
        a1.plot(xs, [r["gate"] for r in c], marker="o", ms=3, label=name)
        a2.plot(xs, [r["test_em"] for r in c], marker="o", ms=3, label=name)
    a1.axhline(90, ls=":", color="k", lw=1)
    a1.set(xlabel="test-document epochs", ylabel="storage gate (%)", title="completion of stored values (gate 90%)")
    a2.set(xlabel="test-document epochs", ylabel="test QA EM (%)", title="extraction by questions")
    a2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path.with_name(path.stem + "_curve.png"), dpi=130)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--schedules", default="2,7,8", help="schedules run with every seed (1,4,5,6 add about 3 min each per seed)")
    ap.add_argument("--tiny", nargs="*", default=[
        "n_people=80", "bios_per_person=5", "permute=true", "fullname=true", "tiny_hidden=256", "tiny_layers=4",
        "tiny_vocab=2048", "doc_epochs=30", "qa_epochs=4", "doc_lr=1e-3", "qa_lr=3e-4", "batch_size=64", "keep_qa=32",
        "eval_train_qa=120", "references=false"],
        help="key=value overrides of the pit recipe for the from-scratch study (the gated testbed: the biographies are "
             "stored before the schedules are compared)")
    ap.add_argument("--quick", action="store_true", help="the same code on a small testbed, one seed, schedules 2 and 7 (~2 min)")
    ap.add_argument("--with-real", action="store_true", help="also run the SmolLM2 table (schedules 2 and 7, --real)")
    ap.add_argument("--real", nargs="*", default=[
        "lm=default", "n_people=60", "attributes=[birth_city,university,employer]", "trainable_top_layers=8",
        "doc_epochs=6", "qa_epochs=2", "doc_lr=3e-4", "qa_lr=1e-4", "batch_size=4", "keep_qa=16", "eval_train_qa=45"],
        help="key=value overrides of the pit recipe for the SmolLM2 run (schedules 2 and 7)")
    ap.add_argument("--real-tag", default="", help="store the real-model run as results['real_TAG'] (a second configuration)")
    ap.add_argument("--candidates", default="",
                    help="only measure training tokens/s of from-scratch testbeds HIDDENxLAYERS,... (e.g. 256x4,384x4,512x2) "
                         "and record them as results['testbed_candidates']")
    ap.add_argument("--extras", action="store_true",
                    help="one seed (0) on the default testbed: schedules 1,4,5,6; the augmentation axis (2,7,8 at one "
                         "biography per person, 150 document epochs = the same exposures per fact); standard (2) with "
                         "4x the QA epochs; each with the storage-gate curve (about 30 minutes); merged into the JSON")
    ap.add_argument("--full", action="store_true", help="the default run, then --extras (about 60 minutes)")
    ap.add_argument("--pitpp", action="store_true",
                    help="only the experiments on PIT++'s gap (schedule 8 with a lower first-stage QA lr, and without "
                         "the budget scale; --seeds, 3 min per variant and seed), merged into the JSON as pitpp_experiments")
    ap.add_argument("--pitpp-variants", default=",".join(PITPP_VARIANTS), help="which of them (comma-separated)")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--work", default="/tmp/tessera-pit-bench", help="dump dirs (resumable)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pit.json"))
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.schedules = "0", "2,7"
        args.tiny = ["n_people=24", "bios_per_person=3", "permute=true", "fullname=true", "tiny_hidden=128", "tiny_layers=2",
                     "tiny_vocab=1024", "doc_epochs=80", "qa_epochs=6", "doc_lr=3e-3", "qa_lr=3e-3", "batch_size=16",
                     "keep_qa=8", "eval_train_qa=24", "references=false"]
        if args.out == str(ROOT / "benchmarks" / "results" / "pit.json"):
            args.out = str(Path(args.work) / "pit_quick.json")

    import torch
    import transformers

    from tessera import __version__

    torch.set_num_threads(args.threads)
    out_path = Path(args.out)
    results: dict = json.loads(out_path.read_text()) if out_path.is_file() else {}
    results.update({
        "benchmark": "pit",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg()},
        "versions": {"tessera": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "command": " ".join(sys.argv), "goal": f"PIT (7) - standard (2) >= {GOAL_POINTS} test EM points", "paper": PAPER,
    })
    t0 = time.perf_counter()
    if args.candidates:
        results["testbed_candidates"] = {"threads": args.threads, "load_average_at_start": os.getloadavg(),
                                         "rows": candidates(args.candidates.split(","), args.threads)}
        write(results, out_path)
        return
    common = [f"threads={args.threads}"]
    if args.pitpp:
        chosen = args.pitpp_variants.split(",")
        unknown = [v for v in chosen if v not in PITPP_VARIANTS]
        if unknown:
            sys.exit(f"error: unknown --pitpp-variants {unknown}; known: {', '.join(PITPP_VARIANTS)}")
        pitpp(results, args, common, out_path, [int(x) for x in args.seeds.split(",")],
              {k: PITPP_VARIANTS[k] for k in chosen})
        results["machine"]["load_average_at_end"] = os.getloadavg()
        write(results, out_path)
        return
    if args.extras and not args.full:
        args.skip_tiny = True
    if not args.skip_tiny:
        seeds = [int(s) for s in args.seeds.split(",")]
        per_seed = []
        for s in seeds:
            per_seed.append(run([*args.tiny, *common, f"seed={s}", f"schedules=[{args.schedules}]",
                                 f"dump_dir={args.work}/tiny-seed{s}"]))
            print(f"tiny seed {s}: " + ", ".join(f"({r['schedule']}) {r['test']['em']:.1f}" for r in per_seed[-1]["schedules"]), flush=True)
        sch = aggregate(per_seed)
        refs = [r["references"] for r in per_seed if r["references"].get("closed_book")]
        gain = sch["7"]["test_em"]["mean"] - sch["2"]["test_em"]["mean"] if "7" in sch and "2" in sch else None
        floor = statistics.fmean(r["references"]["majority_answer"]["em"] for r in per_seed)
        gates = [v["storage_gate"]["mean"] for v in sch.values() if v.get("storage_gate")]
        results["tiny"] = {
            "schedules_above_majority_floor_by_2_points": above_floor(sch, floor),
            "title": f"from-scratch Llama ({per_seed[0]['model']['parameters'] / 1e6:.1f}M params), {len(seeds)} seeds, "
                     f"{per_seed[0]['data']['test_qa']} test questions",
            "overrides": args.tiny, "seeds": seeds, "model": per_seed[0]["model"], "data": per_seed[0]["data"],
            "budget_tokens": [r["budget_tokens"] for r in per_seed], "schedules": sch,
            "references": {**({"closed_book": statistics.fmean(r["closed_book"]["em"] for r in refs),
                                "open_book": statistics.fmean(r["open_book"]["em"] for r in refs)} if refs else {}),
                           "majority_answer": spread([r["references"]["majority_answer"]["em"] for r in per_seed])},
            "chance_em_note": "references.majority_answer = always answering the most frequent train answer of the attribute",
            "pit_minus_standard_em": round(gain, 2) if gain is not None else None,
            "pit_plus_plus_minus_standard_em": round(sch["8"]["test_em"]["mean"] - sch["2"]["test_em"]["mean"], 2)
            if "8" in sch and "2" in sch else None,
            "goal_met": bool(gain is not None and gain >= GOAL_POINTS),
            "seconds": round(sum(sum(r["seconds"] for r in res["schedules"]) for res in per_seed), 1),
        }
        pp = results["tiny"]["pit_plus_plus_minus_standard_em"]
        results["goals"] = {
            "pit_storage_gate": {"target": 90, "measured": round(min(gates), 2) if gates else None,
                                 "met": bool(gates and min(gates) >= 90),
                                 "note": "the lowest mean storage-gate accuracy among the compared schedules"},
            "pit_minus_standard_em": {"target": GOAL_POINTS, "measured": results["tiny"]["pit_minus_standard_em"],
                                      "met": bool(gain is not None and gain >= GOAL_POINTS), "tried": TRIED},
            "pitpp_minus_standard_em": {"target": GOAL_POINTS, "measured": pp, "met": bool(pp is not None and pp >= GOAL_POINTS),
                                        "tried": TRIED},
        }
        write(results, out_path)
    if args.extras or args.full:
        extras(results, args, common, out_path)
    if args.with_real and not args.skip_real:
        key = f"real_{args.real_tag}" if args.real_tag else "real"
        res = run([*args.real, *common, "seed=0", "schedules=[2,7]", f"dump_dir={args.work}/{key}"])
        sch = aggregate([res])
        gain = sch["7"]["test_em"]["mean"] - sch["2"]["test_em"]["mean"]
        results[key] = {
            "schedules_above_majority_floor_by_2_points": above_floor(sch, res["references"]["majority_answer"]["em"]),
            "title": f"SmolLM2-135M-Instruct, {res['data']['entities']} new people, {res['data']['test_qa']} test questions, "
                     f"{res['config']['doc_epochs']:g} doc epochs",
            "overrides": args.real, "model": res["model"], "data": res["data"], "budget_tokens": res["budget_tokens"],
            "schedules": sch, "trainable_parameters": res["schedules"][0]["trainable_parameters"],
            "references": {"closed_book": res["references"]["closed_book"]["em"], "open_book": res["references"]["open_book"]["em"],
                           "majority_answer": res["references"]["majority_answer"]["em"],
                           "closed_book_detail": res["references"]["closed_book"], "open_book_detail": res["references"]["open_book"]}
            if res["references"] else {},
            "examples": {str(r["schedule"]): r["test"]["examples"][:6] for r in res["schedules"]},
            "pit_minus_standard_em": round(gain, 2), "goal_met": bool(gain >= GOAL_POINTS),
            "seconds": round(sum(r["seconds"] for r in res["schedules"]) + (res["references"] or {}).get("seconds", 0.0), 1),
        }
        write(results, out_path)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["wall_s_this_invocation"] = round(time.perf_counter() - t0, 1)  # resumed runs reuse finished schedules
    results.pop("wall_s", None)
    write(results, out_path)
    plot(results, out_path.with_suffix(".png"))
    for p in [k for k in results if k == "tiny" or k.startswith("real")]:
        if "schedules" in results[p]:
            print(p, {k: v["test_em"]["mean"] for k, v in results[p]["schedules"].items()},
                  "PIT-standard", results[p]["pit_minus_standard_em"], "goal met" if results[p]["goal_met"] else "goal MISSED")


if __name__ == "__main__":
    main()
