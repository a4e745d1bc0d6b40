"""Modality routing: index lists computed once per batch, gather/scatter through per-modality modules.

Mixture-of-Transformers (MoT, Algorithm 1) and MoMa (section 2.1, the deterministic first
routing level) both send every token to the modules of its own modality.  The index lists
``positions of text tokens`` / ``positions of image tokens`` are computed once per batch by
:class:`ModalityRouter` and reused in every layer; each per-modality module runs on its
gathered tokens only (no full-tensor masking), and the outputs are scattered back.

Where several per-modality modules run one after another (a block's norm, Q/K/V, O and FFN), the
tokens are permuted once into modality order (:attr:`ModalityIndex.perm`), each module runs on
its modality's contiguous slice (a view, no copy) and the results are concatenated
(:meth:`PerModality.sorted`); :meth:`ModalityIndex.unsort` restores sequence order where attention
needs it.  Two gathers per block instead of a gather and a scatter per module: on a CPU at small
width the per-op overhead, not the FLOPs, is what MoT adds to a dense step.
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
    perm: torch.Tensor | None = None  # [N]: every modality's positions in turn (cat of idx)
    inv: torch.Tensor | None = None  # [N]: its inverse (sorted row -> sequence position)
    splits: list[int] | None = None  # tokens per modality (the slices of the sorted order)

    def __post_init__(self):
        if self.splits is None:
            self.splits = [int(i.numel()) for i in self.idx]
        if self.perm is None:
            self.perm = torch.cat(self.idx) if self.idx else torch.zeros(0, dtype=torch.long)
            self.inv = torch.empty_like(self.perm)
            self.inv[self.perm] = torch.arange(self.perm.numel(), device=self.perm.device)

    @property
    def counts(self) -> list[int]:
        return list(self.splits)

    @property
    def mixed(self) -> bool:
        """More than one modality present (else sorting is the identity and is skipped)."""
        return sum(1 for n in self.splits if n) > 1

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` in sequence order -> modality order (identity when one modality is present)."""
        return x.index_select(0, self.perm) if self.mixed else x

    def unsort(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`sort`."""
        return x.index_select(0, self.inv) if self.mixed else x

    def slices(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Views of a modality-ordered ``x``, one per modality."""
        return list(torch.split(x, self.splits, dim=0))


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
        if sum(int(i.numel()) for i in idx) != flat.numel():
            raise ValueError(f"modality ids must be in 0..{self.n_modalities - 1}")
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

    @property
    def untied(self) -> bool:
        return len(self.mods) > 1

    def forward(self, x: torch.Tensor, index: ModalityIndex, ctx=None, presorted: bool = False) -> torch.Tensor:
        """``x [N, d]`` in sequence order -> ``[N, d_out]`` in sequence order (``presorted``: both in modality order)."""
        if presorted:
            return self.sorted(x, index, ctx)
        if not self.untied:
            return self._call(self.mods[0], x, ctx)
        return index.unsort(self.sorted(index.sort(x), index, ctx))

    def sorted(self, xs: torch.Tensor, index: ModalityIndex, ctx=None) -> torch.Tensor:
        """``xs [N, d]`` in modality order (:meth:`ModalityIndex.sort`) -> ``[N, d_out]`` in modality order:
        module ``m`` on modality ``m``'s slice; a single module on all of ``xs``."""
        if not self.untied:
            return self._call(self.mods[0], xs, ctx)
        ys = [self._call(mod, part, ctx) for mod, part in zip(self.mods, index.slices(xs))]
        # under autocast the modules' outputs may be bf16 (linear) or fp32 (norms): keep the widest
        dtype = ys[0].dtype
        for y in ys[1:]:
            dtype = torch.promote_types(dtype, y.dtype)
        return torch.cat([y.to(dtype) for y in ys], dim=0)
