"""Tiny mixed-modal batches and models shared by the tests in tests/models and tests/train."""

from __future__ import annotations

import numpy as np
import torch

from tessera.data.mixed_modal import MixedModalData, load_image_set, text_stream
from tessera.models.decoder import MixedModalConfig
from tessera.models.objectives import MixedModalLM

TEXT_DOC = ("The quick brown fox jumps over the lazy dog. Mixed-modal models read text and images. " * 40)


def tiny_data(setting: str = "chameleon", n_images: int = 200) -> MixedModalData:
    imgs, labels = load_image_set("digits")
    imgs, labels = imgs[:n_images], labels[:n_images]
    codes = np.rint(imgs.reshape(len(imgs), -1) * 16).astype(np.int64) if setting == "chameleon" else None
    return MixedModalData(setting, imgs, labels, text_stream([TEXT_DOC]), codes=codes, n_image_codes=17, patch_size=4)


def tiny_lm(setting: str = "chameleon", variant: str = "dense", data: MixedModalData | None = None, seed: int = 0,
            **kw) -> MixedModalLM:
    data = data or tiny_data(setting)
    torch.manual_seed(seed)
    cfg = MixedModalConfig(vocab_size=data.vocab.size, d_model=32, n_layers=2, n_heads=4, variant=variant,
                           n_experts=2, n_text_experts=2, n_image_experts=2, patch_dim=data.patch_dim, **kw)
    return MixedModalLM(cfg, setting)


def tiny_batch(data: MixedModalData, batch_size: int = 6, seed: int = 0) -> dict:
    return data.batch(batch_size, np.random.default_rng(seed))
