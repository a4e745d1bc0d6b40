"""Attention masks (boolean, ``True`` = may attend), shaped ``[B, 1, T, T]`` for SDPA.

- Chameleon setting: plain causal attention over the whole mixed-modal sequence.
- Transfusion setting (Transfusion, section 2.3 "Transfusion attention"): causal across the
  sequence, bidirectional among the patches of the same image, so every patch of an image sees
  the whole (noisy) image.
"""

from __future__ import annotations

import torch


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    """``[T, T]`` lower-triangular boolean mask (query i may attend key j <= i)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()


def transfusion_mask(image_id: torch.Tensor) -> torch.Tensor:
    """Causal + bidirectional within an image (Transfusion, section 2.3).

    ``image_id``: ``[B, T]`` long, ``-1`` for text tokens (incl. BOI/EOI) and ``k >= 0`` for the
    patches of the k-th image of the sequence.  Returns ``[B, 1, T, T]`` bool.
    """
    B, T = image_id.shape
    causal = causal_mask(T, image_id.device)[None]
    same_image = (image_id[:, :, None] == image_id[:, None, :]) & (image_id[:, :, None] >= 0)
    return (causal | same_image)[:, None]


def gather_mask(mask: torch.Tensor | None, sel: torch.Tensor) -> torch.Tensor | None:
    """Restrict a ``[B, 1, T, T]`` mask to the selected positions ``sel`` (``[B, k]``, sorted).

    ``None`` (plain causal) stays ``None``: sorted positions keep causal order.
    """
    if mask is None:
        return None
    B, _, T, _ = mask.shape
    rows = mask[:, 0].gather(1, sel[:, :, None].expand(B, sel.shape[1], T))
    return rows.gather(2, sel[:, None, :].expand(B, sel.shape[1], sel.shape[1]))[:, None]
