"""MONAI `LoadImaged` + `EnsureChannelFirstd` (+ `Orientationd`) and cdm-ood's readers agree on every slice, and
`ScoreOODd` scores a whole loaded volume as `cdm-ood score` scores the file."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import ITKReader, PydicomReader
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd
from processes import cdm

from cdm_ood import OODDetector, ScoreOODd
from cdm_ood.data import iter_slices
from cdm_ood.data.orientation import reader_slices
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.volume_files import write_dicom_series
from cdm_ood.errors import UsageError

# voxel axes (i, j, k) -> world: i runs to the left, j up, k backwards (an LPS-like, permuted, non-RAS affine)
PERMUTED_AFFINE = np.array([[0, 0, -2.0, 10], [-1.0, 0, 0, 5], [0, 1.5, 0, 3], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A 12x16 (rows x columns) DICOM series of 4 slices and a NIfTI volume of 12x5x16 voxels with a permuted
    affine, every voxel a distinct value so that any transpose, flip or reordering shows."""
    root = tmp_path_factory.mktemp("orient")
    write_dicom_series(np.arange(4 * 12 * 16).reshape(4, 12, 16), root / "series", modality="ct", volume_index=0)
    nib.save(nib.Nifti1Image(np.arange(12 * 5 * 16, dtype=np.float32).reshape(12, 5, 16), PERMUTED_AFFINE),
             root / "permuted.nii.gz")  # fmt: skip
    return {"series": root / "series", "file": root / "series" / "slice_001.dcm", "nifti": root / "permuted.nii.gz"}


def load(path: Path, reader=None, axcodes=None):
    chain = [LoadImaged("image", reader=reader), EnsureChannelFirstd("image")]
    return Compose([*chain, *([Orientationd("image", axcodes=axcodes)] if axcodes else [])])({"image": str(path)})


@pytest.mark.parametrize("axcodes", [None, "RAS", "LPS", "PIR"])
@pytest.mark.parametrize("name", ["series", "file", "nifti"])
def test_loaded_volumes_give_the_readers_slices(files, name, axcodes):
    own = np.stack([s.image for s in iter_slices(files[name])])
    readers = [None, ITKReader(), PydicomReader()] if name != "nifti" else [None]
    for reader in readers:
        if name == "file" and axcodes == "PIR" and isinstance(reader, PydicomReader):
            continue  # a 2D image: Orientation cannot name a third axis
        image = load(files[name], reader, axcodes)["image"]
        assert image.shape[1:3] != own.shape[2:]  # MONAI's layout is not the readers' (a transpose at least)
        slices = reader_slices(image)
        assert slices.shape == own.shape and np.array_equal(slices, own), (name, reader, axcodes)


def test_reader_slices_refuses_arrays_without_their_file(files):
    with pytest.raises(ValueError, match="MetaTensor of MONAI LoadImage"):
        reader_slices(np.zeros((1, 4, 4, 2)))


def test_score_oodd_scores_a_loaded_volume_as_the_cli_scores_its_file(checkpoint, tmp_path):
    rng = np.random.default_rng(3)
    volume = phantom_volume(rng, size=16, slices=3)[:, 2:14]  # 12x16: a transposed slice would not fit
    write_dicom_series(volume, tmp_path / "series", modality="ct", volume_index=1)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS voxel axes: the readers flip them to RAS
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0).astype(np.float32), affine), tmp_path / "lps.nii.gz")
    detector = OODDetector.from_checkpoint(checkpoint)
    chain = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), ScoreOODd("image", detector)])
    loaded = {}
    for name in ("series", "lps.nii.gz"):
        out = cdm("score", tmp_path / name, "--checkpoint", checkpoint, "--out", tmp_path / "r.json", "--no-fail",
                  cwd=tmp_path)  # fmt: skip
        assert out.returncode == 0, out.stderr
        rows = json.loads((tmp_path / "r.json").read_text())["rows"]
        slices = [r for r in rows if r["level"] == "slice"]
        (expected,) = [r for r in rows if r["level"] == "volume"]
        d = loaded[name] = chain({"image": str(tmp_path / name)})
        np.testing.assert_allclose(d["image_ood_slice_scores"], [r["score"] for r in slices], rtol=1e-5)
        assert d["image_ood_slice_verdicts"] == [r["verdict"] for r in slices]
        assert d["image_ood_score"] == pytest.approx(expected["score"], rel=1e-5)
        assert d["image_ood_verdict"] == expected["verdict"] and d["image_ood_reason"] == expected["reason"]
        assert d["image_ood"] == (expected["verdict"] != "in")
    image = load(tmp_path / "series" / "slice_001.dcm", PydicomReader())["image"]
    assert image.shape == (1, 16, 12)  # one 2D slice, transposed as MONAI loads it
    one = ScoreOODd("image", detector)({"image": image})
    assert one["image_ood_score"] == pytest.approx(loaded["series"]["image_ood_slice_scores"][1], rel=1e-5)
    nib.save(nib.Nifti1Image(np.full((16, 12, 3), 5.0, np.float32), np.eye(4)), tmp_path / "blank.nii.gz")
    blank = chain({"image": str(tmp_path / "blank.nii.gz")})  # every slice constant: flagged, never `in`
    assert blank["image_ood_slice_verdicts"] == ["flagged"] * 3 and np.isnan(blank["image_ood_score"])
    assert blank["image_ood_verdict"] == "flagged"
    assert blank["image_ood_reason"] == "no slice could be scored (3 flagged: constant pixels)"
    with pytest.raises(UsageError, match="without the metadata of MONAI LoadImage"):
        chain.transforms[-1]({"image": np.zeros((1, 16, 12, 3), np.float32)})
