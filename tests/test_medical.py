import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cdm_ood.data.medical import medical_dataset, split_volumes


def test_split_is_by_volume_seeded_and_covers_all():
    ids = [f"vol{i}" for i in range(20)]
    a = split_volumes(ids, seed=3)
    assert a == split_volumes(list(reversed(ids)), seed=3)
    assert a != split_volumes(ids, seed=4)
    counts = {s: list(a.values()).count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 16, "val": 2, "test": 2}
    small = split_volumes(["a", "b", "c"])
    assert sorted(small.values()) == ["test", "train", "val"]
    assert split_volumes(["only"]) == {"only": "train"}
    with pytest.raises(ValueError, match="sum"):
        split_volumes(ids, fractions=(0.5, 0.2, 0.2))


def test_medical_folder_has_no_slice_leakage_and_writes_a_manifest(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "scans").mkdir()
    for v in range(6):
        data = rng.normal(size=(8, 8, 4)).astype(np.float32)
        data[:, :, 3] = 0.0  # a constant (air-only) slice: flagged and left out
        nib.Nifti1Image(data, np.eye(4)).to_filename(tmp_path / "scans" / f"v{v}.nii.gz")
    (tmp_path / "scans" / "notes.txt").write_text("a sidecar: left out by the default ignore list")
    (tmp_path / "scans" / "junk.bin").write_bytes(bytes(range(256)))
    errors = []
    splits = medical_dataset(tmp_path / "scans", seed=1, manifest=tmp_path / "manifest.csv", on_error=errors.append)
    volumes = {s: {x["meta"]["volume_id"] for x in samples} for s, samples in splits.items()}
    assert not (
        volumes["train"] & volumes["val"] or volumes["train"] & volumes["test"] or volumes["val"] & volumes["test"]
    )
    assert sum(len(v) for v in splits.values()) == 6 * 3
    assert [Path(e.path).name for e in errors] == ["junk.bin"]
    sample = splits["train"][0]
    assert set(sample) == {"image", "label", "meta"} and sample["image"].shape == (1, 8, 8) and sample["label"] == -1
    with open(tmp_path / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["n_slices"] for r in rows} == {"4"} and {r["n_flagged"] for r in rows} == {"1"}
    assert {r["split"] for r in rows if r["volume_id"] in volumes["val"]} == {"val"}


def test_volume_samples_stack_slices_in_order(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "scans").mkdir()
    vols = [rng.normal(size=(6, 8, 5)).astype(np.float32) for _ in range(3)]
    for v, data in enumerate(vols):
        nib.Nifti1Image(data, np.eye(4)).to_filename(tmp_path / "scans" / f"v{v}.nii")
    splits = medical_dataset(tmp_path / "scans", volumes=True)
    samples = [s for split in splits.values() for s in split]
    assert len(samples) == 3
    for s in samples:
        data = vols[int(s["meta"]["volume_id"][-5])]
        assert s["image"].shape == (1, 5, 8, 6)
        np.testing.assert_allclose(s["image"][0], data.transpose(2, 1, 0), rtol=1e-6)
