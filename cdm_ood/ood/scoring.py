"""`ImageScorer`: a trained CDM and one of its detectors, scoring model inputs in batches: features, scores,
statistics for the volume checks and anomaly maps, at the calibration's network precision. It holds no threshold
and reads no files; `OODDetector` (the Python API) adds those."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator, Sequence
from typing import Optional, cast

import numpy as np
import torch
from torch import Tensor

from ..data.records import SliceSource, header_flags, quality_flags
from ..diffusion.likelihood import log_likelihood_profile_batched
from ..errors import UsageError
from ..model.checkpoint import LoadedModel
from ..model.spec import Calibration
from ..utils.precision import PRECISIONS, autocast
from .calibration import load_detector
from .detectors import Features, MapDetector
from .features import batched_features, concat_features, empty_features
from .inputs import Inputs, Item, chunks, iter_images
from .report import slice_row, volume_row
from .volume_checks import CHECKS, Slot, check_names, image_statistics

Source = Optional[SliceSource]
log = logging.getLogger("cdm_ood.api")  # the Python API's log, as users filter it


class ImageScorer:
    """Scores images with one detector of a trained model (default: the calibrated default); higher = more
    out-of-distribution. Images are given in their own units and mapped with the model's stored preset and size
    (`transform`), exactly as in training; an image with NaN/inf or constant pixels, or read from a file whose
    header disagrees with itself, is not scored (NaN). `precision` (default: the calibration's) is the network's;
    of the `volume_checks` named, those calibrated (on a 2D model's slices) are `self.volume_checks`, whose features
    every pass computes too (their thresholds are `thresholds.Thresholds`)."""

    def __init__(
        self,
        model: LoadedModel,
        detector: Optional[str] = None,
        batch_size: int = 64,
        image_key: str = "image",
        precision: Optional[str] = None,
        volume_checks: Sequence[str] = tuple(CHECKS),
    ) -> None:
        self.model, self.batch_size, self.image_key = model, batch_size, image_key
        self.precision = network_precision(precision, model.calibration)
        self.num_dims = model.spec.num_dims
        self.num_classes = model.spec.model.num_classes
        self.unit = model.spec.unit  # what one image is, in reports
        self.report_row = volume_row if self.unit == "volume" else slice_row
        self.detector, self.id_scores, self.fpr = load_detector(
            model.calibration, detector, self.num_dims, model.spec.bit_depth, self.num_classes
        )
        self.transform = model.spec.input_transform()
        self._maps: Optional[MapDetector] = None
        self.use_checks = check_names(volume_checks)

    @property
    def name(self) -> str:
        return self.detector.name

    @property
    def volume_checks(self) -> tuple[str, ...]:
        """The volume checks asked for (`use_checks`) that the calibration holds (a 2D model's only)."""
        calibration = self.model.calibration
        calibrated = calibration.volume_checks if calibration is not None and self.unit == "slice" else {}
        return tuple(name for name in self.use_checks if name in calibrated)

    def prepare(self, inputs: Inputs) -> Tensor:
        """Model-space batch (B, C, H, W), or (B, C, D, H, W) for a 3D model, from any supported input."""
        return torch.stack([self.transform(image) for image, _, _ in self._images(inputs)])

    def checked_features(
        self, inputs: Inputs, needs: Optional[Sequence[str]] = None
    ) -> tuple[Features, list[tuple[str, ...]]]:
        """The features `needs` (default: this detector's) of every image, NaN rows for images not scored, and each
        image's flags: its header's, for images read from files (`cdm_ood.data.headers`), and its pixels' (NaN/inf or
        constant, checked in the image's own units, before any mapping could hide them)."""
        needs = self._needs(needs)
        parts = list(self._checked_chunks(inputs, needs))
        if not parts:
            return empty_features(needs, 0, self.model.spec, self.model.schedule), []
        return concat_features([p for p, _, _ in parts]), [f for _, flags, _ in parts for f in flags]

    def _needs(self, needs: Optional[Sequence[str]]) -> tuple[str, ...]:
        """`needs`, or this detector's features and those the volume checks that are on read."""
        if needs is not None:
            return tuple(needs)
        checks = (k for name in self.volume_checks for k in CHECKS[name].needs)
        return tuple(dict.fromkeys((*self.detector.required(), *checks)))

    def _images(self, inputs: Inputs) -> Iterator[Item]:
        return iter_images(inputs, self.model.spec.channels, self.image_key, self.model.spec.spatial_dims)

    def _checked_chunks(
        self, inputs: Inputs, needs: Sequence[str]
    ) -> Iterator[tuple[Features, list[tuple[str, ...]], list[Source]]]:
        """`checked_features` of the images of `inputs` in chunks of `batch_size` images, one batched pass each
        whatever the inputs' own grouping, with each image's source (None for images given in memory)."""
        for chunk in chunks(self._images(inputs), self.batch_size):
            images, sources, given = zip(*chunk, strict=True)
            flags = [tuple(dict.fromkeys((*header_flags(g), *quality_flags(_as_array(image)))))
                     for image, g in zip(images, given, strict=True)]  # fmt: skip
            scorable = [i for i, f in enumerate(flags) if not f]
            features = empty_features(needs, len(images), self.model.spec, self.model.schedule)
            if scorable:
                scored = self.features(torch.stack([self.transform(images[i]) for i in scorable]), needs)
                for name, value in scored.items():
                    features[name] = features[name].to(value.dtype)
                    features[name][scorable] = value
            yield features, flags, list(sources)

    @property
    def device(self) -> torch.device:
        """Where the model's network runs."""
        return next(self.model.classifier.parameters()).device

    @torch.inference_mode()
    def profile(self, x: Tensor) -> Tensor:
        """log p_t(x) for t = 0..T+1 (nats) of a model-space batch, in chunks of `batch_size` (Theorem 3.2)."""
        with autocast(self.device, self.precision):
            return log_likelihood_profile_batched(self.model.classifier, x.cpu(), self.model.schedule,
                                                  self.batch_size, self.device)  # fmt: skip

    def features(self, x: Tensor, needs: Optional[Sequence[str]] = None) -> Features:
        """The features `needs` (default: this detector's; `cdm_ood.ood.features`) of a model-space batch, on the
        CPU, computed on the model's device in chunks of `batch_size`."""
        with autocast(self.device, self.precision):
            return batched_features(self.model.classifier, x.cpu().split(self.batch_size), self.model.schedule,
                                    self._needs(needs), self.num_classes, self.device)  # fmt: skip

    def score_features(self, features: Features) -> np.ndarray:
        """This detector's scores of features already computed (NaN rows stay NaN)."""
        return self.detector.score(features).numpy()

    def statistics(self, features: Features) -> dict[str, np.ndarray]:
        """The `volume_checks.STATISTICS` of each image (-log p_0 in bits/dim, eq. 10 at t = 0, the orientation
        log-ratios, the body's statistics, the calibrated anomaly map's peaks) from the features that hold them, else
        NaN."""
        calibrated = self.model.calibration is not None and MapDetector.name in self.model.calibration.detectors
        maps = self._map_detector() if calibrated else None
        return image_statistics(features, self.num_dims, self.model.spec.bit_depth, maps)

    def score_prepared(self, x: Tensor) -> np.ndarray:
        """Scores of a model-space batch."""
        return self.score_features(self.features(x))

    def scored_prepared(
        self, x: Tensor, maps: bool = False
    ) -> tuple[np.ndarray, dict[str, np.ndarray], Optional[np.ndarray]]:
        """Scores, statistics (`statistics`) and, with `maps`, anomaly maps (`anomaly_maps_prepared`) of a
        model-space batch, from one computation of the features they need (shared where they overlap)."""
        features = self.features(x, (*self._needs(None), *(MapDetector.needs if maps else ())))
        amaps = self._map_detector().anomaly_maps(features).numpy() if maps else None
        return self.score_features(features), self.statistics(features), amaps

    def score(self, inputs: Inputs) -> np.ndarray:
        """One score per image (N,), higher = more out-of-distribution (the pytorch-ood convention); NaN for an
        image that could not be scored (NaN/inf or constant pixels). Images: see `cdm_ood.ood.inputs`."""
        features, _ = self.checked_features(inputs)
        return self.score_features(features)

    def anomaly_maps(self, inputs: Inputs) -> np.ndarray:
        """Where each image is out of distribution: the calibrated `map` detector's per-pixel map (N, *spatial) on the
        model's grid (higher = more OOD; in-distribution pixels are about 1, in units of their in-distribution standard
        deviation), NaN for an image that could not be scored. Images: as `score`."""
        features, _ = self.checked_features(inputs, MapDetector.needs)
        return self._map_detector().anomaly_maps(features).numpy()

    def anomaly_maps_prepared(self, x: Tensor) -> np.ndarray:
        """`anomaly_maps` of a model-space batch."""
        return self._map_detector().anomaly_maps(self.features(x, MapDetector.needs)).numpy()

    def _map_detector(self) -> MapDetector:
        if self._maps is None:
            detector, _, _ = load_detector(self.model.calibration, MapDetector.name, self.num_dims,
                                           self.model.spec.bit_depth, self.num_classes)  # fmt: skip
            self._maps = cast(MapDetector, detector)
        return self._maps

    def calibration_inputs(self, inputs: Inputs, needs: Sequence[str]) -> tuple[Features, list[Hashable], list[Slot]]:
        """The features `needs` of in-distribution images with each image's volume (its series or file; an image
        given in memory its own) and slot (its slice sequence and index, for the volume checks; None for images in
        memory and for a 3D model's volumes), as `calibration.calibrate_images` takes them."""
        parts: list[Features] = []
        volumes: list[Hashable] = []
        slots: list[Slot] = []
        for features, _, sources in self._checked_chunks(inputs, needs):
            volumes += [s.volume_id if s else ("in memory", len(volumes) + i) for i, s in enumerate(sources)]
            slots += [((s.volume_id, s.time_point), s.index) if s and self.unit == "slice" else None for s in sources]
            parts.append(features)
        features = concat_features(parts) if parts else empty_features(needs, 0, self.model.spec, self.model.schedule)
        return features, volumes, slots


def network_precision(precision: Optional[str], calibration: Optional[Calibration]) -> str:
    """The network precision to score in: `precision`, else the calibration's (float32 when uncalibrated); a warning
    when it is not the calibration's, whose thresholds then apply to features computed otherwise."""
    calibrated = calibration.precision if calibration else "float32"
    if precision is None:
        return calibrated
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if calibration and precision != calibrated:
        log.warning("scoring in %s with a calibration made in %s: the scores move with the precision and the "
                    "thresholds no longer hold their false-positive rate; calibrate with --precision %s",
                    precision, calibrated, precision)  # fmt: skip
    return precision


def _as_array(image: np.ndarray | Tensor) -> np.ndarray:
    return image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
