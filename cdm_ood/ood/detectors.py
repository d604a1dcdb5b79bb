"""OOD detectors: statistics of what one trained CDM says about an image (`cdm_ood.ood.features`).

Each detector names the features it needs (`needs`), is fitted on in-distribution features only, maps features to
scores (B,), higher = more out-of-distribution (the pytorch-ood convention), and round-trips through plain data
(and tensors) so it can live inside a weights-only checkpoint. `cost` is its price per image in forward-pass
equivalents (a backward pass counts as two forward passes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torch import Tensor

from ..diffusion.likelihood import bits_per_dim
from ..errors import CdmOodError, UsageError
from .features import class_posterior, feature_cost, select_rows

Features = dict[str, Tensor]
"""Row-aligned feature tensors of a batch: `profile` (B, T+2) nats, `residuals` (B, K, C, *spatial) signed
denoising residuals eps_hat - eps at the K `DENOISE_FRACTIONS` levels, `flips` (B, A) log p_0 of the scan mirrored
along each axis, `class_ll` (B, num_classes) log p_0(x | y) (`cdm_ood.ood.features.compute_features`)."""


class NotFittedError(CdmOodError, RuntimeError):
    """A detector or threshold was used before it was fitted on in-distribution data."""


class Detector:
    """Base of the detectors: `fit` on in-distribution features, then `score`."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ("profile",)

    def __init__(self, num_dims: int, bit_depth: int = 8, num_classes: Optional[int] = None) -> None:
        self.num_dims, self.bit_depth, self.num_classes = num_dims, bit_depth, num_classes

    @classmethod
    def applies_to(cls, num_classes: Optional[int]) -> bool:
        """Whether a model with `num_classes` labels (None: unconditional) gives this detector's features."""
        return "class_ll" not in cls.needs or num_classes is not None

    def required(self) -> tuple[str, ...]:
        """The features this detector reads."""
        return self.needs

    def cost(self, spatial_dims: int) -> float:
        """Forward-pass equivalents per image of its features (`features.feature_cost`)."""
        return sum(feature_cost(k, spatial_dims, self.num_classes) for k in self.required())

    def fit(self, features: Features) -> Detector:
        return self

    def score(self, features: Features) -> Tensor:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild the fitted detector, as plain Python data and tensors."""
        return {"name": self.name, "num_dims": self.num_dims, "bit_depth": self.bit_depth,
                "num_classes": self.num_classes}  # fmt: skip

    @staticmethod
    def from_state(state: dict[str, Any]) -> Detector:
        """The fitted detector that `state()` describes."""
        if state.get("name") not in DETECTORS:
            raise ValueError(f"unknown detector {state.get('name')!r}; expected one of {sorted(DETECTORS)}")
        detector = DETECTORS[state["name"]](state["num_dims"], state["bit_depth"], state.get("num_classes"))
        detector.load(state)
        return detector

    def load(self, state: dict[str, Any]) -> None:
        """Restore what `fit` learned (nothing for a detector without parameters)."""


class NLLDetector(Detector):
    """-log p_0(x) in bits/dim (eq. 10 at t = 0): the exact negative log-likelihood of the clean-data model.
    One-sided: an image that is *too* likely (over-smoothed, flat) passes."""

    name = "nll"

    def score(self, features: Features) -> Tensor:
        return bits_per_dim(features["profile"][:, 0].double(), self.num_dims, self.bit_depth)


class GaussianDetector(Detector):
    """Squared Mahalanobis distance of a feature vector under a Gaussian fitted to in-distribution features, each
    standardised, with Ledoit-Wolf shrinkage. Two-sided: a feature too small is as far as one too large."""

    fitted_keys: ClassVar[tuple[str, ...]] = ("mean", "scale", "precision")

    def __init__(self, num_dims: int, bit_depth: int = 8, num_classes: Optional[int] = None) -> None:
        super().__init__(num_dims, bit_depth, num_classes)
        self.mean = self.scale = self.precision = torch.empty(0)

    def vector(self, features: Features) -> Tensor:
        """The (B, k) float64 feature vector this detector models."""
        raise NotImplementedError

    def fit(self, features: Features) -> GaussianDetector:
        from sklearn.covariance import LedoitWolf

        f = self.vector(features)
        if f.shape[0] < 2:
            raise ValueError(f"the {self.name} detector needs at least 2 in-distribution images, got {f.shape[0]}")
        self.mean, self.scale = f.mean(0), f.std(0).clamp_min(1e-12)
        self.precision = torch.from_numpy(LedoitWolf().fit(((f - self.mean) / self.scale).numpy()).precision_)
        return self

    def _check_fitted(self) -> None:
        if self.mean.numel() == 0:
            raise NotFittedError(f"the {self.name} detector is not fitted: calibrate it on in-distribution data")

    def score(self, features: Features) -> Tensor:
        self._check_fitted()
        z = (self.vector(features) - self.mean) / self.scale
        return ((z @ self.precision) * z).sum(1)

    def state(self) -> dict[str, Any]:
        self._check_fitted()
        return super().state() | {k: getattr(self, k).tolist() for k in self.fitted_keys}

    def load(self, state: dict[str, Any]) -> None:
        for k in self.fitted_keys:
            setattr(self, k, torch.as_tensor(state[k], dtype=torch.float64))


class MultiscaleDetector(GaussianDetector):
    """Mahalanobis distance of the per-dimension profile log p_t(x) / d at `levels` noise levels (t = 0 and T+1
    included). The distance is invariant to invertible linear maps of the features, so it equally models the
    likelihood ratios log p_0(x) - log p_t(x) between the clean and the noised densities; it sees at which noise
    scales a scan departs from the training data."""

    name = "multiscale"
    levels = 16

    def columns(self, num_levels: int) -> list[int]:
        """`levels` evenly spaced columns of a profile with `num_levels` = T+2 columns."""
        return sorted({round(v) for v in np.linspace(0, num_levels - 1, self.levels).tolist()})

    def vector(self, features: Features) -> Tensor:
        profile = features["profile"]
        return profile[:, self.columns(profile.shape[1])].double().cpu() / self.num_dims


def _log_level_errors(features: Features) -> Tensor:
    """log of the mean squared denoising error at each level (B, K): one Monte Carlo term of the variational bound
    per level, on a log scale where in-distribution values are close to Gaussian."""
    return features["residuals"].flatten(2).double().square().mean(2).clamp_min(1e-30).log().cpu()


class DenoiseDetector(GaussianDetector):
    """Score-function statistic (Theorem 3.1): how well the gradient denoiser removes a fixed noise draw from the
    scan at the `features.DENOISE_FRACTIONS` levels, as a Gaussian over the log errors. The bound-like terms that make a
    DDPM's variational bound catch noise and spikes, from three denoiser calls instead of hundreds."""

    name = "denoise"
    needs = ("residuals",)

    def vector(self, features: Features) -> Tensor:
        return _log_level_errors(features)


