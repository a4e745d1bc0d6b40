"""The modality-aware decoder: one global self-attention, per-modality or routed modules per block.

Every token carries a modality id (0 text, 1 image).  :class:`ModalityRouter` computes the index
lists once per forward; every block reuses them.  ``variant`` picks the block type (all with the same
per-token shapes, so FLOPs per token match - see :mod:`tessera.models.flops`):

=============  =====================================================================================
``dense``      all parameters shared
``mot``        Mixture-of-Transformers (MoT Algorithm 1): Q/K/V/O, FFN, norms untied by modality
``moe_tc``     shared attention, token-choice top-k MoE FFN + load-balancing loss
``moe_ec``     shared attention, expert-choice MoE FFN over all tokens (capacity factor)
``moma``       MoMa: shared attention, FFN experts in modality groups (``n_text_experts`` text +
               ``n_image_experts`` image), expert choice inside each group, capacity 1/E per expert
``*_mod``      any of the above with mixture-of-depths in alternating layers (capacity 25%)
=============  =====================================================================================

Transfusion setting (``patch_dim > 0``): image positions take continuous patches (linear patch
embedding plus a diffusion-timestep embedding) instead of token embeddings, and
:meth:`MixedModalTransformer.patch_out` maps their hidden states back to patch space.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from tessera.models.blocks import Block, ExpertChoiceMoE, ForwardContext, MoDBlock, SwiGLU, TokenChoiceMoE, _Experts
from tessera.models.masks import causal_mask
from tessera.models.modality import IMAGE, TEXT, ModalityRouter, PerModality

BASE_VARIANTS = ("dense", "mot", "moe_tc", "moe_ec", "moma")


def parse_variant(variant: str) -> tuple[str, bool]:
    """``"moma_mod"`` -> ``("moma", True)``; unknown names raise ``ValueError``."""
    base, mod = (variant[:-4], True) if variant.endswith("_mod") else (variant, False)
    if base not in BASE_VARIANTS:
        known = ", ".join([*BASE_VARIANTS, *(v + "_mod" for v in BASE_VARIANTS)])
        raise ValueError(f"unknown variant {variant!r}; known: {known}")
    return base, mod


@dataclass
class MixedModalConfig:
    """Architecture of a mixed-modal decoder (see the module docstring for ``variant``)."""

    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int = 0  # 0 -> 4 * d_model
    variant: str = "dense"
    n_experts: int = 4  # moe_tc / moe_ec
    top_k: int = 1  # moe_tc; 1 keeps FLOPs per token equal to dense
    capacity_factor: float = 1.0  # expert choice: each expert takes capacity_factor * n / E tokens (MoMa: 1)
    n_text_experts: int = 4  # MoMa headline: 4 text + 4 image experts
    n_image_experts: int = 4
    untie_attention: bool = False  # MoMa option: modality-specific Q/K/V/O (MoT always unties)
    mod_capacity: float = 0.25  # MoMa section 2.3: 25% capacity
    mod_every: int = 2  # MoD in every other layer (layers 1, 3, ...)
    aux_router: bool = True  # auxiliary routers for causal inference (expert choice and MoD layers)
    aux_hidden: int = 0  # 0 -> d_model
    patch_dim: int = 0  # Transfusion: channels * patch * patch; 0 = Chameleon (discrete image tokens)
    # Transfusion: learned absolute embedding of the k-th patch of an image (ViT / DiT patch positions), added to the
    # patch embedding; 0 = none (RoPE alone: a caption then has to find patch k at a template-dependent offset)
    image_positions: int = 0
    n_modalities: int = 2
    rope_theta: float = 10000.0
    # Expert-choice router noise (moe_ec, moma): "gumbel" = Gumbel-sigmoid scores in training (MoMa section 2.2,
    # eq. 5), none at evaluation; "none" = plain sigmoid.  The paper trains with Gumbel noise; the default stays
    # "none" so existing runs and checkpoints reproduce - pass router_noise="gumbel" for the paper's setting.
    router_noise: str = "none"

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 4 * self.d_model

    def to_dict(self) -> dict:
        return asdict(self)


def _ffn(cfg: MixedModalConfig, base: str) -> PerModality:
    d, h = cfg.d_model, cfg.hidden
    if base == "dense":
        return PerModality([SwiGLU(d, h)], takes_ctx=True)
    if base == "mot":
        return PerModality([SwiGLU(d, h) for _ in range(cfg.n_modalities)], takes_ctx=True)
    if base == "moe_tc":
        return PerModality([TokenChoiceMoE(d, h, cfg.n_experts, cfg.top_k)], takes_ctx=True)
    if base == "moe_ec":
        return PerModality([ExpertChoiceMoE(d, h, cfg.n_experts, cfg.capacity_factor, cfg.aux_router, cfg.aux_hidden,
                                                router_noise=cfg.router_noise)],
                           takes_ctx=True)
    groups = [cfg.n_text_experts, cfg.n_image_experts][: cfg.n_modalities]
    return PerModality([ExpertChoiceMoE(d, h, e, cfg.capacity_factor, cfg.aux_router, cfg.aux_hidden, name=f"moma{m}",
                                        router_noise=cfg.router_noise)
                        for m, e in enumerate(groups)], takes_ctx=True)


def build_block(cfg: MixedModalConfig, layer: int) -> nn.Module:
    base, mod = parse_variant(cfg.variant)
    untied = base == "mot" or (base == "moma" and cfg.untie_attention)
    n_attn = cfg.n_modalities if untied else 1
    block = Block(cfg.d_model, cfg.n_heads, _ffn(cfg, base), n_attn=n_attn,
                  n_ffn_norm=cfg.n_modalities if base == "mot" else 1, rope_theta=cfg.rope_theta)
    if mod and layer % cfg.mod_every == cfg.mod_every - 1:
        return MoDBlock(block, cfg.d_model, cfg.mod_capacity, cfg.aux_router, cfg.aux_hidden)
    return block


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of diffusion timesteps (DDPM / Transformer positional style)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = t.float()[:, None] * freqs[None]
    emb = torch.cat([ang.cos(), ang.sin()], dim=-1)
    return emb if dim % 2 == 0 else torch.nn.functional.pad(emb, (0, 1))


def patch_index(modality: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: the index of each position within its run of image positions (0 for the first patch of an
    image; text positions get their distance from the last image start and are not read)."""
    T = modality.shape[1]
    pos = torch.arange(T, device=modality.device).expand_as(modality)
    img = modality == IMAGE
    prev = torch.cat([torch.zeros_like(img[:, :1]), img[:, :-1]], 1)
    start = torch.where(img & ~prev, pos, torch.zeros_like(pos))
    return pos - start.cummax(1).values


