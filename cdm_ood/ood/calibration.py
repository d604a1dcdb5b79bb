"""Thresholds for a target false-positive rate, fitted on in-distribution validation features.

The calibration of a model is a `cdm_ood.model.spec.Calibration` (stored in its checkpoint by
`checkpoint.store_calibration`): for each detector its fitted state and its scores on held-out in-distribution
images, from which any threshold `fpr:<x>` is computed; `auto` uses the stored `fpr`. Everything here is pure
(problems with the data are logged as warnings).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..data.medical import split_volumes
from ..errors import UsageError
from ..model.spec import Calibration, DetectorFit, ModelSpec, VolumeCheckFit
from .detectors import DETECTORS, Detector, Features, MapDetector, NotFittedError, applicable, required_features
from .features import finite_rows, select_rows
from .local_check import MAP_COLUMNS
from .volume_checks import CHECKS, MIN_SLICES, Slot, VolumeCheck, image_statistics, ordered_sequences

DEFAULT_FPR = 0.05
DEFAULT_DETECTOR = "combined"  # chosen on development OOD sets, measured on held-out ones (docs/ood.md)
MIN_IMAGES = 4  # two to fit the multiscale detector, two held out

log = logging.getLogger("cdm_ood.calibration")


def threshold_at_fpr(id_scores: np.ndarray, fpr: float) -> float:
    """The lowest in-distribution score that at most a fraction `fpr` of the in-distribution scores exceed
    (the k-th largest of n, k = floor(fpr n)): a score above it is OOD."""
    if not 0.0 < fpr < 1.0:
        raise UsageError(f"the false-positive rate must be in (0, 1), got {fpr}")
    if len(id_scores) == 0:
        raise NotFittedError("no in-distribution scores to set a threshold from")
    ordered = np.sort(np.asarray(id_scores, dtype=np.float64))
    k = int(np.floor(fpr * len(ordered) + 1e-9))
    return float(ordered[len(ordered) - k - 1])


def calibrate(
    features: Features,
    num_dims: int,
    bit_depth: int,
    fpr: float = DEFAULT_FPR,
    detectors: Optional[Sequence[str]] = None,
    default: str = DEFAULT_DETECTOR,
    groups: Optional[Sequence[Hashable]] = None,
    num_classes: Optional[int] = None,
    precision: str = "float32",
    slots: Optional[Sequence[Slot]] = None,
) -> Calibration:
    """Fit each detector on about half of the in-distribution images' features and score the other half, so the
    stored scores (and thresholds) are out-of-sample; `groups` (e.g. volume ids, one per image; default: every image
    its own) keeps each group on one side (`held_out_split`). Warns when the held-out half is too small for `fpr`.
    `detectors` defaults to every detector the model allows (`detectors.applicable`); `precision` records the network
    precision the features were computed in. `slots` (one per image: its slice sequence and slice index, or None)
    fits the volume checks on the same split (`fit_volume_checks`).
    """
    threshold_at_fpr(np.zeros(1), fpr)
    detectors = applicable(num_classes) if detectors is None else detectors
    if default not in detectors:
        raise ValueError(f"default detector {default!r} is not among {list(detectors)}")
    n = len(next(iter(features.values())))
    if n < MIN_IMAGES:
        raise ValueError(f"calibration needs at least {MIN_IMAGES} in-distribution images, got {n}")
    if groups is not None and len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} images: give one group (volume) per image")
    held = held_out_split(range(n) if groups is None else groups)
    fit_part, held_out = select_rows(features, ~held), select_rows(features, held)
    warn_if_too_few(int(held.sum()), fpr)
    fits = {}
    for name in detectors:
        detector = DETECTORS[name](num_dims, bit_depth, num_classes).fit(fit_part)
        fits[name] = DetectorFit(detector.state(), tuple(detector.score(held_out).tolist()))
    checks = {}
    if slots is not None:
        statistics = image_statistics(features, num_dims, bit_depth)
        if MapDetector.name in detectors and "residuals" in features:
            statistics.update(cross_fitted_map_statistics(features, held, num_dims, bit_depth, num_classes))
        checks = fit_volume_checks(statistics, slots, held.tolist(), fpr)
    return Calibration(fpr, default, n - int(held.sum()), fits, precision, checks)


def calibration_features(spec: ModelSpec, num_classes: Optional[int]) -> tuple[str, ...]:
    """The features a model's calibration computes: every applicable detector's, and for a 2D model those of the
    volume checks (the transposes only of square slices)."""
    needs = required_features(applicable(num_classes), num_classes)
    if spec.unit != "slice":
        return tuple(needs)
    square = len(set(spec.size)) == 1
    checks = dict.fromkeys(k for check in CHECKS.values() for k in check.needs)
    return tuple(dict.fromkeys((*needs, *(k for k in checks if square or k != "transpose"))))


def calibrate_images(
    features: Features,
    volumes: Sequence[Hashable],
    slots: Sequence[Slot],
    num_dims: int,
    bit_depth: int,
    fpr: float = DEFAULT_FPR,
    default: str = DEFAULT_DETECTOR,
    num_classes: Optional[int] = None,
    precision: str = "float32",
) -> Calibration:
    """The calibration of a model from its in-distribution images' `calibration_features`, one volume id and one
    slot per image (`calibrate`: every applicable detector, held out by volume, the volume checks on the slots): the
    one calibration of `cdm-ood calibrate`, `OODDetector.fit` and the end of training. Images whose features are not
    all finite (not scorable) are left out. `UsageError` when fewer than `MIN_IMAGES` remain or no calibration can
    be made from them."""
    scorable = finite_rows(features)
    if int(scorable.sum()) < MIN_IMAGES:
        raise UsageError(f"calibration needs at least {MIN_IMAGES} scorable in-distribution images, found "
                         f"{int(scorable.sum())}")  # fmt: skip
    kept = scorable.tolist()
    try:
        return calibrate(select_rows(features, scorable), num_dims, bit_depth, fpr, applicable(num_classes),
                         default=default, groups=[v for v, k in zip(volumes, kept, strict=True) if k],
                         num_classes=num_classes, precision=precision,
                         slots=[s for s, k in zip(slots, kept, strict=True) if k])  # fmt: skip
    except ValueError as err:
        raise UsageError(str(err)) from None


def cross_fitted_map_statistics(
    features: Features, held: Tensor, num_dims: int, bit_depth: int, num_classes: Optional[int]
) -> dict[str, np.ndarray]:
    """The anomaly-map peaks (`local_check.MAP_COLUMNS`) of every calibration image from a map detector fitted
    without it: the held-out images' from the one fitted on the others (the calibrated map), the others' from one
    fitted on the held-out images, so that the local checks' thresholds are set on out-of-sample peaks."""
    out = {column: np.empty(len(held)) for column in MAP_COLUMNS}  # both sides together fill every row
    for side in (held, ~held):
        maps = MapDetector(num_dims, bit_depth, num_classes).fit(select_rows(features, ~side))
        found = image_statistics(select_rows(features, side), num_dims, bit_depth, maps)
        for column in MAP_COLUMNS:
            out[column][side.numpy()] = found[column]
    return out


