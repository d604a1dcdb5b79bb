"""Slice order: the shape of a volume's per-slice -log p_0 (bits/dim, eq. 10 at t = 0) along its slice axis, against
the mean shape of in-distribution volumes. A volume-level check of what a slice model cannot see slice by slice: a
superior-inferior flip or interleaved slices give the same slices in another order, and so another shape.

A sequence is resampled to `BINS` positions over its length, centred and scaled to unit norm (so neither the
slice count nor the overall likelihood level matters); the template is the normalised mean of the in-distribution
shapes, and a volume's statistic is 1 minus the correlation of its shape with the template (0: the same shape,
2: reversed). Volumes with fewer than `MIN_SLICES` scored slices are not checked. The template assumes that the
volumes cover the same anatomy as the calibration volumes (docs/ood.md).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

BINS = 16
MIN_SLICES = 8

Slot = Optional[tuple[Hashable, int]]
"""Where an image sits: (the sequence it belongs to, e.g. a volume and time point; its slice index), or None."""


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


def ordered_sequences(values: Sequence[float], slots: Sequence[Slot]) -> dict[Hashable, np.ndarray]:
    """Per sequence, the finite `values` of its images in slice order; images without a slot are left out, and so
    are sequences with fewer than `MIN_SLICES` finite values."""
    found: dict[Hashable, list[tuple[int, float]]] = defaultdict(list)
    for value, slot in zip(values, slots, strict=True):
        if slot is not None and value is not None and np.isfinite(value):
            found[slot[0]].append((slot[1], float(value)))
    return {k: np.array([v for _, v in sorted(pairs)]) for k, pairs in found.items() if len(pairs) >= MIN_SLICES}


@dataclass(frozen=True)
class SliceOrderCheck:
    """The calibrated check: a template and the statistic's threshold at the calibrated false-positive rate."""

    template: np.ndarray
    threshold: float

    def statistic(self, sequence: np.ndarray) -> float:
        return order_statistic(sequence, self.template)
