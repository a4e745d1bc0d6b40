"""Benchmark: LMFusion (frozen text LLM + image modules) vs (a) the same model unfrozen and (b) a
Transfusion-style model of the same image-module size trained from scratch, at equal training FLOPs.

Base LLM: the embedded SmolLM2-135M truncated to its first ``--layers`` layers (4 by default, sized for a
2-core CPU; 2 layers learn to read digits several times slower; the text side is the truncated model, so
"text perplexity unchanged" is checked against the same truncation, and again at the full 30 layers).
Data: scikit-learn 8x8 digits with the mixed-modal template captions, 2x2 patches (16 per image), caption
first for ``--caption-first`` of the pairs (0.5 here, Transfusion's 0.8 in the recipe: both directions
are scored), 10% caption dropout.

- LMFusion and (a) run through the ``lmfusion-train`` recipe (``freeze_text=true|false``), (b) through
  ``mixed-modal-pretrain`` (setting transfusion, variant dense, d_model = SmolLM2's 576, the same
  number of layers, SwiGLU hidden 1536, byte vocabulary, 25% WikiText-2 text-only sequences because a
  from-scratch model must learn its language too).
- Equal training FLOPs: each model's FLOPs per step are measured first (``FlopMeter``: matrix products
  that forward and backward really run - frozen modules cost no weight gradients); LMFusion runs
  ``--steps`` steps and the peers get the step count that spends the same FLOPs.
- Caption use: validation noise-prediction MSE of caption-first sequences at t = 200/500/800 with the
  right caption, a wrong one and none (the same images and noise), so a weak text-to-image link shows
  up as a ratio near 1 whatever the sampler does; generation accuracy at guidance 1/3/5/8.
- Figures: WikiText-2 test perplexity of the text side (fresh base, LMFusion, (a); bits per byte for
  all three and (b)), conditional generation accuracy (digit CNN judge; with and without
  classifier-free guidance for the LMFusion-style models; (b) has no caption dropout, so no guidance),
  understanding accuracy (greedy caption names the digit), measured training FLOPs, trainable
  parameters, validation image loss against FLOPs, and the FLOPs LMFusion needs to reach (a)'s final
  validation image loss.

Goals (issue 8): text perplexity unchanged (bit-identical logits); generation >= 90% and understanding
>= 95%; LMFusion reaches (a)'s image quality with at most half of (a)'s training FLOPs.

    nice -n 5 .venv/bin/python benchmarks/lmfusion.py [--layers 4] [--steps 2500] [--threads 2]   # ~50 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import machine, write_json

ROOT = Path(__file__).resolve().parents[1]


def curve(run_dir: Path, key: str = "val_image_loss", routing: str | None = None) -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [{"step": r["step"], "flops": r["flops"], key: r[key]} for r in rows
            if r["kind"] == "eval" and (routing is None or r.get("routing", routing) == routing)]


def flops_to_reach(rows: list[dict], target: float, key: str = "val_image_loss") -> float | None:
    """FLOPs at which a curve first reaches ``target`` (linear interpolation between evaluations)."""
    for prev, cur in zip(rows, rows[1:]):
        if cur[key] <= target:
            if prev[key] <= target:
                return prev["flops"]
            w = (prev[key] - target) / max(prev[key] - cur[key], 1e-12)
            return prev["flops"] + w * (cur["flops"] - prev["flops"])
    return None


def record_wall(run_dir: Path, seconds: float) -> None:
    """Keep a run's wall time beside it, so a ``--reuse`` invocation still reports what training took."""
    (run_dir / "bench_wall_s.json").write_text(json.dumps({"seconds": round(seconds, 1)}))
    print(f"{run_dir.name}: {seconds:.0f}s", flush=True)


def read_wall(run_dir: Path) -> float | None:
    p = run_dir / "bench_wall_s.json"
    return json.loads(p.read_text())["seconds"] if p.is_file() else None


# -- per-step FLOPs ------------------------------------------------------------------------------

def lmfusion_step_flops(cfg, n: int = 3) -> float:
    from tessera.models.lmfusion_objective import FlopMeter
    from tessera.recipes.lmfusion_train import build

    model, objective, _, train, _, train_idx, _ = build(cfg, "cpu")
    total = 0
    for s in range(n):
        batch = train.batch(cfg.batch_size, np.random.default_rng([cfg.seed, 0, s]), train_idx)
        with FlopMeter() as fm:
            objective(batch)["loss"].backward()
        total += fm.total
    return total / n