class FlipDetector(Detector):
    """Orientation statistic: r_a = (log p_0(x) - log p_0(flip_a x)) / d for each spatial axis a (eq. 10 on the
    scan and on each mirror image), standardised by its in-distribution mean and deviation; the score is -min_a z_a.
    A scan stored upside down or mirrored is more likely flipped back, so its ratio falls on the wrong side; the
    per-image complexity that dominates log p_0(x) cancels in the ratio. One-sided on purpose: a scan *more*
    clearly oriented than usual is not suspect. Blind to axes the model was trained to be invariant to
    (`train.flip_prob`) or that the anatomy is symmetric about (left-right in the brain)."""

    name = "flip"
    needs = ("profile", "flips")

    def __init__(self, num_dims: int, bit_depth: int = 8, num_classes: Optional[int] = None) -> None:
        super().__init__(num_dims, bit_depth, num_classes)
        self.mean = self.scale = torch.empty(0)

    def _ratios(self, features: Features) -> Tensor:
        log_p0 = features["profile"][:, :1].double().cpu()
        return (log_p0 - features["flips"].double().cpu()) / self.num_dims

    def fit(self, features: Features) -> FlipDetector:
        r = self._ratios(features)
        if r.shape[0] < 2:
            raise ValueError(f"the flip detector needs at least 2 in-distribution images, got {r.shape[0]}")
        self.mean, self.scale = r.mean(0), r.std(0).clamp_min(1e-12)
        return self

    def score(self, features: Features) -> Tensor:
        if self.mean.numel() == 0:
            raise NotFittedError("the flip detector is not fitted: calibrate it on in-distribution data")
        return -((self._ratios(features) - self.mean) / self.scale).amin(1)

    def state(self) -> dict[str, Any]:
        if self.mean.numel() == 0:
            raise NotFittedError("the flip detector is not fitted: nothing to save")
        return super().state() | {"mean": self.mean.tolist(), "scale": self.scale.tolist()}

    def load(self, state: dict[str, Any]) -> None:
        self.mean, self.scale = (torch.tensor(state[k], dtype=torch.float64) for k in ("mean", "scale"))


