"""The OOD sets: artifacts at the reject strength, orientation errors through the readers, wrong-modality files
and the `make-phantoms --ood-sets` generator read by `cdm-ood evaluate`."""

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from processes import cdm

from cdm_ood.data.artifacts import (
    ARTIFACTS,
    REJECT,
    VALUE_RANGE,
    corrupt_volume,
    low_resolution,
    motion_slices,
    moved_copy,
)
from cdm_ood.data.discovery import discover
from cdm_ood.data.geometry import BODY_LEVEL, COVERAGE, MISSING, ORIENTATIONS, cover, misorient
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.readers import iter_slices
from cdm_ood.data.volume_files import write_dicom_series, write_nifti
from cdm_ood.data.wrong_modality import BUNDLED, wrong_modality_files


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return phantom_volume(np.random.default_rng(3), size=16, slices=6, modality="ct")


@pytest.mark.parametrize("modality", ["ct", "mr"])
@pytest.mark.parametrize("artifact", sorted(REJECT))
def test_reject_artifacts_change_the_volume_deterministically_in_range(artifact, modality):
    volume = phantom_volume(np.random.default_rng(1), size=16, slices=4, modality=modality)
    corrupted, parameter = corrupt_volume(volume, artifact, "reject", 5, modality)
    again, _ = corrupt_volume(volume, artifact, "reject", 5, modality)
    assert parameter == REJECT[artifact] and np.array_equal(corrupted, again)
    assert corrupted.shape == volume.shape and corrupted.dtype == np.float32
    low, high = VALUE_RANGE[modality]
    assert low <= corrupted.min() and corrupted.max() <= high and np.array_equal(corrupted, np.rint(corrupted))
    change = np.abs(corrupted - volume).mean() / (volume.max() - volume.min())
    assert change > 0.02, change
    if artifact in ARTIFACTS:  # beyond the strong copies of the --corrupt demo set
        strong, _ = corrupt_volume(volume, artifact, "strong", 5, modality)
        assert np.abs(strong - volume).mean() < np.abs(corrupted - volume).mean()


def test_motion_mixes_k_space_lines_of_a_moved_copy_and_blur_resamples(clean):
    unit = (clean - clean.min()) / (clean.max() - clean.min())
    assert np.allclose(motion_slices(unit, 0.0, seed=1), unit, atol=1e-6)  # no move: the same lines
    sign = np.random.default_rng(1).choice([-1.0, 1.0], size=2)  # the seeded direction of the move
    k_clean, k_moved = (
        np.fft.fftshift(np.fft.fft2(v), axes=(-2, -1)) for v in (unit, moved_copy(unit, sign[0] * 10, sign[1] * 0.1))
    )
    # 16 lines acquired edge to edge, the move after 0.6 of them (line 9): lines 0-8, the centre line 8 among them,
    # are clean and lines 9-15 moved. Moving after 0.3 (line 4) puts the centre in the second part, which stays clean.
    for time, mixed in ((0.6, [k_clean[:, :9], k_moved[:, 9:]]), (0.3, [k_moved[:, :4], k_clean[:, 4:]])):
        expected = np.fft.ifft2(np.fft.ifftshift(np.concatenate(mixed, axis=1), axes=(-2, -1))).real
        assert np.allclose(motion_slices(unit, 10.0, seed=1, time=time), expected, atol=1e-6)
    assert not np.allclose(motion_slices(unit, 10.0, seed=1), unit, atol=1e-3)
    assert np.allclose(low_resolution(unit, 1.0), unit, atol=1e-6)
    blurred = low_resolution(unit, 4.0)
    assert np.abs(np.diff(blurred, axis=-1)).mean() < np.abs(np.diff(unit, axis=-1)).mean()


def test_unknown_artifact_or_strength_is_refused(clean):
    with pytest.raises(ValueError, match=r"motion.*mild"):
        corrupt_volume(clean, "motion", "mild", 0, "ct")
    with pytest.raises(ValueError, match="known: si-flip"):
        misorient(clean, "upside-down")


EXPECTED = {  # what each error does to the slices the readers give (slice k of the clean volume is vol[k])
    "si-flip": lambda v: v[::-1],
    "ap-flip": lambda v: v[:, ::-1],
    "lr-flip": lambda v: v[:, :, ::-1],
    "rot90": lambda v: np.stack([np.rot90(s) for s in v]),
    "transpose": lambda v: np.stack([s.T for s in v]),
    "interleave": lambda v: v[[0, 2, 4, 1, 3, 5]],
}


