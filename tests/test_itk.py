"""NRRD and MetaImage (.mha, .mhd + .raw) volumes written by ITK itself, read through MONAI's ITKReader (the
`cdm-ood[itk]` extra): the same values in the same orientation as the same volume written as NIfTI by nibabel."""

import json

import itk
import nibabel as nib
import numpy as np
import pytest
from processes import cdm, without_modules

from cdm_ood.data import NotAnImageError, UnreadableFileError, discover, read_file
from cdm_ood.data.errors import TooLargeError

ITK_SUFFIXES = (".nrrd", ".mha", ".mhd")
# A RAS affine that permutes and flips the axes, with anisotropic spacing: orientation mistakes show.
AFFINE = np.array([[-0.8, 0, 0, 10.0], [0, 0, 1.5, -20.0], [0, 1.2, 0, 5.0], [0, 0, 0, 1]])


def write_itk(data: np.ndarray, affine: np.ndarray, path) -> None:
    """`data[i, j, k]` with the NIfTI (RAS) `affine`, written by ITK with the same geometry in its LPS terms."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = itk.image_from_array(np.ascontiguousarray(data.transpose(2, 1, 0)))  # ITK arrays are (k, j, i)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection(itk.matrix_from_array(lps[:3, :3] / spacing))
    itk.imwrite(image, str(path))


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("itk")
    data = np.random.default_rng(0).integers(-1000, 1000, (5, 6, 4)).astype(np.int16)
    nib.Nifti1Image(data, AFFINE).to_filename(folder / "v.nii.gz")
    for suffix in ITK_SUFFIXES:
        write_itk(data, AFFINE, folder / f"v{suffix}")
    assert (folder / "v.raw").exists(), "the .mhd keeps its voxels in a separate file"
    return folder


@pytest.mark.parametrize("suffix", ITK_SUFFIXES)
def test_itk_volumes_give_the_nifti_slices(volumes, suffix):
    reference = read_file(volumes / "v.nii.gz")
    slices = read_file(volumes / f"v{suffix}")
    assert len(slices) == len(reference) == 6 and slices[0].image.shape == (1, 4, 5)
    for got, want in zip(slices, reference, strict=True):
        np.testing.assert_array_equal(got.image, want.image)
        assert got.source.index == want.source.index


def test_a_folder_reads_each_itk_volume_once_and_its_raw_file_with_its_header(volumes):
    errors = []
    sources = discover(volumes, on_error=errors.append)
    assert not errors, "the .raw of the .mhd is not a file of its own"
    by_name = {s.path.rsplit("/", 1)[-1]: s for s in sources}
    assert sorted(by_name) == ["v.mha", "v.mhd", "v.nii.gz", "v.nrrd"]
    assert {s.format for s in sources} == {"itk", "nifti"}
    assert by_name["v.mhd"].companions == (str(volumes / "v.raw"),)
    with pytest.raises(NotAnImageError, match=r"raw voxel data of the header v\.mhd"):
        read_file(volumes / "v.raw")


def test_itk_format_is_detected_by_content_and_its_header_is_checked(volumes, tmp_path):
    (tmp_path / "scan.dat").write_bytes((volumes / "v.nrrd").read_bytes())
    assert len(read_file(tmp_path / "scan.dat")) == 6, "an NRRD under another suffix"
    for path in (volumes / "v.nrrd", volumes / "v.mhd"):
        with pytest.raises(TooLargeError, match="120 voxels"):
            discover(path, max_voxels=100)
    # A header that declares 10^12 voxels and holds none: refused from the header alone.
    (tmp_path / "huge.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 10000 10000 10000\n"
                                         b"encoding: raw\nendian: little\n\n")  # fmt: skip
    with pytest.raises(TooLargeError, match="1,000,000,000,000 voxels"):
        discover(tmp_path / "huge.nrrd")
    header = (volumes / "v.mhd").read_text().replace("v.raw", "gone.raw")
    (tmp_path / "lost.mhd").write_text(header)
    with pytest.raises(UnreadableFileError, match=r"without its voxel file gone\.raw"):
        discover(tmp_path / "lost.mhd")
    (tmp_path / "mesh.mha").write_text("ObjectType = Mesh\nNDims = 3\n")
    with pytest.raises(NotAnImageError, match="MetaIO Mesh object"):
        discover(tmp_path / "mesh.mha")


def test_without_the_itk_extra_the_reason_names_it(checkpoint, volumes, tmp_path):
    env = without_modules(tmp_path / "stubs", "itk")
    out = cdm("score", volumes, "--checkpoint", checkpoint, "--out", tmp_path / "r.json", cwd=tmp_path, env=env)
    assert out.returncode == 1, out.stderr[-2000:]
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    reasons = {r["path"]: r["reason"] for r in rows if r["level"] == "file"}
    unread = {str(volumes / f"v{s}") for s in ITK_SUFFIXES}
    assert set(reasons) == unread | {str(volumes / "v.raw")}, "the NIfTI is still read"
    assert all(r.startswith("UnsupportedFormatError") and "install cdm-ood[itk]" in r for r in reasons.values())
    assert "voxel file of v.mhd" in reasons[str(volumes / "v.raw")], "the .raw shares its header's outcome"
