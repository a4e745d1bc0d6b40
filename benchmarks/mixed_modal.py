"""Benchmark: dense vs Mixture-of-Transformers vs MoMa vs mixture-of-depths, after a gate on the dense baseline.

Issue 25.  Every run goes through the ``mixed-modal-pretrain`` recipe: captioned 8x8 digits in both
orders (training images drawn anew each time: random offsets of up to one pixel and an ink gain, so
nothing repeats within the budget; validation images are never augmented) with one- or two-word captions
("seven", "digit 7": 30-token sequences), AdamW with a cosine decay to zero.  Chameleon setting: d64 with
2 layers (measured first: 1.9x the tokens/s of 4 layers), 5,000 steps, one image token per 2x2 patch, the
nearest entry of a 256-entry k-means codebook (16 tokens per digit), half the pairs caption first, plus 10%
WikiText-2 text-only sequences.  Transfusion setting: 2x2 patches + DDPM, with what a small model needs to
follow its caption and to read its patches (measured, see ``gate_probe``): a learned position per patch,
v-prediction, 10% caption dropout and classifier-free guidance 5 at sampling, and the image-first
(captioning) pairs' images clean and out of the diffusion loss (with it, the diffusion loss of nearly
clean images drowns the caption's and captioning stays at chance).  Its dense gate needs a model that
plateaus within the budget: d48 with 2 layers, 8,000 steps at peak lr 1e-3, half the pairs caption
first, no text-only sequences (WikiText bytes kept the text loss falling 2-4% per fifth), and
evaluation, sampling and captioning with an EMA of the weights (0.999; the raw weights' image loss moves
by up to 4% from one evaluation to the next, which read as overfitting).  With a 10% learning-rate floor
its (d32) loss still fell 0.8-1.1% per fifth at 12,000 steps.  All variants have the same
shapes per token, so dense, MoT and MoMa cost the same FLOPs per token (MoMa adds routers).  Two runs
train at once, one thread each (``--workers``: 1.48x the throughput of one run on both cores).

1. ``candidates``: training tokens/s of dense candidates on this CPU (the testbed is sized from them).
2. Gate, per setting, on each dense seed: validation loss plateaued (less than 1% better over the last
   fifth of the run, read off a least-squares line through that fifth's evaluations; the two-point figure is
   recorded beside it as ``plateau_endpoints``), no overfitting (final validation loss within 2% of the run's own minimum), the
   judge classifies at least 60% of 100 images generated from captions correctly and at least 80% of the
   captions name the right digit.  The gate is recorded before any comparison.
3. MoT vs dense, both settings, 3 seeds each (a seed changes the initial weights and the batches):
   steps and wall-clock to reach dense's final image and text validation loss (same seed), mean and
   spread; wall-clock per step, variants interleaved step by step.  A run whose final loss sits more
   than 2% above its own minimum is flagged and gives no steps-to-match figure.  MoT and MoMa runs stop at
   the first evaluation that reaches all three of dense's final losses (``--stop-at-match 0``: full runs).
4. MoMa grid (Chameleon setting, as in the MoMa paper): 1t1i, 2t2i and 4t4i expert groups with and
   without MoD, one seed; the best configuration on 3 seeds.  Training FLOPs to reach dense's final
   loss; total and active parameters of each variant.
5. MoD at inference: a dense+MoD model trained with dense's training FLOPs (more steps, as in the MoD
   paper's isoFLOP comparison), evaluated with its causal auxiliary routers, whose skipped tokens
   skip the block: inference FLOPs per token (from the measured selected fraction) and wall-clock of
   a forward pass against dense, and the quality (validation loss) beside them.

Goals (``goals``): ``dense_plateau`` <= 0.01, ``dense_generation_gate`` >= 0.6,
``mot_image_steps_ratio_chameleon`` and ``mot_image_steps_ratio_transfusion`` <= 0.6 (mean of 3 seeds),
``moma_best_flops_saving`` >= 2, ``mod_inference_flops_saving`` >= 1.3 (at equal quality: MoD's
validation loss within 1% of dense's), ``mot_wall_per_step_ratio`` <= 1.3.

    python benchmarks/mixed_modal.py            # the default run (25 minutes on 2 cores)
    python benchmarks/mixed_modal.py --quick    # the same code, small and short (about 2 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _common import goal, machine, run_all, spread, write_json

from tessera.models.scoring import first_reach, plateau, plateau_endpoints

ROOT = Path(__file__).resolve().parents[1]

MOMA = {  # name -> recipe overrides
    "moma_1t1i": {"variant": "moma", "n_text_experts": 1, "n_image_experts": 1},
    "moma_2t2i": {"variant": "moma", "n_text_experts": 2, "n_image_experts": 2},
    "moma_4t4i": {"variant": "moma", "n_text_experts": 4, "n_image_experts": 4},
    "moma_1t1i_mod": {"variant": "moma_mod", "n_text_experts": 1, "n_image_experts": 1},
    "moma_2t2i_mod": {"variant": "moma_mod", "n_text_experts": 2, "n_image_experts": 2},
    "moma_4t4i_mod": {"variant": "moma_mod", "n_text_experts": 4, "n_image_experts": 4},
}
VARIANTS = {"dense": {"variant": "dense"}, "mot": {"variant": "mot"}, "dense_mod": {"variant": "dense_mod"}, **MOMA}
LOSSES = {"image": "val_image_loss", "text": "val_text_loss", "total": "val_model_loss"}
PLATEAU, OVERFIT, GEN_GATE, CAP_GATE = 0.01, 0.02, 0.6, 0.8
WALL_BUDGET_S = 1800  # the default run on this 2-core machine (issue 25)


# -- curves ----------------------------------------------------------------------------------------
def eval_curve(run_dir: Path, routing: str = "batch") -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in rows if r["kind"] == "eval" and r["routing"] == routing]


def overfit(curve: list[dict]) -> dict:
    """Final validation loss over the run's own minimum, per loss; ``flag`` when any is more than 2% above."""
    out = {}
    for m, k in LOSSES.items():
        lo = min(r[k] for r in curve[1:]) if len(curve) > 1 else curve[-1][k]
        out[m] = round(curve[-1][k] / lo - 1.0, 4) if lo > 0 else 0.0
    out["flag"] = any(v > OVERFIT for m, v in out.items() if m in LOSSES)
    return out


