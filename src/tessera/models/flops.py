"""Analytic FLOPs per token for the mixed-modal decoders (what the forward pass computes).

Counts matrix-product FLOPs (2 per multiply-add), as in Kaplan et al. 2020 / Chinchilla: active
parameters of every projection a token goes through, attention scores and values over the full
``T x T`` matrix that SDPA computes with a mask, routers and auxiliary routers, the LM head (every
token in the Chameleon setting, text tokens in Transfusion) and the patch/timestep layers for image
patches.  Training FLOPs are 3x forward (backward = 2x forward).  Norms and element-wise ops are left
out.  Per layer and token, with ``d`` model width, ``h`` FFN hidden, ``T`` sequence length:

- attention projections ``8 d^2`` (Q, K, V, O), attention ``4 T d``;
- SwiGLU FFN ``6 d h``; expert choice: ``capacity_factor * 6 d h`` on average (each of the ``E``
  experts takes ``c n / E`` of the ``n`` tokens) + router ``2 d E`` + auxiliary router;
  token choice: ``top_k * 6 d h`` + router;
- MoD layer: router ``2 d`` + aux router + ``c`` x (the block with attention over ``c T`` tokens).

Dense and MoT have identical FLOPs per token by construction (MoT only unties parameters).
"""

from __future__ import annotations

import torch

from tessera.models.decoder import MixedModalConfig, parse_variant
from tessera.models.modality import IMAGE, TEXT


def _aux(cfg: MixedModalConfig, n_out: int) -> float:
    if not cfg.aux_router:
        return 0.0
    ha = cfg.aux_hidden or cfg.d_model
    return 2.0 * cfg.d_model * ha + 2.0 * ha * n_out


def ffn_flops(cfg: MixedModalConfig, modality: int) -> float:
    """Forward FLOPs per token of one layer's FFN (incl. routers) for a token of ``modality``."""
    base, _ = parse_variant(cfg.variant)
    d, h = cfg.d_model, cfg.hidden
    if base in ("dense", "mot"):
        return 6.0 * d * h
    if base == "moe_tc":
        return cfg.top_k * 6.0 * d * h + 2.0 * d * cfg.n_experts
    E = cfg.n_experts if base == "moe_ec" else (cfg.n_text_experts if modality == TEXT else cfg.n_image_experts)
    return cfg.capacity_factor * 6.0 * d * h + 2.0 * d * E + _aux(cfg, E)


def block_flops(cfg: MixedModalConfig, seq_len: int, modality: int) -> float:
    d = cfg.d_model
    return 8.0 * d * d + 4.0 * seq_len * d + ffn_flops(cfg, modality)


def forward_flops_per_token(cfg: MixedModalConfig, seq_len: int, modality: int = TEXT, setting: str = "chameleon") -> float:
    """Forward FLOPs for one token of ``modality`` in a sequence of ``seq_len`` tokens."""
    _, mod = parse_variant(cfg.variant)
    d = cfg.d_model
    total = 0.0
    for layer in range(cfg.n_layers):
        if mod and layer % cfg.mod_every == cfg.mod_every - 1:
            c = cfg.mod_capacity
            total += 2.0 * d + _aux(cfg, 1) + c * block_flops(cfg, c * seq_len, modality)
        else:
            total += block_flops(cfg, seq_len, modality)
    if setting == "transfusion" and modality == IMAGE:
        p = cfg.patch_dim
        total += 2.0 * p * d + 2.0 * (d * d + d * d) + 2.0 * d * p  # patch in, timestep MLP, patch out
    else:
        total += 2.0 * d * cfg.vocab_size  # LM head
    return total


def train_flops_per_token(cfg: MixedModalConfig, seq_len: int, modality: int = TEXT, setting: str = "chameleon") -> float:
    """Training FLOPs = 3 x forward (backward costs twice the forward)."""
    return 3.0 * forward_flops_per_token(cfg, seq_len, modality, setting)


def batch_train_flops(cfg: MixedModalConfig, modality: torch.Tensor, setting: str = "chameleon") -> float:
    """Training FLOPs of one step on a ``[B, T]`` batch (every position is computed, padding included)."""
    T = modality.shape[-1]
    n_img = int((modality == IMAGE).sum())
    n_txt = modality.numel() - n_img
    return n_txt * train_flops_per_token(cfg, T, TEXT, setting) + n_img * train_flops_per_token(cfg, T, IMAGE, setting)
