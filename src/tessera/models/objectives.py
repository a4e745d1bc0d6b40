"""Training objectives for the two mixed-modal settings, as one ``nn.Module`` (so DDP/FSDP can wrap it).

- Chameleon setting (Chameleon 2024; MoT section 3.1): images are discrete tokens in the same
  vocabulary; next-token cross-entropy on every token.  ``text_loss``/``image_loss`` split the same
  loss by the modality of the *predicted* token.
- Transfusion setting (Transfusion 2024, section 2; MoT section 3.2): images are continuous patches;
  ``loss = L_LM + lambda * L_DDPM`` (section 2.2, lambda 5 in public implementations), the LM loss
  on text tokens only, the DDPM noise-prediction loss on image patches, causal attention with
  bidirectional attention inside each image.  One timestep per image; when the image comes before
  its caption (understanding), noise is limited to ``t < understanding_max_t`` (Transfusion caps the
  noise at t = 500 for part of its image-captioning examples; here for every image-first pair).
  ``understanding_diffusion=False`` leaves those images out of the diffusion loss: they only condition
  their caption, whose LM loss then alone teaches the model to read patches (at d64 the diffusion loss
  of the nearly unpredictable low-noise targets otherwise drowns it, and captioning stays at chance).

Auxiliary terms: ``aux_coef *`` mean auxiliary-router BCE (MoMa section 2.4; the routers see detached
inputs, so this term trains only them) and ``lb_coef *`` mean load-balancing loss (token choice,
Switch alpha = 0.01).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.models import diffusion as D
from tessera.models.decoder import MixedModalConfig, MixedModalTransformer
from tessera.models.masks import transfusion_mask
from tessera.models.modality import IMAGE, TEXT

SETTINGS = ("chameleon", "transfusion")


class MixedModalLM(nn.Module):
    """A :class:`MixedModalTransformer` plus the objective of one setting; ``forward(batch) -> losses``."""

    def __init__(self, cfg: MixedModalConfig, setting: str = "chameleon", diffusion_lambda: float = 5.0,
                 aux_coef: float = 1.0, lb_coef: float = 0.01, understanding_max_t: int = 500,
                 num_train_timesteps: int = D.NUM_TRAIN_TIMESTEPS, prediction_type: str = "epsilon",
                 snr_gamma: float = 0.0, understanding_diffusion: bool = True):
        super().__init__()
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; use chameleon or transfusion")
        if (setting == "transfusion") != bool(cfg.patch_dim):
            raise ValueError("the transfusion setting needs patch_dim > 0 and chameleon needs patch_dim = 0")
        self.setting, self.diffusion_lambda, self.aux_coef, self.lb_coef = setting, diffusion_lambda, aux_coef, lb_coef
        self.understanding_max_t, self.num_train_timesteps = understanding_max_t, num_train_timesteps
        self.model = MixedModalTransformer(cfg)
        self.prediction_type, self.snr_gamma = prediction_type, snr_gamma
        self.understanding_diffusion = understanding_diffusion
        self.scheduler = D.make_scheduler(num_train_timesteps, prediction_type) if setting == "transfusion" else None

    @property
    def cfg(self) -> MixedModalConfig:
        return self.model.cfg

    def attention_mask(self, batch: dict) -> torch.Tensor | None:
        """``None`` (causal) for Chameleon; causal + bidirectional-within-image for Transfusion."""
        return transfusion_mask(batch["image_id"]) if self.setting == "transfusion" else None

    def forward(self, batch: dict, routing: str = "batch", generator: torch.Generator | None = None) -> dict:
        tokens, modality, targets = batch["tokens"], batch["modality"], batch["targets"]
        B, T = tokens.shape
        out: dict[str, torch.Tensor] = {}
        if self.setting == "chameleon":
            hidden, ctx = self.model(tokens, modality, routing=routing)
            logits = self.model.lm_head(hidden)
            ce = F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(-1), ignore_index=-100,
                                 reduction="none")
            valid = targets.reshape(-1) != -100
            tgt_img = batch["target_modality"].reshape(-1) == IMAGE
            model_loss = ce[valid].mean()
            out["text_loss"] = ce[valid & ~tgt_img].mean() if bool((valid & ~tgt_img).any()) else ce.new_zeros(())
            out["image_loss"] = ce[valid & tgt_img].mean() if bool((valid & tgt_img).any()) else ce.new_zeros(())
        else:
            x0 = batch["patches"]
            img = modality.reshape(-1) == IMAGE
            max_t = torch.where(batch["understanding"], self.understanding_max_t, self.num_train_timesteps)
            t_seq = D.sample_timesteps(B, self.num_train_timesteps, max_t.cpu(), generator).to(tokens.device)
            t_tok = t_seq[:, None].expand(B, T)
            noise_all = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
            xf, nf = x0.reshape(B * T, -1), noise_all.reshape(B * T, -1)
            noisy = xf.clone()
            noisy[img] = D.add_noise(self.scheduler, xf[img], nf[img], t_tok.reshape(-1)[img])
            hidden, ctx = self.model(tokens, modality, mask=self.attention_mask(batch), patches=noisy.view_as(x0),
                                     timesteps=t_tok, routing=routing)
            hf = hidden.reshape(B * T, -1)
            valid = (targets.reshape(-1) != -100) & ~img
            text_idx = torch.nonzero(valid, as_tuple=False).squeeze(1)
            logits = self.model.lm_head(hf[text_idx])
            lm = F.cross_entropy(logits.float(), targets.reshape(-1)[text_idx]) if text_idx.numel() else hf.sum() * 0
            if not self.understanding_diffusion:  # image-first images only condition their caption
                img = img & ~batch["understanding"][:, None].expand(B, T).reshape(-1)
            eps = self.model.patch_out(hf[img])
            t_img = t_tok.reshape(-1)[img]
            target = D.diffusion_target(self.scheduler, xf[img], nf[img], t_img)
            diff = D.diffusion_loss(eps, target)  # reported: the plain mean squared error
            weighted = D.diffusion_loss(eps, target, D.min_snr_weights(self.scheduler, t_img, self.snr_gamma)) \
                if self.snr_gamma else diff
            model_loss = lm + self.diffusion_lambda * weighted
            out["text_loss"], out["image_loss"] = lm, diff
        loss = model_loss
        for name, coef in (("aux_router", self.aux_coef), ("load_balance", self.lb_coef)):
            if ctx.aux_losses.get(name):
                v = torch.stack(ctx.aux_losses[name]).mean()
                out[name] = v
                loss = loss + coef * v
        for name, vals in ctx.stats.items():
            if name.endswith("acc") or name.endswith("fraction"):
                out[name] = torch.stack([v.float() for v in vals]).mean()
        out["model_loss"], out["loss"] = model_loss, loss
        return out


__all__ = ["MixedModalLM", "SETTINGS", "TEXT", "IMAGE"]
