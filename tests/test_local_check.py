"""The local-anomaly volume checks (`cdm_ood.ood.local_check`): extreme pixels, the anomaly map's peaks per slice,
their cross-fitted calibration, checks that are reported only (`gate.report_only`), and the gate stopping a foreign
object on every path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from brain_gate import BrainGate

from cdm_ood.data.anatomy import brain_volume
from cdm_ood.data.defects import LOCAL_ANOMALIES, draw_local_anomaly
from cdm_ood.errors import UsageError
from cdm_ood.jobs.config import ConfigError, bundled_config, load_config
from cdm_ood.model.spec import Calibration, VolumeCheckFit
from cdm_ood.ood import OODDetector
from cdm_ood.ood.calibration import cross_fitted_map_statistics, load_volume_checks
from cdm_ood.ood.detectors import MapDetector
from cdm_ood.ood.features import TOP_LEVEL, extreme_pixels
from cdm_ood.ood.local_check import ForeignCheck, LocalCheck
from cdm_ood.ood.report import COLUMNS, volume_rows
from cdm_ood.ood.volume_checks import image_statistics


def test_extreme_pixels_are_the_top_of_the_range_and_holes_in_the_body_with_their_neighbours():
    """A body (a square at 0) with a hole (-1) and a bright pixel (at `TOP_LEVEL`): both and their 3 x 3
    neighbourhoods are extreme; the background around the body is not a hole; channels are averaged."""
    x = torch.full((1, 2, 12, 12), -1.0)
    x[..., 2:10, 2:10] = 0.0
    x[..., 5, 5] = -1.0  # a hole
    x[:, 0, 8, 3], x[:, 1, 8, 3] = TOP_LEVEL + 0.01, TOP_LEVEL - 0.01  # the channels' mean is at the top level
    expected = torch.zeros(12, 12)
    expected[4:7, 4:7] = 1.0
    expected[7:10, 2:5] = 1.0
    assert torch.equal(extreme_pixels(x)[0], expected)
    assert extreme_pixels(torch.zeros(0, 1, 4, 4)).shape == (0, 4, 4)
    with pytest.raises(ValueError, match="2D images"):
        extreme_pixels(torch.zeros(1, 1, 4, 4, 4))


def _residuals(n: int, seed: int, bump: float = 0.0) -> torch.Tensor:
    """Random denoising residuals (n, 2 levels, 1 channel, 8, 8); with `bump`, a large error at pixel (2, 3)."""
    r = torch.randn(n, 2, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r[:, :, :, 2, 3] += bump
    return r


def test_map_peaks_are_the_largest_value_of_the_anomaly_map_anywhere_and_at_extreme_pixels():
    """With a fitted map detector, `map_peak` is the largest value of each image's anomaly map and `foreign_peak`
    its largest value where `extremes` is 1 (0 where it is nowhere); without the detector, or without residuals,
    both are NaN."""
    maps = MapDetector(64).fit({"residuals": _residuals(40, 0)})
    features = {"residuals": _residuals(3, 1, bump=6.0)}
    extremes = torch.zeros(3, 8, 8, dtype=torch.float64)
    extremes[0, 2, 3] = 1.0  # on the bump
    extremes[1, 6, 6] = 1.0  # away from it
    stats = image_statistics(features | {"extremes": extremes}, 64, 8, maps)
    anomaly = maps.anomaly_maps(features).double()
    np.testing.assert_allclose(stats["map_peak"], anomaly.flatten(1).amax(1).numpy())
    np.testing.assert_allclose(stats["foreign_peak"], [anomaly[0, 2, 3], anomaly[1, 6, 6], 0.0])
    assert stats["foreign_peak"][0] > stats["foreign_peak"][1], "on the bump"
    assert np.isnan(image_statistics(features, 64, 8)["map_peak"]).all()
    assert np.isnan(image_statistics({"foreground": torch.zeros(3, 3)}, 64, 8, maps)["map_peak"]).all()


def test_calibration_map_peaks_come_from_map_detectors_fitted_without_them():
    """`cross_fitted_map_statistics`: the held-out images' peaks are those of the map fitted on the others, the
    others' those of the map fitted on the held-out images; never of a map fitted on the image itself."""
    features = {"residuals": _residuals(12, 2), "extremes": torch.ones(12, 8, 8, dtype=torch.float64)}
    held = torch.arange(12) % 3 == 0
    found = cross_fitted_map_statistics(features, held, 64, 8, None)
    for side in (held, ~held):
        maps = MapDetector(64).fit({"residuals": features["residuals"][~side]})
        expected = maps.anomaly_maps({"residuals": features["residuals"][side]}).flatten(1).amax(1).numpy()
        np.testing.assert_allclose(found["map_peak"][side.numpy()], expected, rtol=1e-6)
    np.testing.assert_allclose(found["foreign_peak"], found["map_peak"])
    in_sample = MapDetector(64).fit({"residuals": features["residuals"]}).anomaly_maps(features).flatten(1).amax(1)
    assert not np.allclose(found["map_peak"], in_sample.numpy())


def _slices(peaks: list[float], volume: str = "v") -> list[dict]:
    return [dict.fromkeys(COLUMNS) | {"level": "slice", "path": f"{volume}.nii.gz", "slice": k, "volume": volume,
                                      "score": 0.0, "verdict": "in", "map_peak": p, "foreign_peak": 0.0}
            for k, p in enumerate(peaks)]  # fmt: skip


