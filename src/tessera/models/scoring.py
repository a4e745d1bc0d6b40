"""Scoring shared by the mixed-modal recipes (``mixed-modal-pretrain`` and ``lmfusion-train``).

The judge (a digit CNN trained once on the training images and cached in the dump dir), the fixed
validation batches and their mean losses, and the PNG grid of generated samples.
"""

from __future__ import annotations

from pathlib import Path


def get_classifier(data, train_idx, val_idx, dump: Path | None, *, steps: int, seed: int, shift: int = 0):
    """``(classifier, val_accuracy)``: the judge, a digit CNN trained on ``data.images[train_idx]`` for
    ``steps`` steps (cached as ``dump/classifier.safetensors`` when ``dump`` is given)."""
    from tessera.models.classifier import DigitClassifier, accuracy, train_digit_classifier
    from tessera.train.checkpoint import load_tensors, save_tensors

    path = dump / "classifier.safetensors" if dump is not None else None
    if path is not None and path.is_file():
        clf = DigitClassifier()
        clf.load_state_dict(load_tensors(path))
        clf.eval()
    else:
        clf = train_digit_classifier(data.images[train_idx], data.labels[train_idx], steps=steps, seed=seed, shift=shift)
        if path is not None:
            save_tensors(path, clf.state_dict())
    return clf, accuracy(clf, data.images[val_idx], data.labels[val_idx])


def validation_batches(val_data, val_idx, batch_size: int, n_batches: int) -> list[dict]:
    """``n_batches`` fixed batches of ``val_data`` (seeded, so every run and every eval sees the same ones)."""
    import numpy as np

    rng = np.random.default_rng(12345)
    return [val_data.batch(batch_size, rng, val_idx) for _ in range(n_batches)]


def mean_val_losses(objective, batches: list[dict], device: str = "cpu", seed: int = 0, **call_kw) -> dict:
    """``{val_text_loss, val_image_loss, val_model_loss}`` of ``objective(batch, generator=g, **call_kw)``
    averaged over fixed batches (fixed diffusion noise and timesteps via ``seed``), in eval mode."""
    import torch

    was_training = objective.training
    objective.eval()
    g = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    with torch.no_grad():
        for b in batches:
            out = objective({k: v.to(device) for k, v in b.items()}, generator=g, **call_kw)
            for k in ("text_loss", "image_loss", "model_loss"):
                sums[k] = sums.get(k, 0.0) + float(out[k])
    objective.train(was_training)
    return {f"val_{k}": round(v / len(batches), 5) for k, v in sums.items()}


def save_samples_png(images, labels: list[int], path: Path, title: str) -> None:
    """A 10-row grid (one row per digit) of generated ``images``, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tessera.config import atomic_savefig

    per = max(1, labels.count(0))
    fig, axes = plt.subplots(10, per, figsize=(per * 0.8, 8.5))
    for i, ax in enumerate(axes.reshape(-1)):
        ax.imshow(images[i].numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        if i % per == 0:
            ax.set_ylabel(str(labels[i]), rotation=0, labelpad=8)
    fig.suptitle(title, fontsize=8)
    atomic_savefig(fig, path, dpi=80)


def drop_metrics_after(path: Path, step: int) -> None:
    """On resume: keep only the rows of ``metrics.jsonl`` logged at or before the checkpoint's ``step``
    (rows a killed run logged after its last checkpoint, and a torn last line, are dropped)."""
    from tessera.config import prune_metric_rows

    prune_metric_rows(path, lambda r: isinstance(r.get("step"), int) and r["step"] <= step)