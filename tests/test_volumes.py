"""3D models score whole volumes: `cdm-ood score`, `calibrate`, `evaluate`, the Python API, `ScoreOODd` and the
served pyfunc model, on a tiny 3D CT-phantom model trained once for this module."""

import json
import shutil
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
from processes import cdm
from test_score import invoke

from cdm_ood import OODDetector, ScoreOODd
from cdm_ood.data.artifacts import corrupt_volume
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.volume_files import write_dicom_series, write_nifti
from cdm_ood.jobs.config import load_config
from cdm_ood.jobs.training import train

CONFIG = Path(__file__).parent.parent / "configs" / "phantoms-ct-3d.yaml"
TINY_3D = [
    "data.phantoms={n: 6, size: 16, slices: 8}", "data.size=[8, 16, 16]", "model.channels=[8, 16]",
    "model.attention_levels=[false, false]", "model.num_head_channels=8", "schedule.T=10", "train.steps=20",
    "train.batch_size=2", "train.threads=1", "optim.warmup_steps=5", "train.val_every=20",
    "train.checkpoint_every=20", "train.val_samples=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def model3d(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny 3D model (8x16x16, T=10, 20 steps: seconds) calibrated by `cdm-ood calibrate` on its 6 training
    volumes; returns the checkpoint and that folder."""
    root = tmp_path_factory.mktemp("vol3d")
    checkpoint = train(load_config(CONFIG, [f"data.root={root / 'phantoms'}", *TINY_3D]), root / "run")
    out = invoke("calibrate", root / "phantoms", "--checkpoint", checkpoint)
    assert out.exit_code == 0, out.output
    assert "calibrated on 6 volumes" in out.output
    return checkpoint, root / "phantoms"


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """A clean NIfTI volume, a DICOM series, a spiked volume, a volume with a NaN voxel, a truncated NIfTI and a
    DICOM series with a truncated file."""
    folder, rng = tmp_path_factory.mktemp("volumes"), np.random.default_rng(5)
    clean = phantom_volume(rng, size=16, slices=8)
    write_nifti(clean, folder / "clean.nii.gz")
    write_dicom_series(phantom_volume(rng, size=16, slices=8), folder / "series", modality="ct", volume_index=1)
    write_nifti(corrupt_volume(clean, "spike", "strong", 3, "ct")[0], folder / "spiked.nii.gz")
    nan = clean.copy()
    nan[3, 4, 5] = np.nan
    write_nifti(nan, folder / "nan.nii.gz")
    data = (folder / "clean.nii.gz").read_bytes()
    (folder / "broken.nii.gz").write_bytes(data[: len(data) // 2])
    write_dicom_series(phantom_volume(rng, size=16, slices=8), folder / "gap", modality="ct", volume_index=2)
    data = (folder / "gap" / "slice_003.dcm").read_bytes()
    (folder / "gap" / "slice_003.dcm").write_bytes(data[: len(data) - 200])
    return folder


def report(folder: Path, checkpoint: Path, out: Path, *extra) -> tuple[int, list[dict]]:
    done = cdm("score", folder, "--checkpoint", checkpoint, "--out", out, *extra, cwd=out.parent)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(out.read_text())["rows"]


def test_score_gives_one_row_per_volume_and_file_rows(model3d, volumes, tmp_path):
    checkpoint, _ = model3d
    code, rows = report(volumes, checkpoint, tmp_path / "r.json")
    assert code == 1  # a flagged volume and an unreadable file fail the gate
    assert {r["level"] for r in rows} == {"volume", "file"}, "no slice rows for a 3D model"
    by_path = {Path(r["path"]).name: r for r in rows if r["verdict"] != "ignored"}
    names = ["broken.nii.gz", "clean.nii.gz", "nan.nii.gz", "series", "slice_003.dcm", "spiked.nii.gz"]
    assert sorted(by_path) == names, "the series with an unreadable file is not scored"
    for name in ("broken.nii.gz", "slice_003.dcm"):
        assert (by_path[name]["level"], by_path[name]["verdict"]) == ("file", "unreadable")
    assert by_path["nan.nii.gz"] | {"score": None} == by_path["nan.nii.gz"]
    assert (by_path["nan.nii.gz"]["verdict"], by_path["nan.nii.gz"]["reason"]) == (
        "flagged", "not scored: nan-or-inf pixels")  # fmt: skip
    for name in ("clean.nii.gz", "series", "spiked.nii.gz"):
        row = by_path[name]
        assert np.isfinite(row["score"]) and row["verdict"] == ("ood" if row["score"] > row["threshold"] else "in")
    code, rows = report(volumes / "clean.nii.gz", checkpoint, tmp_path / "one.json", "--threshold", "1e9")
    assert code == 0 and [r["verdict"] for r in rows] == ["in"]


def test_api_scores_arrays_paths_and_monai_volumes_as_the_cli(model3d, volumes, tmp_path):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    checkpoint, _ = model3d
    _, rows = report(volumes / "clean.nii.gz", checkpoint, tmp_path / "r.json")
    cli = rows[0]["score"]
    detector = OODDetector.from_checkpoint(checkpoint)
    import nibabel as nib

    data = np.asarray(nib.load(volumes / "clean.nii.gz").dataobj).transpose(2, 1, 0)  # (D, H, W) as written
    for volume in (data, data[None], data[None, None]):  # (D, H, W), (C, D, H, W), (B, C, D, H, W)
        np.testing.assert_allclose(detector.score(volume), [cli], rtol=1e-5)
    np.testing.assert_allclose(detector.score(volumes / "clean.nii.gz"), [cli], rtol=1e-5)
    bad = np.stack([data, data])[:, None]
    bad[0, 0, 2, 3, 3], bad[1] = np.inf, 7.0
    assert [a["verdict"] for a in detector.assess(bad)] == ["flagged", "flagged"]
    assert list(detector.predict(bad)) == [True, True] and np.isnan(detector.score(bad)).all()
    loaded = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS")])
    out = ScoreOODd("image", detector)(loaded({"image": str(volumes / "clean.nii.gz")}))
    np.testing.assert_allclose(out["image_ood_score"], cli, rtol=1e-5)
    frame = detector.score_frame([volumes / "series", data])
    assert list(frame["level"]) == ["volume", "volume"] and frame["score"].notna().all()


def test_calibrate_and_evaluate_on_volumes(model3d, volumes, tmp_path, caplog):
    checkpoint, phantoms = model3d
    copy = shutil.copy(checkpoint, tmp_path / "model.pt")
    out = invoke("calibrate", phantoms, volumes / "clean.nii.gz", "--checkpoint", copy, "--fpr", "0.1")
    assert out.exit_code == 0, out.output
    assert "calibrated on 7 volumes" in out.output
    assert "held-out in-distribution images for a false-positive rate of 0.1" in caplog.text  # few volumes
    out = invoke("evaluate", phantoms, "--checkpoint", copy, "--ood", f"spike={volumes / 'spiked.nii.gz'}",
                 "--ood", f"series={volumes / 'series'}", "--out-dir", tmp_path / "eval")  # fmt: skip
    assert out.exit_code == 0, out.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {(m["ood_set"], m["n_id"], m["n_ood"]) for m in metrics} == {("spike", 6, 1), ("series", 6, 1)}


def test_pyfunc_model_scores_volumes_as_the_api(model3d, tmp_path, monkeypatch):
    checkpoint, _ = model3d
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts beside the store, not in the working tree
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = invoke("log-model", "--checkpoint", checkpoint, "--tracking-uri", store)
    assert out.exit_code == 0, out.output
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model(out.stdout.strip().splitlines()[-1])
    detector = OODDetector.from_checkpoint(checkpoint)
    batch = np.stack([phantom_volume(np.random.default_rng(seed), size=16, slices=8) for seed in (1, 2)])
    expected = detector.score(batch[:, None])
    np.testing.assert_allclose(model.predict(batch)["score"], expected, rtol=1e-5)  # (B, D, H, W)
    predicted = model.predict(batch[:, None])  # (B, C, D, H, W)
    np.testing.assert_allclose(predicted["score"], expected, rtol=1e-5)
    assert np.isfinite(predicted["log_likelihood"]).all() and (predicted["verdict"] != "flagged").all()


def test_score_maps_of_a_3d_model_are_written_per_volume(model3d, volumes, tmp_path):
    checkpoint, _ = model3d
    maps = tmp_path / "maps"
    scored = cdm("score", volumes / "clean.nii.gz", volumes / "series", "--checkpoint", checkpoint, "--threshold",
                 "1e12", "--out", tmp_path / "r.csv", "--maps", maps, cwd=tmp_path)  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    for stem in ("clean", "series"):
        volume = nib.load(maps / f"{stem}_map.nii.gz")
        data = np.asarray(volume.dataobj)
        assert data.shape == (16, 16, 8) and np.isfinite(data).all()
        for k in range(8):
            assert np.array_equal(data[:, :, k].T, np.load(maps / f"{stem}_s{k:04d}_map.npy"))
    assert np.array_equal(nib.load(maps / "clean_map.nii.gz").affine, nib.load(volumes / "clean.nii.gz").affine)
    assert np.allclose(nib.load(maps / "series_map.nii.gz").affine, np.diag([-1.0, -1.0, 1.0, 1.0]))


def test_a_series_with_slices_of_two_sizes_is_two_volumes_each_named_by_its_size(model3d, tmp_path):
    import pydicom

    from cdm_ood.data.volumes import iter_volumes

    rng = np.random.default_rng(8)
    uid = write_dicom_series(phantom_volume(rng, size=16, slices=8), tmp_path / "mixed", modality="ct",
                             volume_index=0)  # fmt: skip
    for k in (5, 6):
        ds = pydicom.dcmread(tmp_path / "mixed" / f"slice_00{k}.dcm")
        ds.Rows = ds.Columns = 32
        ds.PixelData = phantom_volume(rng, size=32, slices=1)[0].astype(np.int16).tobytes()
        ds.save_as(tmp_path / "mixed" / f"slice_00{k}.dcm")
    volumes = list(iter_volumes(tmp_path / "mixed"))
    assert sorted((v.source.volume_id, v.image.shape, v.flags) for v in volumes) == [
        (f"{uid}[16x16]", (1, 6, 16, 16), ()), (f"{uid}[32x32]", (1, 2, 32, 32), ())]  # fmt: skip
    out = invoke("score", tmp_path / "mixed", "--checkpoint", model3d[0], "--threshold", "1e12", "--out",
                 tmp_path / "r.json")  # fmt: skip
    assert out.exit_code == 0, out.output
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["level"], r["volume"], r["verdict"]) for r in rows] == [
        ("volume", f"{uid}[16x16]", "in"), ("volume", f"{uid}[32x32]", "in")]  # fmt: skip
    for k, r in enumerate(rows, 1):
        size = r["volume"][-6:-1]
        assert r["series_part"] == f"series split by slice size into 2 volumes: part {k}, Rows x Columns {size}"
        assert r["reason"] == r["series_part"], "a 3D model's volume row names the split as its reason"


def test_defects_are_localized_by_a_3d_model(model3d, tmp_path):
    from cdm_ood.data.phantom_sets import make_phantoms
    from cdm_ood.ood.localization import ALL, localize_defects

    manifest = make_phantoms(tmp_path / "defects", 1, "dicom", size=16, slices=8, seed=2, defects=True)
    results = localize_defects(OODDetector.from_checkpoint(model3d[0]), manifest)
    assert len(results) == 5 and 0.5 < results[ALL]["pixel_auroc"] <= 1.0, results
