"""Slice order: the shape of a volume's per-slice -log p_0 (bits/dim, eq. 10 at t = 0) along its slice axis, against
the mean shape of in-distribution volumes. A volume-level check of what a slice model cannot see slice by slice: a
superior-inferior flip or interleaved slices give the same slices in another order, and so another shape.

A sequence is resampled to `BINS` positions over its length, centred and scaled to unit norm (so neither the
slice count nor the overall likelihood level matters); the template is the normalised mean of the in-distribution
shapes. Volumes cover the anatomy at slightly different heights, so a shape is compared with the template aligned:
the template's central bins (`SHIFT` left out at each end) against every window of the shape as long, the best
correlation kept. A volume's `slice-order` statistic is 1 minus that aligned correlation (0: the same shape).

A slab whose shape is nearly symmetric (in the brain, likeliest mid-slab) correlates with the template almost as
well reversed: its slice-order statistic barely moves under a superior-inferior flip. The `slice-direction`
statistic asks instead how much better the shape correlates (aligned) with the template reversed than as given, as
the orientation check compares a slice with its mirror image: a reversed volume gets exactly minus its own value.
It reads a second sequence as well, each slice's log-ratio to its vertical mirror image, whose shape along the
slice axis is far from symmetric in the brain, and averages the two columns' statistics. Both are gate volume
checks (`volume_checks`) and assume that the volumes cover the same anatomy as the calibration volumes
(docs/ood.md). A check stores the shift it was calibrated with; one stored without (before the alignment) keeps
its unaligned statistic, the one its threshold was set on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..errors import UsageError

BINS = 16
SHIFT = 2  # bins the template may be moved either way (1/8 of the slab each way)


def unit(values: np.ndarray) -> np.ndarray:
    """`values` centred, unit norm (zeros when flat)."""
    centred = values - values.mean()
    norm = np.linalg.norm(centred)
    return centred / norm if norm > 0 else centred


def shape(sequence: np.ndarray, bins: int = BINS) -> np.ndarray:
    """The sequence resampled to `bins` positions over its length, centred, unit norm (zeros when flat)."""
    return unit(np.interp(np.linspace(0, 1, bins), np.linspace(0, 1, len(sequence)), sequence))


def fit_template(sequences: Sequence[np.ndarray], bins: int = BINS) -> np.ndarray:
    """The unit-norm mean shape of in-distribution sequences."""
    mean = np.mean([shape(s, bins) for s in sequences], axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def aligned_correlation(sequence: np.ndarray, template: np.ndarray, shift: int = SHIFT) -> float:
    """The largest correlation of the template's central bins (`shift` left out at each end) with a window of the
    sequence's shape as long, over the 2 `shift` + 1 positions of the window."""
    core = unit(template[shift : len(template) - shift])
    s = shape(sequence, len(template))
    return max(float(unit(s[i : i + len(core)]) @ core) for i in range(2 * shift + 1))


def order_statistic(sequence: np.ndarray, template: np.ndarray, shift: int = SHIFT) -> float:
    """1 - the aligned correlation of a sequence's shape with the template: 0 for the template's shape."""
    return 1.0 - aligned_correlation(sequence, template, shift)


def direction_statistic(sequence: np.ndarray, template: np.ndarray, shift: int = SHIFT) -> float:
    """The aligned correlation of a sequence's shape with the template reversed minus that with the template as
    given: below 0 in the template's direction, minus that for the sequence reversed (0 for a symmetric template or
    a flat sequence)."""
    return aligned_correlation(sequence, template[::-1], shift) - aligned_correlation(sequence, template, shift)


@dataclass(frozen=True)
class SliceOrderCheck:
    """The calibrated check: a template per column (`BINS` values each, stored one after the other), the statistic's
    threshold at the calibrated false-positive rate and the alignment shift the threshold was set with (`shift[0]`;
    0 for checks calibrated before the alignment). It reads each slice's bits/dim."""

    name: ClassVar[str] = "slice-order"
    columns: ClassVar[tuple[str, ...]] = ("bits_per_dim",)
    needs: ClassVar[tuple[str, ...]] = ("profile",)  # the features (`features.FEATURES`) its columns come from
    unlike: ClassVar[str] = "slice order unlike the calibration volumes"

    template: np.ndarray
    threshold: float
    shift: np.ndarray = field(default_factory=lambda: np.zeros(1))
    stops: bool = True  # False: reported only (`volume_checks`)

    def __post_init__(self) -> None:
        if self.template.size != BINS * len(self.columns):
            raise UsageError(f"the {self.name} check's stored template has {self.template.size} values, not {BINS} "
                             f"for each of its columns {self.columns}: it was calibrated by an earlier version; "
                             "run `cdm-ood calibrate` again")  # fmt: skip

    @classmethod
    def fit(cls, sequences: Sequence[np.ndarray]) -> dict[str, list[float]]:
        """The templates of in-distribution sequences (n slices, one value per column), and `SHIFT`."""
        templates = [fit_template([s[:, j] for s in sequences]) for j in range(len(cls.columns))]
        return {"template": np.concatenate(templates).tolist(), "shift": [float(SHIFT)]}

    def statistic(self, sequence: np.ndarray) -> float:
        """The mean over the columns of `measure` of each column of a sequence (n slices, columns) against its
        template."""
        templates = self.template.reshape(len(self.columns), BINS)
        return float(np.mean([self.measure(sequence[:, j], t, int(self.shift[0])) for j, t in enumerate(templates)]))

    @staticmethod
    def measure(sequence: np.ndarray, template: np.ndarray, shift: int) -> float:
        """The statistic of one column's sequence against its template: `order_statistic`."""
        return order_statistic(sequence, template, shift)


@dataclass(frozen=True)
class SliceDirectionCheck(SliceOrderCheck):
    """`direction_statistic` of the slices' bits/dim and of their vertical mirror log-ratios
    (`orientation_check.log_ratios`: how much more likely each slice is upright than upside down), averaged: the same
    fit and threshold rule, another statistic. The mirror ratio's shape along the slice axis is far less symmetric
    in the brain than the likelihood's (docs/ood.md); a model trained to be invariant to vertical flips has a flat
    ratio, which adds nothing, and the likelihood's shape still counts."""

    name: ClassVar[str] = "slice-direction"
    columns: ClassVar[tuple[str, ...]] = ("bits_per_dim", "vflip_log_ratio")
    needs: ClassVar[tuple[str, ...]] = ("profile", "flips")
    unlike: ClassVar[str] = "slices in the reverse direction of the calibration volumes"

    @staticmethod
    def measure(sequence: np.ndarray, template: np.ndarray, shift: int) -> float:
        """The statistic of one column's sequence against its template: `direction_statistic`."""
        return direction_statistic(sequence, template, shift)
