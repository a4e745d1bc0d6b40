"""Benchmark: dense vs Mixture-of-Transformers vs MoMa (2t2i, 4t4i) vs MoMa+MoD, Chameleon and Transfusion settings.

Every model has the same shapes per token (d_model 64, 4 layers, 4 heads, SwiGLU hidden 256), so
dense, MoT and MoMa cost the same FLOPs per token (MoMa adds its routers, about 5%; MoD layers
process 25% of the tokens).  Data: scikit-learn 8x8 digits with template captions in both orders
(pixel-value tokens in the Chameleon setting, 2x2 patches + DDPM in the Transfusion setting) and
WikiText-2 text-only sequences; every run uses the same batches (same seed).  All runs go through
the ``mixed-modal-pretrain`` recipe.

Figures per setting:
- validation loss on text and image tokens separately against cumulative training FLOPs (PNG);
- MoT's step fraction: the fraction of dense's steps MoT needs to reach dense's final validation
  loss (image, text, total; linear interpolation between evaluations every ``--eval-every`` steps);
- MoMa's FLOPs saving factor: dense's total FLOPs / the FLOPs the MoMa model needs to reach dense's
  final validation loss (``null`` when it never gets there within the run);
- wall-clock per training step against dense, measured in a separate phase that interleaves the
  variants step by step (peers in the same loop; the machine is shared);
- conditional generation accuracy (images from captions, judged by a digit CNN trained on the
  training split) and captioning accuracy; expert-choice / MoD models with the batch (non-causal)
  and the auxiliary (causal) routers.

Goals (issue 7): MoT reaches dense's final image loss in at most 60% of the steps; MoMa saves at
least 2x FLOPs; wall-clock per step at most 1.3x dense.

    nice -n 5 .venv/bin/python benchmarks/mixed_modal.py [--steps 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import machine, write_json

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {  # name -> recipe overrides
    "dense": {"variant": "dense"},
    "mot": {"variant": "mot"},
    "moma_2t2i": {"variant": "moma", "n_text_experts": 2, "n_image_experts": 2},
    "moma_4t4i": {"variant": "moma", "n_text_experts": 4, "n_image_experts": 4},
    "moma_4t4i_mod": {"variant": "moma_mod", "n_text_experts": 4, "n_image_experts": 4},
}
LOSSES = {"image": "val_image_loss", "text": "val_text_loss", "total": "val_model_loss"}


def eval_curve(run_dir: Path, routing: str = "batch") -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in rows if r["kind"] == "eval" and r["routing"] == routing]


def first_reach(curve: list[dict], key: str, target: float, x: str) -> float | None:
    """The ``x`` (step or flops) where ``curve[key]`` first drops to ``target`` (linear interpolation)."""
    for a, b in zip(curve, curve[1:]):
        if b[key] <= target:
            if a[key] <= target:
                return float(a[x])
            f = (a[key] - target) / (a[key] - b[key])
            return float(a[x] + f * (b[x] - a[x]))
    return None


def timing_phase(setting: str, names: list[str], base_cfg: dict, steps: int, rounds: int) -> dict:
    """Median seconds per training step, variants interleaved step by step (same batches)."""
    from tessera.models.objectives import MixedModalLM
    from tessera.recipes.mixed_modal_pretrain import Config, build_data, model_config

    cfg = Config(setting=setting, **base_cfg)
    data, _, train_idx, _, _, _ = build_data(cfg)
    models, opts = {}, {}
    for n in names:
        c = Config(setting=setting, **{**base_cfg, **VARIANTS[n]})
        torch.manual_seed(0)
        models[n] = MixedModalLM(model_config(c, data.vocab.size, data.patch_dim), setting)
        opts[n] = torch.optim.AdamW(models[n].parameters(), lr=1e-3)
    times: dict[str, list[float]] = {n: [] for n in names}
    rng = np.random.default_rng(0)
    for r in range(rounds):
        for s in range(steps):
            batch = data.batch(cfg.batch_size, rng, train_idx)
            order = names[(r + s) % len(names):] + names[:(r + s) % len(names)]
            for n in order:
                t0 = time.perf_counter()
                out = models[n](batch)
                opts[n].zero_grad()
                out["loss"].backward()
                opts[n].step()
                if r > 0 or s >= 2:  # warm-up
                    times[n].append(time.perf_counter() - t0)
    med = {n: float(np.median(v)) for n, v in times.items()}
    return {"median_step_s": med, "ratio_to_dense": {n: round(med[n] / med["dense"], 3) for n in names}}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tessera.config import atomic_savefig

    settings = list(results["settings"])
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 4 * len(settings)), squeeze=False)
    for i, s in enumerate(settings):
        for j, (mod, key) in enumerate((("text", "val_text_loss"), ("image", "val_image_loss"))):
            ax = axes[i][j]
            for name, run in results["settings"][s]["runs"].items():
                c = run["curve"]
                ax.plot([r["flops"] / 1e12 for r in c[1:]], [r[key] for r in c[1:]], label=name, marker=".", ms=3)
            ax.set_title(f"{s}: validation {mod} loss" + (" (DDPM MSE)" if s == "transfusion" and mod == "image" else ""))
            ax.set_xlabel("cumulative training FLOPs (TFLOP)")
            ax.set_ylabel("loss")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--settings", default="chameleon,transfusion")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0", help="comma-separated seeds for every run")
    ap.add_argument("--extra-seeds", default="", help="more seeds for a few runs where the gap is small, "
                    "SETTING:VARIANT+VARIANT:SEED,... e.g. chameleon:dense+mot:1")
    ap.add_argument("--timing-steps", type=int, default=8)
    ap.add_argument("--timing-rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-mixed-modal"))
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs (results.json) in --runs-dir")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mixed_modal.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["TESSERA_QUIET"] = "1"
    import diffusers

    from tessera import __version__
    from tessera.recipes.mixed_modal_pretrain import Config, main as run_recipe

    out_path = Path(args.out)
    names = [n for n in args.variants.split(",") if n]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    base_cfg = dict(dataset="digits", d_model=64, n_layers=4, n_heads=4, steps=args.steps, batch_size=args.batch_size,
                    eval_every=args.eval_every, eval_batches=4, ckpt_every=10**9, log_every=25, sample_per_class=4,
                    n_caption_eval=60, sample_steps=50, classifier_steps=600, lr=3e-3, warmup_steps=20)
    results: dict = {
        "machine": machine(),
        "versions": {"tessera": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        "config": {"base": base_cfg, "variants": {n: VARIANTS[n] for n in names}, "seeds": seeds,
                   "args": vars(args), "command": " ".join(sys.argv)},
        "settings": {},
    }
    t_start = time.perf_counter()
    extra: dict[str, list[tuple[str, int]]] = {}
    for item in [x for x in args.extra_seeds.split(",") if x]:
        st, vs, sd = item.split(":")
        extra.setdefault(st, []).extend((v, int(sd)) for v in vs.split("+"))
    for setting in [s for s in args.settings.split(",") if s]:
        S = results["settings"].setdefault(setting, {"runs": {}})
        plan = [(n, seed) for seed in seeds for n in names] + extra.get(setting, [])
        for n, seed in plan:
            run_dir = Path(args.runs_dir) / f"{setting}_{n}_s{seed}"
            if not (args.reuse and (run_dir / "results.json").is_file()):
                t0 = time.perf_counter()
                run_recipe(Config(setting=setting, seed=seed, dump_dir=str(run_dir), resume=False,
                                  **{**base_cfg, **VARIANTS[n]}))
                print(f"{setting}/{n}/seed{seed}: {time.perf_counter() - t0:.0f}s", flush=True)
            res = json.loads((run_dir / "results.json").read_text())
            key = n if seed == seeds[0] else f"{n}_s{seed}"
            S["runs"][key] = {
                "seed": seed, "params": res["params"], "train_flops": res["train_flops"],
                "train_flops_per_token": res["train_flops_per_token"], "median_step_s_in_run": res["median_step_s"],
                "val": res["val"], "generation_accuracy": res.get("generation"),
                "captioning_accuracy": res.get("captioning"), "classifier_val_accuracy": res["classifier_val_accuracy"],
                "curve": eval_curve(run_dir), "curve_aux": eval_curve(run_dir, "aux") or None,
            }
            write_json(results, out_path)
        # figures against dense of the same seed
        runs = S["runs"]
        if "dense" in runs:
            figs: dict = {}
            for n, run in runs.items():
                dkey = "dense" if run["seed"] == seeds[0] else f"dense_s{run['seed']}"
                if n.startswith("dense") or dkey not in runs:
                    continue
                dense = runs[dkey]["curve"]
                final = {m: dense[-1][k] for m, k in LOSSES.items()}
                if dkey == "dense":
                    S["dense_final"] = final
                c = run["curve"]
                f = {}
                for m, k in LOSSES.items():
                    st = first_reach(c, k, final[m], "step")
                    fl = first_reach(c, k, final[m], "flops")
                    f[f"step_fraction_{m}"] = round(st / dense[-1]["step"], 3) if st is not None else None
                    f[f"flops_saving_{m}"] = round(dense[-1]["flops"] / fl, 3) if fl else None
                    f[f"final_{m}_vs_dense"] = round(c[-1][k] - final[m], 4)
                figs[n] = f
            for n in [k for k in figs if not re.search(r"_s\d+$", k)]:  # mean over seeds where there are several
                others = [figs[k] for k in figs if re.fullmatch(re.escape(n) + r"_s\d+", k)]
                if others:
                    allf = [figs[n], *others]
                    figs[n]["mean_over_seeds"] = {
                        k: (round(float(np.mean([f[k] for f in allf])), 3) if all(f[k] is not None for f in allf) else None)
                        for k in figs[n] if k.startswith(("step_fraction", "flops_saving"))}
                    figs[n]["n_seeds"] = len(allf)
            S["vs_dense"] = figs
        S["timing"] = timing_phase(setting, names, {k: v for k, v in base_cfg.items()}, args.timing_steps, args.timing_rounds)
        write_json(results, out_path)
        plot(results, out_path.with_suffix(".png"))

    # goals
    goals = {}
    for setting, S in results["settings"].items():
        vs = S.get("vs_dense", {})
        if "mot" in vs:
            per_seed = {f"seed{S['runs'][k]['seed']}": vs[k]["step_fraction_image"]
                        for k in vs if k == "mot" or re.fullmatch(r"mot_s\d+", k)}
            v = vs["mot"].get("mean_over_seeds", vs["mot"])["step_fraction_image"]
            goals[f"{setting}: MoT reaches dense's final image loss in <= 60% of the steps"] = {
                "measured": v, "per_seed": per_seed, "met": all(x is not None and x <= 0.6 for x in per_seed.values()),
                "note": "null = MoT never reached dense's final image loss within the run (same seed for both)"}
        best = None
        for n in ("moma_4t4i", "moma_2t2i", "moma_4t4i_mod"):
            if n in vs:
                v = vs[n]["flops_saving_total"]
                goals[f"{setting}: {n} saves >= 2x FLOPs over dense (total loss)"] = {"measured": v,
                                                                                       "met": v is not None and v >= 2.0}
                best = max(best or 0, v or 0)
        for n, r in S.get("timing", {}).get("ratio_to_dense", {}).items():
            if n != "dense":
                goals[f"{setting}: {n} wall-clock per step <= 1.3x dense"] = {"measured": r, "met": r <= 1.3}
    results["goals"] = goals
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_json(results, out_path)
    plot(results, out_path.with_suffix(".png"))
    print(json.dumps(goals, indent=1))


if __name__ == "__main__":
    main()
