"""`OODDetector` as sklearn / pytorch-ood / MONAI users call it: the inputs it takes, batched forward passes,
`score_frame`, the sklearn sign conventions, `repr`, and `fit` on arrays, folders and paths."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from cdm_ood import OODDetector
from cdm_ood.cli import main
from cdm_ood.data import iter_slices
from cdm_ood.data.errors import DataError
from cdm_ood.data.phantoms import phantom_volume
from cdm_ood.data.volume_files import write_dicom_series, write_nifti
from cdm_ood.errors import UsageError
from cdm_ood.ood.features import DENOISE_FRACTIONS
from cdm_ood.ood.report import COLUMNS


class CountingClassifier(torch.nn.Module):
    """The real classifier, counting its forward passes and the images each one sees."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, *args, **kwargs):
        self.batches.append(len(args[0]))
        return self.inner(*args, **kwargs)


def counting(checkpoint: Path, **kwargs) -> tuple[OODDetector, CountingClassifier]:
    detector = OODDetector.from_checkpoint(checkpoint, **kwargs)
    detector.model.classifier = CountingClassifier(detector.model.classifier)
    return detector, detector.model.classifier


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """Four CT phantom volumes of 4 slices: two NIfTI files and two DICOM series (8 + 8 slices)."""
    folder = tmp_path_factory.mktemp("volumes")
    rng = np.random.default_rng(3)
    for k in range(2):
        write_nifti(phantom_volume(rng, size=16, slices=4), folder / f"vol{k}.nii.gz")
        write_dicom_series(phantom_volume(rng, size=16, slices=4), folder / f"series{k}", modality="ct",
                           volume_index=k)  # fmt: skip
    return folder


def stack(volumes: Path) -> np.ndarray:
    """Every slice below `volumes` as one (N, H, W) array in HU."""
    return np.stack([s.image[0] for s in iter_slices(volumes)])


def passes(*chunks: int, transposes: bool = False) -> list[int]:
    """The batch sizes the classifier sees for chunks of these sizes, with every feature of the default detector (and
    every detector): the profile, the denoising errors at all levels in one pass, the image's two mirror images and,
    for calibration (`transposes`: the volume checks), the transposed images."""
    return [n * m for n in chunks for m in (1, len(DENOISE_FRACTIONS), 2, *((1,) if transposes else ()))]


def test_fit_on_an_array_runs_batched_forward_passes_like_a_list(checkpoint, volumes):
    images = stack(volumes)  # (16, 16, 16)
    fitted = {}
    shapes = {"array": images, "tensor": torch.from_numpy(images), "4d": images[:, None],
              "list of slices": list(images), "list of batches": [images[:5], images[5:]]}  # fmt: skip
    for name, inputs in shapes.items():
        detector, classifier = counting(checkpoint, batch_size=6)
        detector.fit(inputs, fpr=0.25)
        assert classifier.batches == passes(6, 6, 4, transposes=True), f"{name}: one batched pass per feature"
        fitted[name] = detector.id_scores
    assert all(np.array_equal(scores, fitted["array"]) for scores in fitted.values())


def test_score_and_predict_take_the_same_inputs_as_fit(checkpoint, volumes):
    images = stack(volumes)
    detector, classifier = counting(checkpoint, batch_size=64)
    expected = detector.score(images)
    assert len(expected) == 16 and classifier.batches == passes(16)
    for inputs in (images[:, None], list(images), [{"image": im[None]} for im in images], {"image": images[:, None]},
                   torch.from_numpy(images)):  # fmt: skip
        np.testing.assert_allclose(detector.score(inputs), expected, rtol=1e-5)
    assert detector.predict(images).tolist() == [a["verdict"] != "in" for a in detector.assess(images)]
    assert len(detector.assess(list(images))) == 16
    with pytest.raises(UsageError, match=r"ambiguous.*\(1, 3, H, W\).*\(3, 1, H, W\)"):
        detector.score(images[:3])
    with pytest.raises(TypeError, match="cannot score a int"):
        detector.score(7)


def test_empty_inputs_give_empty_results(checkpoint):
    detector = OODDetector.from_checkpoint(checkpoint)
    assert detector.score([]).shape == (0,) and detector.predict([]).dtype == bool and detector.assess([]) == []
    assert detector.decision_function([]).shape == (0,)
    frame = detector.score_frame([])
    assert isinstance(frame, pd.DataFrame) and frame.empty and tuple(frame.columns) == COLUMNS
    with pytest.raises(UsageError, match="at least 4 scorable"):
        detector.fit([])


def test_fit_reads_a_folder_given_as_str_or_path(checkpoint, volumes, tmp_path):
    detector = OODDetector.from_checkpoint(checkpoint, batch_size=8)
    by_str = detector.fit(str(volumes), fpr=0.25).id_scores
    by_path = detector.fit(volumes, fpr=0.25).id_scores
    calibration = detector.model.calibration
    assert calibration.n_fit + len(by_path) == 16, "every slice of the folder, not the characters of its name"
    np.testing.assert_array_equal(by_str, by_path)
    np.testing.assert_allclose(detector.score(str(volumes)), detector.score(stack(volumes)), rtol=1e-5)
    saved = tmp_path / "model.pt"
    saved.write_bytes(checkpoint.read_bytes())
    detector.save(saved)
    assert OODDetector.from_checkpoint(saved).threshold == pytest.approx(detector.threshold)


