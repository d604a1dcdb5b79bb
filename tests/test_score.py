"""OOD scoring end to end: a real (tiny) trained checkpoint, real DICOM/NIfTI/PNG files, the real CLI."""

import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from conftest import PATIENT
from monai.transforms import Compose, Lambdad
from processes import cdm
from sklearn.metrics import roc_auc_score

from cdm_ood import OODDetector, ScoreOODd
from cdm_ood.cli import main
from cdm_ood.data import iter_slices
from cdm_ood.data.artifacts import ARTIFACTS
from cdm_ood.model.checkpoint import load_checkpoint
from cdm_ood.ood.calibration import DEFAULT_DETECTOR
from cdm_ood.ood.detectors import applicable


def digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def invoke(*args) -> Result:
    """The same command in-process (click's runner): seconds faster where a fresh process proves nothing."""
    return CliRunner().invoke(main, [str(a) for a in args])


def test_training_leaves_a_calibrated_checkpoint(checkpoint):
    ood = load_checkpoint(checkpoint)["calibration"]
    assert set(ood["detectors"]) == set(applicable(None)) and ood["fpr"] == 0.05
    detector = OODDetector.from_checkpoint(checkpoint)
    assert detector.name == DEFAULT_DETECTOR and np.isfinite(detector.threshold)


@pytest.mark.slow
def test_score_reports_every_file_and_exits_1_and_leaves_inputs_alone(checkpoint, scans, tmp_path):
    before = digest(scans)
    out = cdm("score", scans, "--checkpoint", checkpoint, "--out", tmp_path / "r.json", "--workers", 2,
              "--mlflow", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    assert digest(scans) == before, "inputs unchanged"
    report = json.loads((tmp_path / "r.json").read_text())
    rows = report["rows"]
    files = {r["path"] for r in rows if r["level"] in ("slice", "file")}
    expected = {str(p) for p in scans.rglob("*") if p.is_file()}
    assert files == expected, "every input file appears in the report"
    by_path = {r["path"]: r for r in rows if r["level"] == "file"}
    assert by_path[str(scans / "notes.txt")]["verdict"] == "ignored", "the text sidecar is not read, but shows"
    assert by_path[str(scans / "broken.dcm")]["verdict"] == "unreadable"
    assert by_path[str(scans / "broken.dcm")]["reason"].startswith("UnreadableFileError: ")
    assert by_path[str(scans / "junk.bin")]["reason"].startswith("NotAnImageError")
    blank = [r for r in rows if r["path"] == str(scans / "blank.png")]
    assert {r["verdict"] for r in blank} == {"flagged"} and "constant" in blank[0]["reason"]
    slices = [r for r in rows if r["level"] == "slice" and r["verdict"] in ("in", "ood")]
    assert len(slices) == 12 and all(r["sop_instance_uid"] for r in slices if r["path"].endswith(".dcm"))
    volumes = {r["volume"]: r for r in rows if r["level"] == "volume"}
    assert len(volumes) == 4 and volumes[str(scans / "blank.png")]["verdict"] == "flagged"
    for volume, row in volumes.items():
        members = [r["score"] for r in slices if r["volume"] == volume]
        if members:
            assert row["score"] == pytest.approx(np.mean(members))
            assert row["verdict"] == ("ood" if row["score"] > row["threshold"] else "in")
    assert report["summary"]["passed"] is False
    outputs = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert (tmp_path / "r_hist.png").exists() and any(p.name == "mlflow.db" for p in outputs)
    for text in [out.stdout, out.stderr, *(p.read_bytes().decode("latin-1") for p in outputs)]:
        for value in PATIENT.values():
            assert value not in text, "no patient identifier in any output"


@pytest.mark.slow
def test_threshold_modes_and_no_fail(checkpoint, scans, tmp_path):
    nifti = scans / "clean.nii.gz"
    ok = invoke("score", nifti, "--checkpoint", checkpoint, "--threshold", "1e12", "--out", tmp_path / "a.csv")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout.splitlines()[-1])["passed"] is True
    low = invoke("score", nifti, "--checkpoint", checkpoint, "--threshold", "-1e12", "--out", tmp_path / "b.csv")
    assert low.exit_code == 1
    lines = (tmp_path / "b.csv").read_text().splitlines()
    assert lines[0].startswith("level,path,slice") and all(",ood," in line for line in lines[1:])
    assert invoke("score", nifti, "--checkpoint", checkpoint, "--threshold", "-1e12", "--no-fail", "--out",
                  tmp_path / "c.csv").exit_code == 0  # fmt: skip
    thresholds = []
    for spec in ("auto", "fpr:0.5"):
        r = invoke("score", nifti, "--checkpoint", checkpoint, "--threshold", spec, "--detector", "nll", "--out",
                   tmp_path / "d.json", "--no-fail")  # fmt: skip
        assert r.exit_code == 0, r.output
        thresholds.append(json.loads((tmp_path / "d.json").read_text())["threshold"])
    assert thresholds[1] < thresholds[0]
    bad = invoke("score", nifti, "--checkpoint", checkpoint, "--threshold", "high")
    assert bad.exit_code == 2 and "'auto', 'fpr:<x>' or a number" in bad.stderr


def test_per_volume_mean_and_q95(checkpoint, scans, tmp_path):
    scores = {}
    for how in ("max", "mean", "q95"):
        invoke("score", scans / "spiked.nii.gz", "--checkpoint", checkpoint, "--per-volume", how, "--out",
               tmp_path / f"{how}.json", "--no-fail")  # fmt: skip
        rows = json.loads((tmp_path / f"{how}.json").read_text())["rows"]
        slices = np.array([r["score"] for r in rows if r["level"] == "slice"])
        (volume,) = [r["score"] for r in rows if r["level"] == "volume"]
        scores[how] = volume
        expected = {"max": slices.max(), "mean": slices.mean(), "q95": np.quantile(slices, 0.95)}[how]
        assert volume == pytest.approx(expected)
    assert scores["mean"] <= scores["q95"] <= scores["max"]


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_that_needs_pickle_code_is_refused_and_runs_nothing(scans, tmp_path):
    torch.save({"format": "x", "evil": Payload()}, tmp_path / "evil.pt")
    out = cdm("score", scans / "clean.nii.gz", "--checkpoint", tmp_path / "evil.pt", cwd=tmp_path)
    assert out.returncode == 2 and "refused" in out.stderr
    assert not (tmp_path / "pwned").exists()


