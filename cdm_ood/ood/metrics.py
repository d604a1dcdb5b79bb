"""Detection metrics (scikit-learn): AUROC, FPR at 95% TPR, AUPR-in and AUPR-out."""

from __future__ import annotations

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
