"""The one verdict rule (`report.judge`) for images and volumes, its properties (hypothesis), and the CSV report's
file names."""

import csv
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdm_ood.data.records import SliceSource
from cdm_ood.ood.report import AGGREGATES, FLAGGED, IN, OOD, judge, slice_row, summary, volume_rows, write_report
from cdm_ood.utils.io import spreadsheet_value


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


SCORES = st.floats(-1e6, 1e6, allow_nan=False)


@given(st.lists(SCORES, min_size=1, max_size=24), st.data(), SCORES, st.sampled_from(sorted(AGGREGATES)))
def test_a_volume_with_any_flagged_slice_never_passes(scores, data, threshold, how):
    """However many slices are clean and however low their scores, one flagged slice flags its volume and the run."""
    flagged = data.draw(st.sets(st.integers(0, len(scores) - 1), min_size=1))
    rows = [slice_row(SliceSource("v.nii", k, "v"), s, threshold, ("nan-or-inf",) if k in flagged else ())
            for k, s in enumerate(scores)]  # fmt: skip
    (volume,) = volume_rows(rows, threshold, how)
    assert volume["verdict"] == FLAGGED and not summary([*rows, volume])["passed"]


@given(SCORES, SCORES, SCORES)
def test_the_verdict_is_monotone_in_the_score_and_the_threshold(a, b, threshold):
    """A higher score is never more in distribution, a higher threshold never less; equal to it passes."""
    low, high = sorted((a, b))
    assert (judge(low, threshold)[0] == OOD) <= (judge(high, threshold)[0] == OOD)
    assert (judge(a, high)[0] == OOD) <= (judge(a, low)[0] == OOD)
    assert judge(threshold, threshold)[0] == IN


@given(st.lists(SCORES, min_size=1, max_size=12), st.integers(0, 11), st.floats(0, 1e6), SCORES)
def test_raising_one_slice_score_never_turns_an_ood_volume_in(scores, which, rise, threshold):
    """The per-volume aggregates are monotone: a volume cannot pass because one of its slices scored worse."""
    which %= len(scores)
    for how in AGGREGATES:
        verdicts = []
        for bump in (0.0, rise):
            rows = [slice_row(SliceSource("v.nii", k, "v"), s + (bump if k == which else 0.0), threshold)
                    for k, s in enumerate(scores)]  # fmt: skip
            verdicts.append(volume_rows(rows, threshold, how)[0]["verdict"])
        assert verdicts[0] != OOD or verdicts[1] == OOD, how


NAMES = st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(NAMES, min_size=1, max_size=5, unique=True))
def test_the_csv_report_round_trips_every_file_name_the_filesystem_allows(tmp_path, names):
    """Any bytes but '/' and NUL (commas, quotes, newlines, formula signs, invalid UTF-8) come back as written."""
    paths = [str(tmp_path / os.fsdecode(name)) for name in names]
    rows = [slice_row(SliceSource(p, 0, p), 1.0, 2.0) for p in paths]
    report = write_report(tmp_path / "report.csv", rows, {})
    with open(report, newline="", encoding="utf-8", errors="surrogateescape") as f:
        back = [spreadsheet_value(r["path"]) for r in csv.DictReader(f)]
    assert back == paths
