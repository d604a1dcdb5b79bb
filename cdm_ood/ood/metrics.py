"""Detection metrics (scikit-learn) and the figures people look at: ROC curves and score histograms."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..io import atomic_path


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """AUROC, FPR at 95% TPR, AUPR-in and AUPR-out with OOD as the positive class (higher score = more OOD).

    FPR95: the fraction of in-distribution images flagged when the threshold catches 95% of the OOD ones.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    s = np.r_[id_scores, ood_scores].astype(np.float64)
    fpr, tpr, _ = roc_curve(y, s)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "fpr95": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
        "aupr_in": float(average_precision_score(1 - y, -s)),
        "aupr_out": float(average_precision_score(y, s)),
    }


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
