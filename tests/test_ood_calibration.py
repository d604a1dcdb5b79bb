"""Thresholds at a target false-positive rate, threshold specs, calibration storage and the metrics."""

import csv
import logging
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIG, TINY_CT
from hypothesis import assume, given
from hypothesis import strategies as st
from test_score import invoke

from cdm_ood.data import iter_slices
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.presets import IntensityPreset
from cdm_ood.data.volume_files import write_dicom_series, write_nifti
from cdm_ood.errors import UsageError
from cdm_ood.model.checkpoint import load_checkpoint, save_checkpoint, store_calibration
from cdm_ood.model.sections import ModelConfig, ScheduleConfig
from cdm_ood.model.spec import Calibration, ModelSpec, VolumeCheckFit
from cdm_ood.ood import DETECTORS, NotFittedError, calibrate, resolve_threshold, threshold_at_fpr
from cdm_ood.ood.anatomy_check import FOREGROUND_COLUMNS
from cdm_ood.ood.calibration import (
    calibrate_images,
    calibration_features,
    fit_volume_checks,
    held_out_split,
    load_detector,
    load_volume_checks,
    warn_if_too_few,
)
from cdm_ood.ood.detectors import MapDetector, applicable
from cdm_ood.ood.features import select_rows
from cdm_ood.ood.metrics import ood_metrics
from cdm_ood.ood.orientation_check import RATIO_COLUMNS, OrientationCheck
from cdm_ood.ood.volume_checks import STATISTICS


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.2])
def test_threshold_flags_at_most_fpr_and_is_the_tightest_such(fpr):
    scores = np.random.default_rng(0).normal(size=1000)
    threshold = threshold_at_fpr(scores, fpr)
    assert (scores > threshold).mean() <= fpr
    assert (scores >= threshold).mean() > fpr, "one step lower would flag more than fpr"


@pytest.mark.parametrize(("n", "fpr", "k"), [(64, 0.05, 3), (64, 0.1, 6), (30, 0.05, 1), (19, 0.05, 0), (7, 0.3, 2)])
def test_threshold_flags_floor_of_fpr_n_when_that_is_not_a_whole_number(n, fpr, k):
    """k = floor(fpr n) scores lie above the threshold (3 of 64 at fpr 0.05, 4.7%), never ceil (4 of 64, 6.25%)."""
    scores = np.random.default_rng(n).permutation(np.arange(n, dtype=np.float64))
    threshold = threshold_at_fpr(scores, fpr)
    assert int((scores > threshold).sum()) == k


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=300, unique=True), st.data())
def test_threshold_at_fpr_flags_exactly_floor_of_fpr_n_held_out_scores(scores, data):
    """For any n distinct held-out scores and any rate f in (0, 1): exactly floor(f n) lie above the threshold (f is
    drawn as (k + u) / n with u in [0, 1), so floor(f n) = k is known without computing it)."""
    n = len(scores)
    k = data.draw(st.integers(0, n - 1))
    u = data.draw(st.floats(0.0, 0.999))
    fpr = (k + u) / n
    assume(0.0 < fpr < 1.0)
    assert int((np.asarray(scores) > threshold_at_fpr(np.asarray(scores), fpr)).sum()) == k


def test_threshold_specs():
    ids = np.arange(1.0, 101.0)
    assert resolve_threshold("auto", ids, 0.05) == threshold_at_fpr(ids, 0.05) == 95.0
    assert resolve_threshold("fpr:0.5", ids, 0.05) == 50.0
    assert resolve_threshold("2.5", ids, 0.05) == resolve_threshold(2.5, None, None) == 2.5
    with pytest.raises(NotFittedError, match="calibrate"):
        resolve_threshold("auto", None, None)
    with pytest.raises(ValueError, match="'auto', 'fpr:<x>' or a number"):
        resolve_threshold("high", ids, 0.05)
    with pytest.raises(ValueError, match=r"fpr:0\.05"):
        resolve_threshold("fpr:five", ids, 0.05)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        resolve_threshold("fpr:1.5", ids, 0.05)


PROFILE_ONLY = ("nll", "multiscale")  # the detectors of the likelihood profile alone


