"""The gate's volume checks (`cdm_ood.ood.volume_checks`): the slice-order, slice-direction and orientation
statistics against closed forms, their cross-fitted calibration on whole volumes, and real-anatomy volumes with
interleaved or transposed slices stopped by `cdm-ood score` (and let through without the check)."""

import csv
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from closed_form import GaussianMixture
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from cdm_ood import NoiseSchedule, bits_per_dim
from cdm_ood.data.anatomy import brain_affine, brain_volume
from cdm_ood.data.geometry import misorient
from cdm_ood.data.records import SliceSource
from cdm_ood.data.volume_files import write_nifti
from cdm_ood.errors import UsageError
from cdm_ood.model.checkpoint import load_model
from cdm_ood.model.spec import Calibration, VolumeCheckFit
from cdm_ood.ood import OODDetector, ScoreOODd
from cdm_ood.ood.calibration import calibrate, fit_volume_checks, load_volume_checks, threshold_at_fpr
from cdm_ood.ood.detectors import MapDetector
from cdm_ood.ood.features import compute_features
from cdm_ood.ood.local_check import ForeignCheck, LocalCheck
from cdm_ood.ood.orientation_check import RATIO_COLUMNS, OrientationCheck
from cdm_ood.ood.report import slice_row, volume_rows
from cdm_ood.ood.scoring import ImageScorer
from cdm_ood.ood.slice_order import SHIFT, direction_statistic, fit_template, order_statistic, shape
from cdm_ood.ood.thresholds import Thresholds, configured_report_only
from cdm_ood.ood.volume_checks import (
    MIN_SLICES,
    STATISTICS,
    check_names,
    check_statistics,
    failed_checks,
    image_statistics,
    ordered_sequences,
)

SIZE, SLICES = 16, 12
SCHEDULE = NoiseSchedule.linear(200)
RAMP = torch.linspace(-0.6, 0.6, 4, dtype=torch.float64)
# Slices whose mean rises down the rows, a little to the right: unlikely flipped, mirrored or transposed.
ORIENTED = GaussianMixture(torch.ones(1), (RAMP[:, None] + 0.3 * RAMP[None, :])[None, None], torch.tensor([0.2]),
                           SCHEDULE)  # fmt: skip


def test_the_statistic_ignores_level_scale_and_slice_count_and_sees_reversal():
    bump = lambda n: np.exp(-((np.linspace(0, 1, n) - 0.3) ** 2) / 0.02)  # noqa: E731
    template = fit_template([bump(24), bump(30)])
    assert np.linalg.norm(template) == pytest.approx(1.0)
    assert order_statistic(5.0 * bump(12) + 3.0, template) < 0.01  # another level, scale and slice count
    assert order_statistic(bump(12)[::-1], template) > 1.0  # the same slices in reverse order
    ramp = np.arange(24.0)
    interleaved = np.concatenate([ramp[::2], ramp[1::2]])
    assert 0.3 < order_statistic(interleaved, shape(ramp)) < 1, "two rising halves: still positively correlated"
    assert np.all(shape(np.full(9, 2.0)) == 0)  # a flat sequence has no shape
    assert order_statistic(np.full(9, 2.0), template) == 1.0


def test_the_aligned_statistics_absorb_a_shift_and_the_direction_sees_a_nearly_symmetric_reversal():
    """The template's central bins are compared with every window of the shape as long: a slab one bin higher keeps
    the slice-order statistic at 0, where the plain correlation (no shift) does not. A bump a little before mid-slab
    matches the template almost as well reversed: the slice-order statistic moves from 0 to g, g that of the shape
    against the template reversed. The direction statistic is antisymmetric under reversal, -g and g: twice the gap,
    and only the template's antisymmetric part moves it."""
    bump = lambda n, centre=0.45: np.exp(-((np.linspace(0, 1, n) - centre) ** 2) / 0.05)  # noqa: E731
    template = fit_template([bump(24)])
    assert order_statistic(bump(24), template) == pytest.approx(0, abs=1e-12)
    higher = bump(24, 0.45 + 1 / 15)  # one of the 16 bins later
    assert order_statistic(higher, template) < 1e-4, "up to the resampling of 24 slices to 16 bins"
    assert order_statistic(higher, template, shift=0) > 0.05, "unaligned"
    gap = order_statistic(bump(24), template[::-1])
    assert 0 < gap < 0.05, "nearly symmetric: the slice-order statistic of the reversal is as small"
    assert order_statistic(bump(24)[::-1], template) == pytest.approx(gap, rel=1e-9)
    assert direction_statistic(bump(24), template) == pytest.approx(-gap, rel=1e-9)
    assert direction_statistic(bump(24)[::-1], template) == pytest.approx(gap, rel=1e-9)
    assert direction_statistic(bump(20)[::-1], template) > 0.9 * gap, "another slice count"
    assert direction_statistic(bump(20), shape(np.hanning(16))) == pytest.approx(0, abs=1e-12), "a symmetric template"
    assert direction_statistic(np.full(9, 2.0), template) == 0.0, "a flat sequence has no direction"


