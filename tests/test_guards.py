"""What the readers refuse before decoding: bombs, FIFOs and devices, header text in reasons; folders as they
come (symlinked, looping, empty); library noise; a file that runs out of memory. Real files and processes."""

import json
import os
import pickle
import resource
import socket
import threading
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from bomb_factory import deflated_dicom_bomb, gzip_nifti_bomb, png_bomb
from dicom_factory import ct_dataset, write
from processes import cdm
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from cdm_ood.data.discovery import discover
from cdm_ood.data.errors import (
    EmptyFolderError,
    NotAnImageError,
    TooLargeError,
    UnreadableFileError,
    UnsupportedFormatError,
)
from cdm_ood.data.guards import (
    BYTES_PER_VOXEL,
    MAX_VOXELS,
    redact,
    require_budget,
    require_deflated_budget,
    require_regular_file,
)
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.readers import iter_slices
from cdm_ood.data.volume_files import write_dicom_series, write_nifti

SECRET = "SMITH^JOHN"


def collect(paths, **kwargs):
    errors = []
    return discover(paths, errors.append, **kwargs), {Path(e.path).name: e for e in errors}


def test_bombs_are_refused_from_their_headers_and_the_clean_series_beside_them_is_read(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    gzip_nifti_bomb(folder / "cube.nii.gz", (1024, 1024, 1024))  # ~1 MB -> 1 GiB
    gzip_nifti_bomb(folder / "slab.nii.gz", (2048, 2048, 1024))  # ~4 MB -> 4 GiB
    deflated_dicom_bomb(folder / "wide.dcm", 65535, 65535)  # ~4 MB -> 4 GiB, deflated dataset
    deflated_dicom_bomb(folder / "big16.dcm", 16384, 16384, bits=16)  # ~0.3 MB -> 512 MiB
    png_bomb(folder / "huge.png", 13000, 13000)  # ~0.2 MB -> 169 MB
    write_dicom_series(
        phantom_volume(np.random.default_rng(0), size=16, slices=3), folder / "ok", modality="ct", volume_index=0
    )
    assert sum(p.stat().st_size for p in folder.glob("*.*")) < 12e6
    sources, errors = collect(folder)
    assert len(sources) == 3 and all(s.path.startswith(str(folder / "ok")) for s in sources)
    assert set(errors) == {"cube.nii.gz", "slab.nii.gz", "wide.dcm", "big16.dcm", "huge.png"}
    assert all(isinstance(e, TooLargeError) and "refused without decoding" in e.reason for e in errors.values())
    assert "1024x1024x1024" in errors["cube.nii.gz"].reason and "--max-voxels" in errors["huge.png"].reason
    assert "deflated DICOM dataset inflates beyond" in errors["wide.dcm"].reason
    _, raised = collect(folder / "huge.png", max_voxels=13000 * 13000)  # the budget is the caller's to raise
    assert raised == {} and MAX_VOXELS == 512**3  # the default the --max-voxels help text names
    _, small = collect(folder / "ok", max_voxels=100)
    assert all(isinstance(e, TooLargeError) and "(1x16x16x1)" in e.reason for e in small.values())


def test_a_deflated_dicom_at_exactly_its_byte_budget_is_read_and_one_voxel_more_is_refused(tmp_path):
    """The budget is inclusive: a dataset that inflates to exactly max_voxels * BYTES_PER_VOXEL bytes passes."""
    for cols in range(64, 64 + BYTES_PER_VOXEL):
        path = deflated_dicom_bomb(tmp_path / f"c{cols}.dcm", 64, cols)
        data = path.read_bytes()
        meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")  # the meta group's length element, then it
        inflated = len(zlib.decompressobj(-zlib.MAX_WBITS).decompress(data[meta_end:]))
        if inflated % BYTES_PER_VOXEL == 0:
            break
    voxels = inflated // BYTES_PER_VOXEL
    require_deflated_budget(path, voxels)
    with pytest.raises(TooLargeError, match="inflates beyond"):
        require_deflated_budget(path, voxels - 1)


def test_fifos_devices_and_sockets_are_never_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.dcm")
    (tmp_path / "zero.dcm").symlink_to("/dev/zero")  # a character device behind a symlink
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "sock.nii"))
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=collect(tmp_path)), daemon=True)
    worker.start()
    worker.join(timeout=30)
    listener.close()
    assert not worker.is_alive(), "discovery blocked on a special file"
    sources, errors = result["out"]
    assert sources == [] and set(errors) == {"pipe.dcm", "zero.dcm", "sock.nii"}
    assert all(isinstance(e, NotAnImageError) and "not a regular file: never opened" in e.reason
               for e in errors.values())  # fmt: skip
    assert errors["pipe.dcm"].reason.startswith("a FIFO") and "character device" in errors["zero.dcm"].reason