def read_volume(path) -> np.ndarray:
    return np.stack([s.image[0] for s in iter_slices(path)])


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_orientation_errors_change_the_slices_the_readers_give_and_keep_the_geometry(clean, fmt, tmp_path):
    assert set(EXPECTED) == set(ORIENTATIONS)

    def write(volume, name):
        if fmt == "nifti":
            write_nifti(volume, tmp_path / f"{name}.nii.gz")
            return tmp_path / f"{name}.nii.gz"
        write_dicom_series(volume, tmp_path / name, modality="ct", volume_index=0)
        return tmp_path / name

    original = write(clean, "clean")
    assert np.array_equal(read_volume(original), clean)
    for error, expected in EXPECTED.items():
        path = write(misorient(clean, error), error)
        assert np.array_equal(read_volume(path), expected(clean)), error
        assert not np.array_equal(read_volume(path), clean), error
        if fmt == "nifti":  # the file claims the original orientation while the data are wrong
            assert np.array_equal(nib.load(path).affine, nib.load(original).affine)


def test_coverage_errors_leave_out_a_third_of_the_anatomy_and_fill_it_with_the_volumes_own_background(clean):
    """Each coverage error keeps what it keeps unchanged and fills what it leaves out with values drawn from the
    volume's background (never a constant slice): `truncated-fov` the anterior third of the body's rows,
    `partial-slab` drops the superior third of the slices, `early-coverage` empties them, `slab-position` moves the
    slab up by a third. The same seed gives the same copy; unknown errors and non-volumes are refused."""
    n = len(clean)
    lo, hi = np.percentile(clean, (1.0, 99.5))
    level = lo + BODY_LEVEL * (hi - lo)
    gone = round(MISSING * n)

    def background(part: np.ndarray) -> bool:
        return bool((part <= level).all() and all(np.ptp(s) > 0 for s in part.reshape(-1, *part.shape[-2:])))

    assert np.array_equal(cover(clean, "partial-slab", 0), clean[: n - gone])
    early = cover(clean, "early-coverage", 0)
    assert early.shape == clean.shape and np.array_equal(early[: n - gone], clean[: n - gone])
    assert background(early[n - gone :])
    moved = cover(clean, "slab-position", 0)
    assert np.array_equal(moved[: n - gone], clean[gone:]) and background(moved[n - gone :])
    truncated = cover(clean, "truncated-fov", 0)
    rows = np.flatnonzero((clean > level).any(axis=(0, 2)))
    cut = rows[-1] + 1 - round(MISSING * (rows[-1] + 1 - rows[0]))
    assert np.array_equal(truncated[:, :cut], clean[:, :cut]) and (truncated[:, cut:] <= level).all()
    assert (clean[:, cut:] > level).any(), "body was there"
    assert np.array_equal(cover(clean, "early-coverage", 0), early) and set(COVERAGE) == {
        "truncated-fov", "partial-slab", "early-coverage", "slab-position"}  # fmt: skip
    with pytest.raises(ValueError, match="unknown coverage error"):
        cover(clean, "half-head", 0)
    with pytest.raises(ValueError, match="need a volume"):
        cover(clean[0], "partial-slab", 0)


def test_wrong_modality_files_are_found_as_images(tmp_path):
    rows = wrong_modality_files(tmp_path / "wrong", modality="ct", size=16, seed=0)
    names = {r["path"].split("/", 1)[1] for r in rows}
    assert names == {*BUNDLED, "phantom_mr.nii.gz", "radiograph.png", "natural.png"}
    assert {r["artifact"] for r in rows} == {"wrong-modality"}
    sources = discover(tmp_path / "wrong")
    assert sorted(Path(s.path).name for s in sources) == sorted(names)
    slices = list(iter_slices(tmp_path / "wrong"))
    assert {Path(s.source.path).name for s in slices} == names
    radiograph = next(s for s in slices if s.source.path.endswith("radiograph.png")).image
    assert radiograph.shape == (1, 16, 16) and radiograph.std() > 10


def test_make_phantoms_ood_sets_is_evaluated_per_set(checkpoint, tmp_path):
    made = cdm("make-phantoms", "--out-dir", tmp_path / "ood", "--n", 2, "--format", "nifti", "--size", 16,
               "--slices", 4, "--ood-sets", cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    manifest = tmp_path / "ood" / "manifest.csv"
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    sets = {f"{a}-reject" for a in REJECT} | set(ORIENTATIONS) | set(COVERAGE) | {"wrong-modality"}
    assert len(rows) == 2 * (1 + len(REJECT) + len(ORIENTATIONS) + len(COVERAGE)) + len(BUNDLED) + 3
    assert {int(r["n_slices"]) for r in rows if r["artifact"] == "partial-slab"} == {3}, "4 slices less a third"
    assert all((tmp_path / "ood" / r["path"]).exists() for r in rows)
    evaluated = cdm("evaluate", manifest, "--checkpoint", checkpoint, "--ood", manifest, "--out-dir",
                    tmp_path / "e", cwd=tmp_path)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    with open(tmp_path / "e" / "metrics.csv", newline="") as f:
        metrics = list(csv.DictReader(f))
    assert {r["ood_set"] for r in metrics} == sets
    assert all(int(r["n_id"]) == 8 and int(r["n_ood"]) > 0 for r in metrics)
