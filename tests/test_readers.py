import gzip
import hashlib
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_factory import BIRTH_DATE, PATIENT_ID, PATIENT_NAME, ct_dataset, write, write_jpeg_ls_claim
from PIL import Image
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGLSLossless

from cdm_ood.data import (
    FLAG_CONSTANT,
    FLAG_NONFINITE,
    DataError,
    NotAnImageError,
    UnreadableFileError,
    UnsupportedFormatError,
    iter_slices,
    read_file,
)

RNG = np.random.default_rng(0)


def hashes(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def collect(root, **options):
    errors: list[DataError] = []
    slices = list(iter_slices(root, on_error=errors.append, **options))
    return slices, errors


# DICOM -----------------------------------------------------------------------------------------------------------


def test_single_dicom_slice_in_hounsfield_units_with_provenance(tmp_path):
    stored = RNG.integers(0, 2000, (12, 16)).astype(np.int16)
    ds = ct_dataset(stored, intercept=-1024)
    (s,) = read_file(write(ds, tmp_path / "a.dcm"))
    assert s.image.dtype == np.float32 and s.image.shape == (1, 12, 16)
    np.testing.assert_array_equal(s.image[0], stored - 1024.0)
    assert s.source.volume_id == ds.SeriesInstanceUID and s.source.sop_instance_uid == ds.SOPInstanceUID
    assert (s.source.path, s.source.index, s.source.frame) == (str(tmp_path / "a.dcm"), 0, None)
    assert s.flags == ()


def test_series_is_grouped_and_sorted_by_position_not_by_file_name(tmp_path):
    series_a, series_b = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    z_order = [3, 0, 2, 1]
    for name, z in zip("wxyz", z_order, strict=True):
        # InstanceNumber disagrees with the position on purpose: position wins.
        write(ct_dataset(np.full((4, 4), z, np.int16), series_uid=series_a, z=10.0 * z, instance=9 - z),
              tmp_path / "study" / f"{name}.dcm")  # fmt: skip
    write(ct_dataset(np.full((4, 4), 7, np.int16), series_uid=series_b), tmp_path / "study" / "other.dcm")
    slices, errors = collect(tmp_path / "study")
    assert errors == []
    a = [s for s in slices if s.source.volume_id == series_a]
    assert [s.source.index for s in a] == [0, 1, 2, 3]
    assert [float(s.image[0, 0, 0]) + 1024 for s in a] == [0, 1, 2, 3]
    assert [s.source.volume_id for s in slices].count(series_b) == 1


def test_multiframe_dicom_gives_one_slice_per_frame(tmp_path):
    frames = RNG.integers(0, 100, (5, 6, 8)).astype(np.int16)
    slices = read_file(write(ct_dataset(frames, intercept=0), tmp_path / "mf.dcm"))
    assert [s.source.frame for s in slices] == list(range(5)) == [s.source.index for s in slices]
    np.testing.assert_array_equal(np.stack([s.image[0] for s in slices]), frames)


def test_rgb_dicom_is_channel_first(tmp_path):
    rgb = RNG.integers(0, 255, (6, 7, 3)).astype(np.uint8)
    (s,) = read_file(write(ct_dataset(rgb), tmp_path / "rgb.dcm"))
    np.testing.assert_array_equal(s.image, rgb.transpose(2, 0, 1))


def test_compressed_dicom_that_a_handler_decodes_is_read(tmp_path):
    stored = RNG.integers(0, 3000, (10, 10)).astype(np.int16)
    (s,) = read_file(write(ct_dataset(stored, intercept=0), tmp_path / "rle.dcm", compress_rle=True))
    assert pydicom.dcmread(tmp_path / "rle.dcm").file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    np.testing.assert_array_equal(s.image[0], stored)


def test_a_broken_compressed_frame_names_the_transfer_syntax(tmp_path):
    path = write_jpeg_ls_claim(tmp_path / "jls.dcm")
    assert "pylibjpeg" in get_decoder(JPEGLSLossless).available_plugins, "make install installs cdm-ood[codecs]"
    with pytest.raises(UnreadableFileError, match="installed decoders failed to decode 'JPEG-LS Lossless") as info:
        read_file(path)
    assert info.value.path == str(path) and "1.2.840.10008.1.2.4.80" in info.value.reason


def test_truncated_and_pixel_less_dicom_get_specific_reasons(tmp_path):
    ds = ct_dataset(np.zeros((16, 16), np.int16))
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(UnreadableFileError, match="truncated"):
        read_file(write(ds, tmp_path / "trunc.dcm"))
    ds = ct_dataset(np.zeros((4, 4), np.int16))
    del ds.PixelData
    with pytest.raises(UnreadableFileError, match="no pixel data in a CT Image Storage"):
        read_file(write(ds, tmp_path / "nopix.dcm"))
    sr = ct_dataset(np.zeros((4, 4), np.int16))
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(sr, keyword)
    sr.SOPClassUID = pydicom.uid.BasicTextSRStorage
    with pytest.raises(NotAnImageError, match="Basic Text SR Storage"):
        read_file(write(sr, tmp_path / "sr.dcm"))


def test_format_is_detected_by_content_not_suffix(tmp_path):
    stored = np.arange(16, dtype=np.int16).reshape(4, 4)
    (s,) = read_file(write(ct_dataset(stored, intercept=0), tmp_path / "looks_like.png"))
    np.testing.assert_array_equal(s.image[0], stored)
    Image.fromarray(np.full((4, 4), 9, np.uint8)).save(tmp_path / "scan.dcm", format="PNG")
    (png,) = read_file(tmp_path / "scan.dcm")
    assert png.image.shape == (1, 4, 4) and png.image.max() == 9
    no_suffix = tmp_path / "IM0001"
    no_suffix.write_bytes((tmp_path / "looks_like.png").read_bytes())
    assert read_file(no_suffix)[0].source.volume_id == s.source.volume_id


def test_bare_dicom_without_preamble_is_read(tmp_path):
    ds = ct_dataset(np.ones((4, 4), np.int16), intercept=0)
    path = tmp_path / "bare"
    del ds.file_meta
    pydicom.dcmwrite(path, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    with pytest.raises(UnreadableFileError, match="no transfer syntax"):
        read_file(path)


def test_gzipped_dicom_is_named(tmp_path):
    raw = write(ct_dataset(np.ones((4, 4), np.int16)), tmp_path / "a.dcm").read_bytes()
    (tmp_path / "a.dcm.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(UnsupportedFormatError, match="gzip-compressed DICOM"):
        read_file(tmp_path / "a.dcm.gz")


def write_series(folder: Path, n: int, size: int = 4) -> list[pydicom.Dataset]:
    """A CT series of `n` `size` x `size` random slices 2 mm apart; returns its datasets."""
    uid = pydicom.uid.generate_uid()
    datasets = [ct_dataset(RNG.integers(0, 100, (size, size)).astype(np.int16), series_uid=uid, z=2.0 * k,
                           instance=k + 1) for k in range(n)]  # fmt: skip
    for k, ds in enumerate(datasets):
        write(ds, folder / f"s{k}.dcm")
    return datasets


def test_a_series_slice_of_another_size_is_a_volume_of_its_own(tmp_path):
    uid = write_series(tmp_path / "series", 4)[0].SeriesInstanceUID
    odd = pydicom.dcmread(tmp_path / "series" / "s2.dcm")
    odd.Rows = odd.Columns = 8
    odd.PixelData = RNG.integers(0, 100, (8, 8)).astype(np.int16).tobytes()
    write(odd, tmp_path / "series" / "s2.dcm")
    slices, errors = collect(tmp_path)
    assert errors == [] and all(s.flags == () for s in slices)
    volumes = {(Path(s.source.path).name, s.source.volume_id, s.source.index, s.image.shape[-1]) for s in slices}
    assert volumes == {("s0.dcm", f"{uid}[4x4]", 0, 4), ("s1.dcm", f"{uid}[4x4]", 1, 4),
                       ("s3.dcm", f"{uid}[4x4]", 2, 4), ("s2.dcm", f"{uid}[8x8]", 0, 8)}  # fmt: skip


def test_duplicate_sop_instance_uids_flag_every_copy_naming_the_field(tmp_path):
    write_series(tmp_path / "series", 4)
    (tmp_path / "series" / "s1_copy.dcm").write_bytes((tmp_path / "series" / "s1.dcm").read_bytes())
    slices, _ = collect(tmp_path)
    flagged = {Path(s.source.path).name: s.flags for s in slices if s.flags}
    reason = ("duplicate SOPInstanceUID: 5 files of the series hold 4 SOPInstanceUIDs",)
    assert flagged == {"s1.dcm": reason, "s1_copy.dcm": reason}, "both copies: which one is right is unknown"
    for identifier in (PATIENT_NAME, PATIENT_ID, BIRTH_DATE):
        assert identifier not in reason[0]


def test_a_slice_of_another_orientation_is_a_volume_of_its_own(tmp_path):
    datasets = write_series(tmp_path / "series", 4)
    datasets[1].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal slice in an axial series
    datasets[3].ImageOrientationPatient = [1, 0, 0, 0, 0.99999, 0.0001]  # within the tolerance: the same plane
    for k in (1, 3):
        write(datasets[k], tmp_path / "series" / f"s{k}.dcm")
    slices, _ = collect(tmp_path)
    uid = datasets[0].SeriesInstanceUID
    assert all(s.flags == () for s in slices)
    assert {Path(s.source.path).name: s.source.volume_id for s in slices} == {
        "s0.dcm": f"{uid}[axial1]", "s1.dcm": f"{uid}[sagittal2]", "s2.dcm": f"{uid}[axial1]",
        "s3.dcm": f"{uid}[axial1]",
    }  # fmt: skip
    (sagittal,) = [s for s in slices if s.source.path.endswith("s1.dcm")]
    assert sagittal.source.part == ("series split by orientation into 2 volumes: part 2, ImageOrientationPatient "
                                    "sagittal (0, 1, 0, 0, 0, -1)")  # fmt: skip


def test_monochrome1_is_inverted_over_the_stored_range_as_a_viewer_shows_it(tmp_path):
    stored = RNG.integers(0, 4096, (6, 7)).astype(np.uint16)
    for name, interpretation in (("m2.dcm", "MONOCHROME2"), ("m1.dcm", "MONOCHROME1")):
        ds = ct_dataset(stored.astype(np.int16), intercept=-10.0)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.RescaleSlope, ds.PixelData = 0.5, stored.tobytes()
        ds.PhotometricInterpretation = interpretation
        write(ds, tmp_path / name)
    ((m2,), (m1,)) = read_file(tmp_path / "m2.dcm"), read_file(tmp_path / "m1.dcm")
    np.testing.assert_allclose(m2.image[0], 0.5 * stored - 10.0)
    lo, hi = -10.0, 0.5 * 4095 - 10.0  # the modality LUT over the 12-bit stored range
    np.testing.assert_allclose(m1.image[0], lo + hi - m2.image[0])


def test_a_real_monochrome1_radiograph_reads_as_itk_shows_it():
    from monai.data import ITKReader

    (path,) = corpus(pydicom, "data", "test_files").rglob("6154")  # a computed radiograph, MONOCHROME1
    assert pydicom.dcmread(path).PhotometricInterpretation == "MONOCHROME1"
    (s,) = read_file(path)
    reader = ITKReader()
    itk, _ = reader.get_data(reader.read(str(path)))  # GDCM inverts MONOCHROME1; (columns, rows) as MONAI loads
    np.testing.assert_allclose(s.image[0], np.squeeze(itk).T, rtol=1e-5)


def test_ycbcr_becomes_rgb_and_other_photometric_interpretations_are_refused_by_name(tmp_path):
    (ybr,) = read_file(corpus(pydicom, "data", "test_files", "SC_ybr_full_422_uncompressed.dcm"))
    assert ybr.image.shape == (3, 100, 100) and ybr.image[:, 0, 0].tolist() == [254, 0, 0], "red, not YCbCr"
    ds = ct_dataset(RNG.integers(0, 255, (4, 5, 3)).astype(np.uint8))
    for value, named in (("YBR_PARTIAL_422", "PhotometricInterpretation 'YBR_PARTIAL_422' is not supported"),
                         ("HIDDEN", "PhotometricInterpretation of an unknown value is not supported")):  # fmt: skip
        ds.PhotometricInterpretation = value
        with pytest.raises(UnsupportedFormatError, match=named) as info:
            read_file(write(ds, tmp_path / "c.dcm"))
        assert "HIDDEN" not in info.value.reason, "header text is never copied into a reason"


# NIfTI ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_3d_gives_axial_slices_rows_first(tmp_path, suffix):
    vol = RNG.normal(size=(5, 6, 7)).astype(np.float32)  # (k, rows, cols) as displayed
    nib.Nifti1Image(vol.transpose(2, 1, 0), np.eye(4)).to_filename(tmp_path / f"v{suffix}")
    slices = read_file(tmp_path / f"v{suffix}")
    assert [s.source.index for s in slices] == list(range(5))
    np.testing.assert_allclose(np.stack([s.image[0] for s in slices]), vol, rtol=1e-6)
    assert {s.source.volume_id for s in slices} == {str(tmp_path / f"v{suffix}")}


def test_nifti_4d_gives_slices_per_time_point(tmp_path):
    data = RNG.normal(size=(4, 4, 3, 2)).astype(np.float32)
    nib.Nifti1Image(data, np.eye(4)).to_filename(tmp_path / "f.nii.gz")
    slices = read_file(tmp_path / "f.nii.gz")
    assert [(s.source.time_point, s.source.index) for s in slices] == [(t, k) for t in range(2) for k in range(3)]
    np.testing.assert_allclose(slices[4].image[0], data[:, :, 1, 1].T, rtol=1e-6)


def test_nifti_pair_is_read_with_its_companion(tmp_path):
    data = RNG.normal(size=(4, 4, 2)).astype(np.float32)
    nib.Nifti1Pair(data, np.eye(4)).to_filename(tmp_path / "pair.hdr")
    slices, errors = collect(tmp_path)
    assert len(slices) == 2 and errors == []


def test_bad_nifti_files_get_specific_reasons(tmp_path):
    nib.Nifti1Image(np.zeros((2, 2, 2, 2, 3), np.float32), np.eye(4)).to_filename(tmp_path / "5d.nii")
    with pytest.raises(UnsupportedFormatError, match="5-D"):
        read_file(tmp_path / "5d.nii")
    nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)).to_filename(tmp_path / "t.nii")
    raw = (tmp_path / "t.nii").read_bytes()
    (tmp_path / "trunc.nii").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UnreadableFileError, match="truncated"):
        read_file(tmp_path / "trunc.nii")
    (tmp_path / "renamed.dat").write_bytes(raw)
    with pytest.raises(UnsupportedFormatError, match="NIfTI content under another suffix"):
        read_file(tmp_path / "renamed.dat")


