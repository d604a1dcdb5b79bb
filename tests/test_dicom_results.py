import json
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
from click.testing import CliRunner
from processes import system_tool

from cdm_ood.cli import main
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.volume_files import write_dicom_series, write_nifti
from cdm_ood.ood.dicom_results import SCHEME

PATIENT = "DOE^JANE"


@pytest.fixture(scope="module")
def gated(checkpoint, tmp_path_factory):
    """A `score --maps` run over a two-echo DICOM series (its patient named), a constant one-slice series and a
    NIfTI volume: its report rows by volume, its maps folder and its inputs."""
    root = tmp_path_factory.mktemp("results")
    scans, rng = root / "scans", np.random.default_rng(4)
    uid, study = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for echo in (1, 2):
        write_dicom_series(phantom_volume(rng, size=16, slices=4), scans / "mr", modality="ct", volume_index=0,
                           series_uid=uid, study_uid=study, stem=f"echo{echo}",
                           fields={"EchoNumbers": echo, "PatientName": PATIENT})  # fmt: skip
    write_dicom_series(np.full((1, 16, 16), 30.0), scans / "blank", modality="ct", volume_index=1)
    write_nifti(phantom_volume(rng, size=16, slices=2), scans / "body.nii.gz")
    out = CliRunner().invoke(main, ["score", str(scans), "--checkpoint", str(checkpoint), "--threshold", "1e12",
                                    "--out", str(root / "r.json"), "--maps", str(root / "maps")])  # fmt: skip
    assert out.exit_code == 1, out.output  # the blank series is flagged
    rows = json.loads((root / "r.json").read_text())["rows"]
    return {r["volume"]: r for r in rows if r["level"] == "volume"}, root / "maps", scans, out.output


def content(sr) -> dict[str, object]:
    """An SR's content items by concept value: codes, numbers and texts as values, images as a list of UIDs."""
    found: dict[str, object] = {}
    for item in sr.ContentSequence:
        code = item.ConceptNameCodeSequence[0]
        assert code.CodingSchemeDesignator == SCHEME
        if item.ValueType == "IMAGE":
            found.setdefault("source", []).append(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        else:
            found[code.CodeValue] = (item.ConceptCodeSequence[0].CodeValue if item.ValueType == "CODE" else
                                     float(item.MeasuredValueSequence[0].NumericValue) if item.ValueType == "NUM"
                                     else item.TextValue)  # fmt: skip
    return found


def test_each_dicom_volume_gets_an_sr_holding_its_row_and_referencing_its_instances(gated):
    volumes, maps, scans, _ = gated
    names = sorted(p.name for p in maps.glob("*.dcm"))
    assert names == ["blank_sr.dcm", "mr-2_map.dcm", "mr-2_sr.dcm", "mr_map.dcm", "mr_sr.dcm"], "none of a flagged map"
    for stem in ("mr", "mr-2", "blank"):
        sr = hd.sr.srread(maps / f"{stem}_sr.dcm")
        found = content(sr)
        row = volumes[found["volume"]]
        assert found["verdict"] == row["verdict"] and found["reason"] == row["reason"]
        assert found["threshold"] == pytest.approx(1e12) and found.get("score") == pytest.approx(row["score"])
        assert len(found["model"]) == 64 and found["detector"]
        files = [f for f in scans.rglob("*.dcm") if pydicom.dcmread(f).SeriesInstanceUID in row["volume"]]
        sources = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
        echo = row["volume"][-2] if row["series_part"] else None
        expected = {u for u, ds in sources.items() if echo is None or str(ds.EchoNumbers) == echo}
        assert set(found["source"]) == expected and len(expected) == (4 if echo else 1)
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
        assert {e.ReferencedSOPInstanceUID for e in evidence} == expected
        first = next(iter(sources.values()))
        assert sr.SOPInstanceUID not in sources and sr.SeriesInstanceUID != first.SeriesInstanceUID
        assert (sr.PatientName, sr.PatientID, sr.StudyInstanceUID) == (first.PatientName, first.PatientID,
                                                                       first.StudyInstanceUID)  # fmt: skip
    assert volumes[content(hd.sr.srread(maps / "blank_sr.dcm"))["volume"]]["verdict"] == "flagged"


def test_the_parametric_map_holds_the_slice_maps_on_the_source_geometry(gated):
    _, maps, scans, _ = gated
    for stem in ("mr", "mr-2"):
        pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(maps / f"{stem}_map.dcm"))
        sources = {}
        for f in scans.joinpath("mr").glob("*.dcm"):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            sources[ds.SOPInstanceUID] = ds
        frames = pm.PerFrameFunctionalGroupsSequence
        referenced = [g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID for g in frames]
        assert len(referenced) == pm.NumberOfFrames == 4 and len({str(sources[u].EchoNumbers) for u in referenced}) == 1
        ordered = sorted(referenced, key=lambda u: float(sources[u].ImagePositionPatient[2]))
        expected = np.stack([np.load(maps / f"{stem}_s{k:04d}_map.npy") for k in range(4)])
        pixels = pm.pixel_array
        for k, uid in enumerate(ordered):
            frame = referenced.index(uid)
            position = frames[frame].PlanePositionSequence[0].ImagePositionPatient
            assert [float(v) for v in position] == [float(v) for v in sources[uid].ImagePositionPatient]
            np.testing.assert_array_equal(pixels[frame], expected[k])
        first = next(iter(sources.values()))
        assert pm.FrameOfReferenceUID == first.FrameOfReferenceUID and pm.SOPClassUID.name == "Parametric Map Storage"
        assert pm.PatientName == PATIENT