def transfusion_step_flops(tcfg, n: int = 3) -> tuple[float, float]:
    """Measured and analytic (the mixed-modal recipe's count) FLOPs per step of (b)."""
    from tessera.models.flops import batch_train_flops
    from tessera.models.lmfusion_objective import FlopMeter
    from tessera.models.objectives import MixedModalLM
    from tessera.recipes.mixed_modal_pretrain import build_data, model_config

    train, _, train_idx, _, _, _ = build_data(tcfg)
    lm = MixedModalLM(model_config(tcfg, train.vocab.size, train.patch_dim, train.image_len), "transfusion",
                      diffusion_lambda=tcfg.diffusion_lambda)
    measured, analytic = 0, 0.0
    for s in range(n):
        batch = train.batch(tcfg.batch_size, np.random.default_rng([tcfg.seed, 0, s]), train_idx)
        with FlopMeter() as fm:
            lm(batch)["loss"].backward()
        measured += fm.total
        analytic += batch_train_flops(lm.cfg, batch["modality"], "transfusion")
    return measured / n, analytic / n


# -- text side -----------------------------------------------------------------------------------

def wikitext_test_text() -> tuple[str, str]:
    from tessera.data.paths import shared_data_dir
    from tessera.data.text import read_wikitext

    root = shared_data_dir()
    for name in ("wiki.test.raw", "test.txt"):
        p = root / "wikitext2" / name if root else None
        if p is not None and p.is_file():
            return "\n\n".join(f"= {d.title} =\n{d.text}" for d in read_wikitext(p)), str(p)
    raise SystemExit("../shared/data/wikitext2 not found: the text-side figures need WikiText-2")


@torch.no_grad()
def token_perplexity(logits_fn, ids: list[int], window: int, n_bytes: int) -> dict:
    """Perplexity over non-overlapping ``window``-token windows (the first token of each is context only)."""
    nll, count = 0.0, 0
    chunks = [ids[i:i + window] for i in range(0, len(ids), window)]
    chunks = [c for c in chunks if len(c) == window]
    for s in range(0, len(chunks), 4):
        x = torch.tensor(chunks[s:s + 4])
        logits = logits_fn(x)[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                       reduction="sum"))
        count += x[:, 1:].numel()
    return {"tokens": count, "nll_per_token": nll / count, "perplexity": math.exp(nll / count),
            "bits_per_byte": nll / math.log(2) / n_bytes * (count / max(len(ids) - 1, 1))}


@torch.no_grad()
def byte_bits_per_byte(run_dir: Path, text: str, window: int) -> dict:
    """(b)'s byte-level cross-entropy on the same text (``BOS`` + ``window`` bytes per row)."""
    from tessera.data.mixed_modal import BOS
    from tessera.models.decoder import MixedModalConfig
    from tessera.models.objectives import MixedModalLM
    from tessera.train import load_checkpoint
    from tessera.train.checkpoint import read_checkpoint

    ck = read_checkpoint(run_dir / "checkpoint")
    lm = MixedModalLM(MixedModalConfig(**ck["extra"]["model_config"]), "transfusion")
    load_checkpoint(run_dir / "checkpoint", lm, restore_rng=False)
    lm.eval()
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    rows = [data[i:i + window] for i in range(0, len(data) - window + 1, window)]
    nll, count = 0.0, 0
    for s in range(0, len(rows), 8):
        x = torch.from_numpy(np.stack(rows[s:s + 8]).astype(np.int64))
        tokens = torch.cat([torch.full((len(x), 1), BOS), x], 1)
        modality = torch.zeros_like(tokens)
        hidden, _ = lm.model(tokens, modality, patches=torch.zeros(*tokens.shape, lm.cfg.patch_dim),
                             timesteps=torch.zeros_like(tokens))
        logits = lm.model.lm_head(hidden[:, :-1]).float()
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                                                       reduction="sum"))
        count += x.numel()
    return {"bytes": count, "bits_per_byte": nll / math.log(2) / count, "perplexity_per_byte": math.exp(nll / count)}


# -- does the image side use the caption? ------------------------------------------------------

