"""Transformer blocks for mixed-modal decoders: dense, MoT, MoE (token / expert choice), MoMa, MoD.

All variants share the same shapes per token (attention ``d -> 3d -> d``, SwiGLU FFN with hidden
``h``), so an MoT or MoMa token costs what a dense token costs (plus a router); see
:mod:`tessera.models.flops`.

- dense: every parameter shared;
- MoT (Mixture-of-Transformers, Algorithm 1): Q/K/V/O, FFN and both norms untied by modality,
  one global self-attention over the whole sequence;
- MoE token choice: shared attention, top-k softmax router + load-balancing loss;
- MoE expert choice: shared attention, each expert takes ``capacity_factor * n / E`` tokens;
- MoMa (section 2.1-2.2): shared attention, FFN experts split into modality groups, expert choice
  inside each group with capacity ``1/E`` per expert, sigmoid scores weight the outputs;
- MoD (mixture-of-depths, Raposo et al. 2024 section 3; MoMa section 2.3): a router picks the top
  ``capacity`` fraction of each sequence's tokens; only those go through the block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from tessera.models.masks import causal_mask, gather_mask
from tessera.models.modality import ModalityIndex, ModalityRouter, PerModality
from tessera.models.routers import (AuxRouter, expert_capacity, expert_choice_route, load_balancing_loss, router_scores,
                                    token_choice_route)


class LossSink:
    """Where the blocks of one forward put their auxiliary losses and routing stats.

    A plain object, not a dict or dataclass, on purpose: FSDP2 with a mixed-precision policy rebuilds
    every dataclass, dict and list in a block's inputs before each block (``cast_forward_inputs``,
    ``torch.distributed.utils._apply_to_tensors``), which would leave a block appending to a copy; an
    object of another type passes through by reference.
    """

    def __init__(self):
        self.losses: dict[str, list[torch.Tensor]] = {}
        self.stats: dict[str, list[torch.Tensor]] = {}


@dataclass
class ForwardContext:
    """Per-forward state shared by all layers: routing computed once, masks, positions, aux losses.

    ``routing``: ``"batch"`` (expert choice / MoD over the batch: the training-time, non-causal
    path) or ``"aux"`` (auxiliary routers decide per token: the causal inference path).
    """

    index: ModalityIndex
    modality: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]
    mask: torch.Tensor | None = None  # [B, 1, T, T] bool; None = causal
    routing: str = "batch"
    sink: LossSink = field(default_factory=LossSink)  # shared by every copy of this context
    rope_cache: dict = field(default_factory=dict, repr=False, compare=False)  # of these positions: see rope()

    def rope(self, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's ``(cos, sin)`` for ``positions``, computed once per forward instead of twice per layer."""
        key = (head_dim, theta, dtype)
        if key not in self.rope_cache:
            self.rope_cache[key] = rope_cos_sin(self.positions, head_dim, theta, dtype)
        return self.rope_cache[key]

    @property
    def aux_losses(self) -> dict[str, list[torch.Tensor]]:
        return self.sink.losses

    @property
    def stats(self) -> dict[str, list[torch.Tensor]]:
        return self.sink.stats

    def add_loss(self, name: str, value: torch.Tensor) -> None:
        self.aux_losses.setdefault(name, []).append(value)

    def add_stat(self, name: str, value: torch.Tensor) -> None:
        self.stats.setdefault(name, []).append(value.detach())

    def subset(self, sel: torch.Tensor, router: ModalityRouter) -> ForwardContext:
        """The context for the gathered positions ``sel`` ``[B, k]`` (MoD); losses and stats are shared."""
        modality = self.modality.gather(1, sel)
        return replace(self, index=router.route(modality), modality=modality, positions=self.positions.gather(1, sel),
                       mask=gather_mask(self.mask, sel), rope_cache={})


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[B, 1, T, head_dim / 2]`` of the rotary angles ``position * theta^(-i / (head_dim / 2))``."""
    half = head_dim // 2
    freqs = theta ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    ang = positions[:, None, :, None].float() * freqs
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0,
               cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021) on ``[B, H, T, dh]`` with positions ``[B, T]``
    (``cos_sin``: :func:`rope_cos_sin` of them, when already computed)."""
    half = x.shape[-1] // 2
    cos, sin = cos_sin if cos_sin is not None else rope_cos_sin(positions, x.shape[-1], theta, x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020), as in Llama / Chameleon: ``W2(silu(W1 x) * W3 x)``."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _Experts(nn.Module):
    """``E`` SwiGLU experts stored as stacked weights, so equal-sized groups run as one batched matmul."""

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        for w, fan_in in ((self.w1, d_model), (self.w3, d_model), (self.w2, hidden)):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """``x [E, k, d] -> [E, k, d]``: expert ``e`` on its own ``k`` tokens (grouped matmul)."""
        return torch.bmm(F.silu(torch.bmm(x, self.w1)) * torch.bmm(x, self.w3), self.w2)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w1[e]) * (x @ self.w3[e])) @ self.w2[e]