def test_sequences_are_sorted_by_slice_and_short_or_unplaced_ones_left_out():
    slots = [("a", k) for k in (3, 0, 2, 1, 4, 5, 6, 7)] + [("b", k) for k in range(MIN_SLICES - 1)] + [None]
    values = [30.0, 0.0, 20.0, 10.0, 40.0, 50.0, 60.0, 70.0] + [1.0] * (MIN_SLICES - 1) + [9.0]
    found = ordered_sequences(np.array(values)[:, None], slots)
    assert list(found) == ["a"] and found["a"][:, 0].tolist() == [0, 10, 20, 30, 40, 50, 60, 70]
    values[1] = float("nan")  # a slice that could not be scored drops out, and "a" is then too short
    assert ordered_sequences(np.array(values)[:, None], slots) == {}
    ties = ordered_sequences(np.array([[5], [1], *[[k] for k in range(7, 1, -1)]]),
                             [("c", 0), ("c", 0), *[("c", k) for k in range(6, 0, -1)]])  # fmt: skip
    assert ties["c"].dtype == np.float64 and ties["c"][:, 0].tolist() == [5, 1, 2, 3, 4, 5, 6, 7], "a stable sort"
    with pytest.raises(ValueError, match="zip"):
        ordered_sequences(np.zeros((3, 1)), [("a", 0)] * 2)


def _oriented(n: int, seed: int) -> torch.Tensor:
    return ORIENTED.sample(n, torch.Generator().manual_seed(seed))


def test_log_ratios_are_the_closed_form_density_ratios_to_the_mirror_images():
    x = _oriented(6, 1)
    stats = image_statistics(compute_features(ORIENTED, x, SCHEDULE, ("profile", "flips", "transpose")), 16, 8)
    log_p0 = lambda y: ORIENTED.log_density(y)[:, 0]  # noqa: E731
    np.testing.assert_allclose(stats["bits_per_dim"], bits_per_dim(log_p0(x), 16).numpy(), rtol=1e-10)
    for column, moved in zip(RATIO_COLUMNS, (x.flip(2), x.flip(3), x.transpose(2, 3)), strict=True):
        exact = (log_p0(x) - log_p0(moved)) / (16 * np.log(2))
        np.testing.assert_allclose(stats[column], exact.numpy(), rtol=1e-10)
    assert (stats["vflip_log_ratio"] > 0).all(), "the rows' ramp is steeper: each slice is likelier as given"
    without = image_statistics(compute_features(ORIENTED, x, SCHEDULE, ("profile", "flips")), 16, 8)
    assert np.isnan(without["transpose_log_ratio"]).all() and np.isfinite(without["bits_per_dim"]).all()
    for column in RATIO_COLUMNS[:2]:  # no transposes (a non-square grid): the mirror ratios all the same
        np.testing.assert_array_equal(without[column], stats[column])


def _volumes(n: int, seed: int, move=lambda x: x) -> tuple[dict[str, np.ndarray], list]:
    """The statistics of n volumes of 10 slices from `ORIENTED` (each slice moved by `move`), with their slots."""
    x = move(_oriented(10 * n, seed))
    stats = image_statistics(compute_features(ORIENTED, x, SCHEDULE, ("profile", "flips", "transpose")), 16, 8)
    return stats, [((v, None), k) for v in range(n) for k in range(10)]


