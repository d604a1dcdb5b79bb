"""The gate's volume checks: statistics of a whole volume's slices that no slice score sees, each fitted on
in-distribution volumes by calibration and thresholded at its share of the calibrated false-positive rate
(docs/ood.md).

- `slice-order` (`slice_order`): the shape of the slices' bits/dim along the slice axis (interleaved slices,
  superior-inferior flips of an asymmetric shape).
- `slice-direction` (`slice_order`): how much better that shape, and that of the slices' vertical mirror log-ratios,
  match the calibration templates reversed than as given (superior-inferior flips, even of a nearly symmetric
  likelihood shape).
- `orientation` (`orientation_check`): the mean log-ratio of the slices to their mirror images and transposes (in-plane
  flips, rotations, swapped axes).
- `anatomy` (`anatomy_check`): how much of each slice the body fills along the slice axis, and its shape (a band of
  the head outside the field of view, a partial slab, coverage that ends early).
- `local` and `foreign` (`local_check`): the anomaly map's largest peak over the volume's slices, anywhere or at
  extreme intensities (a defect on a few slices that the mean of the slice scores averages away).

A check reads per-slice statistics (`STATISTICS`, columns of the report, computed by `image_statistics` from the
features) of each sequence, a volume's time point, in slice order; sequences with fewer than `MIN_SLICES` scored
slices are not checked. A slice model's calibration fits every check its data allow
(`calibration.fit_volume_checks`). A check whose `stops` is False is reported only: a volume over its threshold
keeps its verdict and its reason says so (`failed_checks`; the model's `gate.report_only`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..diffusion.likelihood import bits_per_dim
from ..errors import UsageError
from .anatomy_check import FOREGROUND_COLUMNS, AnatomyCheck
from .detectors import MapDetector
from .local_check import MAP_COLUMNS, ForeignCheck, LocalCheck
from .orientation_check import RATIO_COLUMNS, OrientationCheck, log_ratios
from .slice_order import SliceDirectionCheck, SliceOrderCheck

MIN_SLICES = 8
STATISTICS = ("bits_per_dim", *RATIO_COLUMNS, *FOREGROUND_COLUMNS, *MAP_COLUMNS)
"""Per-slice statistics in the report's rows: -log p_0 in bits/dim (eq. 10 at t = 0), the orientation log-ratios,
the body's fraction, elongation and skewness, and the anomaly map's peaks."""

VolumeCheck = Union[SliceOrderCheck, SliceDirectionCheck, OrientationCheck, AnatomyCheck, LocalCheck, ForeignCheck]
CHECKS: dict[str, type[VolumeCheck]] = {
    c.name: c for c in (SliceOrderCheck, SliceDirectionCheck, OrientationCheck, AnatomyCheck, LocalCheck, ForeignCheck)
}


def check_names(names: Sequence[str]) -> tuple[str, ...]:
    """`names` as a tuple, each one of `CHECKS` (a `UsageError` names those that are not)."""
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        raise UsageError(f"unknown volume check(s) {', '.join(unknown)}; expected some of {', '.join(CHECKS)}")
    return tuple(names)


Slot = Optional[tuple[Hashable, int]]
"""Where an image sits: (the sequence it belongs to, e.g. a volume and time point; its slice index), or None."""


def image_statistics(
    features: Mapping[str, Tensor], num_dims: int, bit_depth: int, maps: Optional[MapDetector] = None
) -> dict[str, np.ndarray]:
    """`STATISTICS` of each image (N,): bits/dim where the features hold the profile, the log-ratios
    (`orientation_check.log_ratios`) where they also hold the flips of 2D images (the transpose's where they hold
    the transposes too), the body's fraction, elongation and skewness where they hold `foreground`, and with a
    fitted `maps` detector the peaks of its anomaly maps where they hold the residuals (at extreme pixels where they
    hold `extremes` too, 0 for an image without any); NaN otherwise."""
    n = len(next(iter(features.values())))
    out = {column: np.full(n, np.nan) for column in STATISTICS}
    if "profile" in features:
        log_p0 = features["profile"][:, 0].double()
        out["bits_per_dim"] = bits_per_dim(log_p0, num_dims, bit_depth).numpy()
        if "flips" in features and features["flips"].shape[1] == 2:
            transposed = features.get("transpose", torch.full((n, 1), math.nan, dtype=torch.float64))
            ratios = log_ratios(log_p0, features["flips"], transposed, num_dims)
            out.update(zip(RATIO_COLUMNS, ratios.T.numpy(), strict=True))
    if "foreground" in features:
        out.update(zip(FOREGROUND_COLUMNS, features["foreground"].double().T.numpy(), strict=True))
    if maps is not None and "residuals" in features and n:
        anomaly = maps.anomaly_maps(features).double().flatten(1)
        out["map_peak"] = anomaly.amax(1).numpy()
        if "extremes" in features:
            out["foreign_peak"] = (anomaly * features["extremes"].double().flatten(1)).amax(1).numpy()
    return out


def ordered_sequences(values: np.ndarray, slots: Sequence[Slot]) -> dict[Hashable, np.ndarray]:
    """Per sequence, the rows of `values` (N, k) of its images in slice order, (n, k); images without a slot or with a
    non-finite value are left out, and so are sequences with fewer than `MIN_SLICES` images left."""
    found: dict[Hashable, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for value, slot in zip(np.asarray(values, dtype=np.float64), slots, strict=True):
        if slot is not None and np.isfinite(value).all():
            found[slot[0]].append((slot[1], value))
    return {k: np.stack([v for _, v in sorted(pairs, key=lambda p: p[0])]) for k, pairs in found.items()
            if len(pairs) >= MIN_SLICES}  # fmt: skip


def check_statistics(members: Sequence[dict], check: VolumeCheck) -> dict[int, float]:
    """The check's statistic of each sequence (time point) of a volume's slice rows; sequences too short to check
    (`MIN_SLICES`) are left out."""
    slots = [((r["time_point"] or 0), r["slice"]) for r in members]
    values = [[r.get(c) for c in check.columns] for r in members]  # None: NaN (`ordered_sequences` reads float64)
    found = ordered_sequences(values, slots)
    return {t: check.statistic(seq) for t, seq in sorted(found.items())}


def failed_checks(members: Sequence[dict], checks: Sequence[VolumeCheck]) -> list[str]:
    """The reasons a volume's slice rows fail `checks`: each check's statistics (one per time point) above its
    threshold (`failed_checks(members, [c for c in checks if c.stops])` are those that stop the gate)."""
    reasons = []
    for check in checks:
        stats = check_statistics(members, check)
        over = [f"statistic {s:.3g} > {check.threshold:.3g}" + (f" (time point {t})" if len(stats) > 1 else "")
                for t, s in stats.items() if s > check.threshold]  # fmt: skip
        if over:
            reasons.append(f"{check.unlike}: " + ", ".join(over))
    return reasons
