"""Anomaly-map files (`cdm_ood.ood.map_outputs`) for real NIfTI, DICOM-series and PNG inputs read by the readers:
names, grids, and the input's geometry; and `cdm-ood score --maps` writing them from a real checkpoint."""

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from click.testing import CliRunner
from dicom_factory import ct_dataset, write
from mlflow.tracking import MlflowClient
from PIL import Image
from processes import cdm

from cdm_ood.cli import main
from cdm_ood.data.discovery import discover
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.readers import iter_slices, read_file, read_source
from cdm_ood.data.volume_files import write_dicom_series, write_nifti
from cdm_ood.model.checkpoint import load_checkpoint, store_calibration
from cdm_ood.model.spec import Calibration
from cdm_ood.ood.map_outputs import MIN_PNG_SIDE, MapWriter, map_stems, write_maps


def random_maps(slices, seed: int = 0) -> list[np.ndarray]:
    """A map per slice on the slice's own grid, so what lands where can be checked pixel by pixel."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s.image.shape[-2:]).astype(np.float32) for s in slices]


def assert_png(path: Path, shape: tuple[int, int]) -> None:
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        factor = picture.size[1] // shape[0]
        assert picture.size == (shape[1] * factor, shape[0] * factor) and max(picture.size) >= MIN_PNG_SIDE


def test_a_nifti_volume_gets_slice_maps_and_a_map_volume_in_its_own_voxel_order_and_affine(tmp_path):
    affine = np.array([[-2.0, 0, 0, 30], [0, 0, 1.5, -20], [0, 3.0, 0, 5], [0, 0, 0, 1]])  # not RAS: reoriented
    source = tmp_path / "in" / "head.nii.gz"
    source.parent.mkdir()
    nib.save(nib.Nifti1Image(np.random.default_rng(1).normal(size=(12, 4, 10)).astype(np.float32), affine), source)
    slices = read_file(source)
    assert len(slices) == 4 and slices[0].image.shape == (1, 10, 12)
    maps = random_maps(slices)
    written = write_maps(tmp_path / "maps", zip(maps[:3], slices[:3], strict=True))  # the last slice unscored
    names = [f"head_s{k:04d}_map" for k in range(3)]
    assert [p.name for p in written] == [f"{n}{ext}" for n in names for ext in (".npy", ".png")] + ["head_map.nii.gz"]
    for name, amap in zip(names, maps, strict=False):
        saved = np.load(tmp_path / "maps" / f"{name}.npy")
        assert saved.dtype == np.float32 and np.array_equal(saved, amap)
        assert_png(tmp_path / "maps" / f"{name}.png", amap.shape)
    volume = nib.load(tmp_path / "maps" / "head_map.nii.gz")
    assert volume.shape == (12, 4, 10) and np.array_equal(volume.affine, affine)
    back = read_file(tmp_path / "maps" / "head_map.nii.gz")  # the readers give each map back as its slice's
    assert all(np.array_equal(b.image[0], m) for b, m in zip(back, maps[:3], strict=False))
    assert np.isnan(back[3].image).all()
    assert sorted(p.name for p in source.parent.iterdir()) == ["head.nii.gz"]  # nothing written beside the input


def test_a_dicom_series_gets_a_map_volume_with_the_series_geometry(tmp_path):
    series = tmp_path / "series_a"
    x, y = np.array([0.8, 0.6, 0.0]), np.array([0.0, 0.0, -1.0])  # oblique rows, columns going down in z
    normal = np.cross(x, y)
    for k, name in enumerate(["c.dcm", "a.dcm", "b.dcm"]):  # file names out of position order
        ds = ct_dataset(np.full((6, 9), 10 * k, dtype=np.int16), series_uid="1.2.3.4", instance=k + 1)
        ds.ImageOrientationPatient = [*x, *y]
        ds.ImagePositionPatient = list(np.array([10.0, -5.0, 40.0]) + 2.5 * k * normal)
        ds.PixelSpacing = [0.7, 0.9]  # between rows, between columns
        write(ds, series / name)
    slices = list(iter_slices(series))
    assert [s.source.index for s in slices] == [0, 1, 2]
    maps = random_maps(slices, seed=2)
    written = write_maps(tmp_path / "maps", zip(maps, slices, strict=True))
    assert written[-1].name == "series_a_map.nii.gz" and written[0].name == "series_a_s0000_map.npy"
    volume = nib.load(written[-1])
    data = np.asarray(volume.dataobj)
    assert data.shape == (9, 6, 3) and all(np.array_equal(data[:, :, k].T, maps[k]) for k in range(3))
    lps = ct_position(slices[2].source.path) + 4 * 0.9 * x + 5 * 0.7 * y  # column 4, row 5 of the third slice
    assert np.allclose(volume.affine @ [4, 5, 2, 1], [-lps[0], -lps[1], lps[2], 1])
    assert_png(written[1], (6, 9))


def ct_position(path: str) -> np.ndarray:
    import pydicom

    return np.asarray(pydicom.dcmread(path).ImagePositionPatient, dtype=np.float64)


def test_a_png_map_is_resized_to_the_image_and_equal_stems_do_not_collide(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)).save(tmp_path / folder / "xray.png")
    slices = [s for folder in ("a", "b") for s in iter_slices(tmp_path / folder)]
    model_space = [np.full((8, 8), 3.0, dtype=np.float32), np.outer(np.arange(8), np.ones(8)).astype(np.float32)]
    written = write_maps(tmp_path / "maps", zip(model_space, slices, strict=True))
    assert [p.name for p in written] == ["xray_s0000_map.npy", "xray_s0000_map.png",
                                         "xray-2_s0000_map.npy", "xray-2_s0000_map.png"]  # fmt: skip
    flat, ramp = (np.load(p) for p in written[::2])
    assert flat.shape == ramp.shape == (20, 30) and np.allclose(flat, 3.0)
    assert (np.diff(ramp, axis=0) >= 0).all() and ramp[-1, 0] > ramp[0, 0]  # rows stay rows when resized
    assert_png(written[1], (20, 30))
    assert all(sorted(p.name for p in (tmp_path / f).iterdir()) == ["xray.png"] for f in ("a", "b"))


def test_the_discovered_files_name_the_maps_and_size_the_series_whatever_share_a_writer_sees(tmp_path):
    volume = phantom_volume(np.random.default_rng(0), size=16, slices=2)
    for folder in ("a", "b"):
        write_nifti(volume, tmp_path / "in" / folder / "scan.nii.gz")
        write_dicom_series(volume, tmp_path / "in" / folder / "ser", modality="ct", volume_index=0)
    found = discover(tmp_path / "in")
    assert sorted(map_stems(found).values()) == ["scan", "scan-2", "ser", "ser-2"]
    share = [s for f in found if f.path.startswith(str(tmp_path / "in" / "b")) for s in read_source(f)]
    share = [s for s in share if not s.source.path.endswith("slice_001.dcm")]  # as if the last slice were flagged
    written = write_maps(tmp_path / "maps", ((np.ones((16, 16)), s) for s in share), sources=found)  # rank 2's
    assert {p.name.split("_s")[0].removesuffix("_map.nii.gz") for p in written} == {"scan-2", "ser-2"}
    series = np.asarray(nib.load(tmp_path / "maps" / "ser-2_map.nii.gz").dataobj)
    assert series.shape == (16, 16, 2) and (series[:, :, 0] == 1).all() and np.isnan(series[:, :, 1]).all()


def test_score_maps_writes_maps_for_dicom_nifti_and_png_inputs(checkpoint, tmp_path):
    scans = tmp_path / "scans"
    volume = phantom_volume(np.random.default_rng(4), size=24, slices=3, modality="ct")
    write_dicom_series(volume, scans / "series", modality="ct", volume_index=0, spacing=0.8)
    affine = np.array([[0, -1.5, 0, -10], [2.0, 0, 0, 7], [0, 0, 1.0, 3], [0, 0, 0, 1]])  # rows, columns swapped
    write_nifti(volume, scans / "body.nii.gz", affine=affine)
    Image.fromarray(np.clip(volume[1] + 1000, 0, 255).astype(np.uint8)[:, :20]).save(scans / "slice.png")
    before = sorted(p.name for p in scans.rglob("*"))
    maps = tmp_path / "maps"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    scored = cdm("score", scans, "--checkpoint", checkpoint, "--threshold", "1e12", "--out", tmp_path / "r.csv",
                 "--maps", maps, "--mlflow", "--tracking-uri", store, cwd=tmp_path)  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["maps"] == str(maps)
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("cdm-ood-score").experiment_id])
    gallery = sorted(a.path for a in client.list_artifacts(run.info.run_id) if a.path.endswith("_map.png"))
    assert gallery == sorted(p.name for p in maps.glob("*_map.png")) and len(gallery) == 7
    assert sorted(p.name for p in scans.rglob("*")) == before  # inputs untouched, nothing written beside them
    slices = [f"{stem}_s{k:04d}_map" for stem in ("body", "series") for k in range(3)] + ["slice_s0000_map"]
    assert sorted(p.name for p in maps.iterdir()) == sorted(
        [f"{name}{ext}" for name in slices for ext in (".npy", ".png")]
        + ["body_map.nii.gz", "series_map.nii.gz"]
        + ["series_map.dcm", "series_sr.dcm"]  # the DICOM series' Parametric Map and SR (test_dicom_results.py)
    )
    for name in slices:
        amap = np.load(maps / f"{name}.npy")
        assert amap.shape == ((24, 20) if name.startswith("slice") else (24, 24)) and np.isfinite(amap).all()
        assert amap.min() >= 0 and amap.std() > 0
    assert_png(maps / "slice_s0000_map.png", (24, 20))
    body = nib.load(maps / "body_map.nii.gz")
    assert body.shape == nib.load(scans / "body.nii.gz").shape and np.array_equal(body.affine, affine)
    back = read_file(maps / "body_map.nii.gz")  # slice k of the map volume is the map of the input's slice k
    assert all(np.array_equal(s.image[0], np.load(maps / f"body_s{k:04d}_map.npy")) for k, s in enumerate(back))
    series = nib.load(maps / "series_map.nii.gz")
    assert np.allclose(series.affine, np.diag([-0.8, -0.8, 0.8, 1.0]))  # LPS rows/columns, slices 0.8 mm apart
    assert np.array_equal(np.asarray(series.dataobj)[:, :, 2].T, np.load(maps / "series_s0002_map.npy"))


def test_score_maps_needs_the_calibrated_map_detector(checkpoint, tmp_path):
    copy = tmp_path / "no-map.pt"
    shutil.copy(checkpoint, copy)
    calibration = Calibration.from_dict(load_checkpoint(copy)["calibration"])
    del calibration.detectors["map"]
    store_calibration(copy, calibration)
    scan = tmp_path / "body.nii.gz"
    write_nifti(phantom_volume(np.random.default_rng(0), size=16, slices=2), scan)
    scored = cdm("score", scan, "--checkpoint", copy, "--out", tmp_path / "r.csv", "--maps", tmp_path / "maps",
                 cwd=tmp_path)  # fmt: skip
    assert scored.returncode == 2 and "--maps needs the calibrated 'map' detector" in scored.stderr
    assert not (tmp_path / "maps").exists() and not (tmp_path / "r.csv").exists()


def test_score_maps_never_scans_its_own_folder_and_refuses_an_input(checkpoint, tmp_path):
    scans = tmp_path / "scans"
    write_nifti(phantom_volume(np.random.default_rng(0), size=16, slices=2), scans / "body.nii.gz")
    refused = cdm("score", scans, "--checkpoint", checkpoint, "--out", tmp_path / "r.csv", "--maps", scans,
                  cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 2 and "must not be one of the inputs or hold one" in refused.stderr
    maps = scans / "maps"
    for _ in range(2):  # the second run finds the first run's maps inside the scanned folder, and leaves them out
        scored = cdm("score", scans, "--checkpoint", checkpoint, "--threshold", "1e12", "--out", tmp_path / "r.csv",
                     "--maps", maps, cwd=tmp_path)  # fmt: skip
        assert scored.returncode == 0, scored.stderr
    with open(tmp_path / "r.csv", newline="") as f:
        assert {Path(r["path"]).name for r in csv.DictReader(f)} == {"body.nii.gz"}
    assert sorted(p.name for p in maps.iterdir()) == sorted(
        ["body_map.nii.gz", *(f"body_s{k:04d}_map{ext}" for k in range(2) for ext in (".npy", ".png"))]
    )


def mixed_series(folder: Path, rng: np.random.Generator) -> None:
    """A 3-slice 16x16 CT series whose middle slice is constant (flagged, never scored)."""
    write_dicom_series(phantom_volume(rng, size=16, slices=3), folder, modality="ct", volume_index=1)
    ds = pydicom.dcmread(folder / "slice_001.dcm")
    ds.PixelData = np.full((16, 16), 40, np.int16).tobytes()
    ds.save_as(folder / "slice_001.dcm")


def test_a_map_that_cannot_be_written_is_its_images_failure_never_an_exception(tmp_path):
    write_dicom_series(phantom_volume(np.random.default_rng(2), size=16, slices=3), tmp_path / "in" / "mixed",
                       modality="ct", volume_index=1)  # fmt: skip
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "in" / "xray.png")
    (tmp_path / "maps" / "xray_s0000_map.npy").mkdir(parents=True)  # a folder where the map file must go
    slices = list(iter_slices(tmp_path / "in"))
    slices[1] = replace(slices[1], image=np.ones((1, 32, 32), np.float32))  # a slice of another size in its volume
    writer = MapWriter(tmp_path / "maps")
    written = [p for s in slices for p in writer.write(np.ones((16, 16), np.float32), s)] + writer.finish()
    assert sorted(p.name for p in written) == [f"mixed_s000{k}_map.{ext}" for k in range(3) for ext in ("npy", "png")]
    one, whole = sorted(writer.pop_failures(), key=lambda f: f.whole)
    (xray,) = [s for s in slices if s.source.path.endswith("xray.png")]
    assert (one.whole, one.source) == (False, xray.source) and one.reason.startswith("IsADirectoryError")
    series = {s.source.volume_id for s in slices if s is not xray}
    assert (whole.whole, whole.source.path, {whole.source.volume_id}) == (True, str(tmp_path / "in" / "mixed"), series)
    assert whole.reason == "mixed_map.nii.gz: ValueError: its slices differ in size (16x16, 32x32)"
    assert writer.failures == [] and not (tmp_path / "maps" / "mixed_map.nii.gz").exists()


def test_score_maps_runs_past_a_mixed_series_and_a_map_it_cannot_write_and_resumes(checkpoint, tmp_path):
    scans, maps, rng = tmp_path / "scans", tmp_path / "maps", np.random.default_rng(6)
    write_dicom_series(phantom_volume(rng, size=16, slices=3), scans / "good", modality="ct", volume_index=0)
    mixed_series(scans / "mixed", rng)
    write_nifti(phantom_volume(rng, size=16, slices=2), scans / "body.nii.gz")
    (maps / "body_s0001_map.npy").mkdir(parents=True)  # the map of body's slice 1 cannot be written
    for extra in ((), ("--resume",)):  # --resume scores the same files again the same way
        out = CliRunner().invoke(main, ["score", str(scans), "--checkpoint", str(checkpoint), "--threshold", "1e12",
                                        "--out", str(tmp_path / "r.csv"), "--maps", str(maps), *extra])  # fmt: skip
        assert out.exit_code == 1 and isinstance(out.exception, SystemExit), out.output  # a gate decision, no crash
        with open(tmp_path / "r.csv", newline="") as f:
            rows = {(r["level"], Path(r["path"]).name, r["slice"]): r for r in csv.DictReader(f)}
        verdicts = {key: r["verdict"] for key, r in rows.items() if key[0] != "slice"}
        assert verdicts == {
            ("volume", "good", ""): "in",
            ("volume", "mixed", ""): "flagged",
            ("volume", "body.nii.gz", ""): "flagged",
            ("file", "body.nii.gz", "1"): "flagged",
        }
        odd = "constant pixels"
        assert rows["slice", "slice_001.dcm", "1"]["reason"] == f"not scored: {odd}"
        assert rows["volume", "mixed", ""]["reason"].startswith(f"1 of 3 slices flagged (not scored: {odd}); ")
        lost = rows["file", "body.nii.gz", "1"]["reason"]
        assert lost.startswith("map not written: IsADirectoryError")
        assert rows["volume", "body.nii.gz", ""]["reason"].startswith(f"{lost}; mean of 2 slice scores")
        assert {r["verdict"] for key, r in rows.items() if key[:2] == ("slice", "body.nii.gz")} == {"in"}
    names = sorted(p.name for p in maps.iterdir())
    assert names == sorted([*(f"good_s000{k}_map.{ext}" for k in range(3) for ext in ("npy", "png")), "good_map.nii.gz",
                            *(f"mixed_s000{k}_map.{ext}" for k in (0, 2) for ext in ("npy", "png")), "mixed_map.nii.gz",
                            "body_s0000_map.npy", "body_s0000_map.png", "body_s0001_map.npy",
                            "body_map.nii.gz", "good_map.dcm", "good_sr.dcm", "mixed_map.dcm",
                            "mixed_sr.dcm"])  # fmt: skip
    assert maps.joinpath("body_s0001_map.npy").is_dir()
