"""The whole-anatomy volume check (`cdm_ood.ood.anatomy_check`) and its per-slice foreground statistics: closed forms
on drawn shapes, brain subjects from the MNI152 template with every coverage error against clean subjects at the
extremes of head size and position, and the gate (CLI, Python API, `ScoreOODd`) stopping a truncated field of view."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from brain_gate import BrainGate

from cdm_ood.data.anatomy import brain_volume, draw_subject, render, tissue_maps
from cdm_ood.data.geometry import COVERAGE, cover, misorient
from cdm_ood.data.presets import fit_mr_preset
from cdm_ood.model.spec import Calibration
from cdm_ood.ood.anatomy_check import FOREGROUND_COLUMNS, MIN_SCALE, POSITIONS, REACH, AnatomyCheck, coverage_vector
from cdm_ood.ood.calibration import fit_volume_checks, load_volume_checks
from cdm_ood.ood.features import FOREGROUND_LEVEL, MAX_SKEWNESS, foreground_statistics
from cdm_ood.ood.volume_checks import image_statistics

pytest.importorskip("nilearn")


def _ellipse(rows: int, cols: int, a: float, b: float, centre: tuple[float, float]) -> torch.Tensor:
    """A model-space image (1, 1, rows, cols): 1 inside the ellipse of semi-axes `a` (rows) and `b` (columns), -1
    outside."""
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")  # fmt: skip
    inside = ((r - centre[0]) / a) ** 2 + ((c - centre[1]) / b) ** 2 <= 1
    return torch.where(inside, 1.0, -1.0)[None, None]


def test_foreground_statistics_of_an_ellipse_are_its_area_and_axis_ratio_and_a_flip_negates_the_skewness():
    """An ellipse of semi-axes 24 x 12 in a 96 x 96 image: fraction pi a b / 96^2, elongation (a - b) / (a + b)
    (the standard deviation of a filled ellipse's coordinate along an axis is half its semi-axis), skewness 0; moved
    and shrunk, its elongation stays; with its last third of rows cut off, its bulk lies towards the cut, the last
    rows (skewness < 0), and a flip of the rows negates the skewness exactly. Both are bounded: a handful of pixels in
    one column has elongation 1, not a ratio to a zero spread. An image without body has 0 for all three."""
    x = _ellipse(96, 96, 24, 12, (47.5, 47.5))
    fraction, elongation, skewness = foreground_statistics(x)[0].tolist()
    assert fraction == pytest.approx(math.pi * 24 * 12 / 96**2, rel=0.02)
    assert elongation == pytest.approx(1 / 3, rel=0.03) and abs(skewness) < 1e-9
    moved = foreground_statistics(_ellipse(96, 96, 18, 9, (30.0, 60.0)))[0]
    assert moved[1] == pytest.approx(1 / 3, rel=0.05) and moved[0] == pytest.approx(fraction * (18 * 9) / (24 * 12),
                                                                                     rel=0.03)  # fmt: skip
    cut = x.clone()
    cut[..., 63:, :] = -1.0  # the last third of the ellipse's 48 rows (from row 63.5) set to background
    stats = foreground_statistics(torch.cat([cut, cut.flip(2)]))
    assert stats[0, 2] < -0.05 and stats[1, 2] == pytest.approx(-stats[0, 2].item(), abs=1e-12)
    assert stats[0, 1] < 0.3, "a shorter body is less elongated"
    column = torch.full((1, 1, 8, 8), -1.0)
    column[..., [1, 2, 6], 4] = 1.0
    assert foreground_statistics(column)[0, 1] == 1.0 and abs(foreground_statistics(column)[0, 2]) <= MAX_SKEWNESS
    assert foreground_statistics(torch.full((1, 1, 8, 8), -1.0)).tolist() == [[0.0, 0.0, 0.0]]
    assert foreground_statistics(torch.full((1, 1, 8, 8), FOREGROUND_LEVEL))[0, 0] == 0.0, "strictly above the level"
    with pytest.raises(ValueError, match="2D images"):
        foreground_statistics(torch.zeros(1, 1, 4, 4, 4))


def test_coverage_vector_aligns_the_profile_and_the_statistic_is_the_largest_standardised_entry():
    """A head-like body-fraction profile (a bump over the slab) at 0.4 of its peak fraction and the same at twice
    the fraction give the same profile (over its peak); a head 5% taller and 0.078 of the slab higher (within the
    alignment's reach) is aligned onto the template (up to interpolation), where its profile as given is not;
    elongation and skewness are the fraction-weighted means. The statistic is the largest absolute standardised
    entry, 0 at the mean; a deviation below `MIN_SCALE` is raised to it."""
    z = np.linspace(0, 1, 200)

    def head(centre: float = 0.5, peak: float = 0.4, height: float = 1.0) -> np.ndarray:
        fraction = peak * np.exp(-(((z - centre) / (0.25 * height)) ** 2))
        return np.stack([fraction, np.full(len(z), 1.2), np.where(z < 0.5, -1.0, 1.0)], axis=1)

    template = coverage_vector(head())[:POSITIONS]
    np.testing.assert_allclose(coverage_vector(head(peak=0.8))[:POSITIONS], template, rtol=1e-12)
    moved = head(centre=0.5 + 5 * REACH / 8, height=1.05)
    np.testing.assert_allclose(coverage_vector(moved, template)[:POSITIONS], template, atol=2e-3)
    assert np.abs(coverage_vector(moved)[:POSITIONS] - template).max() > 0.1
    fraction = head()[:, 0]
    assert coverage_vector(moved, template)[POSITIONS] == pytest.approx(1.2)
    skewness = fraction @ np.where(z < 0.5, -1, 1) / fraction.sum()
    assert coverage_vector(head())[POSITIONS + 1] == pytest.approx(skewness, abs=1e-12)
    vector = coverage_vector(head(), template)
    check = AnatomyCheck(template=template, mean=vector, scale=np.full(POSITIONS + 2, 0.1), threshold=1.0)
    assert check.statistic(head()) == 0.0
    wider = head()
    wider[:, 1] += 0.35
    assert check.statistic(wider) == pytest.approx(3.5)
    fitted = AnatomyCheck.fit([head(), head(peak=0.6)])
    assert fitted["scale"] == [MIN_SCALE] * (POSITIONS + 2) and np.allclose(fitted["mean"], vector)


SIZE, SLICES = 64, 24


def _model_space(volumes: list[np.ndarray]) -> callable:
    preset = fit_mr_preset(volumes)
    return lambda v: torch.as_tensor(preset.transform()(v[:, None].astype(np.float32))).double()


def _sequence(to_model, volume: np.ndarray) -> np.ndarray:
    stats = image_statistics({"foreground": foreground_statistics(to_model(volume))}, 1, 8)
    return np.stack([stats[c] for c in FOREGROUND_COLUMNS], axis=1)


def test_the_check_stops_every_coverage_error_and_an_ap_flip_and_passes_clean_heads_of_any_size_and_position():
    """Fitted as calibration fits it (cross-fitted on two halves of 16 brain subjects, fpr 0.05 shared by the four
    checks: the largest of 16 out-of-sample statistics) on the subjects' body statistics in the model space of an
    `mr` preset: new subjects at the smallest and largest head size the training data holds and at the ends of its
    shifts pass; the same subjects with a truncated field of view, a partial slab, coverage that ends early, a slab
    placed too high, or flipped front to back all fail, by a margin, and so do they stored upside down (the head's
    profile along the slab is not symmetric)."""
    rng = np.random.default_rng(0)
    calibration = [brain_volume(rng, SIZE, SLICES) for _ in range(16)]
    to_model = _model_space(calibration)
    stacked = torch.cat([to_model(v) for v in calibration])
    flat = image_statistics({"foreground": foreground_statistics(stacked)}, 1, 8)
    slots = [((v, None), k) for v in range(16) for k in range(SLICES)]
    fits = fit_volume_checks(flat, slots, [v % 2 == 1 for (v, _), _ in slots], 0.05)
    assert list(fits) == ["anatomy"], "only the anatomy check's columns are given"
    (check,) = load_volume_checks(Calibration(0.05, "nll", 1, {}, volume_checks=fits), "fpr:0.0125", ["anatomy"])
    assert check.threshold == max(fits["anatomy"].id_scores)

    def subject(size: float, shift: tuple[float, float, float]) -> np.ndarray:
        drawn = draw_subject(rng)
        moved = dataclasses.replace(drawn, scale=tuple(size * s / math.prod(drawn.scale) ** (1 / 3)
                                                       for s in drawn.scale), shift=shift)  # fmt: skip
        return render(moved, tissue_maps(moved, SIZE, SLICES))

    clean = [subject(0.9, (-6.0, -6.0, -8.0)), subject(1.08, (6.0, 6.0, 8.0)), subject(0.9, (6.0, -6.0, 8.0)),
             subject(1.08, (-6.0, 6.0, -8.0))]  # fmt: skip
    passed = [check.statistic(_sequence(to_model, v)) for v in clean]
    assert max(passed) < check.threshold, passed
    for error in (*COVERAGE, "ap-flip"):
        for k, volume in enumerate(clean):
            bad = cover(volume, error, k) if error in COVERAGE else misorient(volume, error)
            assert check.statistic(_sequence(to_model, bad)) > 1.5 * check.threshold, error
    assert all(check.statistic(_sequence(to_model, misorient(v, "si-flip"))) > check.threshold for v in clean)


def test_score_stops_a_truncated_field_of_view_by_the_anatomy_check(checkpoint, tmp_path):
    """The gate on every path (`brain_gate`): a model calibrated on 8 small brain subjects scores a new subject `in`
    and the same subject with the anterior third of its head outside the field of view, or its superior third of
    slices missing, `ood` for the anatomy check, with the reason; `--no-anatomy` turns it off; the Python API and
    `ScoreOODd` agree. The detector's threshold is set out of reach and the model-based checks are off: the anatomy
    check reads the images alone."""
    gate = BrainGate(checkpoint, tmp_path, 32, 12, np.random.default_rng(4))
    assert "anatomy threshold" in gate.calibrated.output
    scans = tmp_path / "scans"
    subject = gate.subject()
    gate.write(subject, scans / "clean.nii.gz")
    gate.write(cover(subject, "truncated-fov", 0), scans / "truncated.nii.gz")
    gate.write(cover(subject, "partial-slab", 0), scans / "partial.nii.gz")
    others = ["--no-slice-order", "--no-orientation", "--no-local"]
    verdicts = gate.verdicts(scans, ("anatomy",), "--no-anatomy", others, "foreground_fraction", "truncated.nii.gz")
    assert verdicts["clean.nii.gz"][0] == "in"
    for name in ("truncated.nii.gz", "partial.nii.gz"):
        assert verdicts[name][0] == "ood"
        assert "anatomy coverage or shape unlike the calibration volumes: statistic" in verdicts[name][1]
