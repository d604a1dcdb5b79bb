import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from click.testing import CliRunner
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from cdm_ood import OODDetector, ScoreOODd
from cdm_ood.cli import main
from cdm_ood.data import iter_slices
from cdm_ood.data.discovery import discover
from cdm_ood.data.headers import SeriesMember, series_flags
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.series import part_volume_id, split_series
from cdm_ood.data.volume_files import write_dicom_series

AXIAL, SAGITTAL, CORONAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), (1.0, 0.0, 0.0, 0, 0, -1.0)


def members(n: int, **fields) -> list[SeriesMember]:
    """`n` axial 16x16 slices 1 mm apart, with `fields` on every one."""
    return [SeriesMember(f"1.2.{k}", (16, 16), AXIAL, spacing="1x1", along=float(k), **fields) for k in range(n)]


def parts(found):
    return [(part.label if part else None, indices) for part, indices in found]


def test_a_series_of_one_acquisition_is_not_split():
    assert split_series(members(4, image_type=("ORIGINAL", "PRIMARY", "AXIAL"), echo_number="1")) == [
        (None, [0, 1, 2, 3])]  # fmt: skip


@pytest.mark.parametrize(
    ("base", "change", "labels", "reason"),
    [
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, {"image_type": ("ORIGINAL", "PRIMARY", "AXIAL")},
         ["localizer", "imaging"], "series split by image type into 2 volumes: part 2, ImageType not LOCALIZER"),
        ({"echo_number": "1"}, {"echo_number": "2"}, ["echo1", "echo2"],
         "series split by echo into 2 volumes: part 2, EchoNumbers 2"),
        ({"echo_time": "10"}, {"echo_time": "90"}, ["te10", "te90"],
         "series split by echo into 2 volumes: part 2, EchoTime 90"),
        ({"temporal_position": "1"}, {"temporal_position": "2"}, ["t1", "t2"],
         "series split by time point into 2 volumes: part 2, TemporalPositionIdentifier 2"),
        ({}, {"orientation": SAGITTAL}, ["axial1", "sagittal2"],
         "series split by orientation into 2 volumes: part 2, ImageOrientationPatient sagittal (0, 1, 0, 0, 0, -1)"),
        ({}, {"size": (32, 32)}, ["16x16", "32x32"],
         "series split by slice size into 2 volumes: part 2, Rows x Columns 32x32"),
        ({}, {"spacing": "2x2"}, ["px1x1", "px2x2"],
         "series split by pixel spacing into 2 volumes: part 2, PixelSpacing 2x2 mm"),
    ],
)  # fmt: skip
def test_slices_that_differ_in_one_field_are_two_volumes_each_with_a_reason(base, change, labels, reason):
    first = members(3, **base)
    second = [replace(m, uid=f"{m.uid}.2", **change) for m in members(3, **base)]
    interleaved = [m for pair in zip(first, second, strict=True) for m in pair]  # the order of positions
    found = split_series(interleaved)
    assert parts(found) == [(labels[0], [0, 2, 4]), (labels[1], [1, 3, 5])]
    assert found[1][0].reason == reason
    assert found[0][0].reason.startswith(reason.split(": part")[0] + ": part 1, ")


def test_a_three_plane_localizer_beside_an_axial_series_is_four_volumes():
    localizer = ("ORIGINAL", "PRIMARY", "LOCALIZER")
    scouts = [replace(m, image_type=localizer, orientation=o, uid=f"9.{k}")
              for k, (m, o) in enumerate(zip(members(3), (AXIAL, SAGITTAL, CORONAL), strict=True))]  # fmt: skip
    found = split_series([*scouts, *members(4)])
    assert parts(found) == [("localizer_axial1", [0]), ("localizer_coronal3", [2]), ("localizer_sagittal2", [1]),
                            ("imaging_axial1", [3, 4, 5, 6])]  # fmt: skip
    assert found[2][0].reason == ("series split by image type, orientation into 4 volumes: part 3, ImageType "
                                  "LOCALIZER, ImageOrientationPatient sagittal (0, 1, 0, 0, 0, -1)")  # fmt: skip


