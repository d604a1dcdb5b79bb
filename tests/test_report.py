"""The one verdict rule (`report.judge`) for images and volumes, its properties (hypothesis), and the CSV report's
file names."""

import csv
import json
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdm_ood.data.errors import UnreadableFileError
from cdm_ood.data.records import SliceSource
from cdm_ood.data.walk import IgnoredFile
from cdm_ood.errors import UsageError
from cdm_ood.ood.report import (
    AGGREGATES,
    COLUMNS,
    FLAGGED,
    IN,
    OOD,
    aggregate,
    error_row,
    flag_noted,
    ignored_row,
    judge,
    map_failure_row,
    slice_row,
    summary,
    volume_row,
    volume_rows,
    write_report,
)
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


EMPTY = dict.fromkeys(COLUMNS)
SOURCE = SliceSource("s/b.dcm", 4, "1.2.3", sop_instance_uid="9.8", time_point=2)


def test_file_rows_hold_exactly_their_file_and_reason():
    """An unreadable file, an ignored file and a map not written (of a slice, or of the whole volume)."""
    assert error_row(UnreadableFileError("x/y.dcm", "truncated")) == EMPTY | {
        "level": "file", "path": "x/y.dcm", "verdict": "unreadable", "reason": "UnreadableFileError: truncated",
    }  # fmt: skip
    assert ignored_row(IgnoredFile("x/.DS_Store", ".*")) == EMPTY | {
        "level": "file", "path": "x/.DS_Store", "verdict": "ignored",
        "reason": "not read: matches the ignore pattern '.*'",
    }  # fmt: skip
    mapped = EMPTY | {"level": "file", "path": "s/b.dcm", "slice": 4, "time_point": 2, "volume": "1.2.3",
                      "verdict": "flagged", "reason": "map not written: disk full"}  # fmt: skip
    assert map_failure_row(SOURCE, "disk full") == mapped
    assert map_failure_row(SOURCE, "disk full", whole=True) == mapped | {"slice": None}


def test_slice_and_volume_rows_hold_the_verdict_and_only_finite_statistics():
    """A flagged image keeps neither its score nor its statistics; a volume row has no slice and no SOPInstanceUID."""
    stats = {"bits_per_dim": np.float32(1.5), "map_peak": 7, "vflip_log_ratio": math.nan, "foreground_fraction": None}
    row = slice_row(SOURCE, 3.0, 2.0, (), stats)
    ood = EMPTY | {"level": "slice", "path": "s/b.dcm", "slice": 4, "time_point": 2, "volume": "1.2.3",
                   "sop_instance_uid": "9.8", "score": 3.0, "threshold": 2.0, "verdict": "ood",
                   "reason": "score above threshold", "bits_per_dim": 1.5, "map_peak": 7.0}  # fmt: skip
    assert row == ood and type(row["map_peak"]) is type(row["bits_per_dim"]) is float
    assert volume_row(SOURCE, 3.0, 2.0, statistics=stats) == ood | {"level": "volume", "slice": None,
                                                                    "sop_instance_uid": None}  # fmt: skip
    flagged = {"score": None, "verdict": "flagged", "reason": "not scored: constant pixels", "bits_per_dim": None,
               "map_peak": None}  # fmt: skip
    assert slice_row(SOURCE, 3.0, 2.0, ("constant",), stats) == ood | flagged
    assert volume_row(SOURCE, 3.0, 2.0, ("constant",), stats) == ood | flagged | {
        "level": "volume", "slice": None, "sop_instance_uid": None}  # fmt: skip
    assert slice_row(SOURCE, 1.0, 2.0) == ood | {"score": 1.0, "verdict": "in", "reason": "", "bits_per_dim": None,
                                                 "map_peak": None}  # fmt: skip
    assert volume_row(SOURCE, 1.0, 2.0)["verdict"] == "in"