def test_calibration_scores_held_out_images_and_is_plain_data():
    profiles = torch.randn(41, 12, dtype=torch.float64) - 50
    ood = calibrate({"profile": profiles}, num_dims=16, bit_depth=8, fpr=0.1, detectors=PROFILE_ONLY, default="nll")
    assert ood.fpr == 0.1 and ood.default == "nll" and ood.n_fit == 21
    assert set(ood.detectors) == {"nll", "multiscale"}
    assert all(len(e.id_scores) == 20 for e in ood.detectors.values())
    assert Calibration.from_dict(ood.to_dict()) == ood
    with pytest.raises(ValueError, match="at least 4"):
        calibrate({"profile": profiles[:3]}, 16, 8, detectors=PROFILE_ONLY, default="nll")


def test_store_calibration_rewrites_the_checkpoint_loadable_weights_only(tmp_path):
    path = tmp_path / "model.pt"
    payload = {"config": {}, "spec": {}, "step": 1, "ema": {"w": torch.ones(2)}}
    save_checkpoint(path, payload)
    ood = calibrate({"profile": torch.randn(8, 5, dtype=torch.float64)}, 4, 8, detectors=PROFILE_ONLY, default="nll")
    store_calibration(path, ood)
    loaded = load_checkpoint(path)
    assert Calibration.from_dict(loaded["calibration"]) == ood and torch.equal(loaded["ema"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"], "no temporary file left behind"


def test_metrics_on_separable_and_identical_sets():
    rng = np.random.default_rng(0)
    ids = rng.normal(size=2000)
    assert ood_metrics(ids, ids + 100) == {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0}
    same = ood_metrics(ids, rng.normal(size=2000))
    assert abs(same["auroc"] - 0.5) < 0.03 and abs(same["fpr95"] - 0.95) < 0.03


def write_volumes(folder: Path, slices: tuple[int, ...]) -> list[str]:
    """CT phantom volumes with the given slice counts, alternately NIfTI files and DICOM series; their slices'
    volume ids as the data layer reads them back."""
    rng = np.random.default_rng(5)
    for k, n in enumerate(slices):
        volume = phantom_volume(rng, size=16, slices=n)
        if k % 2:
            write_dicom_series(volume, folder / f"series{k}", modality="ct", volume_index=k)
        else:
            write_nifti(volume, folder / f"vol{k}.nii.gz")
    return [s.source.volume_id for s in iter_slices(folder)]


def test_held_out_images_are_whole_volumes_read_from_files(tmp_path):
    groups = write_volumes(tmp_path, (3, 6, 4, 5, 2, 7))
    held = held_out_split(groups).tolist()
    sides = {volume: {h for g, h in zip(groups, held, strict=True) if g == volume} for volume in set(groups)}
    assert len(sides) == 6 and all(len(s) == 1 for s in sides.values()), "no volume on both sides"
    assert sum(s == {True} for s in sides.values()) == 3, "half of the volumes held out"
    profiles = torch.randn(len(groups), 12, dtype=torch.float64) - 50
    ood = calibrate({"profile": profiles}, 16, 8, fpr=0.2, groups=groups, detectors=PROFILE_ONLY, default="nll")
    assert ood.n_fit == held.count(False) and len(ood.detectors["nll"].id_scores) == held.count(True)
    with pytest.raises(ValueError, match="one group"):
        calibrate({"profile": profiles}, 16, 8, groups=groups[1:], detectors=PROFILE_ONLY, default="nll")


def test_the_stored_scores_are_the_held_out_images_scored_by_detectors_fitted_without_them():
    """Out-of-sample, value for value: each detector fitted on the other side of `held_out_split` only (never on
    the held-out images themselves) scores the held-out ones; those scores are what the calibration stores."""
    groups = [f"v{k // 3}" for k in range(24)]
    profiles = torch.randn(24, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) - 50
    profiles[::5] += 3.0  # some images far from the rest: a detector fitted on them too would score them lower
    calibration = calibrate({"profile": profiles}, 16, 8, groups=groups, detectors=PROFILE_ONLY, default="nll")
    held = held_out_split(groups)
    for name in PROFILE_ONLY:
        fitted = DETECTORS[name](16, 8).fit({"profile": profiles[~held]})
        expected = fitted.score({"profile": profiles[held]}).numpy()
        np.testing.assert_allclose(calibration.detectors[name].id_scores, expected, rtol=1e-12)
        in_sample = DETECTORS[name](16, 8).fit({"profile": profiles}).score({"profile": profiles[held]}).numpy()
        assert name == "nll" or not np.allclose(in_sample, expected), f"{name} must depend on what it was fitted on"


def test_a_single_volume_is_held_out_slice_by_slice_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="cdm_ood.calibration"):
        held = held_out_split(["series-1"] * 8)
    assert held.tolist() == [False, True] * 4
    assert "from 1 volume(s)" in caplog.text and "share volumes" in caplog.text


@pytest.mark.parametrize(("fpr", "warned"), [(0.01, True), (0.05, False)])
def test_a_held_out_set_smaller_than_one_over_fpr_is_warned_about(caplog, fpr, warned):
    with caplog.at_level(logging.WARNING, logger="cdm_ood.calibration"):
        calibrate(
            {"profile": torch.randn(40, 12, dtype=torch.float64) - 50},
            16,
            8,
            fpr=fpr,
            detectors=PROFILE_ONLY,
            default="nll",
        )
    assert ("held-out in-distribution images for a false-positive rate" in caplog.text) == warned
    assert not warned or "only 20 held-out in-distribution images for a false-positive rate of 0.01" in caplog.text


@pytest.mark.slow
def test_a_trained_model_holds_the_calibration_cdm_ood_calibrate_makes_on_its_validation_volumes(tmp_path):
    """`cdm-ood train` calibrates at its end exactly as `cdm-ood calibrate` does on the validation volumes: the same
    detectors and held-out scores, the same volume checks, the same precision."""
    overrides = [f"data.root={tmp_path / 'phantoms'}", *TINY_CT, "data.phantoms={n: 12, size: 16, slices: 8}",
                 "data.fractions=[0.5, 0.5, 0.0]", "train.steps=10", "train.val_every=10",
                 "train.checkpoint_every=10", "tracking.enabled=false"]  # fmt: skip
    out = invoke(
        "train", "--config", CONFIG, "--out-dir", tmp_path / "run", *(a for o in overrides for a in ("--set", o))
    )
    assert out.exit_code == 0, out.output
    trained = Calibration.from_dict(load_checkpoint(tmp_path / "run" / "model.pt")["calibration"])
    with open(tmp_path / "run" / "split_manifest.csv", newline="") as f:
        val = [row["path"] for row in csv.DictReader(f) if row["split"] == "val"]
    copy = tmp_path / "copy.pt"
    shutil.copy(tmp_path / "run" / "model.pt", copy)
    out = invoke("calibrate", *val, "--checkpoint", copy)
    assert out.exit_code == 0, out.output
    calibrated = Calibration.from_dict(load_checkpoint(copy)["calibration"])
    assert {"slice-order", "orientation", "anatomy", "local"} <= set(trained.volume_checks), "the volume checks"
    assert set(trained.volume_checks) == set(calibrated.volume_checks)
    assert set(trained.detectors) == set(calibrated.detectors)
    assert (trained.fpr, trained.default, trained.n_fit, trained.precision) == (
        calibrated.fpr, calibrated.default, calibrated.n_fit, calibrated.precision)  # fmt: skip
    for name, fit in trained.detectors.items():
        np.testing.assert_allclose(fit.id_scores, calibrated.detectors[name].id_scores, rtol=1e-4, atol=1e-6)
    for name, fit in trained.volume_checks.items():
        np.testing.assert_allclose(fit.id_scores, calibrated.volume_checks[name].id_scores, rtol=1e-4, atol=1e-6)


def test_the_volume_checks_that_stop_share_the_rate_and_the_report_only_ones_take_the_same_share():
    """Of 20 stored scores 1..20, the threshold at rate r is the (floor(20 r) + 1)-th largest; the k checks that stop
    share the rate (r / k), those reported only take that share too and do not stop."""
    scores = tuple(float(s) for s in range(1, 21))
    orientation = VolumeCheckFit({"mean": (0.0, 0.0, 0.0), "scale": (1.0, 1.0, 1.0)}, scores)
    fits = {"local": VolumeCheckFit({}, scores), "orientation": orientation, "foreign": VolumeCheckFit({}, scores)}
    calibration = Calibration(0.2, "nll", 1, {}, volume_checks=fits)

    def built(spec, names, report_only=()):
        return [(c.name, c.threshold, c.stops) for c in load_volume_checks(calibration, spec, names, report_only)]

    assert built("auto", ["foreign", "local"]) == [("foreign", 18.0, True), ("local", 18.0, True)]
    assert built("auto", ["foreign", "local"], ["foreign"]) == [("foreign", 16.0, False), ("local", 16.0, True)]
    assert built("fpr:0.4", ["local", "anatomy"], ["local"]) == [("local", 12.0, False)], "no check stops: k = 1"
    assert built(" fpr:4e-1", ["local"]) == [("local", 12.0, True)], "the whole rate after 'fpr:'"
    assert built(3.0, ["orientation", "local", "foreign"], ["local"]) == [
        ("orientation", 18.0, True), ("local", 18.0, False), ("foreign", 18.0, True)
    ]  # fmt: skip
    (check,) = load_volume_checks(calibration, "auto", ["orientation"])
    assert check.mean.tolist() == [0.0, 0.0, 0.0] and check.scale.tolist() == [1.0, 1.0, 1.0]
    assert load_volume_checks(None, "auto", ["local"]) == ()


def test_threshold_at_fpr_takes_the_k_th_largest_of_floor_fpr_n_and_refuses_rates_outside_0_1():
    ids = np.arange(1.0, 101.0)
    assert threshold_at_fpr(ids, 0.29) == 71.0, "0.29 * 100 is 28.999...: k = 29 all the same"
    assert threshold_at_fpr(np.array([7.0]), 0.5) == 7.0, "one score is enough"
    for fpr in (0.0, 1.0, 1.5):
        with pytest.raises(UsageError, match=re.escape(f"the false-positive rate must be in (0, 1), got {fpr}")):
            threshold_at_fpr(ids, fpr)
    with pytest.raises(NotFittedError, match=r"^no in-distribution scores to set a threshold from$"):
        threshold_at_fpr(np.zeros(0), 0.05)


def test_threshold_specs_are_read_stripped_and_their_errors_say_what_is_expected():
    ids = np.arange(1.0, 101.0)
    assert resolve_threshold(" auto ", ids, 0.05) == 95.0
    assert resolve_threshold(" fpr:0.5", ids, 0.05) == 50.0, "the rate given, not the calibrated one"
    assert resolve_threshold(" 2.5 ", None, None) == 2.5
    for spec, scores, fpr in (("auto", None, 0.05), ("auto", ids, None), ("fpr:0.1", ids, None)):
        message = f"threshold {spec!r} needs a calibrated model: run `cdm-ood calibrate` first"
        with pytest.raises(NotFittedError, match=f"^{re.escape(message)}$"):
            resolve_threshold(spec, scores, fpr)
    errors = {
        "high": "threshold must be 'auto', 'fpr:<x>' or a number, got 'high'",
        "fpr:five": "'fpr:five': expected a false-positive rate such as fpr:0.05",
        "nan": "threshold must be a finite number, got nan: a NaN or infinite threshold would pass or fail every image "
        "without looking at it",
        "-inf": "threshold must be a finite number, got -inf: a NaN or infinite threshold would pass or fail every "
        "image without looking at it",
    }
    for spec, message in errors.items():
        with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
            resolve_threshold(spec, ids, 0.05)


def test_the_too_few_held_out_warning_names_the_count_the_rate_and_what_to_calibrate_on(caplog):
    with caplog.at_level(logging.WARNING, logger="cdm_ood.calibration"):
        warn_if_too_few(20, 0.05)
        warn_if_too_few(10, 0.1)
        assert caplog.messages == [], "1/fpr held out are enough"
        warn_if_too_few(19, 0.05)
        warn_if_too_few(9, 0.1)
        warn_if_too_few(3, 0.25, "volumes for the local check", share=1)
    assert caplog.messages == [
        "only 19 held-out in-distribution images for a false-positive rate of 0.05: a threshold at that rate needs at "
        "least 20 held out (calibrate on about 40); this one is just the largest held-out score",
        "only 9 held-out in-distribution images for a false-positive rate of 0.1: a threshold at that rate needs at "
        "least 10 held out (calibrate on about 20); this one is just the largest held-out score",
        "only 3 held-out in-distribution volumes for the local check for a false-positive rate of 0.25: a threshold "
        "at that rate needs at least 4 held out (calibrate on about 4); this one is just the largest held-out score",
    ]


def test_the_held_out_split_keeps_volumes_whole_down_to_two_images_a_side(caplog):
    """Half of the volumes (by the seeded shuffle of `split_volumes`) are held out; where a side would get fewer
    than two images, every other image instead, with a warning."""
    with caplog.at_level(logging.WARNING, logger="cdm_ood.calibration"):
        assert held_out_split(list("aabbccdd")).tolist() == [True, True, False, False, True, True, False, False]
        assert held_out_split(["w", "x", "y", "z"]).tolist() == [True, False, True, False], "two a side: enough"
        assert caplog.messages == []
        assert held_out_split(["x", "x", "y", "z"]).tolist() == [False, True, False, True]
    assert caplog.messages == [
        "the 4 calibration images come from 3 volume(s), too few to hold out whole volumes: every other image is "
        "held out, so held-out images share volumes with the fitted ones and the threshold is not tested on unseen "
        "scans; calibrate on more volumes"
    ]


def test_calibrate_checks_its_arguments_first_and_records_the_precision():
    profiles = torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) - 50
    ood = calibrate({"profile": profiles}, 16, 8, 0.25, ["nll"], "nll")
    assert ood.n_fit == 2 and len(ood.detectors["nll"].id_scores) == 2 and ood.precision == "float32", "4 suffice"
    assert calibrate({"profile": profiles}, 16, 8, 0.25, ["nll"], "nll", precision="bfloat16").precision == "bfloat16"
    with pytest.raises(UsageError, match=re.escape("the false-positive rate must be in (0, 1), got 1.5")):
        calibrate({"profile": profiles[:3]}, 16, 8, 1.5, ["nll"], "nll")
    errors = [
        (
            dict(detectors=["nll", "multiscale"], default="map"),
            "default detector 'map' is not among ['nll', 'multiscale']",
        ),
        (
            dict(detectors=["nll"], default="nll", groups=["a"] * 3),
            "3 groups for 4 images: give one group (volume) per image",
        ),
    ]
    for kwargs, message in errors:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            calibrate({"profile": profiles}, 16, 8, **kwargs)
    with pytest.raises(ValueError, match=r"^calibration needs at least 4 in-distribution images, got 3$"):
        calibrate({"profile": profiles[:3]}, 16, 8, detectors=["nll"], default="nll")


