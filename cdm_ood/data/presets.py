"""Fixed, named intensity presets: the mapping from file intensities to the model's [-1, 1].

A preset is fitted once (on the training set, for `mr`) and stored with the model, so that scoring applies
exactly the training mapping. Per-image normalisation (`minmax`) is an explicit opt-in only: it erases the
brightness and contrast shifts an OOD detector exists to see.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
from monai.transforms import ScaleIntensity, ScaleIntensityRange, Transform

from ..errors import UsageError

PRESETS = ("ct", "mr", "uint8", "minmax")


@dataclass(frozen=True)
class IntensityPreset:
    """`name` and, for the fixed presets, the input range [a_min, a_max] mapped linearly onto [-1, 1] (clipped).

    - `ct`: a Hounsfield window, [-1000, 1000] HU by default.
    - `mr`: percentiles of the pooled training intensities (see `fit_mr_preset`), stored, never per image.
    - `uint8`: [0, 255], for 8-bit natural images and PNGs.
    - `minmax`: each image on its own range (opt-in; hides global intensity shifts).
    """

    name: str
    a_min: Optional[float] = None
    a_max: Optional[float] = None

    def __post_init__(self) -> None:
        if self.name not in PRESETS:
            raise UsageError(f"unknown intensity preset {self.name!r}; expected one of {PRESETS}")
        fixed = self.name != "minmax"
        if fixed and (self.a_min is None or self.a_max is None or not self.a_min < self.a_max):
            raise UsageError(f"preset {self.name!r} needs a_min < a_max, got [{self.a_min}, {self.a_max}]")
        if not fixed and (self.a_min is not None or self.a_max is not None):
            raise UsageError("preset 'minmax' takes no range: it rescales every image on its own")

    def transform(self) -> Transform:
        """The MONAI array transform that applies this preset to a (C, H, W) image."""
        if self.name == "minmax":
            return ScaleIntensity(minv=-1.0, maxv=1.0)
        return ScaleIntensityRange(self.a_min, self.a_max, b_min=-1.0, b_max=1.0, clip=True)

    def inverse(self, image: np.ndarray) -> np.ndarray:
        """Model-space values back in input units (exact inside the range; `minmax` has no inverse)."""
        if self.name == "minmax":
            return image
        return (image + 1.0) / 2.0 * (self.a_max - self.a_min) + self.a_min

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IntensityPreset:
        return cls(**d)


def ct_preset(window: tuple[float, float] = (-1000.0, 1000.0)) -> IntensityPreset:
    """A fixed Hounsfield window mapped to [-1, 1]."""
    return IntensityPreset("ct", float(window[0]), float(window[1]))


def uint8_preset() -> IntensityPreset:
    """[0, 255] mapped to [-1, 1]."""
    return IntensityPreset("uint8", 0.0, 255.0)


def minmax_preset() -> IntensityPreset:
    """Per-image min-max scaling (opt-in)."""
    return IntensityPreset("minmax")


def fit_mr_preset(
    images: Iterable[np.ndarray],
    percentiles: tuple[float, float] = (0.5, 99.5),
    max_values: int = 2_000_000,
    seed: int = 0,
) -> IntensityPreset:
    """The `mr` preset: percentiles of the intensities pooled over the whole training set.

    At most `max_values` intensities are kept (a seeded random subsample of each image, in proportion), so
    fitting stays cheap on large sets.
    """
    images = list(images)
    if not images:
        raise UsageError("cannot fit the 'mr' preset on an empty training set")
    total = sum(img.size for img in images)
    keep = min(1.0, max_values / total)
    rng = np.random.default_rng(seed)
    pooled = np.concatenate(
        [img.ravel() if keep == 1.0 else rng.choice(img.ravel(), max(1, int(img.size * keep))) for img in images]
    )
    lo, hi = np.percentile(pooled[np.isfinite(pooled)], percentiles)
    if not lo < hi:
        raise UsageError(f"training intensities are constant between the {percentiles} percentiles ({lo})")
    return IntensityPreset("mr", float(lo), float(hi))


def make_preset(name: str, images: Optional[Iterable[np.ndarray]] = None, **params: Any) -> IntensityPreset:
    """Factory from a config: `ct` (window=(lo, hi)), `uint8`, `minmax`, or `mr` fitted on `images`."""
    if name == "ct":
        return ct_preset(**params)
    if name == "uint8":
        return uint8_preset()
    if name == "minmax":
        return minmax_preset()
    if name == "mr":
        if images is None:
            raise UsageError("the 'mr' preset is fitted on the training images; none were given")
        return fit_mr_preset(images, **params)
    raise UsageError(f"unknown intensity preset {name!r}; expected one of {PRESETS}")