def test_calibrate_command_rewrites_only_the_calibration(checkpoint, scans, tmp_path):
    copy = tmp_path / "model.pt"
    copy.write_bytes(checkpoint.read_bytes())
    out = invoke("calibrate", scans / "study", scans / "clean.nii.gz", "--checkpoint", copy, "--fpr", "0.1")
    assert out.exit_code == 0, out.output
    old, new = load_checkpoint(checkpoint), load_checkpoint(copy)
    assert new["calibration"]["fpr"] == 0.1 and new["calibration"]["n_fit"] == 4
    assert new["calibration"] != old["calibration"]
    assert all(torch.equal(old["ema"][k], new["ema"][k]) for k in old["ema"])


def test_python_api_on_tensors_arrays_paths_and_monai_dicts(checkpoint, scans):
    detector = OODDetector.from_checkpoint(checkpoint, detector="nll")
    path = scans / "clean.nii.gz"
    images = [s.image for s in iter_slices(path)]
    from_path = detector.score(path)
    np.testing.assert_allclose(detector.score(np.stack(images)), from_path, rtol=1e-5)
    np.testing.assert_allclose(detector.score(torch.from_numpy(images[0][0])), from_path[:1], rtol=1e-5)
    np.testing.assert_allclose(detector.score([{"image": im} for im in images]), from_path, rtol=1e-5)
    assert detector.predict(path).dtype == bool and len(detector.predict(path)) == 4
    chain = Compose([Lambdad("image", lambda im: im * 1.0), ScoreOODd("image", detector)])
    out = chain({"image": images[1], "id": "x"})
    assert out["image_ood_score"] == pytest.approx(from_path[1], rel=1e-5)
    assert out["image_ood"] == (from_path[1] > detector.threshold) and out["id"] == "x"


@pytest.mark.slow
def test_evaluate_writes_metrics_and_figures(checkpoint, scans, tmp_path):
    out = invoke("evaluate", scans / "clean.nii.gz", "--checkpoint", checkpoint, "--ood",
                 f"spike={scans / 'spiked.nii.gz'}", "--out-dir", tmp_path / "eval")  # fmt: skip
    assert out.exit_code == 0, out.output
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {(r["detector"], r["ood_set"]) for r in rows} == {(d, "spike") for d in applicable(None)}
    assert all(r["n_id"] == r["n_ood"] == 4 for r in rows)
    for r in rows:  # each AUROC from the detector's own scores of the two files (sklearn, spiked positive)
        detector = OODDetector.from_checkpoint(checkpoint, detector=r["detector"])
        scores = np.r_[detector.score(scans / "clean.nii.gz"), detector.score(scans / "spiked.nii.gz")]
        assert r["auroc"] == pytest.approx(roc_auc_score([0] * 4 + [1] * 4, scores)), r["detector"]
    auroc = {r["detector"]: r["auroc"] for r in rows}
    assert auroc["denoise"] == 1.0, "the denoising errors rank every strongly spiked slice above the clean ones"
    assert all((tmp_path / "eval" / f"{k}_{d}.png").stat().st_size > 1000 for k in ("roc", "hist")
               for d in applicable(None))  # fmt: skip
    assert "auroc" in out.stdout and "spike" in out.stdout
    page = (tmp_path / "eval" / "report.html").read_text()
    assert page.count("<tr><td>") == len(rows) and page.count("data:image/png;base64,") == 2 * len(rows)
    assert f"{rows[0]['auroc']:.4g}" in page and 'src="http' not in page


def doctored(checkpoint: Path, path: Path, change) -> Path:
    """A copy of the checkpoint with `change(payload)` applied, saved by the project's own writer."""
    from cdm_ood.model.checkpoint import save_checkpoint

    payload = load_checkpoint(checkpoint)
    change(payload)
    payload.pop("format")
    return save_checkpoint(path, payload)


def head_weight(payload: dict) -> str:
    return next(k for k in payload["ema"] if k.endswith("head.3.weight"))


@pytest.mark.parametrize("threshold", ["nan", "inf", "-inf", "fpr:nan"])
def test_thresholds_that_decide_nothing_are_usage_errors(checkpoint, scans, threshold):
    out = invoke("score", scans / "clean.nii.gz", "--checkpoint", checkpoint, "--threshold", threshold)
    assert out.exit_code == 2 and out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1
    assert "finite" in out.stderr or "false-positive rate" in out.stderr


@pytest.mark.parametrize("workers, reason", [("many", "'many' is neither a whole number nor 'auto'"),
                                             ("-1", "-1 is negative")])  # fmt: skip
def test_worker_counts_that_are_not_counts_are_usage_errors(checkpoint, scans, workers, reason):
    out = invoke("score", scans / "clean.nii.gz", "--checkpoint", checkpoint, "--workers", workers)
    assert out.exit_code == 2 and reason in out.output


def test_nan_weights_are_refused_and_overflowing_scores_are_flagged(checkpoint, scans, tmp_path):
    def nan_weights(payload: dict) -> None:
        payload["ema"][head_weight(payload)][0, 0] = float("nan")

    def overflow(payload: dict) -> None:  # finite weights whose logits overflow: no score is finite
        payload["ema"][head_weight(payload)].fill_(3e38)

    nan_ck = doctored(checkpoint, tmp_path / "nan.pt", nan_weights)
    out = invoke("score", scans / "clean.nii.gz", "--checkpoint", nan_ck, "--out", tmp_path / "a.csv")
    assert out.exit_code == 2 and "hold NaN or inf" in out.stderr and not (tmp_path / "a.csv").exists()
    big = doctored(checkpoint, tmp_path / "big.pt", overflow)
    out = invoke("score", scans / "clean.nii.gz", "--checkpoint", big, "--threshold", "1e12", "--out",
                 tmp_path / "b.json")  # fmt: skip
    assert out.exit_code == 1, out.output
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {r["verdict"] for r in rows} == {"flagged"} and (tmp_path / "b_hist.png").exists()
    reasons = {r["reason"] for r in rows if r["level"] == "slice"}
    assert reasons <= {f"not scored: the model's score is not finite ({v})" for v in ("nan", "inf")} and reasons