# -- parameters --------------------------------------------------------------------------------------
def param_counts(model_config: dict) -> dict:
    """Total parameters and the parameters one text token uses (an expert-choice token goes through one expert
    of its modality's group on average; MoT / MoMa: only its modality's modules)."""
    from tessera.models.blocks import _Experts
    from tessera.models.decoder import MixedModalTransformer
    from tessera.models.modality import PerModality

    from tessera.models.decoder import MixedModalConfig

    m = MixedModalTransformer(MixedModalConfig(**model_config))
    total = m.num_params()
    other = set()  # untied by modality: the other modality's copy (MoT) or expert group (MoMa)
    for mod in m.modules():
        if isinstance(mod, PerModality) and len(mod.mods) > 1:
            other |= {id(p) for p in mod.mods[1].parameters()}
    inactive = sum(p.numel() for p in m.parameters() if id(p) in other)
    for mod in m.modules():  # the token's own expert group: one expert of n
        if isinstance(mod, _Experts) and not any(id(p) in other for p in mod.parameters()):
            n = mod.w1.shape[0]
            inactive += sum(p.numel() for p in mod.parameters()) * (n - 1) // n
    return {"total": total, "active": total - inactive}


# -- running the recipe ------------------------------------------------------------------------------
def run_one(setting: str, name: str, seed: int, base: dict, runs_dir: Path, reuse: bool, **extra) -> dict:
    from tessera.recipes.mixed_modal_pretrain import Config, main as run_recipe

    tag = f"{setting}_{name}_s{seed}"
    run_dir = runs_dir / tag
    cfg = Config(setting=setting, seed=seed, dump_dir=str(run_dir), resume=False, **{**base, **VARIANTS[name], **extra})
    if not (reuse and (run_dir / "results.json").is_file()):
        # the judge depends on the seed, the training digits and its own settings only: trained by the first run of a
        # seed, copied into the others' dump dirs (the recipe loads a classifier it finds there)
        judge = runs_dir / f"judge_s{seed}_steps{cfg.classifier_steps}_shift{cfg.augment_shift}_{cfg.dataset}.safetensors"
        if judge.is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(judge, run_dir / "classifier.safetensors")
        t0 = time.perf_counter()
        run_recipe(cfg)
        print(f"{tag}: {time.perf_counter() - t0:.0f}s", flush=True)
        if not judge.is_file() and (run_dir / "classifier.safetensors").is_file():
            tmp = judge.with_suffix(f".{os.getpid()}.tmp")
            shutil.copyfile(run_dir / "classifier.safetensors", tmp)
            os.replace(tmp, judge)
    res = json.loads((run_dir / "results.json").read_text())
    curve = eval_curve(run_dir)
    gen, cap = res.get("generation") or {}, res.get("captioning") or {}
    causal = res.get("generation_routing_causal", "batch")
    return {
        "setting": setting, "variant": name, "seed": seed, "steps": res["steps"], "stopped_at_match": res.get("stopped_at_match"),
        "params": res["params"],
        "model_config": res["model_config"], "seq_len": res["data"]["seq_len"],
        "train_flops": res["train_flops"], "seconds_per_step": res["median_step_s"], "val": res["val"],
        "generation_accuracy": gen, "captioning_accuracy": cap, "generation_causal": gen.get(causal),
        "captioning_causal": cap.get(causal), "classifier_val_accuracy": res["classifier_val_accuracy"],
        "plateau": round(plateau(curve), 4), "plateau_endpoints": round(plateau_endpoints(curve), 4),
        "overfit": overfit(curve), "curve": curve,
        "curve_aux": eval_curve(run_dir, "aux") or None, "dir": str(run_dir),
    }


def vs_dense(run: dict, dense: dict) -> dict:
    """Steps, FLOPs and seconds ``run`` needs to reach ``dense``'s final validation losses (same seed)."""
    d, c = dense["curve"], run["curve"]
    out: dict = {"dense_seed": dense["seed"], "overfit": run["overfit"]["flag"] or dense["overfit"]["flag"]}
    sec = run["seconds_per_step"] or 0.0
    for m, k in LOSSES.items():
        target = d[-1][k]
        st = None if out["overfit"] else first_reach(c, k, target, "step")
        fl = None if out["overfit"] else first_reach(c, k, target, "flops")
        out[f"steps_ratio_{m}"] = round(st / d[-1]["step"], 4) if st is not None else None
        out[f"flops_saving_{m}"] = round(d[-1]["flops"] / fl, 4) if fl else None
        out[f"wall_ratio_{m}"] = (round(st * sec / (d[-1]["step"] * dense["seconds_per_step"]), 4)
                                  if st is not None and dense["seconds_per_step"] else None)
        out[f"final_{m}_minus_dense"] = round(c[-1][k] - target, 4)
    return out


def pick_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device in ("", "cuda") else device


