"""Benchmark of Branch-Train-MiX against its compute-matched peers, same data, same harness, same run.

Domains (real text): ``wiki`` = WikiText-2 articles (valid + test, split by title), ``sci`` =
SciFact's biomedical abstracts, ``code`` = this Python's standard-library sources (document-level
hash splits).  Every figure is a held-out perplexity per domain.  The mixture (seed, dense, MoE
finetuning) gives domain ``d`` a share ~ blocks_d ** ``--mixture-alpha`` (0.5: temperature
sampling, so the short wiki domain repeats ~1.6x and no domain dominates).

Part 1 (tiny): a byte-level BPE of ``--vocab`` tokens trained on the three domains' training
text, so that a small Llama spends its compute in its blocks (where the experts are), not in
a 49k-token output layer.  Then:

1. **Seed gate**: a from-scratch Llama trains on the mixture; its held-out loss is evaluated
   every ``--seed-steps / 20`` steps and must improve by less than 1% over the last fifth of
   the steps (``btx_seed_plateau``).  The seed is cached in ``--work`` by its settings.
2. Per comparison seed (``--seeds``, default 3; the seed model is shared, the branch data
   order, router init and finetuning order change):

   - **experts**: one per domain, each trained in its own process (``tessera.btx.branch``);
     **expert gate**: each beats the seed on its own domain by >= 20% perplexity;
   - **BTX**: ``mix_experts`` (top-2, a new router N(0, 0.02) as in the paper, or mergekit-moe's
     hidden-state init with ``--router-init hidden``; attention, embeddings and norms
     averaged) + MoE finetuning on the mixture with the BTX load-balancing loss (alpha 0.01);
   - **dense**: the seed trained further on the mixture for the same total FLOPs;
   - **sparse upcycling**: the seed's FFN copied once per domain, the whole budget spent on
     MoE training of the mixture;
   - **BTM**: the experts as an ensemble weighted by a bag-of-tokens domain classifier on the
     prefix; for equal FLOPs each expert continues on its own domain for its share of BTX's
     finetuning FLOPs (``btm``); the branch-only ensemble (the BTX paper's BTM row) is
     ``btm_branch_only``.

FLOPs are counted as 6 x active parameters x tokens (+ head and attention scores), so a
top-2 MoE step costs more than a dense step and the baselines get fewer/more steps.

Part 2 (``--parts smollm2``): the same pipeline from the embedded SmolLM2-135M-Instruct,
short, and the time and peak memory of ``tessera btx mix`` vs ``mergekit-moe`` mixing its
experts (mergekit only from a separate venv, ``--mergekit-python``; reported absent otherwise).

Writes benchmarks/results/btx.json (``goals``, gates, per-seed and mean perplexities, FLOPs
accounting, wall time, load) and btx_routing.png / btx_routing_upcycling.png / btx_seed.png.
Default run about 19 minutes on 2 cores (a cached seed saves 2); ``--quick`` for iterating.
Usage: python benchmarks/btx.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
DOMAINS = ["wiki:wikitext2", "sci:scifact", "code:python-code"]
# compute-matched (BTM twice: at equal FLOPs, and branch-only with fewer FLOPs, the BTX paper's row;
# BTX must beat both to be "best")
METHODS = ("dense", "sparse_upcycling", "btm", "btm_branch_only", "btx")
TESTBED = "v3"  # bump when the domains' text changes: cached tokenizers and seeds are keyed by it


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def flops_per_step(config, seq_len: int, batch: int) -> float:
    from tessera.btx.train import train_flops_per_token

    return train_flops_per_token(config, seq_len) * seq_len * batch


def load(path, moe=False):
    from transformers import AutoModelForCausalLM

    from tessera.btx.routing import load_btx_model

    return load_btx_model(path, dtype=torch.float32, device="cpu") if moe else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def save(model, tok, path: Path, **files: str) -> None:
    """A Hugging Face folder (model + tokenizer + extra text files), written whole or not at all."""
    from tessera.config import atomic_dir

    shutil.rmtree(path, ignore_errors=True)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for name, text in files.items():
            (tmp / name).write_text(text)


def settings(steps: int, batch: int, lr: float, seed: int):
    from tessera.btx.train import TrainSettings

    return TrainSettings(steps=max(1, steps), batch_size=batch, lr=lr, seed=seed, logging_steps=max(1, steps // 5))


def mixture_of(train: dict, alpha: float = 1.0) -> torch.Tensor:
    """The training mixture: domain ``d`` gets a share ``n_d**alpha / sum(n**alpha)`` of the
    ``sum(n)`` blocks (``n_d`` = its training blocks; a short domain's blocks repeat, a long
    one's are cut).  ``alpha`` 1 = every block once (natural), 0 = every domain equally (as
    BTM's seed phase draws domains), 0.5 = the temperature sampling of multilingual LMs."""
    if alpha == 1.0:
        return torch.cat(list(train.values()))
    sizes = {n: len(b) for n, b in train.items()}
    weights = {n: k ** alpha for n, k in sizes.items()}
    total, norm = sum(sizes.values()), sum(weights.values())
    parts = []
    for n, b in train.items():
        k = max(1, round(total * weights[n] / norm))
        parts.append(b.repeat(math.ceil(k / len(b)), 1)[:k])
    return torch.cat(parts)


def branch_stage(tag, seed_dir, work, a, cfg, domains, seed):
    """The experts, one process each; returns (expert folders, expert infos, wall seconds)."""
    from tessera.btx.branch import branch_train

    shutil.rmtree(work / "experts", ignore_errors=True)
    t0 = time.perf_counter()
    experts = branch_train(str(seed_dir), domains, work / "experts", settings(cfg["expert_steps"], cfg["batch"], cfg["lr"], seed),
                           seq_len=cfg["seq_len"], max_train_blocks=cfg["domain_blocks"], max_parallel=a.max_parallel,
                           threads_per_expert=a.expert_threads)
    wall = time.perf_counter() - t0
    infos = [json.loads((p / "expert.json").read_text()) for p in experts]
    log(f"[{tag}] branch: {len(experts)} experts x {cfg['expert_steps']} steps in {wall:.0f} s (pids {[i['pid'] for i in infos]})")
    return experts, infos, wall


def train_timed(model, blocks, work, s, **kw):
    from tessera.btx.train import train_model

    t0 = time.perf_counter()
    model, hist = train_model(model, blocks, work / "trainer", s, **kw)
    return model, [r for r in hist if "loss" in r], time.perf_counter() - t0


def run_pipeline(tag: str, seed_dir: Path, work: Path, a, data, cfg: dict, seed: int, heatmaps: dict | None = None) -> dict:
    """Experts -> BTX, BTM, upcycling, dense from one seed model; held-out perplexity per domain for each."""
    from tessera.btx.baselines import upcycle
    from tessera.btx.data import parse_domains
    from tessera.btx.mix import mix_experts
    from tessera.btx.train import perplexity

    domains = parse_domains(DOMAINS)
    train, held = data
    names = [d.name for d in domains]
    mixture = mixture_of(train, cfg.get("mixture_alpha", 1.0))
    f_dense = flops_per_step(load(seed_dir).config, cfg["seq_len"], cfg["batch"])
    experts, infos, branch_s = branch_stage(tag, seed_dir, work, a, cfg, domains, seed)
    branch_flops = sum(i["train_flops"] for i in infos)

    router_init, prompts = cfg.get("router_init", "normal"), None
    if router_init == "hidden":  # mergekit-moe's gate init, from each expert's training text
        from tessera.btx.data import _spread, domain_texts

        prompts = [[t[:2000] for t in _spread(domain_texts(d)[0], seed)[:64]] for d in domains]
    rep = mix_experts(experts, work / "btx-mixed", experts_per_token=2, router_init=router_init,
                      router_prompts=prompts, seed=seed, overwrite=True)
    moe = load(work / "btx-mixed", moe=True)
    f_moe = flops_per_step(moe.config, cfg["seq_len"], cfg["batch"])
    mixed_ppl = {n: perplexity(moe, held[n], 32) for n in names}  # before MoE finetuning: what averaging cost
    log(f"[{tag}] mixed model before finetuning: {json.dumps({n: round(v, 2) for n, v in mixed_ppl.items()})}")
    ft = settings(cfg["ft_steps"], cfg["batch"], cfg["ft_lr"], seed)
    btx, btx_hist, btx_s = train_timed(moe, mixture, work, ft, moe=True, balance="btx")
    budget = branch_flops + ft.steps * f_moe
    steps = {"expert": cfg["expert_steps"], "btx_finetune": ft.steps, "dense": round(budget / f_dense),
             "sparse_upcycling": round(budget / f_moe), "btm_continue": round(ft.steps * f_moe / len(names) / f_dense)}
    log(f"[{tag}] FLOPs: branch {branch_flops:.3g} + BTX finetune {ft.steps} x {f_moe:.3g} = {budget:.3g}; dense step {f_dense:.3g} "
        f"-> dense {steps['dense']} steps, upcycling {steps['sparse_upcycling']} MoE steps, BTM +{steps['btm_continue']} steps per expert")
    dense, _, dense_s = train_timed(load(seed_dir), mixture, work, settings(steps["dense"], cfg["batch"], cfg["ft_lr"], seed))
    upcycle(seed_dir, len(domains), work / "upcycled", seed=seed, overwrite=True)
    up, _, up_s = train_timed(load(work / "upcycled", moe=True), mixture, work, settings(steps["sparse_upcycling"], cfg["batch"], cfg["ft_lr"], seed),
                              moe=True, balance="btx")
    btm_models, btm_s = [], 0.0
    for p, n in zip(experts, names):
        m, _, sec = train_timed(load(p), train[n], work, settings(steps["btm_continue"], cfg["batch"], cfg["ft_lr"], seed))
        btm_models.append(m)
        btm_s += sec
    log(f"[{tag}] BTX finetune {btx_s:.0f} s, dense {dense_s:.0f} s, upcycling {up_s:.0f} s, BTM continuation {btm_s:.0f} s")
    models = {"seed": load(seed_dir), "dense": dense, "sparse_upcycling": up, "btx": btx}
    out = evaluate(models, [load(p) for p in experts], btm_models, train, held, names, seed)
    if heatmaps:
        routing_heatmaps(heatmaps, tag, {"btx": btx, "sparse_upcycling": up}, held, names, out)
    out.update({
        "config": {**cfg, "steps": steps, "router_init": router_init, "top_k": 2, "balance": "btx alpha=0.01",
                   "held_out_blocks": {n: int(held[n].shape[0]) for n in names}},
        "flops": {"branch": branch_flops, "btx_finetune": ft.steps * f_moe, "btx_total": budget, "dense": steps["dense"] * f_dense,
                  "sparse_upcycling": steps["sparse_upcycling"] * f_moe, "btm": branch_flops + len(names) * steps["btm_continue"] * f_dense,
                  "btm_branch_only": branch_flops, "dense_step": f_dense, "moe_step": f_moe},
        "seconds": {"branch_wall": branch_s, "experts": [i["seconds"] for i in infos], "mix": rep.seconds, "btx_finetune": btx_s,
                    "dense": dense_s, "sparse_upcycling": up_s, "btm_continue": btm_s},
        "expert_pids": [i["pid"] for i in infos], "btx_finetune_log": btx_hist, "btx_before_finetune_perplexity": mixed_ppl,
    })
    return out


def evaluate(models: dict, experts: list, btm_experts: list, train: dict, held: dict, names: list[str], seed: int) -> dict:
    """Held-out perplexities, BTM ensembles (classifier on the prefix), the expert gate and the BTX-vs-expert gap."""
    from tessera.btx.baselines import PrefixDomainClassifier, btm_perplexity
    from tessera.btx.train import token_logprobs

    clf = PrefixDomainClassifier(models["seed"].config.vocab_size, len(names)).fit([train[n] for n in names], seed=seed)
    ppl: dict = {m: {} for m in (*models, "btm", "btm_branch_only", "btm_likelihood")}
    expert_ppl: dict = {}
    for n in names:
        blocks = held[n]
        for m, model in models.items():
            ppl[m][n] = float(math.exp(-token_logprobs(model, blocks, 32).mean()))
        route = clf.prefix_logprobs(blocks)
        lps = [token_logprobs(m, blocks, 32) for m in experts]
        expert_ppl[n] = {d: float(math.exp(-lp.mean())) for d, lp in zip(names, lps)}
        ppl["btm_branch_only"][n] = btm_perplexity(lps, "classifier", route)
        ppl["btm_likelihood"][n] = btm_perplexity(lps, "posterior")
        ppl["btm"][n] = btm_perplexity([token_logprobs(m, blocks, 32) for m in btm_experts], "classifier", route)
    avg = {m: sum(v.values()) / len(v) for m, v in ppl.items()}
    gain = {n: (ppl["seed"][n] - expert_ppl[n][n]) / ppl["seed"][n] for n in names}
    within = {n: ppl["btx"][n] / expert_ppl[n][n] - 1 for n in names}
    return {"heldout_perplexity": ppl, "average_perplexity": avg, "expert_perplexity": expert_ppl,
            "expert_gain_over_seed": gain, "expert_gate_passed": min(gain.values()) >= 0.20,
            "btx_vs_own_expert": within, "best_compute_matched": min(METHODS, key=lambda m: avg[m]),
            "btm_classifier_accuracy_32_tokens": {n: clf.accuracy(held[n], i) for i, n in enumerate(names)}}


def routing_heatmaps(heatmaps: dict, tag: str, models: dict, held: dict, names: list[str], out: dict) -> None:
    from tessera.btx.analysis import domain_routing, plot_routing_heatmap

    out["routing_fractions"] = {}
    for method, path in heatmaps.items():
        fractions = domain_routing(models[method], held)
        out["routing_fractions"][method] = fractions
        label = "BTX (experts = branched FFNs)" if method == "btx" else "sparse upcycling (experts = copies of the seed FFN)"
        experts = [f"{n} expert" for n in names] if method == "btx" else [f"copy {i}" for i in range(len(names))]
        plot_routing_heatmap(fractions, path, expert_names=experts, title=f"{label}, {tag}: share of tokens per expert after MoE finetuning")


def pretrain_tiny_seed(work: Path, a, train: dict, held: dict, tok) -> tuple[Path, dict]:
    """The seed gate: a from-scratch Llama on the mixture, held-out loss every ``seed_steps / 20``
    steps; cached in ``work`` under a key of its settings.  Returns (folder, seed record)."""
    from tessera import hub
    from tessera.btx.train import HeldOutLoss, plateau

    spec = {k: getattr(a, k) for k in ("vocab", "hidden", "layers", "seq_len", "batch", "seed_steps", "seed_lr", "domain_blocks", "seed", "mixture_alpha")}
    spec["testbed"] = TESTBED
    seed_dir = work / f"seed-{hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]}"
    if (seed_dir / "seed.json").is_file():
        log(f"seed: reusing {seed_dir}")
        return seed_dir, json.loads((seed_dir / "seed.json").read_text())
    model, _ = hub.new_tiny_llama(tok, hidden_size=a.hidden, num_layers=a.layers, num_heads=4, num_kv_heads=2,
                                  intermediate_size=4 * a.hidden, max_positions=max(512, a.seq_len), seed=a.seed)
    n_params = sum(p.numel() for p in model.parameters())
    eval_blocks = {n: b[: a.seed_eval_blocks] for n, b in held.items()}
    cb = HeldOutLoss(eval_blocks, every=max(1, a.seed_steps // 20),
                     on_eval=lambda r: log(f"seed step {r['step']}: held-out loss {r['mean']:.4f} {json.dumps({k: round(v, 3) for k, v in r['loss'].items()})}"))
    _, hist, seconds = train_timed(model, mixture_of(train, a.mixture_alpha), work, settings(a.seed_steps, a.batch, a.seed_lr, a.seed), callbacks=[cb])
    rec = {"settings": spec, "parameters": n_params, "non_embedding_parameters": n_params - model.get_input_embeddings().weight.numel(),
           "seconds": seconds, "tokens_per_second": a.seed_steps * a.batch * a.seq_len / seconds, "curve": cb.curve,
           "train_loss": hist, "plateau": plateau(cb.curve), "final_heldout_loss": cb.curve[-1]["loss"]}
    log(f"seed: {a.seed_steps} steps in {seconds:.0f} s ({rec['tokens_per_second']:.0f} tok/s), plateau {rec['plateau']:.4f}")
    save(model, tok, seed_dir, **{"seed.json": json.dumps(rec, indent=2)})
    return seed_dir, rec


def measure_sizes(tok, mixture: torch.Tensor, work: Path, a) -> dict:
    """Training tokens/s of a few seed shapes on this machine (how the default was chosen)."""
    from tessera import hub

    out = {}
    for h, layers in ((32, 4), (64, 2), (64, 4), (96, 4)):
        model, _ = hub.new_tiny_llama(tok, hidden_size=h, num_layers=layers, num_heads=4, num_kv_heads=2, intermediate_size=4 * h,
                                      max_positions=max(512, a.seq_len), seed=0)
        train_timed(model, mixture, work, settings(2, a.batch, 1e-3, 0))  # warm-up
        _, _, sec = train_timed(model, mixture, work, settings(8, a.batch, 1e-3, 0))
        out[f"h{h}_L{layers}"] = {"parameters": sum(p.numel() for p in model.parameters()), "tokens_per_second": 8 * a.batch * a.seq_len / sec}
    log(f"seed sizes, training tokens/s: {json.dumps({k: round(v['tokens_per_second']) for k, v in out.items()})}")
    return out


def plot_seed_curve(rec: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tessera.config import atomic_savefig

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    steps = [r["step"] for r in rec["curve"]]
    for n in rec["curve"][0]["loss"]:
        ax.plot(steps, [r["loss"][n] for r in rec["curve"]], label=n)
    ax.plot(steps, [r["mean"] for r in rec["curve"]], "k--", label="mean")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_ylim(top=min(8.5, max(r["mean"] for r in rec["curve"][1:]) + 1.0))
    ax.set_title(f"BTX seed pretraining: last-fifth improvement {rec['plateau'] * 100:.2f}%", fontsize=9)
    ax.legend(fontsize=8)
    atomic_savefig(fig, path, dpi=130, bbox_inches="tight")


def peak_rss_run(cmd: list[str], env=None) -> dict:
    """Run ``cmd`` in a fresh wrapper process; wall time and the child's peak RSS (ru_maxrss)."""
    wrapper = ("import resource, subprocess, sys, time, json; t=time.perf_counter(); "
               "r=subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(json.dumps({'rc': r.returncode, 'seconds': time.perf_counter()-t, "
               "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024, 'err': r.stderr[-400:]}))")
    r = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    return json.loads(r.stdout.strip().splitlines()[-1])


def mix_vs_mergekit(experts: list[Path], seed_dir: Path, work: Path, mk_python: str | None) -> dict:
    out: dict = {"experts": [str(p) for p in experts]}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ours = work / "mix-ours"
    shutil.rmtree(ours, ignore_errors=True)
    out["tessera_btx_mix"] = peak_rss_run([sys.executable, "-m", "tessera.cli", "--quiet", "btx", "mix", *map(str, experts),
                                           "--out", str(ours)], env)
    if not mk_python or not Path(mk_python).is_file():
        out["mergekit_moe"] = {"status": "not installed", "note": "pass --mergekit-python /tmp/mkvenv/bin/python"}
        return out
    mk_bin = Path(mk_python).parent / "mergekit-moe"
    cfg = work / "mergekit-moe.yml"
    lines = [f"base_model: {seed_dir}", "gate_mode: random", "dtype: float32", "experts_per_token: 2", "experts:"]
    for p in experts:
        lines += [f"  - source_model: {p}", f"    positive_prompts: [\"{p.name}\"]"]
    cfg.write_text("\n".join(lines) + "\n")
    theirs = work / "mix-mergekit"
    shutil.rmtree(theirs, ignore_errors=True)
    r = peak_rss_run([str(mk_bin), str(cfg), str(theirs), "--device", "cpu", "--i-understand-this-is-not-useful-without-training"], env)
    if r["rc"] != 0:  # older CLIs lack the flag
        shutil.rmtree(theirs, ignore_errors=True)
        r = peak_rss_run([str(mk_bin), str(cfg), str(theirs), "--device", "cpu"], env)
    ver = subprocess.run([mk_python, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"], capture_output=True, text=True)
    r["version"] = ver.stdout.strip()
    out["mergekit_moe"] = r
    if r["rc"] == 0:
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(theirs)
        out["mergekit_moe"]["loads_with_transformers"] = type(m).__name__
        out["time_ratio_mergekit_over_tessera"] = r["seconds"] / out["tessera_btx_mix"]["seconds"]
        out["peak_rss_ratio_mergekit_over_tessera"] = r["peak_rss_mb"] / out["tessera_btx_mix"]["peak_rss_mb"]
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few minutes: short seed, one comparison seed, small budgets")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/tessera-btx-bench", help="folder for checkpoints (reuses a seed trained with the same settings)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the seed model (and first comparison seed)")
    ap.add_argument("--seeds", type=int, default=3, help="comparison seeds (branch/mix/finetune), each from the same seed model")
    ap.add_argument("--vocab", type=int, default=512, help="BPE trained on the domains' training text")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--domain-blocks", type=int, default=20000, help="most training blocks per domain")
    ap.add_argument("--mixture-alpha", type=float, default=0.5,
                    help="seed / dense / MoE-finetuning mixture: domain shares ~ blocks**alpha (1 natural, 0 uniform)")
    ap.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks per domain")
    ap.add_argument("--seed-eval-blocks", type=int, default=24, help="held-out blocks per domain for the seed's curve")
    ap.add_argument("--seed-steps", type=int, default=1500)
    ap.add_argument("--seed-lr", type=float, default=3e-3)
    ap.add_argument("--expert-steps", type=int, default=300)
    ap.add_argument("--ft-steps", type=int, default=450)
    ap.add_argument("--lr", type=float, default=3e-3, help="branch (expert) learning rate")
    ap.add_argument("--ft-lr", type=float, default=2e-3, help="MoE finetuning / continued-training learning rate")
    ap.add_argument("--router-init", choices=("normal", "hidden"), default="normal",
                    help="BTX router: a new N(0, 0.02) layer (the paper) or mergekit-moe's hidden-state init from domain text")
    ap.add_argument("--max-parallel", type=int, default=3, help="expert processes at once")
    ap.add_argument("--expert-threads", type=int, default=1)
    ap.add_argument("--plateau-max", type=float, default=0.01, help="seed gate: largest relative held-out loss gain over the last fifth")
    ap.add_argument("--force", action="store_true", help="compare even when the seed gate fails")
    ap.add_argument("--no-sizing", dest="sizing", action="store_false", help="skip timing the candidate seed sizes")
    ap.add_argument("--smollm2-steps", type=int, default=2, help="expert steps from SmolLM2 (part smollm2)")
    ap.add_argument("--smollm2-ft-steps", type=int, default=1)
    ap.add_argument("--smollm2-seq-len", type=int, default=64)
    ap.add_argument("--smollm2-eval-blocks", type=int, default=3)
    ap.add_argument("--mergekit-python", default="/tmp/mkvenv/bin/python")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "btx.json"))
    ap.add_argument("--parts", default="tiny", help="tiny and/or smollm2 (smollm2 includes the mix-vs-mergekit timing); "
                    "parts run in separate invocations update the same JSON")
    a = ap.parse_args(argv)
    if a.quick:
        for k, v in {"seeds": 1, "seed_steps": 300, "expert_steps": 30, "ft_steps": 30, "eval_blocks": 16, "seed_eval_blocks": 8,
                     "domain_blocks": 800, "smollm2_steps": 1, "sizing": False}.items():
            setattr(a, k, v)
        if a.out == ap.get_default("out"):
            a.out = str(Path(a.work) / "btx-quick.json")
    return a


def main(argv=None) -> None:
    from _common import machine, write_json

    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    os.environ.setdefault("TESSERA_QUIET", "1")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    parts = set(a.parts.split(","))
    results: dict = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    results.update({"benchmark": "btx", "domains": DOMAINS})
    results.setdefault("args", {}).update({p: vars(a) for p in parts})
    res_dir = Path(a.out).parent
    if "tiny" in parts:
        results["machine"] = machine()
        run_tiny(a, work, res_dir, results)
        results["machine"]["load_average_at_end"] = list(os.getloadavg())
    if "smollm2" in parts:
        run_smollm2(a, work, res_dir, results)
    results[f"seconds_{'+'.join(sorted(parts))}"] = time.perf_counter() - t_start
    merged = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}  # another part may have finished meanwhile
    merged.update({k: v for k, v in results.items() if k not in ("tiny", "smollm2", "mix_speed", "goals", "gates") or k in produced(parts)})
    if "tiny" in parts:
        merged.pop("tiny_longer", None)  # a run of the previous testbed (49k vocabulary, unplateaued seed)
    write_json(merged, Path(a.out))
    log(f"wrote {a.out} in {time.perf_counter() - t_start:.0f} s")


def produced(parts) -> set:
    return ({"tiny", "goals", "gates"} if "tiny" in parts else set()) | ({"smollm2", "mix_speed"} if "smollm2" in parts else set())


def tiny_testbed(a, tok_dir: Path):
    """The domain tokenizer (cached) and ``(train, held)`` blocks per domain."""
    from transformers import AutoTokenizer

    from tessera.btx.data import _spread, domain_texts, pack_blocks, parse_domains
    from tessera.knowledge.vocab import corpus_tokenizer

    texts = {d.name: domain_texts(d) for d in parse_domains(DOMAINS)}
    if (tok_dir / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(tok_dir)
    else:
        sample = []
        for tr, _ in texts.values():  # about the same amount of text from every domain
            size = 0
            for t in _spread(tr, 0):
                sample.append(t)
                size += len(t)
                if size > 1_500_000:
                    break
        tok = corpus_tokenizer(sample, vocab_size=a.vocab)
        tok.save_pretrained(tok_dir)
    train = {n: pack_blocks(_spread(tr, a.seed), tok, a.seq_len, a.domain_blocks) for n, (tr, _) in texts.items()}
    held = {n: pack_blocks(_spread(he, a.seed + 1), tok, a.seq_len, a.eval_blocks) for n, (_, he) in texts.items()}
    return tok, train, held


def run_tiny(a, work: Path, res_dir: Path, results: dict) -> None:
    tok, train, held = tiny_testbed(a, work / f"tokenizer-{TESTBED}-{a.vocab}")
    results["data"] = {n: {"train_blocks": int(train[n].shape[0]), "heldout_blocks": int(held[n].shape[0]), "seq_len": a.seq_len}
                       for n in train}
    if a.sizing:
        results["tiny_sizing"] = measure_sizes(tok, mixture_of(train, a.mixture_alpha), work, a)
    seed_dir, rec = pretrain_tiny_seed(work, a, train, held, tok)
    plot_seed_curve(rec, res_dir / "btx_seed.png")
    gates = {"seed_plateau": {"threshold": a.plateau_max, "measured": rec["plateau"], "passed": rec["plateau"] <= a.plateau_max}}
    results["tiny"] = {"seed": rec, "seed_curve_png": "benchmarks/results/btx_seed.png", "runs": []}
    results["gates"] = gates
    if not gates["seed_plateau"]["passed"] and not a.force:
        log(f"seed gate failed (plateau {rec['plateau']:.4f} > {a.plateau_max}): no comparison; train the seed longer or pass --force")
        results["goals"] = goals(results["tiny"], gates)
        return
    cfg = {"expert_steps": a.expert_steps, "ft_steps": a.ft_steps, "batch": a.batch, "seq_len": a.seq_len, "lr": a.lr,
           "ft_lr": a.ft_lr, "domain_blocks": a.domain_blocks, "mixture_alpha": a.mixture_alpha, "router_init": a.router_init}
    for i in range(a.seeds):
        seed = a.seed + i
        heat = {"btx": res_dir / "btx_routing.png", "sparse_upcycling": res_dir / "btx_routing_upcycling.png"} if i == 0 else None
        run = run_pipeline(f"tiny seed {seed}", seed_dir, work / "tiny", a, (train, held), cfg, seed, heat)
        run["seed"] = seed
        results["tiny"]["runs"].append(run)
        log(f"seed {seed}: average perplexity {json.dumps({k: round(v, 2) for k, v in run['average_perplexity'].items()})}")
    results["tiny"]["summary"] = summarise(results["tiny"]["runs"])
    gates["expert_gain"] = {"threshold": 0.20, "measured": min(min(r["expert_gain_over_seed"].values()) for r in results["tiny"]["runs"]),
                            "passed": all(r["expert_gate_passed"] for r in results["tiny"]["runs"])}
    results["goals"] = goals(results["tiny"], gates)


def summarise(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every perplexity, plus each method's ratio to BTX."""
    def stats(xs):
        return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "per_seed": xs}

    methods = list(runs[0]["heldout_perplexity"])
    names = list(runs[0]["heldout_perplexity"]["btx"])
    per_domain = {m: {n: stats([r["heldout_perplexity"][m][n] for r in runs]) for n in names} for m in methods}
    average = {m: stats([r["average_perplexity"][m] for r in runs]) for m in methods}
    expert = {n: stats([r["expert_perplexity"][n][n] for r in runs]) for n in names}
    return {"heldout_perplexity": per_domain, "average_perplexity": average, "own_expert_perplexity": expert,
            "ratio_to_btx_average": {m: average[m]["mean"] / average["btx"]["mean"] for m in methods},
            "best_compute_matched": min(METHODS, key=lambda m: average[m]["mean"]),
            "btx_vs_own_expert": {n: per_domain["btx"][n]["mean"] / expert[n]["mean"] - 1 for n in names}}


def goals(tiny: dict, gates: dict) -> dict:
    out = {"btx_seed_plateau": {"target": 0.01, "measured": gates["seed_plateau"]["measured"],
                                "met": gates["seed_plateau"]["measured"] <= 0.01}}
    summ = tiny.get("summary")
    gain = gates.get("expert_gain", {}).get("measured")
    out["btx_expert_gain"] = {"target": 0.20, "measured": gain, "met": gain is not None and gain >= 0.20}
    best = None if summ is None else float(summ["best_compute_matched"] == "btx")
    out["btx_best_average"] = {"target": 1, "measured": best, "met": best == 1.0,
                               "best": summ and summ["best_compute_matched"]}
    gap = None if summ is None else max(summ["btx_vs_own_expert"].values())
    out["btx_within_5pct_of_expert"] = {"target": 0.05, "measured": gap, "met": gap is not None and gap <= 0.05}
    return out


def run_smollm2(a, work: Path, res_dir: Path, results: dict) -> None:
    from tessera import hub
    from tessera.btx.data import domain_blocks, parse_domains

    smol = Path(hub.resolve_lm("default"))
    _, tok = hub.new_tiny_llama()
    domains = parse_domains(DOMAINS)
    s_train, s_held = {}, {}
    for d in domains:
        s_train[d.name], s_held[d.name] = domain_blocks(d, tok, a.smollm2_seq_len, 8 * a.smollm2_steps, a.smollm2_eval_blocks, seed=a.seed)
    cfg = {"expert_steps": a.smollm2_steps, "ft_steps": a.smollm2_ft_steps, "batch": 2, "seq_len": a.smollm2_seq_len, "lr": 1e-4,
           "ft_lr": 1e-4, "domain_blocks": 8 * a.smollm2_steps, "mixture_alpha": a.mixture_alpha, "router_init": a.router_init}
    results["smollm2"] = run_pipeline("smollm2", smol, work / "smollm2", a, (s_train, s_held), cfg, a.seed,
                                      {"btx": res_dir / "btx_routing_smollm2.png"})
    results["smollm2"]["heatmap"] = "benchmarks/results/btx_routing_smollm2.png"
    experts = [work / "smollm2" / "experts" / f"expert-{d.name}" for d in domains]
    results["mix_speed"] = mix_vs_mergekit(experts, smol, work, a.mergekit_python)


if __name__ == "__main__":
    main()