def test_a_volume_with_nan_slices_never_passes(checkpoint, scans, tmp_path):
    from cdm_ood.data.phantoms import phantom_volume
    from cdm_ood.data.volume_files import write_nifti

    volume = phantom_volume(np.random.default_rng(5), size=16, slices=16)
    volume[:8] = np.nan  # slices 0-7: all NaN
    write_nifti(volume, tmp_path / "half.nii.gz")
    out = invoke("score", tmp_path / "half.nii.gz", "--checkpoint", checkpoint, "--threshold", "1e12", "--out",
                 tmp_path / "r.json")  # fmt: skip
    assert out.exit_code == 1
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    (volume_row,) = [r for r in rows if r["level"] == "volume"]
    assert volume_row["verdict"] == "flagged" and volume_row["reason"].startswith("8 of 16 slices flagged")
    assert sum(r["verdict"] == "flagged" for r in rows if r["level"] == "slice") == 8


def test_an_uncalibrated_checkpoint_stops_score_in_one_line(checkpoint, scans, tmp_path):
    (step,) = (checkpoint.parent / "checkpoints").glob("step_*.pt")
    out = cdm("score", scans / "clean.nii.gz", "--checkpoint", step, "--out", tmp_path / "r.csv", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "calibrate" in out.stderr and "Traceback" not in out.stderr and not (tmp_path / "r.csv").exists()
    numeric = invoke("score", scans / "clean.nii.gz", "--checkpoint", step, "--threshold", "1e12", "--out",
                     tmp_path / "n.csv", "--detector", "multiscale")  # fmt: skip
    assert numeric.exit_code == 2 and "error: " in numeric.stderr


@pytest.mark.slow
def test_empty_and_unlistable_folders_fail_the_gate(checkpoint, scans, tmp_path):
    from processes import WITHOUT_ROOT_OVERRIDE

    (tmp_path / "empty").mkdir()
    out = invoke("score", tmp_path / "empty", "--checkpoint", checkpoint, "--out", tmp_path / "e.json")
    assert out.exit_code == 1
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["summary"]["passed"] is False and "no files" in report["rows"][0]["reason"]
    archive = tmp_path / "archive"
    (archive / "locked").mkdir(parents=True)
    (archive / "ok.nii.gz").write_bytes((scans / "clean.nii.gz").read_bytes())
    for i in range(16):
        (archive / "locked" / f"{i}.nii.gz").write_bytes((scans / "clean.nii.gz").read_bytes())
    (archive / "locked").chmod(0)
    try:
        out = cdm("score", archive, "--checkpoint", checkpoint, "--threshold", "1e12", "--out", tmp_path / "l.json",
                  cwd=tmp_path, prefix=WITHOUT_ROOT_OVERRIDE)  # fmt: skip
    finally:
        (archive / "locked").chmod(0o755)
    assert out.returncode == 1, out.stderr[-2000:]
    rows = {r["path"]: r for r in json.loads((tmp_path / "l.json").read_text())["rows"] if r["level"] == "file"}
    assert rows[str(archive / "locked")]["reason"].startswith("UnreadableFileError: cannot list folder")


def test_python_api_transform_and_report_flag_unscorable_images_alike(checkpoint, scans, tmp_path):
    from cdm_ood.data.volume_files import write_nifti

    detector = OODDetector.from_checkpoint(checkpoint, threshold=1e12)  # every scorable image is `in`
    image = next(iter_slices(scans / "clean.nii.gz")).image
    nan, inf = np.full_like(image, np.nan), image.copy()
    inf[0, 2, 2] = np.inf
    assert detector.predict(nan).tolist() == [True] and detector.predict(inf).tolist() == [True]
    assert np.isnan(detector.score(np.stack([nan, inf]))).all() and not detector.predict(image)[0]
    chain = Compose([ScoreOODd("image", detector)])
    outputs = [chain({"image": im}) for im in (nan, inf, torch.from_numpy(inf))]
    assert all(o["image_ood"] and o["image_ood_verdict"] == "flagged" and np.isnan(o["image_ood_score"])
               for o in outputs)  # fmt: skip
    write_nifti(np.stack([nan[0], inf[0]]), tmp_path / "bad.nii.gz")
    invoke("score", tmp_path / "bad.nii.gz", "--checkpoint", checkpoint, "--out", tmp_path / "r.json")
    reasons = {r["reason"] for r in json.loads((tmp_path / "r.json").read_text())["rows"] if r["level"] == "slice"}
    assert reasons == {o["image_ood_reason"] for o in outputs} == {"not scored: nan-or-inf pixels"}


def silent_server():
    """A local socket that accepts connections and never answers (a hung tracking server)."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    return server


@pytest.mark.slow
def test_a_failing_tracking_server_is_a_warning_not_the_gate_decision(checkpoint, scans, tmp_path):
    import socket

    quick = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "2", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    with silent_server() as server:
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        out = cdm("score", scans / "clean.nii.gz", "--checkpoint", checkpoint, "--threshold", "1e12", "--out",
                  tmp_path / "r.json", "--mlflow", "--tracking-uri", uri, cwd=tmp_path, env=quick)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MLflow tracking at" in out.stderr and "Traceback" not in out.stderr
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["passed"] is True
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    gate = cdm("score", scans, "--checkpoint", checkpoint, "--out", tmp_path / "s.json", "--mlflow",
               "--tracking-uri", f"http://127.0.0.1:{port}", cwd=tmp_path, env=quick)  # fmt: skip
    assert gate.returncode == 1 and "MLflow tracking at" in gate.stderr and "Traceback" not in gate.stderr
    evaluated = cdm("evaluate", scans / "clean.nii.gz", "--checkpoint", checkpoint, "--ood",
                    f"spike={scans / 'spiked.nii.gz'}", "--out-dir", tmp_path / "eval", "--mlflow", "--tracking-uri",
                    f"http://127.0.0.1:{port}", cwd=tmp_path, env=quick)  # fmt: skip
    assert evaluated.returncode == 0 and "MLflow tracking at" in evaluated.stderr
    assert (tmp_path / "eval" / "metrics.json").exists()


@pytest.mark.slow
def test_evaluate_reads_a_phantom_manifest_and_joins_sets_of_one_name(checkpoint, scans, tmp_path):
    made = invoke("make-phantoms", "--out-dir", tmp_path / "test", "--n", 1, "--format", "nifti", "--size", 16,
                  "--slices", 2, "--corrupt")  # fmt: skip
    assert made.exit_code == 0, made.output
    manifest = tmp_path / "test" / "manifest.csv"
    out = invoke("evaluate", manifest, "--checkpoint", checkpoint, "--ood", manifest, "--out-dir", tmp_path / "e")
    assert out.exit_code == 0, out.output
    rows = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert {r["ood_set"] for r in rows} == {f"{a}-{s}" for a in ARTIFACTS for s in ARTIFACTS[a]}
    assert {r["n_id"] for r in rows} == {2} and {r["n_ood"] for r in rows} == {2}, "the clean volume's 2 slices"
    union = invoke("evaluate", scans / "clean.nii.gz", "--checkpoint", checkpoint, "--ood", f"bad={manifest}",
                   "--ood", f"bad={scans / 'spiked.nii.gz'}", "--ood", f"bad={scans / 'spiked.nii.gz'}", "--out-dir",
                   tmp_path / "u")  # fmt: skip
    assert union.exit_code == 0, union.output
    (row, *_) = json.loads((tmp_path / "u" / "metrics.json").read_text())
    assert row["ood_set"] == "bad" and row["n_ood"] == 12 * 2 + 4, "every corrupted volume, the spiked one once"


@pytest.mark.slow
def test_progress_is_logged_as_plain_lines_without_a_terminal(checkpoint, scans, tmp_path):
    out = cdm("score", scans / "clean.nii.gz", scans / "spiked.nii.gz", "--checkpoint", checkpoint, "--threshold",
              "1e12", "--out", tmp_path / "r.csv", cwd=tmp_path, env={"CDM_OOD_PROGRESS_EVERY": "0"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if f"scoring ({DEFAULT_DETECTOR}):" in line]
    assert len(lines) == 2 and " 1/2 (50%) " in lines[0] and "eta" in lines[0]
    assert lines and lines[-1].endswith("/s") and " 2/2 (100%) " in lines[-1] and "\r" not in out.stderr
    read = f"reading headers ({DEFAULT_DETECTOR}): 2/2 (100%)"
    headers = [i for i, line in enumerate(out.stderr.splitlines()) if read in line]
    assert headers and headers[-1] < out.stderr.splitlines().index(lines[0]), "discovery counts, and comes first"


def test_every_run_is_tracked_in_mlflow_by_default(checkpoint, scans, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("CDM_OOD_MLFLOW")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out = invoke("score", scans / "clean.nii.gz", "--checkpoint", checkpoint, "--threshold", "1e12", "--out", "r.csv")
    assert out.exit_code == 0, out.output
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cdm-ood-score").experiment_id])
    assert run.data.params["detector"] == DEFAULT_DETECTOR and run.data.metrics["volume_in"] == 1


def test_calibrate_holds_out_whole_volumes_and_warns_when_too_few_for_the_fpr(checkpoint, tmp_path):
    from cdm_ood.data.phantoms import phantom_volume
    from cdm_ood.data.volume_files import write_dicom_series, write_nifti

    data, rng = tmp_path / "val", np.random.default_rng(11)
    for k, n in enumerate((4, 5, 3, 6)):
        if k % 2:
            write_dicom_series(phantom_volume(rng, size=16, slices=n), data / f"series{k}", modality="ct",
                               volume_index=k)  # fmt: skip
        else:
            write_nifti(phantom_volume(rng, size=16, slices=n), data / f"vol{k}.nii.gz")
    copy = tmp_path / "model.pt"
    copy.write_bytes(checkpoint.read_bytes())
    out = cdm("calibrate", data, "--checkpoint", copy, "--fpr", "0.05", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    warning = [line for line in out.stderr.splitlines() if "WARNING" in line and "false-positive rate" in line]
    assert len(warning) == 1 and "needs at least 20 held out" in warning[0]
    held_out = load_checkpoint(copy)["calibration"]["detectors"]["nll"]["id_scores"]
    slices = list(iter_slices(data))
    scores = OODDetector.from_checkpoint(copy, detector="nll").score(slices)
    stored = [np.isclose(s, held_out, rtol=1e-5, atol=0).any() for s in scores]
    sides = {v: {k for k, s in zip(stored, slices, strict=True) if s.source.volume_id == v}
             for v in {s.source.volume_id for s in slices}}  # fmt: skip
    assert all(len(side) == 1 for side in sides.values()), f"a volume on both sides: {sides}"
    assert sum(stored) == len(held_out) and sum(side == {True} for side in sides.values()) == 2


@pytest.mark.slow
def test_device_is_one_shared_option_resolved_before_any_work(checkpoint, scans, tmp_path):
    from cdm_ood.cli.score import calibrate_command, evaluate_command, score_command

    options = [next(p for p in c.params if p.name == "device") for c in (calibrate_command, score_command,
                                                                           evaluate_command)]  # fmt: skip
    assert {(o.default, o.help) for o in options} == {(options[0].default, options[0].help)}
    assert options[0].default == "auto" and "cuda:LOCAL_RANK" in options[0].help
    copy = tmp_path / "model.pt"
    copy.write_bytes(checkpoint.read_bytes())
    runs = {
        "calibrate": [scans / "clean.nii.gz"],
        "score": [scans / "clean.nii.gz", "--out", tmp_path / "o.csv"],
        "evaluate": [scans / "clean.nii.gz", "--ood", scans / "spiked.nii.gz", "--out-dir", tmp_path / "e"],
    }
    for device, reason in (("cuda:99", "CUDA device(s)"), ("tpu-ish", "--device tpu-ish")):
        for command, args in runs.items():
            out = invoke(command, *args, "--checkpoint", copy, "--device", device)
            assert out.exit_code == 2 and out.stderr.startswith("error: ") and reason in out.stderr, out.output
    assert copy.read_bytes() == checkpoint.read_bytes()
    assert not (tmp_path / "o.csv").exists() and not (tmp_path / "e").exists()
    out = invoke("evaluate", scans / "clean.nii.gz", "--checkpoint", checkpoint, "--ood", scans / "spiked.nii.gz",
                 "--out-dir", tmp_path / "e", "--device", "cpu")  # fmt: skip
    assert out.exit_code == 0, out.output


def with_slope(path: Path, slope: float) -> Path:
    """`path` (an uncompressed NIfTI-1 file) with its stored scl_slope set to `slope`."""
    import nibabel as nib

    raw = path.read_bytes()
    header = nib.Nifti1Header(raw[:348])
    header["scl_slope"] = slope
    path.write_bytes(header.binaryblock + raw[348:])
    return path


@pytest.mark.slow
def test_headers_that_disagree_with_themselves_flag_their_volume_on_every_path(checkpoint, tmp_path):
    import shutil

    import nibabel as nib
    import pandas as pd
    import pydicom
    from monai.transforms import EnsureChannelFirstd, LoadImaged

    from cdm_ood.data.phantoms import phantom_volume
    from cdm_ood.data.volume_files import write_dicom_series, write_nifti
    from cdm_ood.ood.transforms import MONOCHROME1_LOADED

    scans, rng = tmp_path / "scans", np.random.default_rng(9)
    write_dicom_series(phantom_volume(rng, size=16, slices=3), scans / "dup", modality="ct", volume_index=0)
    shutil.copy(scans / "dup" / "slice_001.dcm", scans / "dup" / "slice_001_again.dcm")  # 4 files, 3 instances
    write_dicom_series(phantom_volume(rng, size=16, slices=3), scans / "sag", modality="ct", volume_index=1)
    ds = pydicom.dcmread(scans / "sag" / "slice_002.dcm")
    del ds.ImageOrientationPatient  # one slice without orientation in an axial series: a volume of its own, flagged
    ds.save_as(scans / "sag" / "slice_002.dcm")
    volume = phantom_volume(rng, size=16, slices=2)
    write_nifti(volume, scans / "clean.nii.gz")
    image = nib.Nifti1Image(volume.transpose(2, 1, 0), np.eye(4))
    image.set_qform(np.eye(4), code=1)
    image.set_sform(nib.affines.from_matvec(np.eye(3), [0, 0, 3.0]), code=1)  # 3 mm further up than the qform
    image.to_filename(scans / "qsform.nii")
    for name, slope in (("zero", 0.0), ("nan", np.nan), ("inf", np.inf)):
        nib.Nifti1Image(volume.transpose(2, 1, 0), np.eye(4)).to_filename(scans / f"slope_{name}.nii")
        with_slope(scans / f"slope_{name}.nii", slope)
    (cr,) = Path(pydicom.__file__).parent.joinpath("data", "test_files").rglob("6154")  # MONOCHROME1
    shutil.copy(cr, scans / "cr.dcm")
    out = invoke("score", scans, "--checkpoint", checkpoint, "--threshold", "1e12", "--out", tmp_path / "r.csv")
    assert out.exit_code == 1 and isinstance(out.exception, SystemExit), out.output
    report = pd.read_csv(tmp_path / "r.csv", keep_default_na=False)
    volumes = {Path(r.path).name: (r.verdict, r.reason) for r in report[report.level == "volume"].itertuples()}
    assert {name: verdict for name, (verdict, _) in volumes.items()} == {
        "clean.nii.gz": "in", "cr.dcm": "in", "dup": "flagged", "sag": "in", "slice_002.dcm": "flagged",
        "qsform.nii": "flagged",
        "slope_zero.nii": "flagged", "slope_nan.nii": "flagged", "slope_inf.nii": "flagged",
    }  # fmt: skip
    assert volumes["dup"][1].startswith("2 of 4 slices flagged (not scored: duplicate SOPInstanceUID: 4 files of the "
                                        "series hold 3 SOPInstanceUIDs); mean of 2 slice scores")  # fmt: skip
    assert volumes["slice_002.dcm"][1] == (
        "series split by orientation into 2 volumes: part 1, ImageOrientationPatient absent or malformed; no slice "
        "could be scored (1 flagged: ImageOrientationPatient absent or malformed, where 2 of the series' 3 slices have "
        "one)")  # fmt: skip
    assert volumes["sag"][1].startswith("series split by orientation into 2 volumes: part 2, ImageOrientationPatient "
                                        "axial (1, 0, 0, 0, 1, 0); mean of 2 slice scores")  # fmt: skip
    assert volumes["qsform.nii"][1] == ("no slice could be scored (2 flagged: NIfTI qform (code 1) and sform (code 1) "
                                        "disagree: voxels up to 3 mm apart (tolerance 0.01 mm))")  # fmt: skip
    for name in ("zero", "nan", "inf"):
        value = {"zero": "0"}.get(name, name)
        assert volumes[f"slope_{name}.nii"][1] == (f"no slice could be scored (2 flagged: NIfTI scl_slope is {value}: "
                                                   "the voxels' scaling is undefined (read unscaled))")  # fmt: skip
    detector = OODDetector.from_checkpoint(checkpoint, threshold=1e12)
    frame = detector.score_frame(scans)  # the Python API: the same rows
    assert frame[frame.level == "volume"][["verdict", "reason"]].values.tolist() == report[report.level == "volume"][
        ["verdict", "reason"]].values.tolist()  # fmt: skip
    assert detector.predict(scans / "slope_nan.nii").all() and np.isnan(detector.score(scans / "qsform.nii")).all()
    chain = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), ScoreOODd("image", detector)])
    for name in ("dup", "qsform.nii", "slope_zero.nii"):  # the MONAI transform: the same volume verdicts
        d = chain({"image": str(scans / name)})
        assert (d["image_ood_verdict"], d["image_ood_reason"]) == volumes[name], name
    d = chain({"image": str(scans / "cr.dcm")})
    assert d["image_ood_verdict"] == "flagged" and MONOCHROME1_LOADED in d["image_ood_reason"]


def test_score_sources_gives_error_ignored_slice_and_mean_volume_rows_read_in_this_process(checkpoint, scans):
    """The rows of `score_sources` in report order: failed and ignored files as given, a slice row per slice (the
    scores of `score`), then the volume row with the default aggregate, the mean; files are read by the calling
    process itself (no DataLoader worker by default), and progress counts the files handled."""
    from cdm_ood.data.discovery import discover
    from cdm_ood.data.errors import UnreadableFileError
    from cdm_ood.data.walk import IgnoredFile
    from cdm_ood.ood.batch import score_sources

    detector = OODDetector.from_checkpoint(checkpoint)
    path = str(scans / "clean.nii.gz")
    sources = discover([scans / "clean.nii.gz"])
    readers, transform = [], detector.transform
    detector.transform = lambda image: readers.append(os.getpid()) or transform(image)
    handled: list[int] = []
    rows = score_sources(detector, detector.thresholds, sources, [UnreadableFileError("/gone.dcm", "truncated")],
                         progress=handled.append, ignored=[IgnoredFile("/notes.txt", "*.txt")])  # fmt: skip
    assert readers == [os.getpid()] * 4 and handled == [1]
    assert [(r["level"], r["path"], r["slice"], r["verdict"], r["reason"]) for r in rows[:2]] == [
        ("file", "/gone.dcm", None, "unreadable", "UnreadableFileError: truncated"),
        ("file", "/notes.txt", None, "ignored", "not read: matches the ignore pattern '*.txt'"),
    ]
    slices, (volume,) = rows[2:6], rows[6:]
    assert [(r["level"], r["path"], r["slice"], r["volume"]) for r in slices] == [("slice", path, k, path)
                                                                                  for k in range(4)]  # fmt: skip
    expected = detector.score(scans / "clean.nii.gz")
    assert [r["score"] for r in slices] == pytest.approx(expected.tolist(), rel=1e-5)
    threshold = detector.thresholds.score
    assert all(r["threshold"] == threshold and r["verdict"] == ("ood" if r["score"] > threshold else "in")
               for r in rows[2:])  # fmt: skip
    assert (volume["level"], volume["path"], volume["score"]) == ("volume", path, pytest.approx(expected.mean()))
    assert volume["reason"].startswith("mean of 4 slice scores")


def test_a_reader_process_prints_no_traceback_for_a_hung_up_scoring_process_only(monkeypatch):
    """`_quiet_reader` (each DataLoader worker's start): EOFError and ConnectionError (the scoring process hung up)
    go unprinted; any other error reaches the hook that was there before, with its arguments as given."""
    from cdm_ood.ood.batch import _quiet_reader

    printed = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: printed.append((kind, value, tb)))
    _quiet_reader(0)
    for err in (EOFError(), ConnectionResetError(), BrokenPipeError()):
        sys.excepthook(type(err), err, None)
    assert printed == []
    try:
        raise ValueError("bad")
    except ValueError as raised:
        err, tb = raised, raised.__traceback__
    sys.excepthook(ValueError, err, tb)
    assert printed == [(ValueError, err, tb)]


def test_prepared_files_gives_each_slice_or_the_whole_volume_and_every_failed_file_of_a_volume(tmp_path):
    """`PreparedFiles` item i: the model-space slices of file i, or with `volumes` the stacked volume of the i-th
    volume's files; a volume with files that cannot be read gives no image and the error of each such file."""
    from cdm_ood.data.discovery import discover
    from cdm_ood.data.phantoms import phantom_volume
    from cdm_ood.data.readers import read_source
    from cdm_ood.data.volume_files import write_dicom_series
    from cdm_ood.data.volumes import read_volume
    from cdm_ood.ood.batch import PreparedFiles

    write_dicom_series(phantom_volume(np.random.default_rng(0), size=16, slices=3), tmp_path / "s", modality="ct",
                       volume_index=0)  # fmt: skip
    sources = discover([tmp_path / "s"])
    slices = PreparedFiles(sources, torch.as_tensor)
    assert len(slices) == 3
    for i, source in enumerate(sources):
        ((read, flags, x, kept),), errors, files = slices[i]
        (expected,) = read_source(source)
        assert (read, flags, kept, errors, files) == (expected.source, (), None, [], [source])
        assert torch.equal(x, torch.as_tensor(expected.image))
    whole = PreparedFiles(sources, torch.as_tensor, volumes=True)
    ((read, flags, x, kept),), errors, files = whole[0]
    (expected,) = read_volume(sources)
    assert len(whole) == 1 and (read, flags, kept, errors, files) == (expected.source, (), None, [], sources)
    assert torch.equal(x, torch.as_tensor(expected.image))
    for source in sources[:2]:
        Path(source.path).write_bytes(b"truncated")
    items, errors, files = whole[0]
    assert (items, files) == ([], sources) and [e.path for e in errors] == [s.path for s in sources[:2]]


def test_prepared_files_keeps_images_when_asked_skips_flagged_slices_and_names_what_cannot_be_mapped(tmp_path):
    """With `keep_images` an item holds each image read; a flagged slice is never transformed; a file that cannot
    be read gives its one error; a transform that fails names the file and the redacted reason (out of memory in
    words)."""
    from dataclasses import replace

    from cdm_ood.data.discovery import discover
    from cdm_ood.data.errors import UnreadableFileError
    from cdm_ood.data.phantoms import phantom_volume
    from cdm_ood.data.readers import read_source
    from cdm_ood.data.volume_files import write_dicom_series
    from cdm_ood.ood.batch import PreparedFiles

    write_dicom_series(phantom_volume(np.random.default_rng(0), size=16, slices=2), tmp_path / "s", modality="ct",
                       volume_index=0)  # fmt: skip
    sources = discover([tmp_path / "s"])
    ((read, _, _, kept),), _, _ = PreparedFiles(sources, torch.as_tensor, keep_images=True)[0]
    (expected,) = read_source(sources[0])
    assert kept.source == read == expected.source and np.array_equal(kept.image, expected.image)

    def refuse(image):
        raise AssertionError("a flagged slice was transformed")

    flagged = replace(sources[0], flags=("ImageOrientationPatient differs",))
    ((_, flags, x, _),), errors, _ = PreparedFiles([flagged], refuse)[0]
    assert (flags, x, errors) == (("ImageOrientationPatient differs",), None, [])

    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00")
    items, errors, files = PreparedFiles([replace(sources[0], path=str(broken))], torch.as_tensor)[0]
    assert (items, files) == ([], [replace(sources[0], path=str(broken))])
    assert [(type(e), e.path) for e in errors] == [(UnreadableFileError, str(broken))] and errors[0].reason

    for raised, reason in ((ValueError("size 'Jane Doe' does not fit"), "size '…' does not fit"),
                           (MemoryError(), "out of memory")):  # fmt: skip

        def fail(image, raised=raised):
            raise raised

        items, errors, files = PreparedFiles(sources, fail)[1]
        assert (items, files) == ([], [sources[1]])
        assert [(type(e), e.path, e.reason) for e in errors] == [
            (UnreadableFileError, sources[1].path, f"cannot be mapped to the model's input: {reason}")
        ]


def test_auto_workers_take_half_the_cores_on_a_gpu_and_those_torch_leaves_free_on_cpu(monkeypatch):
    """At most 8 reader processes beside a GPU (half the cores), at most 4 on CPU (the cores torch's threads leave)."""
    from cdm_ood.ood import batch

    cases = [("cuda", 2, 1, 1), ("cuda", 7, 1, 3), ("cuda", 32, 1, 8), ("cpu", 2, 2, 0), ("cpu", 2, 1, 1),
             ("cpu", 1, 4, 0), ("cpu", 6, 3, 3), ("cpu", 16, 8, 4)]  # fmt: skip
    for device, cores, threads, expected in cases:
        monkeypatch.setattr(batch.os, "sched_getaffinity", lambda pid, cores=cores: set(range(cores)))
        monkeypatch.setattr(batch.torch, "get_num_threads", lambda threads=threads: threads)
        assert batch.auto_workers(torch.device(device)) == expected, (device, cores, threads)


def test_report_rows_are_ordered_by_path_time_point_and_slice_then_volumes_with_their_checks():
    """A file row (no time point, no slice) sorts first among its path's rows and flags its volume; the volume rows
    apply the volume checks of the thresholds (to volumes of at least `MIN_SLICES` slices)."""
    from cdm_ood.data.records import SliceSource
    from cdm_ood.ood.batch import report_rows
    from cdm_ood.ood.local_check import LocalCheck
    from cdm_ood.ood.report import COLUMNS, slice_row
    from cdm_ood.ood.thresholds import Thresholds
    from cdm_ood.ood.volume_checks import MIN_SLICES

    def row(path, index, time_point=None, peak=1.0):
        return slice_row(SliceSource(path, index, path, time_point=time_point), 1.0, 5.0, statistics={"map_peak": peak})

    file_row = dict.fromkeys(COLUMNS) | {"level": "file", "path": "a.nii", "volume": "a.nii", "verdict": "flagged",
                                         "reason": "map not written"}  # fmt: skip
    rows = [row("a.nii", 0, 1), row("a.nii", 1, 0), file_row, row("a.nii", 0, 0)]
    rows += [row("c.nii", k, peak=20.0) for k in reversed(range(MIN_SLICES))] + [row("b.nii", 0, peak=20.0)]
    out = report_rows(rows, Thresholds(5.0, (LocalCheck(10.0),)), "mean")
    assert [(r["level"], r["path"], r["time_point"], r["slice"]) for r in out[:4]] == [
        ("file", "a.nii", None, None),
        ("slice", "a.nii", 0, 0),
        ("slice", "a.nii", 0, 1),
        ("slice", "a.nii", 1, 0),
    ]
    assert [r["slice"] for r in out if r["path"] == "c.nii" and r["level"] == "slice"] == list(range(MIN_SLICES))
    volumes = {r["volume"]: r for r in out if r["level"] == "volume"}
    assert volumes["a.nii"]["verdict"] == "flagged" and volumes["a.nii"]["reason"].startswith("map not written; ")
    assert volumes["b.nii"]["verdict"] == "in", "too few slices for the volume checks"
    assert volumes["c.nii"]["verdict"] == "ood" and LocalCheck.unlike in volumes["c.nii"]["reason"]


def test_a_reader_process_that_dies_while_handing_over_is_named():
    from cdm_ood.ood.batch import _handed_over

    def loader():
        yield ([], [], [])
        raise ConnectionResetError("connection reset by peer")

    items = _handed_over(loader())
    assert next(items) == ([], [], [])
    message = "a DataLoader worker (reader process) died while handing over a batch (connection reset by peer)"
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        next(items)


def test_maps_and_statistics_of_a_slice_model_are_written_while_scoring(checkpoint, tmp_path):
    """`iter_scored` with a map writer: each scored slice's map files and its row's statistics (bits/dim, the map's
    peaks) from the same pass."""
    from cdm_ood.data.discovery import discover
    from cdm_ood.data.phantoms import phantom_volume
    from cdm_ood.data.volume_files import write_dicom_series
    from cdm_ood.ood.batch import iter_scored
    from cdm_ood.ood.map_outputs import MapWriter

    write_dicom_series(phantom_volume(np.random.default_rng(0), size=16, slices=2), tmp_path / "s", modality="ct",
                       volume_index=0)  # fmt: skip
    sources = discover([tmp_path / "s"])
    detector = OODDetector.from_checkpoint(checkpoint)
    writer = MapWriter(tmp_path / "maps", sources=sources)
    rows = [r for group in iter_scored(detector, detector.thresholds, sources, [], maps=writer) for r in group]
    assert [(r["level"], r["slice"]) for r in rows] == [("slice", 0), ("slice", 1)]
    assert all(math.isfinite(r[c]) for r in rows for c in ("bits_per_dim", "map_peak")), rows
    assert len(list((tmp_path / "maps").rglob("*.npy"))) >= 2 and len(list((tmp_path / "maps").rglob("*.png"))) >= 2


def test_a_volume_model_scores_and_maps_each_volume_and_each_series_as_one_image(tmp_path):
    """`iter_scored` with a model whose unit is the volume (untrained, calibrated on four volumes: the rows and
    files, not the scores, are tested): one volume row for a NIfTI file and one for a DICOM series of files, none
    per slice, and with a map writer the map of every slice of each volume."""
    from dataclasses import replace

    from cdm_ood.data.discovery import discover
    from cdm_ood.data.phantoms import phantom_volume
    from cdm_ood.data.presets import IntensityPreset
    from cdm_ood.data.volume_files import write_dicom_series, write_nifti
    from cdm_ood.model.checkpoint import LoadedModel
    from cdm_ood.model.sections import ModelConfig, ScheduleConfig
    from cdm_ood.model.spec import ModelSpec
    from cdm_ood.ood import calibrate
    from cdm_ood.ood.batch import PreparedFiles, iter_scored
    from cdm_ood.ood.map_outputs import MapWriter
    from cdm_ood.ood.scoring import ImageScorer
    from cdm_ood.ood.thresholds import Thresholds

    config = ModelConfig(channels=(8, 16), attention_levels=(False, False), num_head_channels=8)
    spec = ModelSpec(config, ScheduleConfig(T=10), IntensityPreset("minmax"), (8, 16, 16), 1, 8)
    torch.manual_seed(0)
    model = LoadedModel(spec.build_classifier().eval(), spec.noise_schedule(), spec, {}, 0, "")
    rng = np.random.default_rng(0)
    for k in range(4):
        write_nifti(phantom_volume(rng, size=16, slices=8), tmp_path / "fit" / f"v{k}.nii.gz")
    scorer = ImageScorer(model, "nll")
    fit = PreparedFiles(discover([tmp_path / "fit"]), scorer.transform, volumes=True)
    x = torch.stack([fit[k][0][0][2] for k in range(len(fit))])
    calibration = calibrate(scorer.features(x, ("profile", "residuals")), scorer.num_dims, 8, 0.25, ["nll", "map"],
                            "nll")  # fmt: skip
    write_nifti(phantom_volume(rng, size=16, slices=8), tmp_path / "in" / "v.nii.gz")
    write_dicom_series(phantom_volume(rng, size=16, slices=8), tmp_path / "in" / "s", modality="ct",
                       volume_index=0)  # fmt: skip
    sources = discover([tmp_path / "in"])
    scorer = ImageScorer(replace(model, calibration=calibration), "nll")
    for writer in (None, MapWriter(tmp_path / "maps", sources=sources)):
        rows = [row for group in iter_scored(scorer, Thresholds(1e12), sources, [], maps=writer) for row in group]
        assert sorted((r["level"], r["verdict"], Path(r["path"]).name) for r in rows) == [
            ("volume", "in", "s"), ("volume", "in", "v.nii.gz")]  # fmt: skip
    assert all(math.isfinite(r["map_peak"]) for r in rows)
    assert len(list((tmp_path / "maps").rglob("*.npy"))) >= 16


def test_every_reader_process_starts_with_the_quiet_excepthook(checkpoint, tmp_path):
    """`iter_scored` with reader processes: each runs `_quiet_reader` first (seen here from inside the reader, in
    the reason of a transform that fails there)."""
    from cdm_ood.data.discovery import discover
    from cdm_ood.data.phantoms import phantom_volume
    from cdm_ood.data.volume_files import write_dicom_series
    from cdm_ood.ood.batch import iter_scored

    write_dicom_series(phantom_volume(np.random.default_rng(0), size=16, slices=1), tmp_path / "s", modality="ct",
                       volume_index=0)  # fmt: skip
    detector = OODDetector.from_checkpoint(checkpoint)

    def probe(image):
        raise ValueError(f"excepthook {sys.excepthook.__name__} in process {os.getpid()}")

    detector.transform = probe
    (row,) = [r for group in iter_scored(detector, detector.thresholds, discover([tmp_path]), [], 1) for r in group]
    assert "excepthook hook in process" in row["reason"], "the default is named excepthook"
    assert f"in process {os.getpid()}" not in row["reason"]


def test_iter_scored_yields_each_batch_with_its_errors_flagged_slices_and_maps_not_written(checkpoint, tmp_path):
    """One group per batch of `batch_size` scored images: a file that cannot be read is an `unreadable` row, a
    flagged slice a `flagged` row against the threshold, and a map that cannot be written a `flagged` file row of
    its volume, in the batch whose slices made the volume file due (another volume's slice came) or in the last group
    (the volume files written at the end)."""
    from dataclasses import replace

    from cdm_ood.data.discovery import discover
    from cdm_ood.data.phantoms import phantom_volume
    from cdm_ood.data.volume_files import write_dicom_series
    from cdm_ood.ood.batch import iter_scored
    from cdm_ood.ood.map_outputs import MapWriter

    rng = np.random.default_rng(0)
    for k, (name, slices) in enumerate((("s", 2), ("t", 1), ("u", 1))):
        write_dicom_series(phantom_volume(rng, size=16, slices=slices), tmp_path / name, modality="ct",
                           volume_index=k)  # fmt: skip
    sources = discover([tmp_path / name for name in "stu"])
    broken = Path(sources[2].path)
    broken.write_bytes(broken.read_bytes()[:300])
    sources[1] = replace(sources[1], flags=("ImageOrientationPatient differs",))
    detector = OODDetector.from_checkpoint(checkpoint)
    detector.batch_size = 1
    for taken in ("s_map.nii.gz", "u_map.nii.gz"):  # folders where the volume maps of s and u would go
        (tmp_path / "maps" / taken).mkdir(parents=True)
    writer = MapWriter(tmp_path / "maps", sources=sources)
    groups = list(iter_scored(detector, detector.thresholds, sources, [], maps=writer))

    def seen(row):
        verdict = "scored" if row["verdict"] in ("in", "ood") else row["verdict"]
        return row["level"], Path(row["path"]).name, row["slice"], verdict, row["threshold"]

    threshold = detector.thresholds.score
    assert [[seen(r) for r in group] for group in groups] == [
        [("slice", "slice_000.dcm", 0, "scored", threshold)],
        [("slice", "slice_001.dcm", 1, "flagged", threshold), ("file", "slice_000.dcm", None, "unreadable", None),
         ("slice", "slice_000.dcm", 0, "scored", threshold), ("file", "slice_000.dcm", None, "flagged", None)],
        [("file", "slice_000.dcm", None, "flagged", None)],
    ]  # fmt: skip
    assert groups[1][1]["path"] == str(broken) and groups[1][1]["reason"].startswith("UnreadableFileError: ")
    for row, volume, name in ((groups[1][3], 0, "s"), (groups[2][0], 3, "u")):
        assert row["volume"] == sources[volume].volume_id
        assert row["reason"].startswith(f"map not written: {name}_map.nii.gz: "), row["reason"]
