"""Training sequences for LMFusion: captioned digits in both orders, tokenized by the base LLM's tokenizer.

The captions, digit sets and the scoring of captions are the mixed-modal ones
(:mod:`tessera.data.mixed_modal`: :data:`CAPTION_TEMPLATES`, :func:`caption_for`, :func:`parse_digit`,
:func:`load_image_set`); only the text side changes, because LMFusion keeps the pretrained model's
tokenizer and vocabulary instead of bytes.  BOI/EOI are the new ids of
:class:`~tessera.models.lmfusion_modules.LMFusionConfig` (``vocab_size``, ``vocab_size + 1``).  Sequences:

- generation order (caption first; Transfusion: 80% of pairs): ``caption BOI <image> EOI EOS``;
  ``cond_dropout`` of them (10%, for classifier-free guidance) drop the caption: ``BOI <image> EOI EOS``
- understanding order (image first): ``BOI <image> EOI caption EOS``
- text only (``text_fraction``, 0 by default: with frozen text modules a text-only sequence has no
  trainable parameter on its path): a window of a token stream.

Batches follow the mixed-modal Transfusion format (``tokens, modality, image_id, targets,
understanding, labels, patches``) plus ``attention_mask`` (right padding).  Targets are -100 at
image positions, padding and where the next token is BOI/EOI (the base LM head has no row for them).
"""

from __future__ import annotations

import numpy as np
import torch

from tessera.data.mixed_modal import CAPTION_TEMPLATES, caption_for
from tessera.errors import InputError
from tessera.models.diffusion import patchify
from tessera.models.modality import IMAGE, TEXT