@pytest.mark.parametrize("move", [lambda x: x.transpose(2, 3), lambda x: x.flip(2), lambda x: x.rot90(1, (2, 3))])
def test_the_orientation_check_stops_volumes_of_moved_slices_and_passes_new_ones(move):
    stats, slots = _volumes(8, 2)
    fits = fit_volume_checks(stats, slots, [v % 2 == 1 for v in range(8) for _ in range(10)], 0.05)
    assert set(fits) == {"slice-order", "slice-direction", "orientation"}
    assert len(fits["orientation"].id_scores) == 8, "cross-fitted"
    (check,) = load_volume_checks(Calibration(0.05, "nll", 1, {}, volume_checks=fits), "auto", ["orientation"])
    assert check.threshold == max(fits["orientation"].id_scores)
    for seed, moved in ((3, False), (4, True)):
        new, _ = _volumes(1, seed, move if moved else lambda x: x)
        statistic = check.statistic(np.stack([new[c] for c in RATIO_COLUMNS], axis=1))
        assert (statistic > check.threshold + 3) if moved else (statistic < check.threshold)


def _profiles(volumes: int, slices: int, reverse: bool = False) -> torch.Tensor:
    """Profiles (N, 3) whose log p_0 follows one shape along the slices of every volume, plus a little noise."""
    rng = np.random.default_rng(0)
    ramp = np.sin(np.linspace(0, 1.5, slices))
    log_p0 = [-(100 + 20 * (ramp[::-1] if reverse else ramp) + rng.normal(0, 0.5, slices)) for _ in range(volumes)]
    return torch.tensor(np.concatenate(log_p0))[:, None].expand(-1, 3).clone()


@pytest.mark.parametrize("volumes, slices, fitted", [(8, 10, True), (8, MIN_SLICES - 1, False), (3, 10, False)])
def test_calibration_fits_the_check_on_whole_volumes_and_round_trips(volumes, slices, fitted):
    groups = [v for v in range(volumes) for _ in range(slices)]
    slots = [((v, None), k) for v in range(volumes) for k in range(slices)]
    cal = calibrate({"profile": _profiles(volumes, slices)}, 16, 8, 0.05, ["nll"], "nll", groups, slots=slots)
    assert list(cal.volume_checks) == (["slice-order"] if fitted else []), "no flips: no direction, no orientation"
    assert Calibration.from_dict(cal.to_dict()) == cal
    if fitted:
        fit = cal.volume_checks["slice-order"]
        assert len(fit.params["template"]) == 16 and len(fit.id_scores) == volumes, "every volume, out of sample"
        (check,) = load_volume_checks(cal, "auto", ["slice-order", "orientation"])
        assert check.threshold == max(fit.id_scores)  # 8 at fpr 0.05: the largest
        assert load_volume_checks(cal, "fpr:0.25", ["slice-order"])[0].threshold == sorted(fit.id_scores)[-3]
        assert load_volume_checks(cal, 3.0, ["slice-order"])[0].threshold == check.threshold  # the calibrated rate
        assert load_volume_checks(cal, "auto", ["orientation"]) == ()
        assert max(fit.id_scores) < 0.05
        reversed_ = _profiles(1, slices, reverse=True)[:, :1].neg().numpy()
        assert check.statistic(reversed_) > check.threshold + 1.0
        legacy = cal.to_dict() | {"slice_order": {"template": list(fit.params["template"]),
                                                  "id_scores": list(fit.id_scores)}, "volume_checks": {}}  # fmt: skip
        old = Calibration.from_dict(legacy)
        assert list(old.volume_checks) == ["slice-order"], "a calibration stored before the checks had names"
        assert old.volume_checks["slice-order"].params == {"template": fit.params["template"]}
        (unaligned,) = load_volume_checks(old, "auto", ["slice-order"])
        assert unaligned.threshold == check.threshold and check.shift[0] == SHIFT > unaligned.shift[0] == 0
        higher = np.roll(_profiles(1, slices)[:, :1].neg().numpy(), -1, axis=0)[:-1]  # the slab one slice higher
        assert unaligned.statistic(higher) == order_statistic(higher[:, 0], check.template, 0) > check.statistic(higher)
    no_slots = calibrate({"profile": _profiles(volumes, slices)}, 16, 8, 0.05, ["nll"], "nll", groups)
    assert no_slots.volume_checks == {}


