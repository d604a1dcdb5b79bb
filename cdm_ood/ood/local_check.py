"""Local anomalies: the volume decision asks the anomaly map where the slice score averages it away. A defect on a
few slices of a volume (a foreign object, a signal void, a lesion) barely moves the mean of the slice scores; the
map (`detectors.MapDetector.anomaly_maps`: each pixel's log denoising error against its in-distribution mean, in
pooled deviations, smoothed) peaks on it.

Each slice's report columns `map_peak` (the largest value of its map) and `foreign_peak` (the largest value of its
map where the image is extreme: at the top of its range or a hole in the body, `features.extreme_pixels`; 0 where
it is nowhere) come from the calibrated map detector; a volume's statistic is the largest over its slices, and the
checks are calibrated on in-distribution volumes like the other volume checks (cross-fitted, thresholded at their
share of the false-positive rate), so the maximum over a volume's slices does not inflate the volume-level
false-positive rate the way a slice threshold would. The calibration volumes' peaks come from map detectors fitted
without them (`calibration.cross_fitted_map_statistics`).

- `local` (`LocalCheck`): any local anomaly the map sees, lesions included.
- `foreign` (`ForeignCheck`): anomalies at extreme intensities only: foreign objects, metal, signal voids.

Which of them stop the gate and which are only reported is the model's configuration (`gate.report_only`,
docs/ood.md "Local anomalies").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

MAP_COLUMNS = ("map_peak", "foreign_peak")


@dataclass(frozen=True)
class LocalCheck:
    """The calibrated check: the threshold of the largest `map_peak` of a volume's slices (nothing else is
    fitted)."""

    name: ClassVar[str] = "local"
    columns: ClassVar[tuple[str, ...]] = ("map_peak",)
    needs: ClassVar[tuple[str, ...]] = ("residuals",)
    unlike: ClassVar[str] = "a local anomaly unlike the calibration volumes (the anomaly map's peak)"

    threshold: float
    stops: bool = True  # False: reported only (`volume_checks`)

    @staticmethod
    def fit(sequences: Sequence[np.ndarray]) -> dict[str, list[float]]:
        """Nothing to fit: the statistic is the volume's largest slice peak."""
        return {}

    def statistic(self, sequence: np.ndarray) -> float:
        """The largest of the volume's slice values (n slices, 1)."""
        return float(sequence[:, 0].max())


@dataclass(frozen=True)
class ForeignCheck(LocalCheck):
    """`LocalCheck` of the map's peak at extreme intensities (`foreign_peak`)."""

    name: ClassVar[str] = "foreign"
    columns: ClassVar[tuple[str, ...]] = ("foreign_peak",)
    needs: ClassVar[tuple[str, ...]] = ("residuals", "extremes")
    unlike: ClassVar[str] = "a foreign object or signal void (the anomaly map's peak at extreme intensities)"
