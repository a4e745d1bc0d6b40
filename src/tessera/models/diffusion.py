"""DDPM objective and sampler for continuous image patches (Transfusion section 2.2; Ho et al. 2020).

The noise schedule is diffusers' :class:`DDPMScheduler` with ``beta_schedule="squaredcos_cap_v2"``
(the cosine schedule of Nichol & Dhariwal 2021), 1000 training steps and epsilon prediction, as in
Transfusion.  Loss: ``|| eps - eps_theta(x_t, t, context) ||^2`` (DDPM eq. 14, the "simple" loss).
Sampling: ancestral DDPM over ``num_inference_steps`` (Transfusion: 250) with optional
classifier-free guidance (``eps_u + s * (eps_c - eps_u)``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from tessera.data.images import patchify, unpatchify  # noqa: F401 (defined in data, the layer below; re-exported)

NUM_TRAIN_TIMESTEPS = 1000  # Transfusion
NUM_INFERENCE_STEPS = 250  # Transfusion


PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_scheduler(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, prediction_type: str = "epsilon"):
    """DDPM with the cosine schedule, samples clipped to [-1, 1]; the network predicts ``epsilon`` (Transfusion)
    or ``v_prediction`` (``v = sqrt(abar) eps - sqrt(1 - abar) x0``, Salimans & Ho 2022)."""
    from diffusers import DDPMScheduler

    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}")
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                         prediction_type=prediction_type, clip_sample=True, clip_sample_range=1.0)


def diffusion_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the network regresses onto: the noise (``epsilon``) or the velocity (``v_prediction``)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps.to(x0.device))
    return noise


def sample_timesteps(n: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, max_t: torch.Tensor | int | None = None,
                     generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Uniform timesteps in ``[0, max_t)`` (``max_t`` per sample or scalar; default all 1000 steps)."""
    # drawn on the generator's device (a CPU generator cannot fill a CUDA tensor), then moved
    u = torch.rand(n, generator=generator, device=generator.device if generator is not None else device).to(device)
    hi = torch.as_tensor(num_train_timesteps if max_t is None else max_t).to(u.device).float()
    return (u * hi).long().clamp(max=num_train_timesteps - 1)


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (DDPM eq. 4); ``timesteps`` per row of x0."""
    return scheduler.add_noise(x0, noise, timesteps.to(x0.device))


def diffusion_loss(eps_pred: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """DDPM simple loss (Ho et al. 2020, eq. 14): mean squared error of the prediction; ``weights`` (one per row,
    e.g. :func:`min_snr_weights`) weight each row's mean squared error."""
    if eps_pred.numel() == 0:
        return eps_pred.sum() * 0.0
    if weights is None:
        return F.mse_loss(eps_pred.float(), noise.float())
    per_row = (eps_pred.float() - noise.float()).pow(2).reshape(len(weights), -1).mean(1)
    return (weights.to(per_row) * per_row).mean()


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Loss weights ``min(1, gamma / SNR)``, ``SNR = abar / (1 - abar)``: Min-SNR-gamma (Hang et al. 2023) for
    epsilon prediction; with v-prediction the same clipping of the low-noise steps, high-noise steps (where the
    caption decides the digit) keep full weight.  Low-noise steps, whose targets are nearly unpredictable noise,
    stop dominating the gradient of a model that also learns text."""
    abar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = (abar / (1.0 - abar)).clamp(min=1e-8)
    return (gamma / snr).clamp(max=1.0)


@torch.no_grad()
def ddpm_sample(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple[int, ...], scheduler,
                num_inference_steps: int = NUM_INFERENCE_STEPS, generator: torch.Generator | None = None,
                guidance_scale: float = 1.0, uncond_eps_fn: Callable | None = None, device=None) -> torch.Tensor:
    """Ancestral DDPM sampling from pure noise.

    ``eps_fn(x_t, t)`` returns the predicted noise for ``x_t`` (shape ``shape``) at integer timestep
    ``t`` (a 0-d tensor).  With ``guidance_scale != 1`` and ``uncond_eps_fn``, classifier-free guidance.
    """
    scheduler.set_timesteps(num_inference_steps, device=device)
    from diffusers.utils.torch_utils import randn_tensor  # draws on a CPU generator's device, then moves

    x = randn_tensor(shape, generator=generator, device=torch.device(device) if device is not None else torch.device("cpu"))
    for t in scheduler.timesteps:
        eps = eps_fn(x, t)
        if uncond_eps_fn is not None and guidance_scale != 1.0:
            eps_u = uncond_eps_fn(x, t)
            eps = eps_u + guidance_scale * (eps - eps_u)
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x