def fit_volume_checks(
    statistics: Mapping[str, np.ndarray], slots: Sequence[Slot], held: Sequence[bool], fpr: float
) -> dict[str, VolumeCheckFit]:
    """Every volume check (`volume_checks`) whose per-image statistics hold finite values, cross-fitted on the
    calibration split: fitted on the sequences of one side, it scores those of the other, both ways round, so every
    calibration volume gets an out-of-sample statistic (a volume check has a few volumes, not thousands of slices,
    to set its threshold from); the check kept is fitted on all of them. A warning says when the volumes are too few
    for a threshold at the check's share of `fpr`. A check is left out (logged) when either side has fewer than two
    sequences of `volume_checks.MIN_SLICES` scored slices."""
    fits = {}
    on = [np.asarray(held) == side for side in (False, True)]
    placed = [[s for s, k in zip(slots, m, strict=True) if k] for m in on]
    for name, check in CHECKS.items():
        values = np.stack([np.asarray(statistics[c], dtype=np.float64) for c in check.columns], axis=1)
        sides = [list(ordered_sequences(values[m], side).values()) for m, side in zip(on, placed, strict=True)]
        if min(len(side) for side in sides) < 2:
            log.info("no %s check: it needs at least 2 volumes of %d or more scored slices on each side of the "
                     "calibration split, found %d and %d", name, MIN_SLICES, *map(len, sides))  # fmt: skip
            continue
        scores = [_built(name, check.fit(fitted), math.inf).statistic(s)
                  for fitted, scored in (sides, sides[::-1]) for s in scored]  # fmt: skip
        params = check.fit(sides[0] + sides[1])
        fits[name] = VolumeCheckFit({k: tuple(v) for k, v in params.items()}, tuple(scores))
    for name, fit in fits.items():  # the checks share the rate (`load_volume_checks`)
        warn_if_too_few(len(fit.id_scores), fpr / len(fits), f"volumes for the {name} check", share=1)
    return fits


