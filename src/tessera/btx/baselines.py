"""BTX's baselines (Sec. 4.2), run in the same harness and compute-matched by the caller.

- **Branch-Train-Merge (BTM)** (Li et al., 2022): keep the domain experts as separate
  models and ensemble them at inference; here each next token is predicted by the expert
  whose likelihood of the prefix so far is highest (``top1``), or by the posterior mixture
  ``sum_e p(e | prefix) p_e(x_t | prefix)`` with a uniform prior (``posterior``, BTM's own
  ensemble).  No extra training: its cost is the branch stage.
- **Sparse upcycling** (Komatsuzaki et al., 2023): the seed's FFN copied N times into a
  Mixtral MoE (:func:`upcycle`), the whole compute budget spent on MoE training.
- **Dense continued training**: the seed trained further on the mixture of all domains.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tessera.errors import InputError

BTM_MODES = ("top1", "posterior")


def btm_logprobs(expert_logprobs: list[torch.Tensor], mode: str = "top1") -> torch.Tensor:
    """Ensemble per-token log-probabilities ``[n, T]`` of E experts into BTM's ``[n, T]``.

    At position t only the prefix ``x_<=t`` is used to weigh the experts (no peeking at the
    token being predicted): ``s_e(t) = sum_{j<t} log p_e(x_j)``.  ``top1`` takes the expert
    with the highest ``s_e(t)``; at t = 0, where all experts tie, the uniform mixture is used.
    ``posterior`` uses ``softmax_e(s_e(t))`` as mixture weights (uniform prior).
    """
    if mode not in BTM_MODES:
        raise InputError(f"BTM mode {mode!r}; use top1 or posterior")
    lp = torch.stack(expert_logprobs)  # [E, n, T]
    e = lp.shape[0]
    prefix = torch.cumsum(lp, -1) - lp  # score of the tokens before t
    if mode == "posterior":
        w = torch.log_softmax(prefix, 0)
        return torch.logsumexp(w + lp, 0)
    best = prefix.argmax(0, keepdim=True)
    out = lp.gather(0, best).squeeze(0)
    out[:, 0] = torch.logsumexp(lp[:, :, 0], 0) - math.log(e)
    return out


def btm_perplexity(expert_logprobs: list[torch.Tensor], mode: str = "top1") -> float:
    return float(math.exp(-btm_logprobs(expert_logprobs, mode).mean()))


def upcycle(seed_model: str | Path, num_experts: int, out: str | Path, experts_per_token: int = 2,
            router_init: str = "normal", seed: int = 0, overwrite: bool = False):
    """Sparse upcycling: a Mixtral checkpoint whose experts are all copies of the seed's FFN."""
    from tessera import hub
    from tessera.btx.mix import mix_experts

    path = hub.resolve_lm(str(seed_model))
    return mix_experts([path] * num_experts, out, experts_per_token=experts_per_token, router_init=router_init,
                       seed=seed, overwrite=overwrite)
