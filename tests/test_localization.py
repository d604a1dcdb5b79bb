"""Localization metrics of anomaly maps against known defect masks, on hand-built maps whose answer is known, and
on the defects of `make-phantoms --defects` with a real checkpoint's maps."""

import math

import numpy as np
import pytest

from cdm_ood import OODDetector
from cdm_ood.data.defects import DEFECTS
from cdm_ood.data.phantom_sets import make_phantoms
from cdm_ood.errors import UsageError
from cdm_ood.ood.localization import ALL, localize_defects
from cdm_ood.ood.metrics import localization_metrics


def test_a_map_equal_to_its_mask_is_perfect_and_its_negative_is_worst():
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:4, 5:7] = True
    perfect = localization_metrics([mask.astype(float)], [mask])
    assert perfect == {"pixel_auroc": 1.0, "peak_in_mask": 1.0}
    worst = localization_metrics([-mask.astype(float)], [mask])
    assert worst["pixel_auroc"] == 0.0 and worst["peak_in_mask"] == 0.0


def test_pixel_auroc_pools_all_maps_and_the_peak_counts_only_maps_with_a_defect():
    first = np.array([[0.9, 0.1], [0.2, 0.3]])  # peak outside the mask; the masked 0.2 beats only 0.1
    mask = np.array([[False, False], [True, False]])
    alone = localization_metrics([first], [mask])
    assert alone["peak_in_mask"] == 0.0 and alone["pixel_auroc"] == pytest.approx(1 / 3)
    second = np.array([[0.0, 0.15], [0.05, 0.0]])  # no defect: four more negatives, all below 0.2
    pooled = localization_metrics([first, second], [mask, np.zeros((2, 2), dtype=bool)])
    assert pooled["peak_in_mask"] == 0.0  # the defect-free map has no peak to count
    assert pooled["pixel_auroc"] == pytest.approx(5 / 7)  # 0.2 beats 0.1 and the four, not 0.9 and 0.3
    third = np.zeros((2, 2, 2))  # a volume whose peak (first of the ties) lies in its mask
    third_mask = np.zeros((2, 2, 2), dtype=bool)
    third_mask[0, 0, 0] = True
    both = localization_metrics([first, third], [mask, third_mask])
    assert both["peak_in_mask"] == 0.5


def test_no_defect_gives_nan_and_mismatched_inputs_are_refused():
    empty = localization_metrics([np.ones((3, 3))], [np.zeros((3, 3), dtype=bool)])
    assert math.isnan(empty["pixel_auroc"]) and math.isnan(empty["peak_in_mask"])
    with pytest.raises(ValueError, match=r"map 0 has shape \(3, 3\) but its mask \(3, 4\)"):
        localization_metrics([np.ones((3, 3))], [np.zeros((3, 4), dtype=bool)])
    with pytest.raises(ValueError, match="2 maps but 1 masks"):
        localization_metrics([np.ones((3, 3))] * 2, [np.zeros((3, 3), dtype=bool)])


def test_defects_are_localized_alike_in_dicom_and_nifti_and_above_chance(checkpoint, tmp_path):
    detector = OODDetector.from_checkpoint(checkpoint)
    results = {}
    for fmt in ("dicom", "nifti"):
        manifest = make_phantoms(tmp_path / fmt, 2, fmt, size=16, slices=4, seed=0, defects=True)
        results[fmt] = localize_defects(detector, manifest)
    assert results["dicom"] == results["nifti"]  # the masks line up with the maps' slices in either format
    assert set(results["nifti"]) == {*DEFECTS, ALL}
    assert results["nifti"][ALL]["pixel_auroc"] > 0.6  # even a 40-step 16x16 model points at the defects
    assert all(0.0 <= r["peak_in_mask"] <= 1.0 for r in results["nifti"].values())
    plain = make_phantoms(tmp_path / "plain", 1, "nifti", size=16, slices=2)
    with pytest.raises(UsageError, match="no defect masks"):
        localize_defects(detector, plain)