def test_nonfinite_and_constant_slices_are_flagged_not_dropped(tmp_path):
    data = RNG.normal(size=(4, 4, 3)).astype(np.float32)
    data[1, 1, 0] = np.nan
    data[:, :, 2] = 5.0
    nib.Nifti1Image(data, np.eye(4)).to_filename(tmp_path / "q.nii")
    flags = [s.flags for s in read_file(tmp_path / "q.nii")]
    assert flags == [(FLAG_NONFINITE,), (), (FLAG_CONSTANT,)]


def test_nifti_qform_and_sform_that_disagree_are_flagged_naming_both(tmp_path):
    data = RNG.normal(size=(4, 5, 3)).astype(np.float32)
    oblique = nib.affines.from_matvec(nib.eulerangles.euler2mat(0.3, 0.2, 0.1) * [0.9, 1.1, 2.5], [-40, 12.5, 7])
    for name, sform in (("same.nii", oblique), ("moved.nii", nib.affines.from_matvec(oblique[:3, :3], [-40, 14.5, 7]))):
        image = nib.Nifti1Image(data, oblique)
        image.set_qform(oblique, code=1)  # stored as float32 quaternions: rounded, within the tolerance
        image.set_sform(sform, code=2)
        image.to_filename(tmp_path / name)
    assert {s.flags for s in read_file(tmp_path / "same.nii")} == {()}
    assert {s.flags for s in read_file(tmp_path / "moved.nii")} == {
        ("NIfTI qform (code 1) and sform (code 2) disagree: voxels up to 2 mm apart (tolerance 0.009 mm)",)
    }
    image = nib.Nifti1Image(data, np.eye(4))
    image.set_qform(np.eye(4), code=1)
    image.set_sform(np.diag([-1.0, 1, 1, 1]), code=1)  # left and right swapped
    image.to_filename(tmp_path / "flipped.nii")
    (reason,) = read_file(tmp_path / "flipped.nii")[0].flags
    assert reason.startswith("NIfTI qform (code 1) and sform (code 1) disagree") and reason.endswith("axes RAS vs LAS")


