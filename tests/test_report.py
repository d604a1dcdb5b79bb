"""The one verdict rule (`report.judge`) for images and volumes."""

import math

import pytest

from cdm_ood.data.records import SliceSource
from cdm_ood.ood.report import FLAGGED, IN, OOD, judge, slice_row, volume_rows


@pytest.mark.parametrize(
    ("score", "flags", "failed", "verdict", "reason"),
    [
        (1.0, (), (), IN, ""),
        (2.0, (), (), IN, ""),  # a score equal to the threshold passes: the threshold is the largest passing score
        (2.0 + 1e-9, (), (), OOD, "score above threshold"),
        (1.0, (), ("anatomy 5.1 above its threshold 3",), OOD, "anatomy 5.1 above its threshold 3"),
        (3.0, (), ("orientation",), OOD, "score above threshold; orientation"),
        (1.0, ("constant",), (), FLAGGED, "not scored: constant pixels"),
        (math.nan, (), ("orientation",), FLAGGED, "not scored: the model's score is not finite (nan)"),
        (None, (), (), FLAGGED, "not scored: the model's score is not finite (None)"),
    ],
)
def test_judge_is_flagged_before_ood_before_in(score, flags, failed, verdict, reason):
    assert judge(score, 2.0, flags, failed) == (verdict, reason)


@pytest.mark.parametrize(("scores", "verdict"), [((1.0, 2.0, 3.0), IN), ((1.0, 3.0, 3.0), OOD)])
def test_a_volume_is_judged_by_the_same_rule_on_its_aggregate(scores, verdict):
    rows = [slice_row(SliceSource("v.nii.gz", k, "v.nii.gz"), s, 2.0) for k, s in enumerate(scores)]
    (volume,) = volume_rows(rows, 2.0, "mean")
    assert volume["verdict"] == verdict == judge(sum(scores) / len(scores), 2.0)[0]