class ClassifierDetector(Detector):
    """The class-conditional CDM as a generative classifier: -max_y p(y | x) by Bayes' rule from log p_0(x | y)
    of every label (uniform prior), the max-softmax statistic of a classifier that is also the density."""

    name = "classifier"
    needs = ("class_ll",)

    def score(self, features: Features) -> Tensor:
        return -class_posterior(features["class_ll"].double().cpu()).exp().amax(1)


def smoothed(maps: Tensor, width: float) -> Tensor:
    """Maps (B, *spatial), 2D or 3D, smoothed over the spatial axes by a Gaussian of `width` pixels (MONAI's separable
    filter, edges replicated; 0 leaves them as they are)."""
    from monai.networks.layers import separable_filtering
    from monai.networks.layers.convutils import gaussian_1d

    kernel = gaussian_1d(torch.tensor(width), truncated=4.0)
    return separable_filtering(maps[:, None], [kernel] * (maps.ndim - 1), mode="replicate")[:, 0]


class PixelDetector(Detector):
    """A per-pixel statistic of the denoising residuals (`statistic`, (B, K, C, *spatial) over the K levels),
    standardised by its in-distribution mean and deviation at each pixel; the detection map (`maps`, (B, *spatial))
    is the root mean square of these z-scores over levels and channels (about 1 in distribution), the score its
    `quantile`: high when any region is unlike the training data. Two-sided."""

    needs = ("residuals",)
    quantile = 0.99

    def __init__(self, num_dims: int, bit_depth: int = 8, num_classes: Optional[int] = None) -> None:
        super().__init__(num_dims, bit_depth, num_classes)
        self.mean = self.std = torch.empty(0)

    def statistic(self, features: Features) -> Tensor:
        """The per-pixel statistic (B, K, C, *spatial), float32 on the CPU."""
        raise NotImplementedError

    def fit(self, features: Features) -> PixelDetector:
        values = self.statistic(features)
        if values.shape[0] < 2:
            raise ValueError(f"the {self.name} detector needs at least 2 in-distribution images, got {values.shape[0]}")
        self.mean, self.std = values.mean(0), values.std(0).clamp_min(1e-6)
        return self

    def maps(self, features: Features) -> Tensor:
        """The detection map (B, *spatial): root mean square over levels and channels of the per-pixel standardised
        statistic."""
        return self._standardised_rms(features, self.mean, self.std)

    def _standardised_rms(self, features: Features, mean: Tensor, scale: Tensor) -> Tensor:
        if self.mean.numel() == 0:
            raise NotFittedError(f"the {self.name} detector is not fitted: calibrate it on in-distribution data")
        return ((self.statistic(features) - mean) / scale).square().mean(dim=(1, 2)).sqrt()

    def score(self, features: Features) -> Tensor:
        z = self.maps(features).flatten(1).double()
        return torch.quantile(z, self.quantile, dim=1) if z.shape[0] else z.sum(1)

    def state(self) -> dict[str, Any]:
        if self.mean.numel() == 0:
            raise NotFittedError(f"the {self.name} detector is not fitted: nothing to save")
        return super().state() | {"mean": self.mean, "std": self.std}

    def load(self, state: dict[str, Any]) -> None:
        self.mean, self.std = torch.as_tensor(state["mean"]), torch.as_tensor(state["std"])