class MixedModalTransformer(nn.Module):
    """Token/patch embeddings -> blocks (one global attention each) -> final norm -> hidden states."""

    def __init__(self, cfg: MixedModalConfig):
        super().__init__()
        parse_variant(cfg.variant)
        self.cfg = cfg
        d = cfg.d_model
        self.router = ModalityRouter(cfg.n_modalities)
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList([build_block(cfg, i) for i in range(cfg.n_layers)])
        base, _ = parse_variant(cfg.variant)
        self.norm = PerModality([nn.RMSNorm(d) for _ in range(cfg.n_modalities if base == "mot" else 1)])
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.patch_dim:
            self.patch_in = nn.Linear(cfg.patch_dim, d)
            self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
            self.patch_out = nn.Linear(d, cfg.patch_dim)
            if cfg.image_positions:
                self.patch_pos = nn.Embedding(cfg.image_positions, d)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _Experts):
            for p in (m.w1, m.w2, m.w3):
                nn.init.normal_(p, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: torch.Tensor, modality: torch.Tensor, mask: torch.Tensor | None = None,
                patches: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                routing: str = "batch", pad: torch.Tensor | None = None) -> tuple[torch.Tensor, ForwardContext]:
        """Hidden states ``[B, T, d]`` and the forward context (aux losses, routing stats).

        ``tokens``/``modality``: ``[B, T]``; ``mask``: ``[B, 1, T, T]`` bool or ``None`` (causal);
        Transfusion: ``patches [B, T, patch_dim]`` and per-token diffusion ``timesteps [B, T]`` (read
        at image positions only); ``pad``: ``[B, T]`` bool, keys that no query may attend (left padding).
        """
        B, T = tokens.shape
        if pad is not None and bool(pad.any()):
            base = mask if mask is not None else causal_mask(T, tokens.device)[None, None]
            eye = torch.eye(T, dtype=torch.bool, device=tokens.device)[None, None]
            mask = (base & ~pad[:, None, None, :]) | eye
        ctx = ForwardContext(index=self.router.route(modality), modality=modality,
                             positions=torch.arange(T, device=tokens.device).expand(B, T), mask=mask, routing=routing)
        x = self.embed(tokens)
        if self.cfg.patch_dim:
            if patches is None or timesteps is None:
                raise ValueError("the Transfusion setting needs patches and timesteps for image positions")
            img = ctx.index.idx[IMAGE]
            xf = x.reshape(B * T, -1).clone()
            t = timesteps.reshape(-1)[img]
            emb = self.patch_in(patches.reshape(B * T, -1)[img]) + self.time_mlp(timestep_embedding(t, self.cfg.d_model))
            if self.cfg.image_positions:
                k = patch_index(modality).reshape(-1)[img].clamp(max=self.cfg.image_positions - 1)
                emb = emb + self.patch_pos(k)
            xf[img] = emb.to(xf.dtype)  # bf16 under autocast; the residual stream keeps the embeddings' dtype
            x = xf.view(B, T, -1)
        ix = ctx.index
        if ix.mixed and all(getattr(layer, "untied", False) for layer in self.layers):  # Block (or a wrapper of one)
            # MoT / MoMa without MoD: the residual stream stays in modality order from the embeddings to the final
            # norm (two gathers per block, for attention, instead of four)
            xs = ix.sort(x.reshape(B * T, -1))
            for layer in self.layers:
                xs = layer(xs, ctx, presorted=True)
            return ix.unsort(self.norm(xs, ix, presorted=True)).view(B, T, -1), ctx
        for layer in self.layers:
            x = layer(x, ctx)
        return self.norm(x.reshape(B * T, -1), ctx.index).view(B, T, -1), ctx

    def text_logits(self, hidden_flat: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_flat)


__all__ = ["MixedModalConfig", "MixedModalTransformer", "parse_variant", "BASE_VARIANTS", "TEXT", "IMAGE"]
