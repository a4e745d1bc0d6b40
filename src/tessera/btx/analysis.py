"""Routing analysis (BTX Sec. 5.3, Fig. 3): per domain and layer, the share of tokens each expert gets."""

from __future__ import annotations

from pathlib import Path

import torch


def domain_routing(model, domain_blocks: dict[str, torch.Tensor], batch_size: int = 8) -> dict[str, list[list[float]]]:
    """``{domain: [layer][expert] fraction}`` from :func:`tessera.btx.routing.routing_fractions`."""
    from tessera.btx.routing import routing_fractions

    return {name: routing_fractions(model, blocks, batch_size).tolist() for name, blocks in domain_blocks.items()}


def plot_routing_heatmap(fractions: dict[str, list[list[float]]], path: str | Path, expert_names: list[str] | None = None,
                         title: str = "BTX routing: share of tokens per expert") -> Path:
    """One panel per domain: layers (rows) x experts (columns), colour = routing fraction. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tessera.config import atomic_savefig

    names = list(fractions)
    n_exp = len(next(iter(fractions.values()))[0])
    expert_names = expert_names or [f"e{i}" for i in range(n_exp)]
    fig, axes = plt.subplots(1, len(names), figsize=(1.2 + 0.55 * n_exp * len(names) + 1.0, 3.2), squeeze=False)
    im = None
    for ax, name in zip(axes[0], names):
        data = torch.tensor(fractions[name])
        im = ax.imshow(data.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{name} tokens", fontsize=9)
        ax.set_xticks(range(n_exp), expert_names, rotation=45, fontsize=7)
        ax.set_yticks(range(data.shape[0]), [f"L{i}" for i in range(data.shape[0])], fontsize=7)
        for (i, j), v in ((ij, data[ij].item()) for ij in [(a, b) for a in range(data.shape[0]) for b in range(n_exp)]):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.5 else "black")
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="fraction routed")
    fig.suptitle(title, fontsize=10)
    return atomic_savefig(fig, path, dpi=130, bbox_inches="tight")
