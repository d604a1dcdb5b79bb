"""Whole anatomy: what a volume's slices contain, position by position along the slice axis, against in-distribution
volumes of the same protocol. A volume-level check of coverage errors that every slice passes on its own (a field
of view that leaves a band of the head outside the image, a partial slab, coverage that ends early, a slab placed
too high or too low) and of a front-to-back (anterior-posterior) flip of the body's shape.

Each slice's `foreground` statistics (`features.foreground_statistics`, no network pass) are the fraction of its
pixels that are body, the body's elongation (row over column spread) and its asymmetry along the rows (the
skewness of its row coordinates). A volume's vector (`coverage_vector`) is its body-fraction profile along the
slab over its peak (the head's shape along the slice axis, whatever its size in-plane), aligned to the calibration
template by a shift of up to an eighth of the slab and a stretch of up to 15% (heads sit at different heights and
differ in height), and its mean elongation and
asymmetry weighted by the body fraction; the check stores the in-distribution mean and deviation of every entry,
and a volume's statistic is the largest absolute standardised entry. Head size and position move none of these
beyond what the calibration volumes' spread allows; a missing band of the head changes every slice's elongation
and asymmetry, a missing or empty third of the slab moves the profile further than the alignment reaches, and a
flip of the rows negates the asymmetry. Two-sided: a body that fills too much is as foreign as one that fills too
little.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np

FOREGROUND_COLUMNS = ("foreground_fraction", "foreground_elongation", "foreground_skewness")
POSITIONS = 48  # positions of the profile compared with the template: the middle three quarters of the slab
REACH = 0.125  # how far (a share of the slab) the profile may move either way to meet the template
STRETCH = 0.15  # how much the profile may be stretched or shrunk along the slab to meet it (head heights differ)
MIN_SCALE = 0.01  # the smallest deviation an entry is standardised by: 1% of the peak, or of elongation or skewness
_MIDDLE = np.linspace(REACH, 1 - REACH, POSITIONS) - 0.5  # where the positions sit, from the slab's centre
_MOVES = [(1 + a, d) for a in np.linspace(-STRETCH, STRETCH, 7) for d in np.linspace(-REACH, REACH, 17)]


def profile(sequence: np.ndarray, stretch: float = 1.0, shift: float = 0.0) -> np.ndarray:
    """A volume's body fraction over its largest (the head's shape along the slice axis, whatever its size
    in-plane; zeros without body) at `POSITIONS` positions over the middle of its slab, the slab's coordinates
    (0 to 1) first stretched about its centre by `stretch` and moved by `shift`."""
    fraction = sequence[:, 0]
    peak = fraction.max()
    where = 0.5 + _MIDDLE * stretch + shift
    return np.interp(where, np.linspace(0, 1, len(fraction)), fraction / peak if peak > 0 else fraction)


def coverage_vector(sequence: np.ndarray, template: Optional[np.ndarray] = None) -> np.ndarray:
    """A volume's coverage from its slices' `FOREGROUND_COLUMNS` in slice order (n, 3): its `profile` as given, or
    stretched and moved (by up to `STRETCH` and `REACH`) to be closest (least squares) to a `template`; then its
    body's elongation and skewness, weighted by the body fraction of each slice."""
    shape = profile(sequence)
    if template is not None:
        shape = min((profile(sequence, *move) for move in _MOVES), key=lambda p: float(((p - template) ** 2).sum()))
    fraction = sequence[:, 0]
    weight = fraction.sum()
    body = fraction @ sequence[:, 1:] / weight if weight > 0 else np.zeros(2)
    return np.concatenate([shape, body])


@dataclass(frozen=True)
class AnatomyCheck:
    """The calibrated check: the template (the mean aligned window of the in-distribution profiles), the
    in-distribution mean and deviation of each entry of `coverage_vector`, and the threshold of its statistic."""

    name: ClassVar[str] = "anatomy"
    columns: ClassVar[tuple[str, ...]] = FOREGROUND_COLUMNS
    needs: ClassVar[tuple[str, ...]] = ("foreground",)
    unlike: ClassVar[str] = "anatomy coverage or shape unlike the calibration volumes"

    template: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    threshold: float
    stops: bool = True  # False: reported only (`volume_checks`)

    @staticmethod
    def fit(sequences: Sequence[np.ndarray]) -> dict[str, list[float]]:
        """The template of in-distribution sequences (n slices, 3): the mean of their profiles, then of their profiles
        aligned to that; and the mean and deviation of their coverage vectors aligned to the template."""
        first = np.mean([profile(s) for s in sequences], axis=0)
        template = np.mean([coverage_vector(s, first)[:POSITIONS] for s in sequences], axis=0)
        vectors = np.stack([coverage_vector(s, template) for s in sequences])
        return {"template": template.tolist(), "mean": vectors.mean(0).tolist(),
                "scale": np.maximum(vectors.std(0, ddof=1), MIN_SCALE).tolist()}  # fmt: skip

    def statistic(self, sequence: np.ndarray) -> float:
        """The largest absolute standardised entry of the volume's coverage vector aligned to the template: 0 at the
        in-distribution mean."""
        return float(np.abs((coverage_vector(sequence, self.template) - self.mean) / self.scale).max())
