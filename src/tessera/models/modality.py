"""Modality routing: index lists computed once per batch, gather/scatter through per-modality modules.

Mixture-of-Transformers (MoT, Algorithm 1) and MoMa (section 2.1, the deterministic first
routing level) both send every token to the modules of its own modality.  The index lists
``positions of text tokens`` / ``positions of image tokens`` are computed once per batch by
:class:`ModalityRouter` and reused in every layer; each per-modality module runs on its
gathered tokens only (no full-tensor masking), and the outputs are scattered back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tessera.data.mixed_modal import IMAGE, MODALITIES, TEXT  # noqa: F401 (defined in data, the layer below; re-exported)


@dataclass
class ModalityIndex:
    """Flat token positions per modality for a ``[B, T]`` batch (``idx[m]`` indexes ``x.reshape(B*T, d)``)."""

    idx: list[torch.Tensor]
    n_tokens: int

    @property
    def counts(self) -> list[int]:
        return [int(i.numel()) for i in self.idx]


class ModalityRouter:
    """Deterministic modality routing (MoT Algorithm 1; MoMa section 2.1, first level).

    ``route(modality)`` turns a ``[B, T]`` tensor of modality ids into a :class:`ModalityIndex`.
    Call it once per batch; every layer reuses the result.
    """

    def __init__(self, n_modalities: int = 2):
        self.n_modalities = n_modalities

    def route(self, modality: torch.Tensor) -> ModalityIndex:
        flat = modality.reshape(-1)
        idx = [torch.nonzero(flat == m, as_tuple=False).squeeze(1) for m in range(self.n_modalities)]
        return ModalityIndex(idx, flat.numel())


class PerModality(nn.Module):
    """One module per modality (MoT) or one shared module (dense), behind one interface.

    ``forward(x_flat [N, d], index)`` applies module ``m`` to the tokens of modality ``m`` and
    scatters the results back into ``[N, d_out]``.  With a single module every token goes through
    it and nothing is gathered.  Modules with an ``aux`` signature (``forward(x, ctx)``) get the
    per-forward context; every module is called even on zero tokens so that the autograd graph
    (and DDP's gradient reduction) sees all parameters.
    """

    def __init__(self, modules: list[nn.Module], takes_ctx: bool = False):
        super().__init__()
        self.mods = nn.ModuleList(modules)
        self.takes_ctx = takes_ctx

    def _call(self, mod, x, ctx):
        return mod(x, ctx) if self.takes_ctx else mod(x)

    def forward(self, x: torch.Tensor, index: ModalityIndex, ctx=None) -> torch.Tensor:
        if len(self.mods) == 1:
            return self._call(self.mods[0], x, ctx)
        ys = [self._call(mod, x.index_select(0, idx), ctx) for mod, idx in zip(self.mods, index.idx)]
        # under autocast the modules' outputs may be bf16 (linear) or fp32 (norms): keep the widest
        dtype = ys[0].dtype
        for y in ys[1:]:
            dtype = torch.promote_types(dtype, y.dtype)
        out = x.new_empty((x.shape[0], ys[0].shape[-1]), dtype=dtype)
        for y, idx in zip(ys, index.idx):
            out[idx] = y.to(dtype)
        return out
