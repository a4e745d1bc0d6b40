"""Recipe ``retrieval-prune``: DRAMA-style structured pruning of a Llama-family checkpoint.

    tessera run retrieval-prune model=default target_ratio=0.2 out=runs/smollm2-p20/model

Top to bottom: load the causal LM -> plan the pruned shape for the target
non-embedding parameter count -> rank layers by block influence on calibration text
and drop the least important -> rank FFN channels and GQA groups by activation on
the depth-pruned model and keep the most important -> save a smaller checkpoint of
the same class plus the tokenizer.  Train it as a retriever with ``retrieval-train``
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
    save_pruned(model, tok, out, report)
    before, after = report.params_before["non_embedding"], report.params_after["non_embedding"]
    dump.write_results({"model": str(out), **report.to_dict(), "non_embedding_ratio": after / before})
    ui.info(f"pruned {cfg.model}: {before:,} -> {after:,} non-embedding parameters ({after / before:.1%}); saved to {out}")
    return Path(cfg.dump_dir)