def _direction_statistics(volumes: int, slices: int, flat_ratio: bool = False) -> dict[str, np.ndarray]:
    """Per-slice statistics of `volumes` volumes: bits/dim rising and falling a little before mid-slab (nearly
    symmetric), the vertical log-ratio falling along the slices (or flat), plus a little noise; no other ratios."""
    rng = np.random.default_rng(1)
    z = np.linspace(0, 1, slices)
    bits = [3 + np.exp(-((z - 0.45) ** 2) / 0.05) + rng.normal(0, 0.01, slices) for _ in range(volumes)]
    ratio = [(0.0 if flat_ratio else 1 - 2 * z) + rng.normal(0, 0.01, slices) for _ in range(volumes)]
    stats = {c: np.full(volumes * slices, np.nan) for c in STATISTICS}
    return stats | {"bits_per_dim": np.concatenate(bits), "vflip_log_ratio": np.concatenate(ratio)}


def test_the_direction_check_averages_its_columns_and_shares_the_rate_with_the_slice_order_check():
    """Fitted on the bits/dim and the vertical log-ratio: its statistic is the mean of the two columns'
    `direction_statistic`s against their own templates; a reversed volume gets minus its value, far above the
    threshold; a flat ratio (a model invariant to vertical flips) leaves the likelihood's half. The two slice checks
    share fpr 0.25 of 8 volumes (0.125 each: the second largest). A template stored with one column (the check
    before it read the ratio) is refused with a clear error."""
    volumes, slices = 8, 12
    slots = [((v, None), k) for v in range(volumes) for k in range(slices)]
    fits = fit_volume_checks(_direction_statistics(volumes, slices), slots, [v % 2 == 1 for (v, _), _ in slots], 0.05)
    assert set(fits) == {"slice-order", "slice-direction"}, "no horizontal or transpose ratios: no orientation"
    cal = Calibration(0.05, "nll", 1, {}, volume_checks=fits)
    assert Calibration.from_dict(cal.to_dict()) == cal
    (direction,) = load_volume_checks(cal, "auto", ["slice-direction"])
    assert len(direction.template) == 2 * 16 and direction.threshold == max(fits["slice-direction"].id_scores) < 0
    new = _direction_statistics(1, 20)
    sequence = np.stack([new["bits_per_dim"], new["vflip_log_ratio"]], axis=1)
    templates = direction.template.reshape(2, 16)
    parts = [direction_statistic(sequence[:, j], templates[j]) for j in range(2)]
    assert direction.statistic(sequence) == pytest.approx(np.mean(parts), rel=1e-12)
    assert direction.statistic(sequence[::-1]) == pytest.approx(-direction.statistic(sequence), rel=1e-12)
    assert direction.statistic(sequence[::-1]) > direction.threshold + 1.0, "reversed"
    flat = _direction_statistics(1, 20, flat_ratio=True)
    flat_sequence = np.stack([flat["bits_per_dim"], np.zeros(20)], axis=1)
    assert direction.statistic(flat_sequence[::-1]) == pytest.approx(-parts[0] / 2, rel=1e-9), "the same bits/dim"
    shared = load_volume_checks(cal, "fpr:0.25", ["slice-order", "slice-direction"])
    assert [c.threshold for c in shared] == [sorted(fits[n].id_scores)[-2] for n in ("slice-order", "slice-direction")]
    stale = {"template": fits["slice-direction"].params["template"][:16], "shift": (2.0,)}
    old = Calibration(0.05, "nll", 1, {}, volume_checks={"slice-direction": VolumeCheckFit(stale, (0.0, 1.0))})
    with pytest.raises(UsageError, match=r"slice-direction check's stored template has 16 values.*calibrate"):
        load_volume_checks(old, "auto", ["slice-direction"])


def _brain(rng: np.random.Generator) -> np.ndarray:
    return brain_volume(rng, SIZE, SLICES)


