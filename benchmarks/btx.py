"""Benchmark of Branch-Train-MiX against its compute-matched peers, same data, same harness, same run.

Domains (real text): ``wiki`` = WikiText-2 (train on valid, held out: test), ``mmlu`` = MMLU
questions (train on val, held out: dev), ``code`` = this Python's standard-library sources
(document-level hash split).  Every figure is a held-out perplexity per domain.

Part 1 (tiny seed): a small Llama (``hub.new_tiny_llama``, SmolLM2 tokenizer) pretrained from
scratch on the mixture of the domains -> the seed.  Then, from the seed:

- **experts**: one per domain, each trained in its own process (``tessera.btx.branch``);
- **BTX**: ``mix_experts`` (top-2, router N(0, 0.02)) + MoE finetuning on the mixture with
  the BTX load-balancing loss (alpha 0.01);
- **BTM**: the experts as an ensemble, the expert per prefix chosen by likelihood (top-1);
  its compute is the branch stage only (the paper's BTM uses the same experts);
- **sparse upcycling**: the seed's FFN copied once per domain, the whole budget (branch + MoE
  finetuning FLOPs) spent on MoE training of the mixture;
- **dense**: the seed trained on the mixture for the same FLOPs.

FLOPs are counted as 6 x active parameters x tokens (+ attention scores), so a top-2 MoE step
costs more than a dense step and the baselines get fewer/more steps accordingly.

Part 2: the same pipeline from the embedded SmolLM2-135M-Instruct, short (a few steps each).

Part 3: time and peak memory of ``tessera btx mix`` vs ``mergekit-moe`` mixing the SmolLM2
experts (mergekit only from a separate venv, ``--mergekit-python``; reported absent otherwise).

Goals: BTX has the best average held-out perplexity of the compute-matched methods, and on
each domain is within 5% of that domain's own expert.  Writes benchmarks/results/btx.json and
benchmarks/results/btx_routing.png.  Usage: python benchmarks/btx.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["wiki:wikitext2", "mmlu:mmlu", "code:python-code"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    import transformers

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "load_average_at_start": list(os.getloadavg())}


def flops_per_step(config, seq_len: int, batch: int) -> float:
    from tessera.btx.train import train_flops_per_token

    return train_flops_per_token(config, seq_len) * seq_len * batch


def load(path, moe=False):
    from transformers import AutoModelForCausalLM

    from tessera.btx.routing import load_btx_model

    return load_btx_model(path, dtype=torch.float32, device="cpu") if moe else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def save(model, tok, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def run_pipeline(tag: str, seed_dir: Path, tok, work: Path, a, data, *, expert_steps: int, ft_steps: int, batch: int,
                 seq_len: int, lr: float, ft_lr: float, heatmap: Path | None) -> dict:
    """Experts -> BTX, BTM, upcycling, dense from one seed; held-out perplexity per domain for each."""
    from tessera.btx.analysis import domain_routing, plot_routing_heatmap
    from tessera.btx.baselines import btm_perplexity, upcycle
    from tessera.btx.branch import branch_train
    from tessera.btx.data import parse_domains
    from tessera.btx.mix import mix_experts
    from tessera.btx.train import TrainSettings, perplexity, token_logprobs, train_model

    domains = parse_domains(DOMAINS)
    train, held = data
    names = [d.name for d in domains]
    mixture = torch.cat([train[n] for n in names])
    seed = load(seed_dir)
    f_dense = flops_per_step(seed.config, seq_len, batch)
    out: dict = {"seed_dir": str(seed_dir)}

    # 1. branch: one process per expert, no shared state (fresh each run; only the seed is reused)
    shutil.rmtree(work / "experts", ignore_errors=True)
    t0 = time.perf_counter()
    s = TrainSettings(steps=expert_steps, batch_size=batch, lr=lr, seed=a.seed, logging_steps=max(1, expert_steps // 5))
    experts = branch_train(str(seed_dir), domains, work / "experts", s, seq_len=seq_len, max_train_blocks=expert_steps * batch,
                           max_parallel=a.max_parallel, threads_per_expert=a.threads)
    branch_s = time.perf_counter() - t0
    infos = [json.loads((p / "expert.json").read_text()) for p in experts]
    branch_flops = sum(i["train_flops"] for i in infos)
    log(f"[{tag}] branch: {len(experts)} experts in {branch_s:.0f} s (pids {[i['pid'] for i in infos]})")

    # 2. mix + MoE finetune (BTX)
    moe_dir = work / "btx-mixed"
    rep = mix_experts(experts, moe_dir, experts_per_token=2, router_init="normal", seed=a.seed, overwrite=True)
    moe = load(moe_dir, moe=True)
    f_moe = flops_per_step(moe.config, seq_len, batch)
    ft = TrainSettings(steps=ft_steps, batch_size=batch, lr=ft_lr, seed=a.seed, logging_steps=max(1, ft_steps // 5))
    t0 = time.perf_counter()
    btx, btx_hist = train_model(moe, mixture, work / "trainer", ft, moe=True, balance="btx")
    ft_s = time.perf_counter() - t0
    budget = branch_flops + ft_steps * f_moe
    log(f"[{tag}] BTX finetune {ft_steps} steps in {ft_s:.0f} s; budget {budget:.3g} FLOPs")

    # 3. compute-matched baselines
    dense_steps = max(1, round(budget / f_dense))
    up_steps = max(1, round(budget / f_moe))
    t0 = time.perf_counter()
    dense, _ = train_model(load(seed_dir), mixture, work / "trainer", TrainSettings(steps=dense_steps, batch_size=batch, lr=ft_lr, seed=a.seed,
                                                                                   logging_steps=max(1, dense_steps // 5)))
    dense_s = time.perf_counter() - t0
    upcycle(seed_dir, len(domains), work / "upcycled", seed=a.seed, overwrite=True)
    t0 = time.perf_counter()
    up, _ = train_model(load(work / "upcycled", moe=True), mixture, work / "trainer",
                        TrainSettings(steps=up_steps, batch_size=batch, lr=ft_lr, seed=a.seed, logging_steps=max(1, up_steps // 5)),
                        moe=True, balance="btx")
    up_s = time.perf_counter() - t0
    log(f"[{tag}] dense {dense_steps} steps ({dense_s:.0f} s), upcycling {up_steps} steps ({up_s:.0f} s)")

    # 4. evaluation
    ppl: dict = {m: {} for m in ("seed", "dense", "sparse_upcycling", "btm", "btx")}
    expert_ppl: dict = {}
    expert_models = [load(p) for p in experts]
    for n in names:
        blocks = held[n]
        ppl["seed"][n] = perplexity(seed, blocks)
        ppl["dense"][n] = perplexity(dense, blocks)
        ppl["sparse_upcycling"][n] = perplexity(up, blocks)
        ppl["btx"][n] = perplexity(btx, blocks)
        lps = [token_logprobs(m, blocks) for m in expert_models]
        ppl["btm"][n] = btm_perplexity(lps, "top1")
        expert_ppl[n] = {d: float(math.exp(-lp.mean())) for d, lp in zip(names, lps)}
    avg = {m: sum(v.values()) / len(v) for m, v in ppl.items()}
    fractions = domain_routing(btx, held)
    if heatmap is not None:
        plot_routing_heatmap(fractions, heatmap, expert_names=[f"{n} expert" for n in names],
                             title=f"BTX routing after MoE finetuning ({tag} seed): share of tokens per expert")
    compute_matched = ["dense", "sparse_upcycling", "btm", "btx"]
    best = min(compute_matched, key=lambda m: avg[m])
    within = {n: ppl["btx"][n] / expert_ppl[n][n] - 1 for n in names}
    out.update({
        "config": {"expert_steps": expert_steps, "ft_steps": ft_steps, "dense_steps": dense_steps, "upcycling_steps": up_steps,
                   "batch": batch, "seq_len": seq_len, "lr_branch": lr, "lr_continued": ft_lr, "router_init": "normal",
                   "top_k": 2, "balance": "btx alpha=0.01", "held_out_blocks": {n: int(held[n].shape[0]) for n in names}},
        "flops": {"branch": branch_flops, "btx_finetune": ft_steps * f_moe, "btx_total": budget, "dense": dense_steps * f_dense,
                  "sparse_upcycling": up_steps * f_moe, "btm": branch_flops, "dense_step": f_dense, "moe_step": f_moe},
        "seconds": {"branch_wall": branch_s, "experts": [i["seconds"] for i in infos], "mix": rep.seconds, "btx_finetune": ft_s,
                    "dense": dense_s, "sparse_upcycling": up_s},
        "expert_pids": [i["pid"] for i in infos],
        "heldout_perplexity": ppl, "average_perplexity": avg, "expert_perplexity": expert_ppl,
        "btx_vs_own_expert": within, "routing_fractions": fractions,
        "btx_finetune_log": [r for r in btx_hist if "loss" in r],
        "goals": {"btx_best_average": {"met": best == "btx", "best": best, "btx": avg["btx"],
                                       "runner_up": min((m for m in compute_matched if m != "btx"), key=lambda m: avg[m])},
                  "btx_within_5pct_of_own_expert": {"met": all(v <= 0.05 for v in within.values()),
                                                    "relative_gap": within}},
    })
    return out


def pretrain_tiny_seed(work: Path, a, train, tok) -> Path:
    from tessera import hub
    from tessera.btx.train import TrainSettings, train_model

    seed_dir = work / "seed"
    if (seed_dir / "config.json").is_file():
        return seed_dir
    model, tok = hub.new_tiny_llama(hidden_size=a.hidden, num_layers=a.layers, num_heads=4, num_kv_heads=2,
                                    intermediate_size=4 * a.hidden, max_positions=512, seed=a.seed)
    mixture = torch.cat(list(train.values()))
    t0 = time.perf_counter()
    train_model(model, mixture, work / "trainer", TrainSettings(steps=a.seed_steps, batch_size=a.batch, lr=a.seed_lr, seed=a.seed,
                                                                logging_steps=max(1, a.seed_steps // 5)))
    log(f"seed pretraining: {a.seed_steps} steps in {time.perf_counter() - t0:.0f} s")
    save(model, tok, seed_dir)
    return seed_dir


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/tessera-btx-bench", help="folder for checkpoints (resumes the seed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed-steps", type=int, default=100)
    ap.add_argument("--seed-lr", type=float, default=3e-3)
    ap.add_argument("--expert-steps", type=int, default=35)
    ap.add_argument("--ft-steps", type=int, default=15)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-blocks", type=int, default=24)
    ap.add_argument("--max-parallel", type=int, default=2)
    ap.add_argument("--smollm2-steps", type=int, default=2, help="expert steps from SmolLM2 (0: skip part 2)")
    ap.add_argument("--smollm2-ft-steps", type=int, default=1)
    ap.add_argument("--smollm2-seq-len", type=int, default=64)
    ap.add_argument("--smollm2-eval-blocks", type=int, default=3)
    ap.add_argument("--mergekit-python", default="/tmp/mkvenv/bin/python")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "btx.json"))
    ap.add_argument("--parts", default="tiny,smollm2", help="tiny and/or smollm2 (smollm2 includes the mix-vs-mergekit timing); "
                    "parts run in separate invocations update the same JSON")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    os.environ.setdefault("TESSERA_QUIET", "1")

    from tessera import hub
    from tessera.btx.data import domain_blocks, parse_domains
    from tessera.config import atomic_write_text

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    parts = set(a.parts.split(","))
    results: dict = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    results.update({"benchmark": "btx", "machine": machine(), "domains": DOMAINS})
    results.setdefault("args", {}).update({p: vars(a) for p in parts})
    _, tok = hub.new_tiny_llama()
    domains = parse_domains(DOMAINS)
    need = max(a.seed_steps, a.expert_steps * 4) * a.batch
    train, held = {}, {}
    for d in domains:
        train[d.name], held[d.name] = domain_blocks(d, tok, a.seq_len, need // len(domains) + a.batch, a.eval_blocks, seed=a.seed)
    results["data"] = {n: {"train_blocks": int(train[n].shape[0]), "heldout_blocks": int(held[n].shape[0])} for n in train}

    res_dir = Path(a.out).parent
    if "tiny" in parts:
        run_tiny(a, work, train, held, tok, res_dir, results)
    if "smollm2" in parts:
        run_smollm2(a, work, domains, tok, res_dir, results)
    results[f"seconds_{'+'.join(sorted(parts))}"] = time.perf_counter() - t_start
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    merged = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}  # another part may have finished meanwhile
    merged.update({k: v for k, v in results.items() if k not in ("tiny", "smollm2", "mix_speed") or k in produced(parts)})
    atomic_write_text(a.out, json.dumps(merged, indent=2))
    log(f"wrote {a.out} in {time.perf_counter() - t_start:.0f} s")


def produced(parts) -> set:
    return ({"tiny"} if "tiny" in parts else set()) | ({"smollm2", "mix_speed"} if "smollm2" in parts else set())


def run_tiny(a, work, train, held, tok, res_dir, results) -> None:
    from tessera.config import atomic_write_text

    seed_dir = pretrain_tiny_seed(work, a, train, tok)
    results["tiny"] = run_pipeline("tiny", seed_dir, tok, work / "tiny", a, (train, held), expert_steps=a.expert_steps,
                                   ft_steps=a.ft_steps, batch=a.batch, seq_len=a.seq_len, lr=a.lr, ft_lr=a.lr,
                                   heatmap=res_dir / "btx_routing.png")
    results["tiny"]["heatmap"] = "benchmarks/results/btx_routing.png"
    log(f"tiny: average perplexity {results['tiny']['average_perplexity']}")
    atomic_write_text(work / "tiny.partial.json", json.dumps(results["tiny"], indent=2))


def run_smollm2(a, work, domains, tok, res_dir, results) -> None:
    from tessera import hub
    from tessera.btx.data import domain_blocks

    smol = Path(hub.resolve_lm("default"))
    s_train, s_held = {}, {}
    for d in domains:
        s_train[d.name], s_held[d.name] = domain_blocks(d, tok, a.smollm2_seq_len, 8 * a.smollm2_steps, a.smollm2_eval_blocks, seed=a.seed)
    results["smollm2"] = run_pipeline("smollm2", smol, tok, work / "smollm2", a, (s_train, s_held), expert_steps=a.smollm2_steps,
                                      ft_steps=a.smollm2_ft_steps, batch=2, seq_len=a.smollm2_seq_len, lr=1e-4, ft_lr=1e-4,
                                      heatmap=res_dir / "btx_routing_smollm2.png")
    results["smollm2"]["heatmap"] = "benchmarks/results/btx_routing_smollm2.png"
    experts = [work / "smollm2" / "experts" / f"expert-{d.name}" for d in domains]
    results["mix_speed"] = mix_vs_mergekit(experts, smol, work, a.mergekit_python)


if __name__ == "__main__":
    main()
