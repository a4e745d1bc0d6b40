"""Recipe ``btx-branch``: Branch-Train-MiX steps 1-2 — branch a seed LLM and train one expert per domain.

    tessera run btx-branch seed_model=default domains=[wiki:wikitext2,mmlu:mmlu,code:python-code] steps=200

Top to bottom: parse the domains (``name:source``; see :mod:`tessera.btx.data`) -> for each
domain start an independent process that copies the seed, trains it on that domain alone with
the HF Trainer and writes ``<dump_dir>/experts/expert-<name>/`` (a Hugging Face checkpoint plus
``expert.json``) -> collect the experts' figures.  Up to ``max_parallel`` experts train at once
(0: one per ``threads_per_expert`` cores); ``launcher=torchrun nproc=8`` trains each expert data
parallel on 8 GPUs.  A rerun skips experts that finished.  Next: ``tessera btx mix``.

Defaults are scaled down for a CPU (the paper trains 7B experts on tens of billions of tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tessera.btx.data import DEFAULT_DOMAINS


@dataclass
class Config:
    seed_model: str = "default"  # Llama-family seed: 'default' (SmolLM2-135M-Instruct) or a folder
    domains: list[str] = field(default_factory=lambda: list(DEFAULT_DOMAINS))  # name:source
    steps: int = 50  # optimizer steps per expert (scaled down for CPU)
    batch_size: int = 4
    lr: float = 1e-4  # BTX used 1e-4 for the Llama-2 7B experts
    warmup_ratio: float = 0.05
    scheduler: str = "cosine"
    seq_len: int = 256
    max_train_blocks: int = 0  # 0: as many as steps * batch_size need (capped by the domain's text)
    max_parallel: int = 0  # experts training at once; 0: cpu_count // threads_per_expert
    threads_per_expert: int = 1
    launcher: str = "python"  # python | torchrun (one torchrun job per expert)
    nproc: int = 1  # GPUs per expert with launcher=torchrun
    dump_dir: str = "runs/btx-branch"
    seed: int = 0


def main(cfg: Config) -> Path:
    import json
    import os

    from tessera import ui
    from tessera.btx.branch import branch_train
    from tessera.btx.data import parse_domains
    from tessera.btx.train import TrainSettings
    from tessera.config import DumpDir
    from tessera.errors import InputError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("btx-branch starts one process per expert itself; run it as one process and pass "
                         "launcher=torchrun nproc=N to train each expert data parallel")
    domains = parse_domains(cfg.domains)
    settings = TrainSettings(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_ratio=cfg.warmup_ratio,
                             scheduler=cfg.scheduler, seed=cfg.seed, logging_steps=max(1, cfg.steps // 10))
    dump = DumpDir(cfg.dump_dir, cfg)
    need = cfg.max_train_blocks or cfg.steps * cfg.batch_size
    experts = branch_train(cfg.seed_model, domains, Path(cfg.dump_dir) / "experts", settings, seq_len=cfg.seq_len,
                           max_train_blocks=need, max_parallel=cfg.max_parallel, threads_per_expert=cfg.threads_per_expert,
                           launcher=cfg.launcher, nproc=cfg.nproc)
    rows = []
    for d, folder in zip(domains, experts):
        info = json.loads((folder / "expert.json").read_text())
        for i, loss in enumerate(info["loss"]):
            dump.log(expert=d.name, log_step=i, loss=loss)
        rows.append({"domain": d.name, "source": d.source, "folder": str(folder),
                     **{k: info[k] for k in ("steps", "tokens", "train_flops", "seconds", "pid", "train_blocks")},
                     "final_loss": info["loss"][-1] if info["loss"] else None})
    dump.write_results({"seed_model": cfg.seed_model, "experts": rows,
                        "next": "tessera btx mix " + " ".join(r["folder"] for r in rows) + f" --out {Path(cfg.dump_dir) / 'moe'}"})
    ui.info(f"trained {len(rows)} experts under {Path(cfg.dump_dir) / 'experts'}")
    return Path(cfg.dump_dir)
