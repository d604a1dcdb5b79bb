"""Folders as clinical archives hold them: the non-image files beside the scans (manifests, DICOMDIR, sidecars,
READMEs) are left out by a default ignore list, `--exclude GLOB` leaves out more, `--no-default-ignore` reads
everything; the globs match files, never a folder's name unless they end in `/`; every file left out is a row
`ignored` in the report; the project's own `make-phantoms` output passes the gate."""

import csv
import gzip
import json
import shutil
from pathlib import Path
from typing import ClassVar, Optional

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_factory import ct_dataset, write
from processes import cdm
from test_score import invoke

from cdm_ood.data import NotAnImageError, discover
from cdm_ood.data.discovery import detect_format, detect_reader, voxel_file
from cdm_ood.data.errors import DataError, EmptyFolderError, UnreadableFileError, UnsupportedFormatError
from cdm_ood.data.formats import READERS, FormatReader, register_reader
from cdm_ood.data.records import SourceFile
from cdm_ood.data.volume_files import write_nifti
from cdm_ood.data.walk import DEFAULT_IGNORE, IgnoredFile
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


TITLES = "DICOM, NIfTI, NRRD, MetaImage, PNG or JPEG"


def slice_file(path: Path, z: float, series_uid: str, sop_uid: Optional[str] = None) -> Path:
    ds = ct_dataset(np.zeros((4, 4), np.int16), series_uid=series_uid, z=z)
    if sop_uid:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    return write(ds, path)