def train_step(lm, opt, batch: dict, device: str) -> None:
    """One optimiser step as the recipe's loop takes it (bf16 autocast on CUDA), synchronised for timing."""
    from tessera.data.mixed_modal import batch_to

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        out = lm(batch_to(batch, device))
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- timing -------------------------------------------------------------------------------------------
def timing_phase(setting: str, names: list[str], base: dict, steps: int, rounds: int, device: str = "cpu") -> dict:
    """Median seconds per training step, variants interleaved step by step on the same batches."""
    from tessera.models.objectives import MixedModalLM
    from tessera.recipes.mixed_modal_pretrain import Config, build_data, model_config

    cfg = Config(setting=setting, **base)
    data, _, train_idx, _, _, _ = build_data(cfg)
    models, opts = {}, {}
    for n in names:
        c = Config(setting=setting, **{**base, **VARIANTS[n]})
        torch.manual_seed(0)
        models[n] = MixedModalLM(model_config(c, data.vocab.size, data.patch_dim, data.image_len), setting).to(device)
        opts[n] = torch.optim.AdamW(models[n].parameters(), lr=1e-3, fused=True)  # as the recipe
    times: dict[str, list[float]] = {n: [] for n in names}
    rng = np.random.default_rng(0)
    for r in range(rounds):
        for s in range(steps):
            batch = data.batch(cfg.batch_size, rng, train_idx)
            order = names[(r + s) % len(names):] + names[:(r + s) % len(names)]
            for n in order:
                t0 = time.perf_counter()
                train_step(models[n], opts[n], batch, device)
                if r > 0 or s >= 2:  # warm-up
                    times[n].append(time.perf_counter() - t0)
    med = {n: float(np.median(v)) for n, v in times.items()}
    return {"median_step_s": med, "ratio_to_dense": {n: round(med[n] / med["dense"], 3) for n in names}}


