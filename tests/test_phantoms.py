"""`cdm-ood make-phantoms` and `cdm_ood.data.phantoms`: real files written, re-read with pydicom and nibabel."""

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from cdm_ood.cli import main
from cdm_ood.data.artifacts import ARTIFACTS, corrupt_volume, ghost_slices
from cdm_ood.data.manifest import MANIFEST_COLUMNS
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.volume_files import write_dicom_series

SIZE, SLICES = 32, 4


def run(out: Path, *args: str) -> list[dict[str, str]]:
    """Run make-phantoms at the small test size; return the manifest rows."""
    return run_at(out, SIZE, "--slices", str(SLICES), *args)


def run_at(out: Path, size: int, *args: str) -> list[dict[str, str]]:
    """Run make-phantoms with slices of `size` x `size` pixels; return the manifest rows."""
    result = CliRunner().invoke(
        main, ["make-phantoms", "--out-dir", str(out), "--size", str(size), *args], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    manifest = out / "manifest.csv"
    assert str(manifest) in result.stdout
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == MANIFEST_COLUMNS
        return list(reader)


def expected_volumes(seed: int, n: int, modality: str) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [phantom_volume(rng, SIZE, SLICES, modality) for _ in range(n)]


def read_series(folder: Path) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    datasets = sorted((pydicom.dcmread(path) for path in folder.glob("*.dcm")), key=lambda ds: ds.InstanceNumber)
    slices = [
        ds.pixel_array * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
        for ds in datasets
    ]
    return np.stack(slices), datasets


def read_nifti(path: Path) -> np.ndarray:
    data = nib.load(path).get_fdata()
    return np.stack([data[:, :, k].T for k in range(data.shape[2])])


def read_volume(out: Path, row: dict[str, str]) -> np.ndarray:
    return read_series(out / row["path"])[0] if row["format"] == "dicom" else read_nifti(out / row["path"])


def assert_manifest_matches_disk(out: Path, rows: list[dict[str, str]]) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted([*(row["path"] for row in rows), "manifest.csv"])


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_dicom_series_are_valid_and_read_back_exactly(tmp_path, modality):
    out = tmp_path / "out"
    rows = run(out, "--n", "2", "--format", "dicom", "--modality", modality, "--seed", "3")
    assert_manifest_matches_disk(out, rows)
    assert [row["path"] for row in rows] == ["phantom_0000", "phantom_0001"]
    for index, (row, expected) in enumerate(zip(rows, expected_volumes(3, 2, modality), strict=True)):
        assert (row["format"], row["modality"], row["artifact"], row["strength"], row["parameter"]) == (
            "dicom",
            modality,
            "none",
            "none",
            "",
        )
        assert (row["n_slices"], row["size"], row["seed"]) == (str(SLICES), str(SIZE), "3")
        files = sorted((out / row["path"]).iterdir())
        assert [f.name for f in files] == [f"slice_{k:03d}.dcm" for k in range(SLICES)]
        for path in files:
            head = path.read_bytes()[:132]
            assert head[128:] == b"DICM"
        volume, datasets = read_series(out / row["path"])
        np.testing.assert_array_equal(volume, expected)
        assert len({ds.SOPInstanceUID for ds in datasets}) == SLICES
        assert {ds.SeriesInstanceUID for ds in datasets} == {row["volume_id"]}
        for k, ds in enumerate(datasets):
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            for uid in (
                ds.SOPInstanceUID,
                ds.SeriesInstanceUID,
                ds.StudyInstanceUID,
                ds.file_meta.MediaStorageSOPInstanceUID,
            ):
                assert UID(uid).is_valid
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.Modality == modality.upper()
            assert ds.SOPClassUID == (CTImageStorage if modality == "ct" else MRImageStorage)
            assert ds.PixelRepresentation == (1 if modality == "ct" else 0)
            assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (SIZE, SIZE, 16, 16, 15)
            assert ds.PhotometricInterpretation == "MONOCHROME2"
            assert [float(x) for x in ds.ImagePositionPatient] == [0.0, 0.0, float(k)]
            assert ds.InstanceNumber == k + 1
            patient = {element.keyword: element.value for element in ds.group_dataset(0x0010)}
            assert patient == {
                "PatientName": f"PHANTOM^{index}",
                "PatientID": f"PHANTOM-{index}",
                "PatientBirthDate": "",
            }
            assert str(ds.PatientName).startswith("PHANTOM")


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_nifti_volumes_read_back_exactly(tmp_path, modality):
    out = tmp_path / "out"
    rows = run(out, "--n", "2", "--format", "nifti", "--modality", modality, "--seed", "3")
    assert_manifest_matches_disk(out, rows)
    for row, expected in zip(rows, expected_volumes(3, 2, modality), strict=True):
        assert row["volume_id"] == row["path"]
        assert row["path"].endswith(".nii.gz")
        image = nib.load(out / row["path"])
        assert image.get_data_dtype() == np.float32
        np.testing.assert_array_equal(image.affine, np.eye(4))
        np.testing.assert_array_equal(read_nifti(out / row["path"]), expected)


def test_volumes_are_integer_valued_anatomy():
    ct, mr = expected_volumes(0, 1, "ct")[0], expected_volumes(0, 1, "mr")[0]
    for volume in (ct, mr):
        assert volume.shape == (SLICES, SIZE, SIZE) and volume.dtype == np.float32
        np.testing.assert_array_equal(volume, np.rint(volume))
        assert not np.array_equal(volume[0], volume[-1])  # shapes vary along the slices
    assert ct.min() < -950 and (ct < -700).mean() > 0.3 and ct.max() > 500  # air, lungs, bone
    assert mr.min() >= 0 and mr.max() < 1500


def test_same_seed_same_output_and_different_seed_different(tmp_path):
    first = run(tmp_path / "a", "--n", "2", "--format", "nifti", "--seed", "5")
    again = run(tmp_path / "b", "--n", "2", "--format", "nifti", "--seed", "5")
    other = run(tmp_path / "c", "--n", "2", "--format", "nifti", "--seed", "6")
    assert again == first
    assert [{**row, "seed": ""} for row in first] == [{**row, "seed": ""} for row in other]
    for row in first:
        assert (tmp_path / "a" / row["path"]).read_bytes() == (tmp_path / "b" / row["path"]).read_bytes()
        assert not np.array_equal(read_nifti(tmp_path / "a" / row["path"]), read_nifti(tmp_path / "c" / row["path"]))

    dicom = run(tmp_path / "d", "--n", "1", "--format", "dicom", "--seed", "5")
    dicom_again = run(tmp_path / "e", "--n", "1", "--format", "dicom", "--seed", "5")
    np.testing.assert_array_equal(read_volume(tmp_path / "d", dicom[0]), read_volume(tmp_path / "e", dicom_again[0]))
    np.testing.assert_array_equal(read_volume(tmp_path / "d", dicom[0]), read_nifti(tmp_path / "a" / first[0]["path"]))
    assert dicom[0]["volume_id"] != dicom_again[0]["volume_id"]  # fresh UIDs on every run


@pytest.mark.parametrize("fmt", ["dicom", "nifti"])
def test_corrupt_writes_labelled_copies_that_grow_with_strength(tmp_path, fmt):
    out = tmp_path / "out"
    rows = run(out, "--n", "2", "--format", fmt, "--corrupt")
    assert_manifest_matches_disk(out, rows)
    assert len(rows) == 2 * 13
    for index in range(2):
        clean_name = f"phantom_{index:04d}"
        (clean,) = [row for row in rows if row["path"] in (clean_name, f"{clean_name}.nii.gz")]
        assert clean["artifact"] == "none"
        source = read_volume(out, clean)
        corrupted = [row for row in rows if row["path"].startswith(f"{clean_name}_")]
        labels = {(row["artifact"], row["strength"], float(row["parameter"])) for row in corrupted}
        assert labels == {(a, s, p) for a, strengths in ARTIFACTS.items() for s, p in strengths.items()}
        assert len(corrupted) == 12 and len(labels) == 12
        difference = {}
        for row in corrupted:
            assert Path(row["path"]).name.split(".")[0] == f"{clean_name}_{row['artifact']}_{row['strength']}"
            volume = read_volume(out, row)
            assert volume.shape == source.shape
            difference[row["artifact"], row["strength"]] = np.abs(volume - source).mean()
        for artifact in ARTIFACTS:
            assert 0 < difference[artifact, "mild"] < difference[artifact, "strong"], artifact
    if fmt == "dicom":
        series = [read_series(out / row["path"])[1] for row in rows]
        assert len({datasets[0].SeriesInstanceUID for datasets in series}) == len(rows)
        assert len({ds.SOPInstanceUID for datasets in series for ds in datasets}) == len(rows) * SLICES
        assert [row["volume_id"] for row in rows] == [datasets[0].SeriesInstanceUID for datasets in series]
        studies = {datasets[0].StudyInstanceUID for datasets in series}
        assert len(studies) == 2  # one study per phantom patient, holding its clean and corrupted series


def test_refuses_non_empty_out_and_leaves_it_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(
        main, ["make-phantoms", "--out-dir", str(out), "--n", "1", "--format", "nifti", "--size", "32"]
    )
    assert result.exit_code != 0
    assert str(out) in result.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    run(empty, "--n", "1", "--format", "nifti")  # an existing empty folder is fine


def test_ghosting_adds_shifted_copies_of_documented_amplitude():
    image = np.zeros((1, 16, 16))
    image[0, 2, 5] = 1.0
    ghosted = ghost_slices(image, factor=3.0, period=4)
    amplitude = (3.0 - 1) / (4 + 3.0 - 1)
    expected = image.copy()
    for shift in (4, 8, 12):
        expected[0, (2 + shift) % 16, 5] += amplitude
    np.testing.assert_allclose(ghosted, expected, atol=1e-12)


def test_corrupt_volume_is_seeded_and_rejects_unknown_artifacts():
    volume = expected_volumes(0, 1, "ct")[0]
    first, parameter = corrupt_volume(volume, "rician", "mild", seed=1, modality="ct")
    assert parameter == ARTIFACTS["rician"]["mild"]
    np.testing.assert_array_equal(first, corrupt_volume(volume, "rician", "mild", seed=1, modality="ct")[0])
    assert not np.array_equal(first, corrupt_volume(volume, "rician", "mild", seed=2, modality="ct")[0])
    with pytest.raises(ValueError, match="blur"):
        corrupt_volume(volume, "blur", "mild", seed=0, modality="ct")


def test_dicom_writer_refuses_values_it_cannot_store_exactly(tmp_path):
    with pytest.raises(ValueError, match="integers"):
        write_dicom_series(np.full((1, 16, 16), 0.5, np.float32), tmp_path / "s", modality="ct", volume_index=0)
    with pytest.raises(ValueError, match="integers"):
        write_dicom_series(np.full((1, 16, 16), -1.0, np.float32), tmp_path / "s", modality="mr", volume_index=0)


@pytest.mark.parametrize("fmt", ["dicom", "nifti"])
def test_phantoms_re_read_through_the_project_reader(tmp_path, fmt):
    """make-phantoms output goes through `iter_slices` unchanged: same pixels, one volume per manifest row."""
    from cdm_ood.data import iter_slices

    out = tmp_path / fmt
    rows = run(out, "--n", "2", "--format", fmt, "--seed", "5")
    errors = []
    slices = list(iter_slices(out, on_error=errors.append))
    assert errors == [], "the manifest is on the default ignore list"
    for row, volume in zip(rows, expected_volumes(5, 2, "ct"), strict=True):
        mine = [s for s in slices if s.source.volume_id.endswith(row["volume_id"])]
        assert [s.source.index for s in mine] == list(range(SLICES))
        np.testing.assert_array_equal(np.stack([s.image[0] for s in mine]), volume)


def test_a_clinical_512_ct_series_is_scored_by_a_16x16_model(checkpoint, tmp_path):
    """CT at clinical resolution: 512x512 phantom slices, stored as DICOM, are mapped by the model's stored preset
    and resize, and scored through the normal `score` command like any other input."""
    import json

    from processes import cdm

    rows = run_at(tmp_path / "ct512", 512, "--n", "1", "--format", "dicom", "--slices", "2")
    series = tmp_path / "ct512" / rows[0]["path"]
    assert {(ds.Rows, ds.Columns) for ds in read_series(series)[1]} == {(512, 512)}
    out = cdm("score", series, "--checkpoint", checkpoint, "--out", tmp_path / "r.json", "--no-fail", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())["rows"]
    slices = [r for r in report if r["level"] == "slice"]
    assert len(slices) == 2 and all(np.isfinite(r["score"]) for r in slices)
    assert not [r for r in report if r["level"] == "file"], "nothing is refused"