@torch.no_grad()
def caption_use(model, tok, images: np.ndarray, labels: np.ndarray, timesteps=(200, 500, 800), seed: int = 0) -> dict:
    """Validation noise-prediction MSE of caption-first sequences at fixed timesteps with the right caption,
    a wrong one (digit + 3) and none: how much the image side reads the text (same images and noise)."""
    from tessera.data.mixed_modal import CAPTION_TEMPLATES, caption_for
    from tessera.models import diffusion as D
    from tessera.models.lmfusion_data import LMFusionData

    model.eval()
    data = LMFusionData(tok, images, labels, model.cfg.boi_id, model.cfg.eoi_id, patch_size=model.cfg.patch_size)
    sched = D.make_scheduler(model.cfg.num_train_timesteps)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.from_numpy(data._patches).float()
    noise = torch.randn(x0.shape, generator=g)
    n, L, p = x0.shape

    def mse(caption_labels, t: int) -> float:
        batch = data.pairs_batch([(i, caption_for(c, CAPTION_TEMPLATES[0]) if c >= 0 else None, True)
                                  for i, c in enumerate(caption_labels)])
        img = batch["modality"] == 1
        patches = batch["patches"]
        patches[img] = D.add_noise(sched, x0.reshape(-1, p), noise.reshape(-1, p), torch.full((n * L,), t))
        out = model(batch["tokens"], batch["modality"], batch["image_id"], batch["attention_mask"], patches,
                    torch.full(batch["tokens"].shape, t))
        return float(((model.predict_noise(out).view(n, L, p) - noise) ** 2).mean())

    y = [int(v) for v in labels]
    res = {}
    for t in timesteps:
        right, wrong, none = mse(y, t), mse([(v + 3) % 10 for v in y], t), mse([-1] * n, t)
        res[str(t)] = {"right_caption": round(right, 5), "wrong_caption": round(wrong, 5), "no_caption": round(none, 5),
                       "wrong_over_right": round(wrong / right, 4)}
    return res


# -- PNG -----------------------------------------------------------------------------------------

