"""LMFusion's training objective and its training FLOPs, measured as executed.

:class:`LMFusionLM` is Transfusion's ``L = L_LM + lambda * L_DDPM`` (Transfusion section 2.3, lambda 5)
over an :class:`~tessera.models.lmfusion.LMFusionModel`, with the DDPM cosine schedule of
:mod:`tessera.models.diffusion`; with frozen text modules the LM loss is taken only where it has a
gradient (:func:`trainable_positions`).  :class:`FlopMeter` counts the FLOPs autograd really runs, which
is where LMFusion's saving over training the whole model comes from (LMFusion: 50% of the FLOPs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.models import diffusion as D
from tessera.models.lmfusion import LMFusionModel
from tessera.models.modality import IMAGE, TEXT


# -- objective -----------------------------------------------------------------------------------

def trainable_positions(tokens: torch.Tensor, modality: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, T]`` bool: positions whose hidden state depends on an image or on BOI/EOI (the trainable inputs).

    With frozen text modules every other text position is a constant of the training, so its LM loss
    has no gradient; LMFusion skips it (saving the LM-head FLOPs).  Causal attention makes "depends on"
    = "at or after the first image/BOI/EOI position of its row".
    """
    new = (modality == IMAGE) | (tokens >= vocab_size)
    return new.long().cumsum(1) > 0


class LMFusionLM(nn.Module):
    """LMFusion's training objective: ``L = L_LM + lambda * L_DDPM`` (Transfusion section 2.3; lambda 5).

    Same recipe as the Transfusion setting of :class:`~tessera.models.objectives.MixedModalLM`: one
    timestep per image, uniform in ``[0, 1000)`` (cosine schedule), noise capped at
    ``understanding_max_t`` when the image comes before its caption; the LM loss on text targets (with
    frozen text only where it has a gradient, see :func:`trainable_positions`) and the DDPM
    epsilon-prediction loss on image patches (``understanding_diffusion=False`` leaves image-first images out
    of it, as :class:`~tessera.models.objectives.MixedModalLM`: they only condition their caption).  ``forward(batch) -> {"loss", "text_loss", "image_loss",
    "model_loss"}`` as the training loop of :mod:`tessera.train` expects.
    """

    def __init__(self, model: LMFusionModel, diffusion_lambda: float = 5.0, understanding_max_t: int = 500,
                 understanding_diffusion: bool = True):
        super().__init__()
        self.model = model
        self.understanding_diffusion = understanding_diffusion
        self.diffusion_lambda, self.understanding_max_t = diffusion_lambda, understanding_max_t
        self.num_train_timesteps = model.cfg.num_train_timesteps
        self.scheduler = D.make_scheduler(self.num_train_timesteps)

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        tokens, modality, targets = batch["tokens"], batch["modality"], batch["targets"]
        B, T = tokens.shape
        img = modality.reshape(-1) == IMAGE
        x0 = batch["patches"].reshape(B * T, -1)
        max_t = torch.where(batch["understanding"].cpu(), self.understanding_max_t, self.num_train_timesteps)
        t_seq = D.sample_timesteps(B, self.num_train_timesteps, max_t, generator).to(tokens.device)
        t_tok = t_seq[:, None].expand(B, T)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        noisy = x0.clone()
        if bool(img.any()):
            noisy[img] = D.add_noise(self.scheduler, x0[img], noise[img], t_tok.reshape(-1)[img])
        out = self.model(tokens, modality, batch.get("image_id"), batch.get("attention_mask"),
                         noisy.view(B, T, -1), t_tok)
        valid = (targets != -100) & (modality == TEXT)
        if self.model.cfg.freeze_text:
            valid &= trainable_positions(tokens, modality, self.model.cfg.vocab_size)
        rows = torch.nonzero(valid.reshape(-1), as_tuple=False).squeeze(1)
        hf = out.hidden.reshape(B * T, -1)
        if rows.numel():
            logits = self.model.text_logits(hf[rows])
            lm = F.cross_entropy(logits.float(), targets.reshape(-1)[rows])
        else:
            lm = hf.sum() * 0.0
        keep = torch.ones(int(img.sum()), dtype=torch.bool, device=img.device)
        if not self.understanding_diffusion:  # image-first images only condition their caption
            keep = (~batch["understanding"].to(img.device)[:, None].expand(B, T)).reshape(-1)[img]
        if bool(keep.any()):
            diff = D.diffusion_loss(self.model.predict_noise(out)[keep], noise[img][keep])
        else:
            diff = hf.sum() * 0.0
        loss = lm + self.diffusion_lambda * diff
        return {"loss": loss, "model_loss": loss, "text_loss": lm, "image_loss": diff}


# -- measured FLOPs ------------------------------------------------------------------------------

class FlopMeter:
    """Training FLOPs as executed: ``torch.utils.flop_counter`` over forward and backward.

    Counts matrix products (2 FLOPs per multiply-add) that autograd really runs, so frozen modules
    cost their forward and only the input-gradient half of their backward (no weight gradient), and
    positions with no trainable parameter upstream cost no backward at all - which is where LMFusion's
    saving comes from.  CPU attention (``_scaled_dot_product_flash_attention_for_cpu``) is added to
    the counter's registry.  Use as a context around training; :meth:`delta` gives the FLOPs since
    the last call, :meth:`skip` drops what ran since (evaluation).
    """

    def __init__(self):
        from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

        def fwd(q, k, v, *args, out_shape=None, **kwargs):
            return sdpa_flop_count(q, k, v)

        def bwd(g, q, k, v, *args, out_shape=None, **kwargs):
            return sdpa_backward_flop_count(g, q, k, v)

        aten = torch.ops.aten
        custom = {}
        if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
            custom[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
            custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
        self.mode = FlopCounterMode(display=False, custom_mapping=custom)
        self._last = 0

    def __enter__(self) -> FlopMeter:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return self.mode.get_total_flops()

    def delta(self) -> int:
        total = self.total
        d, self._last = total - self._last, total
        return d

    def skip(self) -> None:
        self._last = self.total


__all__ = ["FlopMeter", "LMFusionLM", "trainable_positions"]
