"""The image side of an LMFusion model (LlamaFusion, Shi et al. 2024, section 3): its config, the
per-layer image modules copied from the text modules, and the patch embedding in and out.

:class:`ImageLayer` holds one layer's image-specific input norm, Q/K/V/O projections, post-attention
norm and FFN, deep copies of the frozen text layer's (LMFusion section 3: "initialised from the text
modules").  :class:`LinearPatcher` and :class:`UNetPatcher` map image patches to the model width and
back to predicted noise (Transfusion section 2.1: a linear layer or a small U-Net down/up block).
The model that routes tokens through them is :class:`~tessera.models.lmfusion.LMFusionModel`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from tessera.errors import InputError
from tessera.models import diffusion as D

PATCHERS = ("linear", "unet")
IMAGE_MODULES = ("separate", "shared")  # LMFusion | Transfusion (one dense transformer for both modalities)
TEXT_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp")  # per text layer, copied for images
ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")  # per self-attention, copied for images


@dataclass
class LMFusionConfig:
    """Image side of an LMFusion model; ``base_model`` names the frozen text LLM (a :mod:`tessera.hub` spec).

    ``layers``: use only the first N layers of the base model (0 = all) - a CPU-sized option, not in
    the paper.  ``patch_size`` 2 for 8x8 digits (16 patches), 4 for 28x28 MNIST (49 patches); the paper
    uses a VAE latent with 2x2 patches (Transfusion section 2.1), which these small grey images do not need.
    """

    base_model: str = "default"
    layers: int = 0
    image_height: int = 8
    image_width: int = 8
    channels: int = 1
    patch_size: int = 2
    patcher: str = "linear"  # linear | unet (Transfusion section 2.1: both options)
    unet_channels: int = 32
    num_train_timesteps: int = D.NUM_TRAIN_TIMESTEPS  # Transfusion: 1000
    freeze_text: bool = True  # LMFusion; False = train the whole pretrained model (baseline)
    image_modules: str = "separate"  # separate (LMFusion) | shared (Transfusion: image tokens use the text modules)
    start_id: int = -1  # a text token put before every image-text sequence and prompt (BOS, or EOS for a model
    #                     pretrained on EOS-separated documents); -1 = none
    vocab_size: int = 0  # the base vocabulary (filled in from the base model)
    hidden_size: int = 0  # filled in from the base model

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size * self.patch_size

    @property
    def image_len(self) -> int:
        return (self.image_height // self.patch_size) * (self.image_width // self.patch_size)

    @property
    def start_ids(self) -> list[int]:
        """``[start_id]`` or ``[]``: what every image-text sequence and sampling prompt begins with."""
        return [self.start_id] if self.start_id >= 0 else []

    @property
    def boi_id(self) -> int:
        return self.vocab_size

    @property
    def eoi_id(self) -> int:
        return self.vocab_size + 1

    def validate(self) -> None:
        if self.patcher not in PATCHERS:
            raise InputError(f"unknown patcher {self.patcher!r}; use linear or unet")
        if self.patch_size < 1 or self.image_height % self.patch_size or self.image_width % self.patch_size:
            raise InputError(f"patch_size {self.patch_size} does not divide the {self.image_height}x{self.image_width} "
                             "images; pick a divisor")
        if self.image_modules not in IMAGE_MODULES:
            raise InputError(f"unknown image_modules {self.image_modules!r}; use separate (LMFusion) or shared (Transfusion)")
        if self.image_modules == "shared" and self.freeze_text:
            raise InputError("image_modules=shared routes images through the text modules (Transfusion), so they must "
                             "train: set freeze_text=false")
        if self.layers < 0:
            raise InputError("layers must be >= 0 (0 = every layer of the base model)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LMFusionConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# -- image modules -------------------------------------------------------------------------------

class ImageLayer(nn.Module):
    """The image-specific modules of one layer (LMFusion section 3), copied from the text layer."""

    def __init__(self, text_layer: nn.Module):
        super().__init__()
        attn = text_layer.self_attn
        for name in ATTN_PARTS:
            setattr(self, name, copy.deepcopy(getattr(attn, name)))
        for name in TEXT_PARTS:
            setattr(self, name, copy.deepcopy(getattr(text_layer, name)))


class LinearPatcher(nn.Module):
    """Linear patch embedding in and out (Transfusion section 2.1, "simple linear layer")."""

    def __init__(self, cfg: LMFusionConfig, d: int, embed_std: float):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(cfg.patch_dim, d)
        self.out = nn.Linear(d, cfg.patch_dim)
        nn.init.normal_(self.inp.weight, std=embed_std / math.sqrt(cfg.patch_dim * 0.33))  # ~ token-embedding scale
        nn.init.zeros_(self.inp.bias)
        nn.init.zeros_(self.out.weight)  # epsilon prediction starts at 0 (as DiT's zero-initialised output layer)
        nn.init.zeros_(self.out.bias)

    def encode(self, patches: torch.Tensor, temb: torch.Tensor):
        """``patches [n, L, p]`` (one row per image) -> ``([n, L, d], state)``."""
        return self.inp(patches), None

    def decode(self, h: torch.Tensor, state) -> torch.Tensor:
        return self.out(h)


class UNetPatcher(nn.Module):
    """A small U-Net down/up block around the transformer (Transfusion section 2.1, U-Net option).

    Down: two 3x3 convolutions with the timestep added per channel (the skip features), then a
    ``p x p`` stride-``p`` convolution to one ``d``-wide vector per patch.  Up: a transposed ``p x p``
    convolution back to full resolution, concatenated with the skip, two 3x3 convolutions to noise.
    (Transfusion's U-Net has several resolution levels; one level suffices for 8x8 / 28x28 digits.)
    """

    def __init__(self, cfg: LMFusionConfig, d: int, embed_std: float):
        super().__init__()
        self.cfg = cfg
        c, C, p = cfg.unet_channels, cfg.channels, cfg.patch_size
        self.conv_in = nn.Conv2d(C, c, 3, padding=1)
        self.time_proj = nn.Linear(d, c)
        self.conv_skip = nn.Conv2d(c, c, 3, padding=1)
        self.down = nn.Conv2d(c, d, p, stride=p)
        self.up = nn.ConvTranspose2d(d, c, p, stride=p)
        self.conv_mid = nn.Conv2d(2 * c, c, 3, padding=1)
        self.conv_out = nn.Conv2d(c, C, 3, padding=1)
        nn.init.normal_(self.down.weight, std=embed_std / math.sqrt(c * p * p * 0.33))
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _grid(self, n: int):
        cfg = self.cfg
        return cfg.image_height // cfg.patch_size, cfg.image_width // cfg.patch_size

    def encode(self, patches: torch.Tensor, temb: torch.Tensor):
        cfg = self.cfg
        img = D.unpatchify(patches, cfg.patch_size, cfg.image_height, cfg.image_width, cfg.channels)
        h = F.silu(self.conv_in(img) + self.time_proj(temb)[:, :, None, None])
        skip = F.silu(self.conv_skip(h))
        tokens = self.down(skip)  # [n, d, H/p, W/p]
        return tokens.flatten(2).transpose(1, 2), skip

    def decode(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        gh, gw = self._grid(h.shape[0])
        x = self.up(h.transpose(1, 2).reshape(h.shape[0], -1, gh, gw))
        x = self.conv_out(F.silu(self.conv_mid(torch.cat([x, skip.to(x.dtype)], 1))))
        return D.patchify(x, self.cfg.patch_size)


__all__ = ["ATTN_PARTS", "IMAGE_MODULES", "ImageLayer", "LMFusionConfig", "LinearPatcher", "PATCHERS", "TEXT_PARTS", "UNetPatcher"]
