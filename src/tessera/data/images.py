"""Small image sets: MNIST (IDX files) and scikit-learn's bundled 8x8 digits."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tessera.errors import InputError

if TYPE_CHECKING:
    import numpy as np
    import torch

PathLike = str | os.PathLike

_PREFIX = {"test": "t10k", "train": "train"}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


def _read_idx(folder: Path, name: str) -> tuple[bytes, Path]:
    for p in (folder / f"{name}.gz", folder / name):
        if p.is_file():
            try:
                return (gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()), p
            except (OSError, EOFError) as e:
                raise InputError(f"{p} is not a readable gzip file ({e}); download it again") from None
    raise InputError(f"{folder / (name + '.gz')} not found; pass the folder with the MNIST IDX files")


def read_mnist(folder: PathLike, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """MNIST from gzipped (or plain) IDX files: ``(images uint8 [N, 28, 28], labels int64 [N])``.

    ``split="test"`` reads ``t10k-images-idx3-ubyte(.gz)`` and ``t10k-labels-idx1-ubyte(.gz)``,
    ``"train"`` the ``train-*`` pair.  Magic numbers, shapes and counts are checked.
    """
    import numpy as np

    if split not in _PREFIX:
        raise InputError(f"unknown MNIST split {split!r}; use 'test' or 'train'")
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"MNIST folder {root} not found; check the path")
    img, ipath = _read_idx(root, f"{_PREFIX[split]}-images-idx3-ubyte")
    lab, lpath = _read_idx(root, f"{_PREFIX[split]}-labels-idx1-ubyte")
    if len(img) < 16 or int.from_bytes(img[:4], "big") != _IMAGES_MAGIC:
        raise InputError(f"{ipath} is not an IDX image file (magic number is not {_IMAGES_MAGIC}); pass MNIST's images file")
    if len(lab) < 8 or int.from_bytes(lab[:4], "big") != _LABELS_MAGIC:
        raise InputError(f"{lpath} is not an IDX label file (magic number is not {_LABELS_MAGIC}); pass MNIST's labels file")
    n, rows, cols = (int.from_bytes(img[i : i + 4], "big") for i in (4, 8, 12))
    n_lab = int.from_bytes(lab[4:8], "big")
    if len(img) != 16 + n * rows * cols or len(lab) != 8 + n_lab:
        raise InputError(f"{ipath} or {lpath} is truncated (sizes do not match their headers); download them again")
    if n != n_lab:
        raise InputError(f"{ipath} has {n} images but {lpath} has {n_lab} labels; pass files of the same split")
    images = np.frombuffer(img, dtype=np.uint8, offset=16).reshape(n, rows, cols).copy()
    labels = np.frombuffer(lab, dtype=np.uint8, offset=8).astype(np.int64)
    return images, labels


def load_digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (no download): ``(images uint8 [1797, 8, 8] in 0..16, labels int64)``."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.uint8), d.target.astype(np.int64)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``[N, C, H, W] -> [N, (H/p)*(W/p), C*p*p]`` in raster order."""
    N, C, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"image size {H}x{W} is not divisible by patch size {patch}")
    x = images.reshape(N, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(N, (H // patch) * (W // patch), C * patch * patch)


def unpatchify(patches: torch.Tensor, patch: int, height: int, width: int, channels: int = 1) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    N = patches.shape[0]
    x = patches.reshape(N, height // patch, width // patch, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(N, channels, height, width)