class LMFusionData:
    """Samples batches of captioned-image sequences (see the module docstring).

    ``images`` float ``[N, H, W]`` in [0, 1] (scaled to [-1, 1] patches); ``boi_id``/``eoi_id`` from the
    model config; ``text_tokens`` an int array (token stream) for text-only sequences.
    """

    def __init__(self, tokenizer, images: np.ndarray, labels: np.ndarray, boi_id: int, eoi_id: int, patch_size: int = 2,
                 caption_first: float = 0.8, cond_dropout: float = 0.1, text_fraction: float = 0.0,
                 text_tokens: np.ndarray | None = None, templates=CAPTION_TEMPLATES, start_ids: list[int] = ()):
        H, W = images.shape[1:]
        if H % patch_size or W % patch_size:
            raise InputError(f"patch_size {patch_size} does not divide the {H}x{W} images; pick a divisor")
        if text_fraction > 0 and (text_tokens is None or len(text_tokens) < 64):
            raise InputError("text_fraction > 0 needs a text corpus of at least 64 tokens; pass text_dir or text_fraction=0")
        self.tokenizer, self.images, self.labels = tokenizer, images, labels
        self.boi_id, self.eoi_id, self.patch_size = boi_id, eoi_id, patch_size
        self.caption_first, self.cond_dropout, self.text_fraction = caption_first, cond_dropout, text_fraction
        self.text_tokens, self.templates = text_tokens, tuple(templates)
        self.start_ids = list(start_ids)  # the model's LMFusionConfig.start_ids: before every pair
        self.height, self.width = H, W
        self.image_len = (H // patch_size) * (W // patch_size)
        self.patch_dim = patch_size * patch_size
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self._cap_cache: dict[str, list[int]] = {}
        self._patches = patchify(torch.from_numpy(images[:, None].astype(np.float32) * 2.0 - 1.0), patch_size).numpy()
        max_cap = max(len(self.encode(caption_for(d, t))) for d in range(10) for t in self.templates)
        self.seq_len = len(self.start_ids) + max_cap + self.image_len + 3

    def encode(self, text: str) -> list[int]:
        if text not in self._cap_cache:
            self._cap_cache[text] = list(self.tokenizer(text, add_special_tokens=False).input_ids)
        return self._cap_cache[text]

    def pair(self, i: int, caption: str | None, caption_first: bool) -> tuple[list[int], list[int]]:
        """``(tokens, modality)`` of one image-caption pair; ``caption=None`` = unconditional (no caption)."""
        L = self.image_len
        img, im_mod = [self.pad_id] * L, [IMAGE] * L
        cap = self.encode(caption) if caption else []
        if caption_first:
            toks = [*cap, self.boi_id, *img, self.eoi_id, self.eos_id]
            mod = [TEXT] * (len(cap) + 1) + im_mod + [TEXT, TEXT]
        else:
            toks = [self.boi_id, *img, self.eoi_id, *cap, self.eos_id]
            mod = [TEXT] + im_mod + [TEXT] * (len(cap) + 2)
        return self.start_ids + toks, [TEXT] * len(self.start_ids) + mod

    def _rows(self, n: int) -> dict:
        T = self.seq_len
        return {"tokens": np.full((n, T), self.pad_id, dtype=np.int64), "modality": np.full((n, T), TEXT, dtype=np.int64),
                "attention": np.zeros((n, T), dtype=np.int64), "patches": np.zeros((n, T, self.patch_dim), dtype=np.float32),
                "understanding": np.zeros(n, dtype=bool), "labels": np.full(n, -1, dtype=np.int64)}

    def _put_pair(self, rows: dict, b: int, i: int, caption: str | None, caption_first: bool) -> None:
        toks, mod = self.pair(i, caption, caption_first)
        n = len(toks)
        rows["tokens"][b, :n], rows["modality"][b, :n], rows["attention"][b, :n] = toks, mod, 1
        rows["patches"][b, np.nonzero(rows["modality"][b] == IMAGE)[0]] = self._patches[i]
        rows["understanding"][b], rows["labels"][b] = not caption_first, self.labels[i]

    def batch(self, batch_size: int, rng: np.random.Generator, index: np.ndarray | None = None) -> dict:
        T = self.seq_len
        rows = self._rows(batch_size)
        pool = index if index is not None else np.arange(len(self.images))
        for b in range(batch_size):
            if self.text_fraction and rng.random() < self.text_fraction:
                start = int(rng.integers(0, len(self.text_tokens) - T))
                rows["tokens"][b] = self.text_tokens[start:start + T]
                rows["attention"][b] = 1
                continue
            i = int(pool[rng.integers(0, len(pool))])
            first = bool(rng.random() < self.caption_first)
            caption = caption_for(self.labels[i], self.templates[rng.integers(0, len(self.templates))])
            if first and rng.random() < self.cond_dropout:
                caption = None
            self._put_pair(rows, b, i, caption, first)
        return self.to_batch(**rows)

    def pairs_batch(self, items: list[tuple[int, str | None, bool]]) -> dict:
        """A batch of the given ``(image index, caption or None, caption_first)`` pairs, in order (for evaluation)."""
        rows = self._rows(len(items))
        for b, (i, caption, first) in enumerate(items):
            self._put_pair(rows, b, int(i), caption, first)
        return self.to_batch(**rows)

    def to_batch(self, tokens, modality, attention, patches, understanding, labels) -> dict:
        tokens_t, modality_t, att = torch.from_numpy(tokens), torch.from_numpy(modality), torch.from_numpy(attention)
        targets = torch.full_like(tokens_t, -100)
        targets[:, :-1] = tokens_t[:, 1:]
        nxt_ok = torch.zeros_like(att, dtype=torch.bool)
        nxt_ok[:, :-1] = (att[:, 1:] == 1) & (modality_t[:, 1:] == TEXT)
        targets[~nxt_ok | (targets == self.boi_id) | (targets == self.eoi_id) | (modality_t == IMAGE)] = -100
        return {"tokens": tokens_t, "modality": modality_t, "image_id": torch.where(modality_t == IMAGE, 0, -1),
                "attention_mask": att, "targets": targets, "understanding": torch.from_numpy(understanding),
                "labels": torch.from_numpy(labels), "patches": torch.from_numpy(patches)}


__all__ = ["LMFusionData"]