def test_a_map_not_written_flags_its_volume_row_only():
    """The file rows' distinct reasons come first in the volume row's reason; rows of other volumes, file rows without
    a volume, and unreadable files leave it alone."""
    other = SliceSource("o.nii", 0, "o.nii")
    rows = [
        map_failure_row(SOURCE, "disk full"), map_failure_row(SOURCE, "disk full", whole=True),
        map_failure_row(SOURCE, "read-only"), ignored_row(IgnoredFile("x.txt", "*.txt")),
        error_row(UnreadableFileError("1.2.3", "broken")) | {"volume": "1.2.3"},
        EMPTY | {"level": "file", "verdict": FLAGGED, "reason": "no volume"},
        slice_row(SOURCE, 1.0, 2.0), volume_row(SOURCE, 1.0, 2.0), volume_row(SOURCE, 3.0, 2.0),
        volume_row(other, 3.0, 2.0),
    ]  # fmt: skip
    out = flag_noted(rows)
    noted = "map not written: disk full; map not written: read-only"
    assert out == [*rows[:7], rows[7] | {"verdict": FLAGGED, "reason": noted},
                   rows[8] | {"verdict": FLAGGED, "reason": f"{noted}; score above threshold"}, rows[9]]  # fmt: skip


def test_the_aggregates_are_the_max_mean_and_95th_percentile_and_no_other():
    scores = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    assert {how: aggregate(how)(scores) for how in AGGREGATES} == {"max": 4.0, "mean": 2.0, "q95": pytest.approx(3.8)}
    with pytest.raises(UsageError) as err:
        aggregate("median")
    assert str(err.value) == "unknown per-volume aggregate 'median'; expected one of max, mean, q95"


def _slices(volume: str, scores, flags=None, path=None, **columns) -> list[dict]:
    """Slice rows of one volume; `flags` per slice, `columns` statistics per slice."""
    flags = flags or [()] * len(scores)
    return [slice_row(SliceSource(path or volume, k, volume), s, 2.0, f, {c: v[k] for c, v in columns.items()})
            for k, (s, f) in enumerate(zip(scores, flags, strict=True))]  # fmt: skip


def test_volume_rows_hold_the_aggregate_the_counts_and_the_reasons_of_each_volume():
    """Only slice rows are grouped, per volume in order of appearance; statistics are the slices' means, the map peaks
    their largest; a volume's path is its file, or the folder of its series' files."""
    series = [slice_row(SliceSource(f"d/s/{k}.dcm", k, "1.2"), s, 2.0) for k, s in enumerate((1.0, 3.0, 3.0, 3.0))]
    clean = _slices("a.nii", (1.0, 2.0, 4.0), bits_per_dim=(1.0, 2.0, 6.0), map_peak=(1.0, 5.0, 2.0))
    some = _slices("b.nii", (1.0, 9.0, 1.0), [(), ("constant",), ()], vflip_log_ratio=(1.0, 2.0, math.nan))
    none = _slices("c.nii", (1.0, 1.0), [("constant",), ("nan-or-inf", "constant")])
    rows = [*clean, volume_row(SOURCE, 9.0, 2.0), error_row(UnreadableFileError("e", "x")), *some, *none, *series]
    base = EMPTY | {"level": "volume", "threshold": 2.0}
    assert volume_rows(rows, 2.0, "max") == [
        base | {"path": "a.nii", "volume": "a.nii", "score": 4.0, "verdict": OOD, "bits_per_dim": 3.0, "map_peak": 5.0,
                "reason": "max of 3 slice scores; 1 slices above threshold"},
        base | {"path": "b.nii", "volume": "b.nii", "score": 1.0, "verdict": FLAGGED, "vflip_log_ratio": 1.0,
                "reason": "1 of 3 slices flagged (not scored: constant pixels); max of 2 slice scores; "
                          "0 slices above threshold"},
        base | {"path": "c.nii", "volume": "c.nii", "verdict": FLAGGED,
                "reason": "no slice could be scored (2 flagged: constant pixels; nan-or-inf, constant pixels)"},
        base | {"path": "d/s", "volume": "1.2", "score": 3.0, "verdict": OOD,
                "reason": "max of 4 slice scores; 3 slices above threshold"},
    ]  # fmt: skip
    assert [r["score"] for r in volume_rows(rows, 2.0)] == [pytest.approx(7 / 3), 1.0, None, 2.5], "mean by default"
    assert volume_rows(rows, 5.0, "mean")[3]["verdict"] == IN