def candidates(specs: list[str], base: dict, per_setting: dict, steps: int = 8, device: str = "cpu") -> list[dict]:
    """Training tokens/s of dense ``D_MODELxLAYERS`` candidates in both settings."""
    from tessera.models.objectives import MixedModalLM
    from tessera.recipes.mixed_modal_pretrain import Config, build_data, model_config

    rows = []
    for setting in ("chameleon", "transfusion"):
        data, _, train_idx, _, _, _ = build_data(Config(setting=setting, **{**base, **per_setting[setting]}))
        for spec in specs:
            d, L = (int(v) for v in spec.split("x"))
            c = Config(setting=setting, **{**base, **per_setting[setting], "d_model": d, "n_layers": L,
                                                                          "n_heads": 2 if d < 48 else max(4, d // 32)})
            torch.manual_seed(0)
            lm = MixedModalLM(model_config(c, data.vocab.size, data.patch_dim, data.image_len), setting).to(device)
            opt = torch.optim.AdamW(lm.parameters(), lr=1e-3, fused=True)  # as the recipe
            rng = np.random.default_rng(0)
            ts = []
            for s in range(steps):
                batch = data.batch(c.batch_size, rng, train_idx)
                t0 = time.perf_counter()
                train_step(lm, opt, batch, device)
                if s >= 2:
                    ts.append(time.perf_counter() - t0)
            sec = float(np.median(ts))
            rows.append({"setting": setting, "model": spec, "params": lm.model.num_params(), "s_per_step": round(sec, 4),
                         "tokens_per_s": round(c.batch_size * data.seq_len / sec), "seq_len": data.seq_len})
            print(f"candidate {setting} {spec}: {sec * 1000:.0f} ms/step", flush=True)
    return rows


def mod_inference(setting: str, dense: dict, mod: dict, base: dict, n_batches: int = 8, repeats: int = 5,
                  device: str = "cpu") -> dict:
    """Inference of the MoD model with its causal routers (skipped tokens skip the block) against dense."""
    from tessera.models.decoder import MixedModalConfig
    from tessera.models.flops import forward_flops_per_token
    from tessera.models.modality import IMAGE, TEXT
    from tessera.models.objectives import MixedModalLM
    from tessera.models.scoring import validation_batches
    from tessera.recipes.mixed_modal_pretrain import Config, build_data
    from tessera.train import load_checkpoint

    data, val, _, val_idx, _, _ = build_data(Config(setting=setting, **base))
    batches = validation_batches(val, val_idx, base["batch_size"], n_batches)
    models = {}
    for key, run in (("dense", dense), ("mod", mod)):
        meta = json.loads((Path(run["dir"]) / "results.json").read_text())
        lm = MixedModalLM(MixedModalConfig(**meta["model_config"]), setting)
        load_checkpoint(Path(run["dir"]) / "checkpoint", lm, None, restore_rng=False)
        models[key] = lm.to(device).eval()
    fractions, times = [], {"dense": [], "mod": []}
    cuda = device.startswith("cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for r in range(repeats):
            for b in batches:
                b = {k: v.to(device) for k, v in b.items()}
                for key in (("dense", "mod") if r % 2 == 0 else ("mod", "dense")):
                    t0 = time.perf_counter()
                    out = models[key](b, routing="aux" if key == "mod" else "batch")
                    if cuda:
                        torch.cuda.synchronize()
                    if r > 0:
                        times[key].append(time.perf_counter() - t0)
                    if key == "mod" and r == 0:
                        fractions.append(float(out["mod_selected_fraction"]))
    frac = float(np.mean(fractions))
    mcfg, dcfg = models["mod"].cfg, models["dense"].cfg
    T = data.seq_len
    n_img = sum(int((b["modality"] == IMAGE).sum()) for b in batches)  # (CPU copies)
    n_all = sum(b["modality"].numel() for b in batches)

    def per_token(cfg):
        return ((n_all - n_img) * forward_flops_per_token(cfg, T, TEXT, setting)
                + n_img * forward_flops_per_token(cfg, T, IMAGE, setting)) / n_all

    f_dense, f_mod = per_token(dcfg), per_token(replace(mcfg, mod_capacity=frac))
    d_loss = dense["val"]["batch"]["val_model_loss"]
    m_loss = mod["val"]["aux"]["val_model_loss"]
    return {"selected_fraction_aux": round(frac, 4), "trained_capacity": mcfg.mod_capacity,
            "forward_flops_per_token": {"dense": f_dense, "mod": f_mod}, "flops_saving": round(f_dense / f_mod, 4),
            "forward_s_per_batch": {k: float(np.median(v)) for k, v in times.items()},
            "wall_saving": round(float(np.median(times["dense"])) / float(np.median(times["mod"])), 4),
            "val_model_loss": {"dense": d_loss, "mod_causal": m_loss, "mod_batch": mod["val"]["batch"]["val_model_loss"]},
            "relative_loss_gap": round(m_loss / d_loss - 1.0, 4),
            "equal_quality": bool(m_loss <= d_loss * 1.01),
            "mod_steps": mod["steps"], "dense_steps": dense["steps"],
            "train_flops": {"dense": dense["train_flops"], "mod": mod["train_flops"]}}


# -- plots ----------------------------------------------------------------------------------------------
def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tessera.config import atomic_savefig

    settings = list(results["settings"])
    fig, axes = plt.subplots(len(settings), 3, figsize=(16, 4.2 * len(settings)), squeeze=False)
    for i, s in enumerate(settings):
        runs = results["settings"][s]["runs"]
        for j, (mod, key, x) in enumerate((("image", "val_image_loss", "step"), ("text", "val_text_loss", "step"),
                                           ("image", "val_image_loss", "flops"))):
            ax = axes[i][j]
            for name, run in runs.items():
                c = run["curve"]
                xs = [r[x] / (1e12 if x == "flops" else 1) for r in c[1:]]
                ax.plot(xs, [r[key] for r in c[1:]], label=name, lw=1.6 if run["variant"] == "dense" else 1.0,
                        color="black" if run["variant"] == "dense" else None, alpha=0.9)
            gate = results["settings"][s].get("gate", {})
            if gate and x == "step":
                d = runs.get("dense_s0")
                if d:
                    ax.axvline(0.8 * d["steps"], color="grey", ls=":", lw=1)
                    ax.axhline(d["curve"][-1][key], color="grey", ls="--", lw=1)
                    ax.text(0.8 * d["steps"], ax.get_ylim()[1], " plateau window" + (" (gate passed)" if gate.get("passed") else
                                                                                     " (gate FAILED)"), fontsize=7, va="top")
            ax.set_title(f"{s}: validation {mod} loss" + (" (DDPM MSE)" if s == "transfusion" and mod == "image" else "")
                         + (" vs FLOPs" if x == "flops" else ""))
            ax.set_xlabel("training FLOPs (TFLOP)" if x == "flops" else "step")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=90)


def sample_grid(results: dict, path: Path) -> None:
    """Each seed-0 run's generated digits (the recipe's samples.png), one panel per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tessera.config import atomic_savefig

    panels = [(s, n, r) for s, S in results["settings"].items() for n, r in S["runs"].items()
              if r["seed"] == 0 and (Path(r["dir"]) / "samples.png").is_file()]
    if not panels:
        return
    cols = 4
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (s, n, r) in zip(axes.flat, panels):
        ax.imshow(plt.imread(Path(r["dir"]) / "samples.png"))
        ax.set_title(f"{s} / {n}: judge {r['generation_causal']}", fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)


def goals(results: dict, moma_setting: str) -> dict:
    """The issue's goals from the recorded figures (``measured`` null where a run never got there)."""
    sets = results["settings"]

    def goal(target, measured, better="low", **extra):
        met = measured is not None and (measured <= target if better == "low" else measured >= target)
        return {"target": target, "measured": measured, "met": bool(met), **extra}

    gates = {s: S["gate"] for s, S in sets.items() if "gate" in S}
    out = {
        "dense_plateau": goal(PLATEAU, max((v for g in gates.values() for v in g["plateau"]["values"]), default=None),
                              note="the largest relative validation-loss improvement over the last fifth among dense runs"),
        "dense_generation_gate": goal(GEN_GATE, min((v for g in gates.values() for v in g["generation"]["values"]),
                                                    default=None), "high",
                                      note="the lowest judge accuracy on dense's generated images among settings and seeds"),
    }
    for s in ("chameleon", "transfusion"):
        m = sets.get(s, {}).get("mot_vs_dense")
        out[f"mot_image_steps_ratio_{s}"] = goal(0.6, m["steps_ratio_image"]["mean"] if m else None,
                                                 per_seed=m["steps_ratio_image"]["values"] if m else None,
                                                 gate_passed=sets.get(s, {}).get("gate", {}).get("passed"),
                                                 note="null: some seed never reached dense's final image loss, or overfit")
    mb = sets.get(moma_setting, {}).get("moma_best")
    out["moma_best_flops_saving"] = goal(2.0, mb["flops_saving_total"]["mean"] if mb else None, "high",
                                         variant=mb["variant"] if mb else None,
                                         per_seed=mb["flops_saving_total"]["values"] if mb else None)
    mi = sets.get(moma_setting, {}).get("mod_inference")
    out["mod_inference_flops_saving"] = goal(1.3, mi["flops_saving"] if mi else None, "high",
                                             equal_quality=mi["equal_quality"] if mi else None,
                                             relative_loss_gap=mi["relative_loss_gap"] if mi else None)
    if mi and not mi["equal_quality"]:
        out["mod_inference_flops_saving"]["met"] = False
        out["mod_inference_flops_saving"]["note"] = "not at equal quality: MoD's causal validation loss is more than 1% above dense's"
    out["mot_wall_per_step_ratio"] = wall_goal(sets)
    return out


def wall_goal(sets: dict) -> dict:
    """``mot_wall_per_step_ratio``: MoT's wall-clock per step over dense's, the larger of the settings timed."""
    walls = {s: S["timing"]["ratio_to_dense"]["mot"] for s, S in sets.items() if "timing" in S}
    return {**goal(1.3, max(walls.values()) if walls else None, higher_is_better=False), "per_setting": walls,
            "note": "the larger of the two settings"}


def retime(out_path: Path, args, device: str) -> None:
    """``--retime``: the timing phase again on the recorded run's config; the recording's timing and its
    ``mot_wall_per_step_ratio`` goal are replaced, the previous figures kept under ``timing_rerun``."""
    import subprocess

    if not out_path.is_file():
        print(f"error: --retime needs a recorded run at {out_path}; run the benchmark first", file=sys.stderr)
        sys.exit(2)
    rec = json.loads(out_path.read_text())
    cfg = rec["config"]
    t0 = time.perf_counter()
    before = {s: S.get("timing") for s, S in rec["settings"].items()}
    for setting, S in rec["settings"].items():
        if "timing" in S:
            base = {**cfg["base"], **cfg["per_setting"][setting], "threads": args.threads}
            S["timing"] = timing_phase(setting, ["dense", "mot"], base, args.timing_steps, args.timing_rounds, device)
            print(f"{setting}: MoT / dense wall per step {S['timing']['ratio_to_dense']['mot']} "
                  f"(was {before[setting]['ratio_to_dense']['mot']})", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rec["goals"]["mot_wall_per_step_ratio"] = wall_goal(rec["settings"])
    rec["timing_rerun"] = {"command": " ".join(sys.argv), "commit": commit, "date": time.strftime("%Y-%m-%d"),
                           "machine": machine(), "seconds": round(time.perf_counter() - t0, 1),
                           "timing_before": before, "note": "only the timing phase was rerun; "
                           "every other figure is the recorded run's"}
    from tessera.config import atomic_write_text

    atomic_write_text(out_path, json.dumps(rec, indent=1) + "\n")  # the recording's own layout: a small diff


# -- main ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small and short: the same code path in about 2 minutes")
    ap.add_argument("--smoke", action="store_true", help="tiny and very short (one seed, about a minute): checks the path, "
                    "measures nothing (benchmarks/gpu/mixed_modal.sh --smoke; tested)")
    ap.add_argument("--probe", action="store_true",
                    help="only the gate's probe: dense, seed 0, each setting, --steps steps; merged into --out as "
                         "gate_probe (sizes the default run: does dense reach the gate, and when does it plateau?)")
    ap.add_argument("--retime", action="store_true",
                    help="only the timing phase, on the config recorded in --out: replaces each setting's timing and the "
                         "mot_wall_per_step_ratio goal there (the rest of the recording stands) and records it as timing_rerun "
                         "(a minute: for a change that only affects speed)")
    ap.add_argument("--device", default="", help="'' = CUDA when present (bf16 autocast), else CPU")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--caption-first", type=float, default=0.5,
                    help="share of image-caption pairs in generation order (caption first); the rest teach captioning")
    ap.add_argument("--captions", default="short", choices=("sentences", "short"),
                    help="caption templates: sentences (46-token sequences) or one or two words (30 tokens, 1.5x faster)")
    ap.add_argument("--text-fraction", type=float, default=0.1, help="share of text-only (WikiText-2) sequences")
    ap.add_argument("--sample-per-class", type=int, default=10,
                    help="images generated per digit for the generation gate (100 in all; at 4 a digit, 40 images, one seed "
                         "read 0.575 where 200 draws from the same model read 0.65-0.68)")
    ap.add_argument("--caption-eval", type=int, default=300,
                    help="validation images captioned (all 300: at 100 one reading moves by about 4 points, the binomial spread)")
    ap.add_argument("--sample-steps", type=int, default=50, help="DDPM sampling steps for generation accuracy")
    ap.add_argument("--classifier-steps", type=int, default=800)
    ap.add_argument("--steps", type=int, default=5000,
                    help="training steps (Chameleon setting; cosine to zero: with a 10%% floor 6,000 steps were needed)")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (Chameleon setting)")
    ap.add_argument("--digit-tokens", default="patches", choices=("patches", "pixels"),
                    help="Chameleon image tokens: 16 codes of 2x2 patches (k-means codebook) or the 64 pixel values")
    ap.add_argument("--digit-codes", type=int, default=256, help="Chameleon patches: entries of the k-means codebook")
    ap.add_argument("--min-lr-ratio", type=float, default=0.0,
                    help="final learning rate over the peak (cosine decay; 0.1 kept the d32 Transfusion loss falling "
                         "0.8-1.1%% per fifth even at 12,000 steps)")
    ap.add_argument("--ema", type=float, default=0.0,
                    help="the Chameleon setting's weight EMA for evaluation and sampling (0 = raw weights)")
    ap.add_argument("--d-model-transfusion", type=int, default=48,
                    help="the Transfusion setting's d_model (d64: 1.3x the step time; d32 captioned 0.73-0.90)")
    ap.add_argument("--heads-transfusion", type=int, default=4, help="the Transfusion setting's attention heads")
    ap.add_argument("--steps-transfusion", type=int, default=8000, help="the Transfusion setting's --steps (0: the same)")
    ap.add_argument("--lr-transfusion", type=float, default=1e-3,
                    help="the Transfusion setting's peak learning rate (2e-3 and 4e-3 fell faster at the end: 1.0-1.6%% per fifth)")
    ap.add_argument("--min-lr-ratio-transfusion", type=float, default=None,
                    help="the Transfusion setting's --min-lr-ratio (default: the same)")
    ap.add_argument("--caption-first-transfusion", type=float, default=0.5,
                    help="the Transfusion setting's --caption-first (0.4: generation 0.47 on one seed)")
    ap.add_argument("--text-fraction-transfusion", type=float, default=0.0,
                    help="the Transfusion setting's --text-fraction (WikiText bytes kept its text loss falling 2-4%% per fifth)")
    ap.add_argument("--ema-transfusion", type=float, default=0.999,
                    help="the Transfusion setting's weight EMA for evaluation and sampling (0 = raw weights, which move by "
                         "up to 4%% of the image loss between evaluations)")
    ap.add_argument("--prediction-type", default="v_prediction", choices=("epsilon", "v_prediction"), help="Transfusion: epsilon (the paper) or v_prediction")
    ap.add_argument("--cond-dropout", type=float, default=0.1, help="Transfusion: captions dropped for classifier-free guidance")
    ap.add_argument("--diffusion-lambda", type=float, default=5.0, help="Transfusion: weight of the diffusion loss (paper: 5)")
    ap.add_argument("--snr-gamma", type=float, default=0.0, help="Transfusion: diffusion-loss weight min(1, gamma / SNR), Min-SNR clipping of low-noise steps (0 = off)")
    ap.add_argument("--understanding-max-t", type=int, default=1, help="Transfusion: noise cap of image-first pairs' images")
    ap.add_argument("--understanding-diffusion", type=int, default=0, choices=(0, 1),
                    help="Transfusion: 1 = image-first pairs' images also get the diffusion loss (the paper), 0 = they only condition the caption")
    ap.add_argument("--guidance", type=float, default=5.0, help="Transfusion: classifier-free guidance scale for generation")
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--eval-batches", type=int, default=12, help="validation batches per evaluation (more = a smoother curve)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--settings", default="chameleon,transfusion")
    ap.add_argument("--moma-setting", default="chameleon")
    ap.add_argument("--candidates", default="32x2,48x2,64x2,64x4,128x2", help="dense candidates D_MODELxLAYERS ('' to skip)")
    ap.add_argument("--phases", default="mot,moma,timing",
                    help="what follows the gate: mot (MoT vs dense, every setting), moma (grid, best, MoD inference), timing")
    ap.add_argument("--stop-at-match", type=int, default=1, choices=(0, 1),
                    help="1 = MoT and MoMa runs stop at the first evaluation that reaches all of the same seed's dense final "
                         "validation losses (all the steps-to-match figures need; their final-loss figures are then at the match); "
                         "0 = every run goes the full --steps")
    ap.add_argument("--timing-steps", type=int, default=20)
    ap.add_argument("--timing-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0,
                    help="runs trained at once, in separate processes sharing --threads (0 = 2 on CPU, 1 on CUDA)")
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-mixed-modal"))
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs (results.json) in --runs-dir")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mixed_modal.json"))
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.eval_every, args.seeds, args.candidates, args.d_model, args.layers = 12, 6, "0", "", 32, 2
        args.steps_transfusion, args.d_model_transfusion, args.heads_transfusion = 12, 32, 2
        args.batch_size, args.sample_per_class, args.caption_eval, args.sample_steps, args.classifier_steps = 8, 1, 10, 4, 30
        args.timing_steps, args.timing_rounds = 3, 1
        if args.out == ap.get_default("out"):
            args.out = str(Path(args.runs_dir) / "mixed_modal_smoke.json")
        args.runs_dir = str(Path(args.runs_dir) / "smoke")
    if args.quick:
        args.steps, args.steps_transfusion, args.eval_every, args.seeds, args.candidates = 120, 120, 30, "0,1", "64x2"
        args.timing_steps, args.timing_rounds = 4, 1
        if args.out == ap.get_default("out"):
            args.out = str(Path(args.runs_dir) / "mixed_modal_quick.json")
        args.runs_dir = str(Path(args.runs_dir) / "quick")
    torch.set_num_threads(args.threads)
    os.environ["TESSERA_QUIET"] = "1"
    import diffusers

    from tessera import __version__
    from tessera.models.flops import forward_flops_per_token
    from tessera.recipes.mixed_modal_pretrain import Config, model_config

    out_path, runs_dir = Path(args.out), Path(args.runs_dir)
    phases = {p for p in args.phases.split(",") if p}
    if not phases <= {"mot", "moma", "timing"}:
        print(f"error: unknown --phases {args.phases!r}; use a comma list of mot, moma, timing", file=sys.stderr)
        sys.exit(2)
    dev = pick_device(args.device)
    if args.workers <= 0:
        args.workers = 1 if dev.startswith("cuda") or args.threads < 2 else 2

    def warmup(steps: int) -> int:
        return min(max(20, steps // 50), steps // 4)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    base = dict(dataset="digits", d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, steps=args.steps,
                batch_size=args.batch_size, eval_every=args.eval_every, eval_batches=args.eval_batches, ckpt_every=10**9, log_every=50,
                sample_per_class=args.sample_per_class, n_caption_eval=args.caption_eval, sample_steps=args.sample_steps,
                classifier_steps=args.classifier_steps, lr=args.lr, warmup_steps=warmup(args.steps),
                augment_shift=1, augment_gain=0.3, caption_first=args.caption_first, captions=args.captions,
                text_fraction=args.text_fraction, threads=args.threads,
                device=args.device, distributed="none")
    # the Transfusion setting's own optimisation and sampling (see the module docstring)
    tf_steps = args.steps_transfusion or args.steps
    per_setting = {
        "chameleon": {"digit_tokens": args.digit_tokens, "digit_codes": args.digit_codes, "ema_decay": args.ema,
                      "min_lr_ratio": args.min_lr_ratio},
        "transfusion": {"d_model": args.d_model_transfusion, "n_heads": args.heads_transfusion,
                        "text_fraction": args.text_fraction_transfusion, "ema_decay": args.ema_transfusion,
                        "steps": tf_steps, "warmup_steps": warmup(tf_steps), "lr": args.lr_transfusion,
                        "min_lr_ratio": (args.min_lr_ratio if args.min_lr_ratio_transfusion is None
                                         else args.min_lr_ratio_transfusion),
                        "caption_first": args.caption_first_transfusion, "prediction_type": args.prediction_type,
                        "cond_dropout": args.cond_dropout, "guidance_scale": args.guidance,
                        "diffusion_lambda": args.diffusion_lambda, "snr_gamma": args.snr_gamma,
                        "understanding_max_t": args.understanding_max_t,
                        "understanding_diffusion": bool(args.understanding_diffusion)}}
    results: dict = {
        "benchmark": "mixed_modal", "machine": {**machine(), "device": dev,
                                                "gpu": torch.cuda.get_device_name(0) if dev.startswith("cuda") else None},
        "versions": {"tessera": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        "config": {"base": base, "per_setting": per_setting, "variants": VARIANTS, "seeds": seeds, "args": vars(args), "command": " ".join(sys.argv)},
        "gate_rule": {"plateau_max": PLATEAU, "overfit_max": OVERFIT, "generation_min": GEN_GATE, "captioning_min": CAP_GATE},
        "settings": {},
    }
    t_start = time.perf_counter()
    if args.retime:
        retime(out_path, args, dev)
        return
    if args.probe:
        old = json.loads(out_path.read_text()) if out_path.is_file() else {}
        for setting in [s for s in args.settings.split(",") if s]:
            sbase = {**base, **per_setting[setting]}
            t0 = time.perf_counter()
            run = run_one(setting, "dense", seeds[0], sbase, runs_dir, args.reuse)
            probe = {
                "plateau": run["plateau"], "overfit": run["overfit"], "generation": run["generation_causal"],
                "captioning": run["captioning_causal"], "seconds_per_step": run["seconds_per_step"],
                "seconds": round(time.perf_counter() - t0, 1), "params": run["params"],
                "classifier_val_accuracy": run["classifier_val_accuracy"],
                "gate_passed": bool(run["plateau"] <= PLATEAU and not run["overfit"]["flag"]
                                    and (run["generation_causal"] or 0) >= GEN_GATE and (run["captioning_causal"] or 0) >= CAP_GATE)}
            print(f"probe {setting}: " + json.dumps(probe), flush=True)
            key = (f"{setting}_{sbase['d_model']}x{args.layers}_steps{sbase['steps']}_capfirst{sbase['caption_first']:g}_{args.captions}"
                   f"_text{sbase['text_fraction']:g}")
            key += ((f"_{args.prediction_type}_lr{args.lr_transfusion:g}_lambda{args.diffusion_lambda:g}_cfg{args.guidance:g}"
                     f"_umaxt{args.understanding_max_t}_udiff{args.understanding_diffusion}")
                    if setting == "transfusion" else f"_{args.digit_tokens}{args.digit_codes}_lr{args.lr:g}")
            defaults = {"ema": 0.0, "minlr": 0.1, "snr": ap.get_default("snr_gamma"), "batch": ap.get_default("batch_size"),
                        "evalbatches": ap.get_default("eval_batches"), "samplesperclass": ap.get_default("sample_per_class"),
                        "seed": 0}
            values = {"ema": sbase.get("ema_decay", 0.0), "minlr": sbase.get("min_lr_ratio", 0.1), "snr": args.snr_gamma if setting == "transfusion" else defaults["snr"],
                      "batch": args.batch_size,
                      "evalbatches": args.eval_batches, "samplesperclass": args.sample_per_class, "seed": seeds[0]}
            key += "".join(f"_{k}{v:g}" for k, v in values.items() if v != defaults[k])
            old.setdefault("gate_probe", {})[key] = {**probe, "machine": results["machine"], "config": sbase,
                                                     "command": " ".join(sys.argv), "curve": run["curve"]}
            write_json(old, out_path)
        return
    if out_path.is_file():  # gate probes recorded earlier (--probe) stay with the results
        probes = json.loads(out_path.read_text()).get("gate_probe")
        if probes:
            results["gate_probe"] = probes
    if args.candidates:
        results["candidates"] = candidates(args.candidates.split(","), {**base, "steps": 10}, per_setting, device=dev)
        write_json(results, out_path)

    settings = [s for s in args.settings.split(",") if s]
    bases = {s: {**base, **per_setting[s]} for s in settings}
    if args.workers > 1:  # each run on its share of the threads
        bases = {s: {**b, "threads": max(1, args.threads // args.workers)} for s, b in bases.items()}
    for s in settings:
        results["settings"][s] = {"runs": {}}

    def done(key: str, run: dict) -> None:  # record each run as it finishes ("mot_s0|chameleon" -> runs["mot_s0"])
        results["settings"][run["setting"]]["runs"][key.split("|")[0]] = run
        write_json(results, out_path)

    def job(setting: str, name: str, seed: int, **over) -> tuple:
        return (setting, name, seed, {**bases[setting], **over}, runs_dir, args.reuse)

    def until_match(setting: str, seed: int) -> dict:
        """Stop targets: the same seed's dense final validation losses (--stop-at-match)."""
        if not args.stop_at_match:
            return {}
        last = dense[setting][seed]["curve"][-1]
        return {"stop_text_loss": last["val_text_loss"], "stop_image_loss": last["val_image_loss"],
                "stop_model_loss": last["val_model_loss"]}

    # 1. the gate: dense, every setting and seed
    run_all(run_one, {f"dense_s{seed}|{s}": job(s, "dense", seed) for s in settings for seed in seeds}, args.workers, done)
    dense = {}
    for setting in settings:
        S = results["settings"][setting]
        dense[setting] = d = {seed: S["runs"][f"dense_s{seed}"] for seed in seeds}
        gen, cap, plats = ([r[k] for r in d.values()] for k in ("generation_causal", "captioning_causal", "plateau"))
        S["gate"] = {"plateau": spread(plats), "plateau_endpoints": spread([r["plateau_endpoints"] for r in d.values()]),
                     "generation": spread(gen), "captioning": spread(cap),
                     "overfit": {f"seed{s}": r["overfit"] for s, r in d.items()},
                     "passed": bool(max(plats) <= PLATEAU and min(gen) >= GEN_GATE and min(cap) >= CAP_GATE
                                    and not any(r["overfit"]["flag"] for r in d.values()))}
        print(f"{setting} gate: {json.dumps({k: v for k, v in S['gate'].items() if k != 'overfit'})}", flush=True)
    write_json(results, out_path)
    # 2. MoT (every setting and seed), the MoMa grid (one setting, first seed) and then MoMa's best configuration
    # on the other seeds, all in one pool: the best configuration's runs are queued as soon as the grid is done
    moma = args.moma_setting in settings and "moma" in phases
    jobs: dict[str, tuple] = {}  # the longest first (MoD, the grid), so that the two workers finish together
    if moma:  # MoD with dense's training FLOPs (more steps), for its inference measurement below
        setting = args.moma_setting
        dcfg = model_config(Config(setting=setting, **bases[setting]), 1, 0)
        T = dense[setting][seeds[0]]["seq_len"]
        mod_ratio = forward_flops_per_token(dcfg, T) / forward_flops_per_token(replace(dcfg, variant="dense_mod"), T)
        jobs[f"dense_mod_s{seeds[0]}|{setting}"] = job(setting, "dense_mod", seeds[0],
                                                       steps=int(round(bases[setting]["steps"] * mod_ratio)))
        jobs.update({f"{name}_s{seeds[0]}|{setting}": job(setting, name, seeds[0], **until_match(setting, seeds[0]))
                     for name in MOMA})
    if "mot" in phases:
        jobs.update({f"mot_s{seed}|{s}": job(s, "mot", seed, **until_match(s, seed)) for s in settings for seed in seeds})
    grid: dict = {}

    def done_then_best(key: str, run: dict) -> dict:
        """Records ``run``; once the last grid run is in, the best configuration's runs on the other seeds."""
        done(key, run)
        if not moma or run["setting"] != args.moma_setting or key.split("|")[0] not in {f"{n}_s{seeds[0]}" for n in MOMA}:
            return {}
        S, d0 = results["settings"][args.moma_setting], dense[args.moma_setting][seeds[0]]
        name = key.split("|")[0].rsplit("_s", 1)[0]
        grid[name] = {**vs_dense(run, d0), "params": param_counts(run["model_config"]),
                      "generation": run["generation_causal"], "captioning": run["captioning_causal"]}
        if len(grid) < len(MOMA):
            return {}
        S["moma_grid"] = {n: grid[n] for n in MOMA}
        best = max(MOMA, key=lambda n: (grid[n]["flops_saving_total"] or 0.0, -grid[n]["final_total_minus_dense"]))  # ties: MOMA's order
        S["moma_best"] = {"variant": best}
        return {f"{best}_s{seed}|{args.moma_setting}": job(args.moma_setting, best, seed, **until_match(args.moma_setting, seed))
                for seed in seeds[1:]}

    run_all(run_one, jobs, args.workers, done_then_best)
    if "mot" in phases:
        for setting in settings:
            S = results["settings"][setting]
            mot = [vs_dense(S["runs"][f"mot_s{s}"], dense[setting][s]) for s in seeds]
            S["mot_vs_dense"] = {"per_seed": mot, **{k: spread([m[k] for m in mot]) for k in mot[0]
                                                     if k.startswith(("steps_ratio", "wall_ratio", "final_"))}}
    # 3. MoMa's best configuration on every seed; MoD at inference, with its causal routers
    if moma:
        setting = args.moma_setting
        S, d0 = results["settings"][setting], dense[setting][seeds[0]]
        best = S["moma_best"]["variant"]
        per = [vs_dense(S["runs"][f"{best}_s{s}"], dense[setting][s]) for s in seeds]
        S["moma_best"] = {"variant": best, "per_seed": per,
                          **{k: spread([m[k] for m in per]) for k in per[0] if k.startswith(("flops_saving", "final_"))}}
        S["mod_inference"] = {"steps_scale_for_equal_training_flops": round(mod_ratio, 4),
                              **mod_inference(setting, d0, S["runs"][f"dense_mod_s{seeds[0]}"], bases[setting], device=dev)}
        write_json(results, out_path)
    # 4. wall-clock per step, variants interleaved on the same batches (this process, all its threads)
    for setting in settings:
        if "timing" in phases:
            results["settings"][setting]["timing"] = timing_phase(setting, ["dense", "mot"], {**bases[setting], "threads": args.threads},
                                                                  args.timing_steps, args.timing_rounds, dev)
        write_json(results, out_path)
        plot(results, out_path.with_suffix(".png"))
    results["goals"] = goals(results, args.moma_setting)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    if not (args.quick or args.smoke):  # the budget is the default run's
        results["wall_budget"] = {"target_s": WALL_BUDGET_S, "measured_s": results["wall_s"],
                                  "met": results["wall_s"] <= WALL_BUDGET_S, "note": "the default run's budget on this 2-core machine"}
    results["machine"]["load_average_at_end"] = os.getloadavg()
    write_json(results, out_path)
    plot(results, out_path.with_suffix(".png"))
    sample_grid(results, out_path.with_name(out_path.stem + "_samples.png"))
    print(json.dumps(results["goals"], indent=1))


if __name__ == "__main__":
    main()