def test_acquisition_numbers_split_only_a_series_that_repeats_its_positions():
    repeated = [replace(m, acquisition=str(1 + k // 3), along=float(k % 3)) for k, m in enumerate(members(6))]
    found = split_series(repeated)
    assert parts(found) == [("acq1", [0, 1, 2]), ("acq2", [3, 4, 5])]
    assert found[0][0].reason == ("series split by repeated acquisition into 2 volumes: part 1, AcquisitionNumber 1")
    sequential = [replace(m, acquisition=str(k)) for k, m in enumerate(members(6))]  # a number per CT rotation
    assert parts(split_series(sequential)) == [(None, list(range(6)))]


def test_a_slice_without_orientation_is_its_own_volume_and_flagged():
    series = members(4)
    series[2] = replace(series[2], orientation=None, along=None)
    assert parts(split_series(series)) == [("none2", [2]), ("axial1", [0, 1, 3])]
    absent = "ImageOrientationPatient absent or malformed, where 3 of the series' 4 slices have one"
    assert series_flags(series) == [(), (), (absent,), ()]
    assert series_flags([replace(m, orientation=None) for m in series]) == [()] * 4, "none has one: nothing to flag"


def test_parts_are_in_the_natural_order_of_their_fields():
    found = split_series([*members(2, echo_number="10"), *members(2, echo_number="2"), *members(2, echo_number="1")])
    assert parts(found) == [("echo1", [4, 5]), ("echo2", [2, 3]), ("echo10", [0, 1])]


def test_part_volume_ids_keep_the_series_uid():
    (part, _), _ = split_series([*members(2, echo_number="1"), *members(2, echo_number="2")])
    assert part_volume_id("1.2.3", part) == "1.2.3[echo1]" and part_volume_id("1.2.3", None) == "1.2.3"


def write_echoes(folder: Path, rng, echoes: int = 2, slices: int = 4) -> str:
    """A CT phantom series of `echoes` echoes (EchoNumbers 1, 2, ...) of `slices` slices each, in one folder, with
    patient identifiers; returns its SeriesInstanceUID."""
    uid = pydicom.uid.generate_uid()
    study = pydicom.uid.generate_uid()
    for echo in range(1, echoes + 1):
        write_dicom_series(phantom_volume(rng, size=16, slices=slices), folder, modality="ct", volume_index=0,
                           series_uid=uid, study_uid=study, stem=f"echo{echo}", fields={"EchoNumbers": echo},
                           description="BRAIN^DOE JANE", series_number=7)  # fmt: skip
    return uid


def test_discovery_gives_each_echo_its_volume_in_position_order(tmp_path):
    uid = write_echoes(tmp_path / "mr", np.random.default_rng(0), echoes=3, slices=4)
    found = discover(tmp_path)
    assert sorted({f.volume_id for f in found}) == [f"{uid}[echo{e}]" for e in (1, 2, 3)]
    for f in found:
        assert Path(f.path).name == f"{f.volume_id[-6:-1]}_{f.index:03d}.dcm", "ranked by position within its echo"
        echo = f.volume_id[-2]
        assert f.part == f"series split by echo into 3 volumes: part {echo}, EchoNumbers {echo}"
    slices = list(iter_slices(tmp_path))
    assert {(s.source.volume_id, s.source.part) for s in slices} == {(f.volume_id, f.part) for f in found}


def test_score_gates_each_echo_and_names_the_split_with_series_context_on_request(checkpoint, tmp_path):
    uid = write_echoes(tmp_path / "scans" / "mr", np.random.default_rng(1))
    runner = CliRunner()
    for extra in ((), ("--series-context",)):
        out = runner.invoke(main, ["score", str(tmp_path / "scans"), "--checkpoint", str(checkpoint), "--threshold",
                                   "1e12", "--out", str(tmp_path / "r.csv"), *extra])  # fmt: skip
        assert out.exit_code == 0, out.output
        text = (tmp_path / "r.csv").read_text()
        report = pd.read_csv(tmp_path / "r.csv", keep_default_na=False, dtype=str)
        volumes = report[report.level == "volume"]
        assert volumes.volume.tolist() == [f"{uid}[echo1]", f"{uid}[echo2]"] and set(volumes.verdict) == {"in"}
        for echo, row in enumerate(volumes.itertuples(), 1):
            split = f"series split by echo into 2 volumes: part {echo}, EchoNumbers {echo}"
            assert row.series_part == split and row.reason.startswith(f"{split}; mean of 4 slice scores")
        assert set(report[report.level == "slice"].series_part) == {
            f"series split by echo into 2 volumes: part {e}, EchoNumbers {e}" for e in (1, 2)}  # fmt: skip
        assert "DOE" not in text.replace("BRAIN^DOE JANE", "") and "PHANTOM" not in text
        assert ("BRAIN^DOE JANE" in text) == bool(extra), "the description only when asked for"
    study = pydicom.dcmread(next((tmp_path / "scans" / "mr").iterdir())).StudyInstanceUID
    context = volumes[["study_instance_uid", "series_instance_uid", "modality", "series_number", "series_description"]]
    assert context.drop_duplicates().values.tolist() == [[study, uid, "CT", "7", "BRAIN^DOE JANE"]]


def test_a_json_report_carries_the_part(checkpoint, tmp_path):
    write_echoes(tmp_path / "mr", np.random.default_rng(2))
    out = CliRunner().invoke(main, ["score", str(tmp_path / "mr"), "--checkpoint", str(checkpoint), "--threshold",
                                    "1e12", "--out", str(tmp_path / "r.json")])  # fmt: skip
    assert out.exit_code == 0, out.output
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert sorted(r["series_part"][-13:] for r in rows if r["level"] == "volume") == ["EchoNumbers 1",
                                                                                     "EchoNumbers 2"]  # fmt: skip


def test_a_monai_loaded_series_of_several_volumes_is_flagged(checkpoint, tmp_path):
    write_echoes(tmp_path / "mr", np.random.default_rng(3))
    chain = Compose([LoadImaged("image"), EnsureChannelFirstd("image"),
                     ScoreOODd("image", OODDetector.from_checkpoint(checkpoint, threshold=1e12))])  # fmt: skip
    d = chain({"image": str(tmp_path / "mr")})
    assert d["image_ood_verdict"] == "flagged"
    assert "LoadImage stacked a DICOM series that is 2 volumes" in d["image_ood_reason"]