def _spec(size: tuple[int, ...]) -> ModelSpec:
    return ModelSpec(ModelConfig(), ScheduleConfig(), IntensityPreset("minmax"), size, 1, 8)


def test_calibration_features_are_the_detectors_and_for_a_slice_model_the_volume_checks_ones():
    assert calibration_features(_spec((8, 8, 8)), None) == ("profile", "residuals", "flips")
    assert calibration_features(_spec((8, 8, 8)), 3) == ("profile", "residuals", "flips", "class_ll")
    square = ("profile", "residuals", "flips", "transpose", "foreground", "extremes")
    assert calibration_features(_spec((16, 16)), None) == square
    assert calibration_features(_spec((16, 12)), 3) == ("profile", "residuals", "flips", "class_ll", "foreground",
                                                        "extremes"), "no transpose of a non-square slice"  # fmt: skip


def test_load_detector_takes_the_calibrated_fit_or_a_fresh_detector_and_names_what_it_cannot_load():
    profiles = torch.randn(8, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) - 50
    calibration = calibrate({"profile": profiles}, 16, 8, 0.25, ["nll", "multiscale"], "multiscale")
    detector, scores, fpr = load_detector(calibration, None, 16, 8, None)
    assert detector.state() == calibration.detectors["multiscale"].state and fpr == 0.25
    assert scores.tolist() == list(calibration.detectors["multiscale"].id_scores)
    for found, name, dims, classes in (
        (calibration, "flip", 16, None),
        (None, None, 32, None),
        (None, "classifier", 16, 3),
    ):
        detector, scores, fpr = load_detector(found, name, dims, 4, classes)
        assert (detector.name, detector.num_dims, detector.bit_depth, detector.num_classes, scores, fpr) == (
            name or "combined",
            dims,
            4,
            classes,
            None,
            None,
        )
    errors = {
        "nope": f"unknown detector 'nope'; expected one of {sorted(DETECTORS)}",
        "classifier": "the 'classifier' detector needs a class-conditional model (model.num_classes); this one is "
        "unconditional",
    }
    for name, message in errors.items():
        with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
            load_detector(calibration, name, 16, 8, None)