class MapDetector(PixelDetector):
    """Where a scan is out of distribution: log(1 + squared denoising residual) of each pixel at each level,
    standardised per pixel (`PixelDetector`). A region the denoiser recovers too well (a flat patch where texture
    belongs) stands out as much as one it cannot recover.

    The map shown and written (`anomaly_maps`) answers where instead: each pixel's log error less its in-distribution
    mean at that pixel, over the deviation pooled over all pixels of its level (`pooled_scale`), root mean square over
    levels and channels, smoothed by a Gaussian of `smoothing` pixels. Pixels whose error is always low (air around
    the body) have a tiny deviation of their own, so per-pixel z-scores make them noisy; and each pixel's error comes
    from one noise draw, while a defect spans several pixels. Both choices come from a development defect set
    (docs/ood.md)."""

    name = "map"
    smoothing = 1.5  # pixels of the model's grid; chosen on a development defect set (docs/ood.md)

    def statistic(self, features: Features) -> Tensor:
        return features["residuals"].float().cpu().square().log1p()

    def pooled_scale(self) -> Tensor:
        """Per level and channel, the in-distribution deviation of log(1 + error) about its own pixel's mean, pooled
        over the pixels (K, C, 1...): the root mean of the per-pixel variances."""
        return self.std.square().mean(tuple(range(2, self.std.ndim)), keepdim=True).sqrt()

    def anomaly_maps(self, features: Features, smoothing: Optional[float] = None) -> Tensor:
        """The localisation map (B, *spatial): root mean square over levels and channels of log(1 + error) less its
        pixel's in-distribution mean, over the level's `pooled_scale`, `smoothed` by a Gaussian of `smoothing` pixels
        (default: the class's), 2D or 3D: where each image is out of distribution."""
        width = self.smoothing if smoothing is None else smoothing
        return smoothed(self._standardised_rms(features, self.mean, self.pooled_scale()), width)


class DriftDetector(PixelDetector):
    """Smooth departures that no single pixel's error shows (a bias field, a slow intensity drift): the signed
    denoising residual eps_hat(x_t, t) - eps (Theorem 3.1) at each level, `smoothed` over space by a Gaussian of
    `smoothing` pixels, standardised per pixel (`PixelDetector`). The part of the residual that the noise draw
    causes averages out; what stays is where the denoiser consistently pulls intensities back towards the training
    data's. Blind to high-frequency artifacts (their residuals average out too), which `map` sees. The width was
    chosen on development phantom artifacts (docs/ood.md); no extra network pass over `map`."""

    name = "drift"
    smoothing = 1.5  # pixels of the model's grid; chosen on development phantom artifacts (docs/ood.md)

    def statistic(self, features: Features) -> Tensor:
        residuals = features["residuals"].float().cpu()
        return smoothed(residuals.flatten(0, 2), self.smoothing).reshape(residuals.shape)