@pytest.mark.slow
def test_score_stops_interleaved_and_transposed_series_by_the_volume_checks(checkpoint, tmp_path):
    """A model calibrated on 8 brain subjects: a new subject passes the volume checks; the same subject with its
    slices interleaved (0, 2, 4, ..., 1, 3, ...) fails the slice-order check and with its in-plane axes swapped fails
    the orientation check (the files claiming the original geometry), with the reason; `--no-slice-order` and
    `--no-orientation` turn them off. The Python API and `ScoreOODd` give the same volume verdicts. This tiny CT
    model (40 steps on CT phantoms) barely knows brain anatomy, so the checks are calibrated at fpr 0.9 (0.3 for each
    of the three; the anatomy check is off, for in the CT window these MR files have no background, and so are the
    local-anomaly checks: tests/test_anatomy_check.py and tests/test_local_check.py score them) for its weak
    statistics to decide, and a plain reversal is not asserted (its per-slice likelihood is nearly symmetric along
    these 12 slices); docs/evidence.md measures the checks with a trained brain model."""
    from cli import main

    rng = np.random.default_rng(3)
    model = tmp_path / "model.pt"
    shutil.copy(checkpoint, model)
    calibration = tmp_path / "calibration"
    for k in range(8):
        write_nifti(_brain(rng), calibration / f"subject_{k}.nii.gz", affine=brain_affine(SIZE, SLICES))
    runner = CliRunner()
    out = runner.invoke(main, ["calibrate", str(calibration), "--checkpoint", str(model), "--fpr", "0.9"])
    assert out.exit_code == 0, out.output
    assert "slice-order threshold" in out.output and "orientation threshold" in out.output
    scans = tmp_path / "scans"
    subject = _brain(rng)
    write_nifti(subject, scans / "clean.nii.gz", affine=brain_affine(SIZE, SLICES))
    for error, name in (("interleave", "interleaved"), ("transpose", "transposed")):
        write_nifti(misorient(subject, error), scans / f"{name}.nii.gz", affine=brain_affine(SIZE, SLICES))
    verdicts = {}
    others = ["--no-anatomy", "--no-local"]
    for flag in (others, ["--no-slice-order", "--no-orientation", *others]):
        report = tmp_path / f"report{len(flag)}.csv"
        args = ["score", str(scans), "--checkpoint", str(model), "--threshold", "1e9", "--out", str(report), *flag]
        runner.invoke(main, args)
        with open(report, newline="") as f:
            rows = list(csv.DictReader(f))
        assert all(float(r["bits_per_dim"]) > 0 for r in rows if r["level"] == "slice")
        assert all(bool(r["transpose_log_ratio"]) == (len(flag) == 2) for r in rows), "the transposes: only when on"
        assert all(r["vflip_log_ratio"] for r in rows if r["level"] == "slice"), "`combined` has the mirror images"
        verdicts[len(flag)] = {r["path"].split("/")[-1]: (r["verdict"], r["reason"]) for r in rows
                               if r["level"] == "volume"}  # fmt: skip
    assert verdicts[2]["clean.nii.gz"][0] == "in"
    assert verdicts[2]["interleaved.nii.gz"][0] == "ood"
    assert "slice order unlike the calibration volumes" in verdicts[2]["interleaved.nii.gz"][1]
    assert verdicts[2]["transposed.nii.gz"][0] == "ood"
    assert "orientation unlike the calibration volumes" in verdicts[2]["transposed.nii.gz"][1]
    assert {v for v, _ in verdicts[4].values()} == {"in"}
    for check in (True, False):
        on = ("slice-order", "slice-direction", "orientation") if check else ()
        detector = OODDetector.from_checkpoint(model, threshold=1e9, volume_checks=on)
        frame = detector.score_frame(scans)
        volumes = frame[frame.level == "volume"]
        assert volumes.verdict.tolist() == [verdicts[2 + 2 * int(not check)][Path(p).name][0] for p in volumes.path]
        chain = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), ScoreOODd("image", detector)])
        assert chain({"image": str(scans / "interleaved.nii.gz")})["image_ood_verdict"] == ("ood" if check else "in")
    with pytest.raises(UsageError, match=r"unknown volume check.*orientaton"):
        OODDetector.from_checkpoint(model, volume_checks=("orientaton",))


def _rows(peaks, time_point=None, ratios=None) -> list[dict]:
    """Slice rows of volume `v` at one time point, slices in reverse order, with their map peaks (and log-ratios)."""
    ratios = ratios or [(0.0, 0.0, 0.0)] * len(peaks)
    rows = [slice_row(SliceSource("v.nii", k, "v", time_point=time_point), 1.0, 2.0, (),
                      {"map_peak": p, **dict(zip(RATIO_COLUMNS, r, strict=True))})
            for k, (p, r) in enumerate(zip(peaks, ratios, strict=True))]  # fmt: skip
    return rows[::-1]


