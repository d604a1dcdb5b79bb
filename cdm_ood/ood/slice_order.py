"""Slice order: the shape of a volume's per-slice -log p_0 (bits/dim, eq. 10 at t = 0) along its slice axis, against
the mean shape of in-distribution volumes. A volume-level check of what a slice model cannot see slice by slice: a
superior-inferior flip or interleaved slices give the same slices in another order, and so another shape.

A sequence is resampled to `BINS` positions over its length, centred and scaled to unit norm (so neither the
slice count nor the overall likelihood level matters); the template is the normalised mean of the in-distribution
shapes, and a volume's statistic is 1 minus the correlation of its shape with the template (0: the same shape,
2: reversed). One of the gate's volume checks (`volume_checks`). The template assumes that the volumes cover the same
anatomy as the calibration volumes (docs/ood.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

BINS = 16


def shape(sequence: np.ndarray, bins: int = BINS) -> np.ndarray:
    """The sequence resampled to `bins` positions over its length, centred, unit norm (zeros when flat)."""
    resampled = np.interp(np.linspace(0, 1, bins), np.linspace(0, 1, len(sequence)), sequence)
    centred = resampled - resampled.mean()
    norm = np.linalg.norm(centred)
    return centred / norm if norm > 0 else centred


def fit_template(sequences: Sequence[np.ndarray], bins: int = BINS) -> np.ndarray:
    """The unit-norm mean shape of in-distribution sequences."""
    mean = np.mean([shape(s, bins) for s in sequences], axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def order_statistic(sequence: np.ndarray, template: np.ndarray) -> float:
    """1 - the correlation of a sequence's shape with the template: 0 for the template's shape, 2 reversed."""
    return 1.0 - float(shape(sequence, len(template)) @ template)


@dataclass(frozen=True)
class SliceOrderCheck:
    """The calibrated check: a template and the statistic's threshold at the calibrated false-positive rate. It reads
    each slice's bits/dim."""

    name: ClassVar[str] = "slice-order"
    columns: ClassVar[tuple[str, ...]] = ("bits_per_dim",)
    needs: ClassVar[tuple[str, ...]] = ("profile",)  # the features (`features.FEATURES`) its columns come from
    unlike: ClassVar[str] = "slice order unlike the calibration volumes"

    template: np.ndarray
    threshold: float

    @staticmethod
    def fit(sequences: Sequence[np.ndarray]) -> dict[str, list[float]]:
        """The template of in-distribution sequences (n slices, 1)."""
        return {"template": fit_template([s[:, 0] for s in sequences]).tolist()}

    def statistic(self, sequence: np.ndarray) -> float:
        """`order_statistic` of a sequence (n slices, 1)."""
        return order_statistic(sequence[:, 0], self.template)