def test_symlinked_folders_are_followed_once_and_loops_end(tmp_path):
    real = tmp_path / "elsewhere" / "series"
    write_nifti(phantom_volume(np.random.default_rng(1), size=16, slices=2), real / "a.nii.gz")
    scanned = tmp_path / "scanned"
    (scanned / "sub").mkdir(parents=True)
    write_nifti(phantom_volume(np.random.default_rng(2), size=16, slices=2), scanned / "sub" / "b.nii.gz")
    (scanned / "linked").symlink_to(real, target_is_directory=True)
    (scanned / "sub" / "loop").symlink_to(scanned, target_is_directory=True)  # a cycle back to the top
    sources, errors = collect(scanned)
    assert errors == {}
    assert sorted(Path(s.path).name for s in sources) == ["a.nii.gz", "b.nii.gz"]
    assert str(scanned / "linked" / "a.nii.gz") in {s.path for s in sources}


def test_an_empty_folder_is_reported_not_passed(tmp_path):
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    sources, errors = collect(tmp_path / "empty")
    assert sources == [] and "holds no files: nothing to score" in errors["empty"].reason


def dicom_with_raw(path: Path, tag: int, vr: str, value: bytes) -> Path:
    ds = ct_dataset(np.arange(64, dtype=np.int16).reshape(8, 8))
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    return write(ds, path)


@pytest.mark.slow
def test_reasons_warnings_and_tracking_never_copy_header_text(checkpoint, tmp_path):
    folder = tmp_path / "in"
    dicom_with_raw(folder / "frames.dcm", 0x00280008, "IS", SECRET.encode())  # malformed NumberOfFrames
    out = cdm("score", folder, "--checkpoint", checkpoint, "--out", tmp_path / "r.json", "--mlflow", cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-2000:]
    rows = {Path(r["path"]).name: r for r in json.loads((tmp_path / "r.json").read_text())["rows"]}
    assert (
        rows["frames.dcm"]["reason"]
        == "UnreadableFileError: malformed DICOM header: NumberOfFrames is not a whole number"
    )
    written = [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file() and p.parent != folder]
    assert any(p.name == "mlflow.db" for p in tmp_path.rglob("*"))
    for text in [out.stdout, out.stderr, *written]:
        assert SECRET not in text


@pytest.mark.slow
def test_library_logs_and_tracebacks_stay_out_of_the_terminal(checkpoint, tmp_path):
    corpora = [Path(pydicom.__file__).parent / "data" / "test_files", Path(nib.__file__).parent / "tests" / "data"]
    out = cdm("score", *corpora, "--checkpoint", checkpoint, "--out", tmp_path / "r.json", cwd=tmp_path)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and " ERROR " not in out.stderr and "qfac" not in out.stderr
    rows = {Path(r["path"]).name: r for r in json.loads((tmp_path / "r.json").read_text())["rows"]}
    assert "misplaced marker segment" in rows["JPEG-lossy.dcm"]["reason"]  # the library's message, in the reason
    assert "failed to read the header" in rows["JPEG2000-embedded-sequence-delimiter.dcm"]["reason"]