def test_each_file_found_gets_its_reader_or_one_exact_reason(tmp_path):
    """Content decides the format; known non-image formats are named by signature or suffix (also gzipped); a
    header's voxel file shares its header's outcome; single-frame DICOM files are ranked along the slice normal."""
    folder = tmp_path / "in"
    folder.mkdir()
    junk = b"\x01\x02\x03\xfe"
    files = {
        "empty.bin": b"",
        "notes.dat": b"plain text\n",
        "long.dat": b"a" * 1024 + b"\x00",  # text in the first 1024 bytes: all that is looked at
        "nul.bin": b"abc\x00def",
        "nul.img": b"abc\x00def",  # no nul.hdr: only a header's voxel file shares its outcome
        "latin1.bin": b"caf\xe9 au lait",
        "blob": junk,
        "scan.tif": b"II*\x00" + bytes(16),
        "scan.REC": junk,
        "vol.mgz": gzip.compress(junk),
        "vol.MGH.gz": gzip.compress(junk),
        "junk.gz": gzip.compress(junk),
        "cut.gz": gzip.compress(junk * 64)[:20],
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    dicom = slice_file(tmp_path / "plain.dcm", 0.0, "1.2.3")
    (folder / "slice.dcm.gz").write_bytes(gzip.compress(dicom.read_bytes()))
    nib.AnalyzeImage(np.zeros((2, 2, 2), np.int16), np.eye(4)).to_filename(folder / "analyze.hdr")
    nib.Nifti1Pair(np.zeros((2, 2, 2), np.int16), np.eye(4)).to_filename(folder / "pair.hdr")
    write_nifti(np.random.default_rng(0).random((4, 64, 64)), folder / "good.nii.gz")  # 64 KiB, incompressible
    crc = bytearray((folder / "good.nii.gz").read_bytes())
    crc[-8:-4] = bytes(4)  # a wrong CRC: the header is read, the stream's end is never reached
    (folder / "badcrc.nii.gz").write_bytes(bytes(crc))
    crc = bytearray(gzip.compress(nib.Nifti1Image(np.zeros((672, 1, 1), np.uint8), np.eye(4)).to_bytes()))
    crc[-8:-4] = bytes(4)  # 1024 bytes inflated, a wrong CRC: reading one byte more would reach the check
    (folder / "crc1024.nii.gz").write_bytes(bytes(crc))
    for name, z in (("s_a.dcm", 2.0), ("s_b.dcm", 1.0), ("s_c.dcm", 0.0)):
        slice_file(folder / "series" / name, z, "1.2.3.4", "1.2.9" if name != "s_c.dcm" else "1.2.8")
    errors = []
    sources = discover(folder, errors.append)
    reasons = {Path(e.path).relative_to(folder).as_posix(): (type(e), e.reason) for e in errors}
    analyze = "Analyze 7.5 header without NIfTI magic (orientation is ambiguous); convert it to NIfTI"
    assert reasons == {
        "empty.bin": (UnreadableFileError, "empty file"),
        "notes.dat": (NotAnImageError, "text file, not an image"),
        "long.dat": (NotAnImageError, "text file, not an image"),
        "nul.bin": (NotAnImageError, f"unrecognised content: not {TITLES}"),
        "nul.img": (NotAnImageError, f"unrecognised content: not {TITLES}"),
        "latin1.bin": (NotAnImageError, f"unrecognised content: not {TITLES}"),
        "blob": (NotAnImageError, f"unrecognised content: not {TITLES}"),
        "scan.tif": (UnsupportedFormatError, "TIFF images are not supported; convert to PNG"),
        "scan.REC": (
            UnsupportedFormatError,
            "Philips REC pixel file is not supported; convert the PAR/REC pair to NIfTI",
        ),
        "vol.mgz": (UnsupportedFormatError, "FreeSurfer MGZ volume is not supported; convert it to NIfTI"),
        "vol.MGH.gz": (UnsupportedFormatError, "FreeSurfer MGH volume is not supported; convert it to NIfTI"),
        "junk.gz": (NotAnImageError, "gzip-compressed file that holds no NIfTI volume"),
        "cut.gz": (
            UnreadableFileError,
            "corrupt gzip stream: Compressed file ended before the end-of-stream marker was reached",
        ),
        "slice.dcm.gz": (UnsupportedFormatError, "gzip-compressed DICOM; decompress it first"),
        "analyze.hdr": (UnsupportedFormatError, analyze),
        "analyze.img": (UnsupportedFormatError, f"voxel file of analyze.hdr: {analyze}"),
    }
    assert [e.path for e in errors] == sorted(str(folder / name) for name in reasons)
    uids = {name: "1.2.9" if name != "s_c.dcm" else "1.2.8" for name in ("s_a.dcm", "s_b.dcm", "s_c.dcm")}
    duplicate = ("duplicate SOPInstanceUID: 3 files of the series hold 2 SOPInstanceUIDs",)
    assert [s for s in sources if s.format == "dicom"] == [
        SourceFile(str(folder / "series" / name), "dicom", "1.2.3.4", rank, uids[name], flags=flags)
        for rank, (name, flags) in enumerate([("s_c.dcm", ()), ("s_b.dcm", duplicate), ("s_a.dcm", duplicate)])
    ]
    assert [(Path(s.path).name, s.format, s.companions) for s in sources if s.format != "dicom"] == [
        ("badcrc.nii.gz", "nifti", ()),
        ("crc1024.nii.gz", "nifti", ()),
        ("good.nii.gz", "nifti", ()),
        ("pair.hdr", "nifti", (str(folder / "pair.img"),)),
    ]


def test_a_voxel_file_named_alone_points_to_its_header_and_unopenable_paths_are_named(tmp_path):
    nib.Nifti1Pair(np.zeros((2, 2, 2), np.int16), np.eye(4)).to_filename(tmp_path / "pair.hdr")
    (tmp_path / "pair.img").rename(tmp_path / "pair.IMG")
    (tmp_path / "vol.mhd").write_text("NDims = 3\nElementDataFile = vol.zraw\n")
    (tmp_path / "vol.zraw").write_bytes(b"\x01\xfe")
    (tmp_path / "bare.dcm").write_bytes(slice_file(tmp_path / "full.dcm", 0.0, "1.2.3").read_bytes()[132:])
    outcomes = {}
    for name in ("pair.IMG", "vol.zraw", "missing.nii", "pair.hdr", "vol.mhd", "bare.dcm"):
        try:
            outcomes[name] = detect_format(tmp_path / name)
        except DataError as err:
            assert err.path == str(tmp_path / name)
            outcomes[name] = (type(err), err.reason)
    assert outcomes == {
        "pair.IMG": (NotAnImageError, "raw voxel data of the header pair.hdr; read the header"),
        "vol.zraw": (NotAnImageError, "raw voxel data of the header vol.mhd; read the header"),
        "missing.nii": (UnreadableFileError, "cannot open file: No such file or directory"),
        "pair.hdr": "nifti",
        "vol.mhd": "itk",
        "bare.dcm": "dicom",  # no preamble: recognised by its first elements
    }
    assert voxel_file(tmp_path / "pair.hdr") == tmp_path / "pair.img"
    assert voxel_file(tmp_path / "vol.mhd") == tmp_path / "vol.zraw"


def test_discover_takes_one_path_or_several_and_reports_every_file_it_leaves_out(tmp_path):
    folder = tmp_path / "in"
    write_nifti(np.zeros((2, 4, 4)), folder / "good.nii.gz")
    write_nifti(np.zeros((2, 4, 4)), folder / "mine.nii.gz")
    (folder / "index.csv").write_text("path\n")
    (folder / "notes.dat").write_text("notes\n")
    (tmp_path / "empty").mkdir()
    errors, ignored, progress = [], [], []

    def factory(total: int, phase: str):
        progress.append((total, phase))
        return progress.append

    sources = discover(str(folder), errors.append, exclude=lambda p: p.name == "mine.nii.gz", progress=factory,
                       on_ignored=ignored.append)  # fmt: skip
    assert [s.path for s in sources] == [str(folder / "good.nii.gz")]
    assert [(e.path, e.reason) for e in errors] == [(str(folder / "notes.dat"), "text file, not an image")]
    assert ignored == [IgnoredFile(str(folder / "index.csv"), "*.csv")]
    assert progress == [(2, "reading headers"), 1, 1]
    errors.clear()
    given = [tmp_path / "gone.nii.gz", folder / "index.csv", tmp_path / "empty", folder / "good.nii.gz"]
    sources = discover(given, errors.append, ignore=())
    assert [s.path for s in sources] == [str(folder / "good.nii.gz")]
    assert [(type(e), e.path, e.reason) for e in errors] == [
        (EmptyFolderError, str(tmp_path / "empty"), "the folder holds no files: nothing to score"),
        (UnreadableFileError, str(tmp_path / "gone.nii.gz"), "no such file or folder"),
        (NotAnImageError, str(folder / "index.csv"), "text file, not an image"),
    ]


class ProbeReader(FormatReader):
    """A registered reader of files named probe*: it records what each detection stage is given."""

    name, title, gzip = "probe", "Probe", True
    calls: ClassVar[list[tuple[str, str, bytes]]] = []

    def detect(self, path: Path, head: bytes) -> bool:
        return self.record("detect", path, head)

    def detect_gzipped(self, path: Path, inner: bytes) -> bool:
        return self.record("detect_gzipped", path, inner) or path.name.startswith("probe")

    def detect_text(self, path: Path, head: bytes) -> bool:
        return self.record("detect_text", path, head)

    def detect_bare(self, path: Path, head: bytes) -> bool:
        return self.record("detect_bare", path, head) or path.name.startswith("probe")

    def record(self, stage: str, path: Path, data: bytes) -> bool:
        self.calls.append((stage, path.name, data[:4]))
        return False

    def source(self, path: Path, max_voxels: int) -> SourceFile:
        return SourceFile(str(path), self.name, str(path))

    def slices(self, source: SourceFile) -> list:
        return []


def test_a_registered_reader_is_asked_in_each_stage_with_the_path_and_content(tmp_path):
    (tmp_path / "probe.bin").write_bytes(b"\x01\x02\x03\x04\xfe")
    (tmp_path / "probe.bin.gz").write_bytes(gzip.compress(b"\x05\x06\x07\x08"))
    (tmp_path / "other.gz").write_bytes(gzip.compress(b"\x05\x06\x07\x08"))
    (tmp_path / "other.bin").write_bytes(b"\x01\xfe")
    register_reader(ProbeReader)
    try:
        assert detect_format(tmp_path / "probe.bin") == "probe"
        assert detect_format(tmp_path / "probe.bin.gz") == "probe"
        assert ProbeReader.calls == [
            ("detect", "probe.bin", b"\x01\x02\x03\x04"),
            ("detect_text", "probe.bin", b"\x01\x02\x03\x04"),
            ("detect_bare", "probe.bin", b"\x01\x02\x03\x04"),
            ("detect", "probe.bin.gz", b"\x1f\x8b\x08\x00"),
            ("detect_gzipped", "probe.bin.gz", b"\x05\x06\x07\x08"),
        ]
        with pytest.raises(NotAnImageError) as gzipped:
            detect_reader(tmp_path / "other.gz")
        with pytest.raises(NotAnImageError) as unknown:
            detect_reader(tmp_path / "other.bin")
    finally:
        READERS.pop("probe")
        ProbeReader.calls.clear()
    assert gzipped.value.reason == "gzip-compressed file that holds no NIfTI or Probe volume"
    assert unknown.value.reason == f"unrecognised content: not {TITLES}, Probe"
