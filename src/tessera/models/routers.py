"""Learned routers: token choice (top-k, load balancing), expert choice (capacity), auxiliary routers.

- :func:`expert_capacity` and :func:`expert_choice_route`: each expert picks its top-``k`` tokens
  by router score, ``k = capacity_factor * n_tokens / n_experts`` (Zhou et al. 2022, expert-choice
  routing; MoMa section 2.2 uses capacity ``1/E`` per expert, i.e. ``capacity_factor = 1``).
- :func:`token_choice_route` and :func:`load_balancing_loss`: each token picks its top-k experts
  (Switch Transformer, Fedus et al. 2022, eq. 4-6: ``alpha * E * sum_e f_e * P_e``).
- :func:`router_scores`: the sigmoid router of MoMa section 2.2 (eq. 1), optionally with the
  Gumbel-sigmoid noise of eq. 5 in training so that expert-choice selection explores.
- :class:`AuxRouter`: MoMa section 2.4: expert choice needs the whole batch and so is not causal;
  a small per-token classifier, trained on detached inputs to predict the expert-choice selection,
  replaces it at inference so that generation is causal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


ROUTER_NOISES = ("none", "gumbel")


def router_scores(logits: torch.Tensor, noise: str = "none", training: bool = False) -> torch.Tensor:
    """Router scores ``g = sigmoid(W_g x)`` (MoMa section 2.2, eq. 1), Gumbel-sigmoid in training (eq. 5).

    ``noise="gumbel"`` and ``training``: ``sigmoid(W_g x + G' - G'')`` with ``G', G''`` independent
    standard Gumbel samples (Gumbel-sigmoid, temperature 1; the difference of two Gumbels is a
    standard logistic variable, drawn here as ``log u - log(1 - u)``, ``u ~ U(0, 1)`` from torch's
    global generator, so ``torch.manual_seed`` reproduces it).  These noisy scores are both the
    expert-choice selection scores and the gate weights.  Otherwise (``"none"``, or evaluation):
    plain ``sigmoid(W_g x)``, deterministic.
    """
    if noise not in ROUTER_NOISES:
        raise ValueError(f"unknown router_noise {noise!r}; use one of {', '.join(ROUTER_NOISES)}")
    if noise == "gumbel" and training:
        u = torch.rand(logits.shape, device=logits.device, dtype=torch.float32)
        u = u.clamp(torch.finfo(torch.float32).tiny, 1.0 - torch.finfo(torch.float32).eps)
        logits = logits + (u.log() - torch.log1p(-u)).to(logits.dtype)
    return torch.sigmoid(logits)


def expert_capacity(n_tokens: int, n_experts: int, capacity_factor: float = 1.0) -> int:
    """Tokens per expert in expert-choice routing: ``ceil(capacity_factor * n / E)``, at most ``n``."""
    return min(n_tokens, math.ceil(capacity_factor * n_tokens / n_experts))


def expert_choice_route(scores: torch.Tensor, capacity: int) -> torch.Tensor:
    """Expert choice (MoMa section 2.2): expert ``e`` takes the ``capacity`` tokens with the highest score.

    ``scores``: ``[n, E]``; returns token indices ``[E, capacity]`` (each expert exactly its quota;
    a token may be picked by several experts or by none - those pass through the residual).
    """
    if capacity == 0:
        return scores.new_zeros((scores.shape[1], 0), dtype=torch.long)
    return scores.topk(capacity, dim=0).indices.t()


def token_choice_route(logits: torch.Tensor, top_k: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token choice: softmax over experts, each token keeps its ``top_k`` (Switch / Mixtral style).

    Returns ``(probs [n, E], expert ids [n, k], weights [n, k])``; weights are the raw softmax
    probability for ``k = 1`` (Switch) and renormalised over the chosen experts for ``k > 1``.
    """
    probs = logits.softmax(-1)
    w, ids = probs.topk(top_k, dim=-1)
    if top_k > 1:
        w = w / w.sum(-1, keepdim=True)
    return probs, ids, w


def load_balancing_loss(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss (eq. 4-6) without ``alpha``: ``E * sum_e f_e * P_e``.

    ``f_e``: fraction of token-to-expert assignments that went to ``e``; ``P_e``: mean router
    probability of ``e``.  Equals 1 under perfect balance.
    """
    E = probs.shape[-1]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    f = torch.bincount(ids.reshape(-1), minlength=E).to(probs.dtype) / ids.numel()
    return E * (f * probs.mean(0)).sum()


class AuxRouter(nn.Module):
    """Auxiliary router (MoMa section 2.4): per-token MLP ``d -> hidden -> E`` predicting selection.

    Trained with binary cross-entropy on *detached* inputs (its gradient never reaches the main
    model) against the selection the non-causal router made; at inference a token goes to expert
    ``e`` when ``sigmoid(logit_e) > 0.5``.  It looks at one token only, so routing by it is causal.
    """

    def __init__(self, d_model: int, n_out: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or d_model
        self.net = nn.Sequential(nn.Linear(d_model, hidden, bias=False), nn.SiLU(), nn.Linear(hidden, n_out, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, x: torch.Tensor, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(BCE loss, accuracy)`` of predicting ``selected`` (bool, same shape as the logits) from ``x.detach()``."""
        logits = self(x.detach())
        target = selected.to(logits.dtype)
        if logits.numel() == 0:
            z = logits.sum() * 0.0
            return z, z.detach() + 1.0
        loss = F.binary_cross_entropy_with_logits(logits, target)
        acc = ((logits > 0) == selected).float().mean().detach()
        return loss, acc
