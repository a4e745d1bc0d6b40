"""A small CNN digit classifier, trained in the recipe, that scores generated images and captions.

Works on any square digit size (8x8 sklearn digits, 28x28 MNIST): two 3x3 convolutions, adaptive
average pooling to 4x4, a linear layer.  It is the judge of conditional generation accuracy
("does the image generated for 'seven' look like a seven?").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class DigitClassifier(nn.Module):
    def __init__(self, channels: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * channels * 16, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: ``[N, H, W]`` or ``[N, 1, H, W]`` in ``[0, 1]`` -> logits ``[N, 10]``."""
        if images.dim() == 3:
            images = images[:, None]
        return self.net(images.float() * 2.0 - 1.0)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        self.eval()
        return torch.cat([self(images[i:i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])


def train_digit_classifier(images: np.ndarray, labels: np.ndarray, steps: int = 600, batch_size: int = 64,
                           lr: float = 3e-3, seed: int = 0, noise: float = 0.05, shift: int = 0) -> DigitClassifier:
    """Adam on cross-entropy with light pixel noise (so slightly noisy generations are judged fairly);
    ``shift``: each batch moved by up to that many pixels each way (zero fill), for a judge of
    images drawn with random offsets."""
    from tessera.data.mixed_modal import shifted

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    x, y = torch.from_numpy(np.asarray(images, dtype=np.float32)), torch.from_numpy(np.asarray(labels))
    clf.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        xb = (x[idx] + noise * torch.randn(x[idx].shape, generator=g)).clamp(0, 1)
        if shift:
            dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=g))
            xb = shifted(xb, dy, dx)
        loss = F.cross_entropy(clf(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    return clf


def accuracy(clf: DigitClassifier, images: np.ndarray | torch.Tensor, labels) -> float:
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels))
    return float((clf.predict(x) == y).float().mean())
