"""The volume-level slice-order check (`cdm_ood.ood.slice_order`): its statistic, its calibration on whole volumes,
and a real-anatomy volume with interleaved slices stopped by `cdm-ood score` (and let through without the check)."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from cdm_ood.data.anatomy import brain_affine, brain_volume
from cdm_ood.data.geometry import misorient
from cdm_ood.data.phantoms import write_nifti
from cdm_ood.ood import OODDetector, ScoreOODd
from cdm_ood.ood.calibration import calibrate, load_slice_order
from cdm_ood.ood.slice_order import MIN_SLICES, fit_template, order_statistic, ordered_sequences, shape
from cdm_ood.spec import Calibration

SIZE, SLICES = 16, 12


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


def test_sequences_are_sorted_by_slice_and_short_or_unplaced_ones_left_out():
    slots = [("a", k) for k in (3, 0, 2, 1, 4, 5, 6, 7)] + [("b", k) for k in range(MIN_SLICES - 1)] + [None]
    values = [30.0, 0.0, 20.0, 10.0, 40.0, 50.0, 60.0, 70.0] + [1.0] * (MIN_SLICES - 1) + [9.0]
    found = ordered_sequences(values, slots)
    assert list(found) == ["a"] and found["a"].tolist() == [0, 10, 20, 30, 40, 50, 60, 70]
    values[1] = float("nan")  # a slice that could not be scored drops out, and "a" is then too short
    assert ordered_sequences(values, slots) == {}


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
    assert (cal.slice_order is not None) == fitted
    assert Calibration.from_dict(cal.to_dict()) == cal
    if fitted:
        assert len(cal.slice_order.template) == 16 and len(cal.slice_order.id_scores) == volumes // 2
        check = load_slice_order(cal)
        assert check.threshold == max(cal.slice_order.id_scores)  # 4 held out at fpr 0.05: the largest
        assert load_slice_order(cal, "fpr:0.25").threshold == sorted(cal.slice_order.id_scores)[-2]
        assert load_slice_order(cal, 3.0).threshold == check.threshold  # a number: the calibrated rate
        assert max(cal.slice_order.id_scores) < 0.05
        reversed_ = _profiles(1, slices, reverse=True)[:, 0].neg().numpy()
        assert check.statistic(reversed_) > check.threshold + 1.0
    no_slots = calibrate({"profile": _profiles(volumes, slices)}, 16, 8, 0.05, ["nll"], "nll", groups)
    assert no_slots.slice_order is None


def _brain(rng: np.random.Generator) -> np.ndarray:
    return brain_volume(rng, SIZE, SLICES)


def test_score_stops_an_interleaved_series_by_its_slice_order(checkpoint, tmp_path):
    """A model calibrated on 8 brain subjects: a new subject passes the slice-order check, the same subject with its
    slices interleaved (0, 2, 4, ..., 1, 3, ...; the file claiming the original geometry) fails it, with the reason;
    `--no-slice-order` turns the check off. The Python API and `ScoreOODd` give the same volume verdicts. (This tiny
    CT model's per-slice likelihood is nearly symmetric along these 12 brain slices, so a plain reversal is not
    asserted here; docs/evidence.md measures it.)"""
    from cli import main

    rng = np.random.default_rng(3)
    model = tmp_path / "model.pt"
    shutil.copy(checkpoint, model)
    calibration = tmp_path / "calibration"
    for k in range(8):
        write_nifti(_brain(rng), calibration / f"subject_{k}.nii.gz", affine=brain_affine(SIZE, SLICES))
    runner = CliRunner()
    out = runner.invoke(main, ["calibrate", str(calibration), "--checkpoint", str(model)])
    assert out.exit_code == 0, out.output
    assert "slice-order threshold" in out.output
    scans = tmp_path / "scans"
    subject = _brain(rng)
    write_nifti(subject, scans / "clean.nii.gz", affine=brain_affine(SIZE, SLICES))
    write_nifti(misorient(subject, "interleave"), scans / "interleaved.nii.gz", affine=brain_affine(SIZE, SLICES))
    verdicts = {}
    for flag in ([], ["--no-slice-order"]):
        report = tmp_path / f"report{len(flag)}.csv"
        args = ["score", str(scans), "--checkpoint", str(model), "--threshold", "1e9", "--out", str(report), *flag]
        runner.invoke(main, args)
        with open(report, newline="") as f:
            rows = list(csv.DictReader(f))
        assert all(float(r["bits_per_dim"]) > 0 for r in rows if r["level"] == "slice")
        verdicts[len(flag)] = {r["path"].split("/")[-1]: (r["verdict"], r["reason"]) for r in rows
                               if r["level"] == "volume"}  # fmt: skip
    assert verdicts[0]["clean.nii.gz"][0] == "in"
    assert verdicts[0]["interleaved.nii.gz"][0] == "ood"
    assert "slice order unlike the calibration volumes" in verdicts[0]["interleaved.nii.gz"][1]
    assert verdicts[1]["interleaved.nii.gz"][0] == "in"
    for check in (True, False):
        detector = OODDetector.from_checkpoint(model, threshold=1e9, slice_order=check)
        frame = detector.score_frame(scans)
        volumes = frame[frame.level == "volume"]
        assert volumes.verdict.tolist() == [verdicts[int(not check)][Path(p).name][0] for p in volumes.path]
        chain = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), ScoreOODd("image", detector)])
        assert chain({"image": str(scans / "interleaved.nii.gz")})["image_ood_verdict"] == ("ood" if check else "in")