def test_score_samples_and_decision_function_follow_sklearn_signs(checkpoint, volumes):
    detector = OODDetector.from_checkpoint(checkpoint)
    images = stack(volumes)
    detector.set_threshold(float(np.median(detector.score(images))))  # half of them above
    score = detector.score(images)
    np.testing.assert_array_equal(detector.score_samples(images), -score)
    decision = detector.decision_function(images)
    np.testing.assert_allclose(decision, detector.threshold - score)
    np.testing.assert_array_equal(decision < 0, detector.predict(images))
    assert (decision < 0).any() and (decision >= 0).any()
    assert detector.offset_ == -detector.threshold


def test_score_frame_of_paths_is_the_report_of_cdm_ood_score(checkpoint, volumes, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "vol0.nii.gz").write_bytes((volumes / "vol0.nii.gz").read_bytes())
    good = (volumes / "series0" / "slice_000.dcm").read_bytes()
    (folder / "broken.dcm").write_bytes(good[: len(good) // 2])
    detector = OODDetector.from_checkpoint(checkpoint)
    frame = detector.score_frame(folder)
    out = CliRunner().invoke(main, ["score", str(folder), "--checkpoint", str(checkpoint), "--out",
                                    str(tmp_path / "r.csv")])  # fmt: skip
    assert out.exit_code == 1, out.output
    report = pd.read_csv(tmp_path / "r.csv", keep_default_na=False)
    assert tuple(frame.columns) == COLUMNS and len(frame) == len(report) == 1 + 4 + 1
    assert frame["verdict"].tolist() == report["verdict"].tolist()
    assert frame["reason"].tolist() == report["reason"].tolist()
    reported = pd.to_numeric(report["score"], errors="coerce")
    np.testing.assert_allclose(frame["score"].to_numpy(), reported.to_numpy(), rtol=1e-5)
    broken = frame[frame["level"] == "file"].iloc[0]
    assert broken["path"] == str(folder / "broken.dcm") and broken["verdict"] == "unreadable"
    slices = frame[frame["level"] == "slice"]
    assert slices["slice"].tolist() == [0, 1, 2, 3] and set(slices["volume"]) == {str(folder / "vol0.nii.gz")}

    skipped = detector.score_frame([folder], on_error="skip")
    assert "unreadable" not in set(skipped["verdict"]) and len(skipped) == 5
    with pytest.raises(DataError, match=r"broken\.dcm"):
        detector.score_frame(folder, on_error="raise")
    with pytest.raises(UsageError, match="on_error"):
        detector.score_frame(folder, on_error="ignore")


def test_score_frame_of_images_in_memory(checkpoint, volumes):
    detector = OODDetector.from_checkpoint(checkpoint, threshold=1e12)
    images = stack(volumes)[:4]
    images[2] = np.nan
    frame = detector.score_frame(images)
    assert frame["slice"].tolist() == [0, 1, 2, 3] and frame["path"].isna().all() and frame["volume"].isna().all()
    assert frame["verdict"].tolist() == ["in", "in", "flagged", "in"]
    assert frame.loc[2, "reason"] == "not scored: nan-or-inf pixels" and math.isnan(frame.loc[2, "score"])


def test_repr_names_detector_threshold_fpr_and_model_but_no_path(checkpoint):
    detector = OODDetector.from_checkpoint(checkpoint, detector="multiscale")
    text = repr(detector)
    assert text.startswith("OODDetector(detector='multiscale', threshold=") and "fpr=0.05" in text
    assert "1x16x16 ct T=20" in text and str(checkpoint.parent) not in text and "/" not in text


def test_anomaly_maps_locate_a_local_defect_and_nan_for_unscorable_images(checkpoint, volumes):
    """A small block of metal (3000 HU) or air (-1000 HU) in the body: the map peaks inside it, either way."""
    detector = OODDetector.from_checkpoint(checkpoint, "map")
    images = stack(volumes)
    detector.fit(images, fpr=0.25)
    clean = detector.anomaly_maps(images)
    assert clean.shape == (16, 16, 16) and np.isfinite(clean).all()
    inside = np.zeros((16, 16), bool)
    inside[3:6, 9:12] = True
    for value in (3000.0, -1000.0):
        defect = images.copy()
        defect[:, inside] = value
        maps = detector.anomaly_maps(np.concatenate([defect, np.zeros((1, 16, 16))]))
        assert np.isnan(maps[-1]).all(), "a constant image is not scored, so it has no map"
        peaks = [np.unravel_index(np.argmax(m), m.shape) for m in maps[:-1]]
        assert np.mean([inside[p] for p in peaks]) > 0.8, value
        assert maps[:-1][:, inside].mean() > 2 * maps[:-1][:, ~inside].mean(), value
    np.testing.assert_allclose(detector.anomaly_maps_prepared(detector.prepare(defect)), maps[:-1], atol=1e-3)