@pytest.mark.parametrize("slope, inter, reasons", [
    (0.0, 0.0, ["NIfTI scl_slope is 0: the voxels' scaling is undefined (read unscaled)"]),
    (np.nan, 0.0, ["NIfTI scl_slope is nan: the voxels' scaling is undefined (read unscaled)"]),
    (np.inf, 0.0, ["NIfTI scl_slope is inf: the voxels' scaling is undefined (read unscaled)"]),
    (np.nan, -np.inf, ["NIfTI scl_slope is nan: the voxels' scaling is undefined (read unscaled)",
                       "NIfTI scl_inter is -inf: the voxels' scaling is undefined"]),
])  # fmt: skip
def test_nifti_scaling_that_nibabel_would_ignore_is_flagged_naming_the_field(tmp_path, slope, inter, reasons):
    data = RNG.integers(0, 100, size=(4, 5, 3)).astype(np.int16)
    nib.Nifti1Image(data, np.eye(4)).to_filename(tmp_path / "v.nii")
    raw = (tmp_path / "v.nii").read_bytes()
    header = nib.Nifti1Header(raw[:348])
    header["scl_slope"], header["scl_inter"] = slope, inter
    (tmp_path / "v.nii").write_bytes(header.binaryblock + raw[348:])
    slices = read_file(tmp_path / "v.nii")
    np.testing.assert_array_equal(slices[0].image[0], data[:, :, 0].T)  # what nibabel gives: the stored values
    assert {s.flags for s in slices} == {tuple(reasons)}


