"""`OODDetector`: a trained CDM, one detector and its threshold, for QA code."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from ..data.discovery import discover
from ..data.errors import DataError, UnreadableFileError
from ..data.records import SliceSource
from ..data.volumes import iter_inputs
from ..data.walk import DEFAULT_IGNORE, IgnoredFile
from ..errors import UsageError
from ..model.checkpoint import LoadedModel, load_model, store_calibration
from ..utils.progress import ProgressFactory, counted
from .calibration import (
    DEFAULT_DETECTOR,
    DEFAULT_FPR,
    calibrate_images,
    calibration_features,
    load_detector,
)
from .detectors import NotFittedError
from .inputs import Inputs, is_path
from .report import COLUMNS, FLOAT_COLUMNS, IN, UNREADABLE, aggregate, judge, volume_rows
from .scoring import ImageScorer, network_precision
from .thresholds import Thresholds, configured_report_only
from .volume_checks import CHECKS, STATISTICS, VolumeCheck, check_names

if TYPE_CHECKING:
    import pandas as pd

ON_ERROR = ("row", "skip", "raise")  # what `score_frame` does with a file that cannot be read
log = logging.getLogger("cdm_ood.api")


class OODDetector(ImageScorer):
    """Scores images with one detector of a trained model; higher = more out-of-distribution.

    Images are given in their own units (HU for CT, raw values otherwise, as read from the file) and are
    mapped with the model's stored intensity preset and size, exactly as in training. It fails closed, with the
    rules and reasons of the `cdm-ood score` report (`report.judge`): an image with NaN/inf or constant pixels, or
    read from a file whose header disagrees with itself (`cdm_ood.data.headers`), is not scored (score NaN) and,
    like one whose score is not finite, is `flagged`, never in distribution.

    A 3D model scores whole volumes (one forward pass each): arrays (D, H, W), (C, D, H, W), (B, C, D, H, W) and the
    volumes read from paths (`cdm_ood.ood.inputs`); a volume with any NaN/inf voxel or constant overall is flagged.

    `precision="bf16"` runs the network's backbone under bfloat16 autocast (the head, the logits and every statistic
    stay float32), a GPU setting. Scores move with the precision (docs/ood.md), so the default is the precision the
    calibration was made in (float32 when uncalibrated), and `fit` records the precision it ran in.

    A calibration fitted on whole volumes holds volume checks (`cdm_ood.ood.volume_checks`): a volume's row is then
    `ood` too when the shape of its slices' bits/dim along the slice axis (`slice-order`; `slice-direction`: that
    shape read for direction) or the mean log-ratio of its slices to their mirror images and transposes
    (`orientation`) is unlike the calibration volumes' (the checks share the threshold's false-positive rate).
    `volume_checks` names the checks to apply (default: all calibrated ones); leave one out for series that cover
    less or other anatomy, or another in-plane orientation, than the calibration volumes. `report_only` names those
    that are reported in a volume's reason without stopping it (default: the model configuration's
    `gate.report_only`).
    """

    def __init__(
        self,
        model: LoadedModel,
        detector: Optional[str] = None,
        threshold: str | float = "auto",
        batch_size: int = 64,
        image_key: str = "image",
        precision: Optional[str] = None,
        volume_checks: Sequence[str] = tuple(CHECKS),
        report_only: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__(model, detector, batch_size, image_key, precision, volume_checks)
        self.report_only = configured_report_only(model) if report_only is None else check_names(report_only)
        self.thresholds: Optional[Thresholds] = None
        if self.id_scores is not None or threshold != "auto":
            self.set_threshold(threshold)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, detector: Optional[str] = None, device: str | torch.device = "cpu", **kwargs
    ) -> OODDetector:
        """Load `model.pt` (weights-only) with its calibration; `detector` defaults to the calibrated default."""
        return cls(load_model(path, device), detector, **kwargs)

    @property
    def threshold(self) -> float:
        return self._thresholds().score

    @property
    def checks(self) -> tuple[VolumeCheck, ...]:
        """The volume checks that apply, with their thresholds (none before a threshold is set)."""
        return () if self.thresholds is None else self.thresholds.checks

    def _thresholds(self) -> Thresholds:
        if self.thresholds is None:
            raise NotFittedError("no threshold: calibrate the model (`cdm-ood calibrate`) or give a number")
        return self.thresholds

    def set_threshold(self, spec: str | float) -> float:
        """`auto` (the calibrated false-positive rate), `fpr:<x>` or a number in score units: this detector's
        `Thresholds` from now on (`Thresholds.resolve`: the volume checks share the same false-positive rate)."""
        self.thresholds = Thresholds.resolve(self, spec, self.report_only)
        return self.thresholds.score

    def __repr__(self) -> str:
        spec, threshold = self.model.spec, None if self.thresholds is None else self.thresholds.score
        shape = "x".join(str(n) for n in (spec.channels, *spec.size))
        return (f"OODDetector(detector={self.name!r}, threshold={None if threshold is None else f'{threshold:.6g}'}, "
                f"fpr={self.fpr}, model=CDM {shape} {spec.preset.name} T={spec.schedule.T} "
                f"{spec.model.arch}{tuple(spec.model.channels)})")  # fmt: skip

    def assess(self, inputs: Inputs) -> list[dict[str, Any]]:
        """Per image: `score` (NaN when not scored), `verdict` (`in`, `ood` or `flagged`), `reason`, exactly as
        in the `cdm-ood score` report, and its `volume_checks.STATISTICS` (bits/dim, orientation log-ratios; NaN where
        the features computed lack them)."""
        features, flags = self.checked_features(inputs)
        scores, statistics = self.score_features(features), self.statistics(features)
        verdicts = [judge(float(s), self.threshold, f) for s, f in zip(scores, flags, strict=True)]
        return [{"score": float(s), "verdict": v, "reason": r, **{c: float(statistics[c][i]) for c in STATISTICS}}
                for i, (s, (v, r)) in enumerate(zip(scores, verdicts, strict=True))]  # fmt: skip

    def score_samples(self, inputs: Inputs) -> np.ndarray:
        """sklearn's convention (as `IsolationForest.score_samples`): higher = more normal, i.e. `-score`."""
        return -self.score(inputs)

    @property
    def offset_(self) -> float:
        """sklearn's offset: `decision_function = score_samples - offset_`, so `offset_ = -threshold`."""
        return -self.threshold

    def decision_function(self, inputs: Inputs) -> np.ndarray:
        """sklearn's convention: `score_samples - offset_ = threshold - score`; negative = OOD (above the
        threshold), positive = in distribution, NaN where not scored."""
        return self.score_samples(inputs) - self.offset_

    def predict(self, inputs: Inputs) -> np.ndarray:
        """True where an image is not in distribution: above the threshold, or not scorable (`flagged`). (A bool
        per image, not sklearn's +1/-1.)"""
        return np.array([a["verdict"] != IN for a in self.assess(inputs)], dtype=bool)

    def score_frame(self, inputs: Inputs, on_error: str = "row", per_volume: str = "mean") -> pd.DataFrame:
        """The `cdm-ood score` report as a pandas DataFrame (`report.COLUMNS`: level, path, slice, time_point,
        volume, sop_instance_uid, score, threshold, verdict, reason and the statistics `volume_checks.STATISTICS`),
        built by the gate's own code, volume checks included.

        Paths (files or folders) give the report's rows: one per slice, one per volume (the `per_volume`
        aggregate), one `ignored` row per file in a folder that the default ignore list leaves out (with the
        pattern) and, with `on_error="row"`, one `unreadable` row per file that cannot be read, with its reason;
        `on_error="skip"` leaves such files out (logged), `"raise"` raises the file's error. Images given in memory
        get one slice row each (path and volume empty, slice = their position among them). A 3D model gives
        volume rows instead of slice rows (one per volume; `per_volume` does not apply).
        """
        import pandas as pd

        from .batch import score_sources

        if on_error not in ON_ERROR:
            raise UsageError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        aggregate(per_volume)
        items = [inputs] if is_path(inputs) or not isinstance(inputs, (list, tuple)) else list(inputs)
        paths = [Path(item) for item in items if is_path(item)]
        errors: list[DataError] = []
        ignored: list[IgnoredFile] = []
        handler = None if on_error == "raise" else errors.append
        sources = discover(paths, handler, on_ignored=ignored.append) if paths else []
        rows = score_sources(self, self._thresholds(), sources, errors, per_volume, ignored=ignored) if paths else []
        unreadable = [r for r in rows if r["verdict"] == UNREADABLE]
        if unreadable and on_error == "raise":
            raise UnreadableFileError(unreadable[0]["path"], unreadable[0]["reason"])
        if on_error == "skip":
            for row in unreadable:
                log.warning("skipped %s: %s", row["path"], row["reason"])
            rows = [r for r in rows if r["verdict"] != UNREADABLE]
        memory = self._memory_rows([item for item in items if not is_path(item)])
        in_volumes = [r for r in memory if r["volume"] is not None]
        rows += memory + volume_rows(in_volumes, self.threshold, per_volume, self.checks)
        frame = pd.DataFrame(rows, columns=list(COLUMNS))
        return frame.astype({"slice": "Int64", "time_point": "Int64"} | dict.fromkeys(FLOAT_COLUMNS, "float64"))

    def _memory_rows(self, inputs: Sequence[Inputs]) -> list[dict]:
        rows: list[dict] = []
        for features, flags, sources in self._checked_chunks(inputs, self._needs(None)):
            scores, statistics = self.score_features(features), self.statistics(features)
            for i, (score, flag, source) in enumerate(zip(scores.tolist(), flags, sources, strict=True)):
                where = source or SliceSource("", len(rows), "")
                row = self.report_row(where, score, self.threshold, flag, {c: v[i] for c, v in statistics.items()})
                rows.append(row if source else row | {"path": None, "volume": None})
        return rows

    def fit(
        self,
        id_inputs: Inputs,
        fpr: float = DEFAULT_FPR,
        groups: Optional[Sequence[Hashable]] = None,
        precision: Optional[str] = None,
    ) -> OODDetector:
        """Fit every detector on in-distribution images and set this one's threshold for the false-positive rate
        `fpr`; `save` stores the result in a checkpoint. Images that cannot be scored are left out.

        `id_inputs` is anything `score` takes (an array (N, H, W) or (N, C, H, W), volumes for a 3D model, a
        folder, a list of arrays, an iterable of batches such as a DataLoader), scored in batches of `batch_size`
        however it is grouped. Half of the volumes are held out to set the threshold (`calibration.calibrate`):
        slices read from files keep their volume (series or file); `groups` gives one volume id per image for
        images given in memory, which otherwise each count as their own volume. `precision` (default: this
        detector's) is the network precision the calibration is made in, and this detector's from then on.
        """
        if precision is not None:
            self.precision = network_precision(precision, None)
        needs = calibration_features(self.model.spec, self.num_classes)
        features, volumes, slots = self.calibration_inputs(id_inputs, needs)
        if groups is not None:
            if len(groups) != len(volumes):
                raise UsageError(f"{len(groups)} groups for {len(volumes)} images: give one volume id per image")
            volumes = list(groups)
        calibration = calibrate_images(features, volumes, slots, self.num_dims, self.model.spec.bit_depth, fpr,
                                       self.name, self.num_classes, self.precision)  # fmt: skip
        self.model.calibration, self._maps = calibration, None
        self.detector, self.id_scores, self.fpr = load_detector(
            calibration, self.name, self.num_dims, self.model.spec.bit_depth, self.num_classes
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
    device: str | torch.device = "cpu",
    progress: Optional[ProgressFactory] = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    precision: str = "float32",
) -> tuple[OODDetector, int]:
    """Fit every detector on the scorable in-distribution slices below `data` (whole volumes for a 3D model; half
    of the volumes held out) and store the calibration in the checkpoint (atomically, weights unchanged); returns
    the calibrated detector and the number of slices (volumes) used. Files that cannot be read go to `on_error`;
    files in folders matched by an `ignore` glob are left out. `progress(total, phase)`, once the slices are read,
    returns the function to call with each number of slices handed to the model. `precision` is the network
    precision the features are computed in, and the one scoring then uses by default."""
    scorer = OODDetector.from_checkpoint(
        checkpoint, detector or DEFAULT_DETECTOR, device, threshold=0.0, batch_size=batch_size
    )
    images = list(iter_inputs(list(data), scorer.model.spec.spatial_dims, on_error, ignore=ignore))
    scorer.fit(counted(images, progress(len(images), "calibrating") if progress else None), fpr, precision=precision)
    scorer.save(checkpoint)
    calibration = scorer.model.calibration
    return scorer, calibration.n_fit + len(scorer.id_scores)
