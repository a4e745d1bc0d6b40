"""Recipe ``btx-finetune``: Branch-Train-MiX step 3 — MoE finetuning of a mixed Mixtral checkpoint.

    tessera run btx-finetune model=runs/btx-branch/moe domains=[wiki:wikitext2,mmlu:mmlu,code:python-code] steps=100

Top to bottom: load the Mixtral checkpoint that ``tessera btx mix`` wrote -> set the routing
(``topk`` with k=2 as in BTX; ``switch`` top-1, ``soft``, ``sample``) -> optionally freeze the
experts -> train on an equal mixture of the domains with the HF Trainer, adding the load-balancing
loss (``balance=btx``: alpha*N*sum_i u_i p_i, alpha 0.01, summed over layers; ``balance=hf``:
transformers' Mixtral auxiliary loss; ``none``) -> save the routed checkpoint (``out``,
default ``<dump_dir>/model``) -> held-out perplexity per domain and the routing fractions per
domain and layer (``routing.png``).  DDP/FSDP: launch with ``torchrun`` or ``accelerate launch``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tessera.btx.data import DEFAULT_DOMAINS


@dataclass
class Config:
    model: str = "runs/btx-branch/moe"  # a Mixtral folder written by `tessera btx mix`
    domains: list[str] = field(default_factory=lambda: list(DEFAULT_DOMAINS))  # name:source, the finetuning mixture
    steps: int = 50  # scaled down for CPU
    batch_size: int = 4
    lr: float = 1e-4
    warmup_ratio: float = 0.05
    scheduler: str = "cosine"
    seq_len: int = 256
    routing: str = "topk"  # topk | switch | soft | sample
    top_k: int = 0  # 0: the checkpoint's num_experts_per_tok (2 for BTX)
    balance: str = "btx"  # btx | hf | none
    balance_coef: float = 0.01  # alpha for btx (paper: 0.01); the coefficient for hf (transformers default 0.001)
    freeze_experts: bool = False
    eval_blocks: int = 16  # held-out blocks per domain for perplexity and routing
    out: str = ""  # default <dump_dir>/model
    dump_dir: str = "runs/btx-finetune"
    seed: int = 0


def main(cfg: Config) -> Path:
    import shutil

    import torch
    from transformers import AutoTokenizer

    from tessera import hub, ui
    from tessera.btx.analysis import domain_routing, plot_routing_heatmap
    from tessera.btx.data import domain_blocks, parse_domains
    from tessera.btx.routing import freeze_experts, load_btx_model, set_routing
    from tessera.btx.train import TrainSettings, perplexity, train_model
    from tessera.config import DumpDir, atomic_dir
    from tessera.errors import InputError

    model_dir = Path(cfg.model).expanduser()
    if not (model_dir / "config.json").is_file():
        raise InputError(f"no Mixtral checkpoint at {model_dir}; run `tessera btx mix EXPERT... --out {model_dir}` first")
    out = Path(cfg.out) if cfg.out else Path(cfg.dump_dir) / "model"
    domains = parse_domains(cfg.domains)
    torch.manual_seed(cfg.seed)
    device = hub.default_device()
    model = load_btx_model(model_dir, dtype=torch.float32, device=device)
    if getattr(model.config, "model_type", "") != "mixtral":
        raise InputError(f"{model_dir} is a {model.config.model_type} model; pass the Mixtral folder that `tessera btx mix` wrote")
    set_routing(model, cfg.routing, cfg.top_k or None)
    n_frozen = freeze_experts(model) if cfg.freeze_experts else 0
    tok = AutoTokenizer.from_pretrained(model_dir)
    per_domain = cfg.steps * cfg.batch_size // len(domains) + 1
    train, held = {}, {}
    for d in domains:
        train[d.name], held[d.name] = domain_blocks(d, tok, cfg.seq_len, per_domain, cfg.eval_blocks, seed=cfg.seed)
    mixture = torch.cat(list(train.values()))
    dump = DumpDir(cfg.dump_dir, cfg)
    settings = TrainSettings(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_ratio=cfg.warmup_ratio,
                             scheduler=cfg.scheduler, seed=cfg.seed, logging_steps=max(1, cfg.steps // 10))
    with ui.status(f"MoE finetuning ({cfg.routing}, balance={cfg.balance})"):
        model, history = train_model(model, mixture, Path(cfg.dump_dir) / "trainer", settings, moe=True, balance=cfg.balance,
                                     balance_coef=cfg.balance_coef, routing=cfg.routing)
    for r in history:
        dump.log(**r)
    if dump.main:  # under torchrun only rank 0 writes
        shutil.rmtree(Path(cfg.dump_dir) / "trainer", ignore_errors=True)
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    ppl = {name: perplexity(model, blocks) for name, blocks in held.items()}
    fractions = domain_routing(model, held)
    if dump.main:
        plot_routing_heatmap(fractions, Path(cfg.dump_dir) / "routing.png")
    dump.write_results({"model": str(out), "routing": cfg.routing, "balance": cfg.balance, "frozen_expert_params": n_frozen,
                        "heldout_perplexity": ppl, "average_perplexity": sum(ppl.values()) / len(ppl),
                        "routing_fractions": fractions, "heatmap": str(Path(cfg.dump_dir) / "routing.png")})
    ui.info("held-out perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()))
    return Path(cfg.dump_dir)
