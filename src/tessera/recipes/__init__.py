"""Runnable jobs: each recipe module has a config dataclass ``Config`` (with ``seed``
and ``dump_dir``) and ``main(cfg) -> Path`` (the dump dir).

``tessera run NAME [config.yaml] key=value ...`` looks the module up here.
"""

from __future__ import annotations

import importlib

from tessera.errors import InputError

# recipe name -> module under tessera.recipes
RECIPES: dict[str, str] = {
    "retrieval-train": "retrieval_train",
    "retrieval-prune": "retrieval_prune",
    "selfcite-simpo": "selfcite_simpo",
    "mixed-modal-pretrain": "mixed_modal_pretrain",
    "pit": "pit",
    "btx-branch": "btx_branch",
    "btx-finetune": "btx_finetune",
    "lmfusion-train": "lmfusion_train",
}


def get_recipe(name: str):
    """The recipe module for ``name``; an unknown name lists the known ones."""
    if name not in RECIPES:
        known = ", ".join(sorted(RECIPES)) or "none yet"
        raise InputError(f"unknown recipe '{name}'; known recipes: {known}")
    return importlib.import_module(f"tessera.recipes.{RECIPES[name]}")


def run_recipe(name: str, config_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()):
    from tessera.config import load_config

    module = get_recipe(name)
    cfg = load_config(module.Config, config_path, list(overrides))
    try:
        return module.main(cfg)
    finally:
        _shutdown_distributed()


def _shutdown_distributed() -> None:
    """Leave the torchrun process group cleanly (gloo's threads can otherwise abort the exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
