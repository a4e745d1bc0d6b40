"""Every mixed-modal variant, in both settings, trains under bf16 autocast (the GPU path; here on CPU).

On CUDA the training loop turns on bf16 autocast; bf16 module outputs written into fp32 buffers
(per-modality scatter, expert index_add_, the Transfusion patch embedding) used to fail on the
first step.  CPU autocast raises the same dtype errors, so this is the GPU path's test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from mm_helpers import tiny_batch, tiny_data, tiny_lm  # noqa: E402

from tessera.models import diffusion as D  # noqa: E402

VARIANTS = ["dense", "mot", "moe_tc", "moe_ec", "moma", "dense_mod", "mot_mod", "moma_mod"]


@pytest.mark.parametrize("setting", ["chameleon", "transfusion"])
def test_forward_backward_of_every_variant_under_bf16_autocast(setting):
    data = tiny_data(setting, n_images=40)
    batch = tiny_batch(data, 4, seed=0)
    for variant in VARIANTS:
        lm = tiny_lm(setting, variant, data)
        for routing in ("batch", "aux"):
            lm.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = lm(batch, routing=routing, generator=torch.Generator().manual_seed(0))
            assert torch.isfinite(out["loss"]), (variant, routing)
            out["loss"].backward()
            grads = [p.grad for p in lm.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads), (variant, routing)
            assert all(g.dtype == torch.float32 for g in grads), (variant, routing)  # fp32 master weights


def test_sampling_draws_noise_on_the_generators_device():
    g = torch.Generator().manual_seed(0)
    t = D.sample_timesteps(5, max_t=torch.tensor([10, 20, 30, 40, 50]), generator=g, device="cpu")
    assert t.shape == (5,) and bool((t < torch.tensor([10, 20, 30, 40, 50])).all())
    sched = D.make_scheduler()
    x = D.ddpm_sample(lambda x, t: torch.zeros_like(x), (2, 3), sched, num_inference_steps=4, generator=g)
    assert x.shape == (2, 3) and torch.isfinite(x).all()
    # the same seed gives the same sample whatever device is asked for (here the CPU)
    y = D.ddpm_sample(lambda x, t: torch.zeros_like(x), (2, 3), sched, num_inference_steps=4,
                      generator=torch.Generator().manual_seed(0), device="cpu")
    z = D.ddpm_sample(lambda x, t: torch.zeros_like(x), (2, 3), sched, num_inference_steps=4,
                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, z)