def test_a_flagged_volume_repeats_three_distinct_reasons_of_its_slices_and_counts_the_others():
    header = ("PixelSpacing differs", "Rows differ", "Columns differ", "SliceThickness differs", "Modality differs")
    for n, more in ((3, ""), (5, "; and 2 more")):
        flags = [(h,) for h in header[:n] for _ in range(2)]
        (volume,) = volume_rows(_slices("v", [1.0] * 2 * n, flags), 2.0)
        assert volume["reason"] == f"no slice could be scored ({2 * n} flagged: {'; '.join(header[:3])}{more})"
        (volume,) = volume_rows(_slices("v", [1.0] * (2 * n + 1), [*flags, ()]), 2.0)
        assert volume["reason"] == (f"{2 * n} of {2 * n + 1} slices flagged (not scored: {'; '.join(header[:3])}"
                                    f"{more}); mean of 1 slice scores; 0 slices above threshold")  # fmt: skip


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        ((), {"passed": False, "reason": "nothing was scored"}),
        ((("slice", IN),), {"passed": False, "reason": "nothing was scored", "slice_in": 1}),
        ((("volume", FLAGGED),), {"passed": False, "reason": "nothing was scored", "volume_flagged": 1}),
        ((("volume", IN),), {"passed": True, "volume_in": 1}),
        ((("volume", IN), ("slice", OOD), ("slice", FLAGGED), ("file", "ignored"), ("volume", IN)),
         {"passed": True, "file_ignored": 1, "slice_flagged": 1, "slice_ood": 1, "volume_in": 2}),
        ((("volume", OOD),), {"passed": False, "volume_ood": 1}),
        ((("volume", IN), ("volume", FLAGGED)), {"passed": False, "volume_flagged": 1, "volume_in": 1}),
        ((("volume", IN), ("file", "unreadable")), {"passed": False, "file_unreadable": 1, "volume_in": 1}),
        ((("file", FLAGGED), ("volume", IN)), {"passed": False, "file_flagged": 1, "volume_in": 1}),
    ],
)  # fmt: skip
def test_the_gate_passes_when_a_volume_was_scored_and_no_volume_or_file_fails(verdicts, expected):
    """The counts come after `passed` (and `reason`), sorted by name; slice verdicts count but never decide."""
    result = summary([EMPTY | {"level": level, "verdict": verdict} for level, verdict in verdicts])
    assert list(result.items()) == list(expected.items())


def test_the_json_report_holds_the_info_the_summary_and_every_column_with_non_finite_values_empty(tmp_path):
    rows = [volume_row(SOURCE, 1.0, 2.0) | {"score": math.inf, "bits_per_dim": math.nan, "map_peak": 2.5},
            error_row(UnreadableFileError("e.dcm", "broken"))]  # fmt: skip
    assert write_report(tmp_path / "r.JSON", rows, {"model": "m"}) == tmp_path / "r.JSON"
    expected = {"model": "m", "summary": {"passed": False, "file_unreadable": 1, "volume_in": 1},
                "rows": [{k: None if k in ("score", "bits_per_dim") else rows[0][k] for k in COLUMNS},
                         dict.fromkeys(COLUMNS) | rows[1]]}  # fmt: skip
    text = (tmp_path / "r.JSON").read_text()
    assert json.loads(text) == expected and text == json.dumps(expected, indent=1)


def test_the_csv_report_holds_the_rows_only_with_empty_cells_for_missing_values(tmp_path):
    """A text cell that a spreadsheet would run as a formula is written with a leading '."""
    rows = [volume_row(SOURCE, 1.0, 2.0), ignored_row(IgnoredFile("=x.txt", "*.txt"))]
    assert write_report(tmp_path / "r.Csv", rows, {"model": "m"}) == tmp_path / "r.Csv"
    with open(tmp_path / "r.Csv", newline="") as f:
        back = list(csv.reader(f))
    assert back == [list(COLUMNS), [str("" if rows[0][k] is None else rows[0][k]) for k in COLUMNS],
                    ["file", "'=x.txt", *[""] * 7, "ignored", "not read: matches the ignore pattern '*.txt'",
                     *[""] * (len(COLUMNS) - 11)]]  # fmt: skip
    with pytest.raises(UsageError) as err:
        write_report(tmp_path / "r.txt", rows, {})
    assert str(err.value) == f"{tmp_path / 'r.txt'}: the report must be .csv or .json"
    assert not (tmp_path / "r.txt").exists()


def test_a_volume_aggregates_single_precision_slice_scores_in_double_precision():
    """1 + 2^-24 + 2^-24 is 1 in float32 arithmetic: the mean of these three float32 scores is (1 + 2^-23) / 3."""
    scores = np.array([1.0, 2.0**-24, 2.0**-24], dtype=np.float32)
    (volume,) = volume_rows([slice_row(SliceSource("v", k, "v"), s, 2.0) for k, s in enumerate(scores)], 2.0)
    assert volume["score"] == (1 + 2.0**-23) / 3