def _volume_statistics() -> tuple[dict[str, np.ndarray], list, list[bool]]:
    """Statistics of 4 volumes of 8 slices (volumes 1 and 3 held out): `map_peak` 10 v + k at slice k of volume v,
    `foreign_peak` its negative, random log-ratios, the body's shape of volumes 0 to 2 only, no bits/dim."""
    stats = {column: np.full(32, np.nan) for column in STATISTICS}
    stats["map_peak"] = np.array([10.0 * v + k for v in range(4) for k in range(8)])
    stats["foreign_peak"] = -stats["map_peak"]
    rng = np.random.default_rng(4)
    stats.update({column: rng.normal(size=32) for column in RATIO_COLUMNS})
    stats.update({column: np.r_[rng.normal(size=24), np.full(8, np.nan)] for column in FOREGROUND_COLUMNS})
    return stats, [(v, k) for v in range(4) for k in range(8)], [v % 2 == 1 for v in range(4) for _ in range(8)]


def test_volume_checks_are_cross_fitted_on_the_split_and_warned_about_at_their_share_of_the_rate(caplog):
    """Each check fitted on one side scores the other side's volumes (the held-out ones first), its parameters fitted
    on all; a check without 2 volumes of `MIN_SLICES` slices on each side is left out, logged."""
    stats, slots, held = _volume_statistics()
    with caplog.at_level(logging.INFO, logger="cdm_ood.calibration"):
        fits = fit_volume_checks(stats, slots, held, 0.3)
    assert list(fits) == ["orientation", "local", "foreign"]
    with pytest.raises(ValueError, match="shorter"):
        fit_volume_checks(stats, [*slots, (0, 8)], held, 0.3)  # one slot per image, no more
    assert fits["local"] == VolumeCheckFit({}, (17.0, 37.0, 7.0, 27.0))
    assert fits["foreign"] == VolumeCheckFit({}, (-10.0, -30.0, 0.0, -20.0))
    ratios = np.stack([stats[c] for c in RATIO_COLUMNS], axis=1).reshape(4, 8, 3)
    fitted = [OrientationCheck(**OrientationCheck.fit(list(ratios[side::2])), threshold=0.0) for side in (0, 1)]
    expected = [fitted[0].statistic(ratios[v]) for v in (1, 3)] + [fitted[1].statistic(ratios[v]) for v in (0, 2)]
    np.testing.assert_allclose(fits["orientation"].id_scores, expected, rtol=1e-12)
    assert fits["orientation"].params == {
        k: tuple(v) for k, v in OrientationCheck.fit(list(ratios[[0, 2, 1, 3]])).items()
    }
    skipped = "no {} check: it needs at least 2 volumes of 8 or more scored slices on each side of the calibration " \
              "split, found {} and {}"  # fmt: skip
    warned = "only 4 held-out in-distribution volumes for the {} check for a false-positive rate of 0.1: a threshold " \
             "at that rate needs at least 10 held out (calibrate on about 10); this one is just the largest held-out " \
             "score"  # fmt: skip
    assert caplog.messages == [
        skipped.format("slice-order", 0, 0),
        skipped.format("slice-direction", 0, 0),
        skipped.format("anatomy", 2, 1),
        *(warned.format(name) for name in ("orientation", "local", "foreign")),
    ]


