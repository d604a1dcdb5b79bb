"""Orientation: how much more likely each slice of a volume is as given than mirrored or transposed, averaged over
the volume, against in-distribution volumes. A volume-level check of in-plane orientation errors (a flipped or
rotated in-plane axis, swapped axes): one slice's log-ratio is noisy, the mean over a volume's slices is not.

A slice's log-ratios (`RATIO_COLUMNS`, bits/dim) are (log p_0(x) - log p_0(T x)) / (d ln 2) (eq. 10 at t = 0) for T
the vertical flip (rows reversed), the horizontal flip (columns reversed) and the transpose (rows and columns
swapped; square slices only). A volume's statistic is -min over T of its mean log-ratio standardised by the mean
and deviation of the in-distribution volumes' means: a volume stored upside down, mirrored, rotated or transposed
is more likely put back, so one of its ratios falls far below the usual. One-sided, like the `flip` detector;
blind to axes the anatomy is symmetric about (left-right in the brain) and to axes the model was trained to be
invariant to (`train.flip_prob`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

RATIO_COLUMNS = ("vflip_log_ratio", "hflip_log_ratio", "transpose_log_ratio")


def log_ratios(log_p0: Tensor, flips: Tensor, transposed: Tensor, num_dims: int) -> Tensor:
    """(log p_0(x) - log p_0(T x)) / (d ln 2) (B, 3) for T in vertical flip, horizontal flip, transpose, from log p_0
    of the slices (B,), of their mirror images `flips` (B, 2: rows, columns reversed) and of the transposed slices
    `transposed` (B, 1; `features.transpose_log_likelihoods`)."""
    others = torch.cat([flips, transposed], dim=1).double().cpu()
    return (log_p0.double().cpu()[:, None] - others) / (num_dims * math.log(2))


@dataclass(frozen=True)
class OrientationCheck:
    """The calibrated check: the in-distribution mean and deviation of a volume's mean log-ratios, and the threshold
    of its statistic."""

    name: ClassVar[str] = "orientation"
    columns: ClassVar[tuple[str, ...]] = RATIO_COLUMNS
    needs: ClassVar[tuple[str, ...]] = ("profile", "flips", "transpose")
    unlike: ClassVar[str] = "orientation unlike the calibration volumes"

    mean: np.ndarray
    scale: np.ndarray
    threshold: float
    stops: bool = True  # False: reported only (`volume_checks`)

    @staticmethod
    def fit(sequences: Sequence[np.ndarray]) -> dict[str, list[float]]:
        """The mean and deviation of the volume means of in-distribution sequences (n slices, 3)."""
        means = np.stack([s.mean(0) for s in sequences])
        return {"mean": means.mean(0).tolist(), "scale": np.maximum(means.std(0, ddof=1), 1e-12).tolist()}

    def statistic(self, sequence: np.ndarray) -> float:
        """-min over the transforms of the volume's standardised mean log-ratio: high when one is unusually low."""
        return float(-((sequence.mean(0) - self.mean) / self.scale).min())
