"""BTX's baselines (Sec. 4.2), run in the same harness and compute-matched by the caller.

- **Branch-Train-Merge (BTM)** (Li et al., 2022): keep the domain experts as separate
  models and ensemble them at inference, ``p(x_t | x_<t) = sum_e p(e | x_<t) p_e(x_t | x_<t)``.
  The domain posterior ``p(e | x_<t)`` comes from a classifier on the prefix
  (:class:`PrefixDomainClassifier`, a bag-of-tokens softmax trained on the experts' training
  blocks; mode ``classifier``), or from Bayes' rule on the experts' own likelihoods of the
  prefix with a uniform prior (``posterior``), or the single most likely expert (``top1``).
- **Sparse upcycling** (Komatsuzaki et al., 2023): the seed's FFN copied N times into a
  Mixtral MoE (:func:`upcycle`), the whole compute budget spent on MoE training.
- **Dense continued training**: the seed trained further on the mixture of all domains.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tessera.errors import InputError

BTM_MODES = ("top1", "posterior", "classifier")


def btm_logprobs(expert_logprobs: list[torch.Tensor], mode: str = "top1",
                 domain_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Ensemble per-token log-probabilities ``[n, T]`` of E experts into BTM's ``[n, T]``.

    At position t only the prefix ``x_<=t`` is used to weigh the experts (no peeking at the
    token being predicted): ``s_e(t) = sum_{j<t} log p_e(x_j)``.  ``top1`` takes the expert
    with the highest ``s_e(t)``; at t = 0, where all experts tie, the uniform mixture is used.
    ``posterior`` uses ``softmax_e(s_e(t))`` as mixture weights (uniform prior).
    ``classifier`` uses ``domain_logprobs`` (``[E, n, T]``, log p(e | x_<=t) for the token at
    t, e.g. :meth:`PrefixDomainClassifier.prefix_logprobs`) as mixture weights.
    """
    if mode not in BTM_MODES:
        raise InputError(f"BTM mode {mode!r}; use one of {', '.join(BTM_MODES)}")
    lp = torch.stack(expert_logprobs)  # [E, n, T]
    e = lp.shape[0]
    if mode == "classifier":
        if domain_logprobs is None or domain_logprobs.shape != lp.shape:
            raise InputError(f"BTM classifier mode needs domain log-probs of shape {tuple(lp.shape)}")
        return torch.logsumexp(domain_logprobs + lp, 0)
    prefix = torch.cumsum(lp, -1) - lp  # score of the tokens before t
    if mode == "posterior":
        w = torch.log_softmax(prefix, 0)
        return torch.logsumexp(w + lp, 0)
    best = prefix.argmax(0, keepdim=True)
    out = lp.gather(0, best).squeeze(0)
    out[:, 0] = torch.logsumexp(lp[:, :, 0], 0) - math.log(e)
    return out


def btm_perplexity(expert_logprobs: list[torch.Tensor], mode: str = "top1", domain_logprobs: torch.Tensor | None = None) -> float:
    return float(math.exp(-btm_logprobs(expert_logprobs, mode, domain_logprobs).mean()))


class PrefixDomainClassifier:
    """BTM's router: ``p(domain | x_<t)`` from the prefix's bag of tokens (a linear softmax).

    ``logits(prefix) = mean_{j in prefix} W[x_j] + b``, trained with cross-entropy on every
    prefix of the domains' training blocks (each block labelled with its domain).  At t = 0
    (empty prefix) the prior ``softmax(b)`` is used.  Cheap: one ``[V, E]`` table.
    """

    def __init__(self, vocab_size: int, num_domains: int):
        self.weight = torch.zeros(vocab_size, num_domains)
        self.bias = torch.zeros(num_domains)

    def _prefix_logits(self, blocks: torch.Tensor, weight=None, bias=None) -> torch.Tensor:
        """``[n, T, E]``: logits for the token at t from the tokens before t."""
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        w = weight[blocks]  # [n, T, E]
        csum = torch.nn.functional.pad(torch.cumsum(w, 1)[:, :-1], (0, 0, 1, 0))  # tokens strictly before t
        count = torch.arange(blocks.shape[1], dtype=w.dtype).clamp(min=1)[None, :, None]
        return csum / count + bias

    def fit(self, domain_blocks: list[torch.Tensor], steps: int = 300, batch_size: int = 128, lr: float = 0.1, seed: int = 0):
        """Train on ``domain_blocks[e]`` (``[n_e, T]`` blocks of domain e); returns self."""
        g = torch.Generator().manual_seed(seed)
        weight = self.weight.clone().requires_grad_(True)
        bias = self.bias.clone().requires_grad_(True)
        opt = torch.optim.Adam([weight, bias], lr=lr)
        for _ in range(steps):
            xs, ys = [], []
            for e, blocks in enumerate(domain_blocks):
                idx = torch.randint(0, blocks.shape[0], (max(1, batch_size // len(domain_blocks)),), generator=g)
                xs.append(blocks[idx])
                ys.append(torch.full((len(idx),), e))
            x, y = torch.cat(xs), torch.cat(ys)
            logits = self._prefix_logits(x, weight, bias)[:, 1:]  # position 0 sees no prefix
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, None].expand(-1, logits.shape[1]).reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.weight, self.bias = weight.detach(), bias.detach()
        return self

    @torch.no_grad()
    def prefix_logprobs(self, blocks: torch.Tensor) -> torch.Tensor:
        """``[E, n, T - 1]`` log p(domain | x_<=t) for predicting token t+1 (aligned with
        :func:`tessera.btx.train.token_logprobs`)."""
        logits = self._prefix_logits(blocks)[:, 1:]  # the prediction of x_t (t >= 1) sees x_<t
        return torch.log_softmax(logits, -1).permute(2, 0, 1)

    @torch.no_grad()
    def accuracy(self, blocks: torch.Tensor, domain: int, prefix_len: int = 32) -> float:
        """Share of ``blocks`` whose first ``prefix_len`` tokens are classified as ``domain``."""
        logits = self._prefix_logits(blocks[:, : prefix_len + 1])[:, -1]
        return float((logits.argmax(-1) == domain).float().mean())


def upcycle(seed_model: str | Path, num_experts: int, out: str | Path, experts_per_token: int = 2,
            router_init: str = "normal", seed: int = 0, overwrite: bool = False):
    """Sparse upcycling: a Mixtral checkpoint whose experts are all copies of the seed's FFN."""
    from tessera import hub
    from tessera.btx.mix import mix_experts

    path = hub.resolve_lm(str(seed_model))
    return mix_experts([path] * num_experts, out, experts_per_token=experts_per_token, router_init=router_init,
                       seed=seed, overwrite=overwrite)