def figure(runs: dict, out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    from tessera.config import atomic_savefig

    names = [n for n in runs if (Path(runs[n]["dump_dir"]) / "samples.png").is_file()]
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.2 * (len(names) + 1), 5.2))
    for ax, n in zip(axes, names):
        ax.imshow(mpimg.imread(Path(runs[n]["dump_dir"]) / "samples.png"))
        r = runs[n]
        ax.set_title(f"{n}\ngeneration {r['generation_accuracy']:.2f}, understanding {r['understanding_accuracy']:.2f}",
                     fontsize=9)
        ax.axis("off")
    ax = axes[-1]
    for n, r in runs.items():
        c = r["curve"]
        ax.plot([p["flops"] / 1e12 for p in c], [p["val_image_loss"] for p in c], marker=".", label=n)
    ax.set_xlabel("training FLOPs (1e12, measured)")
    ax.set_ylabel("validation image (diffusion) loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, out_png, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2500, help="LMFusion's steps; the peers get equal FLOPs")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--caption-first", type=float, default=0.5)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--guidance-scale", type=float, default=3.0)
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--n-caption-eval", type=int, default=200)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--ppl-window", type=int, default=256)
    ap.add_argument("--full-ppl-tokens", type=int, default=2048, help="also check the full 30-layer model (0 = skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-b", action="store_true", help="leave out the from-scratch Transfusion peer")
    ap.add_argument("--work-dir", default="/tmp/tessera-bench-lmfusion")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs in --work-dir")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lmfusion.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import diffusers
    import transformers

    from tessera import __version__
    from tessera.models.lmfusion import LMFusionModel, load_base
    from tessera.recipes import lmfusion_train as R
    from tessera.recipes import mixed_modal_pretrain as MM

    work = Path(args.work_dir)
    out_path = Path(args.out)
    common = dict(base_model="default", layers=args.layers, dataset="digits", batch_size=args.batch_size, lr=args.lr,
                  caption_first=args.caption_first, eval_every=args.eval_every, eval_batches=4, ckpt_every=10**9,
                  log_every=25, sample_per_class=args.per_class, sample_steps=args.sample_steps, sampler=args.sampler,
                  guidance_scale=args.guidance_scale, n_caption_eval=args.n_caption_eval, classifier_steps=600,
                  threads=args.threads, seed=args.seed, resume=False)
    cfg_f = R.Config(freeze_text=True, steps=args.steps, dump_dir=str(work / "lmfusion"), **common)
    base_loaded, tok = load_base("default", args.layers, device="cpu")
    dims = base_loaded.config
    tcfg = MM.Config(setting="transfusion", variant="dense", dataset="digits", d_model=dims.hidden_size,
                     n_layers=args.layers, n_heads=dims.num_attention_heads, ffn_hidden=dims.intermediate_size,
                     patch_size=2, text_fraction=0.25, caption_first=args.caption_first, batch_size=args.batch_size,
                     lr=args.lr, warmup_steps=10, eval_every=args.eval_every, eval_batches=4, ckpt_every=10**9,
                     log_every=25, sample_per_class=args.per_class, sample_steps=args.sample_steps,
                     n_caption_eval=args.n_caption_eval, classifier_steps=600, threads=args.threads, seed=args.seed,
                     resume=False, dump_dir=str(work / "transfusion"))

    results: dict = {
        "machine": machine(),
        "versions": {"tessera": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "diffusers": diffusers.__version__},
        "config": {"args": vars(args), "command": " ".join(sys.argv), "base_model": "SmolLM2-135M-Instruct (embedded)",
                   "base_layers_used": args.layers, "base_layers_total": 30},
    }
    t_start = time.perf_counter()

    # 1. FLOPs per step -> equal-FLOPs step counts
    f_lmf = lmfusion_step_flops(cfg_f)
    f_a = lmfusion_step_flops(R.Config(**{**cfg_f.__dict__, "freeze_text": False}))
    f_b, f_b_analytic = transfusion_step_flops(tcfg)
    budget = args.steps * f_lmf
    steps = {"lmfusion": args.steps, "unfrozen": max(1, round(budget / f_a)), "transfusion": max(1, round(budget / f_b))}
    results["flops_per_step"] = {"lmfusion": f_lmf, "unfrozen": f_a, "transfusion": f_b,
                                 "transfusion_analytic_mixed_modal_count": f_b_analytic,
                                 "lmfusion_over_unfrozen": f_lmf / f_a}
    results["steps"] = steps
    results["flops_budget"] = budget
    write_json(results, out_path)
    print(f"FLOPs/step lmfusion {f_lmf:.3g} unfrozen {f_a:.3g} transfusion {f_b:.3g}; steps {steps}", flush=True)

    # 2. training runs
    runs: dict = {}
    plan = [("lmfusion", cfg_f), ("unfrozen", R.Config(**{**cfg_f.__dict__, "freeze_text": False,
                                                           "steps": steps["unfrozen"],
                                                           "dump_dir": str(work / "unfrozen")}))]
    for name, cfg in plan:
        if not (args.reuse and (Path(cfg.dump_dir) / "results.json").is_file()):
            t0 = time.perf_counter()
            R.main(cfg)
            record_wall(Path(cfg.dump_dir), time.perf_counter() - t0)
        res = json.loads((Path(cfg.dump_dir) / "results.json").read_text())
        runs[name] = {"dump_dir": cfg.dump_dir, "steps": res["steps"], "train_flops": res["train_flops"],
                      "params": res["params"], "median_step_s": res["median_step_s"], "val": res["val"],
                      "generation_accuracy": res["generation_accuracy"], "understanding_accuracy": res["understanding_accuracy"],
                      "guidance_scale": res["guidance_scale"], "text_side_vs_fresh_base": res["text_side"],
                      "caption_examples": res["caption_examples"], "classifier_val_accuracy": res["classifier_val_accuracy"],
                      "curve": curve(Path(cfg.dump_dir)), "run_wall_s": read_wall(Path(cfg.dump_dir))}
        results["runs"] = runs
        write_json(results, out_path)
    if not args.skip_b:
        tcfg.steps = steps["transfusion"]
        if not (args.reuse and (Path(tcfg.dump_dir) / "results.json").is_file()):
            t0 = time.perf_counter()
            MM.main(tcfg)
            record_wall(Path(tcfg.dump_dir), time.perf_counter() - t0)
        res = json.loads((Path(tcfg.dump_dir) / "results.json").read_text())
        # the mixed-modal recipe logs its analytic FLOPs; rescale its curve to measured FLOPs per step
        scale = f_b / f_b_analytic
        c = [{**p, "flops": p["flops"] * scale} for p in curve(Path(tcfg.dump_dir), routing="batch")]
        runs["transfusion"] = {"dump_dir": tcfg.dump_dir, "steps": res["steps"], "train_flops": res["train_flops"] * scale,
                               "train_flops_analytic": res["train_flops"], "params": {"trainable": res["params"]},
                               "median_step_s": res["median_step_s"], "val": res["val"]["batch"],
                               "generation_accuracy": res["generation"]["batch"],
                               "understanding_accuracy": res["captioning"]["batch"], "guidance_scale": 1.0,
                               "caption_examples": res.get("caption_examples", {}).get("batch", [])[:3],
                               "classifier_val_accuracy": res["classifier_val_accuracy"], "curve": c,
                               "run_wall_s": read_wall(Path(tcfg.dump_dir))}
        write_json(results, out_path)

    # 3. generation without guidance for the LMFusion-style models (like-for-like with (b))
    from tessera.models.classifier import DigitClassifier
    from tessera.train.checkpoint import load_tensors

    for name in ("lmfusion", "unfrozen"):
        d = Path(runs[name]["dump_dir"])
        model, mtok = LMFusionModel.load(d / "image_modules", device="cpu")
        clf = DigitClassifier()
        clf.load_state_dict(load_tensors(d / "classifier.safetensors"))
        by_scale = {}
        for scale in (1.0, 5.0, 8.0):
            acc, _, _ = R.generation_accuracy(model, mtok, clf, args.per_class, args.sample_steps, scale, args.seed,
                                              sampler=args.sampler)
            by_scale[str(scale)] = round(acc, 4)
        by_scale[str(args.guidance_scale)] = runs[name]["generation_accuracy"]
        runs[name]["generation_accuracy_no_guidance"] = by_scale["1.0"]
        runs[name]["generation_accuracy_by_guidance_scale"] = dict(sorted(by_scale.items(), key=lambda kv: float(kv[0])))
        from tessera.data.mixed_modal import load_image_set, split_indices

        imgs, labs = load_image_set("digits")
        sel = split_indices(len(imgs), 300, seed=0)[1][:128]
        runs[name]["caption_use_val_mse"] = caption_use(model, mtok, imgs[sel], labs[sel])
        del model
    write_json(results, out_path)

    # 4. text side: WikiText-2 test perplexity (fresh base, LMFusion, (a)) and bits per byte ((b) too)
    text, text_path = wikitext_test_text()
    ids = tok(text[:200000], add_special_tokens=False).input_ids[:args.ppl_tokens + 1]
    n_bytes = len(tok.decode(ids[1:]).encode("utf-8"))
    fresh, _ = load_base("default", args.layers, device="cpu")
    text_side = {"source": text_path, "window": args.ppl_window,
                 "base": token_perplexity(lambda x: fresh(x).logits, ids, args.ppl_window, n_bytes)}
    for name in ("lmfusion", "unfrozen"):
        model, _ = LMFusionModel.load(Path(runs[name]["dump_dir"]) / "image_modules", device="cpu")
        text_side[name] = token_perplexity(lambda x, m=model: m.logits(x), ids, args.ppl_window, n_bytes)
        probe = torch.tensor([ids[:args.ppl_window]])
        with torch.no_grad():
            text_side[name]["logits_bit_identical_to_base"] = bool(torch.equal(model.logits(probe), fresh(probe).logits))
        del model
    if "transfusion" in runs:
        raw = tok.decode(ids[1:])
        text_side["transfusion"] = byte_bits_per_byte(Path(runs["transfusion"]["dump_dir"]), raw, args.ppl_window)
    if args.full_ppl_tokens:
        # the text path at full depth: all 30 layers of SmolLM2 wrapped by LMFusion (image modules untrained: the
        # text path never reads them) against the plain model, bit for bit, and its real perplexity
        from tessera.models.lmfusion_modules import LMFusionConfig

        del fresh
        full, _ = load_base("default", 0, device="cpu")
        fused_full = LMFusionModel(full, LMFusionConfig())
        fids = ids[:args.full_ppl_tokens + 1]
        fbytes = len(tok.decode(fids[1:]).encode("utf-8"))
        probe = torch.tensor([fids[:args.ppl_window]])
        with torch.no_grad():
            same = bool(torch.equal(fused_full.logits(probe), full(probe).logits))
        text_side["full_depth_30_layers"] = {
            "base": token_perplexity(lambda x: full(x).logits, fids, args.ppl_window, fbytes),
            "lmfusion_wrapper": token_perplexity(lambda x: fused_full.logits(x), fids, args.ppl_window, fbytes),
            "logits_bit_identical_to_base": same}
        del full, fused_full
    results["text_side"] = text_side
    write_json(results, out_path)

    # 5. figures and goals
    a_final = runs["unfrozen"]["curve"][-1]["val_image_loss"]
    reach = flops_to_reach(runs["lmfusion"]["curve"], a_final)
    frac = reach / runs["unfrozen"]["train_flops"] if reach is not None else None
    lmf = runs["lmfusion"]
    results["figures"] = {
        "wikitext2_ppl_full_depth": {n: round(v["perplexity"], 4) for n, v in text_side.get("full_depth_30_layers", {}).items()
                                     if isinstance(v, dict)},
        "wikitext2_ppl": {n: round(v["perplexity"], 4) for n, v in text_side.items() if isinstance(v, dict) and "perplexity" in v},
        "wikitext2_bits_per_byte": {n: round(v["bits_per_byte"], 4) for n, v in text_side.items() if isinstance(v, dict) and "bits_per_byte" in v},
        "generation_accuracy": {n: r["generation_accuracy"] for n, r in runs.items()},
        "generation_accuracy_no_guidance": {n: r.get("generation_accuracy_no_guidance", r["generation_accuracy"])
                                            for n, r in runs.items()},
        "generation_accuracy_by_guidance_scale": {n: r["generation_accuracy_by_guidance_scale"] for n, r in runs.items()
                                                  if "generation_accuracy_by_guidance_scale" in r},
        "caption_use_wrong_over_right_mse": {n: {t: v["wrong_over_right"] for t, v in r["caption_use_val_mse"].items()}
                                             for n, r in runs.items() if "caption_use_val_mse" in r},
        "understanding_accuracy": {n: r["understanding_accuracy"] for n, r in runs.items()},
        "training_flops": {n: r["train_flops"] for n, r in runs.items()},
        "trainable_params": {n: r["params"]["trainable"] for n, r in runs.items()},
        "final_val_image_loss": {n: r["curve"][-1]["val_image_loss"] for n, r in runs.items()},
        "unfrozen_final_val_image_loss": a_final,
        "lmfusion_flops_to_reach_unfrozen_final_image_loss": reach,
        "lmfusion_flops_fraction_of_unfrozen": round(frac, 4) if frac is not None else None,
        "lmfusion_flops_per_step_over_unfrozen": round(f_lmf / f_a, 4),
    }
    results["goals"] = {
        "text_ppl_unchanged": {"met": text_side["lmfusion"]["logits_bit_identical_to_base"]
                               and text_side["lmfusion"]["perplexity"] == text_side["base"]["perplexity"],
                               "lmfusion": text_side["lmfusion"]["perplexity"], "base": text_side["base"]["perplexity"]},
        "generation_accuracy_ge_0.90": {"met": lmf["generation_accuracy"] >= 0.90, "measured": lmf["generation_accuracy"]},
        "understanding_accuracy_ge_0.95": {"met": lmf["understanding_accuracy"] >= 0.95,
                                           "measured": lmf["understanding_accuracy"]},
        "reaches_unfrozen_image_quality_with_le_half_flops": {"met": frac is not None and frac <= 0.5, "measured": frac},
    }
    results["wall_seconds"] = round(time.perf_counter() - t_start, 1)  # this invocation (excludes reused runs)
    results["runs_reused"] = bool(args.reuse)
    write_json(results, out_path)
    figure(runs, out_path.with_suffix(".png"),
           f"SmolLM2 first {args.layers} layers, 8x8 digits, equal training FLOPs ({budget / 1e12:.1f}e12)")
    print(json.dumps({"figures": results["figures"], "goals": results["goals"]}, indent=1))


if __name__ == "__main__":
    main()
