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
    """A 10-row grid (one row per digit) of generated ``images``, written atomically: one tiled image with a
    one-pixel gap between samples (one axes: a 100-axes figure took 2 seconds a run)."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tessera.config import atomic_savefig

    per = max(1, labels.count(0))
    h, w = images[0].shape[-2:]
    grid = np.full((10 * (h + 1) - 1, per * (w + 1) - 1), np.nan, dtype=np.float32)
    for i in range(min(len(images), 10 * per)):
        r, c = divmod(i, per)
        grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = images[i].float().numpy()
    fig, ax = plt.subplots(figsize=(per * 0.8, 8.5))
    cmap = plt.get_cmap("gray").with_extremes(bad="tab:blue")
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([r * (h + 1) + (h - 1) / 2 for r in range(10)], [str(labels[r * per]) for r in range(10)])
    fig.suptitle(title, fontsize=8)
    atomic_savefig(fig, path, dpi=80)


def drop_metrics_after(path: Path, step: int) -> None:
    """On resume: keep only the rows of ``metrics.jsonl`` logged at or before the checkpoint's ``step``
    (rows a killed run logged after its last checkpoint, and a torn last line, are dropped)."""
    from tessera.config import prune_metric_rows

    prune_metric_rows(path, lambda r: isinstance(r.get("step"), int) and r["step"] <= step)


# -- curves (lists of evaluation rows) -------------------------------------------------------------

def at(curve: list[dict], x: float, key: str, xkey: str = "step") -> float:
    """``curve[key]`` at ``x`` (linear interpolation between evaluations)."""
    for a, b in zip(curve, curve[1:]):
        if a[xkey] <= x <= b[xkey]:
            f = (x - a[xkey]) / max(b[xkey] - a[xkey], 1e-12)
            return a[key] + f * (b[key] - a[key])
    return curve[-1][key]


def first_reach(curve: list[dict], key: str, target: float, x: str) -> float | None:
    """The ``x`` (step, flops or seconds) where ``curve[key]`` first drops to ``target`` (linear interpolation)."""
    for a, b in zip(curve, curve[1:]):
        if b[key] <= target:
            if a[key] <= target:
                return float(a[x])
            f = (a[key] - target) / (a[key] - b[key])
            return float(a[x] + f * (b[x] - a[x]))
    return None


def plateau_endpoints(curve: list[dict], key: str = "val_model_loss") -> float:
    """Relative improvement of ``key`` over the last fifth of the run from two evaluations: ``(L(0.8 T) - L(T)) / L(0.8 T)``."""
    end = curve[-1]["step"]
    start = at(curve, 0.8 * end, key)
    return (start - curve[-1][key]) / abs(start)


def plateau(curve: list[dict], key: str = "val_model_loss") -> float:
    """Relative improvement of ``key`` over the last fifth of the run, read off a least-squares line through the
    evaluations of that fifth: ``-slope * 0.2 T / line(0.8 T)``.  One evaluation moves by up to 2% at small
    sizes, which decides a 1% gate read from two points; fewer than 3 evaluations in the window fall back to
    :func:`plateau_endpoints`."""
    import numpy as np

    end = curve[-1]["step"]
    pts = [(r["step"], r[key]) for r in curve if r["step"] >= 0.8 * end - 1e-9]
    if len(pts) < 3:
        return plateau_endpoints(curve, key)
    x, y = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
    slope, icpt = np.polyfit(x, y, 1)
    return float(-slope * 0.2 * end / abs(slope * 0.8 * end + icpt))
