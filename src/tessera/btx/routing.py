"""BTX routing: routers, load-balancing losses, frozen experts, routing fractions.

Routing methods (BTX, Sec. 3.2-3.3 and 4.4), all on top of transformers' Mixtral:

- ``topk`` (default, k = 2): ``g(Wx) = SoftMax(TopK(Wx))``, softmax over the selected
  logits; equal to Mixtral's renormalised top-k, so a stock ``MixtralForCausalLM`` runs it;
- ``switch``: Switch Transformer top-1, the gate value is the full-softmax probability of
  the chosen expert (not renormalised to 1, so the router gets a gradient from the LM loss);
- ``soft``: every expert, weighted by the full softmax (dense compute);
- ``sample``: top-1 sampled from the softmax during training (argmax at evaluation), gate
  = its probability (the paper's "sample top-1").

``switch`` and ``sample`` replace the Mixtral router module with :class:`BTXRouter`
(a subclass, so transformers still records router logits); :func:`load_btx_model`
reinstalls it from ``config.btx_routing``.  A stock loader would run such a checkpoint
as top-1 with gate 1.0.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter, load_balancing_loss_func

from tessera.errors import InputError

ROUTINGS = ("topk", "switch", "soft", "sample")
BALANCE_LOSSES = ("btx", "hf", "none")
BTX_BALANCE_ALPHA = 0.01  # BTX Sec. 3.3


class BTXRouter(MixtralTopKRouter):
    """Mixtral's router with the BTX routing variants (``switch``, ``sample``; see module docstring)."""

    def __init__(self, config, mode: str = "switch"):
        super().__init__(config)
        if mode not in ("switch", "sample"):
            raise InputError(f"BTXRouter mode {mode!r}; use switch or sample (topk and soft run on the stock router)")
        self.mode = mode

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden_states, self.weight)
        probs = F.softmax(logits.float(), dim=-1)
        if self.mode == "sample" and self.training:
            idx = torch.multinomial(probs.detach(), 1)
        else:
            idx = probs.argmax(-1, keepdim=True)
        return logits, probs.gather(-1, idx), idx


def routing_gates(logits: torch.Tensor, top_k: int, routing: str = "topk") -> torch.Tensor:
    """Dense gate matrix ``[T, E]`` (zeros for experts a token is not routed to) from router logits."""
    probs = F.softmax(logits.float(), dim=-1)
    if routing == "soft":
        return probs
    k = 1 if routing in ("switch", "sample") else top_k
    top, idx = probs.topk(k, dim=-1)
    if routing == "topk":
        top = top / top.sum(-1, keepdim=True)  # = softmax over the selected logits
    return torch.zeros_like(probs).scatter(-1, idx, top)


def btx_load_balancing_loss(router_logits, top_k: int = 2, attention_mask: torch.Tensor | None = None,
                            alpha: float = BTX_BALANCE_ALPHA, routing: str = "topk") -> torch.Tensor:
    """BTX load balancing (BTX Sec. 3.3): ``alpha * N * sum_i u_i p_i``, summed over MoE layers.

    Per layer, over the (unpadded) tokens of the batch: ``u_i`` = mean gate value of
    expert i (the top-k, renormalised gate, zero where expert i is not selected) and
    ``p_i`` = mean softmax probability of expert i.  Both are differentiable.  For a
    uniform router ``sum_i u_i p_i = 1/N``, so the loss is ``alpha`` per layer.

    transformers' Mixtral auxiliary loss (:func:`hf_load_balancing_loss`) differs: it uses
    the fraction of tokens dispatched to each expert (a count, no gradient) instead of
    ``u_i``, pools tokens of all layers before multiplying (not a per-layer sum), and its
    default coefficient is 0.001.
    """
    if not router_logits:
        raise InputError("no router logits; call the model with output_router_logits=True")
    total = 0.0
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(torch.float32)
    for logits in router_logits:
        n = logits.shape[-1]
        probs = F.softmax(logits.float(), dim=-1)
        gates = routing_gates(logits, top_k, routing)
        if mask is None:
            u, p = gates.mean(0), probs.mean(0)
        else:
            m = mask.to(logits.device)
            denom = m.sum().clamp_min(1.0)
            u, p = (gates * m[:, None]).sum(0) / denom, (probs * m[:, None]).sum(0) / denom
        total = total + n * (u * p).sum()
    return alpha * total