# PNG / JPEG and other files ---------------------------------------------------------------------------------------


def test_png_and_jpeg(tmp_path):
    grey16 = RNG.integers(0, 60000, (5, 6)).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    (s,) = read_file(tmp_path / "g16.png")
    np.testing.assert_array_equal(s.image[0], grey16)
    rgba = RNG.integers(0, 255, (5, 6, 4)).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    (s,) = read_file(tmp_path / "rgba.png")
    np.testing.assert_array_equal(s.image, rgba[..., :3].transpose(2, 0, 1))
    Image.fromarray(rgba[..., :3]).save(tmp_path / "c.jpg", quality=95)
    assert read_file(tmp_path / "c.jpg")[0].image.shape == (3, 5, 6)
    raw = (tmp_path / "c.jpg").read_bytes()
    (tmp_path / "broken.jpg").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(UnreadableFileError, match="truncated or corrupt"):
        read_file(tmp_path / "broken.jpg")


@pytest.mark.parametrize(
    "content, error, reason",
    [
        (b"", UnreadableFileError, "empty file"),
        (b"patient notes\n", NotAnImageError, "text file"),
        (b"\x00\x01\x02\x03" * 64, NotAnImageError, "unrecognised content"),
        (b"CDF\x01" + bytes(300), UnsupportedFormatError, "MINC-1"),
    ],
)
def test_non_images_get_typed_errors_naming_the_file(tmp_path, content, error, reason):
    path = tmp_path / "file.dcm"
    path.write_bytes(content)
    with pytest.raises(error, match=reason) as info:
        read_file(path)
    assert str(path) in str(info.value)