def test_a_volume_over_a_reported_only_check_keeps_its_verdict_and_says_so():
    """The local check's statistic is a volume's largest slice peak, nothing fitted; stopping, a volume over its
    threshold is `ood` with the reason; reported only (`stops` False), the volume stays `in` and its reason says the
    check was passed over. Report-only checks do not take a share of the false-positive rate: with `local` reported
    only, `foreign` alone takes all of it, `local` the same."""
    assert LocalCheck.fit([np.zeros((8, 1))]) == {} and LocalCheck(3.0).statistic(np.array([[1.0], [4.0]])) == 4.0
    rows = _slices([1.0] * 7 + [5.0])
    (stopping,) = volume_rows(rows, 1.0, "mean", [LocalCheck(3.0)])
    assert stopping["verdict"] == "ood" and "local anomaly unlike the calibration volumes" in stopping["reason"]
    assert stopping["map_peak"] == 5.0, "a volume's map peak is its slices' largest"
    (reported,) = volume_rows(rows, 1.0, "mean", [LocalCheck(3.0, stops=False)])
    assert reported["verdict"] == "in"
    noted = "; reported only, not stopping: a local anomaly unlike the calibration volumes (the anomaly map's peak)"
    assert reported["reason"].endswith(f"{noted}: statistic 5 > 3")
    fits = {name: VolumeCheckFit({}, tuple(float(v) for v in range(20))) for name in ("local", "foreign")}
    calibration = Calibration(0.1, "nll", 1, {}, volume_checks=fits)
    both = load_volume_checks(calibration, "auto", ["local", "foreign"])
    local, foreign = load_volume_checks(calibration, "auto", ["local", "foreign"], report_only=["local"])
    assert [c.threshold for c in both] == [18.0, 18.0], "0.05 each: the largest but one of 20"
    assert (local.stops, foreign.stops) == (False, True) and local.threshold == foreign.threshold == 17.0
    assert isinstance(foreign, ForeignCheck)


def test_the_gate_configuration_names_checks_reported_only(checkpoint):
    """`gate.report_only` of the model's configuration is the detector's default (the brain-MR config reports
    `local` only); a name that is no volume check is refused in the config and in the API."""
    brain = bundled_config("brain-mr")
    assert load_config(brain).gate.report_only == ("local",)
    with pytest.raises(ConfigError, match=r"gate\.report_only: lesions not among the volume checks"):
        load_config(brain, ["gate.report_only=[lesions]"])
    detector = OODDetector.from_checkpoint(checkpoint)
    assert detector.report_only == () and all(c.stops for c in detector.checks)
    with pytest.raises(UsageError, match=r"unknown volume check.*lesions"):
        OODDetector.from_checkpoint(checkpoint, report_only=["lesions"])


def test_draw_local_anomaly_draws_each_kind_at_its_size_and_contrast():
    """Each kind changes only its mask's voxels, inside the body, over 3 neighbouring slices, more with a larger
    radius; lesions move the tissue by about the contrast (brighter, darker), a void sets its middle to the 1st
    percentile inside a bright rim, an object lies above the 99.5th percentile. The same seed gives the same copy."""
    volume = brain_volume(np.random.default_rng(0), 32, 12)
    lo, hi = np.percentile(volume, (1.0, 99.5))
    for kind in LOCAL_ANOMALIES:
        small, mask = draw_local_anomaly(volume, kind, 2.0, 0.3, 1, "mr")
        _, large_mask = draw_local_anomaly(volume, kind, 4.0, 0.3, 1, "mr")
        assert np.array_equal(small[~mask], volume[~mask]) and mask.any(), kind
        assert mask.sum() < large_mask.sum() and len(np.flatnonzero(mask.any(axis=(1, 2)))) <= 3, kind
        change = small[mask] - volume[mask]
        if kind == "bright-lesion":
            assert change.max() == pytest.approx(0.3 * (hi - lo), rel=0.05) and change.min() >= 0
        elif kind == "dark-lesion":
            assert change.max() <= 0 and 0.5 * 0.3 * (hi - lo) < -change.min() <= 1.05 * 0.3 * (hi - lo)
        elif kind == "void":
            assert small[mask].min() == pytest.approx(lo, abs=1) and small[mask].max() > hi
        else:
            assert (small[mask] > hi).all()
        assert np.array_equal(draw_local_anomaly(volume, kind, 2.0, 0.3, 1, "mr")[0], small)
    with pytest.raises(UsageError, match="local anomaly must be one of"):
        draw_local_anomaly(volume, "tumour", 2.0, 0.3, 1, "mr")
    with pytest.raises(ValueError, match="radius > 0"):
        draw_local_anomaly(volume, "void", 0.0, 0.3, 1, "mr")


def test_score_stops_a_foreign_object_by_the_foreign_check(checkpoint, tmp_path):
    """The gate on every path (`brain_gate`): a model calibrated on 8 small brain subjects scores a new subject `in`
    and the same subject with a bright foreign object `ood` for the foreign check (the map's peak at extreme
    intensities), with the reason; `--no-local` turns it off; the Python API and `ScoreOODd` agree. The detector's
    threshold is set out of reach and the other checks are off."""
    gate = BrainGate(checkpoint, tmp_path, 16, 12, np.random.default_rng(5))
    assert "foreign threshold" in gate.calibrated.output
    scans = tmp_path / "scans"
    subject = gate.subject()
    gate.write(subject, scans / "clean.nii.gz")
    gate.write(draw_local_anomaly(subject, "foreign-object", 2.0, 2.0, 0, "mr")[0], scans / "object.nii.gz")
    others = ["--no-slice-order", "--no-orientation", "--no-anatomy"]
    verdicts = gate.verdicts(scans, ("local", "foreign"), "--no-local", others, "map_peak", "object.nii.gz")
    assert verdicts["clean.nii.gz"][0] == "in"
    assert verdicts["object.nii.gz"][0] == "ood"
    assert "a foreign object or signal void (the anomaly map's peak at extreme intensities)" in verdicts[
        "object.nii.gz"][1]  # fmt: skip
