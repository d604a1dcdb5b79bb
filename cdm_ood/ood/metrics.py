"""Detection metrics (scikit-learn): AUROC, FPR at 95% TPR, AUPR-in and AUPR-out; and localization metrics of
anomaly maps against known defect masks: pixel AUROC and how often a map's peak lies in the mask."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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


def localization_metrics(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> dict[str, float]:
    """How well anomaly maps (higher = more OOD) point at known defects, each map with its boolean mask of the
    same shape (2D slices or 3D volumes):

    - `pixel_auroc`: AUROC over all pixels of all maps, the masks' pixels being the positives (NaN when the
      pixels are all of one class);
    - `peak_in_mask`: the fraction of maps whose highest pixel lies inside their mask, over the maps whose mask
      is not empty (NaN when there is none). A map with several equal highest pixels counts the first one
      (`numpy.argmax`).
    """
    from sklearn.metrics import roc_auc_score

    if len(maps) != len(masks):
        raise ValueError(f"got {len(maps)} maps but {len(masks)} masks")
    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    masks = [np.asarray(m, dtype=bool) for m in masks]
    for k, (m, mask) in enumerate(zip(maps, masks, strict=True)):
        if m.shape != mask.shape:
            raise ValueError(f"map {k} has shape {m.shape} but its mask {mask.shape}")
    y = np.concatenate([mask.ravel() for mask in masks]) if masks else np.zeros(0, dtype=bool)
    s = np.concatenate([m.ravel() for m in maps]) if maps else np.zeros(0)
    auroc = float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")
    peaks = [bool(mask.flat[np.argmax(m)]) for m, mask in zip(maps, masks, strict=True) if mask.any()]
    return {"pixel_auroc": auroc, "peak_in_mask": float(np.mean(peaks)) if peaks else float("nan")}