def test_a_batch_continues_past_bad_files_and_raises_without_a_handler(tmp_path):
    write(ct_dataset(np.ones((4, 4), np.int16)), tmp_path / "a_good.dcm")
    (tmp_path / "b_bad.dcm").write_bytes(b"junk")
    write(ct_dataset(np.ones((4, 4), np.int16)), tmp_path / "c_good.dcm")
    slices, errors = collect(tmp_path)
    assert len(slices) == 2 and [Path(e.path).name for e in errors] == ["b_bad.dcm"]
    with pytest.raises(NotAnImageError):
        list(iter_slices(tmp_path))


def test_inputs_are_read_only_and_identifiers_never_surface(tmp_path):
    root = tmp_path / "in"
    write(ct_dataset(np.ones((4, 4), np.int16)), root / "ok.dcm")
    write_jpeg_ls_claim(root / "jls.dcm")
    ds = ct_dataset(np.zeros((8, 8), np.int16))
    ds.PixelData = ds.PixelData[:10]
    write(ds, root / "trunc.dcm")
    nib.Nifti1Image(np.ones((4, 4, 2), np.float32), np.eye(4)).to_filename(root / "v.nii.gz")
    for p in root.iterdir():
        p.chmod(0o444)
    before = hashes(root)
    slices, errors = collect(root)
    assert hashes(root) == before and len(slices) == 3 and len(errors) == 2
    text = " ".join([repr(s.source) for s in slices] + [str(e) for e in errors])
    for identifier in (PATIENT_NAME, PATIENT_ID, BIRTH_DATE, "DOE"):
        assert identifier not in text