def test_no_identifier_reaches_the_report_or_the_log(gated):
    _, maps, _, output = gated
    assert PATIENT not in (maps.parent / "r.json").read_text() and "PHANTOM" not in output and PATIENT not in output


def test_the_dicom_results_pass_dcmtk_and_dicom3tools_validation(gated):
    _, maps, _, _ = gated
    dciodvfy, dsrdump = system_tool("dciodvfy", "dicom3tools"), system_tool("dsrdump", "dcmtk")
    for path in sorted(maps.glob("*.dcm")):
        out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], f"{path.name}: {errors}"
    for path in sorted(maps.glob("*_sr.dcm")):
        out = subprocess.run([dsrdump, "-Ee", str(path)], capture_output=True, text=True)
        assert out.returncode == 0 and "OOD gate result" in out.stdout, out.stderr


def test_a_result_that_cannot_be_written_flags_its_volume_and_the_run_goes_on(checkpoint, tmp_path):
    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        write_dicom_series(phantom_volume(rng, size=16, slices=3), tmp_path / "scans" / name, modality="ct",
                           volume_index=0)  # fmt: skip
    (tmp_path / "maps" / "a_map.dcm").mkdir(parents=True)  # a folder where the parametric map must go
    out = CliRunner().invoke(
        main,
        [
            "score",
            str(tmp_path / "scans"),
            "--checkpoint",
            str(checkpoint),
            "--threshold",
            "1e12",
            "--out",
            str(tmp_path / "r.csv"),
            "--maps",
            str(tmp_path / "maps"),
        ],
    )
    assert out.exit_code == 1, out.output
    report = pd.read_csv(tmp_path / "r.csv", keep_default_na=False)
    volumes = {Path(r.path).name: r for r in report[report.level == "volume"].itertuples()}
    assert volumes["b"].verdict == "in" and volumes["a"].verdict == "flagged"
    assert volumes["a"].reason.startswith("map not written: a_map.dcm: IsADirectoryError")
    sr = content(hd.sr.srread(tmp_path / "maps" / "a_sr.dcm"))
    assert sr["verdict"] == "flagged" and sr["reason"] == volumes["a"].reason, "the SR holds the final verdict"