def _residual_features(n: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(6)
    return {"profile": torch.randn(n, 12, dtype=torch.float64, generator=generator) - 50,
            "residuals": torch.randn(n, 2, 1, 8, 8, dtype=torch.float64, generator=generator),
            "extremes": torch.ones(n, 8, 8, dtype=torch.float64)}  # fmt: skip


def test_the_local_checks_are_fitted_on_peaks_of_map_detectors_fitted_without_each_volume():
    """With the map detector calibrated, the local checks score each volume's largest anomaly-map peak from the map
    fitted on the other side of the split (the held-out volumes first); without it, there are no local checks."""
    features = _residual_features(32)
    groups = [v for v in range(4) for _ in range(8)]
    slots = [(v, k) for v in range(4) for k in range(8)]
    held = held_out_split(groups)
    peaks = torch.zeros(32, dtype=torch.float64)
    for side in (held, ~held):
        maps = MapDetector(64).fit({"residuals": features["residuals"][~side]})
        peaks[side] = maps.anomaly_maps({"residuals": features["residuals"][side]}).double().flatten(1).amax(1)
    volumes = [v for v in dict.fromkeys(groups) if held[8 * v]] + [v for v in dict.fromkeys(groups) if not held[8 * v]]
    expected = [float(peaks[8 * v : 8 * v + 8].max()) for v in volumes]
    calibration = calibrate(features, 64, 8, 0.05, ["nll", "map"], "nll", groups, slots=slots)
    for name in ("local", "foreign"):
        np.testing.assert_allclose(calibration.volume_checks[name].id_scores, expected, rtol=1e-6)
    assert "local" not in calibrate(features, 64, 8, 0.05, ["nll"], "nll", groups, slots=slots).volume_checks


def test_calibrate_images_leaves_out_the_images_that_are_not_scorable_with_their_volumes_and_slots():
    features = _residual_features(33)
    features["flips"] = features["profile"][:, :2] - 0.5
    features["profile"][5, 3] = math.nan  # the sixth image: not scorable
    volumes = [v for v in range(4) for _ in range(8)]
    volumes.insert(5, 9)
    slots = [(v, k) for v, k in zip(volumes, range(33), strict=True)]
    kept = [k != 5 for k in range(33)]
    calibration = calibrate_images(features, volumes, slots, 64, 4, 0.2, "nll", precision="bfloat16")
    expected = calibrate(select_rows(features, torch.tensor(kept)), 64, 4, 0.2, applicable(None), "nll",
                         [v for v, k in zip(volumes, kept, strict=True) if k], precision="bfloat16",
                         slots=[s for s, k in zip(slots, kept, strict=True) if k])  # fmt: skip
    assert calibration == expected
    assert list(calibration.volume_checks) == ["slice-order", "slice-direction", "local", "foreign"]
    assert calibration.n_fit == 16 and set(calibration.detectors) == set(applicable(None))
    for extra in (([*volumes, 0], slots), (volumes, [*slots, (0, 99)])):
        with pytest.raises(UsageError, match="shorter"):
            calibrate_images(features, *extra, 64, 4, 0.2, "nll")  # one volume and one slot per image, no more
    four = {k: v[2:7] for k, v in features.items()}
    least = calibrate_images(four, volumes[2:7], slots[2:7], 64, 4)
    assert (least.n_fit, least.precision) == (2, "float32"), "4 scorable images suffice"
    errors = [
        (slice(2, 6), "combined", "calibration needs at least 4 scorable in-distribution images, found 3"),
        (slice(0, 8), "classifier", f"default detector 'classifier' is not among {applicable(None)}"),
    ]
    for rows, default, message in errors:
        subset = {k: v[rows] for k, v in features.items()}
        with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
            calibrate_images(subset, volumes[rows], slots[rows], 64, 4, default=default)


class _ClassAwareFeatures(DETECTORS["nll"]):
    """Reads the transposes only for a class-conditional model (no built-in 3D detector reads them)."""

    name = "test-class-aware-calibration"

    def required(self):
        return ("profile", "transpose") if self.num_classes else ("profile",)


def test_a_class_conditional_model_is_calibrated_for_every_detector_of_its_classes_built_with_them():
    """`calibrate` and `calibrate_images` default to the detectors a model with classes allows (the classifier's
    among them), each fitted and stored with the model's number of classes; its features are those each detector
    asks for when built for those classes."""
    features = _residual_features(32)
    features["flips"] = features["profile"][:, :2] - 0.5
    features["class_ll"] = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) - 50
    volumes = [v for v in range(4) for _ in range(8)]
    for calibration in (
        calibrate(features, 64, 4, 0.2, default="nll", groups=volumes, num_classes=3),
        calibrate_images(features, volumes, [None] * 32, 64, 4, 0.2, "nll", num_classes=3),
    ):
        assert set(calibration.detectors) == set(applicable(3)) > set(applicable(None)) | {"classifier"}
        assert {fit.state["num_classes"] for fit in calibration.detectors.values()} == {3}
    from cdm_ood.ood.detectors import register_detector

    register_detector(_ClassAwareFeatures)
    try:
        assert "transpose" in calibration_features(_spec((8, 8, 8)), 3)
        assert "transpose" not in calibration_features(_spec((8, 8, 8)), None)
    finally:
        DETECTORS.pop(_ClassAwareFeatures.name)