def test_each_time_point_of_a_volume_is_checked_on_its_own_and_short_ones_are_not():
    """Time point None is 0; the orientation statistic is -min((mean log-ratios - mean) / scale), and a slice with a
    missing log-ratio is left out of it."""
    ratios = [(1.0, 2.0, 3.0)] * (MIN_SLICES - 1) + [(None, 2.0, 3.0), (9.0, 2.0, 0.0)]
    members = [*_rows([1.0] * 9, None, ratios), *_rows([5.0] + [2.0] * 8, 1), *_rows([9.0] * (MIN_SLICES - 1), 2)]
    local, orientation = LocalCheck(4.0), OrientationCheck(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 1.0]), 1.0)
    assert check_statistics(members, local) == {0: 1.0, 1: 5.0}
    assert check_statistics(members, orientation) == {0: -0.5, 1: 1.0}
    assert failed_checks(members, [local, orientation, LocalCheck(5.0)]) == [
        "a local anomaly unlike the calibration volumes (the anomaly map's peak): statistic 5 > 4 (time point 1)"
    ]
    assert failed_checks(_rows([4.25] * MIN_SLICES, 0), [local, ForeignCheck(1.0)]) == [
        "a local anomaly unlike the calibration volumes (the anomaly map's peak): statistic 4.25 > 4"
    ]
    assert failed_checks(_rows([4.0] * MIN_SLICES), [local]) == [], "at its threshold a volume passes"
    assert failed_checks([*_rows([4.5] * MIN_SLICES, 0), *_rows([6.0] * MIN_SLICES, 1)], [local]) == [
        "a local anomaly unlike the calibration volumes (the anomaly map's peak): statistic 4.5 > 4 (time point 0), "
        "statistic 6 > 4 (time point 1)"]  # fmt: skip
    assert failed_checks(_rows([12345.0] * MIN_SLICES), [local, LocalCheck(0.01234, stops=False)]) == [
        "a local anomaly unlike the calibration volumes (the anomaly map's peak): statistic 1.23e+04 > 4",
        "a local anomaly unlike the calibration volumes (the anomaly map's peak): statistic 1.23e+04 > 0.0123",
    ]


@pytest.mark.parametrize(
    ("peak", "stops", "verdict", "failed"),
    [(3.0, True, "in", ""), (5.0, True, "ood", "; {}"), (5.0, False, "in", "; reported only, not stopping: {}")],
)
def test_a_volume_over_a_stopping_check_is_ood_and_over_a_reported_one_keeps_its_verdict(peak, stops, verdict, failed):
    (volume,) = volume_rows(_rows([peak] * MIN_SLICES), 2.0, checks=(LocalCheck(4.0, stops=stops),))
    why = "a local anomaly unlike the calibration volumes (the anomaly map's peak): statistic 5 > 4"
    assert (volume["verdict"], volume["reason"], volume["map_peak"]) == (
        verdict,
        f"mean of {MIN_SLICES} slice scores; 0 slices above threshold" + failed.format(why),
        peak,
    )


def test_volume_check_names_are_known_ones():
    assert check_names(["local", "orientation"]) == ("local", "orientation")
    assert check_names(()) == ()
    with pytest.raises(UsageError) as err:
        check_names(["local", "shape", "hue"])
    assert str(err.value) == ("unknown volume check(s) hue, shape; expected some of slice-order, slice-direction, "
                              "orientation, anatomy, local, foreign")  # fmt: skip


def test_a_runs_thresholds_share_the_rate_among_the_stopping_checks_and_report_only_those_configured(checkpoint):
    """`Thresholds.resolve`: the score threshold at the spec, the calibrated checks at its rate split between the
    checks that stop (Bonferroni); `report_only` defaults to the configuration's `gate.report_only`."""
    model = load_model(checkpoint)
    fits = {"local": VolumeCheckFit({}, tuple(np.arange(1.0, 11.0))), "foreign": VolumeCheckFit({}, (3.0,) * 10)}
    gated = replace(model, calibration=replace(model.calibration, volume_checks=fits),
                    config=model.config | {"gate": {"report_only": ["foreign"]}})  # fmt: skip
    scorer = ImageScorer(gated)
    auto = Thresholds.resolve(scorer)
    assert auto == Thresholds(threshold_at_fpr(scorer.id_scores, 0.05), (LocalCheck(10.0), ForeignCheck(3.0, False)))
    assert Thresholds.resolve(scorer, "fpr:0.5") == Thresholds(
        threshold_at_fpr(scorer.id_scores, 0.5), (LocalCheck(5.0), ForeignCheck(3.0, False)))  # fmt: skip
    assert Thresholds.resolve(scorer, "fpr:0.5", ()) == Thresholds(
        threshold_at_fpr(scorer.id_scores, 0.5), (LocalCheck(8.0), ForeignCheck(3.0)))  # fmt: skip
    assert Thresholds.resolve(scorer, 1.5, ["local"]) == Thresholds(1.5, (LocalCheck(10.0, False), ForeignCheck(3.0)))
    with pytest.raises(UsageError, match=r"^unknown volume check\(s\) loc; "):
        Thresholds.resolve(scorer, "auto", ["loc"])
    assert configured_report_only(gated) == ("foreign",)
    assert configured_report_only(replace(model, config=model.config | {"gate": {}})) == ()
    assert configured_report_only(replace(model, config={k: v for k, v in model.config.items() if k != "gate"})) == ()


