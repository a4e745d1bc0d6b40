"""Recipe ``retrieval-prune``: DRAMA-style structured pruning of a Llama-family checkpoint.

    tessera run retrieval-prune model=default target_ratio=0.2 out=runs/smollm2-p20/model

Top to bottom: load the causal LM -> plan the pruned shape for the target
non-embedding parameter count -> rank layers by block influence on calibration text
and drop the least important -> rank FFN channels and GQA groups by activation on
the depth-pruned model and keep the most important -> save a smaller checkpoint of
the same class plus the tokenizer -> optionally (``cpt_steps`` > 0) continue pretraining
the pruned model, distilling from the unpruned one (``tessera.retrieval.recover``; the
recovery stage DRAMA's Sheared-LLaMA-style backbones went through).  Train it as a retriever with ``retrieval-train``
(``backbone=<out>``).  The dump dir gets ``config.yaml``, ``metrics.jsonl`` (one row
per original layer: block influence, kept or dropped), ``results.json`` (parameter
counts before and after, the plan, LM loss on held-out calibration chunks before
and after) and, unless ``out`` says otherwise, the checkpoint under ``model/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Config:
    model: str = "default"  # Llama-family causal LM: 'default' (SmolLM2-135M-Instruct) or a folder
    target_ratio: float = 0.2  # fraction of the non-embedding parameters to keep (used when target_params is 0)
    target_params: int = 0  # absolute non-embedding parameter count
    depth_share: float = 0.5  # share of the (log) reduction taken by dropping layers; the rest by width
    calibration: str = "wikitext2"  # wikitext2 (shared data; python-docs if absent) | python-docs | a text file/folder
    n_samples: int = 32  # calibration chunks (scaled down for CPU)
    seq_len: int = 256
    eval_samples: int = 8  # held-out chunks for the LM loss before/after
    keep_first_last: bool = True
    batch_size: int = 4
    # continued pretraining after pruning (0 steps = off); see tessera.retrieval.recover
    cpt_steps: int = 0
    cpt_text: str = "wikitext2"  # text to continue pretraining on; same choices as calibration
    cpt_distill: str = "hidden"  # hidden | logits | none (LM loss only)
    cpt_lm_weight: float = -1.0  # -1: 0 for hidden distillation, 1 otherwise
    cpt_lr: float = 2e-4
    cpt_batch_size: int = 8
    cpt_seq_len: int = 128
    out: str = ""  # checkpoint folder; default <dump_dir>/model
    dump_dir: str = "runs/retrieval-prune"
    seed: int = 0


def main(cfg: Config) -> Path:
    from tessera import ui
    from tessera.config import DumpDir
    from tessera.errors import InputError
    from tessera.retrieval.prune import prune, save_pruned

    if not cfg.target_params and not 0 < cfg.target_ratio <= 1:
        raise InputError(f"target_ratio={cfg.target_ratio} must lie in (0, 1], or give target_params; e.g. target_ratio=0.2")
    if not 0 <= cfg.depth_share <= 1:
        raise InputError(f"depth_share={cfg.depth_share} must lie in [0, 1]")
    if cfg.cpt_distill not in ("hidden", "logits", "none"):
        raise InputError(f"cpt_distill={cfg.cpt_distill} must be hidden, logits or none")
    out = Path(cfg.out) if cfg.out else Path(cfg.dump_dir) / "model"
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not empty; pass a new folder as out= or a new dump_dir=")
    with ui.status(f"pruning {cfg.model}"):
        model, tok, report = prune(cfg.model, target_params=cfg.target_params or None, target_ratio=cfg.target_ratio,
                                   depth_share=cfg.depth_share, calibration=cfg.calibration, n_samples=cfg.n_samples,
                                   seq_len=cfg.seq_len, eval_samples=cfg.eval_samples, keep_first_last=cfg.keep_first_last,
                                   batch_size=cfg.batch_size, seed=cfg.seed)
    dump = DumpDir(cfg.dump_dir, cfg)
    for i, bi in enumerate(report.layer_importance):
        dump.log(layer=i, block_influence=bi, kept=i in report.kept_layers)
    recovery = None
    if cfg.cpt_steps > 0:
        from tessera.retrieval.prune import calibration_texts, load_causal_lm
        from tessera.retrieval.recover import continued_pretraining

        teacher = load_causal_lm(cfg.model)[0] if cfg.cpt_distill != "none" else None
        with ui.status(f"continued pretraining for {cfg.cpt_steps} steps ({cfg.cpt_distill} distillation)"):
            recovery = continued_pretraining(
                model, tok, calibration_texts(cfg.cpt_text), teacher=teacher, distill=cfg.cpt_distill,
                lm_weight=None if cfg.cpt_lm_weight < 0 else cfg.cpt_lm_weight, steps=cfg.cpt_steps,
                batch_size=cfg.cpt_batch_size, seq_len=cfg.cpt_seq_len, lr=cfg.cpt_lr, seed=cfg.seed, log_every=max(1, cfg.cpt_steps // 20),
                on_log=lambda step, loss: dump.log(cpt_step=step, cpt_loss=loss))
        del teacher
    if dump.main:  # under torchrun only rank 0 writes
        save_pruned(model, tok, out, report)
    before, after = report.params_before["non_embedding"], report.params_after["non_embedding"]
    dump.write_results({"model": str(out), **report.to_dict(), "non_embedding_ratio": after / before,
                        "recovery": recovery.to_dict() if recovery else None})
    ui.info(f"pruned {cfg.model}: {before:,} -> {after:,} non-embedding parameters ({after / before:.1%}); saved to {out}")
    return Path(cfg.dump_dir)