class MaxZDetector(Detector):
    """The largest of its component detectors' scores, each standardised by the mean and deviation of its
    *out-of-sample* scores on in-distribution images: a scan is out of distribution when any one statistic says so.

    The scale comes from two-fold cross-fitting (components fitted on every other image score the rest, and the
    other way round; in-sample below 4 images); the components kept are then fitted on all images. In-sample
    scores would understate a fitted component's spread (a Mahalanobis distance or per-pixel statistics from a few
    images) and let it dominate the maximum. Fitted on in-distribution features only; no OOD example chooses or
    weighs the components."""

    components: ClassVar[tuple[type[Detector], ...]]

    def __init__(self, num_dims: int, bit_depth: int = 8, num_classes: Optional[int] = None) -> None:
        super().__init__(num_dims, bit_depth, num_classes)
        self.parts = self._fresh()
        self.mean = self.scale = torch.empty(0)

    @classmethod
    def applies_to(cls, num_classes: Optional[int]) -> bool:
        return all(c.applies_to(num_classes) for c in cls.components)

    def required(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for part in self.parts for k in part.required()))

    def _scores(self, features: Features) -> Tensor:
        return torch.stack([part.score(features).double() for part in self.parts], dim=1)

    def fit(self, features: Features) -> MaxZDetector:
        n = len(next(iter(features.values())))
        even = torch.arange(n) % 2 == 0
        scores = torch.empty(n, len(self.components), dtype=torch.float64)
        for side in (even, ~even) if n >= 4 else ():
            self.parts = [part.fit(select_rows(features, side)) for part in self._fresh()]
            scores[~side] = self._scores(select_rows(features, ~side))
        self.parts = [part.fit(features) for part in self._fresh()]
        if n < 4:  # too few to cross-fit (calibration warns about such sets): in-sample scores
            scores = self._scores(features)
        self.mean, self.scale = scores.mean(0), scores.std(0).clamp_min(1e-12)
        return self

    def _fresh(self) -> list[Detector]:
        return [c(self.num_dims, self.bit_depth, self.num_classes) for c in self.components]

    def score(self, features: Features) -> Tensor:
        if self.mean.numel() == 0:
            raise NotFittedError(f"the {self.name} detector is not fitted: calibrate it on in-distribution data")
        return ((self._scores(features) - self.mean) / self.scale).amax(1)

    def state(self) -> dict[str, Any]:
        if self.mean.numel() == 0:
            raise NotFittedError(f"the {self.name} detector is not fitted: nothing to save")
        return super().state() | {"parts": [part.state() for part in self.parts], "mean": self.mean.tolist(),
                                  "scale": self.scale.tolist()}  # fmt: skip

    def load(self, state: dict[str, Any]) -> None:
        self.parts = [Detector.from_state(part) for part in state["parts"]]
        self.mean, self.scale = (torch.tensor(state[k], dtype=torch.float64) for k in ("mean", "scale"))


class CombinedDetector(MaxZDetector):
    """`multiscale` (the likelihood profile), `map` (local denoising errors) and `flip` (orientation), as one
    two-sided gate: 9 forward-pass equivalents per 2D image."""

    name = "combined"
    components = (MultiscaleDetector, MapDetector, FlipDetector)


class CombinedDriftDetector(MaxZDetector):
    """`combined` with `drift`: the profile, local denoising errors, orientation and smooth intensity drift, from the
    same features (9 forward-pass equivalents per 2D image)."""

    name = "combined-drift"
    components = (MultiscaleDetector, MapDetector, FlipDetector, DriftDetector)


class ClassifierNLLDetector(MaxZDetector):
    """The generative classifier combined with the density: `classifier` and `nll` of one class-conditional CDM."""

    name = "classifier-nll"
    components = (NLLDetector, ClassifierDetector)


_ALL = (
    NLLDetector,
    MultiscaleDetector,
    DenoiseDetector,
    FlipDetector,
    ClassifierDetector,
    CombinedDetector,
    MapDetector,
    ClassifierNLLDetector,
    DriftDetector,
    CombinedDriftDetector,
)
DETECTORS: dict[str, type[Detector]] = {d.name: d for d in _ALL}


def register_detector(detector: type[Detector]) -> type[Detector]:
    """Class decorator that makes a `Detector` subclass (a `name`, the `needs` it reads of `features.FEATURES`,
    `fit`, `score` and, when it learns parameters, `state`/`load`) one of `DETECTORS`: calibration fits it from
    then on, and `--detector NAME` / `OODDetector(model, NAME)` score with it. A new detector is one file that
    defines and registers it, imported before calibration and scoring. Refuses a name already taken."""
    if detector.name in DETECTORS and DETECTORS[detector.name] is not detector:
        raise UsageError(f"a detector named {detector.name!r} is already registered ({DETECTORS[detector.name]})")
    DETECTORS[detector.name] = detector
    return detector


def applicable(num_classes: Optional[int]) -> list[str]:
    """The detectors a model with `num_classes` labels (None: unconditional) can be calibrated for."""
    return [name for name, d in DETECTORS.items() if d.applies_to(num_classes)]


def required_features(names: Sequence[str], num_classes: Optional[int]) -> tuple[str, ...]:
    """The union of the features the detectors `names` read, in a fixed order."""
    return tuple(dict.fromkeys(k for name in names for k in DETECTORS[name](1, 8, num_classes).required()))