def test_image_statistics_are_the_closed_forms_of_the_features_and_nan_where_they_are_missing():
    """bits/dim of log p_0 = profile[:, 0], the log-ratios to the flips and transposes (NaN without transposes, none
    without both flips), the foreground columns, and with a map detector the anomaly map's peaks; in float64."""
    d, ln2 = 16, np.log(2)
    log_p0 = torch.tensor([-123.456, -78.9], dtype=torch.float32)
    flips = torch.tensor([[-130.1, -124.0], [-80.5, -70.25]], dtype=torch.float32)
    transpose = torch.tensor([[-140.7], [-79.3]], dtype=torch.float32)
    foreground = torch.tensor([[0.5, 1.25, -0.1], [0.25, 2.5, 0.3]], dtype=torch.float32)
    profile = torch.stack([log_p0, log_p0 - 1.0], dim=1)
    lp = log_p0.double().numpy()
    stats = image_statistics(
        {"profile": profile, "flips": flips, "transpose": transpose, "foreground": foreground}, d, 6
    )
    ratios = (lp[:, None] - torch.cat([flips, transpose], dim=1).double().numpy()) / (d * ln2)
    expected = {"bits_per_dim": -lp / (d * ln2) + 5, **dict(zip(RATIO_COLUMNS, ratios.T, strict=True)),
                **dict(zip(STATISTICS[4:7], foreground.double().numpy().T, strict=True)),
                "map_peak": np.full(2, np.nan), "foreign_peak": np.full(2, np.nan)}  # fmt: skip
    assert list(stats) == list(STATISTICS)
    for column in STATISTICS:
        np.testing.assert_array_equal(stats[column], expected[column], err_msg=column)
        assert stats[column].dtype == np.float64, column
    no_transpose = image_statistics({"profile": profile, "flips": flips}, d, 6)
    np.testing.assert_array_equal(no_transpose["vflip_log_ratio"], expected["vflip_log_ratio"])
    assert np.isnan(no_transpose["transpose_log_ratio"]).all()
    one_flip = image_statistics({"profile": profile, "flips": flips[:, :1]}, d, 6)
    assert all(np.isnan(one_flip[c]).all() for c in RATIO_COLUMNS), "3D images: no in-plane flips"
    no_profile = image_statistics({"flips": flips, "transpose": transpose}, d, 6)
    assert all(np.isnan(v).all() and v.shape == (2,) for v in no_profile.values())
    residuals = torch.randn(3, 2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    maps = MapDetector(64).fit({"residuals": residuals})
    extremes = torch.zeros(3, 8, 8, dtype=torch.float64)
    extremes[0, 2, 3] = extremes[1, 6, 6] = 1.0
    anomaly = maps.anomaly_maps({"residuals": residuals}).double()
    peaks = image_statistics({"residuals": residuals, "extremes": extremes}, 64, 8, maps)
    np.testing.assert_array_equal(peaks["map_peak"], anomaly.flatten(1).amax(1).numpy())
    np.testing.assert_array_equal(peaks["foreign_peak"], [anomaly[0, 2, 3], anomaly[1, 6, 6], 0.0])
    assert np.isnan(image_statistics({"residuals": residuals}, 64, 8, maps)["foreign_peak"]).all()
    assert np.isnan(image_statistics({"residuals": residuals}, 64, 8)["map_peak"]).all()
    empty = image_statistics({"residuals": residuals[:0], "extremes": extremes[:0]}, 64, 8, maps)
    assert all(v.shape == (0,) for v in empty.values())
    wide = foreground[:, [0, 1, 2, 2]]
    for wrong in ({"profile": profile, "flips": flips, "transpose": flips}, {"foreground": wide}):
        with pytest.raises(ValueError, match="zip"):  # features of another width are refused, not cut
            image_statistics(wrong, d, 6)
