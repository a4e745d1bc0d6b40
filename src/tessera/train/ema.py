"""An exponential moving average of a model's weights (Polyak averaging), for evaluation and sampling.

Diffusion models are evaluated and sampled with an EMA of their weights (DDPM: 0.9999, DiT: 0.9999): with
few images per batch the raw weights wander, and one evaluation of them can move by several percent from
the next.  :func:`weight_ema` is :class:`torch.optim.swa_utils.AveragedModel` with the usual warm-up of the
decay, ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so that early evaluations are not dominated
by the initial weights.  ``ema.module`` is the averaged copy; ``ema.update_parameters(model)`` after each
optimizer step; its ``state_dict`` (weights and the update count) goes into the checkpoint beside the
model's (:func:`tessera.train.save_checkpoint` ``averaged=``).
"""

from __future__ import annotations

import torch
from torch import nn


def ema_multi_avg_fn(decay: float):
    """``multi_avg_fn`` of :class:`~torch.optim.swa_utils.AveragedModel`: ``avg <- lerp(avg, cur, 1 - d_n)``,
    ``d_n = min(decay, (1 + n) / (10 + n))``."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged) -> None:
        n = float(n_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return update


def weight_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An :class:`~torch.optim.swa_utils.AveragedModel` of ``model`` (a copy on its device) with the warm-up EMA;
    ``model``'s parameters must be plain tensors (single process or DDP: FSDP2's shards are not averaged here)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        from tessera.errors import InputError

        raise InputError("a weight EMA needs unsharded parameters; run with distributed=ddp or none, or ema_decay=0")
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(decay))


__all__ = ["ema_multi_avg_fn", "weight_ema"]
