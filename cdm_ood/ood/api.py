"""`OODDetector`: a trained CDM, one detector and its threshold, for QA code."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import LoadedModel, load_model, store_calibration
from ..data.errors import DataError
from ..data.readers import iter_slices
from ..data.records import quality_flags
from ..data.walk import DEFAULT_IGNORE
from ..errors import UsageError
from ..likelihood import log_likelihood_profile_batched
from .calibration import DEFAULT_DETECTOR, DEFAULT_FPR, calibrate, load_detector, resolve_threshold
from .detectors import NotFittedError
from .report import IN, judge

Inputs = Any  # a tensor or array (H, W), (C, H, W) or (B, C, H, W); a path; a MONAI dict; or a sequence of them


class OODDetector:
    """Scores images with one detector of a trained model; higher = more out-of-distribution.

    Images are given in their own units (HU for CT, raw values otherwise, as read from the file) and are
    mapped with the model's stored intensity preset and size, exactly as in training. It fails closed, with the
    rules and reasons of the `cdm-ood score` report (`report.judge`): an image with NaN/inf or constant pixels
    is not scored (score NaN) and, like one whose score is not finite, is `flagged`, never in distribution.
    """

    def __init__(
        self,
        model: LoadedModel,
        detector: Optional[str] = None,
        threshold: str | float = "auto",
        batch_size: int = 64,
        image_key: str = "image",
    ) -> None:
        if model.spec.spatial_dims != 2:
            raise UsageError("OOD scoring works on 2D models; this model takes 3D volumes")
        self.model, self.batch_size, self.image_key = model, batch_size, image_key
        self.num_dims = model.spec.num_dims
        self.detector, self.id_scores, self.fpr = load_detector(
            model.calibration, detector, self.num_dims, model.spec.bit_depth
        )
        self.transform = model.spec.input_transform()
        self._threshold: Optional[float] = None
        if self.id_scores is not None or threshold != "auto":
            self.set_threshold(threshold)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, detector: Optional[str] = None, device: str | torch.device = "cpu", **kwargs
    ) -> OODDetector:
        """Load `model.pt` (weights-only) with its calibration; `detector` defaults to the calibrated default."""
        return cls(load_model(path, device), detector, **kwargs)

    @property
    def name(self) -> str:
        return self.detector.name

    @property
    def threshold(self) -> float:
        if self._threshold is None:
            raise NotFittedError("no threshold: calibrate the model (`cdm-ood calibrate`) or give a number")
        return self._threshold

    def set_threshold(self, spec: str | float) -> float:
        """`auto` (the calibrated false-positive rate), `fpr:<x>` or a number in score units."""
        self._threshold = resolve_threshold(spec, self.id_scores, self.fpr)
        return self._threshold

    def prepare(self, inputs: Inputs) -> Tensor:
        """Model-space batch (B, C, H, W) from any supported input."""
        return torch.stack([self.transform(image) for image in self._images(inputs)])

    def checked_profile(self, inputs: Inputs) -> tuple[Tensor, list[tuple[str, ...]]]:
        """log p_t(x) (B, T+2) of every image, NaN rows for images not scored, and each image's quality flags
        (NaN/inf or constant pixels, checked in the image's own units, before any mapping could hide them)."""
        images = self._images(inputs)
        flags = [quality_flags(_as_array(image)) for image in images]
        scorable = [i for i, f in enumerate(flags) if not f]
        scored = self.profile(torch.stack([self.transform(images[i]) for i in scorable])) if scorable else None
        dtype = torch.float32 if scored is None else scored.dtype
        profile = torch.full((len(images), self.model.schedule.T + 2), float("nan"), dtype=dtype)
        if scored is not None:
            profile[scorable] = scored
        return profile, flags

    def assess(self, inputs: Inputs) -> list[dict[str, Any]]:
        """Per image: `score` (NaN when not scored), `verdict` (`in`, `ood` or `flagged`) and `reason`, exactly as
        in the `cdm-ood score` report."""
        profile, flags = self.checked_profile(inputs)
        scores = self.score_profiles(profile)
        verdicts = [judge(float(s), self.threshold, f) for s, f in zip(scores, flags, strict=True)]
        return [{"score": float(s), "verdict": v, "reason": r} for s, (v, r) in zip(scores, verdicts, strict=True)]

    def _images(self, inputs: Inputs) -> list[np.ndarray | Tensor]:
        if isinstance(inputs, (str, os.PathLike)):
            return [s.image for s in iter_slices(Path(inputs))]
        if isinstance(inputs, Mapping):
            return self._images(inputs[self.image_key])
        if isinstance(inputs, (Tensor, np.ndarray)):
            if inputs.ndim == 2:
                return [inputs[None]]
            if inputs.ndim == 3:
                return [inputs]
            if inputs.ndim == 4:
                return list(inputs)
            raise ValueError(f"expected (H, W), (C, H, W) or a batch (B, C, H, W), got shape {tuple(inputs.shape)}")
        if isinstance(inputs, Sequence):
            return [image for item in inputs for image in self._images(item)]
        raise TypeError(f"cannot score a {type(inputs).__name__}: give tensors, arrays, paths or MONAI dicts")

    @torch.inference_mode()
    def profile(self, x: Tensor) -> Tensor:
        """log p_t(x) for t = 0..T+1 (nats) of a model-space batch, in chunks of `batch_size` (Theorem 3.2)."""
        device = next(self.model.classifier.parameters()).device
        return log_likelihood_profile_batched(self.model.classifier, x.cpu(), self.model.schedule, self.batch_size,
                                              device)  # fmt: skip

    def score_profiles(self, profiles: Tensor) -> np.ndarray:
        """This detector's scores of likelihood profiles log p_t(x) (B, T+2) already computed."""
        return self.detector.score(profiles).numpy()

    def score_prepared(self, x: Tensor) -> np.ndarray:
        """Scores of a model-space batch."""
        return self.score_profiles(self.profile(x))

    def score(self, inputs: Inputs) -> np.ndarray:
        """One score per image (B,), higher = more out-of-distribution; NaN for an image that could not be scored
        (NaN/inf or constant pixels)."""
        profile, _ = self.checked_profile(inputs)
        return self.score_profiles(profile)

    def predict(self, inputs: Inputs) -> np.ndarray:
        """True where an image is not in distribution: above the threshold, or not scorable (`flagged`)."""
        return np.array([a["verdict"] != IN for a in self.assess(inputs)], dtype=bool)

    def fit(self, id_inputs: Iterable[Inputs], fpr: float = DEFAULT_FPR) -> OODDetector:
        """Fit every detector on in-distribution images (an iterable of batches or inputs) and set this one's
        threshold for the false-positive rate `fpr`; images that cannot be scored are left out. `save` stores the
        result in a checkpoint."""
        profiles = torch.cat([p[torch.isfinite(p).all(dim=1)] for p, _ in map(self.checked_profile, id_inputs)])
        bit_depth = self.model.spec.bit_depth
        self.model.calibration = calibrate(profiles, self.num_dims, bit_depth, fpr, default=self.name)
        self.detector, self.id_scores, self.fpr = load_detector(
            self.model.calibration, self.name, self.num_dims, bit_depth
        )
        self.set_threshold("auto")
        return self

    def save(self, checkpoint: str | os.PathLike) -> Path:
        """Write the calibration from `fit` into `checkpoint` (atomically)."""
        if self.model.calibration is None:
            raise NotFittedError("nothing to save: call fit() first")
        return store_calibration(checkpoint, self.model.calibration)


def calibrate_checkpoint(
    checkpoint: str | os.PathLike,
    data: Sequence[str | os.PathLike],
    fpr: float = DEFAULT_FPR,
    detector: Optional[str] = None,
    batch_size: int = 64,
    on_error: Optional[Callable[[DataError], None]] = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
) -> tuple[OODDetector, int]:
    """Fit every detector on the scorable in-distribution slices below `data` and store the calibration in the
    checkpoint (atomically, weights unchanged); returns the calibrated detector and the number of slices used.
    Files that cannot be read go to `on_error`; files in folders matched by an `ignore` glob are left out."""
    scorer = OODDetector.from_checkpoint(checkpoint, detector or DEFAULT_DETECTOR, threshold=0.0, batch_size=batch_size)
    images = [s.image for s in iter_slices(list(data), on_error, ignore=ignore) if not s.flags]
    if len(images) < 4:
        raise UsageError(f"calibration needs at least 4 readable in-distribution slices, found {len(images)}")
    try:
        scorer.fit([images[i : i + batch_size] for i in range(0, len(images), batch_size)], fpr)
    except ValueError as err:
        raise UsageError(str(err)) from None
    scorer.save(checkpoint)
    return scorer, len(images)


def _as_array(image: np.ndarray | Tensor) -> np.ndarray:
    return image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