class ExpertChoiceMoE(nn.Module):
    """Expert-choice MoE with sigmoid gates (MoMa section 2.2, eq. 1) and an auxiliary router (section 2.4).

    ``routing="batch"``: every expert takes exactly ``expert_capacity(n, E, capacity_factor)``
    tokens (top scores among the ``n`` tokens it sees - non-causal); the auxiliary router is trained
    on the detached input to predict that selection.  ``routing="aux"``: a token goes to every
    expert whose auxiliary score is above 0.5 (causal).  Output: ``sum_e g_e(x) * FFN_e(x)`` over
    the experts that took the token, ``g = sigmoid(W_g x)``; tokens no expert took get zero
    (they pass through the residual).  ``router_noise="gumbel"``: in training mode the scores are
    Gumbel-sigmoid (MoMa eq. 5, :func:`~tessera.models.routers.router_scores`) for both selection
    and gating; in eval mode there is no noise.
    """

    def __init__(self, d_model: int, hidden: int, n_experts: int, capacity_factor: float = 1.0,
                 aux_router: bool = True, aux_hidden: int = 0, name: str = "moe_ec", router_noise: str = "none"):
        super().__init__()
        router_scores(torch.zeros(0, n_experts), router_noise)  # validates the name
        self.n_experts, self.capacity_factor, self.name, self.router_noise = n_experts, capacity_factor, name, router_noise
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.experts = _Experts(n_experts, d_model, hidden)
        self.aux = AuxRouter(d_model, n_experts, aux_hidden) if aux_router else None

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        n = x.shape[0]
        gates = router_scores(self.gate(x), self.router_noise, self.training)  # [n, E]; eq. 1 (eq. 5 in training)
        out = torch.zeros_like(x)
        if ctx.routing == "batch":
            chosen = expert_choice_route(gates, expert_capacity(n, self.n_experts, self.capacity_factor))  # [E, k]
            ctx.stats.setdefault(f"{self.name}.chosen", []).append(chosen.detach())
            if self.aux is not None:
                sel = torch.zeros_like(gates, dtype=torch.bool)
                sel.scatter_(0, chosen.t(), True)
                loss, acc = self.aux.loss(x, sel)
                ctx.add_loss("aux_router", loss)
                ctx.add_stat("aux_router_acc", acc)
            if chosen.shape[1]:
                y = self.experts.batched(x[chosen])  # [E, k, d]
                w = gates.gather(0, chosen.t()).t()  # [E, k]
                out.index_add_(0, chosen.reshape(-1), (y * w[..., None]).reshape(-1, x.shape[1]).to(out.dtype))
            return out
        if ctx.routing != "aux":
            raise ValueError(f"unknown routing {ctx.routing!r}; use 'batch' or 'aux'")
        if self.aux is None:
            raise ValueError("routing='aux' needs auxiliary routers; build the model with aux_router=True")
        sel = self.aux(x) > 0
        for e in range(self.n_experts):
            ids = torch.nonzero(sel[:, e], as_tuple=False).squeeze(1)
            out.index_add_(0, ids, (self.experts.one(e, x[ids]) * gates[ids, e, None]).to(out.dtype))
        return out


