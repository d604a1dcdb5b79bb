"""Pictures people look at, written as PNG: sample grids (PIL) and plots (matplotlib, imported lazily)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .io import atomic_path


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Model-space images in [-1, 1] as uint8 [0, 255]; 3D volumes (B, C, D, H, W) show their middle slice."""
    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim == 5:
        x = x[:, :, x.shape[2] // 2]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def image_grid(images: torch.Tensor | np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """(B, C, H, W) images in [-1, 1] tiled into one (H', W') or (H', W', 3) uint8 picture."""
    x = to_uint8(images)
    b, c, h, w = x.shape
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    grid = np.zeros((c, rows * (h + pad) + pad, columns * (w + pad) + pad), dtype=np.uint8)
    for i in range(b):
        r, k = divmod(i, columns)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = x[i]
    return grid[0] if c == 1 else grid[:3].transpose(1, 2, 0)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_roc(id_scores: np.ndarray, ood_sets: Mapping[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """ROC curve of each OOD set against the in-distribution scores, as a PNG."""
    from sklearn.metrics import auc, roc_curve

    fig, ax = _pyplot().subplots(figsize=(5, 5))
    for name, scores in ood_sets.items():
        y = np.r_[np.zeros(len(id_scores)), np.ones(len(scores))]
        fpr, tpr, _ = roc_curve(y, np.r_[id_scores, scores])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false-positive rate (in-distribution flagged)", ylabel="true-positive rate (OOD caught)",
           title=title or "ROC")  # fmt: skip
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, Path(path))


def plot_histogram(
    sets: Mapping[str, np.ndarray], path: str | Path, threshold: float | None = None, xlabel: str = "score"
) -> Path:
    """Overlaid score histograms (one per set) with the threshold as a vertical line, as a PNG."""
    sets = {name: np.asarray(v, dtype=np.float64) for name, v in sets.items()}
    sets = {name: v[np.isfinite(v)] for name, v in sets.items()}  # unscorable images are flagged, not plotted
    finite = np.concatenate([np.zeros(0), *sets.values()])
    finite = finite if len(finite) else np.zeros(1)
    bins = np.linspace(finite.min(), finite.max() + 1e-9, 40)
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for name, scores in sets.items():
        ax.hist(np.clip(scores, bins[0], bins[-1]), bins=bins, alpha=0.5, label=f"{name} ({len(scores)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.3g}")
    ax.set(xlabel=xlabel, ylabel="images")
    ax.legend(fontsize=7)
    return _save(fig, Path(path))


def plot_auroc_matrix(aurocs: Mapping[str, Mapping[str, float]], path: str | Path, title: str = "") -> Path:
    """AUROC of each detector (rows) on each OOD set (columns) as an annotated heat map, as a PNG."""
    detectors = list(aurocs)
    sets = list(aurocs[detectors[0]])
    values = np.array([[aurocs[d][s] for s in sets] for d in detectors])
    fig, ax = _pyplot().subplots(figsize=(1.1 * len(sets) + 3, 0.45 * len(detectors) + 1.5))
    ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn")
    ax.set_xticks(range(len(sets)), sets, rotation=35, ha="right")
    ax.set_yticks(range(len(detectors)), detectors)
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title or "AUROC")
    return _save(fig, Path(path))
