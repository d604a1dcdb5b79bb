"""Folders as clinical archives hold them: the non-image files beside the scans (manifests, DICOMDIR, sidecars,
READMEs) are left out by a default ignore list, `--exclude GLOB` leaves out more, `--no-default-ignore` reads
everything; the globs match files, never a folder's name unless they end in `/`; every file left out is a row
`ignored` in the report; the project's own `make-phantoms` output passes the gate."""

import csv
import json
import shutil
from pathlib import Path

import pydicom
import pytest
from processes import cdm
from test_score import invoke

from cdm_ood.data import NotAnImageError, discover
from cdm_ood.data.errors import EmptyFolderError
from cdm_ood.data.walk import DEFAULT_IGNORE
from cdm_ood.model.checkpoint import load_checkpoint

# Files that sit beside scans in real archives, none of them an image.
SIDECARS = {
    "DICOMDIR": Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "DICOMDIR",
    "README": b"Study export\n",
    "series.json": b'{"Modality": "CT"}\n',
    "notes.TXT": b"reading room notes\n",
    ".DS_Store": b"\x00\x00\x00\x01Bud1" + bytes(64),
    "._slice_000.dcm": b"\x00\x05\x16\x07\x00\x02\x00\x00" + bytes(64),  # macOS AppleDouble resource fork
    "Thumbs.db": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(64),
}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """`cdm-ood make-phantoms` output: two 16x16 CT series of 4 slices and manifest.csv (seed 1: volumes the
    tiny test model keeps clearly below its threshold)."""
    root = tmp_path_factory.mktemp("phantoms")
    made = cdm("make-phantoms", "--out-dir", root / "out", "--n", 2, "--format", "dicom", "--size", 16, "--slices",
               4, "--seed", 1, cwd=root)  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    assert (root / "out" / "manifest.csv").exists()
    return root / "out"


def report_rows(report: Path) -> dict[str, dict]:
    with open(report, newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f) if row["level"] in ("slice", "file")}