class TokenChoiceMoE(nn.Module):
    """Token-choice top-k MoE (Switch / Mixtral), dropless, with the Switch load-balancing loss."""

    def __init__(self, d_model: int, hidden: int, n_experts: int, top_k: int = 1):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.experts = _Experts(n_experts, d_model, hidden)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        probs, ids, w = token_choice_route(self.gate(x), self.top_k)
        ctx.add_loss("load_balance", load_balancing_loss(probs, ids))
        out = torch.zeros_like(x)
        for e in range(self.n_experts):
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            out.index_add_(0, tok, (self.experts.one(e, x[tok]) * w[tok, slot, None]).to(out.dtype))
        return out


def _linear(d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False)


class Block(nn.Module):
    """Pre-norm transformer block with modality-aware parts (MoT Algorithm 1 when everything is untied).

    ``n_attn`` copies of (attention norm, QKV, O): 1 = shared, 2 = untied by modality (MoT);
    ``n_ffn_norm`` copies of the FFN norm; ``ffn`` a :class:`PerModality` of FFN modules (one shared,
    one per modality, an MoE, or one expert-choice MoE per modality group for MoMa).  Attention is
    always one global SDPA over the whole sequence.
    """

    def __init__(self, d_model: int, n_heads: int, ffn: PerModality, n_attn: int = 1, n_ffn_norm: int = 1,
                 rope_theta: float = 10000.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads, self.rope_theta = n_heads, rope_theta
        self.attn_norm = PerModality([nn.RMSNorm(d_model) for _ in range(n_attn)])
        self.wqkv = PerModality([_linear(d_model, 3 * d_model) for _ in range(n_attn)])
        self.wo = PerModality([_linear(d_model, d_model) for _ in range(n_attn)])
        self.ffn_norm = PerModality([nn.RMSNorm(d_model) for _ in range(n_ffn_norm)])
        self.ffn = ffn

    def _attend(self, qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """``qkv [B*T, 3d]`` in sequence order -> attention output ``[B*T, d]`` (one global SDPA, RoPE)."""
        B, T = ctx.modality.shape
        d = qkv.shape[-1] // 3
        q, k, v = qkv.view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        cs = ctx.rope(q.shape[-1], self.rope_theta, q.dtype)
        q, k = apply_rope(q, ctx.positions, cos_sin=cs), apply_rope(k, ctx.positions, cos_sin=cs)
        if ctx.mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)
        return a.transpose(1, 2).reshape(B * T, d)

    def attention(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, d = x.shape
        h = self.attn_norm(x.reshape(B * T, d), ctx.index)
        return self.wo(self._attend(self.wqkv(h, ctx.index), ctx), ctx.index).view(B, T, d)

    @property
    def untied(self) -> bool:
        """Some part has a module per modality (MoT; MoMa's expert groups)."""
        return any(m.untied for m in (self.attn_norm, self.wqkv, self.wo, self.ffn_norm, self.ffn))

    def forward_sorted(self, xs: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The block on ``xs [B*T, d]`` in modality order (:meth:`ModalityIndex.sort`), result in modality order:
        every per-modality module runs on a contiguous slice; only attention needs sequence order (Q/K/V
        unsorted, its output sorted back)."""
        ix = ctx.index
        qkv = self.wqkv.sorted(self.attn_norm.sorted(xs, ix), ix)
        xs = xs + self.wo.sorted(ix.sort(self._attend(ix.unsort(qkv), ctx)), ix)
        return xs + self.ffn.sorted(self.ffn_norm.sorted(xs, ix), ix, ctx)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, presorted: bool = False) -> torch.Tensor:
        """``x [B, T, d]``; ``presorted``: ``x`` is ``[B*T, d]`` in modality order and so is the result (the
        decoder's path for MoT / MoMa; through ``__call__``, so FSDP's hooks gather the block's parameters)."""
        if presorted:
            return self.forward_sorted(x, ctx)
        B, T, d = x.shape
        ix = ctx.index
        if ix.mixed and self.untied:
            return ix.unsort(self.forward_sorted(ix.sort(x.reshape(B * T, d)), ctx)).view(B, T, d)
        x = x + self.attention(x, ctx)
        xf = x.reshape(B * T, d)
        return (xf + self.ffn(self.ffn_norm(xf, ix), ix, ctx)).view(B, T, d)


class MoDBlock(nn.Module):
    """Mixture-of-depths around a block (Raposo et al. 2024, section 3.1-3.5; MoMa section 2.3).

    ``routing="batch"``: a linear router scores every token; the top ``capacity`` fraction of each
    sequence (per-sequence top-k, non-causal) is gathered, runs through the block (attending only
    to the other selected tokens), and is updated as ``x + sigmoid(r) * (block(x) - x)``; the other
    tokens skip the block.  The auxiliary router learns the selection from the detached input.
    ``routing="aux"``: the auxiliary router selects per token (causal); the block runs with keys
    restricted to the selected tokens, so the result equals the gathered computation for that
    selection.  MoMa uses sigmoid router weights; the MoD paper multiplies by the raw score.
    """

    def __init__(self, block: nn.Module, d_model: int, capacity: float = 0.25, aux_router: bool = True,
                 aux_hidden: int = 0):
        super().__init__()
        self.block, self.capacity = block, capacity
        self.router = nn.Linear(d_model, 1, bias=False)
        self.aux = AuxRouter(d_model, 1, aux_hidden) if aux_router else None
        self._modality_router = ModalityRouter()

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, d = x.shape
        r = self.router(x).squeeze(-1)  # [B, T]
        w = torch.sigmoid(r)
        if ctx.routing == "batch":
            k = max(1, math.ceil(self.capacity * T))
            sel = r.topk(k, dim=1).indices.sort(dim=1).values  # [B, k], in sequence order
            ctx.add_stat("mod_selected_fraction", torch.tensor(k / T))
            if self.aux is not None:
                selected = torch.zeros(B, T, dtype=torch.bool, device=x.device).scatter_(1, sel, True)
                loss, acc = self.aux.loss(x, selected[..., None])
                ctx.add_loss("aux_router", loss)
                ctx.add_stat("mod_aux_router_acc", acc)
            idx = sel[..., None].expand(B, k, d)
            xs = x.gather(1, idx)
            ys = self.block(xs, ctx.subset(sel, self._modality_router))
            return x.scatter(1, idx, xs + w.gather(1, sel)[..., None] * (ys - xs))
        if self.aux is None:
            raise ValueError("routing='aux' needs auxiliary routers; build the model with aux_router=True")
        selected = self.aux(x).squeeze(-1) > 0  # [B, T]
        ctx.add_stat("mod_selected_fraction", selected.float().mean())
        counts = selected.sum(1)
        k = int(counts.max())
        if k == 0:
            return x
        # gather each sequence's selected tokens (in order) to the front, padded to the longest selection
        # with unselected ones; only these k columns run through the block, so skipped tokens cost nothing
        ar = torch.arange(T, device=x.device)
        sel = torch.sort(torch.where(selected, ar, ar + T), dim=1).indices[:, :k]  # [B, k]
        valid = torch.arange(k, device=x.device)[None] < counts[:, None]  # [B, k]
        sub = ctx.subset(sel, self._modality_router)
        # plain causal: the valid columns are in sequence order, so causal among them is lower-triangular
        base = sub.mask if sub.mask is not None else causal_mask(k, x.device)[None, None]
        eye = torch.eye(k, dtype=torch.bool, device=x.device)[None, None]
        idx = sel[..., None].expand(B, k, d)
        xs = x.gather(1, idx)
        ys = self.block(xs, replace(sub, mask=(base & valid[:, None, None, :]) | eye))
        upd = torch.where(valid[..., None], xs + w.gather(1, sel)[..., None] * (ys - xs), xs)
        return x.scatter(1, idx, upd.to(x.dtype))