@pytest.mark.slow
def test_a_file_that_runs_out_of_memory_fails_alone(checkpoint, tmp_path):
    folder = tmp_path / "in"
    write_nifti(phantom_volume(np.random.default_rng(3), size=16, slices=2), folder / "clean.nii.gz")
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float64)
    header.set_data_shape((1024, 1024, 1024))  # 8 GiB of voxels, in a sparse file that takes no disk
    with open(folder / "huge.nii", "wb") as f:
        f.write(header.binaryblock + b"\x00" * 4)
        f.truncate(352 + 8 * 1024**3)
    limit = 4 * 2**30  # the process may map 4 GiB: enough for Python, torch and the model, not for the volume

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    out = cdm("score", folder, "--checkpoint", checkpoint, "--out", tmp_path / "r.json", "--max-voxels", 2**31,
              cwd=tmp_path, preexec_fn=cap)  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    (huge,) = [r for r in rows if r["path"].endswith("huge.nii")]
    assert huge["verdict"] == "unreadable" and "out of memory" in huge["reason"]
    assert {r["verdict"] for r in rows if r["path"].endswith("clean.nii.gz")} <= {"in", "ood"}


@pytest.mark.parametrize("name", ["a\udcff.nii.gz", "b\udce9\udc80.nii.gz"])
def test_file_names_that_are_not_utf8_reach_the_report(checkpoint, tmp_path, name):
    from test_score import invoke

    folder = tmp_path / "in"
    write_nifti(phantom_volume(np.random.default_rng(4), size=16, slices=2), folder / name)
    assert os.fsencode(name) in os.listdir(os.fsencode(folder))
    for report in ("r.csv", "r.json"):
        out = invoke("score", folder, "--checkpoint", checkpoint, "--out", tmp_path / report, "--threshold", "1e12")
        assert out.exit_code == 0, out.output
    assert os.fsencode(str(folder / name)) in (tmp_path / "r.csv").read_bytes()
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert {r["path"] for r in rows if r["level"] == "slice"} == {str(folder / name)}
    assert [s.source.path for s in iter_slices(folder)] == [str(folder / name)] * 2


def test_unreadable_files_keep_a_reason_without_raising(tmp_path):
    (tmp_path / "gone.dcm").symlink_to(tmp_path / "missing.dcm")
    _, errors = collect(tmp_path)
    assert isinstance(errors["gone.dcm"], UnreadableFileError)


@pytest.mark.parametrize("error", [UnreadableFileError, EmptyFolderError, UnsupportedFormatError, NotAnImageError,
                                   TooLargeError])  # fmt: skip
def test_file_errors_cross_process_boundaries(error):
    """DataLoader workers (`cdm-ood score --workers`) send these to the scoring process pickled."""
    back = pickle.loads(pickle.dumps(error("/scans/a.dcm", "cannot open file: denied")))
    assert type(back) is error and (back.path, back.reason, str(back)) == (
        "/scans/a.dcm",
        "cannot open file: denied",
        "/scans/a.dcm: cannot open file: denied",
    )


def test_special_files_and_folders_are_named_exactly_and_regular_files_pass(tmp_path):
    """`require_regular_file` names what the path is (a folder matches no special kind: the fallback name)."""
    (tmp_path / "scan.dcm").write_bytes(b"data")
    os.mkfifo(tmp_path / "pipe")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "sock"))
    refused = {}
    try:
        for name in ("pipe", "sock", "folder", "missing"):
            path = tmp_path / name if name != "folder" else tmp_path
            with pytest.raises((NotAnImageError, UnreadableFileError)) as caught:
                require_regular_file(path)
            assert caught.value.path == str(path)
            refused[name] = (type(caught.value), caught.value.reason)
        with pytest.raises(NotAnImageError) as device:
            require_regular_file(Path("/dev/null"))
    finally:
        listener.close()
    assert require_regular_file(tmp_path / "scan.dcm") is None
    assert device.value.reason == "a character device, not a regular file: never opened"
    assert refused == {
        "pipe": (NotAnImageError, "a FIFO, not a regular file: never opened"),
        "sock": (NotAnImageError, "a socket, not a regular file: never opened"),
        "folder": (NotAnImageError, "not a regular file, not a regular file: never opened"),
        "missing": (UnreadableFileError, "cannot open file: No such file or directory"),
    }