@pytest.mark.slow
def test_make_phantoms_output_passes_the_gate(checkpoint, phantoms, tmp_path):
    # what is under test is which files are read: the tiny model's verdicts on new volumes are not (threshold 1e12)
    out = cdm("score", phantoms, "--checkpoint", checkpoint, "--threshold", "1e12", "--out", tmp_path / "r.csv",
              cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    rows = report_rows(tmp_path / "r.csv")
    manifest = rows.pop(str(phantoms / "manifest.csv"))
    assert manifest["verdict"] == "ignored" and "'*.csv'" in manifest["reason"], "what was not read is a row"
    assert len(rows) == 8 and all(row["level"] == "slice" for row in rows.values()), "the 8 slices, nothing else"
    assert json.loads(out.stdout)["file_ignored"] == 1, "and a count in the summary"
    assert "manifest.csv" in out.stderr and "ignored by name" in out.stderr, "the ignored files are logged"
    everything = invoke("score", phantoms, "--checkpoint", checkpoint, "--out", tmp_path / "all.csv",
                        "--no-default-ignore")  # fmt: skip
    assert everything.exit_code == 1
    manifest = report_rows(tmp_path / "all.csv")[str(phantoms / "manifest.csv")]
    assert manifest["verdict"] == "unreadable" and manifest["reason"].startswith("NotAnImageError")


def test_files_beside_scans_are_ignored_and_read_when_asked(phantoms, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(phantoms, folder)
    for name, content in SIDECARS.items():
        target = folder / "phantom_0000" / name
        target.write_bytes(content.read_bytes() if isinstance(content, Path) else content)
    errors = []
    sources = discover(folder, on_error=errors.append)
    assert not errors and len(sources) == 8
    everything = []
    assert len(discover(folder, on_error=everything.append, ignore=())) == 8
    reasons = {Path(e.path).name: e for e in everything}
    assert set(reasons) == {"manifest.csv", *SIDECARS}
    assert all(isinstance(e, NotAnImageError) for e in everything), [e.reason for e in everything]
    assert "DICOMDIR" in reasons["DICOMDIR"].reason and "text file" in reasons["README"].reason


def test_exclude_globs_match_names_and_paths_and_never_a_file_named_on_its_own(phantoms, tmp_path):
    def volumes(*globs: str) -> set[str]:
        return {Path(s.path).parent.name for s in discover(phantoms, ignore=(*DEFAULT_IGNORE, *globs))}

    assert volumes() == {"phantom_0000", "phantom_0001"}
    assert volumes("PHANTOM_0001/") == volumes("*/phantom_0001/*") == {"phantom_0000"}
    assert volumes("PHANTOM_0001") == {"phantom_0000", "phantom_0001"}, "a glob without / names no folder"
    assert volumes("slice_00[0-2].dcm") == {"phantom_0000", "phantom_0001"}
    assert len(discover(phantoms, ignore=(*DEFAULT_IGNORE, "slice_00[0-2].dcm"))) == 2
    with pytest.raises(NotAnImageError, match="text file"):
        discover(phantoms / "manifest.csv")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "index.csv").write_text("path\n")
    with pytest.raises(EmptyFolderError, match=r"only 1 files ignored by name, e\.g\. index\.csv"):
        discover(tmp_path / "only")


@pytest.mark.slow
def test_folders_named_like_ignore_globs_are_scored_and_every_ignored_file_is_a_row(checkpoint, scans, tmp_path):
    spiked = scans / "spiked.nii.gz"
    folder = tmp_path / "incoming"
    for name in ("readme_CT", "Series.XML", "dicomdir"):
        (folder / name).mkdir(parents=True)
        shutil.copy(spiked, folder / name / "scan.nii.gz")
    (folder / "masks").mkdir()
    shutil.copy(spiked, folder / "masks" / "case_mask.nii.gz")
    (folder / "README").write_text("export notes\n")
    (folder / "derived").mkdir()
    shutil.copy(spiked, folder / "derived" / "scan.nii.gz")
    out = cdm("score", folder, "--checkpoint", checkpoint, "--exclude", "derived/", "--out", tmp_path / "r.csv",
              cwd=tmp_path)  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    rows = report_rows(tmp_path / "r.csv")
    for name in ("readme_CT", "Series.XML", "dicomdir"):
        scored = [r for p, r in rows.items() if p == str(folder / name / "scan.nii.gz")]
        assert scored and scored[0]["level"] == "slice", f"{name}/ is a series folder, not a sidecar"
    ignored = {Path(p).relative_to(folder).as_posix(): r["reason"] for p, r in rows.items() if r["level"] == "file"}
    assert ignored == {
        "README": "not read: matches the ignore pattern 'README*'",
        "masks/case_mask.nii.gz": "not read: matches the ignore pattern '*/masks/*_mask.nii.gz'",
        "derived/scan.nii.gz": "not read: matches the ignore pattern 'derived/'",
    }
    assert json.loads(out.stdout)["file_ignored"] == 3


@pytest.mark.slow
def test_calibrate_and_evaluate_take_exclude(checkpoint, phantoms, scans, tmp_path):
    def fitted_on(*options) -> int:
        copy = tmp_path / "model.pt"
        copy.write_bytes(checkpoint.read_bytes())
        out = invoke("calibrate", phantoms, "--checkpoint", copy, *options)
        assert out.exit_code == 0, out.output
        return load_checkpoint(copy)["calibration"]["n_fit"]

    assert fitted_on("--exclude", "phantom_0001/") * 2 == fitted_on(), "one of the two series, manifest ignored"
    out = invoke("evaluate", phantoms, "--checkpoint", checkpoint, "--exclude", "*/phantom_0000/*",
                 "--ood", f"spike={scans / 'spiked.nii.gz'}", "--out-dir", tmp_path / "eval")  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "manifest.csv" not in out.output, "not even reported as skipped"
    rows = csv.DictReader((tmp_path / "eval" / "metrics.csv").read_text().splitlines())
    assert {row["n_id"] for row in rows} == {"4"}


def test_the_documented_ignore_list_is_the_default_one():
    docs = (Path(__file__).parent.parent / "docs" / "data.md").read_text()
    listed = docs.split("(`cdm_ood.data.walk.DEFAULT_IGNORE`):", 1)[1].split("\n\n")[1]
    assert listed.split() == [f"`{glob}`" for glob in DEFAULT_IGNORE]