def corpus(package, *parts) -> Path:
    return Path(package.__file__).parent.joinpath(*parts)


@pytest.mark.parametrize("root", [corpus(pydicom, "data", "test_files"), corpus(nib, "tests", "data")],
                         ids=["pydicom", "nibabel"])  # fmt: skip
def test_installed_corpora_every_file_read_or_given_a_reason(root):
    files = {str(p) for p in root.rglob("*") if p.is_file()}
    before = hashes(root)
    slices, errors = collect(root, ignore=())  # every file, also those the default ignore list leaves out
    read = {s.source.path for s in slices}
    failed = {e.path for e in errors}
    assert files == read | failed, "every file is read or given a reason"
    assert not read & failed
    assert all(e.reason and e.kind in ("unreadable", "unsupported", "not-an-image") for e in errors)
    assert hashes(root) == before
    print(f"\n{root.parent.parent.name}: {len(files)} files, {len(read)} read ({len(slices)} slices), "
          f"{len(failed)} with a reason")  # fmt: skip


def test_known_corpus_files_get_the_expected_outcome():
    root = corpus(pydicom, "data", "test_files")
    by_path = {}
    for item in collect(root, ignore=())[1]:
        by_path[os.path.basename(item.path)] = item
    for decoded in ("CT_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"):
        assert decoded not in by_path
    assert isinstance(by_path["MR_truncated.dcm"], UnreadableFileError)
    assert "truncated" in by_path["MR_truncated.dcm"].reason
    assert isinstance(by_path["rtplan.dcm"], NotAnImageError) and "RT Plan Storage" in by_path["rtplan.dcm"].reason
    assert "DICOMDIR" in by_path["DICOMDIR"].reason
    assert "README.txt" in by_path and "DICOMDIR" not in {os.path.basename(e.path) for e in collect(root)[1]}
    nib_errors = {os.path.basename(e.path): e for e in collect(corpus(nib, "tests", "data"))[1]}
    assert "CIFTI-2" in nib_errors["row_major.dconn.nii"].reason
    assert "MINC" in nib_errors["minc2_4d.mnc"].reason and "PAR" in nib_errors["T1.PAR"].reason