def test_the_voxel_budget_is_inclusive_and_its_reason_names_shape_and_budget(tmp_path):
    path = tmp_path / "scan.nii"
    require_budget(path, (1000, 1001), 1_001_000)
    with pytest.raises(TooLargeError) as caught:
        require_budget(path, (1000, 1001), 1_000_999)
    assert (caught.value.path, caught.value.reason) == (
        str(path),
        "declares 1,001,000 voxels (1000x1001), above the budget of 1,000,999 (--max-voxels): refused without decoding",
    )


def test_a_deflated_dicom_is_inflated_chunk_by_chunk_to_its_whole_size(tmp_path):
    """2048 x 2048 8-bit zeros inflate over several 1 MiB steps: the budget counts them all, not the last one."""
    path = deflated_dicom_bomb(tmp_path / "wide.dcm", 2048, 2048)
    require_deflated_budget(path, 2048 * 2048 // BYTES_PER_VOXEL + 1024)
    budget = 2048 * 2048 // BYTES_PER_VOXEL // 2  # half the pixels' bytes: past after the third step
    with pytest.raises(TooLargeError) as caught:
        require_deflated_budget(path, budget)
    assert (caught.value.path, caught.value.reason) == (
        str(path),
        "deflated DICOM dataset inflates beyond 2,097,152 bytes (the budget of 524,288 voxels, --max-voxels): "
        "refused without decoding",
    )


def test_a_deflated_dicom_without_its_optional_meta_group_length_is_inflated_from_where_its_data_set_starts(tmp_path):
    """FileMetaInformationGroupLength is optional in practice (pydicom reads such files): the data set starts after
    the last element of group 0002, found by walking the meta group, not from that length."""
    path = deflated_dicom_bomb(tmp_path / "nolength.dcm", 64, 64)
    data = path.read_bytes()
    assert data[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) UL, 12 bytes
    path.write_bytes(data[:132] + data[144:])
    assert pydicom.dcmread(path).Rows == 64
    require_deflated_budget(path, 64 * 64)
    with pytest.raises(TooLargeError, match="inflates beyond"):
        require_deflated_budget(path, 64)


def test_a_corrupt_deflate_stream_is_unreadable_and_other_transfer_syntaxes_are_not_inflated(tmp_path):
    path = deflated_dicom_bomb(tmp_path / "bad.dcm", 64, 64)
    data = path.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    path.write_bytes(data[:meta_end] + b"\xff" * 64)  # an invalid deflate block type
    with pytest.raises(UnreadableFileError) as caught:
        require_deflated_budget(path, MAX_VOXELS)
    assert (caught.value.path, caught.value.reason) == (str(path), "corrupt deflated DICOM dataset")
    plain = write(ct_dataset(np.zeros((64, 64), np.int16)), tmp_path / "plain.dcm")  # Explicit VR Little Endian
    require_deflated_budget(plain, 1)
    require_deflated_budget(tmp_path / "missing.dcm", 1)  # no meta header: left to the header pass


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        (
            ValueError("invalid literal for int() with base 10: 'SMITH^JOHN'"),
            "invalid literal for int() with base 10: '…'",
        ),
        (ValueError("cannot convert \"SMITH JOHN\" and 'x'"), "cannot convert '…' and '…'"),
        (ValueError("two\n  lines\tand tabs "), "two lines and tabs"),
        (AttributeError("'Dataset' object has no attribute 'Rows'"), "'Dataset' object has no attribute 'Rows'"),
        (ImportError("no decoder for 'JPEG 2000'"), "no decoder for 'JPEG 2000'"),
        (NotImplementedError("'RLE' pixel data"), "'RLE' pixel data"),
        (ValueError(""), "ValueError"),
        (KeyError(), "KeyError"),
        (ValueError("x" * 400), "x" * 300),
    ],
)
def test_library_messages_become_one_redacted_line_of_at_most_300_characters(err, reason):
    assert redact(err) == reason