def held_out_split(groups: Sequence[Hashable]) -> Tensor:
    """A boolean mask of the images to hold out: whole groups (volumes) on each side, half of the groups by a
    seeded shuffle (`data.medical.split_volumes`, the split of the training data). Where that cannot leave at
    least two images on each side (a single volume), every other image is held out, with a warning that the
    held-out images then share volumes with the fitted ones."""
    groups = list(groups)
    codes = {g: str(k) for k, g in enumerate(dict.fromkeys(groups))}
    sides = split_volumes(list(codes.values()), (0.5, 0.5, 0.0))
    held = torch.tensor([sides[codes[g]] == "val" for g in groups], dtype=torch.bool)
    if min(int(held.sum()), len(held) - int(held.sum())) >= 2:
        return held
    log.warning("the %d calibration images come from %d volume(s), too few to hold out whole volumes: every other "
                "image is held out, so held-out images share volumes with the fitted ones and the threshold is not "
                "tested on unseen scans; calibrate on more volumes", len(groups), len(codes))  # fmt: skip
    return torch.arange(len(groups)) % 2 == 1


def warn_if_too_few(n_held_out: int, fpr: float, what: str = "images", share: int = 2) -> None:
    """Log a warning when fewer than 1/fpr images (or `what`) are held out (scored out of sample): the threshold at
    `fpr` is then just the largest held-out score (k = floor(fpr n) = 0), which says nothing about that false-positive
    rate. Calibration holds out one in `share` of them (2: half the volumes; 1: all, by cross-fitting)."""
    needed = math.ceil(1 / fpr - 1e-9)
    if n_held_out < needed:
        log.warning("only %d held-out in-distribution %s for a false-positive rate of %g: a threshold at that "
                    "rate needs at least %d held out (calibrate on about %d); this one is just the largest held-out "
                    "score", n_held_out, what, fpr, needed, share * needed)  # fmt: skip


def resolve_threshold(spec: str | float, id_scores: np.ndarray | None, fpr: float | None) -> float:
    """A threshold from `auto` (the calibrated fpr), `fpr:<x>` or a number in the detector's score units."""
    text = str(spec).strip()
    if text == "auto" or text.startswith("fpr:"):
        if id_scores is None or fpr is None:
            raise NotFittedError(f"threshold {text!r} needs a calibrated model: run `cdm-ood calibrate` first")
        threshold = threshold_at_fpr(id_scores, fpr if text == "auto" else _fraction(text[4:]))
    else:
        try:
            threshold = float(spec)
        except ValueError:
            raise UsageError(f"threshold must be 'auto', 'fpr:<x>' or a number, got {text!r}") from None
    if not np.isfinite(threshold):
        raise UsageError(f"threshold must be a finite number, got {threshold}: a NaN or infinite threshold would "
                         "pass or fail every image without looking at it")  # fmt: skip
    return threshold


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"'fpr:{text}': expected a false-positive rate such as fpr:0.05") from None


def load_volume_checks(
    calibration: Optional[Calibration], spec: str | float, names: Sequence[str], report_only: Sequence[str] = ()
) -> tuple[VolumeCheck, ...]:
    """The calibrated volume checks among `names`, sharing the false-positive rate of the threshold `spec` (that of
    `fpr:<x>`; the calibrated rate for `auto` or a number): each of the k checks found that stop the gate takes its
    threshold at 1/k of it (Bonferroni), so that together they stop at most about that rate of in-distribution
    volumes. Those among `report_only` are reported, not stopping (`stops` False), at the same per-check rate."""
    if calibration is None:
        return ()
    text = str(spec).strip()
    fpr = _fraction(text[4:]) if text.startswith("fpr:") else calibration.fpr
    fits = {name: calibration.volume_checks[name] for name in names if name in calibration.volume_checks}
    share = fpr / max(1, sum(name not in report_only for name in fits))
    return tuple(_built(name, fit.params, threshold_at_fpr(np.asarray(fit.id_scores), share), name not in report_only)
                 for name, fit in fits.items())  # fmt: skip


def _built(name: str, params: Mapping[str, Sequence[float]], threshold: float, stops: bool = True) -> VolumeCheck:
    """The volume check `name` with fitted `params` (as stored: sequences of floats), `threshold` and `stops`."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    return CHECKS[name](**arrays, threshold=threshold, stops=stops)


def load_detector(
    calibration: Optional[Calibration], name: str | None, num_dims: int, bit_depth: int, num_classes: Optional[int]
) -> tuple[Detector, np.ndarray | None, float | None]:
    """The detector `name` (default: the calibrated default) with its in-distribution scores and fpr; an
    uncalibrated one has neither (it scores only if it needs no fitting, and takes numeric thresholds only)."""
    name = name or (calibration.default if calibration else DEFAULT_DETECTOR)
    if name not in DETECTORS:
        raise UsageError(f"unknown detector {name!r}; expected one of {sorted(DETECTORS)}")
    if not DETECTORS[name].applies_to(num_classes):
        raise UsageError(f"the {name!r} detector needs a class-conditional model (model.num_classes); this one is "
                         "unconditional")  # fmt: skip
    fit = calibration.detectors.get(name) if calibration else None
    if fit is None:
        return DETECTORS[name](num_dims, bit_depth, num_classes), None, None
    return Detector.from_state(fit.state), np.asarray(fit.id_scores), calibration.fpr
