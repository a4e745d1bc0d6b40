"""A small VQ tokenizer (VQ-VAE, van den Oord et al. 2017) turning MNIST digits into discrete tokens.

The Chameleon setting needs images as tokens in the LM vocabulary; Chameleon uses a large VQ-GAN
(8192 codes, 1024 tokens per 512x512 image).  Scaled down for CPU: 28x28 digits -> 7x7 = 49 tokens
from a codebook of 64 entries, a two-layer strided conv encoder and a mirrored decoder.  Loss
(VQ-VAE eq. 3): reconstruction MSE + codebook loss ``||sg[z_e] - e||^2`` + ``beta ||z_e - sg[e]||^2``
with ``beta = 0.25``; the straight-through estimator copies decoder gradients to the encoder.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class VQTokenizer(nn.Module):
    def __init__(self, n_codes: int = 64, code_dim: int = 16, channels: int = 32, beta: float = 0.25):
        super().__init__()
        self.n_codes, self.beta = n_codes, beta
        self.encoder = nn.Sequential(nn.Conv2d(1, channels, 4, 2, 1), nn.ReLU(), nn.Conv2d(channels, channels, 4, 2, 1),
                                     nn.ReLU(), nn.Conv2d(channels, code_dim, 1))
        self.decoder = nn.Sequential(nn.Conv2d(code_dim, channels, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(channels, channels, 4, 2, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(channels, 1, 4, 2, 1))
        self.codebook = nn.Embedding(n_codes, code_dim)
        nn.init.uniform_(self.codebook.weight, -1 / n_codes, 1 / n_codes)

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N, C, H, W = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)
        codes = torch.cdist(flat, self.codebook.weight).argmin(-1)
        return codes.view(N, H * W), self.codebook(codes).view(N, H, W, C).permute(0, 3, 1, 2)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images [N, H, W]`` in [0, 1] -> ``(reconstruction, loss)`` (VQ-VAE eq. 3)."""
        x = images[:, None] * 2.0 - 1.0
        z = self.encoder(x)
        _, q = self._quantize(z)
        loss_vq = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        q_st = z + (q - z).detach()
        rec = self.decoder(q_st)
        return (rec[:, 0] + 1.0) / 2.0, F.mse_loss(rec, x) + loss_vq

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, H, W]`` in [0, 1] -> codes ``[N, (H/4)*(W/4)]``."""
        return self._quantize(self.encoder(images[:, None].float() * 2.0 - 1.0))[0]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """codes ``[N, L]`` -> images ``[N, H, W]`` in [0, 1]."""
        N = codes.shape[0]
        q = self.codebook(codes.clamp(0, self.n_codes - 1)).view(N, height // 4, width // 4, -1).permute(0, 3, 1, 2)
        return ((self.decoder(q)[:, 0] + 1.0) / 2.0).clamp(0, 1)


def train_vq_tokenizer(images: np.ndarray, steps: int = 800, batch_size: int = 64, lr: float = 2e-3, n_codes: int = 64,
                       seed: int = 0) -> tuple[VQTokenizer, float]:
    """Train on ``images`` (``[N, H, W]`` in [0, 1]); returns ``(tokenizer, final reconstruction MSE)``.

    Codes unused in a step are re-seeded from random encoder outputs (a common dead-code fix).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vq = VQTokenizer(n_codes=n_codes)
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))
    with torch.no_grad():
        z0 = vq.encoder(x[:512, None] * 2 - 1).permute(0, 2, 3, 1).reshape(-1, vq.codebook.weight.shape[1])
        vq.codebook.weight.copy_(z0[torch.randperm(len(z0), generator=g)[:n_codes]])
    opt = torch.optim.Adam(vq.parameters(), lr=lr)
    rec_mse = float("nan")
    for step in range(steps):
        xb = x[torch.randint(0, len(x), (batch_size,), generator=g)]
        rec, loss = vq(xb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec_mse = float(F.mse_loss(rec.detach(), xb))
        if step % 100 == 99:
            with torch.no_grad():
                z = vq.encoder(xb[:, None] * 2 - 1).permute(0, 2, 3, 1).reshape(-1, vq.codebook.weight.shape[1])
                used = torch.bincount(torch.cdist(z, vq.codebook.weight).argmin(-1), minlength=n_codes) > 0
                dead = torch.nonzero(~used).squeeze(1)
                if dead.numel():
                    vq.codebook.weight[dead] = z[torch.randint(0, len(z), (dead.numel(),), generator=g)]
    vq.eval()
    return vq, rec_mse
