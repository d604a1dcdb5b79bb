"""Local defects with known masks (`cdm_ood.data.defects`): deterministic, local, visible, and nothing outside the
mask changes; `make-phantoms --defects` writes them with their masks, which `score` leaves alone."""

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from processes import cdm

from cdm_ood.data.artifacts import VALUE_RANGE
from cdm_ood.data.defects import DEFECTS, draw_defect
from cdm_ood.data.discovery import discover
from cdm_ood.data.manifest import MANIFEST_COLUMNS, MASK_COLUMN, is_manifest, manifest_masks, manifest_sets, read_mask
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.readers import iter_slices
from cdm_ood.errors import UsageError


@pytest.fixture(scope="module", params=["ct", "mr"])
def clean(request) -> tuple[np.ndarray, str]:
    return phantom_volume(np.random.default_rng(7), size=64, slices=6, modality=request.param), request.param


@pytest.mark.parametrize("kind", DEFECTS)
def test_a_defect_is_local_visible_deterministic_and_masked_exactly(clean, kind):
    volume, modality = clean
    corrupted, mask = draw_defect(volume, kind, seed=11, modality=modality)
    again, same_mask = draw_defect(volume, kind, seed=11, modality=modality)
    assert np.array_equal(corrupted, again) and np.array_equal(mask, same_mask)
    _, other_mask = draw_defect(volume, kind, seed=12, modality=modality)
    assert not np.array_equal(mask, other_mask)
    assert mask.shape == volume.shape and mask.dtype == bool and corrupted.dtype == np.float32
    assert np.array_equal(corrupted[~mask], volume[~mask]) and (corrupted[mask] != volume[mask]).all()
    touched = mask.any(axis=(1, 2))
    assert 1 <= touched.sum() <= 3 and np.ptp(np.flatnonzero(touched)) == touched.sum() - 1  # neighbouring slices
    assert mask.reshape(len(mask), -1).mean(axis=1).max() <= 0.05  # local: a few percent of a slice at most
    low, high = VALUE_RANGE[modality]
    assert low <= corrupted.min() and corrupted.max() <= high and np.array_equal(corrupted, np.rint(corrupted))
    lo, hi = np.percentile(volume, [1.0, 99.5])
    assert np.abs(corrupted - volume)[mask].mean() > 0.08 * (hi - lo)  # plain to see, not a whisper


def test_defects_lie_inside_the_body():
    volume = phantom_volume(np.random.default_rng(2), size=32, slices=4, modality="ct")
    for kind in ("metal-streak", "lesion", "foreign-object"):
        for seed in range(4):
            _, mask = draw_defect(volume, kind, seed, "ct")
            rows, cols = np.nonzero(mask.any(axis=0))
            assert volume[:, int(rows.mean()), int(cols.mean())].max() > -500  # the centre is not air


def test_a_tiny_or_flat_volume_still_gets_a_defect_and_bad_arguments_are_named():
    flat = np.full((1, 16, 16), 100.0, dtype=np.float32)
    corrupted, mask = draw_defect(flat, "foreign-object", 0, "ct")
    assert mask.any() and np.array_equal(corrupted[~mask], flat[~mask])
    with pytest.raises(UsageError, match="defect must be one of"):
        draw_defect(flat, "scratch", 0, "ct")
    with pytest.raises(UsageError, match="modality"):
        draw_defect(flat, "lesion", 0, "pet")
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        draw_defect(flat[0], "lesion", 0, "ct")


@pytest.mark.parametrize("fmt", ["dicom", "nifti"])
def test_make_phantoms_defects_writes_each_defect_with_its_mask_in_the_volume_geometry(tmp_path, fmt):
    out = tmp_path / "made"
    made = cdm("make-phantoms", "--out-dir", out, "--n", 1, "--format", fmt, "--size", 32, "--slices", 4,
               "--defects", "--seed", 3, cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    manifest = out / "manifest.csv"
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    assert is_manifest(manifest) and tuple(rows[0]) == (*MANIFEST_COLUMNS, MASK_COLUMN)
    assert [r["artifact"] for r in rows] == ["none", *DEFECTS] and rows[0][MASK_COLUMN] == ""
    sets = manifest_sets(manifest)
    assert set(sets) == {"clean", *DEFECTS} and not any("mask" in str(p) for ps in sets.values() for p in ps)
    masks = manifest_masks(manifest)
    assert sorted(masks.values()) == sorted(out / "masks" / f"phantom_0000_{k}_mask.nii.gz" for k in DEFECTS)
    clean = read_volume(out / rows[0]["path"])
    for row in rows[1:]:
        image = nib.load(out / row[MASK_COLUMN])
        assert image.get_data_dtype() == np.uint8 and image.shape == (32, 32, 4)
        mask = read_mask(out / row[MASK_COLUMN])
        corrupted = read_volume(out / row["path"])
        assert mask.any() and np.array_equal(mask, corrupted != clean), row["artifact"]
        if fmt == "nifti":
            assert np.array_equal(image.affine, nib.load(out / row["path"]).affine)
        else:  # voxel (col 5, row 7, slice 2) lies where the DICOM geometry puts that pixel
            ds = pydicom.dcmread(sorted((out / row["path"]).glob("*.dcm"))[2])
            (sy, sx), x, y = ds.PixelSpacing, ds.ImageOrientationPatient[:3], ds.ImageOrientationPatient[3:]
            lps = np.asarray(ds.ImagePositionPatient) + 5 * sx * np.asarray(x) + 7 * sy * np.asarray(y)
            assert np.allclose(image.affine @ [5, 7, 2, 1], [-lps[0], -lps[1], lps[2], 1])


def read_volume(path: Path) -> np.ndarray:
    """A phantom as `vol[k, row, col]`, slice k as the readers give it."""
    return np.stack([s.image[0] for s in iter_slices(path)])


def test_score_on_a_defects_folder_reads_the_volumes_not_the_masks(checkpoint, tmp_path):
    out = tmp_path / "made"
    made = cdm("make-phantoms", "--out-dir", out, "--n", 1, "--format", "nifti", "--size", 16, "--slices", 3,
               "--defects", cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    names = {f"phantom_0000{suffix}.nii.gz" for suffix in ["", *(f"_{k}" for k in DEFECTS)]}
    assert {Path(s.path).name for s in discover(out)} == names
    scored = cdm("score", out, "--checkpoint", checkpoint, "--threshold", "1e12", "--out", tmp_path / "r.csv",
                 cwd=tmp_path)  # fmt: skip
    assert scored.returncode == 0, scored.stderr  # the masks' all-zero slices would be flagged constant
    with open(tmp_path / "r.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["path"]]
    paths = {row["path"] for row in rows if row["verdict"] != "ignored"}
    assert len(paths) == 1 + len(DEFECTS) and not any("mask" in p for p in paths)
    ignored = {Path(row["path"]).name: row["reason"] for row in rows if row["verdict"] == "ignored"}
    masks = {name: reason for name, reason in ignored.items() if "mask" in name}
    assert len(masks) == len(DEFECTS), "each mask is a row: left out, not silently"
    assert all(reason.endswith("'*/masks/*_mask.nii.gz'") for reason in masks.values())