def hf_load_balancing_loss(router_logits, num_experts: int, top_k: int = 2, attention_mask=None) -> torch.Tensor:
    """transformers' Mixtral auxiliary loss (Switch Transformer eq. 4-6, pooled over layers), unscaled."""
    return load_balancing_loss_func(tuple(router_logits), num_experts, top_k, attention_mask)


def set_routing(model, routing: str = "topk", top_k: int | None = None):
    """Switch a loaded Mixtral model to a routing method (in place); returns the model."""
    if routing not in ROUTINGS:
        raise InputError(f"routing={routing!r}; use one of {', '.join(ROUTINGS)}")
    cfg = model.config
    n = cfg.num_local_experts
    k = {"soft": n, "switch": 1, "sample": 1}.get(routing, top_k or cfg.num_experts_per_tok)
    if not 1 <= k <= n:
        raise InputError(f"top_k={k} must lie in 1..{n}")
    cfg.num_experts_per_tok = k
    if routing in ("switch", "sample"):
        cfg.btx_routing = routing
    elif hasattr(cfg, "btx_routing"):
        cfg.btx_routing = routing
    for layer in model.model.layers:
        moe = layer.mlp
        old = moe.gate
        if routing in ("switch", "sample"):
            new = BTXRouter(cfg, routing).to(old.weight.device)
            new.weight = old.weight
            moe.gate = new
        elif isinstance(old, BTXRouter):
            new = MixtralTopKRouter(cfg).to(old.weight.device)
            new.weight = old.weight
            moe.gate = new
        moe.top_k = k
        moe.gate.top_k = k
    return model


def load_btx_model(path, dtype=None, device=None):
    """``AutoModelForCausalLM.from_pretrained`` plus the BTX routing recorded in the config."""
    from transformers import AutoModelForCausalLM

    from tessera import hub

    device = torch.device(device) if device is not None else hub.default_device()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or hub.default_dtype(device))
    routing = getattr(model.config, "btx_routing", "topk") or "topk"
    if routing != "topk" and hasattr(model.model, "layers") and hasattr(model.model.layers[0].mlp, "gate"):
        set_routing(model, routing)
    return model.to(device)


def freeze_experts(model, frozen: bool = True) -> int:
    """Freeze (or unfreeze) every expert FFN; routers and shared weights stay trainable. Returns the frozen count."""
    n = 0
    for layer in model.model.layers:
        for p in layer.mlp.experts.parameters():
            p.requires_grad_(not frozen)
            n += p.numel()
    return n


@contextlib.contextmanager
def forced_expert(model, experts):
    """Route every token of every MoE layer to ``experts`` (an index or a list, equal gates) while inside."""
    ids = [experts] if isinstance(experts, int) else list(experts)
    n = model.config.num_local_experts
    if not ids or not all(0 <= e < n for e in ids):
        raise InputError(f"expert indices {ids} must lie in 0..{n - 1}")
    saved = []

    def make(gate):
        def forward(hidden_states):
            h = hidden_states.reshape(-1, gate.hidden_dim)
            logits = F.linear(h, gate.weight)
            idx = torch.tensor(ids, device=h.device).expand(h.shape[0], -1)
            return logits, torch.full(idx.shape, 1.0 / len(ids), device=h.device, dtype=torch.float32), idx
        return forward

    for layer in model.model.layers:
        gate = layer.mlp.gate
        saved.append((gate, gate.__dict__.get("forward")))
        gate.forward = make(gate)
    try:
        yield model
    finally:
        for gate, fwd in saved:
            if fwd is None:
                del gate.forward
            else:
                gate.forward = fwd


@torch.no_grad()
def routing_fractions(model, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """``[layers, experts]``: share of the top-k assignments that go to each expert, over ``blocks``
    (BTX Sec. 5.3 / Fig. 3 analysis; with soft routing, the share of the gate mass); each row sums to 1."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    counts = None
    for i in range(0, blocks.shape[0], batch_size):
        out = model(input_ids=blocks[i:i + batch_size].to(dev), output_router_logits=True)
        per_layer = []
        for layer, logits in zip(model.model.layers, out.router_logits):
            k = layer.mlp.top_k
            if k >= logits.shape[-1]:  # soft routing: every expert runs; count the gate mass
                per_layer.append(F.softmax(logits.float(), -1).sum(0))
            else:
                mode = "switch" if isinstance(layer.mlp.gate, BTXRouter) else "topk"
                per_layer.append((routing_gates(logits, k, mode) > 0).float().sum(0))
        c = torch.stack(per_layer)
        counts = c if counts is None else counts + c
    if was_training:
        model.train()
    return counts / counts.sum(-1, keepdim=True)
